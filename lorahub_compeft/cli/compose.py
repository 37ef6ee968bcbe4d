"""`compose`: learn a mix of experts for a new task from a few examples."""
from __future__ import annotations

import json
from pathlib import Path

from lorahub_compeft.cli.options import (add_dtype_option, add_select_options, add_threads_option,
                                         apply_threads, positive_int, read_experts_file)


def add_parsers(sub) -> None:
    p = sub.add_parser("compose", help="learn a mix of experts for a new task from a few examples",
                       description="LoraHub: sample N experts, mix them per module as A=sum w_i A_i, "
                                   "B=sum w_i B_i, and learn w with a gradient-free optimizer "
                                   "(nevergrad Shiwa) on the examples' loss + 0.05*mean|w|.")
    p.add_argument("--library", help="an expert library folder to sample from")
    p.add_argument("--experts", nargs="+", default=[], help="expert files, PEFT dirs or Hub ids")
    p.add_argument("--experts-file", help="file with one expert (file, PEFT dir or Hub id) per line")
    p.add_argument("--examples", required=True,
                   help='JSON lines file, one {"input": ..., "target": ...} per line')
    p.add_argument("--eval", dest="eval_file",
                   help="held-out examples (same format): print the composed model's exact match")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="answer length for --eval (default 16)")
    p.add_argument("--model", help="base model name or path (default: the experts' base model)")
    add_select_options(p)
    p.add_argument("--budget", type=int, default=40, help="optimizer evaluations (default 40)")
    p.add_argument("--seed", type=int, default=1, help="seed of the expert sample and the "
                                                         "optimizer (default 1)")
    p.add_argument("--restarts", type=int, default=1,
                   help="searches from different starts; the lowest few-shot loss is kept "
                        "(default 1)")
    p.add_argument("--optimizer", default=None, help="any nevergrad optimizer (default Shiwa)")
    p.add_argument("--objective", choices=("paper", "lorahub"), default="paper",
                   help="lorahub: the released code's loss scaling and NGOpt")
    p.add_argument("--out", required=True, help="directory for the composed PEFT adapter")
    p.add_argument("--force", action="store_true",
                   help="replace an adapter folder holding only adapter_config.json and "
                        "adapter_model.safetensors (never other files)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dtype_option(p)
    p.add_argument("--candidates-per-step", type=positive_int, default=1, metavar="K",
                   help="candidates scored per forward (default 1; more helps on GPUs)")
    add_threads_option(p)
    p.set_defaults(func=cmd_compose)


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SystemExit(f"error: {path}:{number}: not valid JSON ({err})")
    return rows


def cmd_compose(args) -> int:
    apply_threads(args)
    from lorahub_compeft.eval.bbh import exact_match
    from lorahub_compeft.compose.composer import compose
    from lorahub_compeft.eval.bbh import accuracy
    from lorahub_compeft.store.library import ExpertLibrary
    from lorahub_compeft.io.adapters import CONFIG_NAME, WEIGHTS_NAME
    from lorahub_compeft.io.files import check_dir_target
    from lorahub_compeft.io.base_models import check_model_reference
    out = Path(args.out)
    check_dir_target(out, args.force, (CONFIG_NAME, WEIGHTS_NAME))  # before the search, not after
    if args.model:
        check_model_reference(args.model)
    listed = args.experts + (read_experts_file(args.experts_file) if args.experts_file else [])
    if bool(args.library) == bool(listed):
        raise SystemExit("error: give experts with one of --library or --experts/--experts-file")
    held_out = read_jsonl(args.eval_file) if args.eval_file else None  # checked before composing
    experts = ExpertLibrary(args.library, read_only=True) if args.library else listed
    options = {"optimizer": args.optimizer} if args.optimizer else {}
    result = compose(experts, read_jsonl(args.examples), model=args.model,
                     n_experts=args.n_experts, select=args.select, restarts=args.restarts,
                     seed=args.seed, budget=args.budget, objective=args.objective,
                     dtype=args.dtype, candidates_per_step=args.candidates_per_step,
                     progress=not args.quiet, **options)
    result.save_adapter(out, force=args.force)
    scores = result.selection.scores
    if scores:
        print(f"chose {len(result.experts)} of {len(result.selection.scores)} scored experts by "
              f"few-shot loss (lowest {min(scores.values()):.4f})")
    print(f"best loss {result.best_loss:.4f} (no composition: {result.zero_loss:.4f})")
    for name, w in sorted(result.weights.items(), key=lambda kv: -abs(kv[1])):
        print(f"  {w:+.3f}  {name}")
    if held_out is not None:
        answers = result.generate([e["input"] for e in held_out], args.max_new_tokens)
        em = 100 * accuracy(answers, [e["target"] for e in held_out], exact_match)
        print(f"exact match on {len(held_out)} held-out examples ({args.eval_file}): {em:.1f}%")
    print(f"wrote {out}")
    return 0
