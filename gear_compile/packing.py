"""Bit-packing of quantization codes along the last (channel) dimension.

Layout ("planar"): with p = 8 // bits codes per byte and W = ceil(D / p) bytes a
row, byte j of a row holds channels j, j + W, j + 2W, ... in its low to high
bit fields. Unpacking field i of all bytes yields a contiguous run of channels
[i*W, (i+1)*W), so a kernel unpacks with one shift-and-mask per field and no
interleaving. Neighbours: `quantize` makes the codes, `segment` stores them,
`kernels.decode_attention` unpacks them in registers.
"""
from __future__ import annotations

import torch


def ceil_div(a: int, b: int) -> int:
    """Whole units of size b holding a items (the package's one rounding-up rule)."""
    return -(-a // b)


def packed_width(head_dim: int, bits: int) -> int:
    """Bytes per row of `head_dim` codes at `bits` bits."""
    return ceil_div(head_dim, 8 // bits)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., D] with values < 2**bits  ->  uint8 [..., ceil(D*bits/8)]."""
    if bits not in (2, 4, 8):
        raise ValueError(f"pack: bits must be one of [2, 4, 8], got {bits!r}.")
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    d = codes.shape[-1]
    width = packed_width(d, bits)
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, width * per_byte - d))
    fields = padded.unflatten(-1, (per_byte, width))       # [..., p, W]
    out = torch.zeros_like(fields[..., 0, :])
    for i in range(per_byte):
        out |= fields[..., i, :] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., W] -> uint8 [..., head_dim]."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    fields = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.cat(fields, dim=-1)[..., :head_dim]
