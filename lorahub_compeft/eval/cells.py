"""What a run computes: cells of (task, seed, method), each with its *setting* (everything its
result depends on: task, seed, the method and all its parameters, the model, the pool of
experts and the data source) and the setting's hash, the key a result is stored and resumed by."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from lorahub_compeft.eval.methods import Method, model_identity
from lorahub_compeft.eval.pool import ExpertPool
from lorahub_compeft.eval.benchmarks import Benchmark


@dataclass
class Cell:
    task: str
    seed: int
    method: Method
    benchmark: Benchmark
    model: str
    experts: ExpertPool | None = None

    def setting(self) -> dict:
        m = self.method
        return {"task": self.task, "seed": self.seed, "method": m.name,
                "params": m.params.to_json(), "model": model_identity(self.model),
                "experts": ({"pool_sha256": self.experts.digest(), "count": len(self.experts)}
                            if m.uses_experts else None),
                "data": self.benchmark.identity(self.task)}


def setting_key(setting: dict) -> str:
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]


def plan(benchmark: Benchmark, tasks: list[str], seeds: list[int], methods: list[Method],
         model: str, experts: ExpertPool | None = None) -> list[Cell]:
    """Every (task, seed, method) cell, checked before any runs."""
    if not tasks or not seeds or not methods:
        raise ValueError("nothing to run: give at least one task, seed and method")
    benchmark.check(tasks)
    for m in methods:
        if m.uses_experts:
            n = getattr(m.params, "n_experts", 1)
            if experts is None or len(experts) < n:
                have = 0 if experts is None else len(experts)
                raise ValueError(f"{m.name} composes {n} experts but {have} were given; pass "
                                 "more experts (--experts / --experts-file) or lower -n")
    return [Cell(t, s, m, benchmark, model, experts) for t in tasks for s in seeds for m in methods]
