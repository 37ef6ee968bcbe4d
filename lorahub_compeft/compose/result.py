"""CompositionResult: the weights composition learnt, and the composed model to use them with."""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorahub_compeft.compose.experts import ExpertHandle
from lorahub_compeft.compose.export import CompactAdapter, compact_adapter, write_composed
from lorahub_compeft.compose.search import SearchOutcome, best_point
from lorahub_compeft.compose.selection import Selection
from lorahub_compeft.compose.session import ScoringSession
from lorahub_compeft.compose.stacks import Stack

log = logging.getLogger(__name__)


@dataclass
class CompositionResult:
    """What composition learnt, plus the composed model to use it with.

    losses: the objective at each step (non-finite ones as measured). timings, in seconds:
    decode (reading/decoding the chosen experts), setup (model load and LoRA injection), and
    over all steps: mix (w @ E into the LoRA buffer), forward (the loss), optimizer (nevergrad's
    ask/tell and the rest of the loop); select (choosing the experts); probe (dtype "auto"'s
    measurement); steps: the evaluations of all restarts (budget x restarts, fewer when the
    patience stop ends a search); forwards and select_forwards: the model forwards of the
    search and of selection's exact scores.
    selection: how the experts were chosen and their scores; restart_losses: each restart's best.
    precision: how the search scored candidates ("float32", "bfloat16", "int8": through
    copies of the base's linear layers in that precision; the composed model itself is fp32,
    or the dtype of the model object passed). precision_measured (dtype "auto"): what the probe
    measured, per precision (predicted linear_ms and forward_ms, the loss at w = 0 and the
    checked forward's ms where run), the one chosen, whether from the cache, its seconds (in
    timings["probe"], not in "setup").
    mix: how w combined the experts ("factors", or "product": then `config` is the rank-N·r
    LoRA's and the model carries it).
    """
    weights: dict[str, float]
    losses: list[float]
    best_loss: float
    zero_loss: float
    nonfinite_steps: int
    timings: dict[str, float]
    experts: list[str]
    optimizer: str = ""
    objective: str = ""
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    stack: Stack | None = field(default=None, repr=False)
    flat: torch.Tensor | None = field(default=None, repr=False)
    config: dict = field(default_factory=dict, repr=False)
    selection: Selection | None = None
    restart_losses: list[float] = field(default_factory=list)
    precision: str = ""
    precision_measured: dict | None = None
    mix: str = "factors"
    start: str | None = "zero"  # where the search started; None: no search (weights uniform)

    @classmethod
    def from_search(cls, outcomes: list[SearchOutcome], zero_loss: float,
                    chosen: list[ExpertHandle], selection: Selection, stack: Stack,
                    session: ScoringSession, lora_config: dict, timings: dict
                    ) -> "CompositionResult":
        """The result of the restarts' searches over `chosen` (the best point, never worse
        than w = 0), its weights applied to the session's model, whose LoRA `lora_config`
        describes."""
        best_w, best_loss = best_point(outcomes, zero_loss)
        names = [h.name for h in chosen]
        measured = session.precision.measured
        probe = measured["seconds"] if measured else 0.0
        timings = dict(timings, setup=timings["setup"] - probe, probe=probe)  # ran in setup
        result = cls(
            weights={name: float(x) for name, x in zip(names, best_w)},
            losses=[x for o in outcomes for x in o.losses], best_loss=best_loss,
            zero_loss=zero_loss, nonfinite_steps=sum(o.nonfinite for o in outcomes),
            timings=timings, experts=names, optimizer=session.config.optimizer,
            objective=session.config.objective, model=session.model, tokenizer=session.tokenizer,
            stack=stack, flat=session.flat, config=lora_config, selection=selection,
            restart_losses=[o.best_loss for o in outcomes],
            precision=session.precision.name_for(session.model), precision_measured=measured,
            mix=session.config.mix,
            start=session.config.start if session.config.weights == "search" else None)
        result.apply_best()
        log.info("composed %d experts: best loss %.4f (no composition %.4f)", len(names),
                 best_loss, zero_loss)
        return result

    def apply_best(self) -> None:
        """Put the learnt mix into the model's LoRA parameters."""
        w = np.array([self.weights[n] for n in self.experts])
        self.stack.mix(w, out=self.flat)

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The composed adapter's tensors under PEFT's saved key names (on the CPU), mixed in
        fp32 whatever the model's dtype."""
        w = np.array([self.weights[n] for n in self.experts])
        mixed = self.stack.mix(w).to(torch.float32)
        return {k: v.clone().cpu() for k, v in self.stack.layout.unflatten(mixed).items()}

    def generate(self, inputs: list[str], max_new_tokens: int = 16, batch_size: int = 32,
                 max_length: int | None = None) -> list[str]:
        """Greedy answers from the composed model."""
        from lorahub_compeft.io.models import generate
        self.apply_best()
        return generate(self.model, self.tokenizer, list(inputs), max_new_tokens, batch_size,
                        max_length)

    def compact_adapter(self, rank: int) -> CompactAdapter:
        """The composed adapter at rank `rank`: each module's update s·B·A truncated by SVD,
        with the relative Frobenius error over all modules (export.py)."""
        return compact_adapter(self.lora_tensors(), self.config, rank)

    def save_adapter(self, directory: str | os.PathLike, force: bool = False,
                     rank: int | None = None) -> Path:
        """A standard PEFT adapter dir that PeftModel.from_pretrained loads: the composed LoRA
        exactly (the first expert's config; with mix "product" rank N·r and lora_alpha such
        that the scale is the experts'), or with `rank` its compact_adapter(rank), whose rank
        and relative error composition.json records ("export")."""
        tensors, config, export = self.lora_tensors(), self.config, {}
        if rank is not None:
            compact = self.compact_adapter(rank)
            tensors, config = compact.tensors, compact.config
            export = {"export": {"rank": rank, "relative_error": compact.relative_error}}
            log.info("rank-%d adapter: relative Frobenius error %.4g", rank,
                     compact.relative_error)
        config = {k: v for k, v in config.items() if k != "modules_to_save"}
        config["inference_mode"] = True
        return write_composed(directory, tensors, config, self.summary() | export, force=force)

    def summary(self) -> dict:
        """What composition chose and learnt, as JSON: experts, weights, losses, selection."""
        return {"experts": self.experts, "weights": self.weights, "best_loss": self.best_loss,
                "zero_loss": self.zero_loss, "restart_losses": self.restart_losses,
                "objective": self.objective, "optimizer": self.optimizer,
                "precision": self.precision, "precision_measured": self.precision_measured,
                "mix": self.mix, "start": self.start,
                "forwards": {k: self.timings.get(k) for k in ("steps", "forwards",
                                                              "select_forwards")},
                "selection": self.selection.to_json() if self.selection else None}

    def merged_model(self):
        """A plain transformers model with the composed LoRA merged into its weights (a copy)."""
        self.apply_best()
        return copy.deepcopy(self.model).merge_and_unload()
