"""`lorahub-compeft demo`: the whole story on the shipped zoo, offline, in minutes.

Per held-out task and seed: 5 examples are drawn with the seed, N experts are sampled with
the seed (the same N for dense and ComPEFT), and three models answer the task's evaluation
examples: the base alone (zero-shot), the composition of the dense experts, and the
composition of the ComPEFT experts. With a BBH directory, the held-out tasks that mirror a
BBH task are also run on the real BBH examples (5 drawn as shots, the rest evaluated).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .. import bbh
from ..adapters import WEIGHTS_NAME
from ..compose import compose
from ..evaluate import accuracy, generate as generate_answers
from ..library import ExpertLibrary, file_name_for
from .ship import ARTIFACTS, verify
from .tasks import generate, get_task, task_names

SHOT_SEED, DEMO_EVAL_SEED = 4_000, 5_000  # apart from training, validation and build reports


@dataclass
class Zoo:
    root: Path
    manifest: dict
    model: object
    tokenizer: object
    library: ExpertLibrary

    @classmethod
    def load(cls, root: str | Path = ARTIFACTS) -> "Zoo":
        from ..evaluate import load_model
        root = Path(root)
        manifest = verify(root)
        model, tokenizer = load_model(str(root / "base"))
        return cls(root, manifest, model.eval(), tokenizer, ExpertLibrary(root / "experts",
                                                                          create=False))

    def dense_dir(self, name: str) -> Path:
        return self.root / "dense" / name

    def bytes_per_expert(self, names: list[str]) -> tuple[float, float]:
        """Mean (fp16 dense file, compressed file) bytes over `names`."""
        dense = [(self.dense_dir(n) / WEIGHTS_NAME).stat().st_size for n in names]
        packed = [(self.library.root / file_name_for(n)).stat().st_size for n in names]
        return statistics.fmean(dense), statistics.fmean(packed)


def exact_match(predictions: list[str], targets: list[str]) -> float:
    return 100 * accuracy(predictions, targets, str.__eq__)  # answers come stripped


def task_data(task: str, seed: int, shots: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Few-shot examples for `seed`, and the evaluation examples (the same for every seed),
    with any input that is also a shot removed."""
    few = generate(task, shots, seed=SHOT_SEED + seed)
    seen = {e["input"] for e in few}
    rest = [e for e in generate(task, n_eval, seed=DEMO_EVAL_SEED) if e["input"] not in seen]
    return few, rest


def bbh_data(task: str, seed: int, shots: int, bbh_dir: str, max_eval: int | None
             ) -> tuple[list[dict], list[dict]]:
    """Real BBH examples in the zoo's prompt format: shots drawn with the seed, the rest."""
    spec = bbh.load_task_spec(task)
    drawn, rest = bbh.draw_few_shot(bbh.load_examples(task, bbh_dir), shots, seed=seed)
    fmt = [{"input": bbh.format_prompt(spec["instruction"], e["input"]), "target": e["target"]}
           for e in drawn + rest]
    return fmt[:shots], fmt[shots:][:max_eval]


def run_cell(zoo: Zoo, label: str, few: list[dict], rest: list[dict], seed: int,
             n_experts: int, budget: int, max_new_tokens: int = 8, select: str = "random") -> dict:
    start = time.perf_counter()
    inputs, targets = [e["input"] for e in rest], [e["target"] for e in rest]
    row = {"task": label, "seed": seed, "n_eval": len(rest)}
    zero = generate_answers(zoo.model, zoo.tokenizer, inputs, max_new_tokens, batch_size=64)
    row["zeroshot"] = exact_match(zero, targets)
    # random: LoraHub's draw of N; loss: all experts are candidates, the N lowest kept
    names = zoo.library.sample(n_experts, seed) if select == "random" else zoo.library.names()
    for method, experts in (("dense", [zoo.dense_dir(n) for n in names]),
                            ("compeft", [zoo.library.get(n) for n in names])):
        result = compose(experts, few, zoo.model, tokenizer=zoo.tokenizer,
                         n_experts=n_experts, select=select, seed=seed, budget=budget,
                         progress=False)
        row[method] = exact_match(result.generate(inputs, max_new_tokens, batch_size=64), targets)
        row[f"{method}_weights"] = result.weights
    row["dense_bytes"], row["compeft_bytes"] = zoo.bytes_per_expert(result.experts)
    row["seconds"] = time.perf_counter() - start
    return row


def run_demo(zoo: Zoo, tasks: list[str] | None = None, seeds: list[int] = (1,),
             n_experts: int = 20, budget: int = 40, shots: int = 5, n_eval: int = 100,
             bbh_dir: str | None = None, max_bbh_eval: int | None = None,
             progress: bool = True, select: str = "random") -> list[dict]:
    from tqdm.auto import tqdm
    tasks = list(tasks or task_names("heldout"))
    for t in tasks:
        if t not in task_names():
            raise ValueError(f"unknown zoo task {t!r}; the held-out tasks are "
                             f"{', '.join(task_names('heldout'))}")
        if get_task(t).split != "heldout":
            raise ValueError(f"{t} is an upstream task (the base and an expert were trained on "
                             f"it); choose held-out tasks: {', '.join(task_names('heldout'))}")
    if not 1 <= n_experts <= len(zoo.library):
        raise ValueError(f"--n-experts must be between 1 and {len(zoo.library)} (the zoo's "
                         f"experts), got {n_experts}")
    cells = [(t, s, False) for t in tasks for s in seeds]
    if bbh_dir:
        cells += [(t, s, True) for t in tasks if get_task(t).bbh_task for s in seeds]
    rows = []
    bar = tqdm(cells, desc="demo", unit="cell", disable=not progress)
    for task, seed, real in bar:
        if real:
            name = get_task(task).bbh_task
            few, rest = bbh_data(name, seed, shots, bbh_dir, max_bbh_eval)
            label = f"BBH {name} (real)"
        else:
            few, rest = task_data(task, seed, shots, n_eval)
            label = task
        rows.append(run_cell(zoo, label, few, rest, seed, n_experts, budget, select=select))
        bar.set_postfix_str(f"{label} s{seed}")
    return rows


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
