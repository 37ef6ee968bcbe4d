"""LoraHub's protocol against expert selection on the shipped zoo, and how the defaults were chosen.

Every method composes for each held-out zoo task and seed from 5 shots, then answers the
task's evaluation examples (exact match). Methods:

    zeroshot          the base alone
    lorahub-dense     LoraHub's protocol: 20 experts drawn at random, the zoo's dense fp16 experts
    lorahub-compeft   the same draw, ComPEFT experts at the given compression settings
    select-dense      N experts chosen by few-shot loss (select="loss"), dense
    select-compeft    the same, ComPEFT experts

The ComPEFT experts are compressed here, in memory, from the zoo's shipped dense experts.

    --split validation   shot seeds SHOT_SEED+101.. and evaluation examples drawn with
                         VALIDATION_EVAL_SEED: data the demo never reports; used to choose N
                         and the density (--sweep n | n-compeft | density)
    --split demo         the demo's data (shots SHOT_SEED+seed, evaluation DEMO_EVAL_SEED)

    python scripts/protocols.py --split validation --sweep n --seeds 101-105
    python scripts/protocols.py --split validation --sweep density --densities 0.1,0.3,0.5 \
        --seeds 101-105 --methods lorahub-dense,lorahub-compeft
    python scripts/protocols.py --split validation --sweep density --alpha 1 ...  (another alpha:
        new rows beside the old ones; every row is keyed by method, N, density and alpha)
    python scripts/protocols.py --split demo --seeds 1-5
    python scripts/protocols.py --split validation --seeds 101-105 --mix factors,product \
        --methods select-dense,select-compeft   (each mix a row; rows without one are factors)
    python scripts/protocols.py --split validation --seeds 101-105 --budgets 40,auto,20,40:5 \
        --methods select-dense,select-compeft   (the search's budget, and B:P budget B with
        patience P; rows without one ran budget 40 to the end)
    python scripts/protocols.py --split validation --seeds 106-125 --l1 0,0.05,0.2 \
        --methods select-dense,select-compeft --budgets auto --starts best   (the regularizer's
        weight; rows without one ran 0.05)

Below the table, each selection row that differs from the package default (N, density, mix,
budget, start, l1) is paired with the default's row of the same method, cell by cell: the mean
EM difference and its standard error over seeds (a seed's cells share its shots).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.search import SearchOutcome, best_point
from lorahub_compeft.compose.selection import exact_count
from lorahub_compeft.config import DEFAULT_N, MIXES, STARTS, CompeftOptions, ComposeConfig, number_or_auto
from lorahub_compeft.store.expert import compress
from lorahub_compeft.store.library import ExpertLibrary
from lorahub_compeft.zoo.benchmark import ZOO_EVAL_SEED as DEMO_EVAL_SEED, ZOO_SHOT_SEED as SHOT_SEED
from lorahub_compeft.zoo.artifacts import Zoo as ShippedZoo
from lorahub_compeft.zoo.tasks import generate, task_names


class Zoo:
    """The shipped zoo as this script uses it: base model, tokenizer, expert names, dense dirs."""
    def __init__(self):
        shipped = ShippedZoo.load()
        self.root, self.model, self.tokenizer = shipped.root, shipped.base.model, shipped.base.tokenizer
        self.library = ExpertLibrary(self.root / "experts", create=False)

    @classmethod
    def load(cls) -> "Zoo":
        return cls()

    def dense_dir(self, name: str) -> Path:
        return self.root / "dense" / name


def exact_match(predictions: list[str], targets: list[str]) -> float:
    return 100 * statistics.fmean(p == t for p, t in zip(predictions, targets))

PACKAGE = ComposeConfig()  # the package's composition defaults, read once
VALIDATION_EVAL_SEED = 6_000  # apart from training (1000s), eval (2000s), calibration (3000s),
#                               shots (4000s) and the demo's evaluation examples (5000)


def task_data(task: str, seed: int, split: str, n_eval: int = 100):
    few = generate(task, 5, seed=SHOT_SEED + seed)
    eval_seed = DEMO_EVAL_SEED if split == "demo" else VALIDATION_EVAL_SEED
    seen = {e["input"] for e in few}
    return few, [e for e in generate(task, n_eval, seed=eval_seed) if e["input"] not in seen]


def compressed_library(zoo: Zoo, density: float, alpha, per_tensor: bool) -> dict:
    return {n: compress(zoo.dense_dir(n), density=density, alpha=alpha, per_tensor=per_tensor,
                        name=n) for n in zoo.library.names()}


def parse_budget(text: str) -> tuple[int | str, int | None]:
    """'40', 'auto' or 'B:P' (budget B, patience P) -> (budget, patience)."""
    budget, _, patience = text.partition(":")
    return (budget if budget == "auto" else int(budget)), (int(patience) if patience else None)


class Recorder:
    """The default regularizer (l1 * mean|w|, the same value) that also keeps every w it is
    asked about: the search's points, from which shorter searches are replayed (derived)."""
    def __init__(self, l1: float):
        self.points, self.l1 = [], l1

    def __call__(self, w):
        self.points.append(np.array(w, dtype=np.float64))
        return self.l1 * float(np.mean(np.abs(w)))


