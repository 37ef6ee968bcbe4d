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

import json
import logging
import os
import sys
import time
from pathlib import Path

from lorahub_compeft.eval.cells import Cell, setting_key
from lorahub_compeft.eval.worker import Worker, pool_init, pool_run
from lorahub_compeft.io.files import atomic_write_text, read_jsonl

RESULTS, PREDICTIONS, CONFIG = "results.jsonl", "predictions.jsonl", "config.json"
log = logging.getLogger(__name__)


# --- results files ------------------------------------------------------------------------------
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
        from lorahub_compeft.eval.ray_backend import run_on_ray
        yield from run_on_ray(cells, workers, address, gpus_per_cell, batch_size)
    elif workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers, pool_init, (batch_size,)) as pool:
            yield from pool.imap_unordered(pool_run, cells)
    else:
        worker = worker or Worker(batch_size)
        for cell in cells:
            yield worker.run(cell)
