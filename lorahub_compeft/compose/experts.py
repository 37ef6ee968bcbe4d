"""Which experts a composition uses: each one as an ExpertSource (its name and config now,
its tensors only when the stack is built), chosen from a library or a list, and checked to
be composable together."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lorahub_compeft.io.adapters import (CONFIG_NAME, Adapter, looks_like_hub_id, read_config,
                                         load_adapter)
from lorahub_compeft.io.base_models import check_bases
from lorahub_compeft.sampling import sample_indices
from lorahub_compeft.codecs.compeft import TernaryVector
from lorahub_compeft.store.expert import CompressedExpert, load_expert

# Config fields every composed expert must agree on (LoRA's scaling is lora_alpha / r).
# The base model is compared by identity, not by this string (base_models.check_bases).
_MUST_MATCH = ("peft_type", "r", "lora_alpha", "target_modules")


@dataclass
class ExpertSource:
    """One expert to compose: its name and config now, its tensors when `load` is called."""
    name: str
    config: dict
    load: Callable[[], dict[str, torch.Tensor]]
    ternary: Callable[[], TernaryVector] | None = None  # ComPEFT experts: the sparse form
    origin: Path | None = None  # the file or folder it was read from, if local


def base_model_of(source: ExpertSource) -> str:
    """The base model the expert records. A relative local path that does not exist from the
    working directory is looked up from the expert's own folder upwards: the shipped zoo
    records its base relative to the folder that holds the package, so that it works from
    any working directory without re-shipping the experts."""
    name = source.config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{source.name}: adapter_config has no base_model_name_or_path; pass "
                         "the base model (model= / --model)")
    path = Path(name)
    if path.is_absolute() or path.exists() or source.origin is None or looks_like_hub_id(name):
        return name
    for folder in Path(source.origin).resolve().parents:
        if (folder / path).is_dir():
            return str(folder / path)
    return name


def _once(expert: CompressedExpert, decode: Callable):
    """Decode for the stack (or for scoring) without leaving the decoded arrays cached in the
    expert (a library's cache), so that the caller holds the only copy."""
    def load():
        cached = expert.is_decoded
        value = decode()
        if not cached and expert.path is not None:
            expert.release()
        return value
    return load


def _compressed_source(expert: CompressedExpert) -> ExpertSource:
    # Experts whose codec has a sparse form (ComPEFT) are stacked as it; others (ERE) densely.
    ternary = _once(expert, expert.ternary) if expert.sparse else None
    return ExpertSource(expert.name, expert.config, _once(expert, expert.state_dict), ternary,
                        expert.path)


def to_source(item, index: int) -> ExpertSource:
    """A CompressedExpert, an Adapter, an expert file, a PEFT dir or a Hub id as a source."""
    if isinstance(item, CompressedExpert):
        return _compressed_source(item)
    if isinstance(item, Adapter):
        src = item.source or {}
        name = src.get("hub_id") or (Path(src["path"]).name if src.get("path") else f"adapter{index}")
        return ExpertSource(name, item.config, lambda: item.tensors)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_file() and path.suffix == ".safetensors":
            return _compressed_source(load_expert(path))
        if path.is_dir():
            return ExpertSource(path.name, read_config(path / CONFIG_NAME),
                                lambda: load_adapter(path).tensors, origin=path)
        if looks_like_hub_id(str(item)):
            adapter = load_adapter(str(item))
            return ExpertSource(str(item), adapter.config, lambda: adapter.tensors)
        raise ValueError(f"{item}: not an expert file (.safetensors), a PEFT adapter directory "
                         "or a Hub id")
    raise ValueError(f"cannot compose a {type(item).__name__}; pass CompressedExperts, expert "
                     "files, PEFT dirs, Hub ids or Adapters")


def candidate_sources(experts, names) -> list[ExpertSource]:
    """Every expert composition may choose from: a library's (or the given `names` of it), or
    every item of a list (names made unique)."""
    from lorahub_compeft.store.library import ExpertLibrary
    if isinstance(experts, ExpertLibrary):
        return [to_source(experts.get(n), i) for i, n in enumerate(names or experts.names())]
    if names is not None:
        raise ValueError("names= picks experts from an ExpertLibrary; pass the experts themselves "
                         "otherwise")
    items = list(experts)
    if not items:
        raise ValueError("no experts to compose")
    return _unique([to_source(item, i) for i, item in enumerate(items)])


def _unique(sources: list[ExpertSource]) -> list[ExpertSource]:
    seen: dict[str, int] = {}
    for s in sources:  # weights are keyed by name: make names unique
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
    return sources


def choose_sources(experts, names, n_experts: int, seed: int) -> list[ExpertSource]:
    """LoraHub's draw: from a library, the given `names` or n_experts sampled with the seed;
    from a list, all of them, or n_experts sampled with the seed (bbh.sample_indices) if longer."""
    from lorahub_compeft.store.library import ExpertLibrary
    if n_experts < 1:
        raise ValueError(f"n_experts must be at least 1, got {n_experts}")
    if isinstance(experts, ExpertLibrary):
        if names is None:
            names = experts.sample(n_experts, seed)  # checks n against the library's size
    elif names is None:
        items = list(experts)
        if len(items) > n_experts:
            items = [items[i] for i in sorted(sample_indices(len(items), n_experts, seed))]
        experts = items
    return candidate_sources(experts, names)


def _normal(key: str, value):
    if key == "target_modules" and isinstance(value, (list, tuple, set)):
        return sorted(value)
    return value


def validate_experts(sources: list[ExpertSource], model: str | None = None) -> None:
    """All experts must be LoRA with the same r, alpha, targets and base model; with `model`
    named, a base mismatch is a warning (the caller chose the base)."""
    if not sources:
        raise ValueError("no experts to compose")
    problems = []
    for s in sources:
        cfg = s.config
        if cfg.get("peft_type") != "LORA":
            problems.append(f"{s.name}: peft_type is {cfg.get('peft_type')!r}; only LORA experts "
                            "can be composed")
        elif cfg.get("use_dora"):
            problems.append(f"{s.name}: use_dora is set; DoRA experts cannot be composed")
    first = sources[0]
    for s in sources[1:]:
        for key in _MUST_MATCH:
            mine, theirs = _normal(key, s.config.get(key)), _normal(key, first.config.get(key))
            if mine != theirs and not (key == "peft_type" and problems):
                problems.append(f"{s.name}: {key} is {mine!r}, but {first.name} has {theirs!r}")
    problems += check_bases({s.name: s.config.get("base_model_name_or_path") for s in sources},
                            model)
    if problems:
        raise ValueError("these experts cannot be composed together:\n  " + "\n  ".join(problems)
                         + ("\n(pass --model / model= to choose the base model)"
                            if any("base_model" in p for p in problems) else ""))
