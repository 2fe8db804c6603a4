"""Table tests for the gossip compressors: exact outputs, wire sizes, unbiasedness, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from raygossip.algorithms.compressors import (
    COMPRESSORS,
    Compressed,
    index_dtype,
    make_compressor,
    pack_bits,
    unpack_bits,
)
from raygossip.algorithms.index_coding import BITMAP, decode_indices, encode_indices
from raygossip.errors import UserError

SEGMENTS = (7, 300, 1, 64, 129)  # a segment over 256 (uint16 indices), a singleton, odd sizes
D = sum(SEGMENTS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL = [  # (name, make_compressor keywords)
    ("identity", {}),
    ("top_k", {"ratio": 0.1}),
    ("random_k", {"ratio": 0.1}),
    ("random_k", {"ratio": 0.1, "scaled": True}),
    ("top_k", {"ratio": 0.1, "index_coding": "entropy"}),
    ("random_k", {"ratio": 0.3, "scaled": True, "index_coding": "entropy"}),
    ("qsgd", {"bits": 1}),
    ("qsgd", {"bits": 4, "scaled": True}),
    ("qsgd", {"bits": 8}),
    ("sign", {}),
]


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def vec(seed: int, d: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(d, generator=gen(seed), dtype=dtype)


def split(a: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1])


def unpack_ref(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Reference unpacking: numpy's MSB-first bit stream, `bits` bits per value, MSB first."""
    stream = np.unpackbits(packed)[: n * bits].reshape(n, bits).astype(np.int64)
    return stream @ (1 << np.arange(bits - 1, -1, -1))


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_top_k_keeps_largest_entries_per_segment(scope: str, ratio: float) -> None:
    x = vec(0)
    sizes = SEGMENTS if scope == "tensor" else (D,)
    expected = []
    for seg in split(x.numpy(), sizes):
        k = max(1, math.ceil(ratio * seg.size))
        keep = np.argsort(-np.abs(seg))[:k]
        out = np.zeros_like(seg)
        out[keep] = seg[keep]
        expected.append(out)
    c = make_compressor("top_k", SEGMENTS, ratio=ratio, scope=scope)
    np.testing.assert_array_equal(c.decompress(c.compress(x, None)).numpy(), np.concatenate(expected))


@pytest.mark.parametrize(
    "scope, expected",
    [
        ("tensor", [10, 0, 0, 0, 0, 0, 0, -0.4]),  # one entry from each segment
        ("global", [10, 9, 0, 0, 0, 0, 0, 0]),  # the two largest of the whole vector
    ],
)
def test_top_k_scope(scope: str, expected: list[float]) -> None:
    x = torch.tensor([10, 9, 8, 7, 0.1, 0.2, 0.3, -0.4])
    c = make_compressor("top_k", (4, 4), ratio=0.25, scope=scope)
    assert c.decompress(c.compress(x, None)).tolist() == pytest.approx(expected)


def test_random_k_picks_distinct_entries_reproducibly() -> None:
    x = vec(1)
    c = make_compressor("random_k", SEGMENTS, ratio=0.2)
    a, b, other = (c.compress(x, gen(s)) for s in (5, 5, 6))
    assert torch.equal(a.arrays["indices"], b.arrays["indices"])
    assert not torch.equal(a.arrays["indices"], other.arrays["indices"])
    y = c.decompress(a)
    kept = y != 0
    assert kept.sum().item() == sum(max(1, math.ceil(0.2 * s)) for s in SEGMENTS)  # all distinct
    assert torch.equal(y[kept], x[kept])


# --------------------------------------------------------------------------- entropy-coded index sets


@pytest.mark.parametrize("indices, size, coding, bits, stream", [
    # gaps 1, 0, 6: Rice b=1 costs 9 bits (b=0: 10, b=2: 10, bitmap: 16); quotients 0, 0, 3 -> 0 0 1110,
    # then remainders 1 0 0: 001110100, padded to two bytes
    ([1, 2, 9], 16, 1, 9, [0b00111010, 0b00000000]),
    ([0, 1, 2, 4, 5, 6, 7], 8, BITMAP, 8, [0b11101111]),  # Rice b=0 costs 8 bits too: the bitmap wins ties
    ([3], 4, 1, 3, [0b10100000]),  # gap 3: b=1 and b=2 cost 3 bits, the smaller b is taken: 10, then 1
    ([5], 8, 1, 4, [0b11010000]),  # gap 5: b=1, 2 and 3 cost 4 bits (b=0: 6); b=1: 110, then 1
    ([], 5, 0, 0, []),
])
def test_encode_indices_writes_the_smallest_code_bit_for_bit(indices, size, coding, bits, stream):
    idx = torch.tensor(indices, dtype=torch.int64)
    arrays = encode_indices([idx], [size])
    assert arrays["coding"].tolist() == [coding]
    assert arrays["bits"].tolist() == stream and len(stream) == math.ceil(bits / 8)
    assert entropy_index_bits(np.array(indices), size) == bits
    assert decode_indices(arrays, [size], [len(indices)])[0].tolist() == indices