def derived(result, points: list, variants: list[tuple[int, int | None]],
            answer) -> dict:
    """EM and steps of shorter searches replayed from this one's trajectory: (T, P) stops at
    budget T <= budget or, with patience P, sooner (search.SearchOutcome's rule). A search cut
    short is the same search up to its stop (nevergrad's COBYLA does not depend on the budget:
    tests/test_budget.py), and selection depends on the budget only through exact_count, so a
    variant is derived only where that is the same (the caller checks)."""
    n, losses = len(result.experts), result.losses
    ws = [w for w in points if len(w) == n][-len(losses):]
    out, answered = {}, {tuple(result.weights[x] for x in result.experts): None}
    for cap, patience in variants:
        outcome = SearchOutcome(np.zeros(n), math.inf, [], 0)
        for value, w in zip(losses, ws):
            if outcome.done(cap, patience, n):
                break
            outcome.record(value, w)
        best_w, best_loss = best_point([outcome], result.zero_loss)
        key = tuple(float(x) for x in best_w)
        if key not in answered:  # the same point answers the same: generate once
            result.weights = dict(zip(result.experts, key))
            answered[key] = answer(result)
        out[f"{cap}" + (f":{patience}" if patience else "")] = {
            "em": answered[key], "loss": best_loss, "steps": len(outcome.losses)}
    return out


def replays(budget, n: int, candidates: int, stops: list[int], truncations: list[int],
            method: str) -> list[tuple[int, int | None]]:
    """The (T, P) variants derived(...) replays from a run at `budget` (a number, no patience;
    select methods only): its own budget with each patience, and each shorter T (with and
    without each patience) whose selection is the run's (exact_count the same)."""
    cap, patience = budget
    if not method.startswith("select") or cap == "auto" or patience is not None:
        return []
    same = lambda t: exact_count(candidates, n, t) == exact_count(candidates, n, cap)
    return [(cap, p) for p in stops] + [(t, p) for t in truncations if t < cap and same(t)
                                        for p in [None, *stops]]


def replayed_rows(done: list[dict]) -> list[dict]:
    """Rows for the derived variants of each run (forwards: their steps), unless a cell ran
    that variant itself."""
    def cell(r: dict, budget: str) -> tuple:
        return (r["task"], r["seed"], *setting_of(r, budget))
    ran = {cell(r, budget_of(r)) for r in done}
    out = []
    for r in done:
        for label, d in r.get("derived", {}).items():
            if cell(r, label) in ran:
                continue
            out.append({**{k: v for k, v in r.items() if k != "derived"}, **d, "budget": label,
                        "forwards": d["steps"], "replayed_from": budget_of(r)})
    return out


def run_method(zoo, method: str, few, rest, seed: int, n: int, compeft: dict | None,
               mix: str, budget=(40, None), variants=(), search_start: str = "zero",
               l1: float = PACKAGE.l1) -> dict:
    start = time.perf_counter()
    inputs, targets = [e["input"] for e in rest], [e["target"] for e in rest]
    if method == "zeroshot":
        from lorahub_compeft.io.models import generate as answer
        em = exact_match(answer(zoo.model, zoo.tokenizer, inputs, 8, batch_size=64), targets)
        return {"em": em, "loss": None, "seconds": time.perf_counter() - start}
    names = zoo.library.names()
    experts = [compeft[x] for x in names] if method.endswith("compeft") else \
        [zoo.dense_dir(x) for x in names]
    select = "random" if method.startswith("lorahub") else "loss"
    recorder = Recorder(l1)
    result = compose(experts, few, zoo.model, tokenizer=zoo.tokenizer, n_experts=n,
                     select=select, seed=seed, budget=budget[0], patience=budget[1], mix=mix,
                     start=search_start, regularizer=recorder, progress=False)
    answer = lambda r: exact_match(r.generate(inputs, 8, batch_size=64), targets)
    row = {"em": answer(result), "loss": result.best_loss, "experts": result.experts,
           "steps": result.timings["steps"], "forwards": result.timings["forwards"],
           "select_forwards": len(result.selection.scores),
           "seconds": time.perf_counter() - start}
    if variants:
        row["derived"] = derived(result, recorder.points, variants, answer)
        for d in row["derived"].values():
            d["em"] = row["em"] if d["em"] is None else d["em"]  # the run's own best point
    return row


