"""The `lorahub-compeft` command: compress, inspect and export experts, keep a library of them,
and compose them for a new task from a few examples."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
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


def _add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32", "int8"), default="auto",
                   help="how the search runs the base model; auto (default): bf16 where the "
                        "device computes it natively, else on a CPU int8 copies of the linear "
                        "layers of models of t5-small's size or more, else fp32. int8 forces "
                        "int8 scoring (CPU). The composed adapter is fp32 and answers come from "
                        "the unquantized model whatever is chosen")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch's intra-op threads (default: one per core, but only the idle "
                        "cores when other processes keep the machine busy)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _idle_cores() -> int | None:
    """The cores other processes leave idle (1-minute load average), when fewer than torch's
    threads; None when the machine is quiet or its load is unknown. Threads that wait for busy
    cores cost far more than they give: on a busy 2-core machine `demo` on one task took 346 s
    with 2 threads and 43 s with 1."""
    import os

    import torch
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    idle = max(1, round(cores - load))
    return idle if idle < torch.get_num_threads() else None


def _apply_threads(args) -> None:
    """Set torch's threads from --threads (else from _idle_cores), here and, through
    OMP_NUM_THREADS, in the worker processes a command starts."""
    import os

    import torch
    threads = getattr(args, "threads", None) or _idle_cores()
    if threads is None:
        return
    logging.getLogger(__name__).info("using %d torch thread(s)", threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


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
    p.add_argument("--codec", choices=("compeft", "ere"), default="compeft",
                   help="compeft: sparse ternary (default; --density, --alpha, --per-tensor, "
                        "--encoding); ere: low-rank factors of each LoRA module's B·A "
                        "(--budget-bits, --quant-bits)")
    p.add_argument("--budget-bits", type=float, default=1.0,
                   help="ere: payload budget in bits per LoRA value (default 1)")
    p.add_argument("--quant-bits", type=int, choices=(4, 8, 16), default=4,
                   help="ere: bits per stored factor value, one scale per row (default 4)")
    p.add_argument("--revision", help="Hub revision when the source is a Hub id")


def _size_line(file_bytes: int, sizes: dict) -> str:
    """The whole file's size and ratio (what a user stores and downloads); the coded payload
    as a detail."""
    return (f"{_human(file_bytes)}, {sizes['fp16_bytes'] / file_bytes:.1f}x smaller than fp16 "
            f"({_human(sizes['fp16_bytes'])}), {sizes['fp32_bytes'] / file_bytes:.1f}x than fp32 "
            f"(coded payload {_human(sizes['payload_bytes'])}, "
            f"{sizes['fp16_bytes'] / sizes['payload_bytes']:.1f}x)")


def _codec_options(args) -> dict:
    return {"codec": args.codec, "budget_bits": args.budget_bits, "quant_bits": args.quant_bits}


def _setting(summary: dict) -> str:
    """A codec's parameters in a few characters, for listings."""
    if summary.get("codec", "compeft") == "ere":
        return f"{summary['budget_bits']:g}b/p {summary['encoding']} r~{summary['mean_rank']:.1f}"
    tensor = " pt" if summary.get("selection") == "per_tensor" else ""
    return f"k={summary['density']:g} a={summary['alpha']:g}{tensor}"


def cmd_compress(args) -> int:
    from .expert import compress
    from .files import check_file_target
    out = check_file_target(args.output, args.force)
    source = args.source
    if args.base:
        from .residual import residual_adapter
        source = residual_adapter(args.source, args.base)
    expert = compress(source, args.density, args.alpha, args.per_tensor, args.encoding,
                      name=args.name, revision=args.revision, **_codec_options(args))
    expert.save(out, force=args.force)
    print(f"{out}: {expert.codec} ({_setting(expert.summary())}), "
          f"{_size_line(out.stat().st_size, expert.sizes)}")
    return 0


