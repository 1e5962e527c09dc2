"""A compressed paged KV pool: many requests' K/V in fixed-size pages, for serving.

`generate()`'s stores (`store`) give every sequence of a batch the same
reserved shape; a server instead admits and retires requests at every step
and gives each one pages from a shared pool (vLLM, SGLang and transformers'
continuous batching work this way). This pool holds:

  pages   page_tokens tokens of one request, every layer, K and V, compressed
          with the store's decode codec (`segment.compress`, the decode
          layout of `StoreLayout`: whole n_b blocks, so a page is a whole
          number of blocks and KIVI groups). One slab per K/V part:
          [pages * layers, H, rows per page, *row], page p of layer l at row
          p * layers + l (the codec's batch axis)
  tails   each request's newest tokens, fewer than a page, exact in the
          codec's held dtype: [slots, layers, 2, H, page_tokens, D]
  sinks   each request's first `sink_tokens` tokens, exact, [slots,
          layers, 2, H, s, D]; in its first page those places hold copies of
          token s, so no group's range stretches to them (as a store's
          prefill block does); readers take tokens < s from here
          (token-minor, as a store's buffer: one (slot, layer, K/V, head)'s
          tokens are contiguous rows, which the C++ kernel reads in place)

Pages and tail slots come from one byte budget (`budget_bytes`): the slots
take `max_requests` tails (given; or as many as requests of `typical_tokens`
fill the budget with; by default a quarter of the budget) and the rest is
pages. `reserve` admits tokens only when whole pages are free for them,
so a request that does not fit is refused (the caller queues it), never
written past its pages; `free` returns them. A step's new tokens are
accounted once (`plan`) and written one layer at a time (`write`, right
after that layer's attention under `serving`): tokens into the tails,
and every page they fill compressed, `pages_at_once` pages per codec call,
outside the per-token work, as `store.flush_stores` is for `generate()`.
A step's K/V is thus never stacked over its layers, and the codec's fp32
temporaries stay those of a few pages (benchmarks/results/serve_cpu_memory.md).
Attention reads the pool through `page_kv`, `tail` and `sink`
(`paged_attention`).
Forking (`fork`) shares a request's compressed pages (reference counts) and
copies its tail and sinks.
Neighbours: `segment` (the codec), `store` (layouts and byte kinds),
`paged_attention` (reads the pool), `serving` (drives it from transformers'
continuous batching).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codec import resolve
from .config import CodecConfig
from .segment import Segment, compress, decompress
from .store import BYTE_KINDS, StoreLayout, _KIND_OF_PART


@dataclass
class _Request:
    slot: int                       # its tail and sinks
    pages: list[int] = field(default_factory=list)      # committed, in token order
    reserved: list[int] = field(default_factory=list)   # allocated, not yet written
    tail: int = 0                   # exact tokens in its tail


@dataclass
class _Write:
    """One row of a step (`PagedPool.plan`): the request's tail slot, the
    row's tokens [start, start + T) of the step, the tail's length before
    it, the pages it fills (in order) and whether the first of them is the
    request's first page (it sets the sinks)."""
    slot: int
    start: int
    T: int
    tail: int
    pages: list[int]
    first: bool


class PoolFull(RuntimeError):
    """A request asked for more pages or tail slots than the pool has free."""


