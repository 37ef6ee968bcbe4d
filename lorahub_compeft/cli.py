"""The `lorahub-compeft` command: compress, inspect and export experts, keep a library of them,
and compose them for a new task from a few examples."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EPILOG = """examples:
  lorahub-compeft compress path/to/peft_adapter_dir -o expert.safetensors --density 0.1 --alpha 1
  lorahub-compeft inspect expert.safetensors
  lorahub-compeft export expert.safetensors -o adapter_dir/
  lorahub-compeft library add ./experts lorahub/flan_t5_large-ag_news_subset path/to/dir
  lorahub-compeft library list ./experts
  lorahub-compeft compose --library ./experts --examples task.jsonl -n 20 --out my_adapter/
"""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def parse_alpha(text: str):
    """'auto' or a positive number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a positive number or 'auto', got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"alpha must be positive, got {text}")
    return value


def add_selection_scope(p: argparse.ArgumentParser) -> None:
    """--per-tensor (the default) or --global top-k selection and scale."""
    from .codec import DEFAULT_COMPRESSION
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--per-tensor", dest="per_tensor", action="store_true",
                       default=DEFAULT_COMPRESSION["per_tensor"],
                       help="top-k and scale within each tensor (default)")
    scope.add_argument("--global", dest="per_tensor", action="store_false",
                       help="top-k and one scale over the whole adapter (the paper's code)")


def _add_compression_options(p: argparse.ArgumentParser, encoding: bool = True) -> None:
    from .codec import DEFAULT_COMPRESSION as d, PAPER_COMPRESSION as paper
    p.add_argument("--density", "-k", type=float, default=d["density"],
                   help=f"fraction of task-vector entries kept, in (0, 1] (default {d['density']}, "
                        f"chosen on the zoo's validation seeds; the paper's: {paper['density']})")
    p.add_argument("--alpha", type=parse_alpha, default=d["alpha"],
                   help="kept entries become sign * alpha * std(tau); 'auto' (default) picks the "
                        "alpha whose LoRA products B·A are closest to the original's; the paper's: "
                        f"{paper['alpha']:g}")
    add_selection_scope(p)
    if not encoding:
        return
    p.add_argument("--encoding", choices=("golomb", "bitmask"), default="golomb",
                   help="golomb: near the entropy bound (default); bitmask: two bit masks")
    p.add_argument("--revision", help="Hub revision when the source is a Hub id")


def cmd_compress(args) -> int:
    from .expert import compress
    out = Path(args.output)
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} already exists; choose another path or pass --force")
    expert = compress(args.source, args.density, args.alpha, args.per_tensor, args.encoding,
                      name=args.name, revision=args.revision)
    expert.save(out, force=args.force)
    s = expert.sizes
    print(f"{out}: {_human(s['payload_bytes'])} payload, {s['fp16_bytes'] / s['payload_bytes']:.1f}x "
          f"smaller than fp16 ({_human(s['fp16_bytes'])}), {s['fp32_bytes'] / s['payload_bytes']:.1f}x "
          f"than fp32")
    return 0


def cmd_inspect(args) -> int:
    from . import coding
    from .expert import load_expert
    expert = load_expert(args.path)
    info = expert.summary()
    if args.json:
        print(json.dumps(dict(info, meta_tensors=len(expert.meta["tensors"])), indent=2))
        return 0
    s, numel = expert.sizes, expert.meta["numel"]
    bound = coding.ternary_entropy_bits(expert.density, numel) / 8
    stream = s["payload_bytes"] - s["carried_bytes"]
    print(f"expert       {info['name']}")
    print(f"source       {json.dumps(info['source'])}")
    print(f"base model   {info['base_model']}")
    print(f"adapter      {info['peft_type']} r={info['r']} targets={info['target_modules']}, "
          f"{len(expert.meta['tensors'])} tensors, {numel:,} parameters")
    print(f"compression  density {expert.density}, alpha {expert.alpha}, sigma "
          f"{expert.meta['sigma']:.4g}, {info['selection']} selection, {info['encoding']} encoding")
    print(f"size         {_human(s['payload_bytes'])} payload ({8 * stream / numel:.3f} bits/param; "
          f"entropy bound {_human(bound)}, {100 * (stream / bound - 1):+.1f}%)")
    print(f"             dense: {_human(s['fp16_bytes'])} fp16 ({s['fp16_bytes'] / s['payload_bytes']:.1f}x), "
          f"{_human(s['fp32_bytes'])} fp32 ({s['fp32_bytes'] / s['payload_bytes']:.1f}x)")
    if s["carried_bytes"]:
        print(f"carried      {_human(s['carried_bytes'])} of full tensors "
              f"({', '.join(e['name'] for e in expert.meta['carried'])})")
    return 0


