"""The LoraHub composer: learn a weighted mix of N LoRA experts from a few examples.

    experts ──► handles, checked to fit together (experts.py; LoraHub's random draw there)
            ──► the scoring session: base + LoRA as one flat buffer, examples tokenized
                (session.py) ──► choose N by few-shot loss (selection.py) ──► decode each
                once into a stack (stacks.py; mix "product": the LoRA re-injected at rank
                N·r first, A = [A_1; …; A_N] written once)
    each step:  w (search.py, nevergrad) ──► flat ← mix(w), in place ──► few-shot loss
                (objective.py, scoring.py) + regularizer ──► back to the optimizer
    (restarts: R searches from different starts, the lowest few-shot loss kept; w = 0 counts)
    ──► CompositionResult (result.py): the best w, the composed model, the adapter to save

`compose()` is the one public entry and reads as the algorithm; its settings are
config.ComposeConfig, and the modules named above hold one step each.
"""
from __future__ import annotations

from typing import Callable

from lorahub_compeft.config import ComposeConfig, replace
from lorahub_compeft.compose.experts import composition_candidates
from lorahub_compeft.compose.objective import validate_examples
from lorahub_compeft.compose.result import CompositionResult
from lorahub_compeft.compose.precision import pick_device, resolve_precision
from lorahub_compeft.compose.scoring import check_loss_fn
from lorahub_compeft.compose.search import optimizer_class, search_restarts
from lorahub_compeft.compose.selection import best_alone, choose_experts
from lorahub_compeft.compose.session import ScoringSession, load_base, product_config
from lorahub_compeft.compose.timing import Stopwatch
from lorahub_compeft.io.threads import torch_threads