def cmd_inspect(args) -> int:
    from . import coding
    from .expert import load_expert
    expert = load_expert(args.path)
    info = expert.summary()
    if args.json:
        print(json.dumps(dict(info, meta_tensors=len(expert.meta["tensors"])), indent=2))
        return 0
    if expert.codec == "ere":
        return _inspect_ere(expert, info)
    s, numel = expert.sizes, expert.meta["numel"]
    bound = coding.ternary_entropy_bits(expert.density, numel) / 8
    stream = s["payload_bytes"] - s["carried_bytes"]
    print(f"expert       {info['name']}")
    print(f"source       {json.dumps(info['source'])}")
    print(f"base model   {info['base_model']}")
    print(_adapter_line(info, len(expert.meta["tensors"]), numel))
    print(f"compression  density {expert.density}, alpha {expert.alpha}, sigma "
          f"{expert.meta['sigma']:.4g}, {info['selection']} selection, {info['encoding']} encoding")
    print(f"file         {_size_line(Path(args.path).stat().st_size, s)}")
    print(f"payload      {8 * stream / numel:.3f} bits/param; entropy bound {_human(bound)}, "
          f"{100 * (stream / bound - 1):+.1f}%")
    if s["carried_bytes"]:
        print(f"carried      {_human(s['carried_bytes'])} of full tensors "
              f"({', '.join(e['name'] for e in expert.meta['carried'])})")
    return 0


def _adapter_line(info: dict, tensors: int, numel: int) -> str:
    if info["peft_type"] == "RESIDUAL":
        return f"residual     full fine-tuning θ_ft − θ_base, {tensors} tensors coded, {numel:,} parameters"
    return (f"adapter      {info['peft_type']} r={info['r']} targets={info['target_modules']}, "
            f"{tensors} tensors, {numel:,} parameters")


def _inspect_ere(expert, info: dict) -> int:
    s, ere = expert.sizes, expert.meta["ere"]
    numel = sum(math.prod(e["shape"]) for e in expert.meta["tensors"])
    stream = s["payload_bytes"] - s["carried_bytes"]
    ranks = ere["ranks"]
    print(f"expert       {info['name']}")
    print(f"source       {json.dumps(info['source'])}")
    print(f"base model   {info['base_model']}")
    print(_adapter_line(info, len(expert.meta["tensors"]), numel))
    what = "each matrix" if info["peft_type"] == "RESIDUAL" else "each module's B·A"
    print(f"compression  ere: low-rank factors of {what}, {info['encoding']} with a scale per row, "
          f"budget {ere['budget_bits']:g} bits/param")
    print(f"ranks        {min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.2f}) over "
          f"{len(ranks)} modules, {100 * ere['energy_kept']:.1f}% of the energy kept")
    print(f"file         {_size_line(expert.path.stat().st_size, s)}")
    print(f"payload      {8 * stream / numel:.3f} bits/param")
    return 0


def cmd_export(args) -> int:
    from .expert import load_expert
    expert = load_expert(args.path)
    out = expert.export(args.output, force=args.force, base=args.base)
    if expert.config.get("peft_type") == "RESIDUAL":
        print(f"wrote model {out} (base + decoded residual; load it with from_pretrained)")
    else:
        print(f"wrote PEFT adapter {out} (load it with PeftModel.from_pretrained)")
    return 0