class PagedPool:
    """Pages of compressed K/V for `layers` layers of `heads` KV heads of
    `head_dim`, in `budget_bytes` (module docstring)."""

    pages_at_once = 16      # pages of a layer per codec call (`_compress`)

    def __init__(self, config: CodecConfig, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                 budget_bytes: int, page_tokens: int | None = None, max_requests: int | None = None,
                 device: torch.device | str = "cpu", typical_tokens: int | None = None):
        self.config = resolve(config, head_dim)
        self.layers, self.heads, self.head_dim, self.dtype = layers, heads, head_dim, dtype
        self.held = self.config.held_dtype(dtype)
        self.layouts = {kind: StoreLayout.build(self.config, kind, head_dim, dtype, 0).decode
                        for kind in ("k", "v")}
        block = self.layouts["k"].block
        self.page_tokens = page_tokens or block * -(-64 // block)
        if self.page_tokens % block:
            raise ValueError(f"paged pool: page_tokens={self.page_tokens} must be a whole number of the "
                             f"codec's {block}-token blocks")
        self.sink_tokens = min(self.config.sink_tokens, self.page_tokens - 1) if self.config.compresses else 0
        token_bytes = layers * 2 * heads * head_dim * self.held.itemsize
        self.tail_bytes = (self.page_tokens + self.sink_tokens) * token_bytes
        self.page_bytes = layers * sum(_part_bytes(self.layouts[k], heads, self.page_tokens) for k in "kv")
        if max_requests is None and typical_tokens:    # a tail for each request of that length
            max_requests = budget_bytes // (self.tail_bytes + typical_tokens // self.page_tokens * self.page_bytes)
        if not max_requests:
            max_requests = max(1, budget_bytes // 4 // self.tail_bytes)
        n_pages = (budget_bytes - max_requests * self.tail_bytes) // self.page_bytes
        if n_pages < 1:
            raise ValueError(f"paged pool: {budget_bytes} bytes hold {max_requests} tails of "
                             f"{self.tail_bytes} bytes and no {self.page_bytes}-byte page; raise the "
                             f"budget or lower max_requests")
        self.n_pages, self.max_requests = int(n_pages), int(max_requests)
        self.slabs = {k: Segment.empty(self.layouts[k], self.n_pages * layers, heads, self.page_tokens, device)
                      for k in "kv"}
        self.tail = torch.zeros(self.max_requests, layers, 2, heads, self.page_tokens, head_dim,
                                dtype=self.held, device=device)
        self.sink = torch.zeros(self.max_requests, layers, 2, heads, self.sink_tokens, head_dim,
                                dtype=self.held, device=device)
        self.token_bytes = token_bytes
        self.refs = [0] * self.n_pages
        self.free_pages = list(range(self.n_pages - 1, -1, -1))
        self.free_slots = list(range(self.max_requests - 1, -1, -1))
        self.requests: dict[str, _Request] = {}

    # -- capacity ---------------------------------------------------------
    def tokens(self, rid: str) -> int:
        """Tokens committed for `rid` (pages and tail)."""
        r = self.requests[rid]
        return len(r.pages) * self.page_tokens + r.tail

    def free_tokens(self) -> int:
        """How many more tokens the pool can take: whole free pages (a new
        request also needs a free tail slot, `free_slots`)."""
        return len(self.free_pages) * self.page_tokens if self.free_slots else 0

    def capacity_tokens(self) -> int:
        """Tokens the pool holds when full (pages, and a tail per request)."""
        return self.n_pages * self.page_tokens

    def whole(self) -> bool:
        """True when no request holds anything (every page and slot free)."""
        return (not self.requests and len(self.free_pages) == self.n_pages
                and len(self.free_slots) == self.max_requests)

    def reserve(self, rid: str, total_tokens: int, dry_run: bool = False) -> bool:
        """Make room for `rid` to hold `total_tokens` tokens (a new request
        takes a tail slot). False, with nothing changed, when the pool lacks
        the pages or the slot: the caller keeps the request waiting."""
        r = self.requests.get(rid)
        need = self.pages_needed(rid, total_tokens)
        if need > len(self.free_pages) or (r is None and not self.free_slots):
            return False
        if dry_run:
            return True
        if r is None:
            r = self.requests[rid] = _Request(self.free_slots.pop())
        for _ in range(need):
            page = self.free_pages.pop()
            self.refs[page] = 1
            r.reserved.append(page)
        return True

    def pages_needed(self, rid: str, total_tokens: int) -> int:
        """Free pages `rid` must take to hold `total_tokens` tokens: its
        tail keeps fewer than a page, so the rest fill whole pages."""
        r = self.requests.get(rid)
        have = 0 if r is None else len(r.pages) + len(r.reserved)
        return max(0, total_tokens // self.page_tokens - have)

    def storable(self, needs: list[tuple[str, int]]) -> int:
        """How many of `needs` (request id, total tokens), taken in order,
        the free pages could grow to those totals (a question only)."""
        free = len(self.free_pages)
        for n, (rid, total) in enumerate(needs):
            free -= self.pages_needed(rid, total)
            if free < 0:
                return n
        return len(needs)

    def fits_alone(self, total_tokens: int) -> bool:
        """Whether a request of `total_tokens` fits in the empty pool."""
        return total_tokens // self.page_tokens <= self.n_pages

    def free(self, rid: str) -> None:
        """Return `rid`'s pages (those no fork still shares) and its slot."""
        r = self.requests.pop(rid, None)
        if r is None:
            return
        for page in r.pages + r.reserved:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free_pages.append(page)
        self.free_slots.append(r.slot)

    def fork(self, src: str, dst: str) -> bool:
        """`dst` starts as a copy of `src`: its compressed pages shared, its
        tail and sinks copied. False (nothing changed) without a free slot."""
        if not self.free_slots:
            return False
        s = self.requests[src]
        d = self.requests[dst] = _Request(self.free_slots.pop(), list(s.pages), [], s.tail)
        for page in d.pages:
            self.refs[page] += 1
        self.tail[d.slot].copy_(self.tail[s.slot])
        self.sink[d.slot].copy_(self.sink[s.slot])
        return True

    # -- writing ----------------------------------------------------------
    def commit(self, rows: list[tuple[str, int]], kv: torch.Tensor) -> None:
        """Append each row's new tokens, every layer: rows (request id, T) in
        the order of kv's token axis, kv [layers, 2, H, sum T, D]. The
        `plan` then `write` of each layer, as a step that has every layer's
        K/V at hand."""
        step = self.plan(rows)
        for layer in range(self.layers):
            self.write(step, layer, kv[layer, 0], kv[layer, 1])

    def plan(self, rows: list[tuple[str, int]]) -> list[_Write]:
        """A step's writes: rows (request id, T) in the order of the step's
        token axis (a row whose request was freed meanwhile, or of no token,
        is skipped). The requests' pages and tails are accounted at once;
        their data is written layer by layer (`write`), so that a caller
        holds one layer's new K/V at a time, never the step's whole stack.
        Raises PoolFull, with nothing changed, when a row fills more pages
        than its request reserved."""
        todo, start = [], 0
        for rid, T in rows:
            r = self.requests.get(rid)
            if r is not None and T:
                full = (r.tail + T) // self.page_tokens
                if full > len(r.reserved):
                    raise PoolFull(f"paged pool: request {rid} wrote {full} pages with "
                                   f"{len(r.reserved)} reserved (reserve before writing)")
                todo.append((r, _Write(r.slot, start, T, r.tail, r.reserved[:full], not r.pages)))
            start += T
        for r, w in todo:
            r.pages += w.pages
            del r.reserved[:len(w.pages)]
            r.tail = w.tail + w.T - len(w.pages) * self.page_tokens
        return [w for _, w in todo]

    def write(self, step: list[_Write], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One layer's data of a `plan`ned step: k, v [H, sum T, D]. Tokens
        go into the tails; the pages they fill are compressed,
        `pages_at_once` per codec call (`_compress`)."""
        kv = torch.stack([k, v], 1).to(self.held)              # [H, 2, sum T, D]
        pos, tok, pages, targets = [], [], [], []
        for w in step:
            if not w.pages:                        # the common decode step: into the tail
                pos += [(w.slot, w.tail + i) for i in range(w.T)]
                tok += range(w.start, w.start + w.T)
                continue
            x = torch.cat([self.tail[w.slot, layer, :, :, :w.tail].permute(2, 0, 1, 3),
                           kv[:, :, w.start:w.start + w.T].permute(2, 1, 0, 3)])     # [n, 2, H, D]
            for i, target in enumerate(w.pages):
                page = x[i * self.page_tokens:(i + 1) * self.page_tokens]
                if i == 0 and w.first and self.sink_tokens:
                    self.sink[w.slot, layer] = page[:self.sink_tokens].permute(1, 2, 0, 3)
                    page = torch.cat([page[self.sink_tokens:self.sink_tokens + 1].expand(
                        self.sink_tokens, *page.shape[1:]), page[self.sink_tokens:]])
                pages.append(page)
                targets.append(target)
            rest = x[len(w.pages) * self.page_tokens:]
            self.tail[w.slot, layer, :, :, :rest.shape[0]] = rest.permute(1, 2, 0, 3)
        if pos:
            slots, places = (torch.tensor(x, device=kv.device) for x in zip(*pos))
            self.tail[slots, layer, :, :, places] = kv[:, :, list(tok)].permute(2, 1, 0, 3)   # [N, 2, H, D]
        if pages:
            self._compress(torch.stack(pages), targets, layer)

    def _compress(self, pages: torch.Tensor, targets: list[int], layer: int) -> None:
        """One layer's pages [P, page_tokens, 2, H, D] into page slots
        `targets`, `pages_at_once` per codec call: the codec's fp32
        temporaries are about ten times its input. Each page is compressed
        on its own (the codec's batch axis), so the grouping changes no
        stored byte (tests/test_paged.py)."""
        rows = torch.tensor(targets, device=pages.device) * self.layers + layer
        for i, kind in enumerate("kv"):
            for a in range(0, pages.shape[0], self.pages_at_once):
                x = pages[a:a + self.pages_at_once, :, i].transpose(1, 2).contiguous()   # [p, H, page, D]
                packed = compress(x, self.layouts[kind])
                for name, t in packed.parts().items():
                    getattr(self.slabs[kind], name).index_copy_(0, rows[a:a + self.pages_at_once], t)

    # -- reading ----------------------------------------------------------
    def pages(self, rid: str) -> list[int]:
        return self.requests[rid].pages

    def slot(self, rid: str) -> int:
        return self.requests[rid].slot

    def tail_tokens(self, rid: str) -> int:
        return self.requests[rid].tail

    def page_kv(self, layer: int, pages: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `pages` (page ids) of one layer, rebuilt: [P, H, page_tokens, D]
        each. Only these pages are read (a bounded chunk, not a sequence)."""
        rows = pages * self.layers + layer
        out = []
        for kind in "kv":
            seg = Segment(**{n: t.index_select(0, rows) for n, t in self.slabs[kind].parts().items()})
            out.append(decompress(seg, self.layouts[kind], None, dtype))
        return out[0], out[1]

    # -- accounting -------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the pool holds (all allocated up front)."""
        slabs = sum(s.nbytes() for s in self.slabs.values())
        return slabs + sum(t.numel() * t.element_size() for t in (self.tail, self.sink))

    def breakdown(self) -> dict[str, int]:
        """`nbytes` by `store.BYTE_KINDS`: committed pages' parts under their
        kinds, free pages as "unused capacity", tails' held and empty token
        places, the sinks of requests that have a compressed page."""
        out = dict.fromkeys(BYTE_KINDS, 0)
        used = self.n_pages - len(self.free_pages)
        for kind in "kv":
            for name, t in self.slabs[kind].parts().items():
                held = t.numel() * t.element_size()
                out[_KIND_OF_PART[name]] += held * used // self.n_pages
                out["unused capacity"] += held - held * used // self.n_pages
        token_bytes = self.token_bytes
        held = sum(r.tail for r in self.requests.values())
        out["buffer held"] = held * token_bytes
        out["buffer empty"] = self.tail.numel() * self.tail.element_size() - held * token_bytes
        sinks = sum(1 for r in self.requests.values() if r.pages) * self.sink_tokens * token_bytes
        out["exact sinks"] = sinks
        out["unused capacity"] += self.sink.numel() * self.sink.element_size() - sinks
        return out


def _part_bytes(layout, heads: int, tokens: int) -> int:
    """Bytes of one page (batch 1) of a segment layout."""
    return sum(torch.Size(shape).numel() * dtype.itemsize
               for shape, dtype in layout.shapes(1, heads, tokens).values())
