"""Choose lora-tune's and fft's steps and learning rate on the zoo's validation split; and
the methods table on the demo's seeds (docs/results/methods.md).

The validation split is scripts/protocols.py's: shot seeds 101.. (ZOO_SHOT_SEED + seed) and
evaluation rows drawn with VALIDATION_EVAL_SEED, data the demo never reports (its seeds 1-5 are
refused there). --split demo is the demo's data (shots ZOO_SHOT_SEED + seed, evaluation rows
ZOO_EVAL_SEED), for reporting only: every method at its defaults (no grid), each method that
takes a mix once per --mix, the ComPEFT methods at the package's default compression; with
--bbh-dir also the real BBH examples of the four tasks the zoo mirrors, on the zoo's base.
Every cell runs through the runner into --out, so a rerun skips the cells already there and
another grid adds new ones; the table is the mean over the held-out zoo tasks.

    python scripts/baseline_grid.py --seeds 101-103 --out runs/baseline-grid
    python scripts/baseline_grid.py --seeds 101-103 --methods fft --fft-lrs 1e-5,1e-4,1e-3 ...
    python scripts/baseline_grid.py --split demo --seeds 1-5 --methods all \
        --mix factors,product --sources zoo,bbh --bbh-dir ../shared/data/bbh --out runs/methods
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from lorahub_compeft.config import MIXES, STARTS, CompeftOptions
from lorahub_compeft.eval.benchmarks import BBHBenchmark
from lorahub_compeft.eval.cells import plan, setting_key
from lorahub_compeft.eval.methods import METHODS, make_method
from lorahub_compeft.eval.runner import read_results, run
from lorahub_compeft.eval.worker import Worker
from lorahub_compeft.zoo.artifacts import Zoo
from lorahub_compeft.zoo.benchmark import ZOO_SHOT_SEED, ZooBenchmark
from lorahub_compeft.zoo.tasks import get_task, questions, task_names
from protocols import VALIDATION_EVAL_SEED, summarize


@dataclass
class ValidationSource(ZooBenchmark):
    """The zoo's held-out tasks on the validation split: the demo's shots draw, the
    validation evaluation rows."""

    def load(self, task, seed):
        data = super().load(task, seed)
        shots = {s["input"] for s in data.shots}
        data.rows = [e for e in questions(task, self.n_eval, seed=VALIDATION_EVAL_SEED)
                     if e["input"] not in shots]
        return data

    def identity(self, task):
        return dict(super().identity(task), split="validation", eval_seed=VALIDATION_EVAL_SEED,
                    shot_seed=ZOO_SHOT_SEED)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def table(rows: list[dict]) -> str:
    """Per setting: mean over tasks of the seed-average EM, mean per-task seed std, seconds per
    cell, forward+backward passes per cell."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        p = r["setting"]["params"]
        groups.setdefault((r["method"], p.get("steps", 0), p.get("lr", 0)), []).append(r)
    lines = ["| method | steps | lr | mean EM | mean per-task seed std | s per cell | passes |",
             "|---|---|---|---|---|---|---|"]
    for (method, steps, lr), rs in sorted(groups.items()):
        tasks = sorted({r["task"] for r in rs})
        ems = [[r["em"] for r in rs if r["task"] == t] for t in tasks]
        std = [statistics.stdev(e) if len(e) > 1 else 0.0 for e in ems]
        lines.append(f"| {method} | {steps or '–'} | {f'{lr:g}' if lr else '–'} | "
                     f"{statistics.fmean(map(statistics.fmean, ems)):.1f} | "
                     f"{statistics.fmean(std):.1f} | {statistics.fmean(r['seconds'] for r in rs):.1f} | "
                     f"{rs[0].get('passes', '–')} |")
    return "\n".join(lines)


# The demo split's methods table: every method at its defaults; the ComPEFT ones at the package's
# default compression (for compeft too, whose own default is the paper's).
DEMO_METHODS = ("zeroshot", "icl", "lora-tune", "fft", "lorahub", "compeft", "select",
                "select-compeft", "uniform", "uniform-compeft", "single", "single-compeft",
                "arrow", "arrow-compeft")


