"""The compressed-cache custom ops that the rewrite emits (namespace `gear`).

  gear::kv_prefill(x, config, kind) -> parts      compress a whole K or V block
  gear::kv_append_(parts!, new, config, kind)     push tokens into the buffer,
                                                  compress each block that fills
  gear::attention(q, k_parts, v_parts, mask, scale, is_causal, config) -> out

`parts` is a `KVStore` flattened (`KVStore.tensors()` order); `config` is the
`GearConfig` as JSON, so ops are plain-tensor ops Inductor can schedule
(kv_append_ mutates its inputs in place, as a static cache's index_copy_ does).
Each op has a fake implementation for tracing. The implementations here are
vectorised torch and run on any device; on CUDA, decode attention goes to the
Triton kernel (`kernels.decode_attention`), which the rewrite emits directly.
Neighbours: `compressed_kv` (the store), `passes.rewrite` (emits these ops).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .compressed_kv import KVStore, segment_layouts
from .config import GearConfig


@functools.lru_cache(maxsize=64)
def _config(text: str) -> GearConfig:
    return GearConfig.from_json(text)


@torch.library.custom_op("gear::kv_prefill", mutates_args=())
def kv_prefill(x: torch.Tensor, config: str, kind: str) -> list[torch.Tensor]:
    return KVStore.from_prefill(x.contiguous(), _config(config), kind).tensors()


@kv_prefill.register_fake
def _kv_prefill_fake(x, config, kind):
    cfg = _config(config)
    B, H, P, D = x.shape
    # The prefill block's outlier count depends on its length: specialise on it.
    n_pre = cfg.prefill_tokens(int(P))
    p_layout, d_layout = segment_layouts(cfg, kind, D, x.dtype, n_pre)
    cap = cfg.initial_decode_capacity
    out = [torch.empty(3, dtype=torch.int64, device="cpu"), x.new_empty(B, H, cfg.block_size, D)]
    for layout, tokens in ((p_layout, n_pre), (d_layout, cap)):
        out += [x.new_empty(shape, dtype=dtype) for shape, dtype in layout.shapes(B, H, tokens).values()]
    return out


@torch.library.custom_op("gear::kv_append_", mutates_args=("parts",))
def kv_append_(parts: list[torch.Tensor], new: torch.Tensor, config: str, kind: str) -> None:
    KVStore.from_tensors(_config(config), kind, parts).append(new)


def _causal_bottom_right(T: int, L: int, device) -> torch.Tensor:
    """Bool mask [T, L]: query i (the i-th of the last T positions) sees keys <= L-T+i."""
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(L - T)


@torch.library.custom_op("gear::attention", mutates_args=())
def attention(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
              attn_mask: torch.Tensor | None, scale: float, is_causal: bool, config: str) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over a compressed layer (reference path:
    rebuild K and V exactly as stored, then SDPA)."""
    cfg = _config(config)
    k = KVStore.from_tensors(cfg, "k", k_parts).dequantize(q.dtype)
    v = KVStore.from_tensors(cfg, "v", v_parts).dequantize(q.dtype)
    T, L = q.shape[2], k.shape[2]
    mask = attn_mask
    if mask is not None:
        mask = mask[..., -L:]
    elif is_causal and T > 1:
        mask = _causal_bottom_right(T, L, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@attention.register_fake
def _attention_fake(q, k_parts, v_parts, attn_mask, scale, is_causal, config):
    return torch.empty_like(q)


@torch.library.custom_op("gear::decode_attention_interpreted", mutates_args=())
def decode_attention_interpreted(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                                 attn_mask: torch.Tensor | None, scale: float, config: str) -> torch.Tensor:
    """The Triton decode kernel run eagerly (under TRITON_INTERPRET=1 on a CPU):
    how CPU tests exercise the kernel inside compiled graphs, since a
    triton_op's kernels only trace for a GPU."""
    from .kernels.decode_attention import decode_attention_launch
    return decode_attention_launch(q, k_parts, v_parts, attn_mask, scale, config)


@decode_attention_interpreted.register_fake
def _decode_attention_interpreted_fake(q, k_parts, v_parts, attn_mask, scale, config):
    return torch.empty_like(q)


def decode_attention_op(device: torch.device, config: GearConfig):
    """The op the rewrite emits for single-token decode attention on `device`:
    the Triton kernel on CUDA (kernel auto/triton) as a triton_op Inductor can
    see into; with kernel="triton" on a CPU under TRITON_INTERPRET=1, the same
    kernel interpreted; the torch reference otherwise."""
    if config.kernel != "torch" and device.type == "cuda":
        try:
            from .kernels import decode_attention as kernel  # noqa: F401  (registers the op)
            return torch.ops.gear.decode_attention_triton.default
        except (ImportError, AttributeError):
            if config.kernel == "triton":
                raise
    if config.kernel == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"gear options: kernel='triton' needs a CUDA device (or "
                             f"TRITON_INTERPRET=1 on a CPU), got {device}; use kernel='auto' or 'torch'.")
        return torch.ops.gear.decode_attention_interpreted.default
    return torch.ops.gear.attention.default
