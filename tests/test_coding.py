import math

import numpy as np
import pytest

from lorahub_compeft.codecs.coding import (CodingError, decode_bitmask, decode_golomb,
                                           decode_signs, encode_bitmask, encode_golomb,
                                           encode_signs, payload_bits, ternary_entropy_bits)


def random_sparse(numel, density, seed=0):
    rng = np.random.default_rng(seed)
    n = int(round(density * numel))
    positions = np.sort(rng.choice(numel, n, replace=False)).astype(np.int64)
    signs = np.where(rng.random(n) < 0.5, 1, -1).astype(np.int8)
    return positions, signs


def reference_golomb_bits(positions, m):
    """Size of the classic (sequential) Golomb code with truncated-binary remainders."""
    gaps = np.diff(positions, prepend=-1) - 1
    total = 0
    for g in gaps.tolist():
        q, r = divmod(g, m)
        total += q + 1
        if m > 1:
            b = math.ceil(math.log2(m))
            u = 2**b - m
            total += b - 1 if r < u else b
    return total


# ------------------------------------------------------------------------------------------------ entropy


@pytest.mark.parametrize("k", [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9])
def test_entropy_matches_formula(k):
    h = -((1 - k) * math.log2(1 - k) + k * math.log2(k / 2))
    assert ternary_entropy_bits(k, 1000) == pytest.approx(1000 * h, rel=1e-12)


def test_entropy_known_values():
    assert ternary_entropy_bits(0.05, 1) == pytest.approx(0.3364, abs=1e-4)
    assert ternary_entropy_bits(1.0, 8) == pytest.approx(8.0)  # signs only
    assert ternary_entropy_bits(0.0, 8) == 0.0
    # maximum of ternary entropy is log2(3) at k = 2/3
    assert ternary_entropy_bits(2 / 3, 1) == pytest.approx(math.log2(3))
    with pytest.raises(ValueError):
        ternary_entropy_bits(1.5, 8)


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001, 65_537])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.3, 0.7, 1.0])
def test_golomb_and_signs_round_trip(numel, density):
    positions, signs = random_sparse(numel, density, seed=numel)
    streams, params = encode_golomb(positions, numel)
    assert all(s.dtype == np.uint8 and s.ndim == 1 for s in streams.values())
    assert set(params) == {"m", "count"} and params["count"] == positions.size
    decoded = decode_golomb(streams, params, numel)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, positions)
    out = decode_signs(encode_signs(signs), signs.size)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, signs)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 13, 16, 100, 1000])
def test_golomb_forced_m_round_trip_and_classic_size(m):
    numel = 3001
    positions, _ = random_sparse(numel, 0.08, seed=m)
    positions = np.unique(np.concatenate([[0, 1], positions, [numel - 1]]))  # smallest and largest gaps
    streams, params = encode_golomb(positions, numel, m=m)
    assert params["m"] == m
    np.testing.assert_array_equal(decode_golomb(streams, params, numel), positions)
    # split layout costs exactly the classic code's bits (up to byte padding of three streams)
    bits = reference_golomb_bits(positions, m)
    assert bits <= payload_bits(streams) < bits + 3 * 8


def test_chosen_m_is_no_worse_than_neighbours():
    numel = 20_000
    positions, _ = random_sparse(numel, 0.1, seed=3)
    streams, params = encode_golomb(positions, numel)
    chosen = reference_golomb_bits(positions, params["m"])
    for m in range(1, 3 * params["m"]):
        assert chosen <= reference_golomb_bits(positions, m)


def test_edge_positions():
    for positions, numel in [([], 0), ([], 10), ([0], 1), ([9], 10), ([0, 9], 10), (list(range(10)), 10)]:
        positions = np.array(positions, dtype=np.int64)
        streams, params = encode_golomb(positions, numel)
        np.testing.assert_array_equal(decode_golomb(streams, params, numel), positions)
    streams, params = encode_golomb(np.zeros(0, np.int64), 10)
    assert payload_bits(streams) == 0


