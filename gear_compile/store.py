"""The compressed K or V of one cache layer: its inner tensors, described once.

A store holds

  lengths   int64 [3] on the store's device: tokens in the prefill block, in
            the decode blocks and in the buffer (read by attention kernels)
  buffer    [B, H, n_b, D] exact: the newest tokens, in `CodecConfig.held_dtype`
            of the model's (fp16 for an fp32 model)
  sink      [B, H, s, D] exact, in the same dtype: the prompt's first s tokens
            (`CodecConfig.sink_tokens`). They shadow the prefill block's first
            s tokens, which were compressed as copies of token s so that no
            group's range stretches to them: readers take tokens < s from here
  p_<part>  the prefill block (one block of P tokens, rank r_p), `segment`
  d_<part>  n_b-token decode blocks (rank r_g) in a reserved capacity

`StoreLayout` is the one description of that list: its order, each tensor's
shape and dtype, which ones grow (the decode parts, along dim 2), and the
descriptor the CPU kernel reads. The fake implementations (`ops`), the
rewrite (one graph input per inner tensor), the runtime (flatten, rebuild)
and the kernel launchers all read it.

`KVStore` is the tensors plus a host copy of the lengths (`counts`), which
the runtime keeps in step without reading the device: the decode graph
writes each new token into the buffer and bumps `lengths` itself, and the
runtime, which knows how many tokens each call appended, compresses the
buffer into the decode segment once it holds n_b tokens (`flush_stores`:
every full store of a call in one batched compression). Old blocks are never
touched again. The sinks' count is the sink tensor's length (at most the
prefill block's).
Neighbours: `segment` (the codec and layout of a segment), `compressed_kv`
(the tensor subclass that carries a store), `runtime` (calls `flush_stores`),
`ops` and `kernels` (read stores).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import outliers
from .packing import ceil_div
from .codec import Codec, resolve
from .config import CodecConfig
from .segment import Segment, SegmentLayout, compress, decompress

HEAD = ("lengths", "buffer", "sink")
# What a store's bytes hold (`KVStore.breakdown`); the last two kinds before
# the lengths are reserved room, the rest is in use.
BYTE_KINDS = ("codes", "scale/zero", "low-rank", "outliers", "exact sinks", "buffer held",
              "unused capacity", "buffer empty", "lengths")
RESERVED_KINDS = ("unused capacity", "buffer empty")
_KIND_OF_PART = {"codes": "codes", "scale": "scale/zero", "zero": "scale/zero", "lr_a": "low-rank",
                 "lr_b": "low-rank", "lr_s": "low-rank", "out_val": "outliers", "out_idx": "outliers",
                 "out_ptr": "outliers"}
# Fields of a segment in the CPU kernel's descriptor (kernels/cpu_attention.cpp, enum Field):
# how it is quantized, then the index of each part in the flat list (-1: absent).
KERNEL_PARTS = ("codes", "scale", "zero", "lr_a", "lr_b", "lr_s", "out_val", "out_idx", "out_ptr")
KERNEL_FIELDS = ("exact", "bits", "channel_axis", "group", "block", "out_shift") + KERNEL_PARTS
# How an exact segment (the sinks, the buffer) reads in those fields: values as they are
# (16 bits: no codes to unpack), one per token, the whole segment one block, no outliers.
EXACT_SEGMENT = dict(exact=1, bits=16, channel_axis=0, group=1, block=0, out_shift=0)
# The segments of a store in position order, as every kernel walks them: the exact sinks
# (which shadow the prefill block's first tokens), the prefill block, the decode blocks,
# the buffer. The descriptor lists them in this order.
SEGMENT_ORDER = ("sink", "prefill", "decode", "buffer")



@dataclass(frozen=True)
class StoreLayout:
    """The ordered inner tensors of a K ("k") or V ("v") store."""

    kind: str
    prefill: SegmentLayout
    decode: SegmentLayout
    head_dim: int
    dtype: torch.dtype
    sink_tokens: int = 0

    @classmethod
    def build(cls, config: CodecConfig, kind: str, head_dim: int, dtype: torch.dtype,
              prefill_tokens: int, sink_tokens: int = 0) -> StoreLayout:
        """The layout of a store of K/V of `dtype` (held in `config.held_dtype(dtype)`)."""
        config = resolve(config, head_dim)
        dtype = config.held_dtype(dtype)
        args = (config, kind, head_dim, dtype, prefill_tokens, sink_tokens)
        if all(isinstance(a, int) for a in (head_dim, prefill_tokens, sink_tokens)):
            return _layout(*args)
        return _layout.__wrapped__(*args)   # tracing: SymInts

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return (HEAD + tuple(f"p_{n}" for n in self.prefill.part_names)
                + tuple(f"d_{n}" for n in self.decode.part_names))

    def shapes(self, batch: int, heads: int, capacity) -> list[tuple[tuple, torch.dtype]]:
        """(shape, dtype) of every inner tensor, in order, for a decode capacity
        of `capacity` tokens."""
        out = [((3,), torch.int64), ((batch, heads, self.decode.block, self.head_dim), self.dtype),
               ((batch, heads, self.sink_tokens, self.head_dim), self.dtype)]
        for seg, tokens in ((self.prefill, self.prefill.block), (self.decode, capacity)):
            out += list(seg.shapes(batch, heads, tokens).values())
        return out

    def grows(self, name: str) -> bool:
        """Whether dim 2 of the named tensor grows with the decode capacity."""
        return name.startswith("d_")

    def segments(self) -> list[tuple[str, SegmentLayout | None]]:
        """(name, layout) of each segment in `SEGMENT_ORDER`; None for the
        exact ones (sinks, buffer)."""
        return [(name, getattr(self, name) if name in ("prefill", "decode") else None) for name in SEGMENT_ORDER]

    @functools.cached_property
    def kernel_descriptor(self) -> tuple[int, ...]:
        """What the CPU kernel needs beyond the tensors: [index of lengths,
        index of buffer] then KERNEL_FIELDS for the sinks, the prefill block,
        the decode blocks and the buffer (group 0: the whole block; block 0:
        the whole segment; out_shift: outlier counts are in 2^-out_shift
        steps; rank and outlier counts are read from the shapes)."""
        names = self.names

        def segment(parts: dict, **how) -> list[int]:
            fields = dict(how, **{f: parts.get(f, -1) for f in KERNEL_PARTS})
            return [fields[f] for f in KERNEL_FIELDS]

        out = [names.index("lengths"), names.index("buffer")]
        for name, seg in self.segments():
            if seg is None:            # exact rows held as they are: one tensor, the codes' place
                out += segment({"codes": names.index(name)}, **EXACT_SEGMENT)
                continue
            prefix = name[0] + "_"
            group = 0 if seg.spec.axis == "channel" and seg.spec.group is None else \
                (seg.spec.group or seg.head_dim)
            out += segment({f: names.index(prefix + f) for f in KERNEL_PARTS if prefix + f in names},
                           exact=int(seg.exact), bits=seg.spec.bits, channel_axis=int(seg.spec.axis == "channel"),
                           group=group, block=0 if seg is self.prefill else seg.block,
                           out_shift=outliers.unit_shift(seg.spec.bits))
        return tuple(out)


@functools.lru_cache(maxsize=256)
def _layout(config: Codec, kind: str, head_dim: int, dtype: torch.dtype,
            prefill_tokens: int, sink_tokens: int) -> StoreLayout:
    spec = config.key_spec() if kind == "k" else config.value_spec()
    s = config.outliers

    def segment(block, rank):
        length = block if kind == "k" else head_dim
        return SegmentLayout(spec=spec, kind=kind, block=block,
                             rank=rank if config.uses_low_rank else 0,
                             outliers_per_side=outliers.count_per_side(s, length) if spec.bits != 16 else 0,
                             head_dim=head_dim, dtype=dtype, power_iters=config.power_iters)

    prefill_block = prefill_tokens if prefill_tokens > 0 else (spec.group or 1)
    return StoreLayout(kind, segment(prefill_block, config.rank_prefill),
                       segment(config.block_size, config.rank_decode),
                       head_dim, dtype, sink_tokens)


class KVStore:
    """The inner tensors of a K or V store (in `layout.names` order) and the
    host copy of its lengths. logical: (heads, head_dim) of the dense K/V
    the store stands for when it holds something else (LoRC latents, one
    "head" of the layer's rank: `passes.lorc`); None: its own. A LoRC store
    has one more tensor, last: `lorc_sinks` [B, heads, s, head_dim], its
    first s tokens' K (before RoPE) or V kept exact. dtype: the dense K/V's
    (None: the buffer's; it holds fp32 K/V in fp16)."""

    def __init__(self, config: CodecConfig, kind: str, tensors: list[torch.Tensor],
                 counts: list[int] | None = None, logical: tuple[int, int] | None = None,
                 dtype: torch.dtype | None = None):
        buffer, sink, p_codes = tensors[1:len(HEAD) + 1]
        self.config, self.kind, self.logical = resolve(config, buffer.shape[-1]), kind, logical
        self.dtype = dtype or buffer.dtype
        self.layout = StoreLayout.build(config, kind, buffer.shape[-1], buffer.dtype, p_codes.shape[2],
                                        sink.shape[2])
        self._tensors = list(tensors)
        self._counts = list(counts) if counts is not None else None
        if len(tensors) != len(self.layout.names) + (logical is not None):
            raise ValueError(f"KVStore: {len(tensors)} tensors for the {len(self.layout.names)} of "
                             f"{self.layout.names}{' and the LoRC sinks' if logical else ''}")
        self.prefill = Segment(**dict(zip(self.layout.prefill.part_names, tensors[self._segment_at(0):])))
        self.decode = Segment(**dict(zip(self.layout.decode.part_names,
                                         tensors[self._segment_at(1):len(self.layout.names)])))

    def _segment_at(self, segment: int) -> int:
        """Index of the first tensor of the prefill (0) or decode (1) segment."""
        return len(HEAD) + segment * len(self.layout.prefill.part_names)

    # -- the flat list ----------------------------------------------------
    def tensor_names(self) -> tuple[str, ...]:
        return self.layout.names + (("lorc_sinks",) if self.logical is not None else ())

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    @property
    def lengths(self) -> torch.Tensor:
        return self._tensors[0]

    @property
    def buffer(self) -> torch.Tensor:
        return self._tensors[1]

    @property
    def sink(self) -> torch.Tensor:
        """The exact sink tokens [B, H, s, D] (s may be 0)."""
        return self._tensors[2]

    @property
    def lorc_sinks(self) -> torch.Tensor | None:
        """A LoRC store's exact first tokens (class docstring); None otherwise."""
        return self._tensors[-1] if self.logical is not None else None

    @property
    def p_layout(self) -> SegmentLayout:
        return self.layout.prefill

    @property
    def d_layout(self) -> SegmentLayout:
        return self.layout.decode

    # -- sizes ------------------------------------------------------------
    def counts(self) -> tuple[int, int, int]:
        """(prefill, decode, buffer) tokens, from the host copy; a store rebuilt
        from bare tensors reads its device lengths once (a sync on a GPU)."""
        if self._counts is None:
            self._counts = [int(v) for v in self.lengths.tolist()]
        return tuple(self._counts)

    def __len__(self) -> int:
        return sum(self.counts())

    @property
    def capacity(self) -> int:
        return self.decode.codes.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors)

    def breakdown(self) -> dict[str, int]:
        """The bytes held (`nbytes`), by what they hold (`BYTE_KINDS`): each
        segment part's rows in use under its kind, the decode rows reserved
        but not yet filled under "unused capacity", the buffer's held and
        empty token slots, the lengths, and the exact sinks (with a LoRC
        store's). The values sum to `nbytes`."""
        out = dict.fromkeys(BYTE_KINDS, 0)
        _, n_dec, n_buf = self.counts()
        for seg, layout, tokens in ((self.prefill, self.layout.prefill, None),
                                    (self.decode, self.layout.decode, n_dec)):
            for part in layout.parts:
                t = getattr(seg, part.name)
                held = t.numel() * t.element_size()
                used = held if tokens is None else part.rows(tokens) * (held // max(1, t.shape[2]))
                out[_KIND_OF_PART[part.name]] += used
                out["unused capacity"] += held - used
        per_token = self.buffer[:, :, :1].numel() * self.buffer.element_size()
        out["buffer held"] = n_buf * per_token
        out["buffer empty"] = (self.buffer.shape[2] - n_buf) * per_token
        out["lengths"] = self.lengths.numel() * self.lengths.element_size()
        for t in (self.sink, self.lorc_sinks):
            out["exact sinks"] += 0 if t is None else t.numel() * t.element_size()
        return out

    # -- building (eager; `ops.kv_prefill` wraps it) ----------------------
    @classmethod
    def from_prefill(cls, x: torch.Tensor, config: CodecConfig, kind: str,
                     check_finite: bool = False, streamed: bool = False) -> KVStore:
        """Compress x [B, H, P, D]: whole groups form the prefill block (its
        first `sink_tokens` also held exact), the rest goes to the buffer.
        streamed: no prefill block; whole n_b blocks go to the decode segment,
        as if the prompt had been decoded token by token (a sliding-window
        layer, whose oldest blocks then leave the window one at a time:
        `forget`)."""
        B, H, P, D = x.shape
        config = resolve(config, D)
        split = config.split(P, streamed)
        n_pre, n_dec, n_sink = split.prefill, split.decode, split.sinks
        layout = StoreLayout.build(config, kind, D, x.dtype, n_pre, n_sink)
        sink = x[:, :, :n_sink].to(layout.dtype, copy=True)
        if n_pre:
            block = x[:, :, :n_pre]
            if n_sink < n_pre:           # the sinks' places: copies of the next token
                block = torch.cat([block[:, :, n_sink:n_sink + 1].expand(-1, -1, n_sink, -1),
                                   block[:, :, n_sink:]], dim=2)
            prefill = compress(block, layout.prefill, check_finite=check_finite)
        else:
            prefill = Segment.empty(layout.prefill, B, H, 0, x.device)
        decode = Segment.empty(layout.decode, B, H, config.decode_capacity_for(n_dec), x.device)
        if n_dec:
            decode.write(compress(x[:, :, :n_dec], layout.decode, check_finite=check_finite),
                         layout.decode, 0)
        buffer = x.new_zeros(B, H, layout.decode.block, D, dtype=layout.dtype)
        rem = split.buffer
        buffer[:, :, :rem] = x[:, :, n_pre + n_dec:]
        lengths = torch.tensor([n_pre, n_dec, rem], dtype=torch.int64, device=x.device)
        tensors = [lengths, buffer, sink] + list(prefill.parts().values()) + \
            list(decode.parts().values())
        return cls(config, kind, tensors, [n_pre, n_dec, rem], dtype=x.dtype)

    # -- appending --------------------------------------------------------
    def wrote(self, tokens: int) -> bool:
        """Record that `tokens` were written into the buffer on the device (by
        the decode graph, which also bumped `lengths`); True when the buffer
        is full and must be flushed."""
        counts = list(self.counts())
        counts[2] += tokens
        self._counts = counts
        return counts[2] >= self.layout.decode.block

    def took_block(self, block: Segment, delta: torch.Tensor) -> None:
        """Move the buffer's first n_b tokens into the decode segment as
        `block` (their compressed form): written after the decode tokens, and
        counted on the host and on the device, where `delta` (`_flush_delta`)
        updates the lengths without a sync."""
        n_pre, n_dec, n_buf = self.counts()
        self.decode.write(block, self.layout.decode, n_dec)
        self.lengths.add_(delta)
        self._counts = [n_pre, n_dec + self.layout.decode.block, n_buf - self.layout.decode.block]

    def append(self, new: torch.Tensor, check_finite: bool = False) -> None:
        """Push new [B, H, T, D] (any T) through the buffer, compressing each
        block that fills: the eager path of multi-token appends."""
        new = new.to(self.buffer.dtype)
        n_b, done, T = self.layout.decode.block, 0, new.shape[2]
        while done < T:
            n_buf = self.counts()[2]
            take = min(n_b - n_buf, T - done)
            self.buffer[:, :, n_buf:n_buf + take] = new[:, :, done:done + take]
            self.lengths[2] += take
            done += take
            if self.wrote(take):
                flush_stores([self], check_finite=check_finite)

    def grow(self, min_free: int) -> None:
        """Make room for at least `min_free` more decode tokens, growing the
        capacity geometrically (by at least a quarter) in whole blocks so that
        copies stay rare; the decode tensors are replaced."""
        n_dec = self.counts()[1]
        free = self.capacity - n_dec
        if free >= min_free:
            return
        n_b = self.layout.decode.block
        extra = max(min_free - free, self.capacity // 4)
        self.decode = self.decode.resized(self.layout.decode, self.capacity + ceil_div(extra, n_b) * n_b)
        self._tensors[self._segment_at(1):len(self.layout.names)] = list(self.decode.parts().values())

    def forget(self, keep: int) -> None:
        """Drop compressed tokens no query will see again: a sliding-window
        layer's tokens before its newest `keep`. The store is a streamed one
        (no prefill block), so only whole decode blocks go, and nothing is
        recompressed: the blocks that stay move to the front of the segment,
        in batches of at least a quarter of the blocks held, so that the copy
        is amortised (the store holds at most about 1.25 keep + 2 n_b
        tokens). Attention hides what stays stale in the meantime: the
        layer's mask does not reach it."""
        _, n_dec, n_buf = self.counts()
        n_b = self.layout.decode.block
        held = n_dec // n_b
        drop = min(max(0, n_dec + n_buf - keep) // n_b, held)
        if not drop or drop < max(1, held // 4):
            return
        kept = self.decode.blocks(self.layout.decode, drop, held - drop)
        self.decode.write(Segment(**{name: t.clone() for name, t in kept.parts().items()}),
                          self.layout.decode, 0)
        self.lengths[1].sub_(drop * n_b)
        self._counts = [0, n_dec - drop * n_b, n_buf]

    # -- what generation does to a cache (beam search, speculative decoding) --
    def batch_select(self, index: torch.Tensor) -> KVStore:
        """The store of sequences `index` (with repeats, in that order): each
        inner tensor's batch rows, compressed blocks as they are. All
        sequences of a store share its lengths."""
        index = index.to(self.buffer.device)
        tensors = [self.lengths.clone()] + [t.index_select(0, index) for t in self._tensors[1:]]
        return self._with(tensors, self.counts())

    def batch_repeat(self, repeats: int) -> KVStore:
        """Every sequence `repeats` times in a row (beam and sample expansion)."""
        tensors = [self.lengths.clone()] + [t.repeat_interleave(repeats, dim=0)
                                             for t in self._tensors[1:]]
        return self._with(tensors, self.counts())

    def cropped(self, length: int) -> KVStore:
        """The first `length` tokens, as speculative decoding's rollback needs.

        In the prefill block or the buffer the crop is exact: only the counts
        shrink, and the sinks if it cuts them (the prefill block is never
        written again, so a shorter valid length is all it takes). In the
        decode blocks, the blocks before the crop point stay as they are and
        the cut block is re-opened: its kept tokens (fewer than n_b) are
        rebuilt into the buffer, to be compressed again when the buffer next
        fills; no other token is ever recompressed. The result shares its
        compressed parts with this store (as a slice shares storage), and
        owns its buffer and lengths.
        """
        n_pre, n_dec, n_buf = self.counts()
        if length >= n_pre + n_dec + n_buf:
            return self
        buffer = self.buffer.clone()
        if length <= n_pre:
            counts = [length, 0, 0]
        elif length <= n_pre + n_dec:
            n_b = self.layout.decode.block
            kept = length - n_pre
            whole, part = kept // n_b * n_b, kept % n_b
            if part:
                block = self.decode.blocks(self.layout.decode, whole // n_b, 1)
                buffer[:, :, :part] = decompress(block, self.layout.decode, part, buffer.dtype)
            counts = [n_pre, whole, part]
        else:
            counts = [n_pre, n_dec, length - n_pre - n_dec]
        lengths = torch.tensor(counts, dtype=torch.int64, device=self.lengths.device)
        tensors = [lengths, buffer, self.sink[:, :, :length]] + self._tensors[len(HEAD):]
        if self.lorc_sinks is not None:
            tensors[-1] = self.lorc_sinks[:, :, :length]
        return self._with(tensors, counts)

    def _with(self, tensors: list[torch.Tensor], counts) -> KVStore:
        """A store like this one holding `tensors`."""
        return KVStore(self.config, self.kind, tensors, counts, self.logical, self.dtype)

    def decompress(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [B, H, L, D] K or V, in `dtype` (default: the dense K/V's)."""
        _, n_dec, n_buf = self.counts()
        dtype = dtype or self.dtype
        parts = [self.decompress_prefill(dtype), decompress(self.decode, self.layout.decode, n_dec, dtype),
                 self.buffer[:, :, :n_buf].to(dtype)]
        return torch.cat(parts, dim=2)

    def decompress_prefill(self, dtype: torch.dtype) -> torch.Tensor:
        """The prefill block's tokens [B, H, n_pre, D] in `dtype`: the exact
        sinks, then the block's rebuilt tokens after them."""
        prefill = decompress(self.prefill, self.layout.prefill, self.counts()[0], dtype)
        return torch.cat([self.sink.to(dtype), prefill[:, :, self.sink.shape[2]:]], dim=2)


def flush_stores(stores: list[KVStore], check_finite: bool = False) -> None:
    """Compress the full buffer of every store into its decode segment.

    Stores with the same layout and shapes (a model's layers) are compressed
    together in one batched call: the codec works per (sequence, head) and
    block, so this is the per-store result at a fraction of the Python and
    op-dispatch cost. The decode segments grow first where full.
    """
    groups: dict[tuple, list[KVStore]] = {}
    for store in stores:
        store.grow(store.layout.decode.block)
        key = (store.layout, tuple(store.buffer.shape), store.buffer.device)
        groups.setdefault(key, []).append(store)
    for (layout, _, device), group in groups.items():
        n_b = layout.decode.block
        block = torch.cat([s.buffer[:, :, :n_b] for s in group], dim=0)
        packed = compress(block, layout.decode, check_finite=check_finite)
        batch = group[0].buffer.shape[0]
        delta = _flush_delta(n_b, device)
        for i, store in enumerate(group):
            store.took_block(Segment(**{name: t[i * batch:(i + 1) * batch]
                                        for name, t in packed.parts().items()}), delta)


@functools.lru_cache(maxsize=16)
def _flush_delta(block: int, device: torch.device) -> torch.Tensor:
    """What a flush adds to `lengths`: a block moves from the buffer to the
    decode segment (kept on the device, so the update needs no host copy)."""
    return torch.tensor([0, block, -block], dtype=torch.int64, device=device)
