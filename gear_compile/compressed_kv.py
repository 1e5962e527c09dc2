"""The compressed K or V of one cache layer, as a tensor a Hugging Face cache can hold.

`CompressedKV` is a traceable wrapper tensor subclass (the torchao pattern):
its logical shape and dtype are the dense K/V's [B, H, L, D]; its storage is
a `store.KVStore` (prefill block, decode blocks, exact buffer, lengths),
flattened into the store's inner tensors for Dynamo. Its logical tokens are
the store's newest L: all of them, except in a sliding-window layer, whose
store may still hold whole blocks older than the window (they are dropped a
batch at a time, `KVStore.forget`). Inner shapes only
change when the decode capacity grows, so compiled graphs see static shapes
(as with a static cache) and do not recompile per step.
What generation itself does to a cache acts on the compressed store directly
(`NATIVE`, torchao's `implements` table): beam-search reorders and batch
selects (`index_select` / indexing on the batch dim), batch expansion
(`repeat_interleave`), and cropping (a slice of the sequence dim). Any other
op decompresses and runs exactly (`__torch_dispatch__`, logged at debug
level), so no reader ever sees raw codes.
Neighbours: `store` (the layout, the streaming logic, the native operations),
`ops` (custom ops on the inner tensors), `runtime` (wraps stores after every call).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from . import ops  # noqa: F401 - registers gear::decompress, which reading the tensor densely calls
from .config import CodecConfig
from .store import RESERVED_KINDS, KVStore

log = logging.getLogger("gear_compile")
aten = torch.ops.aten
NATIVE: dict = {}     # aten op -> handler(kv, *args, **kwargs): a CompressedKV, or NotImplemented


def implements(*ops):
    """Register a handler that runs `ops` on the compressed store itself."""
    def register(handler):
        for op in ops:
            NATIVE[op] = handler
        return handler
    return register


class CompressedKV(torch.Tensor):
    """A dense-looking [B, H, L, D] K or V whose storage is a `KVStore`."""

    @staticmethod
    def __new__(cls, store: KVStore, length: int | None = None):
        B, H, _, D = store.buffer.shape
        H, D = store.logical or (H, D)
        if length is None:
            length = len(store)
        return torch.Tensor._make_wrapper_subclass(
            cls, (B, H, length, D), dtype=store.dtype, device=store.buffer.device)

    def __init__(self, store: KVStore, length: int | None = None):
        self.store = store
        # the traceable-subclass protocol reads inner tensors as attributes
        self.__dict__.update(zip(_flat(store).names, store.tensors()))

    @classmethod
    def of(cls, store: KVStore, length: int | None = None) -> CompressedKV:
        """The store (its newest `length` tokens; default all) as a cache's K
        or V, with the sizes that grow (the logical length, the decode
        capacity) marked dynamic so that neither decoding nor growth
        recompiles. (On the outer tensor only by attribute:
        `maybe_mark_dynamic` would also mark every inner tensor's dim 2, the
        buffer's and the prefill block's included, which never change.)"""
        kv = cls(store, length)
        kv._dynamo_weak_dynamic_indices = {2}
        tensors = store.tensors()
        for i in _flat(store).growing:       # a grown segment holds new tensors, to mark once each
            if tensors[i].shape[2] > 1 and not hasattr(tensors[i], "_dynamo_weak_dynamic_indices"):
                torch._dynamo.maybe_mark_dynamic(tensors[i], 2)
        return kv

    # traceable-subclass protocol: inner tensors by name, config as metadata
    def __tensor_flatten__(self):
        flat = _flat(self.store)
        return flat.names, flat.meta

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        config_json, kind, logical, dtype = meta
        store = KVStore(CodecConfig.from_json(config_json), kind, list(inner.values()), logical=logical,
                        dtype=dtype)
        return CompressedKV(store, outer_size[2])

    def decompress(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.store.logical is not None:
            if isinstance(self.store.buffer, FakeTensor):   # tracing: the shape is all Dynamo reads
                return self.store.buffer.new_empty(self.shape, dtype=dtype or self.dtype)
            raise NotImplementedError(
                f"gear: this {self.store.kind.upper()} cache layer holds LoRC latents, which only the "
                f"compiled graph turns back into K/V (K needs its RoPE at the cached positions); an op "
                f"outside the graph asked for the dense tensor. Run without lorc for this use.")
        dense = torch.ops.gear.decompress(self.store.tensors(), self.store.config.to_json(),
                                          self.store.kind, self.shape[2], self.dtype)
        return dense if dtype is None else dense.to(dtype)

    def __repr__(self):
        return (f"CompressedKV(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.store.config.describe()}, bytes={self.store.nbytes()})")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # `repeat_interleave` decomposes before `__torch_dispatch__` sees it
        # (unsqueeze, expand, clone, view), so batch expansion is caught here;
        # so is a crop, whose slice would otherwise return a view (`_crop`).
        handler = _BEFORE_DISPATCH.get(func)
        if handler is not None and isinstance(args[0], CompressedKV):
            out = handler(*args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = NATIVE.get(func)
        if handler is not None and isinstance(args[0], CompressedKV):
            out = handler(*args, **kwargs)
            if out is not NotImplemented:
                return out
        # every other op sees the exact dense reconstruction
        log.debug("gear: %s on a CompressedKV runs on its dense reconstruction", func)
        args, kwargs = pytree.tree_map_only(CompressedKV, lambda t: t.decompress(), (args, kwargs))
        return func(*args, **kwargs)


@dataclass(frozen=True)
class _Flat:
    """What flattening a store gives, the same at every decode step: the
    inner tensors' names, the metadata (the config's JSON, ...), and the
    positions of the tensors that grow."""

    names: list
    meta: tuple
    growing: tuple


# store -> _Flat. Dynamo's guards flatten every CompressedKV input at every
# call (60 for a 30-layer model) and the runtime wraps as many outputs: built
# once per store, not per call (the config's JSON alone is ~10 us to write).
_FLAT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flat(store: KVStore) -> _Flat:
    flat = _FLAT.get(store)
    if flat is None:
        names = store.tensor_names()
        flat = _Flat(list(names), (store.config.to_json(), store.kind, store.logical, store.dtype),
                     tuple(i for i, name in enumerate(names) if store.layout.grows(name)))
        _FLAT[store] = flat
    return flat


def _batch_dim(dim: int) -> bool:
    return dim in (0, -4)


@implements(aten.index_select.default)
def _index_select(kv: CompressedKV, dim: int, index: torch.Tensor):
    """Beam search's reorder: `keys.index_select(0, beam_idx)`."""
    return CompressedKV.of(kv.store.batch_select(index), kv.shape[2]) if _batch_dim(dim) else NotImplemented


