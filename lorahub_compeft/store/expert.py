"""CompressedExpert and its file: one `.safetensors` file per compressed adapter.

The file is plain safetensors (a JSON header, then raw bytes; never pickle). Tensors:
  the codec's payload   ComPEFT: stream.<name> bit streams and scales; ERE: ere.u, ere.v, ere.scales
  full.<tensor>         adapter tensors that are not task vectors (modules_to_save heads), as is
The header (format.py) says what they mean: the codec (absent: ComPEFT) and its fields, the
tensors' names, shapes, dtypes and inits in order, the source adapter_config.json, where it
came from, sizes, and the sha256 of the payload (every tensor above, by sorted name, with its
dtype and shape). Opening reads and validates the header only; the payload is read, checked
and decoded on first use. Every malformed file is an ExpertFileError naming the field.
Nothing here depends on which codec a file holds: that is the codec's (codecs/).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lorahub_compeft.codecs import base as codecs
from lorahub_compeft.codecs.base import DTYPES, CodecError, check_task_vector
from lorahub_compeft.codecs.compeft import TernaryVector
from lorahub_compeft.io.adapters import Adapter, load_adapter, module_paths, save_adapter
from lorahub_compeft.io.base_models import recorded_base
from lorahub_compeft.io.files import atomic_write_bytes, check_file_target
from lorahub_compeft.io.residuals import is_residual
from lorahub_compeft.store.format import (FORMAT_NAME, FORMAT_VERSION, ExpertFileError, dtype_name,
                                          encode_header, payload_digest, read_header, sorted_header)


@dataclass


class CompressedExpert:
    """A compressed expert: its header is always in memory, its weights only once asked for."""
    meta: dict
    path: Path | None = None
    _weights: Any = None  # the codec's decoded form (ComPEFT: a TernaryVector; ERE: LoRA factors)
    _carried: dict[str, torch.Tensor] | None = None
    _payload: dict | None = None  # the file's tensors, kept from compress() until saved

    # --- what the header says -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else "expert")

    @property
    def codec(self) -> str:
        return self.meta.get("codec", codecs.DEFAULT_CODEC)

    @property
    def config(self) -> dict:
        return self.meta["adapter_config"]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def density(self) -> float | None:
        """ComPEFT's density (None for other codecs)."""
        return self.meta.get("density")

    @property
    def alpha(self) -> float | None:
        """ComPEFT's alpha, the number it chose for "auto" (None for other codecs)."""
        return self.meta.get("alpha")

    @property
    def sizes(self) -> dict:
        return self.meta["sizes"]

    @property
    def sparse(self) -> bool:
        """Whether it has a sparse ternary form (`ternary()`) that composition uses as is."""
        return codecs.codec_of(self.meta).sparse

    @property
    def is_decoded(self) -> bool:
        return self._weights is not None

    def summary(self) -> dict:
        """The facts an index or a listing needs, from the header alone."""
        cfg = self.config
        return {"name": self.name, "source": self.meta["source"], "base_model": self.base_model,
                "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                "target_modules": _as_list(cfg.get("target_modules")), "codec": self.codec,
                "sizes": self.sizes, **codecs.codec_of(self.meta).summary(self.meta)}

    # --- the weights ----------------------------------------------------------------------
    def weights(self):
        """The codec's decoded form of the payload, read and checked on first use."""
        if self._weights is None:
            self._weights, self._carried = _read_payload(self.path, self.meta)
        return self._weights

    def ternary(self) -> TernaryVector:
        """The sparse ternary form composition uses as is (codecs that have one: ComPEFT)."""
        if not self.sparse:
            raise ExpertFileError(f"{self.name} is a {self.codec} expert: it has no sparse "
                                  "ternary form; use task_vector() or state_dict()")
        return self.weights()

    def release(self) -> None:
        """Drop the decoded weights (the file is read again when they are next asked for)."""
        if self.path is None:
            raise ExpertFileError("this expert has no file to decode again; save it first")
        self._weights = self._carried = None

    def task_vector(self) -> dict[str, torch.Tensor]:
        """tau-hat per compressed tensor, in each tensor's dtype (ComPEFT's exactly sign * scale
        or 0; ERE's LoRA factors of rank <= r, zero-padded)."""
        return codecs.codec_of(self.meta).task_vector(self.weights(), self.meta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors as PEFT stores them: init + tau-hat, plus the carried ones."""
        out = self.task_vector()
        for entry in self.meta["tensors"]:
            if entry["init"]:
                out[entry["name"]] = out[entry["name"]] + entry["init"]
        out.update(self._carried)
        return out

    def to_adapter(self) -> Adapter:
        return Adapter(self.state_dict(), dict(self.config), dict(self.meta["source"]))

    def export(self, directory: str | os.PathLike, force: bool = False,
               base: str | os.PathLike | None = None) -> Path:
        """Write a standard PEFT adapter dir that `PeftModel.from_pretrained` loads; for a
        full fine-tuning residual, base + residual as a model (`save_pretrained`)."""
        if is_residual(self.config):
            from lorahub_compeft.io.residuals import export_model
            return export_model(self, base or self.base_model, directory, force)
        return save_adapter(directory, self.state_dict(), self.config, force=force)

    def digest(self) -> str:
        """The payload's format-2 digest, as `save` records it (a format-1 file's is read)."""
        if self.meta["format_version"] >= 2:
            return self.meta["payload_sha256"]
        return payload_digest(self._payload if self._payload is not None else
                              _read_checked(self.path, self.meta))

    def same_as(self, other: "CompressedExpert") -> bool:
        """Whether both hold the same expert, header and payload (a format-1 file and its
        format-2 copy, as `save` writes it, are the same)."""
        skip = ("format_version", "payload_sha256")
        return self.digest() == other.digest() and \
            {k: v for k, v in self.meta.items() if k not in skip} == \
            {k: v for k, v in other.meta.items() if k not in skip}

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the expert file atomically (a crash leaves no half-written file behind)."""
        path = check_file_target(path, force)
        if self._payload is None:  # opened from a file: its payload as is, once it decodes
            self.weights()
            self._payload = _read_checked(self.path, self.meta)
        # a v1 expert saved again becomes v2: its digest gains dtypes and shapes
        self.meta.update(format_version=FORMAT_VERSION, payload_sha256=payload_digest(self._payload))
        header = encode_header(self.meta)
        tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v.contiguous()
                   for k, v in self._payload.items()}
        atomic_write_bytes(path, sorted_header(safetensors_bytes(tensors, metadata=header)))
        self.path = path
        return path


