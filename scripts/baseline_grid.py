"""Choose lora-tune's and fft's steps and learning rate on the zoo's validation split.

The validation split is scripts/protocols.py's: shot seeds 101.. (ZOO_SHOT_SEED + seed) and
evaluation rows drawn with VALIDATION_EVAL_SEED, data the demo never reports (its seeds 1-5 are
refused). Every cell runs through the runner into --out, so a rerun skips the cells already
there and another grid adds new ones; the table is the mean over the 7 held-out zoo tasks of
each setting's seed average.

    python scripts/baseline_grid.py --seeds 101-103 --out runs/baseline-grid
    python scripts/baseline_grid.py --seeds 101-103 --methods fft --fft-lrs 1e-5,1e-4,1e-3 ...
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from lorahub_compeft.eval.cells import plan
from lorahub_compeft.eval.methods import make_method
from lorahub_compeft.eval.runner import run
from lorahub_compeft.eval.worker import Worker
from lorahub_compeft.zoo.artifacts import Zoo
from lorahub_compeft.zoo.benchmark import ZOO_SHOT_SEED, ZooBenchmark
from lorahub_compeft.zoo.tasks import questions, task_names
from protocols import VALIDATION_EVAL_SEED


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


def main(argv=None):
    from lorahub_compeft.cli.options import parse_seeds
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=parse_seeds, required=True, help="validation seeds, e.g. 101-103")
    parser.add_argument("--methods", default="lora-tune,fft",
                        help="lora-tune and fft run their grid; any other method (zeroshot, "
                             "select, ...) its defaults, for reference")
    parser.add_argument("--tasks", default="all", help="held-out zoo tasks (default all 7)")
    parser.add_argument("--lora-steps", type=ints, default=[20, 50, 100])
    parser.add_argument("--lora-lrs", type=floats, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--fft-steps", type=ints, default=[10, 30])
    parser.add_argument("--fft-lrs", type=floats, default=[1e-5, 1e-4])
    parser.add_argument("--out", required=True, help="run folder (a rerun resumes)")
    args = parser.parse_args(argv)
    if set(args.seeds) & set(range(1, 6)):
        parser.error("seeds 1-5 are the demo's; validate on others, e.g. 101-103")
    grid = {"lora-tune": (args.lora_steps, args.lora_lrs), "fft": (args.fft_steps, args.fft_lrs)}

    def settings(name: str) -> list:
        if name not in grid:
            return [make_method(name)]  # a reference, at its defaults
        steps, lrs = grid[name]
        return [make_method(name, steps=s, lr=lr) for s in steps for lr in lrs]
    methods = [m for name in args.methods.split(",") for m in settings(name)]
    zoo = Zoo.load()
    tasks = task_names("heldout") if args.tasks == "all" else args.tasks.split(",")
    cells = plan(ValidationSource(), tasks, args.seeds, methods, str(zoo.root / "base"), zoo.pool())
    rows = run(cells, args.out, worker=Worker(preloaded=zoo.base))
    print(f"\n### validation split, seeds {','.join(map(str, args.seeds))}, {len(tasks)} tasks\n")
    print(table(rows))


if __name__ == "__main__":
    main()
