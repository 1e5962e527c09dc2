"""The compressed-cache custom ops that the rewrite emits (namespace `gear`).

  gear::kv_prefill(x, config, kind, streamed) -> parts   compress a prompt's K or V
  gear::decompress(parts, config, kind, length, dtype) -> x   a store read back
                                                    densely (LoRC's rebuild, a
                                                    rebuild site, a CompressedKV
                                                    used as a plain tensor)
  gear::attention_<impl>(q, k_parts, v_parts, k_new, v_new, mask, scale,
                         is_causal, ..., softcap, sink_logits) -> out   attention
                                                    over a store plus the call's new tokens

`parts` is a store flattened in `StoreLayout.names` order; `config` is the
`CodecConfig` as JSON. Attention sees the store as it was before the call
and the call's new K/V (`k_new`, `v_new`, exact) as the newest keys; the
mask's last column is the newest key, and keys before its first column are
hidden (a sliding-window layer's older blocks); softcap > 0 caps the scaled
scores at softcap * tanh(s / softcap) before the mask (Gemma 2); sink_logits
[Hq] (or None) adds one logit per query head to the softmax's denominator,
a key whose value is zero (gpt-oss, Granite SWA); the
decode graph then writes the new token into the buffer (aten ops the rewrite
emits, not a custom op: Inductor sees the write).
Implementations of attention, one schema:

  attention_cpu        C++ over the packed codes (`kernels/cpu_attention.cpp`)
  attention_triton     Triton flash-decoding, CUDA (`kernels/decode_attention`)
  attention_triton_interpreted   the same kernel under TRITON_INTERPRET=1 (CPU tests)
  attention_reference  decompress, then SDPA: the tests' reference, and the
                       fallback where no kernel applies

`attention_for` picks one for a device and the `kernel` option.
Neighbours: `store` (the layout), `passes.rewrite` (emits these ops),
`kernels` (the implementations).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import rotation
from .codec import resolve
from .config import CodecConfig, GearConfig, codec_of
from .store import KVStore, StoreLayout


# ---------------------------------------------------------------- prefill
@torch.library.custom_op("gear::kv_prefill", mutates_args=())
def kv_prefill(x: torch.Tensor, config: str, kind: str, streamed: bool = False) -> list[torch.Tensor]:
    return list(KVStore.from_prefill(x.contiguous(), CodecConfig.from_json(config), kind, streamed=streamed).tensors())


@kv_prefill.register_fake
def _kv_prefill_fake(x, config, kind, streamed=False):
    B, H, P, D = x.shape
    codec = resolve(CodecConfig.from_json(config), D)
    # The prefill block's outlier count depends on its length: specialise on it.
    split = codec.split(int(P), streamed)
    layout = StoreLayout.build(codec, kind, D, x.dtype, split.prefill, split.sinks)
    shapes = layout.shapes(B, H, codec.decode_capacity_for(split.decode))
    return [x.new_empty(shape, dtype=dtype) for shape, dtype in shapes]


@torch.library.custom_op("gear::decompress", mutates_args=())
def decompress_parts(parts: list[torch.Tensor], config: str, kind: str, length: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The exact dense [B, H, length, D] reconstruction, in `dtype`, of a
    flattened store's newest `length` tokens, unrotated where the store is
    rotated (`rotation`). An opaque op, so tracing (Dynamo, AOT) never reads
    the lengths' values."""
    cfg = CodecConfig.from_json(config)
    dense = KVStore(cfg, kind, parts).decompress(dtype)
    dense = dense[:, :, dense.shape[2] - length:]
    return rotation.unrotate(dense) if cfg.rotates(kind) else dense


@decompress_parts.register_fake
def _decompress_parts_fake(parts, config, kind, length, dtype):
    B, H, _, D = parts[1].shape       # the buffer
    return parts[1].new_empty(B, H, length, D, dtype=dtype)


# ---------------------------------------------------------------- attention
def _causal_bottom_right(T: int, L: int, device) -> torch.Tensor:
    """Bool mask [T, L]: query i (the i-th of the last T positions) sees keys <= L-T+i."""
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(L - T)


@torch.library.custom_op("gear::attention_reference", mutates_args=())
def attention_reference(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                        k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                        attn_mask: torch.Tensor | None, scale: float, is_causal: bool,
                        config: str, softcap: float = 0.0,
                        sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over a store and the new tokens: rebuild K
    and V exactly as stored, then SDPA (or, soft-capped or with sink logits,
    its steps written out)."""
    cfg = CodecConfig.from_json(config)
    k = KVStore(cfg, "k", k_parts).decompress(q.dtype)
    v = KVStore(cfg, "v", v_parts).decompress(q.dtype)
    if k_new is not None:
        k, v = torch.cat([k, k_new.to(q.dtype)], 2), torch.cat([v, v_new.to(q.dtype)], 2)
    T, L = q.shape[2], k.shape[2]
    mask = attn_mask
    if mask is not None:          # aligned to the newest key; keys before a short mask are hidden
        mask = mask[..., -L:]
        if mask.shape[-1] < L:
            hidden = False if mask.dtype == torch.bool else float("-inf")
            mask = F.pad(mask, (L - mask.shape[-1], 0), value=hidden)
    elif is_causal and T > 1:
        mask = _causal_bottom_right(T, L, q.device)
    if softcap > 0 or sink_logits is not None:
        out = _explicit_attention(q, k, v, mask, scale, softcap, sink_logits)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    return _output(q, v.shape[-1]).copy_(out)


def _output(q: torch.Tensor, value_dim: int) -> torch.Tensor:
    """The attention's output buffer: laid out like q where V's head dim is
    q's, else contiguous with V's (MiMo); the fake makes the same."""
    return torch.empty_like(q) if value_dim == q.shape[-1] else q.new_empty((*q.shape[:-1], value_dim))


def _explicit_attention(q, k, v, mask, scale: float, softcap: float, sink_logits) -> torch.Tensor:
    """Attention step by step in fp32: scores, soft-capped (softcap > 0),
    masked, softmax with each head's sink logit as one more column (then dropped)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sink_logits is not None:
        column = sink_logits.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, column], -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return (probs @ v.float()).to(q.dtype)


