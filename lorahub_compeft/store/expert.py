"""CompressedExpert and its file: one `.safetensors` file per compressed adapter.

The file is plain safetensors (a JSON header, then raw bytes; never pickle). Tensors:
  stream.<name>  uint8 bit streams of the ternary vector (coding.py: golomb or bitmask)
  scales         float32, one scale (global selection) or one per tensor (per-tensor)
  full.<tensor>  adapter tensors that are not task vectors (modules_to_save heads), as is
The header (format.py) says what they mean: encoding, density, alpha, sigma, the tensors'
names, shapes, dtypes and inits in order, the source adapter_config.json, where it came from,
sizes, and the sha256 of the payload (every tensor above, by sorted name, with its dtype and
shape). Opening reads and validates the header only; the payload is read, checked and decoded
on first use. Every malformed file is an ExpertFileError naming the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lorahub_compeft.codecs import coding, ere
from lorahub_compeft.codecs.compeft import TernaryVector, check_task_vector, sparsify
from lorahub_compeft.io.adapters import Adapter, load_adapter, save_adapter, task_vector_init
from lorahub_compeft.io.files import atomic_write_bytes, check_file_target
from lorahub_compeft.io.residuals import is_residual
from lorahub_compeft.store.format import (CODECS, DTYPES, ENCODINGS, FORMAT_NAME, FORMAT_VERSION,
                                          ExpertFileError, dtype_name, encode_header,
                                          payload_digest, read_header, sorted_header)


@dataclass


class CompressedExpert:
    """A ComPEFT expert: its header is always in memory, its weights only once asked for."""
    meta: dict
    path: Path | None = None
    _ternary: TernaryVector | None = None
    _factors: dict[str, torch.Tensor] | None = None  # ERE experts: the decoded LoRA factors
    _carried: dict[str, torch.Tensor] | None = None
    _payload: dict | None = None  # encoded streams, kept from compress() until saved

    # --- what the header says -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else "expert")

    @property
    def codec(self) -> str:
        return self.meta.get("codec", "compeft")

    @property
    def config(self) -> dict:
        return self.meta["adapter_config"]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def density(self) -> float | None:
        return self.meta.get("density")

    @property
    def alpha(self) -> float | None:
        return self.meta.get("alpha")

    @property
    def sizes(self) -> dict:
        return self.meta["sizes"]

    @property
    def is_decoded(self) -> bool:
        return self._ternary is not None or self._factors is not None

    def summary(self) -> dict:
        """The facts an index or a listing needs, from the header alone."""
        cfg = self.config
        summary = {"name": self.name, "source": self.meta["source"], "base_model": self.base_model,
                   "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                   "target_modules": _as_list(cfg.get("target_modules")), "codec": self.codec,
                   "encoding": self.meta.get("encoding"), "selection": self.meta.get("selection"),
                   "density": self.density, "alpha": self.alpha, "sizes": self.sizes}
        if self.codec == "ere":
            info = self.meta["ere"]
            summary.update(encoding=f"int{info['bits']}" if info["bits"] < 16 else "fp16",
                           selection="rank", budget_bits=info["budget_bits"],
                           mean_rank=sum(info["ranks"]) / len(info["ranks"]))
        return summary

    # --- the weights ----------------------------------------------------------------------
    def ternary(self) -> TernaryVector:
        if self.codec != "compeft":
            raise ExpertFileError(f"{self.name} is a {self.codec} expert: it has no sparse "
                                  "ternary form; use task_vector() or state_dict()")
        if self._ternary is None:
            self._ternary, self._carried = _read_payload(self.path, self.meta)
        return self._ternary

    def release(self) -> None:
        """Drop the decoded weights (the file is read again when they are next asked for)."""
        if self.path is None:
            raise ExpertFileError("this expert has no file to decode again; save it first")
        self._ternary = self._factors = self._carried = None

    def task_vector(self) -> dict[str, torch.Tensor]:
        """tau-hat per compressed tensor: ComPEFT's exactly sign * scale or 0; ERE's LoRA
        factors of rank <= r (zero-padded), in each tensor's dtype."""
        if self.codec == "ere":
            if self._factors is None:
                self._factors, self._carried = _read_payload(self.path, self.meta)
            dtypes = {e["name"]: DTYPES[e["dtype"]] for e in self.meta["tensors"]}
            return {k: v.to(dtypes[k]) for k, v in self._factors.items()}
        return self.ternary().to_tensors()

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

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the expert file atomically (a crash leaves no half-written file behind)."""
        path = check_file_target(path, force)
        if self._payload is None and self.codec == "ere":  # re-quantizing would change it
            self._payload = _read_checked(self.path, self.meta)
        if self._payload is None:
            self._payload, _ = _encode_payload(self.ternary(), self.meta["encoding"], self._carried)
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


def _encode_payload(ternary: TernaryVector, encoding: str, carried: dict[str, torch.Tensor]
                    ) -> tuple[dict, dict]:
    """The file's tensors and the coding parameters the header must carry."""
    if encoding == "golomb":
        streams, params = coding.encode_golomb(ternary.positions, ternary.numel)
        streams = dict(streams, signs=coding.encode_signs(ternary.signs > 0))
    else:
        streams = coding.encode_bitmask(ternary.positions, ternary.signs, ternary.numel)
        params = {"count": len(ternary.positions)}
    payload = {f"stream.{k}": v for k, v in streams.items()}
    payload["scales"] = ternary.scales.clone()
    payload.update({f"full.{k}": v for k, v in carried.items()})
    return payload, params