@implements(aten.index.Tensor)
def _index(kv: CompressedKV, indices):
    """`keys[indices, ...]` (batch_select_indices): one index tensor, on the batch dim."""
    if len(indices) != 1 or indices[0] is None:
        return NotImplemented
    index = indices[0]
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(1)
    return CompressedKV.of(kv.store.batch_select(index.long()), kv.shape[2])


def _repeat_interleave(kv: CompressedKV, repeats, dim=None, output_size=None):
    """`keys.repeat_interleave(n, dim=0)` (batch_repeat_interleave)."""
    if dim is None or not _batch_dim(dim) or not isinstance(repeats, int):
        return NotImplemented
    return CompressedKV.of(kv.store.batch_repeat(repeats), kv.shape[2])


@implements(aten.slice.Tensor)
def _slice(kv: CompressedKV, dim: int = 0, start=None, end=None, step: int = 1):
    """`keys[..., :-n, :]` (crop, counted from the logical start); whole-range
    slices of any dim are the tensor itself."""
    size = kv.shape[dim]
    lo = 0 if start is None else (start + size if start < 0 else start)
    hi = size if end is None else min(size, end + size if end < 0 else end)
    if step != 1 or lo != 0:
        return NotImplemented
    if hi >= size:
        return kv
    if dim not in (2, -2):
        return NotImplemented
    hidden = len(kv.store) - size                # older tokens of a sliding window
    return CompressedKV.of(kv.store.cropped(hidden + max(0, hi)), max(0, hi))


def _crop(kv: CompressedKV, index):
    """`keys[..., :n, :]` (DynamicLayer.crop), caught before dispatch: there
    the slice's result would be a view of kv, and Dynamo rebuilds a view input
    by replaying the slice on a fake kv, whose lengths it cannot read."""
    crop = isinstance(index, tuple) and len(index) == 3 and index[0] is Ellipsis \
        and index[2] == slice(None) and isinstance(index[1], slice) \
        and index[1].start is None and index[1].step is None
    return _slice(kv, 2, None, index[1].stop) if crop else NotImplemented


