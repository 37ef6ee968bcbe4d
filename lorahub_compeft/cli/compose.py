"""`compose`: learn a mix of experts for a new task from a few examples."""
from __future__ import annotations

import dataclasses

from lorahub_compeft.cli.options import (add_select_options, add_threads_option, apply_threads,
                                         MAX_NEW_TOKENS, MAX_RANK, bounded_int, count_option)
from lorahub_compeft.config import MIXES, OBJECTIVES, STARTS, WEIGHTINGS, ComposeConfig


def budget_flag(text: str) -> int | str:
    """--budget: auto, or a count in ComposeConfig's range (config.COUNT_LIMITS)."""
    return text if text == "auto" else count_option("budget")(text)


# compose()'s settings besides --select and -n (add_select_options), as flags: the flag and how
# argparse reads it. Default and help come from config.ComposeConfig, so that `compose` with no
# flags is compose() with no options.
CONFIG_FLAGS = {
    "budget": ("--budget", {"type": budget_flag}),
    "patience": ("--patience", {"type": count_option("patience")}),
    "seed": ("--seed", {"type": int}),
    "restarts": ("--restarts", {"type": count_option("restarts")}),
    "optimizer": ("--optimizer", {}),
    "objective": ("--objective", {"choices": OBJECTIVES}),
    "l1": ("--l1", {"type": float}),
    "bounds": ("--bounds", {"type": float}),
    "batch_size": ("--batch-size", {"type": count_option("batch_size")}),
    "max_length": ("--max-length", {"type": count_option("max_length")}),
    "dtype": ("--dtype", {"choices": ("auto", "bf16", "fp32", "int8")}),
    "candidates_per_step": ("--candidates-per-step", {"type": count_option("candidates_per_step"),
                                                      "metavar": "K"}),
    "mix": ("--mix", {"choices": MIXES}),
    "start": ("--start", {"choices": STARTS}),
    "weights": ("--weights", {"choices": WEIGHTINGS}),
}


def add_parsers(sub) -> None:
    p = sub.add_parser("compose", help="learn a mix of experts for a new task from a few examples",
                       description="Choose N experts (by few-shot loss, or LoraHub's seeded "
                                   "draw), mix them (--mix factors: per module A=sum w_i A_i, "
                                   "B=sum w_i B_i; product: the update sum w_i s B_i A_i, a "
                                   "LoRA of rank N*r), and learn w with a gradient-free "
                                   "optimizer (nevergrad) on the examples' loss + l1*mean|w|. "
                                   "The defaults are compose()'s in Python.")
    p.add_argument("--library", help="an expert library folder to sample from")
    p.add_argument("--experts", nargs="+", default=[], help="expert files, PEFT dirs or Hub ids")
    p.add_argument("--experts-file", help="file with one expert (file, PEFT dir or Hub id) per line")
    p.add_argument("--examples", required=True,
                   help='JSON lines file, one {"input": ..., "target": ...} per line')
    p.add_argument("--eval", dest="eval_file",
                   help="held-out examples (same format): print the composed model's exact match")
    p.add_argument("--max-new-tokens", type=bounded_int(1, MAX_NEW_TOKENS, "tokens"), default=16,
                   help="answer length for --eval (default 16)")
    p.add_argument("--model", help="base model name or path (default: the experts' base model)")
    add_select_options(p)
    defaults = ComposeConfig()
    for name, (flag, how) in CONFIG_FLAGS.items():
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default {default})"
        p.add_argument(flag, dest=name, default=default, help=ComposeConfig.help(name) + shown,
                       **how)
    p.add_argument("--out", required=True, help="directory for the composed PEFT adapter")
    p.add_argument("--rank", type=bounded_int(1, MAX_RANK, "the adapter's rank"),
                   help="write a compact adapter of this rank: each module's update truncated "
                        "by SVD, its relative Frobenius error printed (default: the composed "
                        "adapter exactly, of rank N*r with --mix product)")
    p.add_argument("--force", action="store_true",
                   help="replace an adapter folder holding only adapter_config.json, "
                        "adapter_model.safetensors and the composition.json compose wrote "
                        "(never other files)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=cmd_compose)


def compose_config(args) -> ComposeConfig:
    """The flags as compose()'s settings (every field of ComposeConfig is a flag)."""
    return ComposeConfig(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(ComposeConfig)})


def cmd_compose(args) -> int:
    apply_threads(args)
    from lorahub_compeft.eval.bbh import exact_match
    from lorahub_compeft.compose.composer import compose
    from lorahub_compeft.eval.bbh import accuracy
    from lorahub_compeft.store.library import ExpertLibrary
    from lorahub_compeft.compose.export import COMPOSITION_NAME, check_composed_target
    from lorahub_compeft.compose.objective import validate_examples
    from lorahub_compeft.io.files import read_json, read_jsonl
    from lorahub_compeft.io.base_models import check_model_reference
    out = check_composed_target(args.out, args.force)  # before the search, not after
    if args.model:
        check_model_reference(args.model)
    from lorahub_compeft.eval.expert_lists import experts_from_args
    listed = experts_from_args(args.experts, args.experts_file)
    if bool(args.library) == bool(listed):
        raise SystemExit("error: give experts with one of --library or --experts/--experts-file")
    config = compose_config(args)
    # both files are read and checked before composing
    examples = validate_examples(read_jsonl(args.examples, strict=True), args.examples)
    held_out = validate_examples(read_jsonl(args.eval_file, strict=True), args.eval_file) \
        if args.eval_file else None
    experts = ExpertLibrary(args.library, read_only=True) if args.library else listed
    result = compose(experts, examples, model=args.model, config=config, progress=not args.quiet)
    result.save_adapter(out, force=args.force, rank=args.rank)
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
    if args.rank:
        export = read_json(out / COMPOSITION_NAME)["export"]
        print(f"rank {export['rank']} adapter (composed rank {result.config['r']}): relative "
              f"Frobenius error {export['relative_error']:.4g}")
    print(f"wrote {out}")
    return 0