@pytest.mark.parametrize("numel", [1, 13, 64, 1003])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_bitmask_matches_golomb(numel, density):
    positions, signs = random_sparse(numel, density, seed=7)
    masks = encode_bitmask(positions, signs, numel)
    assert set(masks) == {"pos", "neg"}
    assert all(s.size == -(-numel // 8) for s in masks.values())
    bm_positions, bm_signs = decode_bitmask(masks, numel)
    streams, params = encode_golomb(positions, numel)
    np.testing.assert_array_equal(bm_positions, decode_golomb(streams, params, numel))
    np.testing.assert_array_equal(bm_signs, decode_signs(encode_signs(signs), signs.size))
    np.testing.assert_array_equal(bm_signs, signs)


def test_sign_input_conventions():
    np.testing.assert_array_equal(decode_signs(encode_signs(np.array([True, False, True])), 3), [1, -1, 1])
    np.testing.assert_array_equal(decode_signs(encode_signs(np.array([2.5, -0.1, 1.0])), 3), [1, -1, 1])
    assert payload_bits({"a": encode_signs(np.ones(9, bool)), "b": np.zeros(3, np.uint8)}) == 40


@pytest.mark.parametrize("k", [0.05, 0.1, 0.2, 0.3])
def test_size_close_to_entropy(k):
    numel = 1 << 20
    positions, signs = random_sparse(numel, k, seed=int(k * 100))
    streams, _ = encode_golomb(positions, numel)
    bits = payload_bits(streams) + signs.size
    bound = ternary_entropy_bits(positions.size / numel, numel)
    assert bound < bits < 1.015 * bound


def test_encoders_reject_bad_input():
    with pytest.raises(ValueError):
        encode_golomb(np.array([3, 2]), 10)  # not sorted
    with pytest.raises(ValueError):
        encode_golomb(np.array([2, 2]), 10)  # duplicate
    with pytest.raises(ValueError):
        encode_golomb(np.array([10]), 10)  # out of range
    with pytest.raises(ValueError):
        encode_golomb(np.array([1]), 10, m=0)
    with pytest.raises(ValueError):
        encode_bitmask(np.array([1, 2]), np.array([1]), 10)  # sign count mismatch


# ------------------------------------------------------------------------------------------- corruption


@pytest.fixture
def coded():
    numel = 5000
    positions, _ = random_sparse(numel, 0.05, seed=11)
    streams, params = encode_golomb(positions, numel, m=13)  # b = 4, u = 3: all three streams used
    assert all(s.size > 1 for s in streams.values())
    return streams, params, numel


def _with(streams, name, value):
    return {**streams, name: value}


@pytest.mark.parametrize("name", ["unary", "low", "high"])
def test_truncated_streams_raise(coded, name):
    streams, params, numel = coded
    with pytest.raises(CodingError):
        decode_golomb(_with(streams, name, streams[name][:-1]), params, numel)


@pytest.mark.parametrize("name", ["unary", "low", "high"])
def test_trailing_bytes_raise(coded, name):
    streams, params, numel = coded
    with pytest.raises(CodingError):
        decode_golomb(_with(streams, name, np.append(streams[name], np.uint8(0))), params, numel)


def test_extra_unary_one_bit_raises(coded):
    streams, params, numel = coded
    unary = streams["unary"].copy()
    zeros = np.flatnonzero(np.unpackbits(unary) == 0)
    bits = np.unpackbits(unary)
    bits[zeros[0]] = 1
    with pytest.raises(CodingError, match="codes"):
        decode_golomb(_with(streams, "unary", np.packbits(bits)), params, numel)


def test_wrong_count_raises(coded):
    streams, params, numel = coded
    for count in (params["count"] - 1, params["count"] + 1, numel + 1):
        with pytest.raises(CodingError):
            decode_golomb(streams, {**params, "count": count}, numel)


def test_last_position_out_of_range_raises(coded):
    streams, params, numel = coded
    last = int(decode_golomb(streams, params, numel)[-1])
    with pytest.raises(CodingError, match="index out of range"):
        decode_golomb(streams, params, last)  # numel too small by exactly one
    # a long run of zero bits in unary pushes the quotient sum past numel
    bits = np.concatenate([np.zeros(numel // 13 + 8, np.uint8), np.unpackbits(streams["unary"])])
    with pytest.raises(CodingError, match="index out of range"):
        decode_golomb(_with(streams, "unary", np.packbits(bits)), params, numel)


def test_nonzero_padding_raises():
    numel = 100
    positions = np.array([3, 50, 97], np.int64)
    streams, params = encode_golomb(positions, numel, m=5)  # 3 codes x 2 low bits: 2 padding bits
    low = streams["low"].copy()
    low[-1] |= 1
    with pytest.raises(CodingError, match="padding"):
        decode_golomb(_with(streams, "low", low), params, numel)
    packed = encode_signs(np.array([1, -1, 1]))
    with pytest.raises(CodingError, match="padding"):
        decode_signs(packed | np.uint8(1), 3)


def test_bad_params_and_stream_types_raise(coded):
    streams, params, numel = coded
    for bad in ({**params, "m": 0}, {**params, "m": numel + 1}, {"count": params["count"]}, {**params, "m": 1.5}):
        with pytest.raises(CodingError):
            decode_golomb(streams, bad, numel)
    with pytest.raises(CodingError, match="missing"):
        decode_golomb({k: v for k, v in streams.items() if k != "high"}, params, numel)
    with pytest.raises(CodingError, match="uint8"):
        decode_golomb(_with(streams, "low", streams["low"].astype(np.int16)), params, numel)


def test_decode_signs_wrong_length_raises():
    packed = encode_signs(np.ones(20, bool))
    for count in (8, 25, 0):
        with pytest.raises(CodingError):
            decode_signs(packed, count)


def test_bitmask_corruption_raises():
    numel = 21
    positions = np.array([0, 5, 20], np.int64)
    masks = encode_bitmask(positions, np.array([1, -1, 1]), numel)
    pos = masks["pos"].copy()
    pos[0] |= masks["neg"][0]  # position 5 now both + and -
    with pytest.raises(CodingError, match="both"):
        decode_bitmask({**masks, "pos": pos}, numel)
    neg = masks["neg"].copy()
    neg[-1] |= 1  # bit 23 is padding for numel = 21
    with pytest.raises(CodingError, match="padding"):
        decode_bitmask({**masks, "neg": neg}, numel)
    with pytest.raises(CodingError):
        decode_bitmask({**masks, "pos": masks["pos"][:-1]}, numel)
    with pytest.raises(CodingError):
        decode_bitmask(masks, numel + 8)
