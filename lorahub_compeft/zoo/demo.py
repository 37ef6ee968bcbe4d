"""`lorahub-compeft demo`: the whole story on the shipped zoo, offline, in minutes.

The experiment runner over the zoo's generated held-out tasks (and, with a BBH directory, the
real BBH tasks they mirror): per task and seed, zero-shot, the composition of N dense experts
and the composition of the same N ComPEFT experts, with the one model the zoo loads; or, with
`methods`, any of the runner's registered methods side by side.
"""
from __future__ import annotations

import dataclasses
import statistics

from lorahub_compeft.eval.methods import METHODS, make_method, method_options
from lorahub_compeft.eval.worker import Worker
from lorahub_compeft.eval.cells import plan
from lorahub_compeft.eval.runner import run
from lorahub_compeft.eval.benchmarks import BBHBenchmark
from lorahub_compeft.zoo.benchmark import ZooBenchmark
from lorahub_compeft.zoo.artifacts import Zoo
from lorahub_compeft.zoo.tasks import get_task, task_names

DEMO_METHODS = (("zeroshot", "zeroshot"), ("lorahub", "dense"), ("compeft", "compeft"),
                ("select", "dense"), ("select-compeft", "compeft"))


def run_demo(zoo: Zoo, tasks: list[str] | None = None, seeds: list[int] = (1,),
             n_experts: int = 20, budget: int | str | None = None, shots: int = 5, n_eval: int = 100,
             bbh_dir: str | None = None, max_bbh_eval: int | None = None,
             progress: bool = True, select: str = "random", mix: str | None = None,
             methods: list[str] | None = None, start: str | None = None) -> list[dict]:
    """One row per (task, seed) with the three methods' EM, their weights and bytes.
    select="random": LoraHub's protocol (the zoo's shipped ComPEFT setting); "loss": the
    package's (experts chosen by few-shot loss, ComPEFT at the default compression).
    mix, budget, start: how w combines the experts, the search's budget and where it starts
    (None: each method's default: 40 and w = 0 for LoraHub's protocol, auto and the best
    expert alone for the package's).
    methods: these registered methods instead (a column each, named by the method), each with
    n_experts (None: its own default), budget and mix where it takes them; `compeft` at the
    zoo's shipped compression, as in the default table."""
    tasks = list(tasks or task_names("heldout"))
    pool = zoo.pool()
    if n_experts is not None and not 1 <= n_experts <= len(pool):
        raise ValueError(f"--n-experts must be between 1 and {len(pool)} (the zoo's "
                         f"experts), got {n_experts}")
    compose = {"n_experts": n_experts, "budget": budget, "mix": mix, "start": start}
    compose = {k: v for k, v in compose.items() if v is not None}
    if methods is not None:
        check_methods(methods)
        columns = {m: m for m in methods}
        methods = [make_method(m, **method_options(m, compose),
                               **(zoo.compression if m == "compeft" else {})) for m in methods]
    else:
        columns = dict(DEMO_METHODS)
        protocol = ("select", "select-compeft") if select == "loss" else ("lorahub", "compeft")
        methods = [make_method("zeroshot"), make_method(protocol[0], **compose),
                   make_method(protocol[1], **compose,
                               **(zoo.compression if select != "loss" else {}))]
    model = str(zoo.root / "base")
    cells = plan(ZooBenchmark(shots, n_eval), tasks, list(seeds), methods, model, pool)
    mirrored = [get_task(t).bbh_task for t in tasks if get_task(t).bbh_task]
    if bbh_dir and mirrored:
        cells += plan(BBHBenchmark(bbh_dir, shots, max_bbh_eval), mirrored, list(seeds), methods,
                      model, pool)
    rows = run(cells, worker=Worker(preloaded=zoo.base), progress=progress)
    return _demo_rows(rows, columns)