def cmd_export(args) -> int:
    from .expert import load_expert
    out = load_expert(args.path).export(args.output, force=args.force)
    print(f"wrote PEFT adapter {out} (load it with PeftModel.from_pretrained)")
    return 0


def cmd_library(args) -> int:
    from .library import ExpertLibrary
    if args.action == "add":
        lib = ExpertLibrary(args.root)
        if args.name and len(args.sources) > 1:
            raise SystemExit("error: --name works with one source only")
        entries = lib.add_many(args.sources, name=args.name, density=args.density,
                               alpha=args.alpha, per_tensor=args.per_tensor,
                               encoding=args.encoding, force=args.force, revision=args.revision)
        for e in entries:
            print(f"added {e['name']} ({_human(e['sizes']['payload_bytes'])})")
        return 0
    lib = ExpertLibrary(args.root, create=False)
    if args.action == "remove":
        for name in args.names:
            lib.remove(name)
            print(f"removed {name}")
        return 0
    if args.action == "rebuild":
        print(f"indexed {len(lib.rebuild_index())} experts")
        return 0
    rows = lib.entries()
    if not rows:
        print(f"{args.root}: empty library")
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'type':<5} {'r':>3} {'k':>5} {'alpha':>5} {'size':>10} {'vs fp16':>8}")
    total = 0
    for r in rows:
        s = r["sizes"]
        total += s["payload_bytes"]
        print(f"{r['name']:<{width}}  {r['peft_type']:<5} {r['r'] or '-':>3} {r['density']:>5} "
              f"{r['alpha']:>5} {_human(s['payload_bytes']):>10} "
              f"{s['fp16_bytes'] / s['payload_bytes']:>7.1f}x")
    print(f"{len(rows)} experts, {_human(total)} in all")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorahub-compeft", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a PEFT adapter (dir or Hub id) with ComPEFT",
                       description="Keep the top-k of the task vector, as signs times one scale, "
                                   "and store it near its entropy bound in one .safetensors file.")
    p.add_argument("source", help="PEFT adapter directory or Hub id (owner/name)")
    p.add_argument("-o", "--output", required=True, help="the expert file to write (.safetensors)")
    p.add_argument("--name", help="the expert's name (default: the Hub id or directory name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_compression_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", help="show what an expert file holds and how small it is",
                       description="Reads the header only; the payload is not decoded.")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="decode an expert file back into a standard PEFT directory")
    p.add_argument("path")
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("library", help="manage a local library of compressed experts",
                       description="A folder of expert files plus index.json. `add` compresses "
                                   "PEFT dirs or Hub ids on ingest.")
    lib = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = lib.add_parser("add", help="compress adapters into the library")
    a.add_argument("root", help="library folder (created if missing)")
    a.add_argument("sources", nargs="+", help="PEFT dirs or Hub ids")
    a.add_argument("--name", help="name for a single source")
    a.add_argument("--force", action="store_true", help="replace experts of the same name")
    _add_compression_options(a)
    a = lib.add_parser("list", help="list experts with sizes and ratios")
    a.add_argument("root")
    a = lib.add_parser("remove", help="remove experts by name")
    a.add_argument("root")
    a.add_argument("names", nargs="+")
    a = lib.add_parser("rebuild", help="rebuild index.json from the expert files")
    a.add_argument("root")
    p.set_defaults(func=cmd_library)

    _add_compose_parser(sub)
    _add_demo_parser(sub)
    _add_bbh_parsers(sub)
    return parser


