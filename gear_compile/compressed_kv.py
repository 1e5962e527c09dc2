"""The compressed K or V of one cache layer, as a tensor a Hugging Face cache can hold.

`CompressedKV` is a traceable wrapper tensor subclass (the torchao pattern):
its logical shape and dtype are the dense K/V's [B, H, L, D]; its storage is

  prefill segment   the first P tokens, compressed as one block (rank r_p)
  decode segment    n_b-token blocks (rank r_g), in a reserved capacity
  buffer            up to n_b most recent tokens, exact (the streaming buffer)
  lengths           int64 CPU tensor [prefill tokens, decode tokens, buffer tokens]

Appending writes into the buffer; when it holds n_b tokens (the flush point)
exactly that block is compressed into the decode segment: old blocks are never
touched again. Inner shapes only change when the capacity grows, so compiled
graphs see static shapes (as with a static cache) and do not recompile per step.
Any op this class does not implement dequantizes and runs exactly
(`__torch_dispatch__`), so no reader ever sees raw codes.
Neighbours: `segment` (the layout), `ops` (custom ops that prefill/append/
attend on the inner tensors), `backend` (flattens this into graph inputs).
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from . import outliers
from .config import GearConfig
from .segment import Segment, SegmentLayout, compress, dequantize


def segment_layouts(config: GearConfig, kind: str, head_dim: int, dtype: torch.dtype,
                    prefill_tokens: int) -> tuple[SegmentLayout, SegmentLayout]:
    """(prefill layout, decode layout) for K (kind "k") or V ("v")."""
    spec = config.key_spec() if kind == "k" else config.value_spec()
    s = config.outliers

    def layout(block, rank):
        length = block if kind == "k" else head_dim
        return SegmentLayout(spec=spec, kind=kind, block=block,
                             rank=rank if config.uses_low_rank else 0,
                             outliers_per_side=outliers.count_per_side(s, length) if spec.bits != 16 else 0,
                             head_dim=head_dim, dtype=dtype, power_iters=config.power_iters)

    prefill_block = prefill_tokens if prefill_tokens > 0 else (spec.group or 1)
    return layout(prefill_block, config.rank_prefill), layout(config.block_size, config.rank_decode)


class KVStore:
    """Plain-Python view of the parts: used by ops, dequantization and kv_bytes."""

    def __init__(self, config: GearConfig, kind: str, prefill: Segment, decode: Segment,
                 buffer: torch.Tensor, lengths: torch.Tensor):
        self.config, self.kind = config, kind
        self.prefill, self.decode, self.buffer, self.lengths = prefill, decode, buffer, lengths
        B, H, _, D = buffer.shape
        self.p_layout, self.d_layout = segment_layouts(config, kind, D, buffer.dtype,
                                                       prefill.codes.shape[2])

    # -- flattening: a fixed, named order of tensors -------------------
    def tensor_names(self) -> list[str]:
        return (["lengths", "buffer"] + [f"p_{n}" for n in self.p_layout.part_names()]
                + [f"d_{n}" for n in self.d_layout.part_names()])

    def tensors(self) -> list[torch.Tensor]:
        return [self._get(n) for n in self.tensor_names()]

    def _get(self, name):
        if name in ("lengths", "buffer"):
            return getattr(self, name)
        seg = self.prefill if name[0] == "p" else self.decode
        return getattr(seg, name[2:])

    @classmethod
    def from_tensors(cls, config: GearConfig, kind: str, tensors: list[torch.Tensor]) -> KVStore:
        lengths, buffer, *rest = tensors
        D = buffer.shape[-1]
        # the prefill part count is fixed by the layout; its token count is codes.shape[2]
        p_codes = rest[0]
        p_layout, d_layout = segment_layouts(config, kind, D, buffer.dtype, p_codes.shape[2])
        np_ = len(p_layout.part_names())
        prefill = Segment(**dict(zip(p_layout.part_names(), rest[:np_])))
        decode = Segment(**dict(zip(d_layout.part_names(), rest[np_:])))
        return cls(config, kind, prefill, decode, buffer, lengths)

    # -- sizes ---------------------------------------------------------
    def counts(self) -> tuple[int, int, int]:
        p, d, b = (int(v) for v in self.lengths.tolist())
        return p, d, b

    @property
    def capacity(self) -> int:
        return self.decode.codes.shape[2]

    def nbytes(self) -> int:
        return self.prefill.nbytes() + self.decode.nbytes() + self.buffer.numel() * self.buffer.element_size()

    # -- building and appending (eager; wrapped by `ops`) ---------------
    @classmethod
    def from_prefill(cls, x: torch.Tensor, config: GearConfig, kind: str,
                     check_finite: bool = False) -> KVStore:
        """Compress x [B, H, P, D]: whole groups form the prefill block, the rest
        goes to the buffer."""
        B, H, P, D = x.shape
        n_pre = config.prefill_tokens(P)
        p_layout, d_layout = segment_layouts(config, kind, D, x.dtype, n_pre)
        if n_pre:
            prefill = compress(x[:, :, :n_pre], p_layout, check_finite=check_finite)
        else:
            prefill = Segment.empty(p_layout, B, H, 0, x.device)
        cap = config.initial_decode_capacity
        decode = Segment.empty(d_layout, B, H, cap, x.device)
        buffer = x.new_zeros(B, H, config.block_size, D)
        rem = P - n_pre
        buffer[:, :, :rem] = x[:, :, n_pre:]
        lengths = torch.tensor([n_pre, 0, rem], dtype=torch.int64)
        return cls(config, kind, prefill, decode, buffer, lengths)

    def append(self, new: torch.Tensor, check_finite: bool = False) -> None:
        """Push new [B, H, T, D] into the buffer; compress each block that fills."""
        n_pre, n_dec, n_buf = self.counts()
        nb = self.config.block_size
        T = new.shape[2]
        if n_buf + T < nb:
            self.buffer[:, :, n_buf:n_buf + T] = new
            self.lengths[2] = n_buf + T
            return
        pending = torch.cat([self.buffer[:, :, :n_buf], new.to(self.buffer.dtype)], dim=2)
        full = (pending.shape[2] // nb) * nb
        if n_dec + full > self.capacity:
            raise RuntimeError(
                f"gear cache: decode capacity {self.capacity} tokens is full ({n_dec} used, "
                f"{full} to add); grow it first (KVStore.grow) or raise decode_capacity.")
        block = compress(pending[:, :, :full], self.d_layout, check_finite=check_finite)
        self.decode.write(block, self.d_layout, n_dec)
        rem = pending.shape[2] - full
        self.buffer[:, :, :rem] = pending[:, :, full:]
        self.lengths[1] = n_dec + full
        self.lengths[2] = rem

    def grow(self, min_free: int) -> KVStore:
        """A store whose decode capacity has at least `min_free` free tokens,
        grown geometrically (by at least a quarter) in whole blocks so that
        copies stay rare; returns self if there is room already."""
        n_pre, n_dec, n_buf = self.counts()
        free = self.capacity - n_dec
        if free >= min_free:
            return self
        nb = self.config.block_size
        extra = max(min_free - free, self.capacity // 4)
        new_cap = self.capacity + -(-extra // nb) * nb
        B, H = self.buffer.shape[:2]
        decode = Segment.empty(self.d_layout, B, H, new_cap, self.buffer.device)
        for name, t in self.decode.parts().items():
            getattr(decode, name)[:, :, :t.shape[2]].copy_(t)
        return KVStore(self.config, self.kind, self.prefill, decode, self.buffer, self.lengths.clone())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n_pre, n_dec, n_buf = self.counts()
        dtype = dtype or self.buffer.dtype
        parts = [dequantize(self.prefill, self.p_layout, n_pre, dtype),
                 dequantize(self.decode, self.d_layout, n_dec, dtype),
                 self.buffer[:, :, :n_buf].to(dtype)]
        return torch.cat(parts, dim=2)


@torch.library.custom_op("gear::dequantize", mutates_args=())
def dequantize_parts(parts: list[torch.Tensor], config: str, kind: str, length: int) -> torch.Tensor:
    """The exact dense [B, H, length, D] reconstruction of a flattened store.
    An opaque op, so tracing (Dynamo, AOT) never reads the lengths' values."""
    return KVStore.from_tensors(GearConfig.from_json(config), kind, parts).dequantize()


