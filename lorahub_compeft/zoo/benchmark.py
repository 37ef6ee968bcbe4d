"""The zoo's generated held-out tasks as a benchmark for the runner."""
from __future__ import annotations

from dataclasses import dataclass

from lorahub_compeft.eval.benchmarks import TaskData, Benchmark
from lorahub_compeft.zoo.tasks import get_task, questions, task_names

ZOO_SHOT_SEED, ZOO_EVAL_SEED = 4_000, 5_000  # apart from the zoo's training and validation


@dataclass
class ZooBenchmark(Benchmark):
    """The zoo's generated held-out tasks: shots drawn with the seed, the same evaluation
    rows for every seed (less any that is also a shot)."""
    shots: int = 5
    n_eval: int = 100
    kind = "zoo"

    def check(self, tasks: list[str]) -> None:
        heldout = task_names("heldout")
        for task in tasks:
            if task not in task_names():
                raise ValueError(f"unknown zoo task {task!r}; the held-out tasks are "
                                 f"{', '.join(heldout)}")
            if get_task(task).split != "heldout":
                raise ValueError(f"{task} is an upstream task (the base and an expert were "
                                 f"trained on it); choose held-out tasks: {', '.join(heldout)}")

    def load(self, task: str, seed: int) -> TaskData:
        shots = questions(task, self.shots, seed=ZOO_SHOT_SEED + seed)
        seen = {s["input"] for s in shots}
        rows = [e for e in questions(task, self.n_eval, seed=ZOO_EVAL_SEED) if e["input"] not in seen]
        return TaskData(task, get_task(task).instruction, shots, rows, None)

    def identity(self, task: str) -> dict:
        return {"source": self.kind, "shots": self.shots, "n_eval": self.n_eval}

