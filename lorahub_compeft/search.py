"""The gradient-free search over the experts' weights w, with nevergrad.

LoraHub starts every weight at 0 and bounds it to [-1.5, 1.5]; each evaluation is the
few-shot loss of the mix plus a regularizer. A non-finite loss is told to the optimizer as a
large penalty and counted, never kept as the best point.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

NONFINITE_PENALTY = 1e6


@dataclass
class SearchOutcome:
    best_w: np.ndarray
    best_loss: float   # inf when no step was finite
    losses: list[float]
    nonfinite: int


def optimizer_class(name: str):
    import nevergrad as ng
    cls = ng.optimizers.registry.get(name) if isinstance(name, str) else None
    if cls is None:
        common = ["Shiwa", "NGOpt", "CMA", "OnePlusOne", "TwoPointsDE", "PSO", "RandomSearch"]
        raise ValueError(f"unknown nevergrad optimizer {name!r}; try one of {', '.join(common)} "
                         f"({len(ng.optimizers.registry)} in nevergrad.optimizers.registry)")
    return cls


def restart_start(n: int, seed: int, restart: int, bounds: float) -> np.ndarray:
    """Where restart r starts: w = 0 for the first (LoraHub's start), then a point drawn
    uniformly in [-bounds/3, bounds/3]^n from (seed, r). Different starts, not only different
    optimizer seeds: nevergrad 1.0.12's Shiwa/NGOpt run COBYLA on LoraHub's problem sizes,
    which is deterministic from its start, so a new seed alone repeats the same search."""
    if restart == 0:
        return np.zeros(n)
    rng = np.random.default_rng([seed, restart])
    return rng.uniform(-bounds / 3, bounds / 3, size=n)


def search(evaluate: Callable[[np.ndarray], list[float]], n: int, budget: int, optimizer: str,
           bounds: float, seed: int, progress: bool = True, candidates_per_step: int = 1,
           start: np.ndarray | None = None) -> SearchOutcome:
    """Minimise the loss over w in [-bounds, bounds]^n from `start` (default w = 0) with
    `budget` evaluations.

    evaluate(W) gets K candidates as the rows of W [K, n] and returns their K losses; the
    optimizer is asked for K = candidates_per_step of them before it is told any loss
    (nevergrad's num_workers=K), the last round fewer if K does not divide the budget."""
    import nevergrad as ng
    from tqdm.auto import tqdm

    k = candidates_per_step
    init = np.zeros(n) if start is None else np.asarray(start, dtype=np.float64)
    parametrization = ng.p.Array(init=init, lower=-bounds, upper=bounds)
    parametrization.random_state = np.random.RandomState(seed)
    opt = optimizer_class(optimizer)(parametrization=parametrization, budget=budget, num_workers=k)
    losses: list[float] = []
    nonfinite = 0
    best_loss, best_w = math.inf, np.zeros(n)
    with warnings.catch_warnings():
        # scipy's COBYLA (which nevergrad picks for LoraHub's sizes) warns about the
        # tolerances nevergrad hands it on every search; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"COBYLA: Invalid (RHOEND|MAXFUN)",
                                category=UserWarning)
        bar = tqdm(total=budget, desc="composing", unit="step", disable=not progress)
        while len(losses) < budget:
            asked = [opt.ask() for _ in range(min(k, budget - len(losses)))]
            ws = np.stack([np.asarray(c.value, dtype=np.float64) for c in asked])
            for candidate, w, value in zip(asked, ws, evaluate(ws)):
                losses.append(value)
                if not math.isfinite(value):
                    nonfinite += 1
                    opt.tell(candidate, NONFINITE_PENALTY)
                    continue
                opt.tell(candidate, value)
                if value < best_loss:
                    best_loss, best_w = value, w.copy()
            bar.update(len(asked))
            bar.set_postfix(best=f"{best_loss:.4f}")
    bar.close()
    return SearchOutcome(best_w, best_loss, losses, nonfinite)
