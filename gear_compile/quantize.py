"""Asymmetric min/max quantization with fp16 scales and zero points.

One function family for every backbone (KCVT, KIVI, per-token): the caller
reshapes so that the statistics run over one dimension (`dim`), and this module
computes codes, scale and zero point there. The stored fp16 zero point is
rounded down and the fp16 scale rounded up, so every element reconstructs
within half a step of its true value. A constant vector reconstructs exactly
when its value is fp16-representable (scale 0), else within half a step of a
scale spanning its fp16 rounding gap. A vector holding NaN or inf gets a
NaN scale, so it reconstructs as NaN (as dense attention over it would
propagate); `segment.compress` can refuse such input instead.
Neighbours: `packing` (packs the codes), `segment` (chooses the grouping).
"""
from __future__ import annotations

import torch

FP16_MAX = 65504.0


def quantize(x: torch.Tensor, bits: int, dim: int, min_scale: torch.Tensor | None = None):
    """x float [...]; stats over `dim` (kept with size 1); min_scale (shaped as
    the stats, or None): a floor on each scale (`segment`: room for outliers).

    Returns (codes uint8 like x, scale fp16, zero fp16) with
    x ~= codes * scale + zero and |error| <= scale / 2.
    """
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    zero = lo.to(torch.float16)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, zero.new_tensor(-torch.inf)), zero)
    exact = (hi - zero.float()) / levels
    if min_scale is not None:
        exact = torch.maximum(exact, min_scale)
    scale = exact.to(torch.float16)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, scale.new_tensor(torch.inf)), scale)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((xf - zero.float()) / safe).clamp_(0, levels)
    codes = torch.nan_to_num(codes, nan=0.0).to(torch.uint8)
    bad = ~torch.isfinite(lo) | ~torch.isfinite(hi)
    scale = torch.where(bad, torch.full_like(scale, torch.nan), scale)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale + zero, computed in fp32 and cast to `dtype`."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)
