"""Where a task's examples come from: one `Benchmark` per kind of task data, one `TaskData`
per (task, seed) that every method receives.

A benchmark draws a task's few-shot examples with the seed and gives the evaluation rows;
prompts (`bbh.format_prompt`), the answer check (`bbh.exact_match`) and the draw
(`bbh.draw_few_shot`) are the package's one implementation of each.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lorahub_compeft.eval import bbh
from lorahub_compeft.io.files import sha256_file

@dataclass
class TaskData:
    """One task for one seed: bare questions (`input`) and answers (`target`)."""
    task: str
    instruction: str
    shots: list[dict]
    rows: list[dict]
    answer: dict | None  # the spec's answer kind for exact_match (None: common rules only)
    max_new_tokens: int = 8

    def prompt(self, question: str) -> str:
        return bbh.format_prompt(self.instruction, question)

    def icl_prompt(self, question: str) -> str:
        return bbh.format_icl_prompt(self.instruction, self.shots, question)

    def few_shot_examples(self) -> list[dict]:
        """The shots as composition examples: prompt in, answer out."""
        return [{"input": self.prompt(s["input"]), "target": s["target"]} for s in self.shots]

    def score(self, predictions: list[str]) -> float:
        """Exact match in %, over the evaluation rows."""
        return 100 * bbh.accuracy(predictions, [r["target"] for r in self.rows],
                              lambda p, t: bbh.exact_match(p, t, self.answer))


class Benchmark:
    """A kind of task data. `identity(task)` goes into every result's setting, so a change
    of data (another folder, file, number of shots or rows) makes new results."""
    kind = ""

    def check(self, tasks: list[str]) -> None:
        raise NotImplementedError

    def load(self, task: str, seed: int) -> TaskData:
        raise NotImplementedError

    def identity(self, task: str) -> dict:
        raise NotImplementedError


@dataclass
class BBHBenchmark(Benchmark):
    """Big-Bench Hard from a folder of `<task>.json` files, else the Hub's lukaemon/bbh."""
    bbh_dir: str | None = None
    shots: int = 5
    max_eval: int | None = None  # evaluate at most this many rows (smoke runs)
    kind = "bbh"

    def __post_init__(self):
        self.bbh_dir = self.bbh_dir or os.environ.get(bbh.BBH_DIR_ENV) or None
        if self.bbh_dir:
            self.bbh_dir = str(Path(self.bbh_dir).resolve())

    def check(self, tasks: list[str]) -> None:
        for task in tasks:
            bbh.load_task_spec(task)  # raises with the list of valid names
            if self.bbh_dir:
                self._file(task)

    def _file(self, task: str) -> Path:
        candidates = [Path(self.bbh_dir) / f"{task}.json", Path(self.bbh_dir) / "tasks" / f"{task}.json"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise bbh.BBHDataError(f"BBH task {task!r}: no data file in {self.bbh_dir} (tried "
                                   f"{', '.join(map(str, candidates))}); point --bbh-dir at the "
                                   "folder of BBH <task>.json files")
        return found

    def load(self, task: str, seed: int) -> TaskData:
        spec = bbh.load_task_spec(task)
        shots, rest = bbh.draw_few_shot(bbh.load_examples(task, self.bbh_dir), self.shots, seed=seed)
        return TaskData(task, spec["instruction"], shots, rest[:self.max_eval] if self.max_eval
                        else rest, spec["answer"], spec["max_new_tokens"])

    def identity(self, task: str) -> dict:
        where = ({"dir": self.bbh_dir, "sha256": sha256_file(self._file(task))} if self.bbh_dir
                 else {"hub": bbh.BBH_HUB_DATASET})
        return {"source": self.kind, **where, "shots": self.shots, "max_eval": self.max_eval}
