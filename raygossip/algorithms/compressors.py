"""Gossip compressors: flat parameter vector -> exact wire payload (Compressed) -> dense vector."""

from __future__ import annotations

import warnings

import itertools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..registry import keyword_params
from .bits import pack_bits, unpack_bits
from .index_coding import decode_indices, encode_indices

__all__ = [
    "COMPRESSORS",
    "INDEX_CODINGS",
    "SCOPES",
    "Compressed",
    "Compressor",
    "identity",
    "index_dtype",
    "make_compressor",
    "pack_bits",
    "qsgd",
    "random_k",
    "sign",
    "top_k",
    "unpack_bits",
]

SCOPES = ("tensor", "global")
INDEX_CODINGS = ("plain", "entropy")  # how top_k / random_k send their index sets
_WIRE_FLOATS = (torch.float16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- wire record


@dataclass(frozen=True)
class Compressed:
    """One compressed message: the arrays that go on the wire and the dense length they encode.

    `arrays` holds only dtypes numpy can hold; `nbytes` is the exact payload size.
    """

    arrays: dict[str, torch.Tensor]
    numel: int

    @property
    def nbytes(self) -> int:
        """Exact wire payload size: sum of numel * element_size over the arrays."""
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def to_wire(self) -> tuple[int, dict[str, np.ndarray]]:
        """(numel, the arrays as numpy) for another process; CPU tensors without a copy (compressors return fresh
        tensors, and every transport copies them before the sender could change them)."""
        return self.numel, {k: v.detach().cpu().numpy() for k, v in self.arrays.items()}

    @staticmethod
    def from_wire(numel: int, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> "Compressed":
        """A received message on `device`; on the CPU without a copy, read-only arrays (Ray's object store hands
        them out so) included: decompressors only read them."""
        device = torch.device(device)
        if device.type != "cpu":
            return Compressed({k: torch.tensor(np.asarray(a), device=device) for k, a in arrays.items()}, int(numel))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return Compressed({k: torch.from_numpy(np.asarray(a)) for k, a in arrays.items()}, int(numel))


class Compressor(NamedTuple):
    """A named compress/decompress pair; `unbiased` says whether E[decompress(compress(x))] = x."""

    name: str
    compress: Callable[[torch.Tensor, torch.Generator | None], Compressed]
    decompress: Callable[[Compressed], torch.Tensor]
    unbiased: bool


# --------------------------------------------------------------------------- small helpers


def index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype holding indices 0..n-1: uint8 (n <= 2**8), uint16 (n <= 2**16), int32, else int64.

    Unsigned types are used on the wire although torch reads a uint8 index tensor as a boolean mask:
    decompressors always widen indices to int64 before indexing, so this is safe.
    """
    if n < 0:
        raise ValueError(f"index_dtype: n must be >= 0, got {n}")
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 16:
        return torch.uint16
    if n <= 1 << 31:
        return torch.int32
    return torch.int64


def _wire_float(dtype: torch.dtype) -> torch.dtype:
    """Values travel at their own dtype when numpy can hold it, else (bfloat16...) as float32."""
    return dtype if dtype in _WIRE_FLOATS else torch.float32


def _check_segments(segments: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in segments)
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"segments must be a non-empty sequence of sizes >= 0, got {sizes}")
    return sizes


def _check_input(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    if x.dim() != 1 or x.numel() != sum(sizes):
        raise ValueError(f"expected a flat vector of length {sum(sizes)}, got shape {tuple(x.shape)}")
    return x.detach()


def _expand(per_segment: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Repeat one value per segment over that segment's entries (length sum(sizes))."""
    counts = torch.tensor(sizes, device=per_segment.device)
    return torch.repeat_interleave(per_segment, counts, output_size=sum(sizes))


def _segment_stat(
    x: torch.Tensor, sizes: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """fn applied to every segment of x, as one float32 tensor (the per-segment wire scalars)."""
    return torch.stack([fn(seg) for seg in x.split(sizes)]).to(torch.float32)


COUNTS = ("ceil", "authors")  # gossip.compressor.count: how top_k's k per tensor follows from the ratio


def _keep_count(size: int, ratio: float, count: str = "ceil") -> int:
    """k of a segment: "ceil" max(1, ceil(ratio * size)); "authors" the AdaGossip/CHOCO code's int(size * (1 - K))
    with K = 1 - ratio its dropped fraction, in the same float arithmetic (truncated: 0 for a small tensor, which
    then sends nothing)."""
    if count == "authors":
        return min(size, int(size * (1 - (1 - ratio))))
    return min(size, max(1, math.ceil(ratio * size)))


def _check_ratio(ratio: float | None, name: str) -> float:
    field = "gossip.compressor.ratio"
    if ratio is None:
        raise UserError(field, f"compressor {name!r} needs a ratio (fraction kept, in (0, 1])")
    if not 0.0 < float(ratio) <= 1.0:
        raise UserError(field, f"must be in (0, 1] (fraction of entries kept), got {ratio}")
    return float(ratio)


def _check_index_coding(coding: str) -> str:
    if coding not in INDEX_CODINGS:
        raise UserError("gossip.compressor.index_coding",
                        f"unknown index coding {coding!r}; choose one of {', '.join(INDEX_CODINGS)}")
    return coding


def _check_bits(bits: int | None) -> int:
    field = "gossip.compressor.bits"
    if bits is None:
        raise UserError(field, "compressor 'qsgd' needs bits (an integer in 1..8)")
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 8:
        raise UserError(field, f"must be an integer in 1..8, got {bits}")
    return int(bits)


# --------------------------------------------------------------------------- sparse layout
# top_k / random_k wire: "values" (input float dtype), all segments concatenated in segment order,
# k_s entries for segment s, and their index sets. The k_s are fixed by (segments, ratio), so they are
# not sent. index_coding "plain": "indices", local to their segment, at index_dtype(max segment size).
# "entropy": "coding" and "bits" of index_coding.encode_indices, values in ascending index order.


def _sparse_pack(values: list[torch.Tensor], indices: list[torch.Tensor], sizes: tuple[int, ...], numel: int,
                 coding: str) -> Compressed:
    if coding == "plain":
        idx = torch.cat(indices).to(index_dtype(max(sizes)))
        return Compressed({"values": torch.cat(values), "indices": idx}, numel)
    order = [torch.argsort(i) for i in indices]
    arrays = encode_indices([i[o] for i, o in zip(indices, order)], sizes)
    return Compressed({"values": torch.cat([v[o] for v, o in zip(values, order)]), **arrays}, numel)


def _sparse_decompress(c: Compressed, sizes: tuple[int, ...], ks: tuple[int, ...]) -> torch.Tensor:
    values = c.arrays["values"]
    if "indices" in c.arrays:
        local = c.arrays["indices"].to(torch.int64)  # widen before indexing
    else:
        local = torch.cat(decode_indices(c.arrays, sizes, ks))
    offsets = torch.tensor([0, *itertools.accumulate(sizes[:-1])], device=values.device)
    where = local.to(values.device) + _expand(offsets, ks)
    out = torch.zeros(c.numel, dtype=values.dtype, device=values.device)
    out[where] = values
    return out


# --------------------------------------------------------------------------- compressors


def identity(segments: Sequence[int]) -> Compressor:
    """Exact gossip: the dense vector at its own dtype (float32 in practice), 4*d bytes."""
    sizes = _check_segments(segments)

    def compress(x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        x = _check_input(x, sizes)
        return Compressed({"values": x.to(_wire_float(x.dtype), copy=True)}, x.numel())

    def decompress(c: Compressed) -> torch.Tensor:
        return c.arrays["values"].clone()

    return Compressor("identity", compress, decompress, unbiased=True)


def top_k(segments: Sequence[int], *, ratio: float | None, index_coding: str = "plain",
          count: str = "ceil") -> Compressor:
    """Keep, per segment, the k = max(1, ceil(ratio*size)) entries of largest |value| (biased); count "authors":
    k = int(size * (1 - K)), K = 1 - ratio, as the AdaGossip code counts (_keep_count).

    index_coding: "plain" integer indices, or "entropy" (Rice-coded gaps or a bitmap per segment).
    """
    ratio = _check_ratio(ratio, "top_k")
    coding = _check_index_coding(index_coding)
    sizes = _check_segments(segments)
    if count not in COUNTS:
        raise UserError("gossip.compressor.count", f"must be one of {', '.join(COUNTS)}; got {count!r}")
    ks = tuple(_keep_count(s, ratio, count) for s in sizes)

    def compress(x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        x = _check_input(x, sizes).to(_wire_float(x.dtype))
        idx = [torch.topk(seg.abs(), k, sorted=False).indices for seg, k in zip(x.split(sizes), ks)]
        vals = [seg[i] for seg, i in zip(x.split(sizes), idx)]
        return _sparse_pack(vals, idx, sizes, x.numel(), coding)

    return Compressor("top_k", compress, lambda c: _sparse_decompress(c, sizes, ks), unbiased=False)


def random_k(segments: Sequence[int], *, ratio: float | None, scaled: bool = False,
             index_coding: str = "plain") -> Compressor:
    """Keep, per segment, k uniformly random entries (without replacement, from `generator`).

    Unscaled (CHOCO's choice) E[C(x)] = (k/size) x; scaled multiplies kept values by size/k,
    which makes it unbiased. index_coding as for top_k.
    """
    ratio = _check_ratio(ratio, "random_k")
    coding = _check_index_coding(index_coding)
    sizes = _check_segments(segments)
    ks = tuple(_keep_count(s, ratio) for s in sizes)

    def compress(x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        x = _check_input(x, sizes).to(_wire_float(x.dtype))
        idx, vals = [], []
        for seg, k in zip(x.split(sizes), ks):
            i = torch.randperm(seg.numel(), generator=generator, device=x.device)[:k]
            v = seg[i]
            idx.append(i)
            vals.append(v * (seg.numel() / k) if scaled and k else v)
        return _sparse_pack(vals, idx, sizes, x.numel(), coding)

    return Compressor("random_k", compress, lambda c: _sparse_decompress(c, sizes, ks), unbiased=scaled)


def qsgd(segments: Sequence[int], *, bits: int | None, scaled: bool = False) -> Compressor:
    """QSGD with s = 2**bits - 1 levels and stochastic rounding; unbiased unless `scaled`.

    Per segment: norm = ||x||_2, level = floor(s*|x|/norm + u), u ~ U[0,1), value =
    sign * norm * level / s. `scaled` multiplies the decoded segment by CHOCO's factor
    1 / (1 + min(d/s^2, sqrt(d)/s)) (d = segment size), which shrinks it: biased, lower variance.
    Wire: "norms" (float32, one per segment), "signs" (1 bit per entry, set for x < 0), "levels"
    (`bits` bits per entry), both bit streams over the whole vector as `pack_bits` lays them out:
    4*segments + ceil(d/8) + ceil(d*bits/8) bytes. Decodes to float32.
    """
    b = _check_bits(bits)
    sizes = _check_segments(segments)
    s = (1 << b) - 1
    factors = [1.0 / (1.0 + min(d / s**2, math.sqrt(d) / s)) if scaled else 1.0 for d in sizes]

    def compress(x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        x = _check_input(x, sizes).to(torch.float32)
        norms = _segment_stat(x, sizes, torch.linalg.vector_norm)
        norm_e = _expand(norms, sizes).clamp_min(torch.finfo(torch.float32).tiny)
        u = torch.rand(x.numel(), generator=generator, device=x.device, dtype=torch.float32)
        level = torch.floor(s * (x.abs() / norm_e) + u).clamp_(0, s).to(torch.uint8)
        signs = pack_bits((x < 0).to(torch.uint8), 1)
        return Compressed({"norms": norms, "signs": signs, "levels": pack_bits(level, b)}, x.numel())

    def decompress(c: Compressed) -> torch.Tensor:
        norms = c.arrays["norms"].to(torch.float32)
        scale = _expand(norms * torch.tensor(factors, device=norms.device), sizes)
        level = unpack_bits(c.arrays["levels"], b, c.numel).to(torch.float32)
        sgn = 1.0 - 2.0 * unpack_bits(c.arrays["signs"], 1, c.numel).to(torch.float32)
        return sgn * scale * level / s

    return Compressor("qsgd", compress, decompress, unbiased=not scaled)


def sign(segments: Sequence[int]) -> Compressor:
    """Scaled sign: per segment scale = mean |x|, decoded value = scale * sign(x) (biased).

    sign(0) decodes as +1. Wire: "signs" (1 bit per entry, set for x < 0, `pack_bits` layout over
    the whole vector) and "scales" (float32, one per segment): ceil(d/8) + 4*segments bytes.
    """
    sizes = _check_segments(segments)

    def mean_abs(seg: torch.Tensor) -> torch.Tensor:
        return seg.abs().sum() / max(seg.numel(), 1)

    def compress(x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        x = _check_input(x, sizes).to(torch.float32)
        scales = _segment_stat(x, sizes, mean_abs)
        return Compressed({"signs": pack_bits((x < 0).to(torch.uint8), 1), "scales": scales}, x.numel())

    def decompress(c: Compressed) -> torch.Tensor:
        sgn = 1.0 - 2.0 * unpack_bits(c.arrays["signs"], 1, c.numel).to(torch.float32)
        return sgn * _expand(c.arrays["scales"].to(torch.float32), sizes)

    return Compressor("sign", compress, decompress, unbiased=False)


# --------------------------------------------------------------------------- registry


COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "identity": identity,
    "top_k": top_k,
    "random_k": random_k,
    "qsgd": qsgd,
    "sign": sign,
}


def make_compressor(
    name: str,
    segments: Sequence[int],
    *,
    ratio: float | None = None,
    bits: int | None = None,
    scope: str = "tensor",
    scaled: bool = False,
    index_coding: str = "plain",
    count: str = "ceil",
) -> Compressor:
    """Build a compressor by name. scope "tensor" compresses each segment (parameter tensor)
    separately; "global" treats the whole vector as one segment. Parameters a compressor does
    not use (e.g. bits for top_k) are ignored; index_coding is checked for every name."""
    if name not in COMPRESSORS:
        allowed = list(COMPRESSORS)
        raise UserError("gossip.compressor.name", f"unknown compressor {name!r}; choose one of {allowed}")
    if scope not in SCOPES:
        raise UserError("gossip.compressor.scope", f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    _check_index_coding(index_coding)
    sizes = _check_segments(segments)
    if scope == "global":
        sizes = (sum(sizes),)
    given = {"ratio": ratio, "bits": bits, "scaled": scaled, "index_coding": index_coding, "count": count}
    return COMPRESSORS[name](sizes, **{k: given[k] for k in keyword_params(COMPRESSORS[name])})
