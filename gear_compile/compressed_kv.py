"""The compressed K or V of one cache layer, as a tensor a Hugging Face cache can hold.

`CompressedKV` is a traceable wrapper tensor subclass (the torchao pattern):
its logical shape and dtype are the dense K/V's [B, H, L, D]; its storage is
a `store.KVStore` (prefill block, decode blocks, exact buffer, lengths),
flattened into the store's inner tensors for Dynamo. Inner shapes only
change when the decode capacity grows, so compiled graphs see static shapes
(as with a static cache) and do not recompile per step.
Any op this class does not implement dequantizes and runs exactly
(`__torch_dispatch__`), so no reader ever sees raw codes.
Neighbours: `store` (the layout and the streaming logic), `ops` (custom ops
on the inner tensors), `runtime` (wraps stores after every call).
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .config import GearConfig
from .store import KVStore


@torch.library.custom_op("gear::dequantize", mutates_args=())
def dequantize_parts(parts: list[torch.Tensor], config: str, kind: str, length: int) -> torch.Tensor:
    """The exact dense [B, H, length, D] reconstruction of a flattened store.
    An opaque op, so tracing (Dynamo, AOT) never reads the lengths' values."""
    return KVStore(GearConfig.from_json(config), kind, parts).dequantize()


@dequantize_parts.register_fake
def _dequantize_parts_fake(parts, config, kind, length):
    B, H, _, D = parts[1].shape       # the buffer
    return parts[1].new_empty(B, H, length, D)


class CompressedKV(torch.Tensor):
    """A dense-looking [B, H, L, D] K or V whose storage is a `KVStore`."""

    @staticmethod
    def __new__(cls, store: KVStore, length: int | None = None):
        B, H, _, D = store.buffer.shape
        if length is None:
            length = len(store)
        return torch.Tensor._make_wrapper_subclass(
            cls, (B, H, length, D), dtype=store.buffer.dtype, device=store.buffer.device)

    def __init__(self, store: KVStore, length: int | None = None):
        self.store = store
        # the traceable-subclass protocol reads inner tensors as attributes
        for name, tensor in zip(store.tensor_names(), store.tensors()):
            setattr(self, name, tensor)

    # traceable-subclass protocol: inner tensors by name, config as metadata
    def __tensor_flatten__(self):
        return list(self.store.tensor_names()), (self.store.config.to_json(), self.store.kind)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        config_json, kind = meta
        store = KVStore(GearConfig.from_json(config_json), kind, list(inner.values()))
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
    outlier values and indices, the streaming buffer and the lengths, as allocated on the
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
