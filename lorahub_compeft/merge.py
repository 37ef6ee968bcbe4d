"""Merging LoRA experts, dense or compressed, into one adapter (ComPEFT §4.3).

The merge is done on each module's product ΔW_i = s_i·B_i·A_i, never on A and B apart:
A and B are only defined up to B·G, G⁻¹·A (an ERE expert's factors are an SVD of the product,
a ComPEFT expert's are sparse ternary), so element-wise operations on them (TIES's trimming and
sign election, or even a plain sum, which adds the cross terms B_i·A_j) depend on the
factorization and not on what the expert does. On ΔW:
  task_arithmetic  ΔW = Σ w_i ΔW_i   (Ilharco et al.; weights default to 1/N, a mean)
  ties             per module: keep the top `density` of each |ΔW_i|, elect the sign of
                   Σ trimmed ΔW_i, and average, weighted by w_i, the trimmed entries that agree
                   with it (Yadav et al.; weights default to 1)
The result is written back as one LoRA adapter by SVD: rank `rank` (default Σ r_i, which keeps
a task-arithmetic merge exact), lora_alpha = rank so PEFT's scaling is 1. This is what PEFT's
`add_weighted_adapter` computes with combination_type "svd" and "ties_svd" (density trimming
per module, majority sign "total"); a test checks both against it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lorahub_compeft.io.adapters import Adapter
from lorahub_compeft.codecs.ere import lora_modules, lora_scaling
from lorahub_compeft.compose.experts import expert_handles, validate_experts
from lorahub_compeft.compose.export import check_rank

log = logging.getLogger(__name__)
MERGE_METHODS = ("task_arithmetic", "ties")


@dataclass
class MergeResult:
    adapter: Adapter
    energy_kept: float  # share of Σ‖ΔW‖² the rank-`rank` factors keep (1.0: exact)


def mergeable_adapters(experts) -> list[Adapter]:
    """The experts, resolved and checked as composition resolves and checks them
    (compose/experts.py), as adapters; and, merge's own rule, all with the same LoRA modules."""
    handles = expert_handles(experts)
    validate_experts(handles, base_hint=False)
    adapters = [h.to_adapter() for h in handles]
    for handle, adapter in zip(handles[1:], adapters[1:]):
        if set(adapter.tensors) != set(adapters[0].tensors):
            raise ValueError(f"{handle.name} has other LoRA modules than {handles[0].name}; "
                             "merge experts with the same target modules")
    return adapters


def _weights(weights, n: int | None = None) -> list[float] | None:
    """The weights as floats, each finite (an infinite or NaN one makes every module's
    update non-finite, and its SVD fail), one per expert when `n` is known."""
    if weights is None:
        return None
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be numbers, one per expert; got {weights!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {', '.join(map(str, weights))}; "
                         "give one finite weight per expert, e.g. 0.5,0.5")
    if n is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} experts; give one weight per expert")
    return weights


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest magnitude, zero the rest."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta
    out = torch.zeros_like(delta).reshape(-1)
    index = torch.topk(delta.abs().reshape(-1), keep).indices
    out[index] = delta.reshape(-1)[index]
    return out.view_as(delta)


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on one module: trim each, elect the sign of the trimmed sum, and take the weighted
    sum of the agreeing entries divided by how many agree (a disjoint mean)."""
    trimmed = torch.stack([trim(d, density) for d in deltas])
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.sign(trimmed) == elected
    weighted = trimmed * torch.tensor(weights, dtype=trimmed.dtype).view(-1, *[1] * (trimmed.dim() - 1))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_deltas(experts, method: str = "task_arithmetic", weights=None, density: float = 0.2
                 ) -> tuple[dict[tuple[str, str], torch.Tensor], list[Adapter], list[float]]:
    """The merged ΔW per LoRA module {(A name, B name): out×in float64}, the adapters merged
    and the weights used."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(MERGE_METHODS)}")
    if method == "ties" and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] for TIES, got {density!r}")
    _weights(weights)  # before any expert is read
    adapters = mergeable_adapters(experts)
    weights = _weights(weights, len(adapters))
    if weights is None:
        weights = [1.0 / len(adapters)] * len(adapters) if method == "task_arithmetic" \
            else [1.0] * len(adapters)
    lora = [n for n in adapters[0].tensors if any(m in n for m in ("lora_A", "lora_B",
                                                                    "lora_embedding"))]
    if len(lora) != len(adapters[0].tensors):
        other = sorted(set(adapters[0].tensors) - set(lora))[0]
        raise ValueError(f"the experts carry non-LoRA tensors (e.g. {other}, modules_to_save); "
                         "merging those is not supported")
    pairs = lora_modules(lora)
    scales = [lora_scaling(a.config) for a in adapters]
    merged = {}
    for a_name, b_name in pairs:
        deltas = [s * ad.tensors[b_name].double() @ ad.tensors[a_name].double()
                  for ad, s in zip(adapters, scales)]
        if method == "task_arithmetic":
            merged[(a_name, b_name)] = sum(w * d for w, d in zip(weights, deltas))
        else:
            merged[(a_name, b_name)] = ties_merge(deltas, weights, density)
    return merged, adapters, weights


def merge(experts, method: str = "task_arithmetic", weights=None, density: float = 0.2,
          rank: int | None = None) -> MergeResult:
    """Merge LoRA experts (expert files, PEFT dirs, Hub ids, CompressedExperts or Adapters) into
    one LoRA adapter of rank `rank` (default Σ r_i); see the module docstring."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    merged, adapters, weights = merge_deltas(experts, method, weights, density)
    if rank is not None:
        tensors = adapters[0].tensors
        check_rank(rank, [tensors[a] for a, _ in merged], [tensors[b] for _, b in merged])
    rank = rank or sum(a.config["r"] for a in adapters)
    dtype = next(iter(adapters[0].tensors.values())).dtype
    tensors, total, kept = {}, 0.0, 0.0
    for (a_name, b_name), delta in merged.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, len(s))
        root = s[:k].sqrt()
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
        tensors[a_name], tensors[b_name] = a.to(dtype), b.to(dtype)
        total += float((s ** 2).sum())
        kept += float((s[:k] ** 2).sum())
    config = dict(adapters[0].config, r=rank, lora_alpha=rank, use_rslora=False,
                  rank_pattern={}, alpha_pattern={}, inference_mode=True)
    source = {"merged": method, "weights": weights, "experts": [a.source for a in adapters]}
    energy = kept / total if total > 0 else 1.0
    if energy < 0.999:
        log.info("rank %d keeps %.1f%% of the merged update's energy", rank, 100 * energy)
    return MergeResult(Adapter(tensors, config, source), energy)
