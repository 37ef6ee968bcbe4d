"""Which N of L candidate experts to compose: by few-shot loss, each expert scored alone.

An expert's score is the search's objective at w = 1 for it and 0 for the rest. Scoring all
L exactly costs L forwards (at the flan-t5-large shape with L = 196, about 5 searches), so for
large L a first-order estimate ranks everyone first and only the best `exact_count` are scored:

    loss(e_i) ≈ loss(0) + Σ_m s_m <G_m, B_i A_i>,   G_m = Σ_t δ_t x_tᵀ = D_mᵀ X_m

where, for each adapted module m, X_m holds its inputs (one row per token), D_m the gradient
of the loss at its output (one backward of the base), and s_m its LoRA scaling. The inner
product is Σ_t (D_m B_i)_t · (X_m A_iᵀ)_t: two [T, r] products per module and expert, no
[out, in] matrix ever formed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lorahub_compeft.compose.experts import ExpertHandle
from lorahub_compeft.compose.session import ScoringSession
from lorahub_compeft.compose.stacks import ADAPTER_NAME, Layout, build_stack, saved_key

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """How the composed experts were chosen. scores: each exactly scored candidate's objective
    alone (w = 1); estimates: the first-order estimate of every candidate, when one was made."""
    method: str
    chosen: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    estimate_seconds: float = 0.0  # of `seconds`: the first-order estimate of all candidates

    def to_json(self) -> dict:
        return {"method": self.method, "chosen": self.chosen, "scores": self.scores,
                "estimates": self.estimates, "seconds": self.seconds,
                "estimate_seconds": self.estimate_seconds}

    def handles(self, candidates: list[ExpertHandle]) -> list[ExpertHandle]:
        """The chosen candidates, in the candidates' order."""
        chosen = set(self.chosen)
        return [h for h in candidates if h.name in chosen]


def choose_experts(session: ScoringSession, candidates: list[ExpertHandle]) -> Selection:
    """Which of the candidates to compose (the session's config resolved): with select "loss"
    and more candidates than n_experts, the n_experts lowest alone (select_by_loss, the
    first-order estimate ranking them first unless a custom loss_fn has no gradient to follow);
    else all of them (LoraHub's draw already chose with select "random")."""
    config = session.config
    start = time.perf_counter()
    if len(candidates) > config.n_experts and config.select == "loss":
        estimate = None if session.loss_fn is not None else first_order(
            session.model, session.task_loss, session.layout, session.flat)
        selection = select_by_loss(candidates, config.n_experts, AloneScores(session, candidates),
                                   config.budget, estimate)
    else:
        selection = Selection(config.select if config.select == "random" else "all",
                              [h.name for h in candidates])
    selection.seconds = time.perf_counter() - start
    return selection


def best_alone(session: ScoringSession, chosen: list[ExpertHandle], selection: Selection
               ) -> np.ndarray:
    """The search's start for config.start "best": w = 1 for the chosen expert with the lowest
    score alone, 0 for the others. Chosen experts selection did not score (select random) are
    scored here, one forward each, and their scores added to selection.scores."""
    missing = [h for h in chosen if h.name not in selection.scores]
    if missing:
        began = time.perf_counter()
        selection.scores.update(zip((h.name for h in missing),
                                    AloneScores(session, chosen)(missing)))
        selection.seconds += time.perf_counter() - began
    best = min(range(len(chosen)), key=lambda i: (_finite(selection.scores[chosen[i].name]),
                                                  chosen[i].name))
    start = np.zeros(len(chosen))
    start[best] = 1.0
    return start


@dataclass
class AloneScores:
    """score(handles) for select_by_loss: each expert alone (w = 1 for it, 0 for the other
    candidates) scored with the search's objective, regularizer included: one forward each in
    the model's own LoRA buffer, or K per forward through the search's Scorer over their stack
    (candidates_per_step K > 1)."""
    session: ScoringSession
    candidates: list[ExpertHandle]

    def __post_init__(self):
        self.index = {h.name: i for i, h in enumerate(self.candidates)}

    def __call__(self, handles: list[ExpertHandle]) -> list[float]:
        session = self.session
        if session.config.candidates_per_step > 1:
            stack, _ = build_stack(handles, session.layout, session.device)
            losses = session.scorer(stack).score_candidates(np.eye(len(handles)))
        else:
            losses = [session.loss_alone(h) for h in handles]
        return [loss + session.regularize(self.alone(h)) for loss, h in zip(losses, handles)]

    def alone(self, handle: ExpertHandle) -> np.ndarray:
        w = np.zeros(len(self.candidates))
        w[self.index[handle.name]] = 1.0
        return w


