"""CompressedExpert and its file: one `.safetensors` file per ComPEFT-compressed adapter.

The file is plain safetensors (a JSON header, then raw bytes; never pickle). Tensors:
  stream.<name>  uint8 bit streams of the ternary vector (coding.py: golomb or bitmask)
  scales         float32, one scale (global selection) or one per tensor (per-tensor)
  full.<tensor>  adapter tensors that are not task vectors (modules_to_save heads), as is
The header says what they mean: encoding, density, alpha, sigma, the tensors' names, shapes,
dtypes and inits in order, the source adapter_config.json, where it came from, sizes, and the
sha256 of the payload (every tensor above, by sorted name, with its dtype and shape).

Format version 2 (written now) keeps all of that as one canonical JSON document (sorted keys,
no NaN), zlib-compressed and base85-encoded in the `header` metadata field (a zoo expert's
header is a fifth of the file instead of half), plus `header_sha256`, the sha256 of that
canonical JSON: together with the payload digest inside it, every byte decoding reads is
covered. Version 1 files (the fields as separate JSON strings, payload digest without dtypes
and shapes, no header digest) still load.
Opening reads and validates the header only; the payload is read, checked and decoded on
first use. Every malformed file is an ExpertFileError naming the field; what decoding
allocates is bounded by the file's size (MAX_VALUES_PER_BYTE) and MAX_NUMEL.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from . import coding, ere
from .adapters import (Adapter, config_problem, is_finite_number, load_adapter, save_adapter,
                       task_vector_init)
from .codec import TernaryVector, check_task_vector, sparsify
from .files import atomic_write_bytes, check_file_target
from .residual import is_residual

FORMAT_NAME = "lorahub-compeft-expert"
FORMAT_VERSION = 2
ENCODINGS = ("golomb", "bitmask")
SELECTIONS = ("global", "per_tensor")
# Decoding allocates about 6 bytes per value; a file may claim at most this many values per
# byte it holds (density >= ~0.0002 at 0.57 bits per kept value) and MAX_NUMEL in all.
MAX_VALUES_PER_BYTE = 4096
MAX_NUMEL = 2 ** 31
MAX_HEADER_BYTES = 16 << 20  # the decompressed v2 header
_MAX_RANK = 8
CODECS = ("compeft", "ere")  # the header's "codec"; files without one are ComPEFT
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                       torch.float64)}


class ExpertFileError(ValueError):
    """An expert file that cannot be trusted; the message names the file and the problem."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_digest(payload: dict[str, np.ndarray | torch.Tensor], version: int = FORMAT_VERSION) -> str:
    """sha256 of every payload tensor by sorted name: its name, (v2) dtype and shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(payload):
        value = payload[name]
        array = value.contiguous().reshape(-1).view(torch.uint8).numpy() if isinstance(value, torch.Tensor) else value
        digest.update(name.encode())
        if version >= 2:
            dtype = _dtype_name(value.dtype) if isinstance(value, torch.Tensor) else str(value.dtype)
            digest.update(json.dumps([dtype, list(value.shape)]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def canonical_json(value) -> bytes:
    """The one byte form of a header: sorted keys, no spaces, no NaN or infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


_OUTER = ("format", "format_version")  # kept as plain metadata, outside the compressed header


def encode_header(meta: dict) -> dict[str, str]:
    """The safetensors metadata of a v2 file."""
    body = canonical_json({k: v for k, v in meta.items() if k not in _OUTER})
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "header": base64.b85encode(zlib.compress(body, 9)).decode("ascii"),
            "header_sha256": hashlib.sha256(body).hexdigest()}


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
            dtypes = {e["name"]: _DTYPES[e["dtype"]] for e in self.meta["tensors"]}
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
            from .residual import export_model
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
        "tensors": [{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                     "init": inits[n]} for n, t in tau.items()],
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
    if codec == "ere":
        expert = CompressedExpert(meta=meta, _carried=carried, _payload=payload)
        expert._factors = _decode_ere(payload, meta)
        return expert
    return CompressedExpert(meta=meta, _ternary=ternary, _carried=carried, _payload=payload)


def _default_name(adapter: Adapter) -> str:
    src = adapter.source
    return src.get("hub_id") or Path(src.get("path", "expert")).name


# --- reading ----------------------------------------------------------------------------------
_COMMON = ("format_version", "tensors", "carried", "adapter_config", "source", "sizes",
           "payload_sha256")
_REQUIRED = {"compeft": _COMMON + ("encoding", "selection", "density", "alpha", "sigma", "numel",
                                   "coding"),
             "ere": _COMMON + ("ere",)}