def check_methods(names: list[str]) -> None:
    """A one-line error that lists the registered methods, unless `names` are some of them,
    each once."""
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names or len(set(names)) < len(names):
        problem = (f"no method {', '.join(map(repr, unknown))}" if unknown else
                   "no method given" if not names else "a method named twice")
        raise ValueError(f"--methods: {problem}; give a comma-separated list of "
                         f"{', '.join(METHODS)}")


def _demo_rows(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """The runner's rows (one per method) as the demo's (one per task and seed); a method's
    weights, bytes per expert read, mix and start under its column's name."""
    out: dict[tuple, dict] = {}
    for r in rows:
        label = (f"BBH {r['task']} (real)" if r["setting"]["data"]["source"] == "bbh"
                 else r["task"])
        row = out.setdefault((label, r["seed"]), {"task": label, "seed": r["seed"],
                                                  "n_eval": r["n_eval"], "seconds": 0.0})
        column = columns[r["method"]]
        row[column] = r["em"]
        row["seconds"] += r["seconds"]
        if "weights" in r:
            row[f"{column}_weights"] = dict(zip((e["name"] for e in r["experts"]), r["weights"]))
        params = METHODS[r["method"]].Params
        for name in ("mix", "start"):
            if name in {f.name for f in dataclasses.fields(params)}:
                row[f"{column}_{name}"] = params.ran_with(r["setting"]["params"], name)
        if "bytes_read" in r:
            row[f"{column}_bytes"] = r["bytes_read"] / r["files_read"]
    return list(out.values())


def format_methods_table(rows: list[dict], methods: list[str]) -> str:
    """Per task: each method's EM, mean ± std over seeds; then the mean over the zoo's
    held-out tasks."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    lines = [f"| task | {' | '.join(methods)} | s/seed |", "|---" * (len(methods) + 2) + "|"]
    for task, rs in by_task.items():
        cells = [_mean_std([r[m] for r in rs]) for m in methods]
        lines.append(f"| {task} | {' | '.join(cells)} | "
                     f"{statistics.fmean(r['seconds'] for r in rs):.1f} |")
    zoo_rows = [r for r in rows if not r["task"].startswith("BBH ")]
    if zoo_rows:
        tasks = sorted({r["task"] for r in zoo_rows})
        means = [statistics.fmean(statistics.fmean(r[m] for r in zoo_rows if r["task"] == t)
                                  for t in tasks) for m in methods]
        lines.append(f"| **mean of {len(tasks)} zoo held-out tasks** | "
                     f"{' | '.join(f'**{x:.1f}**' for x in means)} | |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def format_table(rows: list[dict], setting: str) -> str:
    """Per task: mean ± std over seeds; then the mean over the zoo's held-out tasks."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    lines = [f"| task | zero-shot EM | dense LoRA composition EM | ComPEFT composition EM "
             f"({setting}) | bytes/expert fp16 → ComPEFT | s/seed |",
             "|---|---|---|---|---|---|"]
    for task, rs in by_task.items():
        d, c = statistics.fmean(r["dense_bytes"] for r in rs), statistics.fmean(r["compeft_bytes"] for r in rs)
        cells = [_mean_std([r[m] for r in rs]) for m in ("zeroshot", "dense", "compeft")]
        lines.append(f"| {task} | {' | '.join(cells)} | {d / 1e3:.0f} KB → {c / 1e3:.1f} KB "
                     f"({d / c:.1f}x) | {statistics.fmean(r['seconds'] for r in rs):.1f} |")
    zoo_rows = [r for r in rows if not r["task"].startswith("BBH ")]
    if zoo_rows:
        tasks = sorted({r["task"] for r in zoo_rows})
        means = {m: statistics.fmean(statistics.fmean(r[m] for r in zoo_rows if r["task"] == t)
                                     for t in tasks) for m in ("zeroshot", "dense", "compeft")}
        lines.append(f"| **mean of {len(tasks)} zoo held-out tasks** | **{means['zeroshot']:.1f}** | "
                     f"**{means['dense']:.1f}** | **{means['compeft']:.1f}** | | |")
    return "\n".join(lines)
