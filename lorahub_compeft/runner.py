"""The one experiment runner: cells of (task, seed, method) over a task source, run in one
process, a pool of processes, or Ray actors, each worker keeping its model between cells.

Each cell's *setting* is everything its result depends on: task, seed, the method and all its
parameters, the model, the pool of experts (names and file hashes or Hub revisions) and the
data source. Its hash is the cell's key: with `out`, every finished cell is one line of
results.jsonl (its predictions one line of predictions.jsonl, written first), and a rerun
skips the keys already there, so a rerun with any other setting computes new cells and keeps
the old ones. A torn line (a crash mid-write) is skipped with a warning, nothing else is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_text
from .methods import Base, Method, model_identity
from .pool import ExpertPool
from .sources import TaskSource

RESULTS, PREDICTIONS, CONFIG = "results.jsonl", "predictions.jsonl", "config.json"
log = logging.getLogger(__name__)


@dataclass
class Cell:
    task: str
    seed: int
    method: Method
    source: TaskSource
    model: str
    experts: ExpertPool | None = None

    def setting(self) -> dict:
        m = self.method
        return {"task": self.task, "seed": self.seed, "method": m.name,
                "params": m.params.to_json(), "model": model_identity(self.model),
                "experts": ({"pool_sha256": self.experts.digest(), "count": len(self.experts)}
                            if m.uses_experts else None),
                "data": self.source.identity(self.task)}


def setting_key(setting: dict) -> str:
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]


def plan(source: TaskSource, tasks: list[str], seeds: list[int], methods: list[Method],
         model: str, experts: ExpertPool | None = None) -> list[Cell]:
    """Every (task, seed, method) cell, checked before any runs."""
    if not tasks or not seeds or not methods:
        raise ValueError("nothing to run: give at least one task, seed and method")
    source.check(tasks)
    for m in methods:
        if m.uses_experts:
            n = getattr(m.params, "n_experts", 1)
            if experts is None or len(experts) < n:
                have = 0 if experts is None else len(experts)
                raise ValueError(f"{m.name} composes {n} experts but {have} were given; pass "
                                 "more experts (--experts / --experts-file) or lower -n")
    return [Cell(t, s, m, source, model, experts) for t in tasks for s in seeds for m in methods]


# --- one worker: a model loaded once, every cell it is given ----------------------------------
class Worker:
    def __init__(self, batch_size: int = 16, preloaded: Base | None = None):
        self.batch_size = batch_size
        self.models: dict[str, Base] = {preloaded.name: preloaded} if preloaded else {}

    def base(self, name: str) -> Base:
        if name not in self.models:
            self.models[name] = Base.load(name, self.batch_size)
        return self.models[name]

    def run(self, cell: Cell) -> tuple[dict, dict]:
        """Evaluate one cell; returns (result row, predictions row)."""
        setting = cell.setting()
        key = setting_key(setting)
        task = cell.source.load(cell.task, cell.seed)
        started, start = time.time(), time.perf_counter()
        answers = cell.method.run(task, self.base(cell.model), cell.experts, cell.seed)
        row = {"key": key, "task": cell.task, "seed": cell.seed, "method": cell.method.name,
               "em": task.score(answers.predictions), "n_eval": len(task.rows),
               "seconds": time.perf_counter() - start, "started": started,
               "worker": f"{socket.gethostname()}:{os.getpid()}", **answers.info,
               "setting": setting}
        return row, {"key": key, "task": cell.task, "seed": cell.seed, "method": cell.method.name,
                     "predictions": answers.predictions, "targets": [r["target"] for r in task.rows]}


_WORKER: Worker | None = None


def _pool_init(batch_size: int) -> None:
    global _WORKER
    _WORKER = Worker(batch_size)


def _pool_run(cell: Cell):
    return _WORKER.run(cell)


# --- results files ------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """Whole lines only: a line cut by a crash (bad JSON, or the last line without its
    newline) is skipped with a warning; the lines after it are kept."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip():
            log.warning("%s:%d: skipped a torn line (a run was killed while writing it)", path, number)
    return rows


def _rewrite(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.exists() and path.read_text() != text:
        atomic_write_text(path, text)


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:  # one write of one line: O_APPEND keeps lines whole
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _open_results(out: Path) -> list[dict]:
    """The finished rows; torn lines dropped, and predictions whose result line never got
    written (a kill between the two appends) dropped too, so a rerun does not repeat them."""
    results = read_jsonl(out / RESULTS)
    _rewrite(out / RESULTS, results)
    done = {r.get("key") for r in results}
    predictions = read_jsonl(out / PREDICTIONS)
    _rewrite(out / PREDICTIONS, [p for p in predictions if "key" not in p or p["key"] in done])
    return results


def _record_command(out: Path, command: list[str] | None) -> None:
    """OUT/config.json: every command that wrote into this folder, in order."""
    path = out / CONFIG
    history = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    history.append({"argv": command or sys.argv, "cwd": os.getcwd(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_text(path, json.dumps({"runs": history}, indent=1) + "\n")


# --- running ------------------------------------------------------------------------------------
def run(cells: list[Cell], out: str | Path | None = None, *, workers: int = 1,
        backend: str = "local", address: str | None = None, gpus_per_cell: float | None = None,
        batch_size: int = 16, worker: Worker | None = None, command: list[str] | None = None,
        progress: bool = True) -> list[dict]:
    """Run every cell not yet in OUT/results.jsonl; returns the rows of `cells` (finished
    earlier or now), in the order of `cells`. Without `out` nothing is written or resumed."""
    from tqdm.auto import tqdm
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use local or ray")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    keys = [setting_key(c.setting()) for c in cells]
    done: dict[str, dict] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        done = {r["key"]: r for r in _open_results(out) if "key" in r}
        _record_command(out, command)
    todo = [c for c, k in zip(cells, keys) if k not in done]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell",
               disable=not progress)
    for row, preds in _execute(todo, workers, backend, address, gpus_per_cell, batch_size, worker):
        if out is not None:
            _append(out / PREDICTIONS, preds)
            _append(out / RESULTS, row)  # last: a cell counts as done once both lines are whole
        done[row["key"]] = row
        bar.set_postfix_str(f"{row['task']} s{row['seed']} {row['method']}: EM {row['em']:.1f}")
        bar.update()
    bar.close()
    return [done[k] for k in keys]


def _execute(cells, workers, backend, address, gpus_per_cell, batch_size, worker):
    if not cells:
        return
    if backend == "ray":
        from .ray_backend import run_on_ray
        yield from run_on_ray(cells, workers, address, gpus_per_cell, batch_size)
    elif workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers, _pool_init, (batch_size,)) as pool:
            yield from pool.imap_unordered(_pool_run, cells)
    else:
        worker = worker or Worker(batch_size)
        for cell in cells:
            yield worker.run(cell)
