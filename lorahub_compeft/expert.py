"""CompressedExpert and its file: one `.safetensors` file per ComPEFT-compressed adapter.

The file is plain safetensors (a JSON header, then raw bytes; never pickle). Tensors:
  stream.<name>  uint8 bit streams of the ternary vector (coding.py: golomb or bitmask)
  scales         float32, one scale (global selection) or one per tensor (per-tensor)
  full.<tensor>  adapter tensors that are not task vectors (modules_to_save heads), as is
The header's string metadata says what they mean: format and version, encoding, density,
alpha, sigma, the tensors' names/shapes/dtypes/inits in order, the source adapter_config.json,
where it came from, sizes, and the sha256 of the payload (every tensor above, by sorted name).
Opening reads the header only; the payload is read, checked and decoded on first use.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from . import coding
from .adapters import Adapter, load_adapter, save_adapter, task_vector_init
from .codec import TernaryVector, sparsify
from .files import atomic_write_bytes

FORMAT_NAME = "lorahub-compeft-expert"
FORMAT_VERSION = 1
ENCODINGS = ("golomb", "bitmask")
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                       torch.float64)}


class ExpertFileError(ValueError):
    """An expert file that cannot be trusted; the message names the file and the problem."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_digest(payload: dict[str, np.ndarray | torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(payload):
        value = payload[name]
        array = value.contiguous().reshape(-1).view(torch.uint8).numpy() if isinstance(value, torch.Tensor) else value
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass
class CompressedExpert:
    """A ComPEFT expert: its header is always in memory, its weights only once asked for."""
    meta: dict
    path: Path | None = None
    _ternary: TernaryVector | None = None
    _carried: dict[str, torch.Tensor] | None = None
    _payload: dict | None = None  # encoded streams, kept from compress() until saved

    # --- what the header says -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else "expert")

    @property
    def config(self) -> dict:
        return self.meta["adapter_config"]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def density(self) -> float:
        return self.meta["density"]

    @property
    def alpha(self) -> float:
        return self.meta["alpha"]

    @property
    def sizes(self) -> dict:
        return self.meta["sizes"]

    @property
    def is_decoded(self) -> bool:
        return self._ternary is not None

    def summary(self) -> dict:
        """The facts an index or a listing needs, from the header alone."""
        cfg = self.config
        return {"name": self.name, "source": self.meta["source"], "base_model": self.base_model,
                "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                "target_modules": _as_list(cfg.get("target_modules")),
                "encoding": self.meta["encoding"], "selection": self.meta["selection"],
                "density": self.density, "alpha": self.alpha, "sizes": self.sizes}

    # --- the weights ----------------------------------------------------------------------
    def ternary(self) -> TernaryVector:
        if self._ternary is None:
            self._ternary, self._carried = _read_payload(self.path, self.meta)
        return self._ternary

    def release(self) -> None:
        """Drop the decoded weights (the file is read again when they are next asked for)."""
        if self.path is None:
            raise ExpertFileError("this expert has no file to decode again; save it first")
        self._ternary = self._carried = None

    def task_vector(self) -> dict[str, torch.Tensor]:
        """tau-hat per compressed tensor: exactly sign * scale or 0."""
        return self.ternary().to_tensors()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors as PEFT stores them: init + tau-hat, plus the carried ones."""
        ternary = self.ternary()
        out = ternary.to_tensors()
        for entry in self.meta["tensors"]:
            if entry["init"]:
                out[entry["name"]] = out[entry["name"]] + entry["init"]
        out.update(self._carried)
        return out

    def to_adapter(self) -> Adapter:
        return Adapter(self.state_dict(), dict(self.config), dict(self.meta["source"]))

    def export(self, directory: str | os.PathLike, force: bool = False) -> Path:
        """Write a standard PEFT adapter dir that `PeftModel.from_pretrained` loads."""
        return save_adapter(directory, self.state_dict(), self.config, force=force)

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the expert file atomically (a crash leaves no half-written file behind)."""
        path = Path(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path}: already exists; choose another path or use --force")
        if self._payload is None:
            self._payload, _ = _encode_payload(self.ternary(), self.meta["encoding"], self._carried)
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}
        tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v.contiguous()
                   for k, v in self._payload.items()}
        atomic_write_bytes(path, _sorted_header(safetensors_bytes(tensors, metadata=header)))
        self.path = path
        return path


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted. safetensors writes them in hash
    order, which changes from process to process; sorted, the same expert gives the same bytes.
    The header keeps its length (padded with spaces, as the format allows), so no offset moves."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # never expected; keep the file as safetensors wrote it
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length:]


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
             revision: str | None = None) -> CompressedExpert:
    """Compress a PEFT adapter (a local dir, a Hub id, or an `Adapter`) with ComPEFT."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    adapter = source if isinstance(source, Adapter) else load_adapter(source, revision)
    inits = {k: task_vector_init(k) for k in adapter.tensors}
    tau = {k: t - init if init else t for k, t in adapter.tensors.items()
           if (init := inits[k]) is not None}
    carried = {k: t.detach().clone() for k, t in adapter.tensors.items() if inits[k] is None}
    ternary = sparsify(tau, density, alpha, per_tensor)
    payload, coding_params = _encode_payload(ternary, encoding, carried)
    dense = adapter.tensors.values()
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name or _default_name(adapter),
        "encoding": encoding, "selection": "per_tensor" if per_tensor else "global",
        "density": density, "alpha": ternary.alpha, "sigma": ternary.sigma,
        "numel": ternary.numel, "coding": coding_params,
        "tensors": [{"name": n, "shape": list(s), "dtype": _dtype_name(d), "init": inits[n]}
                    for n, s, d in zip(ternary.names, ternary.shapes, ternary.dtypes)],
        "carried": [{"name": k, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                    for k, t in carried.items()],
        "adapter_config": adapter.config, "source": adapter.source,
        "sizes": {"original_bytes": sum(_nbytes(t) for t in dense),
                  "fp16_bytes": sum(t.numel() * 2 for t in dense),
                  "fp32_bytes": sum(t.numel() * 4 for t in dense),
                  "payload_bytes": sum(_nbytes(v) for v in payload.values()),
                  "carried_bytes": sum(_nbytes(t) for t in carried.values())},
        "payload_sha256": payload_digest(payload),
    }
    return CompressedExpert(meta=meta, _ternary=ternary, _carried=carried, _payload=payload)


def _default_name(adapter: Adapter) -> str:
    src = adapter.source
    return src.get("hub_id") or Path(src.get("path", "expert")).name


# --- reading ----------------------------------------------------------------------------------
_REQUIRED = ("format_version", "encoding", "selection", "density", "alpha", "sigma", "numel",
             "coding", "tensors", "carried", "adapter_config", "source", "sizes", "payload_sha256")


def load_expert(path: str | os.PathLike) -> CompressedExpert:
    """Open an expert file, reading and validating its header only (no payload)."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFileError(f"{path}: no such expert file")
    try:
        with safe_open(str(path), framework="np") as handle:
            raw = handle.metadata() or {}
            stored = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    except Exception as err:  # safetensors reports truncation and bad headers with its own types
        raise ExpertFileError(f"{path}: not a readable safetensors file, truncated or damaged "
                              f"({err})") from None
    if raw.get("format") != FORMAT_NAME:
        raise ExpertFileError(f"{path}: not a lorahub-compeft expert file (format "
                              f"{raw.get('format')!r}); compress a PEFT adapter with "
                              "`lorahub-compeft compress`")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ExpertFileError(f"{path}: header lacks {', '.join(missing)}")
    meta = {"format": FORMAT_NAME}
    try:
        for key, value in raw.items():
            meta[key] = value if key in ("format", "encoding", "selection", "payload_sha256", "name") \
                else json.loads(value)
    except json.JSONDecodeError as err:
        raise ExpertFileError(f"{path}: damaged header field ({err})") from None
    _validate_header(path, meta, stored)
    return CompressedExpert(meta=meta, path=path)


