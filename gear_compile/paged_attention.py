"""Attention over a paged pool's compressed pages, through its block table:
the torch reference of paged flash-decoding.

One call serves one layer of a continuous-batching step: rows of different
lengths side by side (decode rows of one new token, prefill chunks of many),
each row's queries against its own past (compressed pages, exact sinks and
tail, as `paged.PagedPool` holds them before this step's `commit`) and its
own new tokens (exact, causal). Nothing gathers a request's pages into a
dense copy of its sequence: pages are rebuilt `chunk_pages` at a time, each
chunk's scores reduced to a partial softmax (running max m, sum l, output
o), and the partials of a row merged at the end, as split-K flash-decoding
does. Decode rows go through one batched walk of (row, page) pairs; a
prefill chunk is a row of its own (its queries are many). A chunk whose
request has no past is plain causal SDPA, exactly what transformers
computes.

Kernels: the C++ (`kernels/cpu_attention.cpp`) and Triton
(`kernels/decode_attention.py`) kernels read a store's segments today. To
read pages in place a kernel takes, per layer, the pool's slabs
(`pool.slabs[kind].parts()`: page p of layer l at row p * layers + l, with
the decode `SegmentLayout` of `pool.layouts[kind]`), a block table (each
row's page ids, padded), each row's tail slot and tail length
(`pool.tail[slot, :n, layer]`), its sinks and its new tokens; `attend`
below is the reference it must match. Those files belong to the kernels'
owners; this module does not call them yet.
Neighbours: `paged` (the pool), `serving` (calls `attend` as transformers'
attention function).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .paged import PagedPool


def attend(pool: PagedPool, layer: int, rows: list[tuple[str, int]], q: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, scale: float, chunk_pages: int = 64) -> torch.Tensor:
    """Attention of one layer for a batch of rows.

    rows: (request id, T) in the order of the token axis; q [1, Hq, sum T, D],
    k_new / v_new [1, Hkv, sum T, D] this step's K/V (not yet committed).
    Returns [sum T, Hq, D] in q's dtype.
    """
    Hq, D = q.shape[1], q.shape[-1]
    H = k_new.shape[1]
    G = Hq // H
    out = q.new_empty(q.shape[2], Hq, D)
    starts, decode = [], []
    start = 0
    for i, (rid, T) in enumerate(rows):
        starts.append(start)
        if T == 1:
            decode.append(i)
        elif T > 1:
            sl = slice(start, start + T)
            out[sl] = _prefill_row(pool, layer, rid, q[0, :, sl], k_new[0, :, sl], v_new[0, :, sl], scale,
                                   chunk_pages)
        start += T
    if decode:
        tok = torch.tensor([starts[i] for i in decode], device=q.device)
        rids = [rows[i][0] for i in decode]
        qd = q[0, :, tok].transpose(0, 1).reshape(len(decode), H, G, D)          # [R, H, G, D]
        o = _decode_rows(pool, layer, rids, qd, k_new[0, :, tok].transpose(0, 1),
                         v_new[0, :, tok].transpose(0, 1), scale, chunk_pages)    # [R, H, G, D]
        out[tok] = o.reshape(len(decode), Hq, D).to(out.dtype)
    return out


def _partial(q, k, v, mask, scale):
    """Partial softmax of q [N, H, Q, D] over k/v [N, H, K, D]; mask
    broadcastable to [N, H, Q, K] (True: attend). Returns m, l [N, H, Q]
    and the unnormalised output o [N, H, Q, D] (m = -inf where nothing is
    attended, with l = 0 and o = 0)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
    return m, p.sum(-1), torch.matmul(p, v)


def _merge(partials, rows: int):
    """Merge partials [(row index [N], m, l, o)] into each row's output
    [rows, H, Q, D] (log-sum-exp weights, as flash-decoding's combine)."""
    idx = torch.cat([p[0] for p in partials])
    m, l, o = (torch.cat([p[i] for p in partials]) for i in (1, 2, 3))
    at = idx.view(-1, *[1] * (m.dim() - 1)).expand_as(m)
    M = m.new_full((rows, *m.shape[1:]), float("-inf")).scatter_reduce(0, at, m, "amax")
    w = torch.exp(m - M[idx])
    L = l.new_zeros(rows, *l.shape[1:]).index_add(0, idx, l * w)
    O = o.new_zeros(rows, *o.shape[1:]).index_add(0, idx, o * w[..., None])
    return O / L[..., None]