_V1_STRINGS = ("format", "encoding", "selection", "payload_sha256", "name")


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
    version = raw.get("format_version")
    if version not in ("1", "2"):
        if isinstance(version, str) and version.isdigit() and int(version) > FORMAT_VERSION:
            raise ExpertFileError(f"{path}: written by a newer lorahub-compeft (file format "
                                  f"{version}, this one reads up to {FORMAT_VERSION}); upgrade "
                                  "it: pip install -U lorahub-compeft")
        raise ExpertFileError(f"{path}: header field format_version is {version!r}, not one of "
                              "this package's file formats (1, 2)")
    try:
        meta = _read_header_v2(path, raw) if version == "2" else _read_header_v1(path, raw)
    except RecursionError:
        raise ExpertFileError(f"{path}: header JSON nested too deeply") from None
    _validate_header(path, meta, stored)
    return CompressedExpert(meta=meta, path=path)


def _read_header_v1(path: Path, raw: dict[str, str]) -> dict:
    missing = [k for k in _REQUIRED["compeft"] if k not in raw]  # v1 files are all ComPEFT
    if missing:
        raise ExpertFileError(f"{path}: header lacks {', '.join(missing)}")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key in _V1_STRINGS else json.loads(value)
        except json.JSONDecodeError as err:
            raise ExpertFileError(f"{path}: damaged header field {key} ({err})") from None
    return meta


