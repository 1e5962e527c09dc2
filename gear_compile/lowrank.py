"""The low-rank part L = A B^T of GEAR: rank-r power iteration on the residual.

Batched over every leading dimension (batch, head, block), fp32 throughout,
orthonormalising A by QR at each iteration (subspace iteration; Vogels et al.,
the paper's Algorithm 2). The start matrix is a fixed pseudo-random pattern, so
compression is deterministic and needs no RNG state on any device.
Neighbours: `segment` (stores A token-major and B per block, both int8, with
the columns' scales per block: `to_int8`; `product` rebuilds L).
"""
from __future__ import annotations

import math

import torch


def _start(d: int, r: int, device) -> torch.Tensor:
    i = torch.arange(d * r, device=device, dtype=torch.float32).reshape(d, r)
    return torch.sin(i * 12.9898 + 78.233) * 43758.5453 % 1.0 - 0.5


def power_iteration(residual: torch.Tensor, rank: int, iters: int):
    """residual [..., n, d] -> (A [..., n, rank], B [..., d, rank]), fp32, with
    A orthonormal and A @ B^T ~ the best rank-`rank` approximation. Columns past
    min(n, d) are zero."""
    *lead, n, d = residual.shape
    r = min(rank, n, d)
    R = residual.float()
    A = R.new_zeros(*lead, n, rank)
    B = R.new_zeros(*lead, d, rank)
    if r == 0 or R.numel() == 0:
        return A, B
    Bk = _start(d, r, R.device).expand(*lead, d, r)
    for _ in range(iters):
        Ak = torch.linalg.qr(R @ Bk).Q
        Bk = R.transpose(-1, -2) @ Ak
    A[..., :r] = Ak
    B[..., :r] = Bk
    return A, B


def to_int8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [..., n, r] and B [..., d, r] as int8 with one fp32 scale per column
    pair: A B^T = A8 diag(s) B8^T. Each column of A and of B is scaled to
    [-127, 127]; s [..., r] is the product of the two columns' steps. A costs
    one byte per token and rank, B one byte per channel and rank (fp16 B was
    10 % of an n_b = 20 block's bytes at r = 2), and the rounding (at most
    1/254 of a column's largest entry) is far below the residual the factors
    leave (benchmarks/results/kv_size.md: errors unchanged to 4 decimals)."""
    top_a = a.abs().amax(dim=-2).clamp_min(1e-30)           # [..., r]
    top_b = b.abs().amax(dim=-2).clamp_min(1e-30)
    a8 = torch.round(a * (127.0 / top_a)[..., None, :]).to(torch.int8)
    b8 = torch.round(b * (127.0 / top_b)[..., None, :]).to(torch.int8)
    return a8, b8, top_a * top_b / (127.0 * 127.0)


def product(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A8 diag(s) B8^T in fp32: [..., n, d] from `to_int8`'s factors."""
    return (a8.float() * scale[..., None, :]) @ b8.float().transpose(-1, -2)


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """||x - approx||_F / ||x||_F."""
    num = (x.float() - approx.float()).norm().item()
    den = x.float().norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