@attention_reference.register_fake
def _attention_reference_fake(q, k_parts, v_parts, k_new, v_new, attn_mask, scale, is_causal, config,
                              softcap=0.0, sink_logits=None):
    return _output(q, q.shape[-1] if v_new is None else v_new.shape[-1])


@torch.library.custom_op("gear::attention_triton_interpreted", mutates_args=())
def attention_triton_interpreted(q: torch.Tensor, k_parts: list[torch.Tensor],
                                 v_parts: list[torch.Tensor], k_new: torch.Tensor | None,
                                 v_new: torch.Tensor | None, attn_mask: torch.Tensor | None,
                                 scale: float, is_causal: bool, config: str,
                                 softcap: float = 0.0, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton decode kernel run eagerly (under TRITON_INTERPRET=1 on a CPU):
    how CPU tests exercise the kernel inside compiled graphs, since a
    triton_op's kernels only trace for a GPU."""
    from .kernels.decode_attention import decode_attention_launch
    return decode_attention_launch(q, k_parts, v_parts, k_new, v_new, attn_mask, scale, config,
                                   softcap=softcap, sink_logits=sink_logits)


@attention_triton_interpreted.register_fake
def _attention_triton_interpreted_fake(q, k_parts, v_parts, k_new, v_new, attn_mask, scale,
                                       is_causal, config, softcap=0.0, sink_logits=None):
    return torch.empty_like(q)


@dataclass(frozen=True)
class AttentionOp:
    """An attention implementation and how the rewrite calls it."""

    op: object
    descriptors: bool = False     # takes the stores' kernel descriptors, not the config

    def args(self, q, k_parts, v_parts, k_new, v_new, mask, scale, is_causal,
             config: CodecConfig, k_layout: StoreLayout, v_layout: StoreLayout,
             softcap: float | None = None, sink_logits=None) -> tuple:
        common = (q, k_parts, v_parts, k_new, v_new, mask, float(scale), bool(is_causal))
        if self.descriptors:
            common += (list(k_layout.kernel_descriptor), list(v_layout.kernel_descriptor))
        else:
            common += (codec_of(config).to_json(),)
        return common + (float(softcap or 0.0), sink_logits)


def attention_for(device: torch.device, config: GearConfig, tokens: int,
                  one_head_dim: bool = True) -> AttentionOp:
    """The attention the rewrite emits for `tokens` query tokens on `device`.

    kernel="auto": Triton on CUDA for single-token decode, the C++ kernel on
    CPU (any number of tokens), the reference elsewhere. "triton" insists on
    the Triton kernel (on a CPU under TRITON_INTERPRET=1: interpreted), "cpu"
    on the C++ kernel, "torch" takes the reference. K and V of two head dims
    (`one_head_dim` False) take the reference whatever the option: the fused
    kernels read both with one.
    """
    kernel = config.kernel
    if kernel == "torch" or not one_head_dim:
        return AttentionOp(torch.ops.gear.attention_reference.default)
    if kernel in ("auto", "triton") and device.type == "cuda" and tokens == 1:
        try:
            from .kernels import decode_attention  # noqa: F401  (registers the op)
            return AttentionOp(torch.ops.gear.attention_triton.default)
        except (ImportError, AttributeError):
            if kernel == "triton":
                raise
    if kernel == "triton":
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") != "1" or tokens != 1:
            raise ValueError(f"gear options: kernel='triton' handles single-token decode on a CUDA "
                             f"device (or on a CPU under TRITON_INTERPRET=1), got {tokens} token(s) "
                             f"on {device}; use kernel='auto'.")
        return AttentionOp(torch.ops.gear.attention_triton_interpreted.default)
    if device.type == "cpu":
        from .kernels import cpu
        if kernel == "cpu":
            cpu.load()
            return AttentionOp(torch.ops.gear.attention_cpu.default, descriptors=True)
        if cpu.available():
            return AttentionOp(torch.ops.gear.attention_cpu.default, descriptors=True)
    elif kernel == "cpu":
        raise ValueError(f"gear options: kernel='cpu' needs CPU tensors, got {device}; "
                         f"use kernel='auto'.")
    return AttentionOp(torch.ops.gear.attention_reference.default)
