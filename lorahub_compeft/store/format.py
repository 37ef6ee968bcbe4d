"""The expert file's header: format versions 1 and 2, their encoding, and every check a reader
makes before it trusts a field (docs/file-format.md describes each field).

Format version 2 (written now) keeps the header as one canonical JSON document (sorted keys,
no NaN), zlib-compressed and base85-encoded in the `header` metadata field, plus
`header_sha256`, the sha256 of that canonical JSON: together with the payload digest inside it,
every byte decoding reads is covered. Version 1 files (the fields as separate JSON strings,
payload digest without dtypes and shapes, no header digest) still load. What decoding
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
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lorahub_compeft.codecs import ere
from lorahub_compeft.io.adapters import config_problem, is_finite_number
from lorahub_compeft.io.residuals import is_residual


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
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                       torch.float64)}


class ExpertFileError(ValueError):
    """An expert file that cannot be trusted; the message names the file and the problem."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_digest(payload: dict[str, np.ndarray | torch.Tensor], version: int = FORMAT_VERSION) -> str:
    """sha256 of every payload tensor by sorted name: its name, (v2) dtype and shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(payload):
        value = payload[name]
        array = value.contiguous().reshape(-1).view(torch.uint8).numpy() if isinstance(value, torch.Tensor) else value
        digest.update(name.encode())
        if version >= 2:
            dtype = dtype_name(value.dtype) if isinstance(value, torch.Tensor) else str(value.dtype)
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


def sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted. safetensors writes them in hash
    order, which changes from process to process; sorted, the same expert gives the same bytes.
    The header keeps its length (padded with spaces, as the format allows), so no offset moves."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # never expected; keep the file as safetensors wrote it
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length:]


_COMMON = ("format_version", "tensors", "carried", "adapter_config", "source", "sizes",
           "payload_sha256")
_REQUIRED = {"compeft": _COMMON + ("encoding", "selection", "density", "alpha", "sigma", "numel",
                                   "coding"),
             "ere": _COMMON + ("ere",)}
_V1_STRINGS = ("format", "encoding", "selection", "payload_sha256", "name")


def read_header(path: str | os.PathLike) -> dict:
    """An expert file's header, read and validated (the payload is not read)."""
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
    return meta


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
            if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
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


