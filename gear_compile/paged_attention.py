"""Attention over a paged pool's compressed pages, through its block table:
the torch reference of paged flash-decoding.

`block_table(pool, rows)` describes a continuous-batching step once (every
layer reads the same pages); `attend(pool, layer, table, ...)` serves one
layer: rows of different
lengths side by side (decode rows of one new token, prefill chunks of many),
each row's queries against its own past (compressed pages, exact sinks and
tail, as `paged.PagedPool` holds them before this step's `commit`) and its
own new tokens (exact, causal). Nothing gathers a request's pages into a
dense copy of its sequence: pages are rebuilt `chunk_pages` at a time, each
chunk's scores reduced to a partial softmax (running max m, sum l, output
o), and the partials of a row merged at the end, as split-K flash-decoding
does. Decode rows go through one batched walk of (row, page) pairs; a
prefill chunk is a row of its own (its queries are many), its pages read
as few at a time as keep its scores under `SCORES_BYTES` and folded into
one running partial, so its memory does not grow with its past. A chunk whose
request has no past is plain causal SDPA, exactly what transformers
computes.

Kernels: `attend(..., kernel="cpu")` (`attend_cpu`) runs the C++ paged
kernel, `gear::paged_attention_cpu` (kernels/cpu_paged_attention.h): it
takes, per layer, the pool's slabs (`kernel_slabs`: page p of layer l at
row p * layers + l, with the decode `SegmentLayout` of `pool.layouts[kind]`)
and the table's rows (`_kernel_rows`: each row's page ids, tail slot and
length, whether its sinks are in use, where its new tokens start), with the
layer's queries, the pool's tails and sinks and the step's new K/V, and
reads every page, tail and sink where it lies (the store kernel's walk over
the packed codes; tests/test_paged_kernel.py holds it to `attend` within
the store kernel's bounds). All decode rows go in one call; a prefill chunk
with a past in a call of its own (causal among its tokens); a chunk with no
past is causal SDPA on either path. `attend(..., kernel="triton")`
(`attend_triton`) runs the Triton paged kernel on CUDA
(kernels/paged_decode.py, tests/test_paged_triton.py): every decode row,
and every token of a prefill chunk with a past as a row of its own, in one
launch reading the pages in the slabs through the table; a chunk without a
past is causal SDPA.
Neighbours: `paged` (the pool), `serving` (calls `attend` as transformers'
attention function).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import outliers
from .paged import PagedPool
from .store import KERNEL_PARTS

SCORES_BYTES = 8 << 20      # a prefill row's fp32 scores per partial (`_prefill_row`)


@dataclass
class _Pages:
    """A chunk of (row, page) pairs: row index [P], page ids [P], and the
    mask of a first page's sink places [P, 1, 1, page_tokens] (None: no
    sinks)."""
    row: torch.Tensor
    page: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class _Prefill:
    start: int
    T: int
    pages: list[_Pages]
    slot: int
    tail: int
    sinks: bool      # its sinks are read exact (it has a compressed page)
    fresh: bool      # no past at all: plain causal SDPA
    kernel: tuple = ()   # its row for the C++ kernel (`_kernel_rows`)


@dataclass
class BlockTable:
    """A step's rows as attention reads them, the same for every layer.
    Decode rows (one new token each): their token index, page chunks, tail
    slots and the mask of their exact part [R, s + page_tokens + 1] (sinks
    in use, tail places held, the new token). Prefill rows: one `_Prefill`
    each."""
    decode_tok: torch.Tensor
    decode_pages: list[_Pages]
    decode_slots: torch.Tensor
    decode_exact: torch.Tensor
    prefill: list[_Prefill]
    decode_kernel: tuple = ()   # the decode rows for the C++ kernel (`_kernel_rows`)


def block_table(pool: PagedPool, rows: list[tuple[str, int]], chunk_pages: int = 64,
                device: torch.device | str = "cpu") -> BlockTable:
    """The block table of rows (request id, T), in the order of the token
    axis, over what the pool holds before this step's commit; pages are
    rebuilt chunk_pages (row, page) pairs at a time."""
    start, dec, pre = 0, [], []
    for rid, T in rows:
        held = rid in pool.requests
        pages, slot, tail = (pool.pages(rid), pool.slot(rid), pool.tail_tokens(rid)) if held else ([], 0, 0)
        if T == 1:
            dec.append((start, pages, slot, tail))
        elif T > 1:
            pre.append(_Prefill(start, T, _chunks(pool, [pages], chunk_pages, device), slot, tail,
                                bool(pages) and pool.sink_tokens > 0, not pages and not tail,
                                _kernel_rows([(start, pages, slot, tail)])))
        start += T
    n, s = pool.page_tokens, pool.sink_tokens
    tail = torch.tensor([d[3] for d in dec], dtype=torch.long, device=device)
    has_pages = torch.tensor([bool(d[1]) for d in dec], device=device)
    exact = torch.cat([has_pages[:, None].expand(len(dec), s),
                       torch.arange(n, device=device) < tail[:, None],
                       torch.ones(len(dec), 1, dtype=torch.bool, device=device)], 1)
    return BlockTable(torch.tensor([d[0] for d in dec], dtype=torch.long, device=device),
                      _chunks(pool, [d[1] for d in dec], chunk_pages, device),
                      torch.tensor([d[2] for d in dec], dtype=torch.long, device=device), exact, pre,
                      _kernel_rows(dec))


def _kernel_rows(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (start token, page ids, tail slot, tail length) as the C++
    kernel's block table (host tensors, int64): page_ptr [N + 1], page_ids
    [sum pages] and row_info [N, 4] = (slot, tail, sinks in use, start);
    sinks are in use where the row has a compressed page (the kernel reads
    none when the pool keeps no sinks)."""
    lengths = torch.tensor([0] + [len(r[1]) for r in rows], dtype=torch.long)
    ids = torch.tensor([p for r in rows for p in r[1]], dtype=torch.long)
    info = torch.tensor([(r[2], r[3], int(bool(r[1])), r[0]) for r in rows], dtype=torch.long).reshape(-1, 4)
    return lengths.cumsum(0), ids, info