def summarize(rows: list[dict], key, loss: str = "loss") -> dict:
    """Per method: mean EM over tasks of (seed average, loss-picked seed, oracle seed), mean
    per-task seed std, mean seconds per cell. `loss`: the rows' field of the few-shot loss."""
    out = {}
    for method in sorted({key(r) for r in rows}):
        mine = [r for r in rows if key(r) == method]
        tasks = sorted({r["task"] for r in mine})
        avg, picked, oracle, std = [], [], [], []
        for t in tasks:
            rs = [r for r in mine if r["task"] == t]
            ems = [r["em"] for r in rs]
            avg.append(statistics.fmean(ems))
            std.append(statistics.stdev(ems) if len(ems) > 1 else 0.0)
            oracle.append(max(ems))
            lossy = [r for r in rs if r.get(loss) is not None]
            picked.append(min(lossy, key=lambda r: r[loss])["em"] if lossy else avg[-1])
        out[method] = {"mean": statistics.fmean(avg), "std": statistics.fmean(std),
                       "loss_picked": statistics.fmean(picked), "oracle": statistics.fmean(oracle),
                       "seconds": statistics.fmean(r["seconds"] for r in mine),
                       "per_task": dict(zip(tasks, avg))}
    return out


def configs_for(sweep: str, densities=(0.1, 0.2, 0.3), ns=(3, 5, 8, 10, 20)
                ) -> list[tuple[str, int, float | None]]:
    """(method, N, density) to run: the N sweep, the density sweep, or the demo table."""
    if sweep == "n":
        return [("select-dense", n, None) for n in ns]
    if sweep == "n-compeft":
        k = CompeftOptions().density
        return [("select-compeft", n, k) for n in ns]
    if sweep == "density":  # both protocols at each k (--methods picks)
        n = DEFAULT_N["loss"]
        return [("lorahub-dense", 20, None), ("select-dense", n, None)] + \
            [("lorahub-compeft", 20, k) for k in densities] + \
            [("select-compeft", n, k) for k in densities]
    k, n = CompeftOptions().density, DEFAULT_N["loss"]
    return [("zeroshot", 0, None), ("lorahub-dense", 20, None), ("lorahub-compeft", 20, k),
            ("select-dense", n, None), ("select-compeft", n, k)]


def mix_of(row: dict) -> str:
    return row.get("mix", "factors")  # rows written before the mix was recorded mixed factors


def start_of(row: dict) -> str:
    return row.get("start", "zero")  # rows written before the start was recorded began at w = 0


def budget_of(row: dict) -> str:
    return row.get("budget", "40")  # rows written before the budget was recorded ran 40


def l1_of(row: dict) -> float:
    return row.get("l1", PACKAGE.l1)  # rows written before l1 was recorded ran 0.05


def setting_of(row: dict, budget: str | None = None) -> tuple:
    """A row's setting: method, N, density, the ComPEFT alpha (None without ComPEFT experts;
    rows written before alpha was recorded match no setting and are computed again), mix,
    budget (or the `budget` given: a replayed variant's), start and l1."""
    return (row["method"], row["n"], row["density"], row.get("alpha", "unrecorded"), mix_of(row),
            budget or budget_of(row), start_of(row), l1_of(row))


def is_package_default(row: dict) -> bool:
    """Whether a selection row ran the package's defaults (N, density, mix, budget, start, l1)."""
    return (row["method"].startswith("select") and row["n"] == DEFAULT_N["loss"]
            and row["density"] in (None, CompeftOptions().density) and mix_of(row) == PACKAGE.mix
            and budget_of(row) == PACKAGE.budget and start_of(row) == PACKAGE.start
            and l1_of(row) == PACKAGE.l1)