def compose(experts, examples, model=None, *, config: ComposeConfig | None = None,
            tokenizer=None, names: list[str] | None = None, loss_fn: Callable | None = None,
            regularizer: Callable | None = None, device=None, progress: bool = True,
            **options) -> CompositionResult:
    """Learn weights w for N LoRA experts so that the mix fits `examples` (LoraHub).

    experts: an ExpertLibrary (all its experts, or the given `names`), or a list of
      CompressedExperts, expert files (.safetensors), PEFT dirs, Hub ids or Adapters.
    examples: [{"input": str, "target": str}, ...].
    model: a transformers model (copied, then wrapped), a name/path, or None for the experts'
      base_model_name_or_path. Pass tokenizer= with a model object (else it is loaded by name).
    config: a ComposeConfig (default ComposeConfig(); config.PAPER_COMPOSE is LoraHub's
      protocol); keyword `options` override its fields (compose(..., budget=10)), and an
      unknown one is an error. Its fields, in short:
      select: how N = n_experts of the experts are chosen when more are given. "loss" (the
        default): each candidate alone (w = 1, the rest 0) is scored with the search's
        objective and the N lowest are kept, ties by name (large libraries: a first-order
        estimate ranks all, the best 3/4 budget are scored exactly; see selection.py);
        result.selection records the scores. "random": LoraHub's draw (a library's
        sample(n, seed); a list's, with the same sampler). n_experts defaults to
        DEFAULT_N[select]. Only the chosen experts are put in the stack.
      restarts: R searches over the same experts, the first from `start`, the others from seeded
        random starts, run in lockstep; the one with the lowest few-shot loss is kept (w = 0
        itself included).
      objective: "paper" -- mean cross-entropy over all target tokens of all examples
        + l1 * mean|w|, optimized by Shiwa. "lorahub" -- the released LoraHub code: the sum
        over batches of each batch's mean token loss, divided by the number of examples,
        + l1 * mean|w|, optimized by NGOpt unless `optimizer` is given. With one batch the two
        differ only by the 1/len(examples) factor, which weakens the loss against the L1 term.
      bounds: w ∈ [-bounds, bounds]; restart 0 starts where `start` says.
      budget: evaluations per search; "auto" (the default) gives N experts
        config.auto_budget(N) and a patience stop (a search ends once its best loss has gone
        `patience` steps without improving by 0.1%); a number runs exactly that many steps
        unless `patience` is given (PAPER_COMPOSE: 40). Selection's exact scores are 3/4 of the
        resolved budget. result.timings counts the forwards: "forwards" (the search's) and
        "select_forwards".
      threads: torch's intra-op threads while composing (None: one per core, or only the idle
        cores on a busy machine, as the command line does); the caller's setting is restored.
      dtype: "auto" (measured: the fastest of fp32, bf16 where the device has it natively
        and int8 on a CPU whose loss at w = 0 agrees with fp32's; probe.py), "bf16", "fp32",
        "int8", a torch.dtype, or None for the model's own. A lower precision scores through
        copies of the base's linear layers (precision.py); the experts are always mixed in
        fp32, the loss computed in fp32, and the returned model is fp32 (a model object: its
        own dtype) whatever the search ran (result.precision says what it ran).
      mix: "factors" (LoraHub's) mixes each module's factors, A = Σ wᵢAᵢ and B = Σ wᵢBᵢ, so
        the update is (Σ wᵢBᵢ)(Σ wⱼAⱼ), cross terms BᵢAⱼ included; "product" adds the experts'
        updates exactly, ΔW = Σ wᵢ·sᵢ·BᵢAᵢ: a LoRA of rank N·r (A = [A₁; …; A_N] fixed, B =
        [w₁B₁, …, w_NB_N]) re-injected after selection, which is the same in both (each
        expert alone at w = 1). The result's adapter is that rank-N·r LoRA.
      candidates_per_step: K candidates scored in one forward (the examples repeated K times,
        LoRA added by batched matmuls), shared by the R restarts: each is asked for
        max(1, K // R) candidates per round. With K <= R every search stays sequential, so
        restarts=K, candidates_per_step=K gives R searches for about the forwards of one; with
        K > R a search gets several candidates at once (nevergrad's num_workers), for which
        Shiwa/NGOpt pick CMA instead of COBYLA and lose exact match at LoraHub's budgets.
      start: "best" (the default) starts the first search at the chosen expert with the
        lowest few-shot loss alone (w = 1 for it, 0 for the rest; select "random" scores each
        chosen expert alone first, one forward each); "zero" at w = 0 (LoraHub's, as
        PAPER_COMPOSE does).
      weights: "search" (the default) learns w as above; "uniform" sets w = 1/N for the
        chosen experts and scores it once, no search (a baseline; kept even when w = 0 is lower).
    loss_fn(model, batch) -> float replaces the loss (averaged over batches, weighted by batch
      size); regularizer(w: np.ndarray) -> float replaces l1 * mean|w|.
    The returned weights are the best evaluated point; a non-finite loss is told to the
    optimizer as a 1e6 penalty and counted in nonfinite_steps. Same inputs and seed give the
    same weights.
    """
    # Everything that can be checked without a model, first.
    config = replace(config or ComposeConfig(), **options).resolved()
    examples = validate_examples(examples)
    optimizer_class(config.optimizer)
    check_loss_fn(loss_fn, config.candidates_per_step)
    device = pick_device(device)
    precision = resolve_precision(config.dtype, device)
    candidates = composition_candidates(experts, names, config, model)
    if config.mix == "product":
        product_config(candidates[0].config, 1)  # refuses per-module ranks before any model work

    with torch_threads(config.threads):  # the caller's setting back after, also on error
        clock = Stopwatch()
        base, tokenizer = load_base(model, tokenizer, candidates[0], precision)
        session = ScoringSession.open(base, tokenizer, candidates[0].config, examples, config,
                                      precision, device, loss_fn, regularizer)
        selection = choose_experts(session, candidates)  # the same in both mixes: w = 1 alone
        chosen = selection.handles(candidates)
        start = (best_alone(session, chosen, selection)  # its time counted as selection's
                 if config.start == "best" and config.weights == "search" else None)
        session, stack, lora_config, decode_seconds = session.mixing(chosen)
        loss = session.search_loss(stack)
        clock.split("setup", select=selection.seconds, decode=decode_seconds)

        zero_loss = loss.at_zero(len(chosen))
        with clock.lap("search"):
            outcomes = search_restarts(loss, len(chosen), config, progress, start)
        timings = clock.report(loss.scorer.timings, sum(len(o.losses) for o in outcomes))
        timings["select_forwards"] = len(selection.scores)  # each exactly scored candidate
        return CompositionResult.from_search(outcomes, zero_loss, chosen, selection, stack,
                                             session, lora_config, timings)