def _chunks(pool, page_lists, chunk_pages, device) -> list[_Pages]:
    pairs = [(r, p, j == 0) for r, pages in enumerate(page_lists) for j, p in enumerate(pages)]
    out = []
    for c in range(0, len(pairs), chunk_pages):
        row, page, first = (torch.tensor(x, device=device) for x in zip(*pairs[c:c + chunk_pages]))
        mask = None
        if pool.sink_tokens:
            mask = ~(first[:, None] & (torch.arange(pool.page_tokens, device=device) < pool.sink_tokens))
            mask = mask[:, None, None, :]
        out.append(_Pages(row, page, mask))
    return out


def attend(pool: PagedPool, layer: int, table: BlockTable, q: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, scale: float, kernel: str = "torch") -> torch.Tensor:
    """Attention of one layer for a step's rows (`block_table`): q [1, Hq,
    sum T, D], k_new / v_new [1, Hkv, sum T, D] this step's K/V (not yet
    committed). Returns [sum T, Hq, D] in q's dtype. kernel: "torch" (this
    reference), "cpu" (`attend_cpu`) or "triton" (`attend_triton`)."""
    if kernel == "cpu":
        return attend_cpu(pool, layer, table, q, k_new, v_new, scale)
    if kernel == "triton":
        return attend_triton(pool, layer, table, q, k_new, v_new, scale)
    Hq, D = q.shape[1], q.shape[-1]
    H = k_new.shape[1]
    out = q.new_empty(q.shape[2], Hq, D)
    for row in table.prefill:
        sl = slice(row.start, row.start + row.T)
        out[sl] = _prefill_row(pool, layer, row, q[0, :, sl], k_new[0, :, sl], v_new[0, :, sl], scale)
    R = table.decode_tok.numel()
    if R:
        tok = table.decode_tok
        qd = q[0, :, tok].transpose(0, 1).reshape(R, H, Hq // H, D).float()          # [R, H, G, D]
        partials = [(c.row, *_partial(qd[c.row], *pool.page_kv(layer, c.page, torch.float32), c.mask, scale))
                    for c in table.decode_pages]
        slots = table.decode_slots
        new = torch.stack([k_new[0, :, tok], v_new[0, :, tok]], 0).permute(2, 0, 1, 3)[:, None]  # [R, 1, 2, H, D]
        exact = torch.cat([pool.sink[slots, layer].float(), pool.tail[slots, layer].float(),
                           new.float().permute(0, 2, 3, 1, 4)], 3)                 # the new token as computed
        k, v = exact[:, 0], exact[:, 1]                                             # [R, H, W, D]
        partials.append((torch.arange(R, device=q.device),
                         *_partial(qd, k, v, table.decode_exact[:, None, None, :], scale)))
        out[tok] = _merge(partials, R).reshape(R, Hq, D).to(out.dtype)
    return out


def kernel_slabs(pool: PagedPool) -> tuple[list, list, list[int], list[int]]:
    """The pool's slabs as the C++ kernel reads them: K's and V's parts in
    their layout's order and each one's descriptor (store.KERNEL_FIELDS of
    one segment: how it is quantized, then each part's index). Built once per
    pool: the slabs are written in place, never reallocated."""
    cached = getattr(pool, "_kernel_slabs", None)
    if cached is None:
        out = []
        for kind in "kv":
            layout = pool.layouts[kind]
            names = layout.part_names
            spec = layout.spec
            group = 0 if spec.axis == "channel" and spec.group is None else (spec.group or layout.head_dim)
            desc = [int(layout.exact), spec.bits, int(spec.axis == "channel"), group, layout.block,
                    outliers.unit_shift(spec.bits)]
            desc += [names.index(f) if f in names else -1 for f in KERNEL_PARTS]
            out.append(([getattr(pool.slabs[kind], n) for n in names], desc))
        cached = pool._kernel_slabs = (out[0][0], out[1][0], out[0][1], out[1][1])
    return cached


def attend_cpu(pool: PagedPool, layer: int, table: BlockTable, q: torch.Tensor, k_new: torch.Tensor,
               v_new: torch.Tensor, scale: float) -> torch.Tensor:
    """`attend` by the C++ kernel (`gear::paged_attention_cpu`,
    kernels/cpu_paged_attention.h): every decode row in one call, each
    prefill chunk with a past in a call of its own (causal among its
    tokens); a chunk without a past is plain causal SDPA, as in `attend`.
    The kernel reads the pages in the pool's slabs, the sinks, tails and new
    tokens where they lie, through the table's rows (`_kernel_rows`)."""
    from .kernels import cpu
    cpu.load()
    op = torch.ops.gear.paged_attention_cpu
    k_parts, v_parts, k_desc, v_desc = kernel_slabs(pool)
    Hq, D = q.shape[1], q.shape[-1]
    kn, vn = k_new[0].contiguous(), v_new[0].contiguous()          # [H, sum T, D]
    out = q.new_empty(q.shape[2], Hq, D)
    for row in table.prefill:
        sl = slice(row.start, row.start + row.T)
        if row.fresh:
            out[sl] = _prefill_row(pool, layer, row, q[0, :, sl], k_new[0, :, sl], v_new[0, :, sl], scale)
        else:
            o = op(q[:, :, sl], k_parts, v_parts, k_desc, v_desc, pool.tail, pool.sink, kn, vn, *row.kernel,
                   layer, scale)
            out[sl] = o[0].transpose(0, 1)
    tok = table.decode_tok
    if tok.numel():
        qd = q[0, :, tok].transpose(0, 1)[:, :, None]                  # [R, Hq, 1, D]
        o = op(qd, k_parts, v_parts, k_desc, v_desc, pool.tail, pool.sink, kn, vn, *table.decode_kernel,
               layer, scale)
        out[tok] = o[:, :, 0]
    return out


def attend_triton(pool: PagedPool, layer: int, table: BlockTable, q: torch.Tensor, k_new: torch.Tensor,
                  v_new: torch.Tensor, scale: float) -> torch.Tensor:
    """`attend` by the Triton paged kernel (`kernels.paged_decode.paged_decode`):
    the decode rows and every token of a prefill chunk with a past (a row
    of its own attending the chunk causally) in one launch, the pages read in
    the pool's slabs through the table's rows (`_triton_rows`); a chunk
    without a past is causal SDPA, as in `attend`."""
    from .kernels.paged_decode import paged_decode
    Hq, D = q.shape[1], q.shape[-1]
    out = q.new_empty(q.shape[2], Hq, D)
    for row in table.prefill:
        if row.fresh:
            sl = slice(row.start, row.start + row.T)
            out[sl] = _prefill_row(pool, layer, row, q[0, :, sl], k_new[0, :, sl], v_new[0, :, sl], scale)
    rows = getattr(table, "_triton_rows", None)
    if rows is None or rows[0].device != q.device:      # once a step: every layer reads the same rows
        rows = table._triton_rows = _triton_rows(table, q.device)
    tok, ptr, ids, info, new_len, most = rows
    if tok.numel():
        out[tok] = paged_decode(pool, layer, q[0, :, tok].transpose(0, 1), k_new[0], v_new[0], ptr, ids, info,
                                most, scale, new_len=new_len)
    return out


def _triton_rows(table: BlockTable, device):
    """The Triton kernel's rows of a step: each decode row, then each token t
    of each prefill chunk with a past (its chunk's pages, tail and sinks; new
    tokens [start, start + t + 1)). Returns their tokens, page_ptr,
    page_ids, row_info, new_len (on `device`) and the most pages a row has."""
    ptr, ids, info = table.decode_kernel
    R = info.shape[0]
    toks, counts, id_parts, infos, news = [table.decode_tok.cpu()], [ptr[1:] - ptr[:-1]], [ids], [info], \
        [torch.ones(R, dtype=torch.long)]
    for row in table.prefill:
        if row.fresh:
            continue
        _, pids, pinfo = row.kernel
        T = row.T
        toks.append(torch.arange(row.start, row.start + T))
        counts.append(torch.full((T,), pids.numel(), dtype=torch.long))
        id_parts.append(pids.repeat(T))
        infos.append(pinfo.expand(T, 4))
        news.append(torch.arange(1, T + 1))
    counts = torch.cat(counts)
    page_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    most = int(counts.max()) if counts.numel() else 0
    return (torch.cat(toks).to(device), page_ptr.to(device), torch.cat(id_parts).to(device),
            torch.cat(infos).contiguous().to(device), torch.cat(news).to(device), most)


def _partial(q, k, v, mask, scale):
    """Partial softmax of q [N, H, Q, D] over k/v [N, H, K, D]; mask
    broadcastable to [N, H, Q, K] (True: attend). Returns m, l [N, H, Q]
    and the unnormalised output o [N, H, Q, D] (m = -inf where nothing is
    attended, with l = 0 and o = 0). The scores are updated in place: one
    score-sized buffer, not one per step."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    m = s.amax(-1)
    p = s.sub_(torch.where(torch.isinf(m), 0.0, m)[..., None]).exp_()
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


def _prefill_row(pool, layer, row: _Prefill, q, k_new, v_new, scale):
    """One prefill chunk: q [Hq, T, D], k_new / v_new [H, T, D]. Returns
    [T, Hq, D]. Without a past, plain causal SDPA over the chunk. With one,
    its pages are read a few at a time as one key run (the queries are not
    copied per page) and folded into a running partial, so the fp32 scores
    stay under `SCORES_BYTES` however long the past."""
    Hq, T, D = q.shape
    H = k_new.shape[0]
    G = Hq // H
    if row.fresh:
        o = F.scaled_dot_product_attention(q[None], k_new[None], v_new[None], is_causal=True, scale=scale,
                                           enable_gqa=G > 1)
        return o[0].transpose(0, 1)
    qf = q.float().reshape(H, G * T, D)                     # query g * T + t
    per = max(1, SCORES_BYTES // (4 * Hq * T * pool.page_tokens))      # pages a partial reads
    acc = None
    for c in row.pages:
        for a in range(0, c.page.numel(), per):
            k, v = (x.transpose(0, 1).reshape(H, -1, D)                 # [H, p * page_tokens, D]
                    for x in pool.page_kv(layer, c.page[a:a + per], torch.float32))
            mask = None if c.mask is None else c.mask[a:a + per].reshape(1, 1, -1)
            acc = _fold(acc, _partial(qf, k, v, mask, scale))
    past = [pool.tail[row.slot, layer, :, :, :row.tail]]
    if row.sinks:
        past.insert(0, pool.sink[row.slot, layer])
    past = torch.cat(past, 2).float()                       # [2, H, P, D]
    k = torch.cat([past[0], k_new.float()], 1)              # [H, P + T, D]
    v = torch.cat([past[1], v_new.float()], 1)
    t = torch.arange(T, device=q.device).repeat(G)          # each query's position in the chunk
    j = torch.arange(k.shape[1], device=q.device) - past.shape[2]
    mask = (j[None, :] <= t[:, None])[None]                 # the past, and the chunk causally
    _, l, o = _fold(acc, _partial(qf, k, v, mask, scale))
    o = (o / l[..., None]).reshape(H, G, T, D)
    return o.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


def _fold(acc, part):
    """Two partials (m, l, o) of the same queries as one (log-sum-exp
    weights, flash attention's running update); acc None: part itself."""
    if acc is None:
        return part
    (m1, l1, o1), (m2, l2, o2) = acc, part
    m = torch.maximum(m1, m2)
    at = torch.where(torch.isinf(m), 0.0, m)                # nothing attended yet: weights 0
    w1, w2 = torch.exp(m1 - at), torch.exp(m2 - at)
    return m, l1 * w1 + l2 * w2, o1 * w1[..., None] + o2 * w2[..., None]
