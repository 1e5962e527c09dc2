"""The compressed paged pool (`paged`) and attention through its block table
(`paged_attention`), against dense references built from the same tokens."""
import pytest
import torch
import torch.nn.functional as F

from gear_compile import paged_attention
from gear_compile.config import CodecConfig
from gear_compile.paged import PagedPool, PoolFull
from gear_compile.paged_attention import attend, block_table
from gear_compile.segment import compress

L, H, D = 2, 2, 32


def pool_of(method="gear", bits=4, budget=3_000_000, **kw):
    return PagedPool(CodecConfig(method=method, bits=bits), L, H, D, torch.float32, budget, **kw)


def feed(pool, lengths, gen):
    """Commit random K/V for requests of `lengths` (one prefill each): returns
    each request's dense K/V [L, 2, H, n, D] as given."""
    seqs = {f"r{i}": torch.randn(L, 2, H, n, D, generator=gen) for i, n in enumerate(lengths)}
    for rid, x in seqs.items():
        assert pool.reserve(rid, x.shape[3])
    pool.commit([(rid, x.shape[3]) for rid, x in seqs.items()], torch.cat(list(seqs.values()), 3))
    return seqs


def held(pool, rid, layer):
    """What the pool holds for rid at `layer`, rebuilt densely (the test's
    reference only: attention never builds this): [2, H, n, D]."""
    r = pool.requests[rid]
    parts = []
    if r.pages:
        k, v = pool.page_kv(layer, torch.tensor(r.pages), torch.float32)
        kv = torch.stack([k, v]).permute(0, 2, 1, 3, 4).reshape(2, H, -1, D)
        s = pool.sink_tokens
        kv[:, :, :s] = pool.sink[r.slot, layer].float()
        parts.append(kv)
    parts.append(pool.tail[r.slot, layer, :, :, :r.tail].float())
    return torch.cat(parts, 2)


@pytest.mark.parametrize("method,bits", [("none", 4), ("gear", 4), ("kivi", 2)])
def test_pages_hold_what_was_written(method, bits):
    gen = torch.Generator().manual_seed(0)
    pool = pool_of(method, bits)
    seqs = feed(pool, [150, 30, pool.page_tokens], gen)
    for rid, x in seqs.items():
        assert pool.tokens(rid) == x.shape[3]
        got = held(pool, rid, 1)
        if method == "none":
            assert torch.equal(got, x[1])
        else:
            rel = (got - x[1]).norm() / x[1].norm()
            assert rel < (0.15 if bits == 4 else 0.6), (rid, float(rel))
            n_exact = pool.tail_tokens(rid)       # the newest tokens stay exact (fp16)
            torch.testing.assert_close(got[:, :, x.shape[3] - n_exact:], x[1, :, :, x.shape[3] - n_exact:],
                                       atol=2e-3, rtol=1e-3)
            if pool.pages(rid):                   # the sinks too
                s = pool.sink_tokens
                torch.testing.assert_close(got[:, :, :s], x[1, :, :, :s], atol=2e-3, rtol=1e-3)


def test_pool_accounting_and_whole_after_free():
    gen = torch.Generator().manual_seed(0)
    pool = pool_of()
    free0 = pool.free_tokens()
    seqs = feed(pool, [150, 30], gen)
    assert pool.free_tokens() == free0 - 2 * pool.page_tokens      # 150 tokens: 2 full pages + tail
    split = pool.breakdown()
    assert sum(split.values()) == pool.nbytes() <= 3_000_000
    assert split["codes"] > 0 and split["buffer held"] == (150 - 2 * pool.page_tokens + 30) * L * 2 * H * D * 2
    assert pool.fork("r0", "r0_child") and pool.pages("r0_child") == pool.pages("r0")
    for rid in list(seqs) + ["r0_child"]:
        assert not pool.whole()
        pool.free(rid)
    assert pool.whole() and pool.free_tokens() == free0


def test_refuses_what_does_not_fit_and_writes_nothing_past_its_pages():
    pool = pool_of(budget=600_000)
    too_many = (pool.n_pages + 1) * pool.page_tokens
    assert not pool.fits_alone(too_many)
    assert not pool.reserve("big", too_many) and "big" not in pool.requests
    assert pool.reserve("a", pool.page_tokens - 1)                  # a tail only, no page
    kv = torch.randn(L, 2, H, 2 * pool.page_tokens, D)
    with pytest.raises(PoolFull, match="reserve before writing"):
        pool.commit([("a", 2 * pool.page_tokens)], kv)


def test_storable_counts_in_order_what_the_free_pages_grow_to():
    """Preemption's question (`serving.GearPagedCache.count_storable_requests`):
    how many requests, in order, could grow to their totals; asking takes
    nothing."""
    pool = pool_of(budget=1_200_000, max_requests=3)
    P, free = pool.page_tokens, len(pool.free_pages)
    assert free >= 4
    assert pool.reserve("a", P + 3) and pool.reserve("b", 5)       # a holds one page, b none
    free -= 1
    assert pool.storable([]) == 0
    assert pool.storable([("a", P + 4), ("b", P - 1)]) == 2                        # neither takes a page
    assert pool.storable([("a", 2 * P), ("b", (free - 1) * P)]) == 2               # all the free pages
    assert pool.storable([("a", 2 * P), ("b", free * P), ("a", 2 * P)]) == 1       # b overflows: one
    assert pool.storable([("b", (free + 1) * P), ("a", P)]) == 0
    assert len(pool.free_pages) == free and pool.pages_needed("b", 3 * P) == 3


