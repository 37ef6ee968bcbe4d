"""The one path from what a user passes (a library, expert files, PEFT dirs, Hub ids, Adapters,
CompressedExperts) to experts that compose() and merge() can use: each one as an ExpertHandle
(its name, config and provenance now, its tensors only when asked for), and the one check that
they fit together (validate_experts), with one message for an incompatible pair."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorahub_compeft.config import ComposeConfig
from lorahub_compeft.io.adapters import (CONFIG_NAME, Adapter, looks_like_hub_id, read_config,
                                         load_adapter)
from lorahub_compeft.io.base_models import check_bases, resolve_base
from lorahub_compeft.sampling import sample_indices
from lorahub_compeft.codecs.compeft import TernaryVector
from lorahub_compeft.store.expert import CompressedExpert, load_expert

# Config fields every composed or merged expert must agree on (LoRA's scaling is
# lora_alpha / r). The base model is compared by identity, not by its string
# (base_models.check_bases).
MUST_MATCH = ("peft_type", "r", "lora_alpha", "target_modules")


@dataclass
class ExpertHandle:
    """One expert to compose or merge: its name, config and provenance now, its tensors when
    `load` is called."""
    name: str
    config: dict
    load: Callable[[], dict[str, torch.Tensor]]
    ternary: Callable[[], TernaryVector] | None = None  # ComPEFT experts: the sparse form
    origin: Path | None = None  # the file or folder it was read from, if local
    provenance: dict = field(default_factory=dict)  # where it came from, as Adapter.source says

    def to_adapter(self) -> Adapter:
        """The expert as a PEFT adapter in memory (its tensors loaded now)."""
        return Adapter(self.load(), dict(self.config), dict(self.provenance))


def base_model_of(handle: ExpertHandle) -> str:
    """The base model the expert records. A relative local path that does not exist from the
    working directory is looked up from the expert's own folder upwards, then from the folder
    that holds the package: the shipped zoo records its base relative to that folder, so that
    it works from any working directory without re-shipping the experts (resolve_base)."""
    name = handle.config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{handle.name}: adapter_config has no base_model_name_or_path; pass "
                         "the base model (model= / --model)")
    return resolve_base(name, handle.origin)


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


def _compressed_handle(expert: CompressedExpert) -> ExpertHandle:
    # Experts whose codec has a sparse form (ComPEFT) are stacked as it; others (ERE) densely.
    ternary = _once(expert, expert.ternary) if expert.sparse else None
    return ExpertHandle(expert.name, expert.config, _once(expert, expert.state_dict), ternary,
                        expert.path, dict(expert.meta["source"]))


def to_handle(item, index: int) -> ExpertHandle:
    """A CompressedExpert, an Adapter, an expert file, a PEFT dir or a Hub id as a handle."""
    if isinstance(item, CompressedExpert):
        return _compressed_handle(item)
    if isinstance(item, Adapter):
        src = item.source or {}
        name = src.get("hub_id") or (Path(src["path"]).name if src.get("path") else f"adapter{index}")
        return ExpertHandle(name, item.config, lambda: item.tensors, provenance=src)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_file() and path.suffix == ".safetensors":
            return _compressed_handle(load_expert(path))
        if path.is_dir():
            return ExpertHandle(path.name, read_config(path / CONFIG_NAME),
                                lambda: load_adapter(path).tensors, origin=path,
                                provenance={"path": str(path.resolve())})
        if looks_like_hub_id(str(item)):
            adapter = load_adapter(str(item))
            return ExpertHandle(str(item), adapter.config, lambda: adapter.tensors,
                                provenance=adapter.source)
        raise ValueError(f"{item}: not an expert file (.safetensors), a PEFT adapter directory "
                         "or a Hub id")
    raise ValueError(f"cannot use a {type(item).__name__} as an expert; pass CompressedExperts, "
                     "expert files, PEFT dirs, Hub ids or Adapters")


def expert_handles(experts, names=None) -> list[ExpertHandle]:
    """A library's experts (or the given `names` of it), or every item of a list (names made
    unique)."""
    from lorahub_compeft.store.library import ExpertLibrary
    if isinstance(experts, ExpertLibrary):
        return [to_handle(experts.get(n), i) for i, n in enumerate(names or experts.names())]
    if names is not None:
        raise ValueError("names= picks experts from an ExpertLibrary; pass the experts themselves "
                         "otherwise")
    items = list(experts)
    if not items:
        raise ValueError("no experts given; pass expert files, PEFT dirs, Hub ids or a library")
    return _unique([to_handle(item, i) for i, item in enumerate(items)])


def _unique(handles: list[ExpertHandle]) -> list[ExpertHandle]:
    seen: dict[str, int] = {}
    for h in handles:  # weights are keyed by name: make names unique
        seen[h.name] = seen.get(h.name, 0) + 1
        if seen[h.name] > 1:
            h.name = f"{h.name}#{seen[h.name]}"
    return handles


def drawn_handles(experts, names, n_experts: int, seed: int) -> list[ExpertHandle]:
    """LoraHub's draw: from a library, the given `names` or n_experts sampled with the seed;
    from a list, all of them, or n_experts sampled with the seed (sampling.sample_indices) if
    longer."""
    from lorahub_compeft.store.library import ExpertLibrary
    if isinstance(experts, ExpertLibrary):
        if names is None:
            names = experts.sample(n_experts, seed)  # checks n against the library's size
    elif names is None:
        items = list(experts)
        if len(items) > n_experts:
            items = [items[i] for i in sorted(sample_indices(len(items), n_experts, seed))]
        experts = items
    return expert_handles(experts, names)


def composition_candidates(experts, names, config: ComposeConfig, model) -> list[ExpertHandle]:
    """The experts composition chooses from (config resolved): LoraHub's draw with select
    "random", else every one given; checked to fit together (with `model` as the base when it
    names one)."""
    from lorahub_compeft.store.library import ExpertLibrary
    if config.select == "random":
        candidates = drawn_handles(experts, names, config.n_experts, config.seed)
    else:
        candidates = expert_handles(experts, names)
        if isinstance(experts, ExpertLibrary) and names is None and \
                config.n_experts > len(candidates):
            raise ValueError(f"cannot sample {config.n_experts} experts from a library of "
                             f"{len(candidates)}; lower n_experts or add experts")
    validate_experts(candidates, _model_name(model))
    return candidates


def _model_name(model) -> str | None:
    """The base a caller named: a name or path, or a model object's name_or_path."""
    named = model if model is None or isinstance(model, (str, os.PathLike)) else \
        getattr(model, "name_or_path", None)
    return str(named) if named else None