def _page_partials(pool, layer, page_lists, q, scale, chunk_pages):
    """Partials of each row's queries q [R, H, Q, D] (float32) over its
    compressed pages, chunk_pages (row, page) pairs at a time; a first
    page's sink places are masked (the sinks are read exact)."""
    pairs = [(r, p, j == 0) for r, pages in enumerate(page_lists) for j, p in enumerate(pages)]
    out, n, s = [], pool.page_tokens, pool.sink_tokens
    for c in range(0, len(pairs), chunk_pages):
        chunk = pairs[c:c + chunk_pages]
        row = torch.tensor([r for r, _, _ in chunk], device=q.device)
        k, v = pool.page_kv(layer, torch.tensor([p for _, p, _ in chunk], device=q.device), torch.float32)
        mask = None
        if s:
            first = torch.tensor([f for _, _, f in chunk], device=q.device)
            mask = ~(first[:, None] & (torch.arange(n, device=q.device) < s))[:, None, None, :]
        out.append((row, *_partial(q[row], k, v, mask, scale)))
    return out


def _decode_rows(pool, layer, rids, q, k_new, v_new, scale, chunk_pages):
    """Decode rows: q [R, H, G, D], k_new / v_new [R, H, D]. The exact part
    of every row is [sinks | tail (fixed width, masked past its length) |
    the new token], one batched partial."""
    R, H, G, D = q.shape
    qf = q.float()
    page_lists = [pool.pages(r) for r in rids]
    partials = _page_partials(pool, layer, page_lists, qf, scale, chunk_pages)
    slots = torch.tensor([pool.slot(r) for r in rids], device=q.device)
    n_tail = torch.tensor([pool.tail_tokens(r) for r in rids], device=q.device)
    has_pages = torch.tensor([bool(p) for p in page_lists], device=q.device)
    sink = pool.sink[slots, :, layer]                       # [R, s, 2, H, D]
    tail = pool.tail[slots, :, layer]                       # [R, page, 2, H, D]
    new = torch.stack([k_new, v_new], 1)[:, None]           # [R, 1, 2, H, D]
    exact = torch.cat([sink.float(), tail.float(), new.float()], 1)   # the new token as computed
    mask = torch.cat([has_pages[:, None].expand(R, sink.shape[1]),
                      torch.arange(pool.page_tokens, device=q.device) < n_tail[:, None],
                      torch.ones(R, 1, dtype=torch.bool, device=q.device)], 1)
    k, v = (exact[:, :, i].transpose(1, 2) for i in (0, 1))  # [R, H, W, D]
    rows = torch.arange(R, device=q.device)
    partials.append((rows, *_partial(qf, k, v, mask[:, None, None, :], scale)))
    return _merge(partials, R)


def _prefill_row(pool, layer, rid, q, k_new, v_new, scale, chunk_pages):
    """One prefill chunk: q [Hq, T, D], k_new / v_new [H, T, D]. Returns
    [T, Hq, D]. Without a past, plain causal SDPA over the chunk."""
    Hq, T, D = q.shape
    H = k_new.shape[0]
    G = Hq // H
    pages = pool.pages(rid) if rid in pool.requests else []
    n_tail = pool.tail_tokens(rid) if rid in pool.requests else 0
    if not pages and not n_tail:
        o = F.scaled_dot_product_attention(q[None], k_new[None], v_new[None], is_causal=True, scale=scale,
                                           enable_gqa=G > 1)
        return o[0].transpose(0, 1)
    qf = q.float().reshape(1, H, G * T, D)                  # query g * T + t
    partials = _page_partials(pool, layer, [pages], qf, scale, chunk_pages)
    slot = pool.slot(rid)
    past = [pool.tail[slot, :n_tail, layer]]
    if pages:
        past.insert(0, pool.sink[slot, :, layer])
    past = torch.cat(past).float()                          # [P, 2, H, D]
    k = torch.cat([past[:, 0].transpose(0, 1), k_new.float()], 1)[None]     # [1, H, P + T, D]
    v = torch.cat([past[:, 1].transpose(0, 1), v_new.float()], 1)[None]
    t = torch.arange(T, device=q.device).repeat(G)          # each query's position in the chunk
    j = torch.arange(k.shape[2], device=q.device) - past.shape[0]
    mask = (j[None, :] <= t[:, None])[None, None]           # the past, and the chunk causally
    partials.append((torch.zeros(1, dtype=torch.long, device=q.device), *_partial(qf, k, v, mask, scale)))
    o = _merge(partials, 1)[0].reshape(H, G, T, D)
    return o.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)
