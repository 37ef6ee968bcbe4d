"""One worker: a model loaded once and kept for every cell it is given (in this process, a
pool process, or a Ray actor)."""
from __future__ import annotations

import os
import socket
import time

from lorahub_compeft.eval.cells import Cell, setting_key
from lorahub_compeft.eval.methods import Base

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
        task = cell.benchmark.load(cell.task, cell.seed)
        model = self.base(cell.model)
        _reset_peak_rss()
        started, start = time.time(), time.perf_counter()
        answers = cell.method.run(task, model, cell.experts, cell.seed)
        row = {"key": key, "task": cell.task, "seed": cell.seed, "method": cell.method.name,
               "em": task.score(answers.predictions), "n_eval": len(task.rows),
               "seconds": time.perf_counter() - start, "started": started,
               "worker": f"{socket.gethostname()}:{os.getpid()}", **answers.info,
               **({"peak_rss_bytes": peak} if (peak := _peak_rss()) else {}), "setting": setting}
        return row, {"key": key, "task": cell.task, "seed": cell.seed, "method": cell.method.name,
                     "predictions": answers.predictions, "targets": [r["target"] for r in task.rows]}


def _reset_peak_rss() -> None:
    """Start the process's peak RSS (VmHWM) afresh, so that a row's peak is its own cell's
    (Linux; elsewhere nothing happens and rows carry no peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    """The process's peak RSS in bytes since _reset_peak_rss (Linux), else None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_WORKER: Worker | None = None


def pool_init(batch_size: int, threads: int | None = None) -> None:
    global _WORKER
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    _WORKER = Worker(batch_size)


def pool_run(cell: Cell):
    return _WORKER.run(cell)