def _read_header_v2(path: Path, raw: dict[str, str]) -> dict:
    def fail(problem: str):
        raise ExpertFileError(f"{path}: {problem}; the file is damaged, compress it again")

    extra = sorted(set(raw) - {"format", "format_version", "header", "header_sha256"})
    if extra:
        fail(f"unexpected header fields {', '.join(extra)}")
    try:
        packed = base64.b85decode(raw.get("header", ""))
        inflate = zlib.decompressobj()
        body = inflate.decompress(packed, MAX_HEADER_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            fail(f"header field 'header' is truncated or inflates past {MAX_HEADER_BYTES >> 20} MB")
    except (ValueError, zlib.error) as err:
        fail(f"header field 'header' cannot be decoded ({err})")
    if hashlib.sha256(body).hexdigest() != raw.get("header_sha256"):
        fail("header checksum mismatch (header_sha256)")
    try:
        meta = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        fail(f"header field 'header' is not JSON ({err})")
    if not isinstance(meta, dict) or canonical_json(meta) != body:
        fail("header field 'header' is not a canonical JSON object")
    codec = meta.get("codec", "compeft")
    if codec not in CODECS:
        raise ExpertFileError(f"{path}: unknown codec {codec!r} (this lorahub-compeft reads "
                              f"{', '.join(CODECS)}); upgrade the package (pip install -U "
                              "lorahub-compeft)")
    missing = [k for k in _REQUIRED[codec] if k not in meta and k != "format_version"]
    if missing:
        fail(f"header lacks {', '.join(missing)}")
    return {"format": FORMAT_NAME, "format_version": 2, **meta}


def _is_count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _validate_header(path: Path, meta: dict, stored: dict[str, list[int]]) -> None:
    """Every field decoding or summary() reads, by type and range; then the sizes, so that
    decoding allocates no more than the file can hold. Linear in the header's size."""
    def fail(problem: str):
        raise ExpertFileError(f"{path}: {problem}")

    if meta.get("name") is not None and not isinstance(meta["name"], str):
        fail("header field name must be a string")
    if not isinstance(meta["payload_sha256"], str):
        fail("header field payload_sha256 must be a string")
    if not isinstance(meta["source"], dict):
        fail("header field source must be an object")
    sizes = meta["sizes"]
    if not isinstance(sizes, dict) or not all(_is_count(sizes.get(k), 1) for k in
                                              ("fp16_bytes", "fp32_bytes", "payload_bytes")) \
            or not _is_count(sizes.get("carried_bytes")) or not _is_count(sizes.get("original_bytes")):
        fail("header field sizes must hold positive byte counts")
    problem = config_problem(meta["adapter_config"])
    if problem:
        fail(f"header field adapter_config: {problem}")

    tensors, carried = meta["tensors"], meta["carried"]
    if not isinstance(tensors, list) or not tensors:
        fail("header field tensors lists no tensors")
    if not isinstance(carried, list):
        fail("header field carried must be a list")
    names = set()
    for field, entries in (("tensors", tensors), ("carried", carried)):
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                fail(f"header field {field}[{i}] is not an object")
            name, shape = entry.get("name"), entry.get("shape")
            if not isinstance(name, str) or not name or name in names:
                fail(f"header field {field}[{i}] has a missing or repeated name {name!r}")
            names.add(name)
            if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
                fail(f"header field {field}[{i}] ({name}) has dtype {entry.get('dtype')!r}")
            if not isinstance(shape, list) or len(shape) > _MAX_RANK or \
                    not all(_is_count(n, 1 if field == "tensors" else 0) for n in shape):
                fail(f"header field {field}[{i}] ({name}) has a bad shape {shape!r}")
            if field == "tensors" and not is_finite_number(entry.get("init")):
                fail(f"header field tensors[{i}] ({name}) has a bad init {entry.get('init')!r}")
            if field == "carried" and stored.get(f"full.{name}") != shape:
                fail(f"carried tensor {name} is missing or has the wrong shape")
    # What decoding allocates: bounded by the file's size, whatever the codec.
    limit = min(MAX_NUMEL, MAX_VALUES_PER_BYTE * path.stat().st_size)
    total = 0
    for entry in tensors:  # add up with an early stop: no product of forged sizes grows big
        total += math.prod(entry["shape"])
        if total > limit:
            fail(f"header claims more than {limit} values, more than a file of this size can "
                 "hold; the file is damaged or forged")
    if meta.get("codec", "compeft") == "ere":
        _validate_ere(meta, stored, fail)
    else:
        _validate_compeft(meta, stored, total, limit, fail)


def _validate_compeft(meta: dict, stored: dict[str, list[int]], total: int, limit: int,
                      fail) -> None:
    if meta["encoding"] not in ENCODINGS:
        fail(f"header field encoding is {meta['encoding']!r}, not one of {ENCODINGS}")
    if meta["selection"] not in SELECTIONS:
        fail(f"header field selection is {meta['selection']!r}, not one of {SELECTIONS}")
    for key, low in (("density", 0), ("alpha", 0), ("sigma", -1)):
        if not is_finite_number(meta[key]) or meta[key] <= low or (key == "density" and meta[key] > 1):
            fail(f"header field {key} is {meta[key]!r}, not a finite number in range")
    numel, tensors = meta["numel"], meta["tensors"]
    if _is_count(numel) and numel > limit:
        fail(f"header claims {numel} values, more than a file of this size can hold ({limit}); "
             "the file is damaged or forged")
    if not _is_count(numel, 1) or total != numel:
        fail(f"tensor shapes add up to {total} values, header field numel says {numel!r}")
    coding_params = meta["coding"]
    count = coding_params.get("count") if isinstance(coding_params, dict) else None
    if not _is_count(count) or count > numel:
        fail(f"header field coding has a bad kept count {count!r}")
    if meta["encoding"] == "golomb" and not _is_count(coding_params.get("m"), 1):
        fail(f"header field coding has a bad Golomb parameter {coding_params.get('m')!r}")
    # The kept count must match the density: a forged size must also forge the count.
    density, slack = meta["density"], len(tensors) + 1
    if abs(count - density * numel) > slack:
        fail(f"kept count {count} does not match density {density} of {numel} values")
    n_scales = len(tensors) if meta["selection"] == "per_tensor" else 1
    if stored.get("scales") not in ([n_scales], [1] if n_scales == 1 else None):
        fail(f"the scales tensor must hold {n_scales} value(s), "
             f"has shape {stored.get('scales')}")


def _validate_ere(meta: dict, stored: dict[str, list[int]], fail) -> None:
    entries = meta["tensors"]
    if not isinstance(meta["ere"], dict):
        fail("header field ere must be an object")
    if is_residual(meta["adapter_config"]):
        problem = ere.check_matrices_header([e["shape"] for e in entries], meta["ere"], stored)
    else:
        problem = ere.check_lora_header([e["name"] for e in entries],
                                        {e["name"]: tuple(e["shape"]) for e in entries},
                                        meta["ere"], stored)
    if problem:
        fail(problem)


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
        if abs(entry["init"]) + abs(float(scale)) > torch.finfo(_DTYPES[entry["dtype"]]).max:
            raise ExpertFileError(f"{path}: tensor {entry['name']}: its init and scale overflow "
                                  f"{entry['dtype']}; the file is damaged")
    ternary = TernaryVector(names=[e["name"] for e in entries],
                            shapes=[tuple(e["shape"]) for e in entries],
                            dtypes=[_DTYPES[e["dtype"]] for e in entries],
                            positions=positions, signs=signs, scales=scales, sigma=meta["sigma"])
    return ternary, _carried_of(path, payload, meta)


def _carried_of(path: Path, payload: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    carried = {e["name"]: payload[f"full.{e['name']}"] for e in meta["carried"]}
    for e in meta["carried"]:
        tensor = carried[e["name"]]
        if tensor.dtype != _DTYPES[e["dtype"]]:
            raise ExpertFileError(f"{path}: carried tensor {e['name']} has the wrong dtype")
        if not torch.isfinite(tensor).all():
            raise ExpertFileError(f"{path}: carried tensor {e['name']} holds NaN or infinity")
    return carried