def paired_differences(rows: list[dict], label) -> dict:
    """Each selection row's EM minus the package default's of the same method, over the cells
    (task, seed) both ran; its standard error from the per-seed mean differences (the cells of
    one seed share its shots, so they are not independent)."""
    reference = {(r["method"], r["task"], r["seed"]): r for r in rows if is_package_default(r)}
    out = {}
    for name in sorted({label(r) for r in rows}):
        mine = [r for r in rows if label(r) == name and not is_package_default(r)
                and (r["method"], r["task"], r["seed"]) in reference]
        if not mine:
            continue
        per_seed: dict[int, list[float]] = {}
        for r in mine:
            per_seed.setdefault(r["seed"], []).append(
                r["em"] - reference[(r["method"], r["task"], r["seed"])]["em"])
        means = [statistics.fmean(d) for d in per_seed.values()]
        se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
        against = label(reference[(mine[0]["method"], mine[0]["task"], mine[0]["seed"])])
        out[name] = (against, statistics.fmean(d for ds in per_seed.values() for d in ds), se,
                     len(mine))
    return out


def print_table(rows: list[dict], title: str) -> None:
    label = lambda r: (f"{r['method']} N={r['n']}" + (f" k={r['density']}" if r["density"] else "")
                       + ("" if r["method"] == "zeroshot" else f" mix={mix_of(r)}")
                       + ("" if r["method"] == "zeroshot" or budget_of(r) == "40"
                          else f" budget={budget_of(r)}")
                       + ("" if start_of(r) == "zero" else f" start={start_of(r)}")
                       + ("" if l1_of(r) == PACKAGE.l1 else f" l1={l1_of(r):g}"))
    print(f"\n### {title} (mean EM over the held-out zoo tasks)\n")
    print("| method | seed average | mean per-task seed std | loss-picked seed | oracle seed | "
          "s per cell |\n|---|---|---|---|---|---|")
    for name, s in summarize(rows, label).items():
        print(f"| {name} | {s['mean']:.1f} | {s['std']:.1f} | {s['loss_picked']:.1f} | "
              f"{s['oracle']:.1f} | {s['seconds']:.1f} |")
    paired = paired_differences(rows, label)
    if paired:
        print("\n| method | against | EM difference | its standard error over seeds | cells |"
              "\n|---|---|---|---|---|")
        for name, (reference, diff, se, cells) in paired.items():
            print(f"| {name} | {reference} | {diff:+.2f} | {se:.2f} | {cells} |")
    counted = [r for r in rows if "forwards" in r]
    if counted:
        print("\n| method | search forwards | selection forwards |\n|---|---|---|")
        for name in sorted({label(r) for r in counted}):
            mine = [r for r in counted if label(r) == name]
            print(f"| {name} | {statistics.fmean(r['forwards'] for r in mine):.1f} | "
                  f"{statistics.fmean(r['select_forwards'] for r in mine):.1f} |")


