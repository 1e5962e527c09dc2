"""Helpers shared by the paged kernels' tests (test_paged_kernel: C++,
test_paged_triton: Triton): a pool whose pages lie scattered, and a kernel's
attention over it checked against the torch reference (`paged_attention.attend`).

Bounds: the store kernel's tests' (tests/test_attention_kernels.py): both
kernels compute in fp32 and round at most the tile and p to the query dtype,
so the fp16 / bf16 bounds are that rounding's; fp32 1e-5."""
import torch

from gear_compile.config import CodecConfig
from gear_compile.paged import PagedPool
from gear_compile.paged_attention import attend, block_table

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
L = 2


def scattered_pool(H, D, dtype, lengths, gen, budget=6_000_000, kv=None, device="cpu", **codec):
    """A pool holding requests r0.. of `lengths`, their pages scattered:
    filler requests are fed first and some freed, so pages come back out of
    order. kv: the requests' K/V [L, 2, H, sum lengths, D] (random)."""
    pool = PagedPool(CodecConfig(**codec), L, H, D, dtype, budget, max_requests=24, device=device)
    n = pool.page_tokens

    def feed(rids_lengths, x=None):
        for rid, m in rids_lengths:
            assert pool.reserve(rid, m), (rid, m)
        total = sum(m for _, m in rids_lengths)
        if x is None:
            x = torch.randn(L, 2, H, total, D, generator=gen)
        pool.commit(rids_lengths, x.to(dtype).to(device))

    feed([(f"f{i}", 2 * n + i) for i in range(5)])
    for i in (0, 2, 3):
        pool.free(f"f{i}")
    feed([(f"r{i}", m) for i, m in enumerate(lengths)], kv)
    return pool


def compare(pool, rows, Hq, dtype, gen, kernel, layer=1, device="cpu"):
    """`kernel`'s attention of random queries and new K/V for `rows` against
    the reference's, within TOL; returns the kernel's output."""
    H, D = pool.heads, pool.head_dim
    total = sum(T for _, T in rows)
    q = torch.randn(1, Hq, total, D, generator=gen).to(dtype).to(device)
    k, v = (torch.randn(1, H, total, D, generator=gen).to(dtype).to(device) for _ in range(2))
    table = block_table(pool, rows, chunk_pages=3, device=device)
    want = attend(pool, layer, table, q, k, v, D ** -0.5)
    got = attend(pool, layer, table, q, k, v, D ** -0.5, kernel=kernel)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.3g}"
    return got
