"""Sparse index sets on the wire: entropy coded per segment (Rice-coded gaps or a bitmap, whichever is smaller).

A sparse message keeps k_s entries of segment s (size n_s); both are known to the receiver, so only
which entries were kept travels. Per segment the encoder sorts the kept indices, takes the gaps
g_0 = i_0, g_j = i_j - i_{j-1} - 1 and sends whichever is shorter:

- Rice code with parameter b: quotient g >> b in unary (that many 1 bits, then a 0), remainder in b bits.
  Costs sum(g >> b) + k_s * (1 + b) bits; the encoder picks the b that minimises it.
- a bitmap: n_s bits, bit i set when entry i was kept.

Wire arrays: "coding" (uint8, one per segment: b, or BITMAP) and "bits" (uint8), one bit stream holding,
in this order, the unary quotients of every Rice segment, then their remainders (b_s bits each, most
significant first), then the bitmaps, zero-padded to whole bytes. Laying the unary parts side by side
lets the decoder find every quotient at once: the j-th 0 bit of the stream ends the j-th quotient.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .bits import pack_bits, unpack_bits

__all__ = ["BITMAP", "decode_indices", "encode_indices", "rice_bits"]

BITMAP = 255  # the "coding" byte of a segment sent as a bitmap; any other value is its Rice parameter b


def rice_bits(gaps: torch.Tensor, b: int) -> int:
    """Length in bits of the Rice code of `gaps` (int64) with parameter b."""
    return int((gaps >> b).sum()) + gaps.numel() * (1 + b)


def _best_rice(gaps: torch.Tensor, size: int) -> tuple[int, int]:
    """(b, bits) with the smallest b minimising rice_bits: the cost is convex in b, so walk from an estimate."""
    k = gaps.numel()
    top = max(0, (size - 1).bit_length())  # at b = top every quotient is 0
    mean_gap = (size - k) / k
    b = min(top, max(0, int(math.log2(mean_gap * math.log(2))) if mean_gap * math.log(2) >= 1 else 0))
    cost = rice_bits(gaps, b)
    while b > 0 and (lower := rice_bits(gaps, b - 1)) <= cost:
        b, cost = b - 1, lower
    while b < top and (higher := rice_bits(gaps, b + 1)) < cost:
        b, cost = b + 1, higher
    return b, cost


def _msb_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Each value's low `width` bits, most significant first, as a flat 0/1 uint8 stream."""
    if width == 0:
        return values.new_zeros(0, dtype=torch.uint8)
    shifts = torch.arange(width - 1, -1, -1, device=values.device)
    return ((values.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)


def encode_indices(indices: Sequence[torch.Tensor], sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """{"coding", "bits"} for one index set per segment (each sorted ascending, distinct, local to its segment)."""
    device = indices[0].device if indices else torch.device("cpu")
    coding, quotients, remainders, bitmaps = [], [], [], []
    for idx, size in zip(indices, sizes):
        idx = idx.to(torch.int64)
        if idx.numel() == 0:
            coding.append(0)
            continue
        gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
        b, cost = _best_rice(gaps, size)
        if size <= cost:
            bitmap = torch.zeros(size, dtype=torch.uint8, device=device)
            bitmap[idx] = 1
            coding.append(BITMAP)
            bitmaps.append(bitmap)
        else:
            coding.append(b)
            quotients.append(gaps >> b)
            remainders.append(_msb_bits(gaps & ((1 << b) - 1), b))
    parts = []
    if quotients:
        q = torch.cat(quotients)
        unary = torch.ones(int(q.sum()) + q.numel(), dtype=torch.uint8, device=device)
        unary[torch.cumsum(q + 1, 0) - 1] = 0
        parts.append(unary)
    stream = torch.cat(parts + remainders + bitmaps) if parts or bitmaps else torch.zeros(0, dtype=torch.uint8,
                                                                                          device=device)
    return {"coding": torch.tensor(coding, dtype=torch.uint8, device=device), "bits": pack_bits(stream, 1)}


def decode_indices(arrays: dict[str, torch.Tensor], sizes: Sequence[int], ks: Sequence[int]) -> list[torch.Tensor]:
    """The sorted int64 index set of every segment, from encode_indices' arrays and the known counts ks."""
    coding = arrays["coding"].tolist()
    packed = arrays["bits"]
    stream = unpack_bits(packed, 1, 8 * packed.numel())
    device = stream.device
    rice = [s for s, (c, k) in enumerate(zip(coding, ks)) if c != BITMAP and k > 0]
    total = sum(ks[s] for s in rice)
    ends = torch.nonzero(stream == 0).reshape(-1)[:total]
    quotient = torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1
    cursor = int(ends[-1]) + 1 if total else 0
    out: list[torch.Tensor | None] = [None] * len(ks)
    start = 0
    for s in rice:  # remainders follow the unary parts, segment by segment
        k, b = ks[s], coding[s]
        rem = torch.zeros(k, dtype=torch.int64, device=device)
        if b:
            weights = torch.pow(2, torch.arange(b - 1, -1, -1, device=device))
            rem = (stream[cursor: cursor + k * b].view(k, b).to(torch.int64) * weights).sum(dim=1)
        gaps = (quotient[start: start + k] << b) | rem
        out[s] = torch.cumsum(gaps + 1, 0) - 1
        cursor, start = cursor + k * b, start + k
    for s, (c, k, size) in enumerate(zip(coding, ks, sizes)):
        if k == 0:
            out[s] = torch.zeros(0, dtype=torch.int64, device=device)
        elif c == BITMAP:
            out[s] = torch.nonzero(stream[cursor: cursor + size]).reshape(-1)
            cursor += size
    return out  # type: ignore[return-value]
