"""Bit-level storage for ComPEFT's sparse ternary vectors (numpy only).

A ternary vector of length ``numel`` is its ``n`` kept positions (sorted, unique) plus one sign per kept
position.  Positions are stored as gaps (zeros skipped before each kept position) with a Golomb code of
parameter ``m``: each gap ``g`` splits into ``q = g // m``, written in unary (``q`` zero bits then a one bit)
in stream ``"unary"``, and ``r = g % m``, written in truncated binary (``b = ceil(log2 m)``,
``u = 2**b - m``: ``r < u`` takes ``b-1`` bits, otherwise ``r+u`` takes ``b`` bits).  So that decoding needs
no sequential scan, the truncated-binary bits are split into two streams: ``"low"`` holds the first ``b-1``
bits of every code at fixed width and ``"high"`` holds the last bit of only the ``b``-bit codes, in order;
the total size equals the classic code.  Signs are one bit per kept position (1 = +).  The dense
alternative is two ``numel``-bit masks ``"pos"`` and ``"neg"``.  All streams are 1-D uint8, packed
MSB-first (numpy's default ``bitorder='big'``), with zero padding in the last byte and no trailing bytes.
"""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = [
    "CodingError",
    "ternary_entropy_bits",
    "encode_golomb",
    "decode_golomb",
    "encode_signs",
    "decode_signs",
    "encode_bitmask",
    "decode_bitmask",
    "payload_bits",
    "encode_ternary",
    "decode_ternary",
]


class CodingError(ValueError):
    """A coded stream is malformed or inconsistent with its parameters."""


# ----------------------------------------------------------------------------------------------- helpers


def _numel(numel) -> int:
    numel = operator.index(numel)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return numel


def _check_positions(positions, numel: int) -> np.ndarray:
    pos = np.asarray(positions)
    if pos.ndim != 1:
        raise ValueError(f"positions must be 1-D, got shape {pos.shape}")
    if pos.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions must be integers, got {pos.dtype}")
    pos = pos.astype(np.int64, copy=False)
    if pos[0] < 0 or pos[-1] >= numel or np.any(pos[1:] <= pos[:-1]):
        raise ValueError(f"positions must be strictly increasing and within [0, {numel})")
    return pos


def _is_plus(signs, count: int | None = None) -> np.ndarray:
    s = np.asarray(signs)
    if s.ndim != 1 or (count is not None and s.size != count):
        raise ValueError(f"signs must be 1-D of length {count}, got shape {s.shape}")
    return s if s.dtype == np.bool_ else s > 0


def _stream(streams, name: str) -> np.ndarray:
    try:
        buf = streams[name]
    except (KeyError, TypeError):
        raise CodingError(f"missing stream {name!r}") from None
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise CodingError(f"stream {name!r} must be a 1-D uint8 array")
    return buf