_BEFORE_DISPATCH = {torch.Tensor.repeat_interleave: _repeat_interleave,
                    torch.repeat_interleave: _repeat_interleave,
                    torch.Tensor.__getitem__: _crop}


def kv_bytes(obj) -> int:
    """Bytes held by a K/V tensor, a `CompressedKV`, or a whole cache.

    For a compressed tensor: codes, scales, zero points, low-rank factors,
    outlier values and indices, the streaming buffer and the lengths, as allocated on the
    device (the reserved decode capacity included). For a dense tensor or cache:
    numel * element size. Caches are walked through their `layers` (keys and
    values, and a hybrid layer's exact states: `STATE_KINDS`); tuples and
    lists are summed.
    """
    if isinstance(obj, CompressedKV):
        return obj.store.nbytes()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "layers"):
        return kv_breakdown(obj).held
    if isinstance(obj, (tuple, list)):
        return sum(kv_bytes(o) for o in obj)
    raise TypeError(f"kv_bytes: expected a tensor, CompressedKV or cache, got {type(obj).__name__}.")


# a hybrid layer's other cached tensors, held exact and counted as their own kind: a linear-attention /
# state-space layer's conv and recurrent states (transformers' LinearAttentionCacheLayerMixin), a sparse
# attention's indexer keys (DynamicIndexedLayer)
STATE_KINDS = {"conv_states": "recurrent state", "recurrent_states": "recurrent state",
               "indexer_keys": "indexer keys"}


def _states(layer) -> KVBytes:
    kinds = {}
    for name, kind in STATE_KINDS.items():
        held = getattr(layer, name, None)
        for t in (held.values() if isinstance(held, dict) else [held]):
            if isinstance(t, torch.Tensor):
                kinds[kind] = kinds.get(kind, 0) + t.numel() * t.element_size()
    return KVBytes(kinds)


@dataclass(frozen=True)
class KVBytes:
    """What a cache's bytes hold (`kv_breakdown`): `kinds` maps each kind of
    `store.BYTE_KINDS` (plus "dense" for K/V stored densely, and a hybrid's
    exact states, `STATE_KINDS`) to bytes.

    held      every byte allocated (= kv_bytes)
    reserved  room allocated ahead of need: decode capacity not yet filled
              and the exact buffer's empty slots
    used      held - reserved: what the tokens in the cache take
    """

    kinds: dict

    @property
    def held(self) -> int:
        return sum(self.kinds.values())

    @property
    def reserved(self) -> int:
        return sum(self.kinds.get(k, 0) for k in RESERVED_KINDS)

    @property
    def used(self) -> int:
        return self.held - self.reserved

    def __add__(self, other: KVBytes) -> KVBytes:
        return KVBytes({k: self.kinds.get(k, 0) + other.kinds.get(k, 0)
                        for k in dict.fromkeys([*self.kinds, *other.kinds])})


def kv_breakdown(obj) -> KVBytes:
    """`kv_bytes`, split by what the bytes hold (see `KVBytes`): a K/V
    tensor, a `CompressedKV`, or a whole cache (walked like `kv_bytes`)."""
    if isinstance(obj, CompressedKV):
        return KVBytes(obj.store.breakdown())
    if isinstance(obj, torch.Tensor):
        return KVBytes({"dense": obj.numel() * obj.element_size()})
    if hasattr(obj, "layers"):
        return sum((kv_breakdown(getattr(layer, name)) for layer in obj.layers for name in ("keys", "values")
                    if isinstance(getattr(layer, name, None), torch.Tensor)),
                   sum((_states(layer) for layer in obj.layers), KVBytes({})))
    if isinstance(obj, (tuple, list)):
        return sum((kv_breakdown(o) for o in obj), KVBytes({}))
    raise TypeError(f"kv_breakdown: expected a tensor, CompressedKV or cache, got {type(obj).__name__}.")


def dense_bytes(obj, dtype: torch.dtype = torch.float16) -> int:
    """Bytes the same K/V would take stored densely in `dtype` (the FP16
    reference of the paper's "KV size")."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * itemsize
    if hasattr(obj, "layers"):
        return sum(dense_bytes(getattr(layer, name), dtype) for layer in obj.layers
                   for name in ("keys", "values") if getattr(layer, name, None) is not None)
    if isinstance(obj, (tuple, list)):
        return sum(dense_bytes(o, dtype) for o in obj)
    raise TypeError(f"dense_bytes: expected a tensor or cache, got {type(obj).__name__}.")
