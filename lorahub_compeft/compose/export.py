"""A composed LoRA at a lower rank: each module's update ΔW = s·B·A truncated by its SVD.

A product-space composition of N experts is exact at rank N·r; `compact_adapter` writes it
(or any LoRA) at rank k, module by module ΔW_k = U_k·diag(σ_k)·V_kᵀ, the best rank-k
approximation in Frobenius norm, and reports the relative error over all modules,
(Σ_m ‖ΔW_m − ΔW_m,k‖² / Σ_m ‖ΔW_m‖²)^½ = (Σ dropped σ² / Σ σ²)^½.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorahub_compeft.codecs.ere import lora_modules, lora_scaling, spectrum_of_product


@dataclass
class CompactAdapter:
    """A LoRA adapter of rank `rank` whose modules' updates are the truncated SVDs of the
    composed ones; `relative_error` is the Frobenius error over all modules, relative."""
    tensors: dict[str, torch.Tensor]
    config: dict
    rank: int
    relative_error: float


def compact_adapter(tensors: dict[str, torch.Tensor], config: dict, rank: int) -> CompactAdapter:
    """`tensors` (a LoRA of `config`) at rank `rank`: per module B' = U·√(σ/s),
    A' = √(σ/s)·Vᵀ, so that s·B'·A' = ΔW_k with s the adapter's own scaling (lora_alpha =
    s·rank in the config, rsLoRA off). A module of lower rank than `rank` is zero-padded (a
    rank at or above the composed one is exact)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    scaling = lora_scaling(config)
    out: dict[str, torch.Tensor] = {}
    dropped = total = 0.0
    for a_key, b_key in lora_modules(list(tensors)):
        a, b = tensors[a_key], tensors[b_key]
        spectrum = spectrum_of_product(b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1),
                                       scaling)
        sigma = spectrum.s
        total += float((sigma ** 2).sum())
        dropped += float((sigma[rank:] ** 2).sum())
        kept = min(rank, len(sigma))
        root = torch.sqrt(sigma[:kept] / scaling)
        new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        new_a = torch.zeros(rank, math.prod(a.shape[1:]), dtype=torch.float64)
        new_b[:, :kept] = spectrum.u[:, :kept] * root
        new_a[:kept] = root[:, None] * spectrum.v[:, :kept].T
        out[a_key] = new_a.reshape(rank, *a.shape[1:]).float()
        out[b_key] = new_b.reshape(b.shape[0], rank, *b.shape[2:]).float()
    alpha = scaling * rank
    compact = dict(config, r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                   use_rslora=False)
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    return CompactAdapter(out, compact, rank, error)