def _param(params, name: str) -> int:
    value = params.get(name) if isinstance(params, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise CodingError(f"parameter {name!r} must be a non-negative int, got {value!r}")
    return int(value)


def _check_packed(buf: np.ndarray, nbits: int, name: str) -> None:
    """Exactly ceil(nbits/8) bytes and zero padding, so every stream has one canonical form."""
    nbytes = -(-nbits // 8)
    if buf.size != nbytes:
        raise CodingError(f"stream {name!r} has {buf.size} bytes, expected {nbytes} for {nbits} bits")
    if nbits % 8 and buf[-1] & ((1 << (8 - nbits % 8)) - 1):
        raise CodingError(f"stream {name!r} has nonzero padding bits")


def _unpack(buf: np.ndarray, nbits: int, name: str) -> np.ndarray:
    _check_packed(buf, nbits, name)
    return np.unpackbits(buf, count=nbits)


def _layout(m: int) -> tuple[int, int]:
    """(w, u): short remainder codes (r < u) take w bits, the others w + 1 bits."""
    if m == 1:
        return 0, 1  # no remainder bits at all: every code is "short" with zero bits
    b = (m - 1).bit_length()  # ceil(log2 m)
    return b - 1, (1 << b) - m


# ---------------------------------------------------------------------------------------------- entropy


def ternary_entropy_bits(density: float, numel: int) -> float:
    """ComPEFT's entropy bound H(k) * numel with H(k) = -((1-k) log2(1-k) + k log2(k/2))."""
    k = float(density)
    numel = _numel(numel)
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if k == 0.0:
        return 0.0
    h = -k * math.log2(k / 2)
    if k < 1.0:
        h -= (1 - k) * math.log2(1 - k)
    return h * numel


# ----------------------------------------------------------------------------------------------- Golomb


def _golomb_bits(gaps: np.ndarray, m: int) -> int:
    w, u = _layout(m)
    q = gaps // m
    r = gaps - q * m
    return int(q.sum()) + gaps.size * (1 + w) + int(np.count_nonzero(r >= u))


def _choose_m(gaps: np.ndarray, numel: int) -> int:
    """Smallest exact size among a few m around the optimum for a geometric source (Gallager-van Voorhis)."""
    if gaps.size == 0:
        return 1
    p = gaps.size / numel
    m0 = 1 if p >= 1 else math.ceil(math.log(2 - p) / -math.log1p(-p))
    m0 = min(m0, numel)
    candidates = range(max(1, m0 - 2), min(m0 + 2, numel) + 1)
    return min(candidates, key=lambda m: (_golomb_bits(gaps, m), m))


def encode_golomb(positions, numel: int, *, m: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Golomb-code sorted unique positions; ``m`` is chosen for minimal size unless given."""
    numel = _numel(numel)
    pos = _check_positions(positions, numel)
    n = pos.size
    gaps = np.diff(pos, prepend=-1) - 1  # zeros skipped before each kept position
    if m is None:
        m = _choose_m(gaps, numel)
    m = operator.index(m)
    if not 1 <= m <= max(numel, 1):
        raise ValueError(f"m must be in [1, {max(numel, 1)}], got {m}")
    w, u = _layout(m)
    q = gaps // m
    r = gaps - q * m

    ends = np.cumsum(q + 1) - 1  # bit index of each unary terminator
    unary = np.zeros(int(ends[-1]) + 1 if n else 0, dtype=bool)
    unary[ends] = True

    long = r >= u
    code = np.where(long, r + u, r)
    v = np.where(long, code >> 1, code)  # first w bits of each code
    low = ((v[:, None] >> np.arange(w - 1, -1, -1)) & 1).astype(np.uint8).ravel()
    high = (code[long] & 1).astype(np.uint8)

    streams = {"unary": np.packbits(unary), "low": np.packbits(low), "high": np.packbits(high)}
    return streams, {"m": m, "count": n}


def decode_golomb(streams: dict[str, np.ndarray], params: dict, numel: int) -> np.ndarray:
    """Inverse of :func:`encode_golomb`; validates everything and returns sorted int64 positions."""
    numel = _numel(numel)
    m, count = _param(params, "m"), _param(params, "count")
    if not 1 <= m <= max(numel, 1):
        raise CodingError(f"Golomb parameter m={m} out of range [1, {max(numel, 1)}]")
    if count > numel:
        raise CodingError(f"count {count} exceeds numel {numel}")
    unary, low, high = (_stream(streams, k) for k in ("unary", "low", "high"))
    w, u = _layout(m)

    ends = np.flatnonzero(np.unpackbits(unary).view(bool))  # bool view: ~10x faster than on uint8
    if ends.size != count:
        raise CodingError(f"stream 'unary' holds {ends.size} codes, expected {count}")
    if unary.size != (int(ends[-1]) // 8 + 1 if count else 0):
        raise CodingError("stream 'unary' has trailing bytes after its last code")
    # sum(q) * m alone already bounds the last position; check before any arithmetic can overflow
    if count and (int(ends[-1]) + 1 - count) * m + count > numel:
        raise CodingError(f"index out of range: quotients alone exceed numel {numel}")

    v = np.zeros(count, np.int64)
    if w:
        bits = _unpack(low, count * w, "low").reshape(count, w)
        for j in range(w):  # loop over the bit width only
            v <<= 1
            v |= bits[:, j]
    else:
        _check_packed(low, 0, "low")
    long = v >= u
    extra = _unpack(high, int(np.count_nonzero(long)), "high")

    # r = v for short codes and 2 v + extra - u for long ones (v >= u); in place, without boolean
    # masks in the arithmetic (numpy's masked indexing is several times slower than integer indexing)
    gaps = np.diff(ends, prepend=-1)  # q + 1
    gaps -= 1
    gaps *= m
    gaps += v
    np.subtract(v, u, out=v)
    np.maximum(v, 0, out=v)  # v - u on long codes, 0 on short ones
    gaps += v
    if extra.size == count:
        gaps += extra
    else:
        gaps[np.flatnonzero(long)] += extra
    gaps += 1
    positions = np.cumsum(gaps)
    positions -= 1
    if count and positions[-1] >= numel:
        raise CodingError(f"index out of range: last position {int(positions[-1])} >= numel {numel}")
    return positions


# ------------------------------------------------------------------------------------------------ signs


def encode_signs(signs) -> np.ndarray:
    """One bit per sign, 1 for + (True or > 0)."""
    return np.packbits(_is_plus(signs))


def decode_signs(packed: np.ndarray, count: int) -> np.ndarray:
    """int8 array of +1/-1 of length ``count``."""
    bits = _unpack(_stream({"signs": packed}, "signs"), _param({"count": count}, "count"), "signs")
    signs = bits.view(np.int8)
    signs <<= 1
    signs -= 1
    return signs


# ---------------------------------------------------------------------------------------------- bitmask


def encode_bitmask(positions, signs, numel: int) -> dict[str, np.ndarray]:
    """Two dense numel-bit masks: kept positions with sign + and with sign -."""
    numel = _numel(numel)
    pos = _check_positions(positions, numel)
    plus = _is_plus(signs, pos.size)
    masks = {}
    for name, sel in (("pos", plus), ("neg", ~plus)):
        bits = np.zeros(numel, dtype=bool)
        bits[pos[sel]] = True
        masks[name] = np.packbits(bits)
    return masks


def decode_bitmask(streams: dict[str, np.ndarray], numel: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted int64 positions, int8 signs) from the two masks."""
    numel = _numel(numel)
    pos, neg = _stream(streams, "pos"), _stream(streams, "neg")
    _check_packed(pos, numel, "pos")
    _check_packed(neg, numel, "neg")
    if np.any(pos & neg):
        raise CodingError("a position is set in both the 'pos' and the 'neg' mask")
    positions = np.flatnonzero(np.unpackbits(pos | neg, count=numel).view(bool))
    signs = np.where(np.unpackbits(pos, count=numel)[positions].astype(bool), 1, -1).astype(np.int8)
    return positions.astype(np.int64, copy=False), signs


def payload_bits(streams: dict[str, np.ndarray]) -> int:
    """Stored size in bits (8 per byte of every stream)."""
    return 8 * sum(int(np.asarray(s).nbytes) for s in streams.values())


def encode_ternary(positions, signs, numel: int, encoding: str) -> tuple[dict[str, np.ndarray], dict]:
    """A ternary vector's streams and the parameters a reader needs (both encodings: "count")."""
    if encoding == "golomb":
        streams, params = encode_golomb(positions, numel)
        return dict(streams, signs=encode_signs(np.asarray(signs) > 0)), params
    return encode_bitmask(positions, signs, numel), {"count": len(positions)}


def decode_ternary(streams: dict[str, np.ndarray], params: dict, numel: int, encoding: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(positions, signs) from `encode_ternary`'s streams, checked against params["count"]."""
    if encoding == "golomb":
        streams = dict(streams)
        signs_packed = streams.pop("signs", None)
        if signs_packed is None:
            raise CodingError("no sign stream")
        positions = decode_golomb(streams, params, numel)
        signs = decode_signs(signs_packed, len(positions))
    else:
        positions, signs = decode_bitmask(streams, numel)
    if len(positions) != params["count"]:
        raise CodingError(f"the streams hold {len(positions)} kept values, header field coding "
                          f"says {params['count']}")
    return positions, signs
