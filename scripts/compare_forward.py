"""Exact match of the forward options on the zoo demo's protocol: fp32 against bf16 and int8
scoring, and K=1 against K candidates per forward, at the same budget.

Per held-out zoo task and seed (lorahub_compeft/zoo/demo.py's protocol: 5 examples drawn with
the seed, N experts sampled with the seed, the task's evaluation examples), the ComPEFT experts
are composed once per variant and the composed model's exact match is measured. Prints the
mean EM per variant, its difference to the first variant, and the learnt weights.

    python scripts/compare_forward.py --seeds 1-5 --json forward.json
    python scripts/compare_forward.py --variants fp32,bf16 --tasks heldout_pair_total --seeds 1
    python scripts/compare_forward.py --variants fp32,int8 --seeds 1-5   # int8 forced: the zoo's
                                                # model is below the size where "auto" uses it
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

VARIANTS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "int8": {"dtype": "int8"},
            "k4": {"dtype": "fp32", "candidates_per_step": 4},
            "k8": {"dtype": "fp32", "candidates_per_step": 8},
            # K slots shared by K restarts: each search stays sequential, 40 forwards in all
            "k4-restarts4": {"dtype": "fp32", "candidates_per_step": 4, "restarts": 4}}


def main(argv=None) -> None:
    from lorahub_compeft.cli.options import parse_seeds
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}; the first is the baseline")
    parser.add_argument("--tasks", default="all", help="held-out zoo tasks (default all)")
    parser.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3, 4, 5])
    parser.add_argument("-n", "--n-experts", type=int, default=20)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--eval", type=int, default=100, dest="n_eval")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    from lorahub_compeft.compose.composer import compose
    from lorahub_compeft.zoo.tasks import task_names
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from protocols import Zoo, exact_match, task_data  # the demo's data, as protocols.py reads it
    zoo = Zoo.load()
    tasks = task_names("heldout") if args.tasks == "all" else args.tasks.split(",")
    rows = []
    for task in tasks:
        for seed in args.seeds:
            few, rest = task_data(task, seed, "demo", args.n_eval)
            inputs, targets = [e["input"] for e in rest], [e["target"] for e in rest]
            experts = [zoo.library.get(n) for n in zoo.library.sample(args.n_experts, seed)]
            for variant in variants:
                start = time.perf_counter()
                result = compose(experts, few, zoo.model, tokenizer=zoo.tokenizer,
                                 n_experts=len(experts), seed=seed, budget=args.budget,
                                 progress=False, **VARIANTS[variant])
                em = exact_match(result.generate(inputs, 8, batch_size=64), targets)
                rows.append({"task": task, "seed": seed, "variant": variant, "em": em,
                             "best_loss": result.best_loss, "weights": result.weights,
                             "seconds": time.perf_counter() - start})
                print(f"{task} seed {seed} {variant}: EM {em:.1f}, best loss "
                      f"{result.best_loss:.4f}", file=sys.stderr)
    base = variants[0]
    print(f"\n| variant | mean EM over {len(tasks)} tasks x {len(args.seeds)} seeds | "
          f"vs {base} | s per composition |\n|---|---|---|---|")
    means = {v: statistics.fmean(r["em"] for r in rows if r["variant"] == v) for v in variants}
    for v in variants:
        secs = statistics.fmean(r["seconds"] for r in rows if r["variant"] == v)
        print(f"| {v} | {means[v]:.2f} | {means[v] - means[base]:+.2f} | {secs:.1f} |")
    print("\nLearnt weights (experts with |w| >= 0.05, per task and seed):")
    for task in tasks:
        for seed in args.seeds:
            print(f"- {task} seed {seed}")
            for r in rows:
                if r["task"] == task and r["seed"] == seed:
                    kept = {n: round(w, 3) for n, w in sorted(r["weights"].items())
                            if abs(w) >= 0.05}
                    print(f"  - {r['variant']} (EM {r['em']:.1f}): {kept}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
