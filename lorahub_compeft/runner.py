"""The BBH experiment: tasks x seeds x methods, each cell independent and resumable.

Per (task, seed): 5 few-shot examples are drawn with the seed, the rest are evaluated. Methods:
  zeroshot  the base model alone, LoraHub's prompt
  icl       the few-shot examples in context before each question
  lorahub   composition over N dense experts (as LoraHub runs)
  compeft   the same N experts (same sample for the same seed), ComPEFT-compressed, composed
Each finished cell is one JSON line in results.jsonl (predictions in predictions.jsonl); a
killed run resumes where it stopped and a half-written last line is dropped, never parsed.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import bbh
from .evaluate import accuracy, generate, load_model
from .files import atomic_write_text

# lorahub / compeft: the paper's protocol (N experts drawn at random per seed, dense or ComPEFT);
# select / select-compeft: the N of all given experts with the lowest few-shot loss.
METHODS = ("zeroshot", "icl", "lorahub", "compeft", "select", "select-compeft")
COMPOSING = {"lorahub": "random", "compeft": "random", "select": "loss", "select-compeft": "loss"}
RESULTS, PREDICTIONS = "results.jsonl", "predictions.jsonl"


@dataclass
class RunConfig:
    model: str
    out: Path
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    experts: list[str] = field(default_factory=list)
    n_experts: int = 20          # the random protocol's N
    select_n: int = 3            # the select methods' N (compose.DEFAULT_N["loss"])
    density: float = 0.1         # ComPEFT settings: codec.DEFAULT_COMPRESSION
    alpha: float | str = "auto"
    per_tensor: bool = True
    shots: int = 5
    budget: int = 40
    bbh_dir: str | None = None
    max_eval: int | None = None  # cap evaluated examples per cell (smoke runs)
    batch_size: int = 16

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        for task in self.tasks:
            bbh.load_task_spec(task)  # raises with the list of valid names
        if set(COMPOSING) & set(self.methods):
            if len(self.experts) < self.n_experts:
                raise ValueError(f"{len(self.experts)} experts given but --n-experts "
                                 f"{self.n_experts}; pass more experts or lower -n")


def cell_key(task: str, seed: int, method: str) -> str:
    return f"{task}|{seed}|{method}"


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: a line cut by a crash (no newline or bad JSON) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _repair(path: Path) -> list[dict]:
    """Rewrite the file without a trailing partial line, so appends start on a clean line."""
    rows = read_jsonl(path)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.exists() and path.read_text() != text:
        atomic_write_text(path, text)
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:  # one write of one line: O_APPEND keeps lines whole
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sample_experts(experts: list[str], n: int, seed: int) -> list[str]:
    """The same N experts for every method of a (task, seed)."""
    return sorted(random.Random(seed).sample(sorted(experts), n))


def compressed_path(cfg: RunConfig, expert: str) -> Path:
    from .library import file_name_for
    scope = "per-tensor" if cfg.per_tensor else "global"
    return cfg.out / "compressed" / f"k{cfg.density}-a{cfg.alpha}-{scope}" / file_name_for(expert)


def _compressed(cfg: RunConfig, expert: str) -> Path:
    """Compress an expert once per (density, alpha, scope) and reuse the file across cells."""
    from .expert import compress
    path = compressed_path(cfg, expert)
    if not path.exists():
        compress(expert, cfg.density, cfg.alpha, cfg.per_tensor, name=expert).save(path, force=True)
    return path


def _dense_bytes(expert: str) -> int:
    from .adapters import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        path = Path(expert) / name
        if path.exists():
            return path.stat().st_size
    from .adapters import load_adapter
    return load_adapter(expert).nbytes()  # a Hub id: what was fetched


_MODELS: dict[str, tuple] = {}


def _base(model_name: str):
    """One base model per worker process, loaded once."""
    if model_name not in _MODELS:
        model, tokenizer = load_model(model_name)
        _MODELS[model_name] = (model.eval(), tokenizer)
    return _MODELS[model_name]


def run_cell(cfg: RunConfig, task: str, seed: int, method: str) -> tuple[dict, dict]:
    """Evaluate one cell; returns (result row, predictions row)."""
    spec = bbh.load_task_spec(task)
    examples = bbh.load_examples(task, cfg.bbh_dir)
    shots, rest = bbh.draw_few_shot(examples, cfg.shots, seed=seed)
    rest = rest[:cfg.max_eval] if cfg.max_eval else rest
    instruction = spec["instruction"]
    targets = [e["target"] for e in rest]
    row = {"task": task, "seed": seed, "method": method, "model": cfg.model, "n_eval": len(rest)}
    start = time.perf_counter()
    if method in ("zeroshot", "icl"):
        model, tok = _base(cfg.model)
        if method == "zeroshot":
            prompts = [bbh.format_prompt(instruction, e["input"]) for e in rest]
        else:
            prompts = [bbh.format_icl_prompt(instruction, shots, e["input"]) for e in rest]
        predictions = generate(model, tok, prompts, spec["max_new_tokens"], cfg.batch_size)
    else:
        from .compose import compose
        select = COMPOSING[method]
        chosen = sample_experts(cfg.experts, cfg.n_experts, seed) if select == "random" \
            else sorted(cfg.experts)
        if method.endswith("compeft"):
            sources = [_compressed(cfg, e) for e in chosen]
            row["bytes_read"] = sum(p.stat().st_size for p in sources)
        else:
            sources = chosen
            row["bytes_read"] = sum(_dense_bytes(e) for e in chosen)
        few = [{"input": bbh.format_prompt(instruction, s["input"]), "target": s["target"]}
               for s in shots]
        result = compose([str(s) for s in sources], few, model=cfg.model,
                         n_experts=len(sources) if select == "random" else cfg.select_n,
                         select=select, seed=seed, budget=cfg.budget, progress=False)
        if select == "loss":  # every expert was read and scored; these were composed
            chosen = [e for e in chosen if e in result.experts or Path(e).name in result.experts]
            row["selection_scores"] = result.selection.scores
        prompts = [bbh.format_prompt(instruction, e["input"]) for e in rest]
        predictions = result.generate(prompts, max_new_tokens=spec["max_new_tokens"],
                                      batch_size=cfg.batch_size)
        row.update(experts=chosen, weights=list(result.weights.values()),
                   best_loss=result.best_loss, zero_loss=result.zero_loss,
                   compose_timings=result.timings)
    row["em"] = 100 * accuracy(predictions, targets,
                               lambda p, t: bbh.exact_match(p, t, spec["answer"]))
    row["seconds"] = time.perf_counter() - start
    return row, {"task": task, "seed": seed, "method": method, "predictions": predictions,
                 "targets": targets}


def _worker(args):
    cfg, task, seed, method = args
    return run_cell(cfg, task, seed, method)


def run(cfg: RunConfig, workers: int = 1, backend: str = "local", address: str | None = None,
        progress: bool = True) -> list[dict]:
    """Run every cell not yet in results.jsonl; returns all result rows."""
    from tqdm.auto import tqdm
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    results, predictions = cfg.out / RESULTS, cfg.out / PREDICTIONS
    rows = _repair(results)
    _repair(predictions)
    done = {cell_key(r["task"], r["seed"], r["method"]) for r in rows}
    cells = [(t, s, m) for t in cfg.tasks for s in cfg.seeds for m in cfg.methods
             if cell_key(t, s, m) not in done]
    bar = tqdm(total=len(cells) + len(done), initial=len(done), desc="BBH cells", unit="cell",
               disable=not progress)
    for row, preds in _execute(cfg, cells, workers, backend, address):
        _append(predictions, preds)
        _append(results, row)  # last: a cell counts as done only once both lines are whole
        rows.append(row)
        bar.set_postfix_str(f"{row['task']} s{row['seed']} {row['method']}: EM {row['em']:.1f}")
        bar.update()
    bar.close()
    return rows


def _execute(cfg, cells, workers, backend, address):
    jobs = [(cfg, t, s, m) for t, s, m in cells]
    if backend == "ray":
        try:
            import ray
        except ImportError:
            raise ValueError("the ray backend needs `pip install lorahub-compeft[ray]`") from None
        ray.init(address=address, ignore_reinit_error=True)
        remote = ray.remote(_worker)
        pending = [remote.remote(j) for j in jobs]
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            yield ray.get(finished[0])
    elif workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap_unordered(_worker, jobs)
    elif backend == "local":
        for job in jobs:
            yield _worker(job)
    else:
        raise ValueError(f"unknown backend {backend!r}; use local or ray")
