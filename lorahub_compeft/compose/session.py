"""What composition scores mixes of experts with: the base model (loaded or copied), LoRA
injected into it with its parameters as views of one flat buffer, the examples tokenized once,
and the precision the search runs in (chosen or measured here, probe.py); and the search's
loss, task loss plus regularizer."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lorahub_compeft.config import ComposeConfig
from lorahub_compeft.codecs.ere import lora_scaling
from lorahub_compeft.io.base_models import looks_like_path
from lorahub_compeft.compose.experts import ExpertHandle, base_model_of
from lorahub_compeft.compose.objective import (default_max_length, encoder_batches,
                                               few_shot_loss, task_loss, tokenize_examples)
from lorahub_compeft.compose.precision import LinearCopies, Precision, scoring
from lorahub_compeft.compose.probe import choose
from lorahub_compeft.compose.scoring import Scorer
from lorahub_compeft.compose.stacks import (ADAPTER_NAME, Layout, Stack, bind_flat,
                                            build_product_stack, build_stack, layout_of,
                                            lora_params, product_order, write_expert)


def load_base(model, tokenizer, expert: ExpertHandle, precision: Precision):
    """The base model and its tokenizer: `model` loaded by name or path (None: the base the
    expert records) in precision.dtype (None: the checkpoint's), or a copy of a model object
    sharing its weights (LoRA is injected into the copy: the caller's model is left alone), in
    its own dtype unless precision.convert. A lower precision is never the model's: it is
    copies (precision.py)."""
    from lorahub_compeft.io.models import load_model, load_tokenizer, shared_weights_copy
    if model is None:
        model = base_model_of(expert)
        if looks_like_path(model) and not Path(model).expanduser().exists():
            raise ValueError(f"the experts' base model {model} (their base_model_name_or_path) "
                             "is not here; pass the base with --model (model=)")
    if isinstance(model, (str, os.PathLike)):
        base, loaded_tokenizer = load_model(str(model), precision.dtype)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        base = shared_weights_copy(model)  # the weights are shared, not copied
        if tokenizer is None:
            name = (getattr(model, "name_or_path", None)
                    or getattr(model.config, "_name_or_path", None))
            if not name:
                raise ValueError("pass tokenizer= with a model object")
            tokenizer = load_tokenizer(name)
        if precision.convert:
            base = base.to(precision.dtype)
    return base, tokenizer


def _peft_model(base, config: dict, device):
    from peft import LoraConfig, get_peft_model
    allowed = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
    options = {k: v for k, v in config.items() if k in allowed}
    # Evaluation only: no dropout, plain init (never an init that rewrites the base weights).
    options.update(lora_dropout=0.0, init_lora_weights=True, inference_mode=True)
    options.pop("modules_to_save", None)
    # LoRA in the base's dtype: the fp32 mix is cast to it once per step (not x to fp32 per layer).
    model = get_peft_model(base, LoraConfig(**options), adapter_name=ADAPTER_NAME,
                           autocast_adapter_dtype=False)
    return model.to(device).eval()


def product_config(config: dict, n: int) -> dict:
    """The LoRA config of n experts' product mix (mix="product"): rank n*r, rsLoRA off and
    lora_alpha = s*n*r, so that PEFT's scaling lora_alpha / rank is the experts' own s."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("mix='product' needs one r and lora_alpha for every module, but the "
                         "experts set rank_pattern or alpha_pattern; use mix='factors'")
    rank = n * config["r"]
    alpha = lora_scaling(config) * rank
    return dict(config, r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                use_rslora=False)


@dataclass
class ScoringSession:
    """The PEFT model (its LoRA parameters views of `flat`, laid out by `layout`), the tokenized
    examples, the precision the search runs in (`copies`: the base's linear layers in it, None:
    the model itself) and the objective of a composition (config resolved)."""
    model: Any
    tokenizer: Any
    layout: Layout
    flat: torch.Tensor
    batches: list[dict]
    n_examples: int
    precision: Precision
    copies: LinearCopies | None
    config: ComposeConfig
    device: torch.device
    loss_fn: Callable | None = None
    regularizer: Callable | None = None

    @classmethod
    def open(cls, base, tokenizer, lora_config: dict, examples: list[dict],
             config: ComposeConfig, precision: Precision, device: torch.device,
             loss_fn: Callable | None = None, regularizer: Callable | None = None
             ) -> "ScoringSession":
        """LoRA of `lora_config` injected into `base` (on `device`), the examples tokenized,
        the precision chosen (dtype "auto": measured at w = 0, probe.py)."""
        model = _peft_model(base, lora_config, device)
        params = lora_params(model)
        layout = layout_of(params)
        flat = bind_flat(params, layout, device)  # zero: w = 0
        batches = encoder_batches(model, tokenize_examples(
            examples, tokenizer, bool(model.config.is_encoder_decoder),
            config.max_length or default_max_length(tokenizer, model),
            config.batch_size or len(examples), device))

        def loss_at(copies):
            with scoring(copies):
                return few_shot_loss(model, batches, len(examples), config.objective, loss_fn)
        precision, copies = choose(precision, model, loss_at, batches,
                                   config.candidates_per_step, device)
        return cls(model, tokenizer, layout, flat, batches, len(examples), precision, copies,
                   config, device, loss_fn, regularizer)

    def for_product(self, lora_config: dict) -> "ScoringSession":
        """The session with LoRA re-injected as `lora_config` (product_config's rank N*r) into
        the same base (no second copy of its weights; the low-precision copies kept), its parameters
        views of a new flat buffer with every A first (product_order)."""
        model = _peft_model(self.model.unload(), lora_config, self.device)
        copies = (LinearCopies(model, self.copies.low, reuse=self.copies)
                  if self.copies is not None else None)
        params = product_order(lora_params(model))
        layout = layout_of(params)
        return dataclasses.replace(self, model=model, layout=layout, copies=copies,
                                   flat=bind_flat(params, layout, self.device))

    def mixing(self, chosen: list[ExpertHandle]) -> tuple["ScoringSession", Stack, dict, float]:
        """What the search mixes the chosen experts with, by config.mix: "factors" in this
        session's rank-r LoRA (a stack of the experts' factors); "product" in a rank-N*r LoRA
        re-injected for them (for_product; A written once, a step rescales the B blocks).
        Returns the session to score with, the stack, the composed adapter's LoRA config and
        the seconds decoding took."""
        if self.config.mix == "factors":
            stack, seconds = build_stack(chosen, self.layout, self.device)
            return self, stack, dict(chosen[0].config), seconds
        lora_config = product_config(chosen[0].config, len(chosen))
        session = self.for_product(lora_config)
        stack, seconds = build_product_stack(chosen, session.layout, lora_scaling(lora_config),
                                             self.device)
        stack.bind(session.flat)
        return session, stack, lora_config, seconds

    def regularize(self, w: np.ndarray) -> float:
        """The regularizer: l1 * mean|w| unless one was given."""
        if self.regularizer is not None:
            return float(self.regularizer(w))
        return self.config.l1 * float(np.mean(np.abs(w)))

    def scorer(self, stack: Stack) -> Scorer:
        """The task loss of mixes of `stack`'s experts, candidates_per_step per forward."""
        return Scorer(self.model, stack, self.flat, self.batches, self.n_examples,
                      self.config.objective, self.loss_fn, self.config.candidates_per_step,
                      self.copies)

    def search_loss(self, stack: Stack) -> "SearchLoss":
        return SearchLoss(self.scorer(stack), self.regularize, self.precision.zero_loss)

    def loss_alone(self, handle: ExpertHandle) -> float:
        """The task loss of one expert alone, written into the model's own LoRA buffer (left
        at zero after)."""
        write_expert(self.flat, handle, handle.load(), self.layout)
        with scoring(self.copies):
            loss = few_shot_loss(self.model, self.batches, self.n_examples,
                                 self.config.objective, self.loss_fn)
        self.flat.zero_()
        return loss

    def task_loss(self) -> torch.Tensor:
        """The objective's task loss at the model's current LoRA (differentiable with grad)."""
        return task_loss(self.model, self.batches, self.n_examples, self.config.objective)


@dataclass
class SearchLoss:
    """What the search minimises, for K candidates at once: each one's task loss plus the
    regularizer of its w."""
    scorer: Scorer
    regularize: Callable[[np.ndarray], float]
    zero_task_loss: float | None = None  # measured already (Precision.zero_loss)

    def __call__(self, ws: np.ndarray) -> list[float]:
        return [loss + self.regularize(w) for loss, w in zip(self.scorer.score_candidates(ws), ws)]

    def at_zero(self, n: int) -> float:
        """The loss of no composition (w = 0), from the probe's forward where it ran one in
        this precision; the scorer's timings then restart, so that they count the search's
        steps only."""
        if self.zero_task_loss is not None:
            return self.zero_task_loss + self.regularize(np.zeros(n))
        loss = self(np.zeros((1, n)))[0]
        self.scorer.reset_timings()
        return loss
