"""The LoraHub composer: learn a weighted mix of N LoRA experts from a few examples.

    experts ──► choose N (expert_sources.py: LoraHub's random draw; selection.py: by
                few-shot loss) ──► decode each once into a stack (stacks.py)
    each step:  w (search.py, nevergrad) ──► flat ← mix(w), in place ──► few-shot loss
                (objective.py) + regularizer ──► back to the optimizer
    (restarts: R searches from different starts, the lowest few-shot loss kept; w = 0 counts)
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

from lorahub_compeft.io.base_models import looks_like_path
from lorahub_compeft.compose.experts import (ExpertSource, base_model_of, candidate_sources,
                                             choose_sources, validate_experts)
from lorahub_compeft.compose.scoring import Int8Linears, Scorer, resolve_precision, scoring
from lorahub_compeft.compose.objective import (OBJECTIVES, default_max_length, encoder_batches,
                                               few_shot_loss, task_loss, tokenize_examples,
                                               validate_examples)
from lorahub_compeft.compose.result import CompositionResult
from lorahub_compeft.compose.search import optimizer_class, restart_start, search
from lorahub_compeft.compose.selection import (SELECTIONS, Selection, fill, first_order,
                                               select_by_loss)
from lorahub_compeft.compose.stacks import (ADAPTER_NAME, bind_flat, build_stack, layout_of,
                                            lora_params)

log = logging.getLogger(__name__)

# N when experts are chosen by loss (chosen on the zoo's validation seeds, README "Choosing
# experts"), and LoraHub's N for its random draw.
DEFAULT_N = {"loss": 3, "random": 20}


# --- the base model ------------------------------------------------------------------------------
def _load_base(model, tokenizer, sources: list[ExpertSource], dtype):
    from transformers import AutoTokenizer

    from lorahub_compeft.io.models import load_model
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
            n_experts: int | None = None, select: str | None = None, restarts: int = 1,
            seed: int = 1, budget: int = 40, optimizer: str | None = None,
            objective: str = "paper", loss_fn: Callable | None = None,
            regularizer: Callable | None = None, l1: float = 0.05, bounds: float = 1.5,
            batch_size: int | None = None, max_length: int | None = None, device=None,
            dtype="auto", candidates_per_step: int = 1, progress: bool = True
            ) -> CompositionResult:
    """Learn weights w for N LoRA experts so that the mix fits `examples` (LoraHub).

    experts: an ExpertLibrary (all its experts, or the given `names`), or a list of
      CompressedExperts, expert files (.safetensors), PEFT dirs, Hub ids or Adapters.
    select: how N = n_experts of them are chosen when more are given. "loss" (the default):
      each candidate alone (w = 1, the rest 0) is scored with the search's objective and the N
      lowest are kept, ties by name (large libraries: a first-order estimate ranks all, the
      best 3/4 budget are scored exactly; see selection.py); result.selection records the scores.
      "random": LoraHub's draw (a library's sample(n, seed); a list's, with the same sampler).
      n_experts defaults to DEFAULT_N[select]. Only the chosen experts are put in the stack.
    restarts: R searches over the same experts, the first from w = 0, the others from seeded
      random starts, run in lockstep; the one with the lowest few-shot loss is kept (w = 0
      itself included).
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
    dtype: "auto" (bf16 where the device computes it natively; else, on a CPU and for a model
      of t5-small's size or more, fp32 with the candidates scored through int8 copies of the
      base's linear layers; else fp32: forward.py), "bf16", "fp32", "int8", a torch.dtype, or
      None for the model's own; the experts are always mixed in fp32, the loss computed in
      fp32, and the returned model is never int8 (result.precision says what the search ran).
    candidates_per_step: K candidates scored in one forward (the examples repeated K times,
      LoRA added by batched matmuls), shared by the R restarts: each is asked for
      max(1, K // R) candidates per round. With K <= R every search stays sequential, so
      restarts=K, candidates_per_step=K gives R searches for about the forwards of one; with
      K > R a search gets several candidates at once (nevergrad's num_workers), for which
      Shiwa/NGOpt pick CMA instead of COBYLA and lose exact match at LoraHub's budgets.
    Same inputs and seed give the same weights.
    """
    # 1. everything that can be checked without a model
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    examples = validate_examples(examples)
    if select not in (None, *SELECTIONS):
        raise ValueError(f"unknown select {select!r}; use one of {SELECTIONS}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive number of searches, got {restarts!r}")
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
    precision = resolve_precision(dtype, device)
    from lorahub_compeft.store.library import ExpertLibrary
    select = select or "loss"
    n_experts = DEFAULT_N[select] if n_experts is None else n_experts
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be at least 1, got {n_experts!r}")
    if select == "random":
        candidates = choose_sources(experts, names, n_experts, seed)
    else:
        candidates = candidate_sources(experts, names)
        if isinstance(experts, ExpertLibrary) and names is None and n_experts > len(candidates):
            raise ValueError(f"cannot sample {n_experts} experts from a library of "
                             f"{len(candidates)}; lower n_experts or add experts")
    named = model if isinstance(model, (str, os.PathLike)) or model is None else \
        getattr(model, "name_or_path", None)
    validate_experts(candidates, str(named) if named else None)

    # 2. model, experts, examples
    setup_start = time.perf_counter()
    base, tokenizer = _load_base(model, tokenizer, candidates, precision.dtype)
    peft_model = _peft_model(base, candidates[0].config, device)
    precision = precision.for_model(peft_model)
    int8 = Int8Linears(peft_model) if precision.int8 else None
    params = lora_params(peft_model)
    layout = layout_of(params)
    flat = bind_flat(params, layout, device)
    batches = encoder_batches(peft_model, tokenize_examples(
        examples, tokenizer, bool(peft_model.config.is_encoder_decoder),
        max_length or default_max_length(tokenizer, peft_model), batch_size or len(examples),
        device))

    def regularize(w: np.ndarray) -> float:
        return float(regularizer(w)) if regularizer is not None else l1 * float(np.mean(np.abs(w)))

    # 3. which experts (the model is needed to score them)
    select_start = time.perf_counter()
    if len(candidates) > n_experts and select == "loss":
        index = {s.name: i for i, s in enumerate(candidates)}

        def alone(i: int) -> np.ndarray:
            w = np.zeros(len(candidates))
            w[i] = 1.0
            return w

        def one_per_forward(chosen: list[ExpertSource]) -> list[float]:
            """Each expert alone in the model's own LoRA buffer, one forward each."""
            scores = []
            for source in chosen:
                fill(flat, source, layout)
                with scoring(int8):
                    loss = few_shot_loss(peft_model, batches, len(examples), objective, loss_fn)
                scores.append(loss + regularize(alone(index[source.name])))
            flat.zero_()
            return scores

        def k_per_forward(chosen: list[ExpertSource]) -> list[float]:
            """K experts per forward, through the search's own Scorer over their stack."""
            stack, _ = build_stack(chosen, layout, device)
            losses = Scorer(peft_model, stack, flat, batches, len(examples), objective,
                            per_forward=candidates_per_step, int8=int8
                            ).score_candidates(np.eye(len(chosen)))
            return [x + regularize(alone(index[s.name])) for x, s in zip(losses, chosen)]
        estimate = None if loss_fn is not None else first_order(
            peft_model, lambda: task_loss(peft_model, batches, len(examples), objective),
            layout, flat)
        selection = select_by_loss(candidates, n_experts, k_per_forward if candidates_per_step > 1
                                   else one_per_forward, budget, estimate)
    else:
        selection = Selection(select if select == "random" else "all",
                              [s.name for s in candidates])
    selection.seconds = time.perf_counter() - select_start
    chosen = set(selection.chosen)
    sources = [s for s in candidates if s.name in chosen]
    names = [s.name for s in sources]
    stack, decode_s = build_stack(sources, layout, device)
    scorer = Scorer(peft_model, stack, flat, batches, len(examples), objective, loss_fn,
                    candidates_per_step, int8)

    # 4. the search
    def evaluate(ws: np.ndarray) -> list[float]:
        return [loss + regularize(w) for loss, w in zip(scorer.score_candidates(ws), ws)]

    n = len(sources)
    setup_s = time.perf_counter() - setup_start - decode_s - selection.seconds
    zero_loss = evaluate(np.zeros((1, n)))[0]
    scorer.reset_timings()  # the steps' totals only
    loop_start = time.perf_counter()
    seeds = [seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
             for r in range(restarts)]
    outcomes = search(evaluate, n, budget, optimizer, bounds, seeds, progress,
                      candidates_per_step, [restart_start(n, seed, r, bounds) for r in range(restarts)])
    loop_s = time.perf_counter() - loop_start
    outcome = min(outcomes, key=lambda o: o.best_loss)  # the first on ties
    best_w, best_loss = outcome.best_w, outcome.best_loss
    if not math.isfinite(best_loss):
        warnings.warn("every step's loss was non-finite; returning the zero composition",
                      stacklevel=2)
    if not best_loss < zero_loss:  # w = 0 is a candidate: never worse than no composition
        best_w, best_loss = np.zeros(n), zero_loss

    result = CompositionResult(
        weights={name: float(x) for name, x in zip(names, best_w)},
        losses=[x for o in outcomes for x in o.losses], best_loss=best_loss, zero_loss=zero_loss,
        nonfinite_steps=sum(o.nonfinite for o in outcomes),
        timings={"decode": decode_s, "mix": scorer.timings["mix"],
                 "forward": scorer.timings["forward"],
                 "optimizer": loop_s - scorer.timings["mix"] - scorer.timings["forward"],
                 "setup": setup_s, "select": selection.seconds, "steps": budget * restarts,
                 "forwards": scorer.timings["forwards"]},
        experts=names, optimizer=optimizer, objective=objective, model=peft_model,
        tokenizer=tokenizer, stack=stack, flat=flat, config=dict(sources[0].config),
        selection=selection, restart_losses=[o.best_loss for o in outcomes],
        precision=precision.name)
    result._apply_best()
    log.info("composed %d experts: best loss %.4f (no composition %.4f)", n, best_loss, zero_loss)
    return result
