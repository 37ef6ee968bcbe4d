"""The LoraHub composer: learn a weighted mix of N LoRA experts from a few examples.

    experts ──► choose N (expert_sources.py) ──► decode each once into a stack (stacks.py)
    each step:  w (search.py, nevergrad) ──► flat ← mix(w), in place ──► few-shot loss
                (objective.py) + regularizer ──► back to the optimizer
    ──► CompositionResult (result.py): the best w, the composed model, the adapter to save

`compose()` is the one public entry; the modules named above hold one step each.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .base_models import looks_like_path
from .forward import Scorer, resolve_dtype
from .objective import OBJECTIVES, default_max_length, tokenize_examples, validate_examples
from .result import CompositionResult
from .search import optimizer_class, search
from .expert_sources import ExpertSource, base_model_of, choose_sources, validate_experts
from .stacks import ADAPTER_NAME, bind_flat, build_stack, layout_of, lora_params

log = logging.getLogger(__name__)

# --- the base model ------------------------------------------------------------------------------
def _load_base(model, tokenizer, sources: list[ExpertSource], dtype):
    from transformers import AutoTokenizer

    from .evaluate import load_model
    if model is None:
        model = base_model_of(sources[0])
        if looks_like_path(model) and not Path(model).expanduser().exists():
            raise ValueError(f"the experts' base model {model} (their base_model_name_or_path) "
                             "is not here; pass the base with --model (model=)")
    if isinstance(model, (str, os.PathLike)):
        base, loaded_tokenizer = load_model(str(model), dtype)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        base = copy.deepcopy(model)  # LoRA layers are injected: leave the caller's model alone
        if tokenizer is None:
            name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if not name:
                raise ValueError("pass tokenizer= with a model object")
            tokenizer = AutoTokenizer.from_pretrained(name)
    if dtype is not None:
        base = base.to(dtype)
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


# --- compose -----------------------------------------------------------------------------------
def compose(experts, examples, model=None, *, names: list[str] | None = None, tokenizer=None,
            n_experts: int = 20, seed: int = 1, budget: int = 40, optimizer: str | None = None,
            objective: str = "paper", loss_fn: Callable | None = None,
            regularizer: Callable | None = None, l1: float = 0.05, bounds: float = 1.5,
            batch_size: int | None = None, max_length: int | None = None, device=None,
            dtype="auto", candidates_per_step: int = 1, progress: bool = True
            ) -> CompositionResult:
    """Learn weights w for N LoRA experts so that the mix fits `examples` (LoraHub).

    experts: an ExpertLibrary (n_experts names sampled with seed, or the given `names`), or a
      list of CompressedExperts, expert files (.safetensors), PEFT dirs, Hub ids or Adapters;
      a longer list than n_experts is sampled with random.Random(seed). Only the chosen experts
      are decoded, once each.
    examples: [{"input": str, "target": str}, ...].
    model: a transformers model (copied, then wrapped), a name/path, or None for the experts'
      base_model_name_or_path. Pass tokenizer= with a model object (else it is loaded by name).
    objective: "paper" -- mean cross-entropy over all target tokens of all examples
      + l1 * mean|w|, optimized by Shiwa. "lorahub" -- the released LoraHub code: the sum over
      batches of each batch's mean token loss, divided by the number of examples, + l1 * mean|w|,
      optimized by NGOpt unless `optimizer` is given. With one batch the two differ only by the
      1/len(examples) factor, which weakens the loss against the L1 term.
    loss_fn(model, batch) -> float replaces the loss (averaged over batches, weighted by batch
      size); regularizer(w: np.ndarray) -> float replaces l1 * mean|w|.
    The returned weights are the best evaluated point (w ∈ [-bounds, bounds], start at 0); a
    non-finite loss is told to the optimizer as a 1e6 penalty and counted in nonfinite_steps.
    dtype: "auto" (bf16 where the device computes it natively, else fp32: forward.py), "bf16",
      "fp32", a torch.dtype, or None for the model's own; the experts are always mixed in fp32
      and the loss computed in fp32.
    candidates_per_step: K candidates asked of the optimizer and scored in one forward (the
      examples repeated K times, LoRA added by batched matmuls); worth it where one forward of
      the few examples leaves the device idle (GPUs), not on a CPU. With K > 1 nevergrad's
      Shiwa/NGOpt pick CMA instead of COBYLA, which needs far more than 40 evaluations.
    Same inputs and seed give the same weights.
    """
    # 1. everything that can be checked without a model
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    examples = validate_examples(examples)
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of evaluations, got {budget!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    optimizer = optimizer or ("NGOpt" if objective == "lorahub" else "Shiwa")
    optimizer_class(optimizer)  # an unknown name fails before any model is loaded
    if not isinstance(candidates_per_step, int) or candidates_per_step < 1:
        raise ValueError(f"candidates_per_step must be a positive integer, got "
                         f"{candidates_per_step!r}")
    if candidates_per_step > 1 and loss_fn is not None:
        raise ValueError("loss_fn scores one model at a time; use candidates_per_step=1 with it")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    sources = choose_sources(experts, names, n_experts, seed)
    named = model if isinstance(model, (str, os.PathLike)) or model is None else \
        getattr(model, "name_or_path", None)
    validate_experts(sources, str(named) if named else None)
    names = [s.name for s in sources]

    # 2. model, experts, examples
    setup_start = time.perf_counter()
    base, tokenizer = _load_base(model, tokenizer, sources, dtype)
    peft_model = _peft_model(base, sources[0].config, device)
    params = lora_params(peft_model)
    layout = layout_of(params)
    stack, decode_s = build_stack(sources, layout, device)
    flat = bind_flat(params, layout, device)
    batches = tokenize_examples(examples, tokenizer, bool(peft_model.config.is_encoder_decoder),
                                max_length or default_max_length(tokenizer, peft_model),
                                batch_size or len(examples), device)
    scorer = Scorer(peft_model, stack, flat, batches, len(examples), objective, loss_fn,
                    candidates_per_step)

    # 3. the search
    def evaluate(ws: np.ndarray) -> list[float]:
        reg = [float(regularizer(w)) if regularizer is not None else l1 * float(np.mean(np.abs(w)))
               for w in ws]
        return [loss + r for loss, r in zip(scorer.score_candidates(ws), reg)]

    n = len(sources)
    setup_s = time.perf_counter() - setup_start - decode_s
    zero_loss = evaluate(np.zeros((1, n)))[0]
    scorer.reset_timings()  # the steps' totals only
    loop_start = time.perf_counter()
    outcome = search(evaluate, n, budget, optimizer, bounds, seed, progress, candidates_per_step)
    loop_s = time.perf_counter() - loop_start
    best_loss = outcome.best_loss
    if not math.isfinite(best_loss):
        warnings.warn("every step's loss was non-finite; returning the zero composition",
                      stacklevel=2)
        best_loss = zero_loss

    result = CompositionResult(
        weights={name: float(x) for name, x in zip(names, outcome.best_w)}, losses=outcome.losses,
        best_loss=best_loss, zero_loss=zero_loss, nonfinite_steps=outcome.nonfinite,
        timings={"decode": decode_s, "mix": scorer.timings["mix"],
                 "forward": scorer.timings["forward"],
                 "optimizer": loop_s - scorer.timings["mix"] - scorer.timings["forward"],
                 "setup": setup_s, "steps": budget,
                 "forwards": math.ceil(budget / candidates_per_step)},
        experts=names, optimizer=optimizer, objective=objective, model=peft_model,
        tokenizer=tokenizer, stack=stack, flat=flat, config=dict(sources[0].config))
    result._apply_best()
    log.info("composed %d experts: best loss %.4f (no composition %.4f)", n, best_loss, zero_loss)
    return result