def _validate_header(path: Path, meta: dict, stored: dict[str, list[int]]) -> None:
    def fail(problem: str):
        raise ExpertFileError(f"{path}: {problem}")

    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        fail(f"format version {version} is newer than this lorahub-compeft reads "
             f"({FORMAT_VERSION}); upgrade the package (pip install -U lorahub-compeft)")
    if meta["encoding"] not in ENCODINGS:
        fail(f"unknown encoding {meta['encoding']!r}")
    tensors = meta["tensors"]
    if not isinstance(tensors, list) or not tensors:
        fail("header lists no tensors")
    for entry in tensors + meta["carried"]:
        shape = entry.get("shape")
        if entry.get("dtype") not in _DTYPES or not isinstance(shape, list) or \
                not all(isinstance(n, int) and n >= 0 for n in shape):
            fail(f"bad tensor entry {entry.get('name')!r} in the header")
    numel = sum(math.prod(e["shape"]) for e in tensors)
    if numel != meta["numel"]:
        fail(f"tensor shapes add up to {numel} values, header says {meta['numel']}")
    count = meta["coding"].get("count") if isinstance(meta["coding"], dict) else None
    density = meta["density"]
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        fail(f"density {density!r} out of (0, 1]")
    # The kept count must match the density: this bounds numel by the payload's size, so a
    # forged header cannot make the decoder allocate a huge tensor.
    slack = len(tensors) + 1
    if not isinstance(count, int) or abs(count - density * numel) > slack:
        fail(f"kept count {count} does not match density {density} of {numel} values")
    for entry in meta["carried"]:
        if stored.get(f"full.{entry['name']}") != entry["shape"]:
            fail(f"carried tensor {entry['name']} is missing or has the wrong shape")
    if "scales" not in stored:
        fail("no scales tensor")


def _read_payload(path: Path, meta: dict) -> tuple[TernaryVector, dict[str, torch.Tensor]]:
    if path is None:
        raise ExpertFileError("this expert has no file and no weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            payload = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:
        raise ExpertFileError(f"{path}: cannot read the payload ({err})") from None
    if payload_digest(payload) != meta["payload_sha256"]:
        raise ExpertFileError(f"{path}: payload checksum mismatch; the file is damaged, "
                              "download or compress it again")
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
    scales = payload["scales"]
    if scales.dtype != torch.float32 or scales.numel() not in (1, n_tensors):
        raise ExpertFileError(f"{path}: scales must be float32 with 1 or {n_tensors} values")
    entries = meta["tensors"]
    ternary = TernaryVector(names=[e["name"] for e in entries],
                            shapes=[tuple(e["shape"]) for e in entries],
                            dtypes=[_DTYPES[e["dtype"]] for e in entries],
                            positions=positions, signs=signs, scales=scales, sigma=meta["sigma"])
    carried = {e["name"]: payload[f"full.{e['name']}"] for e in meta["carried"]}
    for e in meta["carried"]:
        if carried[e["name"]].dtype != _DTYPES[e["dtype"]]:
            raise ExpertFileError(f"{path}: carried tensor {e['name']} has the wrong dtype")
    return ternary, carried
