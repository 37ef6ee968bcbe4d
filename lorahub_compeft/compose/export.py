"""What compose writes: the composed adapter folder (its PEFT files and composition.json,
replaced with force only when it is compose's own), and the composed LoRA at a lower rank,
each module's update ΔW = s·B·A truncated by its SVD.

A product-space composition of N experts is exact at rank N·r; `compact_adapter` writes it
(or any LoRA) at rank k, module by module ΔW_k = U_k·diag(σ_k)·V_kᵀ, the best rank-k
approximation in Frobenius norm, and reports the relative error over all modules,
(Σ_m ‖ΔW_m − ΔW_m,k‖² / Σ_m ‖ΔW_m‖²)^½ = (Σ dropped σ² / Σ σ²)^½.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorahub_compeft.codecs.ere import lora_modules, lora_scaling, spectrum_of_product
from lorahub_compeft.io.adapters import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from lorahub_compeft.io.files import OutputExistsError, atomic_dir, check_dir_target, read_json

COMPOSITION_NAME = "composition.json"  # beside the adapter: which experts, their scores, w
COMPOSED_FILES = (CONFIG_NAME, WEIGHTS_NAME, COMPOSITION_NAME)
OWN_COMPOSITION_KEYS = {"experts", "weights", "best_loss"}  # what every composition.json holds


def check_composed_target(directory: str | os.PathLike, force: bool) -> Path:
    """The force rule for compose's folder: an existing one is replaced only with `force`,
    only if it holds nothing but COMPOSED_FILES, and only if its composition.json (if any) is
    recognisably one compose wrote."""
    target = Path(directory)
    check_dir_target(target, force, COMPOSED_FILES)
    composition = target / COMPOSITION_NAME
    if composition.exists() or composition.is_symlink():
        try:
            data = None if composition.is_symlink() else read_json(composition)
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or not OWN_COMPOSITION_KEYS <= set(data):
            raise OutputExistsError(f"{composition}: is not a composition.json compose wrote; "
                                    "--force replaces only compose's own output: move it away "
                                    "or choose another folder")
    return target


def write_composed(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                   composition: dict, force: bool = False) -> Path:
    """The adapter and its composition.json, written atomically as one folder."""
    target = check_composed_target(directory, force)
    with atomic_dir(target, force=force, owned=COMPOSED_FILES) as staging:
        save_adapter(staging, tensors, config, force=True)  # into the empty staging folder
        (staging / COMPOSITION_NAME).write_text(json.dumps(composition, indent=1) + "\n")
    return target


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
    check_rank(rank, [tensors[a] for a, _ in lora_modules(list(tensors))],
               [tensors[b] for _, b in lora_modules(list(tensors))])
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


def check_rank(rank: int, a_factors: list[torch.Tensor], b_factors: list[torch.Tensor]) -> None:
    """Refuse a rank above what any module's update can have, min(out, in) of the widest
    module: the factors past it would be zeros (and a typo such as 1e8 asks for terabytes)."""
    most = max((min(b.shape[0], math.prod(a.shape[1:])) for a, b in zip(a_factors, b_factors)),
               default=0)
    if rank > most:
        raise ValueError(f"rank {rank:,} is more than any module's update can have (at most "
                         f"{most}, min(out, in) of the widest module); give a rank up to {most}")