def main(argv=None):
    from lorahub_compeft.cli.options import parse_seeds
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("validation", "demo"), required=True)
    parser.add_argument("--sweep", choices=("n", "n-compeft", "density", "none"), default="none")
    parser.add_argument("--densities", default="0.1,0.2,0.3", help="the density sweep's k values")
    parser.add_argument("--ns", default="3,5,8,10,20", help="the N sweeps' N values")
    parser.add_argument("--mix", default="factors",
                        help="comma-separated mixes to run each setting with (factors, product)")
    parser.add_argument("--alpha", type=number_or_auto, default=CompeftOptions().alpha,
                        help="the ComPEFT experts' alpha (a number or 'auto'; default: the "
                             "package default)")
    parser.add_argument("--budgets", default="40",
                        help="comma-separated search budgets to run each setting with: a "
                             "number, auto (the package default), or B:P (budget B, patience P)")
    parser.add_argument("--stops", default="",
                        help="patience values replayed from each run's trajectory (no forwards "
                             "spent): each budget B also gives rows B:P")
    parser.add_argument("--truncations", default="",
                        help="shorter budgets T replayed from each run (rows T and T:P) where "
                             "selection scores as many candidates exactly as at the run's budget")
    parser.add_argument("--starts", default="zero",
                        help="comma-separated starts of the search to run each setting with "
                             "(zero: w = 0, LoraHub's; best: the best expert alone)")
    parser.add_argument("--l1", default=str(PACKAGE.l1),
                        help="comma-separated weights of the search's regularizer l1 * mean|w| "
                             "to run each setting with (default: the package's)")
    parser.add_argument("--seeds", type=parse_seeds, required=True)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--methods", help="only these methods (comma-separated)")
    parser.add_argument("--rows", required=True,
                        help="JSON lines file: rows are appended as they come, cells already "
                             "there are skipped (a rerun resumes); the table is made from it")
    args = parser.parse_args(argv)
    if args.split == "demo" and args.sweep != "none":
        parser.error("choose defaults on --split validation only")
    if args.split == "validation" and set(args.seeds) & set(range(1, 6)):
        parser.error("seeds 1-5 are the demo's; validate on others, e.g. 101-105")
    path = Path(args.rows)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    # Each setting (setting_of) once per mix, budget, start and l1 asked for (zero-shot mixes
    # nothing: "factors").
    seen = {(r["task"], r["seed"], *setting_of(r)) for r in done}
    alpha_of = lambda k: None if k is None else args.alpha
    densities = [float(k) for k in args.densities.split(",")]
    ns = [int(n) for n in args.ns.split(",")]
    mixes = args.mix.split(",")
    if not set(mixes) <= set(MIXES):
        parser.error(f"--mix: use factors, product or both, got {args.mix!r}")
    stops = [int(p) for p in args.stops.split(",") if p]
    truncations = [int(t) for t in args.truncations.split(",") if t]
    budgets = args.budgets.split(",")
    for b in budgets:
        try:
            parse_budget(b)
        except ValueError:
            parser.error(f"--budgets: {b!r} is not a number, auto or B:P")
    starts = args.starts.split(",")
    if not set(starts) <= set(STARTS):
        parser.error(f"--starts: use {', '.join(STARTS)}, got {args.starts!r}")
    try:
        l1s = [float(x) for x in args.l1.split(",")]
    except ValueError:
        parser.error(f"--l1: use numbers >= 0, comma-separated, got {args.l1!r}")
    if any(not x >= 0 for x in l1s):
        parser.error(f"--l1: use numbers >= 0, got {args.l1!r}")
    configs = [(m, n, k, mix, b, st, l1) for m, n, k in configs_for(args.sweep, densities, ns)
               if not args.methods or m in args.methods.split(",")
               for mix in (["factors"] if m == "zeroshot" else mixes)
               for b in (["40"] if m == "zeroshot" else budgets)
               for st in (["zero"] if m == "zeroshot" else starts)
               for l1 in ([PACKAGE.l1] if m == "zeroshot" else l1s)]
    zoo = Zoo.load()
    tasks = task_names("heldout") if args.tasks == "all" else args.tasks.split(",")
    libraries: dict = {}
    for seed in args.seeds:  # seed-major: a cut-short run still covers every task
        for task in tasks:
            few, rest = task_data(task, seed, args.split)
            for method, n, k, mix, b, st, l1 in configs:
                if (task, seed, method, n, k, alpha_of(k), mix, b, st, l1) in seen:
                    continue
                if k is not None and k not in libraries:
                    libraries[k] = compressed_library(zoo, k, args.alpha,
                                                      CompeftOptions().per_tensor)
                row = run_method(zoo, method, few, rest, seed, n, libraries.get(k), mix,
                                 parse_budget(b), replays(parse_budget(b), n, len(zoo.library.names()),
                                                          stops, truncations, method), st, l1)
                row = dict(row, task=task, seed=seed, method=method, n=n, density=k,
                           alpha=alpha_of(k), mix=mix, budget=b, start=st, l1=l1)
                with path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                done.append(row)
                print(f"{task} s{seed} {method} N={n} k={k} {mix} budget {b} start {st} l1 {l1:g}: "
                      f"{row['em']:.1f} "
                      f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
    done = done + replayed_rows(done)
    labels = set(budgets) | {label for r in done for label in r.get("derived", {})}
    wanted = {(m, n, k, alpha_of(k), mix, b, st, l1) for m, n, k, mix, _, st, l1 in configs
              for b in (labels if m != "zeroshot" else ["40"])}
    rows = [r for r in done if setting_of(r) in wanted
            and r["task"] in tasks and r["seed"] in args.seeds]
    print_table(rows, f"{args.split} split, seeds {','.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
