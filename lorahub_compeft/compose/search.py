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
STOP_TOLERANCE = 1e-3  # an improvement of the best loss by less than this fraction is none


@dataclass
class SearchOutcome:
    best_w: np.ndarray
    best_loss: float   # inf when no step was finite
    losses: list[float]
    nonfinite: int
    fixed: bool = False  # a given point, not searched: the result whatever its loss
    stale: int = 0       # steps since the best loss last improved by STOP_TOLERANCE

    def record(self, value: float, w: np.ndarray) -> None:
        """One evaluated step (a non-finite value counted, never kept as the best)."""
        self.losses.append(value)
        if not math.isfinite(value):
            self.nonfinite += 1
            self.stale += 1
            return
        improved = value < self.best_loss - STOP_TOLERANCE * abs(self.best_loss)
        self.stale = 0 if improved or not math.isfinite(self.best_loss) else self.stale + 1
        if value < self.best_loss:
            self.best_loss, self.best_w = value, w.copy()

    def done(self, budget: int, patience: int | None, n: int) -> bool:
        """Budget spent, or converged: `patience` steps without improvement once COBYLA's
        initial simplex (n + 1 points around the start) has been evaluated."""
        return len(self.losses) >= budget or (
            patience is not None and len(self.losses) > n and self.stale >= patience)


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


def restart_seed(seed: int, restart: int) -> int:
    """The optimizer's seed in restart r: the seed itself for the first, then one derived
    from (seed, r)."""
    if restart == 0:
        return seed
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def search_restarts(evaluate: Callable[[np.ndarray], list[float]], n: int, config,
                    progress: bool = True, first_start: np.ndarray | None = None
                    ) -> list[SearchOutcome]:
    """config.restarts searches (config: a resolved ComposeConfig) over n weights, restart r
    from restart_start(r) (restart 0 from `first_start` where given) with restart_seed(r),
    their candidates sharing forwards; with config.weights "uniform", no search: w = 1/n,
    scored once."""
    if config.weights == "uniform":
        return [fixed_point(evaluate, np.full(n, 1.0 / n))]
    restarts = range(config.restarts)
    starts = [restart_start(n, config.seed, r, config.bounds) for r in restarts]
    if first_start is not None:
        starts[0] = np.asarray(first_start, dtype=np.float64)
    return search(evaluate, n, config.budget, config.optimizer, config.bounds,
                  [restart_seed(config.seed, r) for r in restarts], progress,
                  config.candidates_per_step, starts, config.patience)


def fixed_point(evaluate: Callable[[np.ndarray], list[float]], w: np.ndarray) -> SearchOutcome:
    """A given w, scored once, kept as the result (no search)."""
    loss = evaluate(w[None])[0]
    finite = math.isfinite(loss)
    return SearchOutcome(w, loss if finite else math.inf, [loss], int(not finite), fixed=True)


def best_point(outcomes: list[SearchOutcome], zero_loss: float) -> tuple[np.ndarray, float]:
    """The lowest loss of all restarts (the first on ties), or w = 0 when no step beat it:
    composition is never worse than no composition. A fixed point is kept as given."""
    outcome = min(outcomes, key=lambda o: o.best_loss)
    if not math.isfinite(outcome.best_loss):
        warnings.warn("every step's loss was non-finite; returning the "
                      + ("given weights" if outcome.fixed else "zero composition"),
                      stacklevel=4)  # at compose()'s caller (via CompositionResult.from_search)
    if outcome.fixed:
        return outcome.best_w, outcome.best_loss
    if not outcome.best_loss < zero_loss:
        return np.zeros(len(outcome.best_w)), zero_loss
    return outcome.best_w, outcome.best_loss


def search(evaluate: Callable[[np.ndarray], list[float]], n: int, budget: int, optimizer: str,
           bounds: float, seeds: list[int], progress: bool = True, candidates_per_step: int = 1,
           starts: list[np.ndarray] | None = None, patience: int | None = None
           ) -> list[SearchOutcome]:
    """Minimise the loss over w in [-bounds, bounds]^n with R = len(seeds) independent
    searches of `budget` evaluations each, search r from starts[r] (default w = 0); with
    `patience`, a search stops sooner once its best loss has gone that many steps without
    improving by STOP_TOLERANCE (SearchOutcome.done).

    The searches run in lockstep so that their candidates share forwards: each round, every
    search is asked for max(1, K // R) candidates (nevergrad's num_workers; K =
    candidates_per_step) before it is told any loss, and evaluate(W) gets all of them as the
    rows of W and returns their losses. With R >= K every search stays sequential (COBYLA
    where Shiwa/NGOpt pick it) and K forwards' worth of candidates go through each forward."""
    import nevergrad as ng
    from tqdm.auto import tqdm

    starts = starts if starts is not None else [np.zeros(n)] * len(seeds)
    per_search = max(1, candidates_per_step // len(seeds))
    optimizers = []
    for seed, start in zip(seeds, starts):
        parametrization = ng.p.Array(init=np.asarray(start, dtype=np.float64), lower=-bounds,
                                     upper=bounds)
        parametrization.random_state = np.random.RandomState(seed)
        optimizers.append(optimizer_class(optimizer)(parametrization=parametrization,
                                                     budget=budget, num_workers=per_search))
    outcomes = [SearchOutcome(np.zeros(n), math.inf, [], 0) for _ in seeds]
    with warnings.catch_warnings():
        # scipy's COBYLA (which nevergrad picks for LoraHub's sizes) warns about the
        # tolerances nevergrad hands it on every search; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"COBYLA: Invalid (RHOEND|MAXFUN)",
                                category=UserWarning)
        bar = tqdm(total=budget * len(seeds), desc="composing", unit="step",
                   disable=not progress)
        while True:
            live = [(opt, out) for opt, out in zip(optimizers, outcomes)
                    if not out.done(budget, patience, n)]
            if not live:
                break
            asked = [(opt, out, opt.ask()) for opt, out in live
                     for _ in range(min(per_search, budget - len(out.losses)))]
            ws = np.stack([np.asarray(c.value, dtype=np.float64) for _, _, c in asked])
            for (opt, out, candidate), w, value in zip(asked, ws, evaluate(ws)):
                out.record(value, w)
                opt.tell(candidate, value if math.isfinite(value) else NONFINITE_PENALTY)
            bar.update(len(asked))
            bar.set_postfix(best=f"{min(o.best_loss for o in outcomes):.4f}")
    bar.close()
    return outcomes