def _normal(key: str, value):
    if key == "target_modules" and isinstance(value, (list, tuple, set)):
        return sorted(value)
    return value


def validate_experts(handles: list[ExpertHandle], model: str | None = None,
                     base_hint: bool = True) -> None:
    """All experts must be plain LoRA with the same MUST_MATCH fields and base model (by
    identity); with `model` named, a base mismatch is a warning (the caller chose the base).
    base_hint: say that model= / --model chooses the base (composition can; merging cannot)."""
    if not handles:
        raise ValueError("no experts given; pass expert files, PEFT dirs, Hub ids or a library")
    problems = []
    for h in handles:
        cfg = h.config
        if cfg.get("peft_type") != "LORA":
            problems.append(f"{h.name}: peft_type is {cfg.get('peft_type')!r}; only plain LoRA "
                            "experts can be composed or merged")
        elif cfg.get("use_dora"):
            problems.append(f"{h.name}: use_dora is set; only plain LoRA experts (not DoRA) can "
                            "be composed or merged")
    first = handles[0]
    for h in handles[1:]:
        for key in MUST_MATCH:
            mine, theirs = _normal(key, h.config.get(key)), _normal(key, first.config.get(key))
            if mine != theirs and not (key == "peft_type" and problems):
                problems.append(f"{h.name}: {key} is {mine!r}, but {first.name} has {theirs!r}")
    problems += check_bases({h.name: h.config.get("base_model_name_or_path") for h in handles},
                            model)
    if problems:
        hint = base_hint and any("base_model" in p for p in problems)
        # one line (the command line prints the first), every problem named
        raise ValueError("these experts do not fit together: " + "; ".join(problems)
                         + ("; pass --model / model= to choose the base model" if hint else ""))