def dense_attention(q, k, v, past, scale):
    """q [Hq, T, D] of the last T positions of k/v [H, past + T, D]."""
    G = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    T = q.shape[1]
    mask = torch.arange(k.shape[1])[None] <= (past + torch.arange(T))[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)[0]


KERNELS = ["torch", "cpu"]     # paged_attention.attend's reference and the C++ kernel (attend_cpu)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method,bits", [("none", 4), ("gear", 4), ("kivi", 2)])
def test_varlen_rows_decode_beside_prefill_match_dense_over_what_is_held(method, bits, kernel):
    """Rows of different pasts (none, tail only, pages and tail), decode rows
    beside prefill chunks, in one call; chunk_pages=1 makes every row's
    pages several partials to merge."""
    gen = torch.Generator().manual_seed(1)
    pool = pool_of(method, bits)
    feed(pool, [150, 30, 0, 2 * pool.page_tokens, 90], gen)
    pool.reserve("r2", 0)
    rows = [("r0", 1), ("r1", 5), ("r2", 7), ("r3", 1), ("r4", 1)]
    Hq, total = 2 * H, sum(t for _, t in rows)
    q = torch.randn(1, Hq, total, D, generator=gen)
    new = torch.randn(L, 2, H, total, D, generator=gen)
    layer, scale = 1, D ** -0.5
    table = block_table(pool, rows, chunk_pages=1)
    got = attend(pool, layer, table, q, new[layer, 0][None], new[layer, 1][None], scale, kernel=kernel)
    start = 0
    for rid, T in rows:
        kv = torch.cat([held(pool, rid, layer), new[layer, :, :, start:start + T]], 2)
        want = dense_attention(q[0, :, start:start + T], kv[0], kv[1], kv.shape[2] - T, scale)
        torch.testing.assert_close(got[start:start + T].transpose(0, 1), want, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{rid}: {m}")
        start += T


def test_tails_sized_for_typical_requests():
    """typical_tokens: as many tails as requests of that length fill the
    budget with (pages for all of them fit beside)."""
    pool = pool_of(typical_tokens=300)
    per_request = pool.tail_bytes + 300 // pool.page_tokens * pool.page_bytes
    assert pool.max_requests == 3_000_000 // per_request
    assert pool.n_pages >= pool.max_requests * (300 // pool.page_tokens)


@pytest.mark.parametrize("method,bits", [("gear", 4), ("gear", 2), ("kivi", 2)])
def test_pages_written_layer_by_layer_a_few_at_once_equal_one_codec_call_over_all(method, bits):
    """The pool compresses a step's pages one layer at a time, pages_at_once
    per codec call (its memory bound); the stored bytes equal the codec run
    once over every page of every layer."""
    gen = torch.Generator().manual_seed(2)
    pool = pool_of(method, bits)
    pool.pages_at_once = 2
    n, s = pool.page_tokens, pool.sink_tokens
    seqs = feed(pool, [3 * n + 5, 2 * n, n + 1], gen)
    pages, rows = [], []
    for rid, x in seqs.items():
        for j, page in enumerate(pool.pages(rid)):
            for layer in range(L):
                kv = x[layer, :, :, j * n:(j + 1) * n].to(pool.held)          # [2, H, n, D]
                if j == 0 and s:                                               # the sinks' places
                    kv[:, :, :s] = kv[:, :, s:s + 1]
                pages.append(kv)
                rows.append(page * L + layer)
    assert len(pages) == 6 * L
    for i, kind in enumerate("kv"):
        want = compress(torch.stack([p[i] for p in pages]), pool.layouts[kind])
        for name, t in want.parts().items():
            assert torch.equal(getattr(pool.slabs[kind], name)[rows], t), (kind, name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scores_bytes", [1, paged_attention.SCORES_BYTES])
def test_a_prefill_chunk_reads_a_long_past_a_few_pages_at_a_time(monkeypatch, scores_bytes, kernel):
    """A prefill chunk beside decode rows, its past five pages and a tail:
    read one page per partial (SCORES_BYTES=1) or all at once, it matches
    dense attention over what is held."""
    monkeypatch.setattr(paged_attention, "SCORES_BYTES", scores_bytes)
    gen = torch.Generator().manual_seed(3)
    pool = pool_of("gear", 4)
    feed(pool, [5 * pool.page_tokens + 10, 70], gen)
    rows = [("r0", 9), ("r1", 1)]
    q = torch.randn(1, 2 * H, 10, D, generator=gen)
    new = torch.randn(2, H, 10, D, generator=gen)
    scale = D ** -0.5
    got = attend(pool, 0, block_table(pool, rows), q, new[0][None], new[1][None], scale, kernel=kernel)
    start = 0
    for rid, T in rows:
        kv = torch.cat([held(pool, rid, 0), new[:, :, start:start + T]], 2)
        want = dense_attention(q[0, :, start:start + T], kv[0], kv[1], kv.shape[2] - T, scale)
        torch.testing.assert_close(got[start:start + T].transpose(0, 1), want, atol=1e-5, rtol=1e-4)
        start += T