@dequantize_parts.register_fake
def _dequantize_parts_fake(parts, config, kind, length):
    buffer = parts[1]
    B, H, _, D = buffer.shape
    return buffer.new_empty(B, H, length, D)


class CompressedKV(torch.Tensor):
    """A dense-looking [B, H, L, D] K or V whose storage is a `KVStore`."""

    @staticmethod
    def __new__(cls, store: KVStore, length: int | None = None):
        B, H, _, D = store.buffer.shape
        if length is None:
            length = sum(store.counts())
        return torch.Tensor._make_wrapper_subclass(
            cls, (B, H, length, D), dtype=store.buffer.dtype, device=store.buffer.device)

    def __init__(self, store: KVStore, length: int | None = None):
        self.store = store
        # the traceable-subclass protocol reads inner tensors as attributes
        for name, tensor in zip(store.tensor_names(), store.tensors()):
            setattr(self, name, tensor)

    # traceable-subclass protocol: inner tensors by name, config as metadata
    def __tensor_flatten__(self):
        return self.store.tensor_names(), (self.store.config.to_json(), self.store.kind)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        config_json, kind = meta
        config = GearConfig.from_json(config_json)
        names = list(inner)
        store = KVStore.from_tensors(config, kind, [inner[n] for n in names])
        return CompressedKV(store, outer_size[2])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dense = torch.ops.gear.dequantize(self.store.tensors(), self.store.config.to_json(),
                                          self.store.kind, self.shape[2])
        return dense if dtype is None else dense.to(dtype)

    def __repr__(self):
        return (f"CompressedKV(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.store.config.describe()}, bytes={self.store.nbytes()})")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every op we do not implement sees the exact dense reconstruction.
        args, kwargs = pytree.tree_map_only(CompressedKV, lambda t: t.dequantize(), (args, kwargs or {}))
        return func(*args, **kwargs)


def kv_bytes(obj) -> int:
    """Bytes held by a K/V tensor, a `CompressedKV`, or a whole cache.

    For a compressed tensor: codes, scales, zero points, low-rank factors,
    outlier values and indices, and the streaming buffer, as allocated on the
    device (the reserved decode capacity included). For a dense tensor or cache:
    numel * element size. Caches are walked through their `layers` (keys and
    values); tuples and lists are summed.
    """
    if isinstance(obj, CompressedKV):
        return obj.store.nbytes()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "layers"):
        return sum(kv_bytes(getattr(layer, name)) for layer in obj.layers
                   for name in ("keys", "values") if getattr(layer, name, None) is not None)
    if isinstance(obj, (tuple, list)):
        return sum(kv_bytes(o) for o in obj)
    raise TypeError(f"kv_bytes: expected a tensor, CompressedKV or cache, got {type(obj).__name__}.")


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