def parse_seeds(text: str) -> list[int]:
    """'1-5' or '1,3,7' -> a list of seeds."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seeds {text!r}; use e.g. 1-5 or 1,2,3") from None
    return seeds


def _add_bbh_parsers(sub) -> None:
    from .compose import DEFAULT_N
    from .runner import METHODS
    p = sub.add_parser("bbh", help="evaluate zero-shot, ICL, LoraHub and ComPEFT on Big-Bench Hard",
                       description="Per task and seed: 5 seeded few-shot examples, the rest "
                                   "evaluated by exact match. Results go to OUT/results.jsonl, "
                                   "one line per (task, seed, method); a rerun resumes.")
    p.add_argument("--model", required=True, help="base model, e.g. google/flan-t5-large")
    p.add_argument("--experts-file", help="file with one expert (Hub id or PEFT dir) per line")
    p.add_argument("--experts", nargs="*", default=[], help="experts (Hub ids or PEFT dirs)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    p.add_argument("--tasks", default="all", help="comma-separated BBH task names (default all 27)")
    p.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3, 4, 5], help="e.g. 1-5 (default)")
    p.add_argument("-n", "--n-experts", type=int, default=20,
                   help="experts drawn per seed by lorahub/compeft (the paper's protocol; default 20)")
    p.add_argument("--select-n", type=int, default=DEFAULT_N["loss"],
                   help="experts chosen by few-shot loss in select/select-compeft (default "
                        f"{DEFAULT_N['loss']})")
    _add_compression_options(p, encoding=False)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files (else $LORAHUB_COMPEFT_BBH_DIR, "
                                     "else the Hub's lukaemon/bbh)")
    p.add_argument("--max-eval", type=int, help="evaluate at most this many examples per cell")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, one model each")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address with --backend ray")
    p.add_argument("--out", required=True, help="results folder")
    p.set_defaults(func=cmd_bbh)

    p = sub.add_parser("report", help="print the Table-7-style report of saved BBH results")
    p.add_argument("out", help="results folder written by `bbh`")
    p.set_defaults(func=cmd_report)


def cmd_bbh(args) -> int:
    from .bbh import BBH_TASKS
    from .report import report
    from .runner import RunConfig, run
    experts = list(args.experts)
    if args.experts_file:
        experts += [line.strip() for line in Path(args.experts_file).read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    cfg = RunConfig(model=args.model, out=Path(args.out),
                    tasks=list(BBH_TASKS) if args.tasks == "all" else args.tasks.split(","),
                    methods=args.methods.split(","), seeds=args.seeds, experts=experts,
                    n_experts=args.n_experts, select_n=args.select_n, density=args.density,
                    alpha=args.alpha, per_tensor=args.per_tensor,
                    budget=args.budget, bbh_dir=args.bbh_dir, max_eval=args.max_eval)
    run(cfg, workers=args.workers, backend=args.backend, address=args.address)
    print(report(args.out))
    return 0


def cmd_report(args) -> int:
    from .report import report
    print(report(args.out))
    return 0


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="compose the shipped zoo's experts on its held-out tasks (offline, minutes)",
        description="The offline demo, on the zoo shipped in the package: a tiny T5\n"
                    "instruction-tuned on 22 upstream tasks, one LoRA expert per upstream task\n"
                    "(dense fp16 and ComPEFT), and 7 held-out tasks the base never saw. Per task\n"
                    "and seed, 5 examples are drawn and N experts sampled; the table compares\n"
                    "the base's zero-shot exact match with composing the dense experts and\n"
                    "composing the ComPEFT experts.",
        epilog="examples:\n  lorahub-compeft demo\n  lorahub-compeft demo --seeds 1-5\n"
               "  lorahub-compeft demo --tasks heldout_pair_total -n 5 --seeds 1\n"
               "  lorahub-compeft demo --bbh-dir path/to/bbh   # also the real BBH examples",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="all", help="comma-separated held-out zoo tasks (default all)")
    p.add_argument("--seeds", type=parse_seeds, default=[1], help="e.g. 1-5 (default 1)")
    add_select_options(p)
    p.add_argument("--budget", type=int, default=40, help="optimizer evaluations (default 40)")
    p.add_argument("--eval", type=int, default=100, dest="n_eval",
                   help="evaluation examples per task (default 100)")
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files: also run the tasks that "
                                     "mirror BBH on its real examples")
    p.add_argument("--max-bbh-eval", type=int, help="evaluate at most this many real BBH examples")
    p.add_argument("--zoo", help="zoo artifacts folder (default: the one shipped in the package)")
    p.add_argument("--json", help="also write the per-seed rows as JSON here")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .files import atomic_write_text
    from .zoo.demo import Zoo, format_table, run_demo
    from .zoo.ship import ARTIFACTS
    start = time.perf_counter()
    tasks = None if args.tasks == "all" else args.tasks.split(",")
    zoo = Zoo.load(args.zoo or ARTIFACTS)  # checks every file against the manifest
    from .compose import DEFAULT_N
    n = args.n_experts or DEFAULT_N[args.select]
    rows = run_demo(zoo, tasks, args.seeds, n, args.budget, n_eval=args.n_eval,
                    bbh_dir=args.bbh_dir, max_bbh_eval=args.max_bbh_eval, select=args.select)
    manifest = zoo.manifest
    setting = f"k={manifest['density']}, α={manifest['alpha']}"
    if manifest.get("selection") == "per_tensor":
        setting += ", per tensor"
    print(format_table(rows, setting))
    print(f"\n{len(rows)} cells, N={n} experts ({args.select} selection), budget {args.budget}, seeds "
          f"{','.join(map(str, args.seeds))}; {time.perf_counter() - start:.0f} s in all")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=1) + "\n")
    return 0


def _add_compose_parser(sub) -> None:
    p = sub.add_parser("compose", help="learn a mix of experts for a new task from a few examples",
                       description="LoraHub: sample N experts, mix them per module as A=sum w_i A_i, "
                                   "B=sum w_i B_i, and learn w with a gradient-free optimizer "
                                   "(nevergrad Shiwa) on the examples' loss + 0.05*mean|w|.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--library", help="an expert library folder to sample from")
    src.add_argument("--experts", nargs="+", help="expert files, PEFT dirs or Hub ids")
    p.add_argument("--examples", required=True,
                   help='JSON lines file, one {"input": ..., "target": ...} per line')
    p.add_argument("--model", help="base model name or path (default: the experts' base model)")
    add_select_options(p)
    p.add_argument("--budget", type=int, default=40, help="optimizer evaluations (default 40)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--restarts", type=int, default=1,
                   help="searches from different starts; the lowest few-shot loss is kept "
                        "(default 1)")
    p.add_argument("--optimizer", default=None, help="any nevergrad optimizer (default Shiwa)")
    p.add_argument("--objective", choices=("paper", "lorahub"), default="paper",
                   help="lorahub: the released code's loss scaling and NGOpt")
    p.add_argument("--out", required=True, help="directory for the composed PEFT adapter")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compose)


def add_select_options(p: argparse.ArgumentParser) -> None:
    from .compose import DEFAULT_N
    p.add_argument("--select", choices=("loss", "random"), default="loss",
                   help="how N experts are chosen when more are given: loss (default) scores "
                        "each alone on the examples and keeps the N lowest; random is "
                        "LoraHub's seeded draw (the paper's protocol, with -n 20)")
    p.add_argument("-n", "--n-experts", type=int, default=None,
                   help=f"experts to compose (default {DEFAULT_N['loss']} with --select loss, "
                        f"{DEFAULT_N['random']} with --select random)")


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
    from .compose import compose
    from .library import ExpertLibrary
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} already exists; choose another path or pass --force")
    experts = ExpertLibrary(args.library, create=False) if args.library else args.experts
    options = {"optimizer": args.optimizer} if args.optimizer else {}
    result = compose(experts, read_jsonl(args.examples), model=args.model,
                     n_experts=args.n_experts, select=args.select, restarts=args.restarts,
                     seed=args.seed, budget=args.budget, objective=args.objective,
                     progress=not args.quiet, **options)
    result.save_adapter(out, force=args.force)
    scores = result.selection.scores
    if scores:
        print(f"chose {len(result.experts)} of {len(result.selection.scores)} scored experts by "
              f"few-shot loss (lowest {min(scores.values()):.4f})")
    print(f"best loss {result.best_loss:.4f} (no composition: {result.zero_loss:.4f})")
    for name, w in sorted(result.weights.items(), key=lambda kv: -abs(kv[1])):
        print(f"  {w:+.3f}  {name}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        # Our errors are ValueErrors that already say what is wrong and how to fix it.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