def demo_methods(names: list[str], mixes: list[str], starts: list[str | None] = (None,)) -> list:
    """Each method at the default compression, once per mix and start it takes (a start of
    None: the method's own)."""
    default = dataclasses.asdict(CompeftOptions())
    methods = []
    for name in names:
        fields = {f.name for f in dataclasses.fields(METHODS[name].Params)}
        compression = {k: v for k, v in default.items() if k in fields}
        for mix in (mixes if "mix" in fields else [None]):
            for start in (starts if "start" in fields else [None]):
                methods.append(make_method(name, **compression, **({"mix": mix} if mix else {}),
                                           **({"start": start} if start else {})))
    return methods


def label(row: dict) -> str:
    """The method, with the mix and start it ran where it takes them."""
    params = METHODS[row["method"]].Params
    fields = {f.name for f in dataclasses.fields(params)}
    ran = [prefix + params.ran_with(row["setting"]["params"], name)
           for name, prefix in (("mix", ""), ("start", "start ")) if name in fields]
    return row["method"] + (f" ({', '.join(ran)})" if ran else "")


def common_cells(rows: list[dict]) -> list[dict]:
    """The rows of the (task, seed) pairs that every method setting has (a table run in part)."""
    pairs: dict[str, set] = {}
    for r in rows:
        pairs.setdefault(label(r), set()).add((r["task"], r["seed"]))
    common = set.intersection(*pairs.values()) if pairs else set()
    return [r for r in rows if (r["task"], r["seed"]) in common]


