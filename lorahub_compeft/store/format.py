"""The expert file's header: format versions 1 and 2, their encoding, and every check a reader
makes before it trusts a field (docs/file-format.md describes each field).

Format version 2 (written now) keeps the header as one canonical JSON document (sorted keys,
no NaN), zlib-compressed and base85-encoded in the `header` metadata field, plus
`header_sha256`, the sha256 of that canonical JSON: together with the payload digest inside it,
every byte decoding reads is covered. Version 1 files (the fields as separate JSON strings,
payload digest without dtypes and shapes, no header digest) still load. What decoding
allocates is bounded by the file's size (MAX_VALUES_PER_BYTE) and MAX_NUMEL. The fields every
file has are checked here; those of its codec (the header's "codec", ComPEFT when absent) by
the codec itself (codecs/).
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

from lorahub_compeft.codecs import base as codecs
from lorahub_compeft.codecs.base import DTYPES, CodecError, is_count
from lorahub_compeft.io.adapters import config_problem, is_finite_number, rank_problem


FORMAT_NAME = "lorahub-compeft-expert"
FORMAT_VERSION = 2
# A file may claim at most this many values per byte it holds (density >= ~0.0002 at 0.57 bits
# per kept value) and MAX_NUMEL in all. Decoding a residual's state_dict peaks (RSS, measured)
# at 8.3 bytes per value for float32 tensors and 6.3 for float16 (ComPEFT), 8.8 and 10.2 (ERE,
# on a 2M-value file): docs/file-format.md.
MAX_VALUES_PER_BYTE = 4096
MAX_NUMEL = 2 ** 31
MAX_HEADER_BYTES = 16 << 20  # the decompressed v2 header
_MAX_RANK = 8


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


# Every file's fields; each codec requires its own `header_fields` beside them.
_COMMON = ("format_version", "tensors", "carried", "adapter_config", "source", "sizes",
           "payload_sha256")
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
    required = _COMMON + codecs.get(codecs.DEFAULT_CODEC).header_fields  # v1 files are all ComPEFT
    missing = [k for k in required if k not in raw]
    if missing:
        raise ExpertFileError(f"{path}: header lacks {', '.join(missing)}")
    if "codec" in raw:  # format 1 predates codecs: a codec field there is damage, not ERE
        raise ExpertFileError(f"{path}: header field codec is not one format 1 has (its files "
                              "are all ComPEFT); the file is damaged, compress it again")
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
    try:
        canonical = canonical_json(meta)
    except ValueError:  # json.loads reads NaN and Infinity; the format never holds them
        fail("header field 'header' holds NaN or Infinity")
    if not isinstance(meta, dict) or canonical != body:
        fail("header field 'header' is not a canonical JSON object")
    codec = meta.get("codec", codecs.DEFAULT_CODEC)
    if codec not in codecs.names():
        raise ExpertFileError(f"{path}: unknown codec {codec!r} (this lorahub-compeft reads "
                              f"{', '.join(codecs.names())}); upgrade the package (pip install -U "
                              "lorahub-compeft)")
    required = _COMMON + codecs.get(codec).header_fields
    missing = [k for k in required if k not in meta and k != "format_version"]
    if missing:
        fail(f"header lacks {', '.join(missing)}")
    return {"format": FORMAT_NAME, "format_version": 2, **meta}


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
    if not isinstance(sizes, dict) or not all(is_count(sizes.get(k), 1) for k in
                                              ("fp16_bytes", "fp32_bytes", "payload_bytes")) \
            or not is_count(sizes.get("carried_bytes")) or not is_count(sizes.get("original_bytes")):
        fail("header field sizes must hold positive byte counts")
    problem = config_problem(meta["adapter_config"], regex_ok=False)
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
                    not all(is_count(n, 1 if field == "tensors" else 0) for n in shape):
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
    try:
        codecs.codec_of(meta).validate(meta, stored, total, limit)
    except CodecError as err:
        fail(str(err))
    # A forged r would make PEFT allocate r rows per module, whatever the tensors hold.
    problem = rank_problem(meta["adapter_config"], {e["name"]: e["shape"] for e in tensors})
    if problem:
        fail(f"header field adapter_config: {problem}")