def cmd_library(args) -> int:
    from .library import ExpertLibrary
    if args.action == "add":
        if args.name and len(args.sources) > 1:
            raise SystemExit("error: --name works with one source only")
        lib = ExpertLibrary(args.root)
        entries = lib.add_many(args.sources, name=args.name, density=args.density,
                               alpha=args.alpha, per_tensor=args.per_tensor,
                               encoding=args.encoding, force=args.force, revision=args.revision,
                               **_codec_options(args))
        for e in entries:
            print(f"stored {e['name']} ({_human(e['file_bytes'])})")
        return 0
    if args.action == "remove":
        ExpertLibrary(args.root, create=False).remove(*args.names)
        print("removed " + ", ".join(args.names))
        return 0
    if args.action == "rebuild":
        print(f"indexed {len(ExpertLibrary(args.root, create=False).rebuild_index())} experts")
        return 0
    lib = ExpertLibrary(args.root, read_only=True)  # listing writes nothing
    rows = lib.entries()
    stray, temp = lib.stray_files(), lib.temp_files()
    if stray or temp:
        print(f"note: {len(stray)} expert file(s) not in the index and {len(temp)} temporary "
              "file(s), left by an interrupted writer; the next `library add` adopts the files "
              "that verify and removes the temporary ones", file=sys.stderr)
    if not rows:
        print(f"{args.root}: empty library")
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'type':<5} {'r':>3} {'codec':<7} {'setting':<22} {'file':>10} "
          f"{'vs fp16':>8}")
    total = 0
    for r in rows:
        total += r["file_bytes"]
        print(f"{r['name']:<{width}}  {str(r['peft_type']):<5} {r['r'] or '-':>3} "
              f"{r.get('codec', 'compeft'):<7} {_setting(r):<22} {_human(r['file_bytes']):>10} "
              f"{r['sizes']['fp16_bytes'] / r['file_bytes']:>7.1f}x")
    print(f"{len(rows)} experts, {_human(total)} in all (whole files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorahub-compeft", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (or LORAHUB_COMPEFT_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a PEFT adapter (dir or Hub id) with ComPEFT or ERE",
                       description="ComPEFT (default): keep the top-k of the task vector, as signs "
                                   "times one scale, stored near its entropy bound. ERE (--codec "
                                   "ere): low-rank factors of each LoRA module's B·A, rank "
                                   "allocated under one budget. Either in one .safetensors file.")
    p.add_argument("source", help="PEFT adapter directory or Hub id (owner/name), or with --base "
                                  "a fully fine-tuned model directory")
    p.add_argument("--base", help="the model SOURCE was fully fine-tuned from: compress the "
                                  "residual θ_ft − θ_base")
    p.add_argument("-o", "--output", required=True, help="the expert file to write (.safetensors)")
    p.add_argument("--name", help="the expert's name (default: the Hub id or directory name)")
    p.add_argument("--force", action="store_true", help="replace an existing expert file")
    _add_compression_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", help="show what an expert file holds and how small it is",
                       description="Reads the header only; the payload is not decoded.")
    p.add_argument("path", help="an expert file (.safetensors) written by `compress`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="decode an expert file back into a standard PEFT directory "
                                      "(a residual: into the full model)")
    p.add_argument("path", help="an expert file (.safetensors) written by `compress`")
    p.add_argument("--base", help="residual experts: the base model directory (default: the "
                                  "one recorded at compression)")
    p.add_argument("-o", "--output", required=True, help="folder to write (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace a folder holding only what export writes (the adapter's or "
                        "model's files, never other files)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("library", help="manage a local library of compressed experts",
                       description="A folder of expert files plus index.json. `add` compresses "
                                   "PEFT dirs or Hub ids on ingest.")
    lib = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = lib.add_parser("add", help="compress adapters into the library")
    a.add_argument("root", help="library folder (created if missing)")
    a.add_argument("sources", nargs="+", help="PEFT dirs or Hub ids")
    a.add_argument("--name", help="name for a single source")
    a.add_argument("--force", action="store_true",
                   help="replace experts of the same name stored with other settings")
    _add_compression_options(a)
    a = lib.add_parser("list", help="list experts with whole-file sizes and ratios (writes nothing)")
    a.add_argument("root", help="library folder")
    a = lib.add_parser("remove", help="remove experts by name (all names are checked first)")
    a.add_argument("root", help="library folder")
    a.add_argument("names", nargs="+", help="expert names, as `library list` shows them")
    a = lib.add_parser("rebuild", help="rebuild index.json from the expert files")
    a.add_argument("root", help="library folder")
    p.set_defaults(func=cmd_library)

    _add_compose_parser(sub)
    _add_merge_parser(sub)
    _add_demo_parser(sub)
    _add_bbh_parsers(sub)
    return parser