def methods_table(rows: list[dict]) -> str:
    """Per method setting: mean over tasks of the seed average, the per-task seed std, the seed
    with the lowest few-shot loss ('–' for methods without one) and the best seed on the
    evaluation rows; mean seconds per cell; the tasks and seeds it holds."""
    lines = ["| method | seed average | mean per-task seed std | loss-picked seed | oracle seed | "
             "s per cell | tasks × seeds |", "|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(label(r), []).append(r)
    stats = summarize(rows, label, loss="best_loss")  # protocols.py's, on the runner's rows
    for name, rs in groups.items():
        s = stats[name]
        lossy = all(r.get("best_loss") is not None for r in rs)
        picked = f"{s['loss_picked']:.1f}" if lossy else "–"
        lines.append(f"| {name} | {s['mean']:.1f} | {s['std']:.1f} | {picked} | "
                     f"{s['oracle']:.1f} | {s['seconds']:.1f} | {len(s['per_task'])} × "
                     f"{len({r['seed'] for r in rs})} ({len(rs)} cells) |")
    return "\n".join(lines)


def main(argv=None):
    from lorahub_compeft.cli.options import parse_seeds
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("validation", "demo"), default="validation",
                        help="validation (default): the grid; demo: the methods table")
    parser.add_argument("--seeds", type=parse_seeds, required=True, help="validation seeds, e.g. 101-103")
    parser.add_argument("--methods", default="lora-tune,fft",
                        help="lora-tune and fft run their grid; any other method (zeroshot, "
                             "select, ...) its defaults, for reference; with --split demo, "
                             "'all' is the methods table's")
    parser.add_argument("--mix", default="factors",
                        help="--split demo: the mixes each method that takes one runs with "
                             "(comma-separated, of factors, product)")
    parser.add_argument("--start",
                        help="--split demo: the starts each method that takes one runs with "
                             "(comma-separated, of best, zero; default: each method's own)")
    parser.add_argument("--tasks", default="all", help="held-out zoo tasks (default all 7)")
    parser.add_argument("--bbh-dir", help="--split demo: also the real BBH examples of the "
                                          "tasks the zoo mirrors, from this folder")
    parser.add_argument("--sources", default="zoo", choices=("zoo", "bbh", "zoo,bbh"),
                        help="--split demo: the zoo's generated rows, the real BBH rows "
                             "(needs --bbh-dir) or both (default zoo)")
    parser.add_argument("--max-bbh-eval", type=int, help="at most this many real BBH rows per cell")
    parser.add_argument("--lora-steps", type=ints, default=[20, 50, 100])
    parser.add_argument("--lora-lrs", type=floats, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--fft-steps", type=ints, default=[10, 30])
    parser.add_argument("--fft-lrs", type=floats, default=[1e-5, 1e-4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", required=True, help="run folder (a rerun resumes)")
    parser.add_argument("--report", nargs="*", metavar="DIR",
                        help="compute nothing: the table of the cells asked for that --out and "
                             "these other run folders hold (a long table run in parts)")
    parser.add_argument("--common", action="store_true",
                        help="with --report: only the (task, seed) pairs every method holds")
    args = parser.parse_args(argv)
    demo = args.split == "demo"
    if not demo and set(args.seeds) & set(range(1, 6)):
        parser.error("seeds 1-5 are the demo's; validate on others, e.g. 101-103")
    sources = args.sources.split(",")
    if "bbh" in sources and not (demo and args.bbh_dir):
        parser.error("--sources bbh: the real BBH rows need --split demo and --bbh-dir")
    mixes = args.mix.split(",")
    if not set(mixes) <= set(MIXES):
        parser.error(f"--mix: use factors, product or both, got {args.mix!r}")
    names = list(DEMO_METHODS) if demo and args.methods == "all" else args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"--methods: no method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    import torch
    torch.set_num_threads(args.threads)
    grid = {"lora-tune": (args.lora_steps, args.lora_lrs), "fft": (args.fft_steps, args.fft_lrs)}

    def settings(name: str) -> list:
        if name not in grid:
            return [make_method(name)]  # a reference, at its defaults
        steps, lrs = grid[name]
        return [make_method(name, steps=s, lr=lr) for s in steps for lr in lrs]
    starts = args.start.split(",") if args.start else [None]
    if not set(starts) <= set(STARTS) | {None}:
        parser.error(f"--start: use {', '.join(STARTS)}, got {args.start!r}")
    methods = demo_methods(names, mixes, starts) if demo else \
        [m for name in names for m in settings(name)]
    zoo = Zoo.load()
    tasks = task_names("heldout") if args.tasks == "all" else args.tasks.split(",")
    base, pool = str(zoo.root / "base"), zoo.pool()
    source = ZooBenchmark() if demo else ValidationSource()
    # seed-major: a run cut short still covers every task and method
    cells = [c for seed in args.seeds for c in plan(source, tasks, [seed], methods, base, pool)
             if "zoo" in sources]
    mirrored = [get_task(t).bbh_task for t in tasks if get_task(t).bbh_task]
    if "bbh" in sources and mirrored:
        bbh = BBHBenchmark(args.bbh_dir, 5, args.max_bbh_eval)
        cells += [c for seed in args.seeds for c in plan(bbh, mirrored, [seed], methods, base, pool)]
    if args.report is None:
        rows = run(cells, args.out, worker=Worker(preloaded=zoo.base), command=sys.argv)
    else:
        held = {r["key"]: r for folder in [args.out, *args.report]
                for r in read_results(Path(folder) / "results.jsonl")}
        rows = [held[k] for k in map(setting_key, (c.setting() for c in cells)) if k in held]
        rows = common_cells(rows) if args.common else rows
    for kind in ("zoo", "bbh"):
        mine = [r for r in rows if r["setting"]["data"]["source"] == kind]
        if not mine:
            continue
        n_tasks = len({r["task"] for r in mine})
        where = "held-out zoo tasks" if kind == "zoo" else "real BBH tasks (zoo base)"
        print(f"\n### {args.split} split, seeds {','.join(map(str, args.seeds))}, {n_tasks} {where}\n")
        print(methods_table(mine) if demo else table(mine))


if __name__ == "__main__":
    main()
