"""The zoo's tasks: declarative specs in `tasks/zoo/*.json`, generators in this module.

A *family* shares one input distribution (Boolean expressions, liar chains, walks, bracket
sequences, word lists, number pairs, option lists); each task of a family asks a different
question about the same kind of input, so the instruction alone says which skill is wanted.
Upstream tasks train the base and one LoRA expert each. Held-out tasks ask an upstream skill
with an instruction (and often a question format) the base never saw, e.g. BBH's own
phrasing, so only few-shot examples can tell the model which skill is meant.

Every example is `{"input": f"{instruction}\\n\\nQ: {question}\\nA:", "target": answer}`,
the prompt format of the project's BBH runner.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lorahub_compeft.eval.bbh import format_prompt  # one prompt format for BBH and the zoo
from lorahub_compeft.zoo.generators import QUESTIONS


# ---------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ZooTask:
    """One task spec as stored in `tasks/zoo/<name>.json`."""
    name: str
    split: str                      # "upstream" or "heldout"
    family: str
    instruction: str
    answer: str                     # "label", "word", "number" or "brackets"
    labels: tuple[str, ...] = ()    # the closed answer set, when there is one
    skills: tuple[str, ...] = ()    # held-out: the upstream task(s) whose skill it needs
    bbh_task: str | None = None     # held-out: the real BBH task it mirrors, if any
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def prompt(self, question: str) -> str:
        return format_prompt(self.instruction, question)


def spec_dir() -> Path:
    """Where the JSON specs live: the installed `lorahub_compeft.tasks` package's zoo/."""
    return Path(str(resources.files("lorahub_compeft.tasks"))) / "zoo"


@lru_cache(maxsize=None)
def load_tasks() -> dict[str, ZooTask]:
    tasks = {}
    for path in sorted(spec_dir().glob("*.json")):
        raw = json.loads(path.read_text())
        known = {k: raw.pop(k) for k in list(raw) if k in ZooTask.__dataclass_fields__}
        for key in ("labels", "skills"):
            known[key] = tuple(known.get(key, ()))
        tasks[known["name"]] = ZooTask(**known, extra=raw)
    return tasks


def get_task(name: str) -> ZooTask:
    try:
        return load_tasks()[name]
    except KeyError:
        raise KeyError(f"unknown zoo task {name!r}; known: {sorted(load_tasks())}") from None


def task_names(split: str | None = None) -> list[str]:
    return [t.name for t in load_tasks().values() if split in (None, t.split)]


def generate(task_name: str, n: int, seed: int = 0, instruction: str | None = None
             ) -> list[dict[str, str]]:
    """`n` examples of a task, deterministic in (task_name, seed). `instruction` overrides
    the spec's (used to train experts on prompts without their instruction)."""
    text = get_task(task_name).instruction if instruction is None else instruction
    return [{"input": format_prompt(text, e["input"]), "target": e["target"]}
            for e in questions(task_name, n, seed)]


def questions(task_name: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` bare questions and answers of a task (no instruction, no Q/A), deterministic in
    (task_name, seed); `generate` wraps the same ones in the prompt."""
    get_task(task_name)  # a clear error for an unknown name
    rng = random.Random(f"{task_name}/{seed}")  # str seeds hash stably across runs
    make = QUESTIONS[task_name]
    return [dict(zip(("input", "target"), make(rng))) for _ in range(n)]