def test_several_segments_share_one_stream_unary_parts_first():
    # segment 0: [1, 2, 9] of 16 (Rice b=1: unary 0 0 1110, remainders 1 0 0); segment 1: a bitmap 11101111;
    # segment 2: [5] of 8 (Rice b=1: unary 110, remainder 1). The stream holds both unary parts, then both
    # remainder parts, then the bitmap.
    parts = [torch.tensor(v) for v in ([1, 2, 9], [0, 1, 2, 4, 5, 6, 7], [5])]
    arrays = encode_indices(parts, [16, 8, 8])
    assert arrays["coding"].tolist() == [1, BITMAP, 1]
    bits = "001110" + "110" + "100" + "1" + "11101111"
    padded = bits + "0" * (-len(bits) % 8)
    assert arrays["bits"].tolist() == [int(padded[i:i + 8], 2) for i in range(0, len(padded), 8)]
    assert [p.tolist() for p in decode_indices(arrays, [16, 8, 8], [3, 7, 1])] == [p.tolist() for p in parts]


@pytest.mark.parametrize("name", ["top_k", "random_k"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("sizes", [SEGMENTS, (3, 0, 48_000, 10, 70_000), (1,)])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("device", DEVICES)
def test_entropy_coding_decodes_to_exactly_the_plain_dense_vector(name, ratio, sizes, scope, device):
    x = vec(12, sum(sizes)).to(device)
    x[: sum(sizes) // 3] = 0.0  # ties among zeros: top_k must still pick the same entries in both codings
    plain, entropy = (make_compressor(name, sizes, ratio=ratio, scope=scope, index_coding=c)
                      for c in ("plain", "entropy"))
    a, b = plain.compress(x, gen(4, device)), entropy.compress(x, gen(4, device))
    assert set(b.arrays) == {"values", "coding", "bits"}
    assert torch.equal(entropy.decompress(b), plain.decompress(a))
    assert b.nbytes <= a.nbytes + len(sizes)  # never more than the coding bytes worse than plain indices


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


@pytest.mark.parametrize("n, ratio, slack", [(48_000, 0.01, 1.02), (48_000, 0.1, 1.02), (25_000, 0.3, 1.06),
                                             (800, 0.05, 1.1)])
def test_a_random_index_set_costs_little_more_than_its_information(n, ratio, slack):
    k = math.ceil(ratio * n)
    idx = torch.sort(torch.randperm(n, generator=gen(n))[:k]).values
    arrays = encode_indices([idx], [n])
    bound_bits = log2_binomial(n, k)
    assert 8 * arrays["bits"].numel() <= slack * bound_bits + 8
    assert 8 * arrays["bits"].numel() >= bound_bits  # nothing beats the information bound


# --------------------------------------------------------------------------- (un)biasedness


def factor_qsgd(d: int, bits: int) -> float:
    s = 2**bits - 1
    return 1 / (1 + min(d / s**2, math.sqrt(d) / s))


BIAS_SEGMENTS = (8, 40, 20)  # ratio 0.25 keeps exactly a quarter of every segment
BIAS_CASES = [  # (name, keywords, expected mean multiplier per segment)
    ("random_k", {"ratio": 0.25, "scaled": True}, [1.0] * 3),
    ("random_k", {"ratio": 0.25}, [0.25] * 3),
    ("qsgd", {"bits": 1}, [1.0] * 3),
    ("qsgd", {"bits": 3}, [1.0] * 3),
    ("qsgd", {"bits": 1, "scaled": True}, [factor_qsgd(d, 1) for d in BIAS_SEGMENTS]),
]


@pytest.mark.parametrize("name, kw, multiplier", BIAS_CASES)
def test_mean_of_many_draws(name: str, kw: dict, multiplier: list[float]) -> None:
    # One call on `draws` tiled copies of x: every copy is its own segments, so it is compressed
    # independently of the others, and the copies' average is a mean over `draws` draws.
    x, draws = vec(2, sum(BIAS_SEGMENTS)), 2000
    expected = x * torch.tensor(np.repeat(multiplier, BIAS_SEGMENTS), dtype=torch.float32)
    c = make_compressor(name, BIAS_SEGMENTS * draws, **kw)
    mean = c.decompress(c.compress(x.repeat(draws), gen(3))).view(draws, -1).mean(dim=0)
    assert c.unbiased == (multiplier == [1.0] * 3)
    assert (mean - expected).norm() / x.norm() < 0.1  # about 2.5 sigma for 1-bit qsgd
    if not c.unbiased:  # the tolerance above is far tighter than the bias it must detect
        assert (expected - x).norm() / x.norm() > 0.7


# --------------------------------------------------------------------------- exact decoding


@pytest.mark.parametrize("bits", range(1, 9))
def test_qsgd_decodes_what_the_encoder_meant(bits: int) -> None:
    x = vec(4)
    x[3] = 0.0
    s = 2**bits - 1
    c = make_compressor("qsgd", SEGMENTS, bits=bits).compress(x, gen(7))
    w = c.to_wire()[1]
    norms = np.array([np.linalg.norm(seg) for seg in split(x.numpy(), SEGMENTS)], np.float32)
    np.testing.assert_allclose(w["norms"], norms, rtol=1e-6)
    norm_e = np.repeat(w["norms"], SEGMENTS)
    u = torch.rand(D, generator=gen(7)).numpy()
    levels = np.floor(np.float32(s) * (np.abs(x.numpy()) / norm_e) + u).clip(0, s)
    np.testing.assert_array_equal(unpack_ref(w["levels"], bits, D), levels)
    np.testing.assert_array_equal(np.unpackbits(w["signs"])[:D], x.numpy() < 0)
    decoded = np.where(x.numpy() < 0, -1, 1) * norm_e * levels / s
    y = make_compressor("qsgd", SEGMENTS, bits=bits).decompress(c)
    np.testing.assert_allclose(y.numpy(), decoded, rtol=1e-6, atol=0)


def test_qsgd_scaled_applies_choco_factor() -> None:
    x = vec(5)
    plain, scaled = (make_compressor("qsgd", SEGMENTS, bits=2, scaled=f) for f in (False, True))
    c = plain.compress(x, gen(1))
    factors = torch.tensor(np.repeat([factor_qsgd(d, 2) for d in SEGMENTS], SEGMENTS), dtype=torch.float32)
    torch.testing.assert_close(scaled.decompress(c), plain.decompress(c) * factors)


def test_sign_decodes_mean_abs_times_sign() -> None:
    x = vec(6)
    x[:3] = 0.0  # sign(0) decodes as +1
    c = make_compressor("sign", SEGMENTS)
    wire = c.compress(x, None).to_wire()[1]
    np.testing.assert_array_equal(wire["signs"], np.packbits(x.numpy() < 0))
    scales = np.repeat([np.abs(seg).mean() for seg in split(x.numpy(), SEGMENTS)], SEGMENTS)
    expected = np.where(x.numpy() < 0, -1.0, 1.0) * scales
    np.testing.assert_allclose(c.decompress(c.compress(x, None)).numpy(), expected, rtol=1e-6)


def test_identity_is_exact_and_does_not_alias() -> None:
    x = vec(7)
    c = make_compressor("identity", SEGMENTS)
    msg = c.compress(x, None)
    x_copy = x.clone()
    x += 1.0
    assert torch.equal(c.decompress(msg), x_copy)


# --------------------------------------------------------------------------- wire sizes


def index_bytes(max_segment: int) -> int:
    return 1 if max_segment <= 256 else 2 if max_segment <= 2**16 else 4 if max_segment <= 2**31 else 8


def entropy_index_bits(indices: np.ndarray, size: int) -> int:
    """Reference: the smaller of a bitmap and the Rice code of the sorted gaps at its best parameter (all tried)."""
    if len(indices) == 0:
        return 0
    gaps = np.diff(np.sort(indices.astype(np.int64)), prepend=-1) - 1
    rice = min(int((gaps >> b).sum()) + len(gaps) * (1 + b) for b in range(int(size).bit_length() + 2))
    return min(size, rice)


def expected_nbytes(name: str, sizes: tuple[int, ...], kw: dict, value_bytes: int, plain_indices=None) -> int:
    """The payload size by formula; entropy-coded index sets also need the plain message's indices."""
    d, n = sum(sizes), len(sizes)
    if name == "identity":
        return value_bytes * d
    if name in ("top_k", "random_k"):
        ks = [max(1, math.ceil(kw["ratio"] * s)) if s else 0 for s in sizes]
        if kw.get("index_coding") == "entropy":
            parts = np.split(plain_indices, np.cumsum(ks)[:-1])
            bits = sum(entropy_index_bits(part, s) for part, s in zip(parts, sizes))
            return sum(ks) * value_bytes + n + math.ceil(bits / 8)  # values, one coding byte per segment, bits
        return sum(ks) * (value_bytes + index_bytes(max(sizes)))
    if name == "qsgd":
        return 4 * n + math.ceil(d / 8) + math.ceil(d * kw["bits"] / 8)
    return math.ceil(d / 8) + 4 * n  # sign


NBYTES_CASES = [
    (name, kw, sizes, scope, dtype)
    for name, kw in ALL
    for sizes in (SEGMENTS, (7, 1, 64, 129, 256), (3, 40_000))
    for scope in ("tensor", "global")
    for dtype in (torch.float32, torch.float64)
]


@pytest.mark.parametrize("name, kw, sizes, scope, dtype", NBYTES_CASES)
def test_nbytes_matches_formula(name: str, kw: dict, sizes: tuple, scope: str, dtype: torch.dtype) -> None:
    x = vec(8, sum(sizes), dtype)
    c = make_compressor(name, sizes, scope=scope, **kw)
    msg = c.compress(x, gen(0))
    scoped = sizes if scope == "tensor" else (sum(sizes),)
    value_bytes = 8 if dtype == torch.float64 else 4
    plain = {**kw, "index_coding": "plain"}
    indices = make_compressor(name, sizes, scope=scope, **plain).compress(x, gen(0)).arrays.get("indices")
    assert msg.nbytes == expected_nbytes(name, scoped, kw, value_bytes, None if indices is None else indices.numpy())
    assert msg.nbytes == sum(a.nbytes for a in msg.to_wire()[1].values())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, kw", ALL)
@pytest.mark.parametrize("sizes", [SEGMENTS, (0, 5, 3)])
def test_round_trip_shape_dtype_device(device: str, name: str, kw: dict, sizes: tuple) -> None:
    x = vec(9, sum(sizes)).to(device)
    c = make_compressor(name, sizes, **kw)
    y = c.decompress(c.compress(x, gen(0, device)))
    assert (y.shape, y.dtype, y.device) == (x.shape, x.dtype, x.device)
    assert torch.isfinite(y).all()
    assert c.decompress(c.compress(x, None)).shape == x.shape  # default generator works too


@pytest.mark.parametrize("name", ["identity", "top_k", "random_k"])
def test_sparse_and_dense_keep_float64(name: str) -> None:
    x = vec(10, dtype=torch.float64)
    c = make_compressor(name, SEGMENTS, ratio=0.3)
    assert c.decompress(c.compress(x, gen(0))).dtype == torch.float64


@pytest.mark.parametrize("name, kw", ALL)
def test_wire_round_trip_is_lossless_and_quiet_on_read_only_arrays(name: str, kw: dict) -> None:
    x = vec(11)
    c = make_compressor(name, SEGMENTS, **kw)
    msg = c.compress(x, gen(2))
    wire = msg.to_wire()[1]
    for a in wire.values():
        a.flags.writeable = False  # as Ray's object store hands them back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = Compressed.from_wire(msg.numel, wire)
    assert back.numel == msg.numel and back.arrays.keys() == msg.arrays.keys()
    for k, a in msg.arrays.items():
        assert back.arrays[k].dtype == a.dtype and torch.equal(back.arrays[k], a)
    assert torch.equal(c.decompress(back), c.decompress(msg))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 100])
def test_bit_packing_round_trips(bits: int, n: int) -> None:
    values = torch.randint(0, 2**bits, (n,), generator=gen(n + bits), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(unpack_ref(packed.numpy(), bits, n), values.numpy())
    assert torch.equal(unpack_bits(packed, bits, n), values)


# --------------------------------------------------------------------------- registry, errors


@pytest.mark.parametrize(
    "n, dtype",
    [(0, torch.uint8), (1, torch.uint8), (256, torch.uint8), (257, torch.uint16), (48_000, torch.uint16),
     (2**16, torch.uint16), (2**16 + 1, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)],
)
def test_index_dtype(n: int, dtype: torch.dtype) -> None:
    assert index_dtype(n) == dtype
    if n:
        info = torch.iinfo(dtype)
        assert info.min <= 0 and n - 1 <= info.max


def test_registry_names() -> None:
    assert list(COMPRESSORS) == ["identity", "top_k", "random_k", "qsgd", "sign"]
    for name, kw in ALL:
        assert make_compressor(name, SEGMENTS, **kw).name == name


@pytest.mark.parametrize(
    "name, kw, field",
    [
        ("topk", {"ratio": 0.1}, "gossip.compressor.name"),
        ("top_k", {}, "gossip.compressor.ratio"),
        ("random_k", {}, "gossip.compressor.ratio"),
        ("top_k", {"ratio": 0.0}, "gossip.compressor.ratio"),
        ("random_k", {"ratio": -0.1}, "gossip.compressor.ratio"),
        ("top_k", {"ratio": 1.5}, "gossip.compressor.ratio"),
        ("qsgd", {}, "gossip.compressor.bits"),
        ("qsgd", {"bits": 0}, "gossip.compressor.bits"),
        ("qsgd", {"bits": 9}, "gossip.compressor.bits"),
        ("qsgd", {"bits": 2.5}, "gossip.compressor.bits"),
        ("sign", {"scope": "layer"}, "gossip.compressor.scope"),
        ("top_k", {"ratio": 0.1, "index_coding": "golomb"}, "gossip.compressor.index_coding"),
    ],
)
def test_bad_parameters_raise_user_error(name: str, kw: dict, field: str) -> None:
    with pytest.raises(UserError) as err:
        make_compressor(name, SEGMENTS, **kw)
    assert err.value.field == field
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
    if field.endswith("name"):
        assert "top_k" in str(err.value) and "qsgd" in str(err.value)
    if field.endswith("index_coding"):
        assert "plain, entropy" in str(err.value)


@pytest.mark.parametrize("ratio, sizes, ceil_ks, authors_ks", [
    # the MNIST MLP 784-128-10: weights, bias, weights, bias
    (0.1, (100352, 128, 1280, 10), (10036, 13, 128, 1), (10035, 12, 127, 0)),
    (0.01, (100352, 128, 1280, 10), (1004, 2, 13, 1), (1003, 1, 12, 0)),
    (0.5, (7, 1, 4), (4, 1, 2), (3, 0, 2)),
    (1.0, (5, 3), (5, 3), (5, 3)),
])
def test_top_k_counts_k_per_tensor_as_ceil_or_as_the_authors(ratio, sizes, ceil_ks, authors_ks):
    # the authors' count: int(n * (1 - K)) with K = 1 - ratio, the float arithmetic of their code
    assert authors_ks == tuple(int(n * (1 - (1 - ratio))) for n in sizes)
    for count, ks in (("ceil", ceil_ks), ("authors", authors_ks)):
        c = make_compressor("top_k", sizes, ratio=ratio, count=count)
        x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
        packed = c.compress(x, None)
        assert packed.arrays["values"].numel() == sum(ks), count
        y = c.decompress(packed)
        for seg_x, seg_y, k in zip(x.split(sizes), y.split(sizes), ks):
            assert int((seg_y != 0).sum()) == k
            if k:
                assert seg_y.abs().max() == seg_x.abs().max()  # the largest entry of each tensor is kept


def test_an_unknown_count_or_a_count_without_top_k_is_a_one_line_error():
    from raygossip.validation import load_config

    with pytest.raises(UserError, match=r"^gossip.compressor.count: must be one of ceil, authors; got 'floor'$"):
        make_compressor("top_k", (10,), ratio=0.1, count="floor")
    base = {"gossip": {"rule": "choco", "gamma": 0.5, "compressor": {"name": "qsgd", "bits": 4, "count": "authors"}}}
    with pytest.raises(UserError, match=r"^gossip.compressor.count: authors counts top_k's k per tensor; compressor "
                                        r"'qsgd' has no such k"):
        load_config(base=base)