def parse_seeds(text: str) -> list[int]:
    """'1-5' or '1,3,7' -> a list of seeds."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seeds {text!r}; use e.g. 1-5 or 1,2,3") from None
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: it holds no seed; write "
                                             f"it low-high, e.g. {hi}-{lo}")
        seeds += range(lo, hi + 1)
    return seeds


def read_experts_file(path: str) -> list[str]:
    """One expert (Hub id or PEFT dir) per line; blank lines and # comments skipped."""
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _add_bbh_parsers(sub) -> None:
    from .codec import DEFAULT_COMPRESSION
    from .methods import METHODS
    # The default reproduces the paper's Table 7; add select,select-compeft for the package's
    # protocol beside it.
    names = [m for m in METHODS if m in ("zeroshot", "icl", "lorahub", "compeft")]
    p = sub.add_parser("bbh", help="evaluate zero-shot, ICL, LoraHub and ComPEFT on Big-Bench Hard",
                       description="Per task and seed: 5 seeded few-shot examples, the rest "
                                   "evaluated by exact match. Results go to OUT/results.jsonl, "
                                   "one line per cell keyed by its whole setting (method and its "
                                   "parameters, model, experts, data, seed); a rerun computes only "
                                   "the cells not there yet, so another --density or --alpha adds "
                                   "new cells beside the old ones.")
    p.add_argument("--model", required=True, help="base model, e.g. google/flan-t5-large")
    p.add_argument("--experts-file", help="file with one expert (Hub id or PEFT dir) per line")
    p.add_argument("--experts", nargs="*", default=[], help="experts (Hub ids or PEFT dirs)")
    p.add_argument("--methods", default=",".join(names),
                   help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(names)})")
    p.add_argument("--tasks", default="all", help="comma-separated BBH task names (default all 27)")
    p.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3, 4, 5], help="e.g. 1-5 (default)")
    # Each method's own defaults unless given: lorahub/compeft are the paper's protocol (random
    # 20; k=0.1, alpha 1, global top-k), select/select-compeft the package's (3 chosen by loss;
    # codec.DEFAULT_COMPRESSION: k=0.5, alpha auto, per tensor).
    p.add_argument("-n", "--n-experts", type=int,
                   help="experts per composition (default: 20 for lorahub/compeft, 3 for select*)")
    p.add_argument("--density", type=float,
                   help="ComPEFT fraction kept (default: 0.1 for compeft, "
                        f"{DEFAULT_COMPRESSION['density']} for select-compeft)")
    p.add_argument("--alpha", type=parse_alpha,
                   help="ComPEFT scale factor or 'auto' (default: 1 for compeft, auto for "
                        "select-compeft)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--per-tensor", dest="per_tensor", action="store_const", const=True,
                       help="ComPEFT top-k and scale per tensor (default for select-compeft)")
    scope.add_argument("--global", dest="per_tensor", action="store_const", const=False,
                       help="ComPEFT top-k and one scale over the adapter (default for compeft)")
    p.add_argument("--restarts", type=int,
                   help="select*: searches from different starts, kept by few-shot loss (default 1)")
    p.add_argument("--budget", type=int, default=40, help="optimizer evaluations (default 40)")
    p.add_argument("--objective", choices=("paper", "lorahub"), default="paper",
                   help="composition objective (default paper)")
    p.add_argument("--optimizer", help="nevergrad optimizer (default: the objective's)")
    _add_dtype_option(p)
    p.add_argument("--shots", type=int, default=5, help="few-shot examples per cell (default 5)")
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files (else $LORAHUB_COMPEFT_BBH_DIR, "
                                     "else the Hub's lukaemon/bbh)")
    p.add_argument("--max-eval", type=int, help="evaluate at most this many examples per cell")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch (default 16)")
    p.add_argument("--workers", type=int, default=1,
                   help="cells at once: processes (local) or actors (ray), one model each")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address with --backend ray (default: start "
                                     "Ray on this machine)")
    p.add_argument("--gpus-per-cell", type=float,
                   help="GPUs each Ray actor asks for (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--out", required=True, help="results folder")
    _add_threads_option(p)
    p.set_defaults(func=cmd_bbh)

    p = sub.add_parser("report", help="print the Table-7-style report of saved BBH results",
                       description="One table per model and data source; a column per method "
                                   "setting, with each setting's parameters listed below it.")
    p.add_argument("out", help="results folder written by `bbh`")
    p.add_argument("--force", action="store_true",
                   help="replace an existing report.md / report.png in that folder")
    p.set_defaults(func=cmd_report)