def _as_list(value) -> list | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, (set, tuple)):
        return sorted(value)
    return [value]  # a regex string


def _nbytes(value: np.ndarray | torch.Tensor) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()


def compress(source: str | os.PathLike | Adapter, options=None, *, codec: str | None = None,
             name: str | None = None, revision: str | None = None, **overrides) -> CompressedExpert:
    """Compress a PEFT adapter (a local dir, a Hub id, or an `Adapter`) with a codec.

    options: a codec's Options (config.py: CompeftOptions, EreOptions, or a preset such as
    PAPER_COMPEFT); its codec is the one used. Without them, `codec`'s defaults (ComPEFT's when
    no codec is named), the command line's too. `overrides` change single fields, e.g.
    compress(src, density=0.1) or compress(src, codec="ere", budget_bits=2)."""
    unit = codecs.choose(codec, options)
    options = unit.options(options, **overrides)
    adapter = source if isinstance(source, Adapter) else load_adapter(source, revision)
    inits = {k: unit.init(k, t, adapter.config) for k, t in adapter.tensors.items()}
    tau = {k: t - init if init else t for k, t in adapter.tensors.items()
           if (init := inits[k]) is not None}
    carried = {k: t.detach().clone() for k, t in adapter.tensors.items() if inits[k] is None}
    check_task_vector(tau)
    config = adapter.config
    if isinstance(config.get("target_modules"), str):  # a regex: the file names what it matched
        config = dict(config, target_modules=module_paths(tau))
    base = recorded_base(config.get("base_model_name_or_path"), adapter.source.get("path"))
    if base != config.get("base_model_name_or_path"):  # found from the file's new home too
        config = dict(config, base_model_name_or_path=base)
    payload, fields, weights = unit.compress(tau, config, options)
    if not sum(_nbytes(v) for v in payload.values()):
        option = unit.size_option
        raise ValueError(f"{name or _default_name(adapter)}: these options keep nothing of it (the "
                         f"expert would be empty); raise {option} (--{option.replace('_', '-')})")
    payload.update({f"full.{k}": v for k, v in carried.items()})
    dense = adapter.tensors.values()
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name or _default_name(adapter),
        **({"codec": unit.name} if unit.tagged else {}), **fields,
        "tensors": [{"name": n, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
                     "init": inits[n]} for n, t in tau.items()],
        "carried": [{"name": k, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
                    for k, t in carried.items()],
        "adapter_config": config, "source": adapter.source,
        "sizes": {"original_bytes": sum(_nbytes(t) for t in dense),
                  "fp16_bytes": sum(t.numel() * 2 for t in dense),
                  "fp32_bytes": sum(t.numel() * 4 for t in dense),
                  "payload_bytes": sum(_nbytes(v) for v in payload.values()),
                  "carried_bytes": sum(_nbytes(t) for t in carried.values())},
        "payload_sha256": payload_digest(payload),
    }
    return CompressedExpert(meta=meta, _weights=weights, _carried=carried, _payload=payload)


def _default_name(adapter: Adapter) -> str:
    src = adapter.source
    return src.get("hub_id") or Path(src.get("path", "expert")).name


def load_expert(path: str | os.PathLike) -> CompressedExpert:
    """Open an expert file, reading and validating its header only (no payload)."""
    return CompressedExpert(meta=read_header(path), path=Path(path))


def _read_checked(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every payload tensor of the file, after checking them against the header's digest."""
    if path is None:
        raise ExpertFileError("this expert has no file and no weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            payload = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:
        raise ExpertFileError(f"{path}: cannot read the payload ({err})") from None
    if payload_digest(payload, meta["format_version"]) != meta["payload_sha256"]:
        raise ExpertFileError(f"{path}: payload checksum mismatch; the file is damaged, "
                              "download or compress it again")
    return payload


def _read_payload(path: Path, meta: dict) -> tuple[Any, dict[str, torch.Tensor]]:
    """The codec's decoded weights and the carried tensors."""
    payload = _read_checked(path, meta)
    try:
        weights = codecs.codec_of(meta).decode(payload, meta)
    except CodecError as err:
        raise ExpertFileError(f"{path}: {err}") from None
    return weights, _carried_of(path, payload, meta)


def _carried_of(path: Path, payload: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    carried = {e["name"]: payload[f"full.{e['name']}"] for e in meta["carried"]}
    for e in meta["carried"]:
        tensor = carried[e["name"]]
        if tensor.dtype != DTYPES[e["dtype"]]:
            raise ExpertFileError(f"{path}: carried tensor {e['name']} has the wrong dtype")
        if not torch.isfinite(tensor).all():
            raise ExpertFileError(f"{path}: carried tensor {e['name']} holds NaN or infinity")
    return carried
