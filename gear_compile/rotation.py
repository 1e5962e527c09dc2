"""An orthogonal rotation of each K and V head before the codec (option `rotate`).

A store whose K (or V) is rotated holds x R instead of x, for R an
orthogonal [D, D] matrix: a randomised Hadamard transform, Sylvester's
Hadamard matrix with random row signs over sqrt(n), block-diagonal over
n-channel blocks (n the largest power of two dividing the head dim, at most
the head dim). It spreads an outlier channel's energy over its block, so a
2-bit codec's per-token ranges shrink (llama.cpp's KV rotation;
benchmarks/results/quality_rotated.md: KIVI-2 on SmolLM2 from +23.6 / +22.1 %
to +10.6 / +8.0 % perplexity). KCVT's per-channel K statistics at 4 bits
isolate outlier channels already: it moved them both ways there.

Attention is unchanged by it: scores (q R)(k R)^T = q k^T, and softmax(.)
(V R) R^T = softmax(.) V. So the rewrite (`passes.rewrite`) multiplies q and
the call's new K by R where K is rotated, the new V by R and the attention's
output by R^T where V is rotated, and the kernels read the rotated store as
any other. `gear::decompress` (a cache read back densely) undoes it.
Neighbours: `config` (`rotate`, `CodecConfig.rotates`), `passes.rewrite`,
`compressed_kv` (dense reads).
"""
from __future__ import annotations

import functools
import math

import torch

SEED = 0     # fixed: a store's rotation must be the same in every process that reads it


@functools.lru_cache(maxsize=16)
def _signed_hadamard(n: int, seed: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return h * signs[:, None] / math.sqrt(n)


def hadamard(head_dim: int, seed: int = SEED) -> torch.Tensor:
    """R [head_dim, head_dim] fp32, orthogonal: block-diagonal randomised
    Hadamard over blocks of the largest power of two dividing head_dim."""
    n = head_dim & -head_dim
    return torch.block_diag(*[_signed_hadamard(n, seed)] * (head_dim // n))


@functools.lru_cache(maxsize=32)
def rotation(head_dim: int, dtype: torch.dtype, device, inverse: bool = False) -> torch.Tensor:
    """R (or R^T = R^-1) in `dtype` on `device`; one tensor per argument set,
    shared by its callers (read only): the quality sim asks for it every step."""
    r = hadamard(head_dim)
    return (r.T if inverse else r).contiguous().to(device=device, dtype=dtype)


def unrotate(x: torch.Tensor) -> torch.Tensor:
    """x R^T: the values of a rotated store as they were given."""
    return x @ rotation(x.shape[-1], x.dtype, x.device, inverse=True)