def cmd_bbh(args) -> int:
    _apply_threads(args)
    from .bbh import BBH_TASKS
    from .methods import make_method, method_options
    from .pool import ExpertPool
    from .report import report
    from .base_models import check_model_reference
    from .runner import plan, run
    from .sources import BBHSource
    check_model_reference(args.model)
    experts = list(args.experts) + (read_experts_file(args.experts_file) if args.experts_file else [])
    options = {"n_experts": args.n_experts, "density": args.density, "alpha": args.alpha,
               "per_tensor": args.per_tensor, "restarts": args.restarts, "budget": args.budget,
               "objective": args.objective, "optimizer": args.optimizer, "dtype": args.dtype}
    options = {k: v for k, v in options.items() if v is not None}  # else each method's default
    methods = [make_method(m, **method_options(m, options)) for m in args.methods.split(",")]
    out = Path(args.out)
    pool = ExpertPool.from_sources(experts, out / "compressed") if experts else None
    cells = plan(BBHSource(args.bbh_dir, args.shots, args.max_eval),
                 list(BBH_TASKS) if args.tasks == "all" else args.tasks.split(","),
                 args.seeds, methods, args.model, pool)
    run(cells, out, workers=args.workers, backend=args.backend, address=args.address,
        gpus_per_cell=args.gpus_per_cell, batch_size=args.batch_size, command=args.argv)
    print(report(out))
    return 0


def cmd_report(args) -> int:
    from .files import check_file_target
    from .report import report
    for name in ("report.md", "report.png"):
        check_file_target(Path(args.out) / name, args.force)
    print(report(args.out))
    return 0


def _add_demo_parser(sub) -> None:
    from .codec import DEFAULT_COMPRESSION
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
    p.add_argument("--select", choices=("random", "loss"), default="random",
                   help="random: LoraHub's protocol, N experts drawn with the seed (default, the "
                        "table in README); loss: the package's, every expert scored alone and "
                        "the N with the lowest few-shot loss composed (ComPEFT at the default "
                        f"compression: k={DEFAULT_COMPRESSION['density']}, alpha auto, per "
                        "tensor)")
    p.add_argument("-n", "--n-experts", type=int,
                   help="experts to compose (default 20 with --select random, 3 with loss)")
    p.add_argument("--budget", type=int, default=40, help="optimizer evaluations (default 40)")
    p.add_argument("--eval", type=int, default=100, dest="n_eval",
                   help="evaluation examples per task (default 100)")
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files: also run the tasks that "
                                     "mirror BBH on its real examples")
    p.add_argument("--max-bbh-eval", type=int, help="evaluate at most this many real BBH examples")
    p.add_argument("--zoo", help="zoo artifacts folder (default: the one shipped in the package)")
    p.add_argument("--json", help="also write the per-seed rows as JSON here (a new file)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    _add_threads_option(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    _apply_threads(args)
    from .files import atomic_write_text, check_file_target
    from .zoo.artifacts import ARTIFACTS, Zoo
    from .zoo.demo import format_table, run_demo
    if args.json:  # before minutes of work, not after
        check_file_target(args.json, args.force)
    start = time.perf_counter()
    tasks = None if args.tasks == "all" else args.tasks.split(",")
    zoo = Zoo.load(args.zoo or ARTIFACTS)  # checks every file against the manifest
    from .codec import DEFAULT_COMPRESSION
    from .compose import DEFAULT_N
    n_experts = args.n_experts or DEFAULT_N[args.select]
    rows = run_demo(zoo, tasks, args.seeds, n_experts, args.budget, n_eval=args.n_eval,
                    bbh_dir=args.bbh_dir, max_bbh_eval=args.max_bbh_eval, select=args.select)
    c = zoo.compression if args.select == "random" else DEFAULT_COMPRESSION
    setting = f"k={c['density']}, α={c['alpha']}" + (", per tensor" if c["per_tensor"] else "")
    setting += "; N chosen by few-shot loss" if args.select == "loss" else "; N drawn at random"
    print(format_table(rows, setting))
    print(f"\n{len(rows)} cells, N={n_experts} experts, budget {args.budget}, seeds "
          f"{','.join(map(str, args.seeds))}; {time.perf_counter() - start:.0f} s in all")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=1) + "\n")
    return 0


def _add_compose_parser(sub) -> None:
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
    _add_dtype_option(p)
    p.add_argument("--candidates-per-step", type=_positive_int, default=1, metavar="K",
                   help="candidates scored per forward (default 1; more helps on GPUs)")
    _add_threads_option(p)
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