def _nbytes(value: np.ndarray | torch.Tensor) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()


def compress(source: str | os.PathLike | Adapter, density: float = 0.1, alpha: float | str = 1.0,
             per_tensor: bool = False, encoding: str = "golomb", name: str | None = None,
             revision: str | None = None, codec: str = "compeft", budget_bits: float = 1.0,
             quant_bits: int = ere.DEFAULT_QUANT_BITS) -> CompressedExpert:
    """Compress a PEFT adapter (a local dir, a Hub id, or an `Adapter`).

    codec="compeft" (ComPEFT: density, alpha, per_tensor, encoding) or "ere" (low-rank factors
    of each LoRA module's B·A within budget_bits bits per LoRA value, quantized to quant_bits)."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if codec == "compeft" and encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    adapter = source if isinstance(source, Adapter) else load_adapter(source, revision)
    residual = is_residual(adapter.config)
    # A full fine-tuning residual is all task vector: ComPEFT takes every tensor, ERE the
    # matrices (the rest, layer norms and biases, is carried as is).
    inits = {k: (0.0 if codec == "compeft" or t.dim() == 2 else None) if residual
             else task_vector_init(k) for k, t in adapter.tensors.items()}
    tau = {k: t - init if init else t for k, t in adapter.tensors.items()
           if (init := inits[k]) is not None}
    carried = {k: t.detach().clone() for k, t in adapter.tensors.items() if inits[k] is None}
    if codec == "ere":
        check_task_vector(tau)
        payload, info = ere.compress_matrices(tau, budget_bits, quant_bits) if residual else \
            ere.compress_lora(tau, adapter.config, budget_bits, quant_bits)
        fields = {"codec": "ere", "ere": info}
    else:
        ternary = sparsify(tau, density, alpha, per_tensor)
        payload, coding_params = _encode_payload(ternary, encoding, {})
        fields = {"encoding": encoding, "selection": "per_tensor" if per_tensor else "global",
                  "density": density, "alpha": ternary.alpha, "sigma": ternary.sigma,
                  "numel": ternary.numel, "coding": coding_params}
    payload.update({f"full.{k}": v for k, v in carried.items()})
    dense = adapter.tensors.values()
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name or _default_name(adapter),
        **fields,
        "tensors": [{"name": n, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
                     "init": inits[n]} for n, t in tau.items()],
        "carried": [{"name": k, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
                    for k, t in carried.items()],
        "adapter_config": adapter.config, "source": adapter.source,
        "sizes": {"original_bytes": sum(_nbytes(t) for t in dense),
                  "fp16_bytes": sum(t.numel() * 2 for t in dense),
                  "fp32_bytes": sum(t.numel() * 4 for t in dense),
                  "payload_bytes": sum(_nbytes(v) for v in payload.values()),
                  "carried_bytes": sum(_nbytes(t) for t in carried.values())},
        "payload_sha256": payload_digest(payload),
    }
    if codec == "ere":
        expert = CompressedExpert(meta=meta, _carried=carried, _payload=payload)
        expert._factors = _decode_ere(payload, meta)
        return expert
    return CompressedExpert(meta=meta, _ternary=ternary, _carried=carried, _payload=payload)


def _default_name(adapter: Adapter) -> str:
    src = adapter.source
    return src.get("hub_id") or Path(src.get("path", "expert")).name


def load_expert(path: str | os.PathLike) -> CompressedExpert:
    """Open an expert file, reading and validating its header only (no payload)."""
    return CompressedExpert(meta=read_header(path), path=Path(path))


def _decode_ere(payload: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    entries = meta["tensors"]
    decode = ere.decode_matrices if is_residual(meta["adapter_config"]) else ere.decode_lora
    return decode(payload, [e["name"] for e in entries],
                  {e["name"]: tuple(e["shape"]) for e in entries}, meta["ere"])


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


def _read_payload(path: Path, meta: dict) -> tuple[TernaryVector | dict[str, torch.Tensor],
                                                   dict[str, torch.Tensor]]:
    """The decoded weights (ComPEFT: a TernaryVector; ERE: LoRA factors) and carried tensors."""
    payload = _read_checked(path, meta)
    if meta.get("codec") == "ere":
        factors = _decode_ere(payload, meta)
        bad = next((k for k, t in factors.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise ExpertFileError(f"{path}: {bad} decodes to NaN or infinity; the file is damaged")
        return factors, _carried_of(path, payload, meta)
    streams = {k.removeprefix("stream."): v.numpy() for k, v in payload.items()
               if k.startswith("stream.")}
    numel, n_tensors = meta["numel"], len(meta["tensors"])
    try:
        if meta["encoding"] == "golomb":
            signs_packed = streams.pop("signs", None)
            if signs_packed is None:
                raise coding.CodingError("no sign stream")
            positions = coding.decode_golomb(streams, meta["coding"], numel)
            signs = coding.decode_signs(signs_packed, len(positions))
        else:
            positions, signs = coding.decode_bitmask(streams, numel)
    except coding.CodingError as err:
        raise ExpertFileError(f"{path}: {err}") from None
    if len(positions) != meta["coding"]["count"]:
        raise ExpertFileError(f"{path}: the streams hold {len(positions)} kept values, header "
                              f"field coding says {meta['coding']['count']}")
    scales = payload["scales"]
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() not in (1, n_tensors):
        raise ExpertFileError(f"{path}: scales must be float32 with 1 or {n_tensors} values")
    if not torch.isfinite(scales).all():
        raise ExpertFileError(f"{path}: a scale is NaN or infinite; the file is damaged")
    entries = meta["tensors"]
    for entry, scale in zip(entries, scales.expand(n_tensors)):
        # init + sign * scale must be finite in the tensor's own dtype
        if abs(entry["init"]) + abs(float(scale)) > torch.finfo(DTYPES[entry["dtype"]]).max:
            raise ExpertFileError(f"{path}: tensor {entry['name']}: its init and scale overflow "
                                  f"{entry['dtype']}; the file is damaged")
    ternary = TernaryVector(names=[e["name"] for e in entries],
                            shapes=[tuple(e["shape"]) for e in entries],
                            dtypes=[DTYPES[e["dtype"]] for e in entries],
                            positions=positions, signs=signs, scales=scales, sigma=meta["sigma"])
    return ternary, _carried_of(path, payload, meta)


def _carried_of(path: Path, payload: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    carried = {e["name"]: payload[f"full.{e['name']}"] for e in meta["carried"]}
    for e in meta["carried"]:
        tensor = carried[e["name"]]
        if tensor.dtype != DTYPES[e["dtype"]]:
            raise ExpertFileError(f"{path}: carried tensor {e['name']} has the wrong dtype")
        if not torch.isfinite(tensor).all():
            raise ExpertFileError(f"{path}: carried tensor {e['name']} holds NaN or infinity")
    return carried