def exact_count(n_candidates: int, n_experts: int, budget: int) -> int:
    """How many candidates are scored exactly (one forward each); the rest are ranked by the
    first-order estimate only. 3/4 of the search's budget in forwards (at least N), so that
    selection costs less than the search it feeds. The estimate is a weak ranker (Spearman
    0.32 against the exact scores on the zoo's held-out tasks), so it only trims large L."""
    return min(n_candidates, max(n_experts, (3 * budget) // 4))


def select_by_loss(candidates: list[ExpertHandle], n_experts: int,
                   score: Callable[[list[ExpertHandle]], list[float]], budget: int,
                   estimate: Callable | None = None) -> Selection:
    """The n_experts candidates with the lowest score, ties by name. `score(handles)` gives
    each expert's objective alone; `estimate(handles) -> list[float]` (first order) ranks all
    candidates first when more than exact_count(...) of them are given, and only the best
    exact_count are scored."""
    exact = exact_count(len(candidates), n_experts, budget)
    estimates: dict[str, float] = {}
    start = time.perf_counter()
    if estimate is not None and exact < len(candidates):
        values = estimate(candidates)
        estimates = {s.name: float(v) for s, v in zip(candidates, values)}
        ranked = sorted(candidates, key=lambda s: (estimates[s.name], s.name))
        to_score = ranked[:exact]
    else:
        to_score = candidates
    estimate_seconds = time.perf_counter() - start
    scores = dict(zip((s.name for s in to_score), score(to_score)))
    order = sorted(scores, key=lambda name: (_finite(scores[name]), name))
    chosen = set(order[:n_experts])
    log.info("selected %s by few-shot loss (%d scored exactly of %d)", sorted(chosen),
             len(scores), len(candidates))
    return Selection("loss", [s.name for s in candidates if s.name in chosen], scores, estimates,
                     estimate_seconds=estimate_seconds)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


# --- the first-order estimate ------------------------------------------------------------------
def first_order(model, loss: Callable[[], torch.Tensor], layout: Layout, flat: torch.Tensor
                ) -> Callable[[list[ExpertHandle]], list[float]] | None:
    """One forward and backward of the model with `flat` = 0; returns estimate(handles) giving
    each expert's loss(0) + Σ_m s_m <G_m, B A>. None when the model's LoRA layers are not
    plain Linear ones (embeddings, convolutions): then every candidate is scored exactly."""
    modules = _lora_linears(model, layout)
    if modules is None:
        return None
    inputs, grads = {}, {}
    # A graph through the frozen model: every embedding's output (the encoder's and decoder's
    # token embeddings may be separate modules) starts one.
    handles = [m.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
               for m in model.modules() if isinstance(m, torch.nn.Embedding)]

    def keep(name):
        def hook(_module, args, out):
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            out.register_hook(lambda g: grads.setdefault(name, []).append(
                g.detach().reshape(-1, g.shape[-1])))
        return hook

    for name, (module, *_rest) in modules.items():
        handles.append(module.register_forward_hook(keep(name)))
    flat.zero_()
    try:
        with torch.enable_grad():
            value = loss()
            value.backward()
    finally:
        for h in handles:
            h.remove()
    base = float(value.detach())
    # Calls and their gradients come in opposite orders (a module used twice, e.g. shared).
    factors = {name: (torch.cat(inputs[name]), torch.cat(grads[name][::-1]))
               for name in modules if name in grads}

    def estimate(handles: list[ExpertHandle]) -> list[float]:
        out = []
        with torch.no_grad():
            for handle in handles:
                tensors = handle.load()
                total = 0.0
                for name, (x, d) in factors.items():
                    _, a_key, b_key, scaling = modules[name]
                    a = tensors[a_key].to(x.device, x.dtype)
                    b = tensors[b_key].to(d.device, d.dtype)
                    total += scaling * float(((x @ a.T) * (d @ b)).sum())
                out.append(base + total)
        return out
    return estimate


def _lora_linears(model, layout: Layout) -> dict | None:
    """{module name: (module, A key, B key, scaling)} for every LoRA layer, or None."""
    keys = set(layout.keys)
    found = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or ADAPTER_NAME not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[ADAPTER_NAME], torch.nn.Linear):
            return None
        a_key = saved_key(f"{name}.lora_A.{ADAPTER_NAME}.weight")
        b_key = saved_key(f"{name}.lora_B.{ADAPTER_NAME}.weight")
        if a_key not in keys or b_key not in keys:
            return None
        found[name] = (module, a_key, b_key, float(module.scaling[ADAPTER_NAME]))
    return found if len(found) * 2 == len(keys) else None