def _add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge experts (dense or compressed) into one LoRA adapter",
                       description="Task arithmetic or TIES on each module's product "
                                   "s·B·A (not on A and B apart), written back as one LoRA "
                                   "adapter by SVD.")
    p.add_argument("experts", nargs="+", help="expert files, PEFT dirs or Hub ids")
    p.add_argument("-o", "--output", required=True, help="directory for the merged PEFT adapter")
    p.add_argument("--method", choices=("task_arithmetic", "ties"), default="task_arithmetic")
    p.add_argument("--weights", help="comma-separated, one per expert (default: 1/N for "
                                     "task_arithmetic, 1 for ties)")
    p.add_argument("--density", type=float, default=0.2,
                   help="ties: fraction of each expert's ΔW entries kept per module (default 0.2)")
    p.add_argument("--rank", type=int, help="rank of the merged adapter (default: the sum of "
                                            "the experts' ranks)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from .adapters import save_adapter
    from .merge import merge
    out = Path(args.output)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; choose another path or pass --force")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise ValueError(f"bad --weights {args.weights!r}; use e.g. 0.5,0.5") from None
    result = merge(args.experts, args.method, weights, args.density, args.rank)
    save_adapter(out, result.adapter.tensors, result.adapter.config, force=args.force)
    print(f"wrote {out}: {args.method} of {len(args.experts)} experts, rank "
          f"{result.adapter.config['r']}, {100 * result.energy_kept:.1f}% of the merged update kept")
    return 0


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
    _apply_threads(args)
    from .bbh import exact_match
    from .compose import compose
    from .evaluate import accuracy
    from .library import ExpertLibrary
    from .adapters import CONFIG_NAME, WEIGHTS_NAME
    from .files import check_dir_target
    from .base_models import check_model_reference
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lorahub-compeft")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _is_connection_error(err: BaseException) -> bool:
    """The Hub could not be reached (offline, or HF_HUB_OFFLINE=1 with nothing cached)."""
    names = {t.__name__ for t in type(err).__mro__}
    text = str(err)
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "HFValidationError"}) or "huggingface.co" in text \
        or "couldn't connect" in text.lower() or "offline" in text.lower()


def error_message(err: BaseException, args) -> str | None:
    """One line that names the problem and the fix for a known failure, else None."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, KeyboardInterrupt):
        return "interrupted; nothing half-written was kept (every output is written atomically)"
    if isinstance(err, pickle.UnpicklingError):
        return ("a weights file holds pickled objects, which are never run or loaded; use a "
                "model or adapter saved as safetensors (save_pretrained(safe_serialization=True))")
    if args is not None and getattr(args, "command", None) == "bbh" and \
            not getattr(args, "bbh_dir", None) and _is_connection_error(err):
        return ("cannot download Big-Bench Hard from the Hugging Face Hub (offline?); point at "
                "local files with --bbh-dir DIR (or LORAHUB_COMPEFT_BBH_DIR), a folder of BBH "
                "<task>.json files")
    if _is_connection_error(err):
        model = getattr(args, "model", None)
        what = f"model {model!r}" if model else "a model or adapter"
        return (f"cannot load {what} from the Hugging Face Hub or its cache ({first}); pass a "
                "local folder (e.g. --model path/to/model), or connect and retry")
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({first})"
    if isinstance(err, (ValueError, FileExistsError, FileNotFoundError, IsADirectoryError,
                        NotADirectoryError, PermissionError)):
        return first if not isinstance(err, OSError) or not err.filename else \
            f"{err.filename}: {err.strerror or first}"
    if isinstance(err, (OSError, RecursionError, MemoryError)):
        return f"{type(err).__name__}: {first}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv if argv is None else ["lorahub-compeft", *argv]  # for OUT/config.json
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get("LORAHUB_COMPEFT_DEBUG") == "1"
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        # Every command ends here: a known failure is one line with rc 2; anything else says
        # how to get the traceback (--debug keeps it).
        if debug:
            raise
        message = error_message(err, args)
        if message is None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"error: unexpected {type(err).__name__}: {first} (this is a bug; rerun with "
                  "--debug for the traceback and report it)", file=sys.stderr)
            return 1
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
