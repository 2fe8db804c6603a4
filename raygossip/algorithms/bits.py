"""Bit streams: integers of a few bits each packed into bytes and back, vectorised on the input's device."""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits"]


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) into uint8, `bits` bits each, most significant bit first.

    The stream is the values' bits concatenated (each value MSB first), zero-padded to whole
    bytes, each byte MSB first: for bits=1 this equals numpy.packbits. Output has ceil(n*bits/8)
    bytes. Vectorized, on the input's device.
    """
    _check_pack_width(bits)
    v = values.reshape(-1).to(torch.uint8)
    shifts = torch.arange(bits - 1, -1, -1, device=v.device, dtype=torch.uint8)
    stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte_shifts = torch.arange(7, -1, -1, device=v.device, dtype=torch.uint8)
    return (stream.view(-1, 8) << byte_shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n values (uint8) of a stream packed at `bits` bits each."""
    _check_pack_width(bits)
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"unpack_bits: {packed.numel()} bytes cannot hold {n} x {bits} bits")
    p = packed.reshape(-1).to(torch.uint8)
    byte_shifts = torch.arange(7, -1, -1, device=p.device, dtype=torch.uint8)
    stream = ((p.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: n * bits]
    shifts = torch.arange(bits - 1, -1, -1, device=p.device, dtype=torch.uint8)
    return (stream.view(n, bits) << shifts).sum(dim=1, dtype=torch.uint8)


def _check_pack_width(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
