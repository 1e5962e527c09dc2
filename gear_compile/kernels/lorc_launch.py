"""The host side of LoRC's Triton decode attention: what to launch, and the ops.

Job: read a latent store's `StoreLayout` back from the kernel descriptor the
C++ op takes (`store_layout`), say what the kernel refuses (`unsupported`,
which `passes.lorc_fused.fused_reason` reports), plan a launch's constexprs and
ints from static shapes (`launch_plan`: the store kernel's `decode_plan`
once per latent store, since K and V latents may differ in width), launch
the kernel and the store kernel's combine (`lorc_attention_launch`), and
register `gear::lorc_attention_triton` (CUDA, a triton_op Inductor emits)
and `gear::lorc_attention_triton_interpreted` (the same, eagerly, for CPU
tests under TRITON_INTERPRET=1), both with `gear::lorc_attention_cpu`'s
schema. `sm90_build_specs()` lists configurations for
benchmarks/kernel_sass.py and the sm_90a build checks
(tests/test_lorc_triton.py). Nothing here reads a tensor's values: the live
lengths stay on the device. Neighbours: `lorc_decode` (the kernel),
`decode_plan`, `decode_attention` (combine kernel, BuildSpec), `store`.
"""
from __future__ import annotations

import os

import torch
import triton

from ..codec import QuantSpec
from ..segment import SegmentLayout
from ..store import KERNEL_FIELDS, KERNEL_PARTS, SEGMENT_ORDER, StoreLayout
from . import decode_plan
from .decode_attention import COMBINE_CHUNK, BuildSpec, _combine_kernel, _sm_count, _TRITON_TYPE
from .decode_plan import pow2
from .lorc_decode import _lorc_kernel

_LOG2E = 1.4426950408889634
MAX_LATENT_WIDTH = 256      # extended channels of a latent tile (decode_plan's E) the kernel holds
MAX_HEAD_DIM = 256
MAX_ROWS = 64               # query rows (G x T) of one program
# prefill-block tile, warps, pipeline stages (not autotuned yet). sm_90a, d 128, fp16, rank 128: 4 warps
# spilled 24-352 bytes a thread, 8 warps 16-48 (tests/test_lorc_triton.py's SM90_SPILLS)
TILE, WARPS, STAGES = 32, 8, 2
CHANNEL_CHUNK = 32          # head channels of K rebuilt (and of U_v^T applied) per product

_NFIELDS = len(KERNEL_FIELDS)
_WHERE = "gear lorc_attention_triton"


def store_layout(parts: list[torch.Tensor], desc, kind: str) -> StoreLayout:
    """The `StoreLayout` of a latent store from its kernel descriptor (what
    the C++ op reads in place of the codec) and its tensors' shapes; raises
    unless the layout gives that descriptor back."""
    desc = [int(x) for x in desc]
    if len(desc) != 2 + len(SEGMENT_ORDER) * _NFIELDS:
        raise ValueError(f"{_WHERE}: a store descriptor has {2 + len(SEGMENT_ORDER) * _NFIELDS} entries, "
                         f"got {len(desc)}.")
    fields = {name: dict(zip(KERNEL_FIELDS, desc[2 + i * _NFIELDS:2 + (i + 1) * _NFIELDS]))
              for i, name in enumerate(SEGMENT_ORDER)}
    buffer = parts[desc[1]]
    width = buffer.shape[-1]

    def segment(f: dict, block) -> SegmentLayout:
        if f["exact"]:
            spec = QuantSpec(16, "token", None)
        else:
            spec = QuantSpec(f["bits"], "channel" if f["channel_axis"] else "token", f["group"] or None)
        per_side = parts[f["out_val"]].shape[-1] // (width if kind == "k" else 1) // 2 if f["out_val"] >= 0 else 0
        return SegmentLayout(spec=spec, kind=kind, block=block,
                             rank=parts[f["lr_a"]].shape[-1] if f["lr_a"] >= 0 else 0,
                             outliers_per_side=per_side, head_dim=width, dtype=buffer.dtype)

    pre, dec = fields["prefill"], fields["decode"]
    layout = StoreLayout(kind, segment(pre, parts[pre["codes"]].shape[2]), segment(dec, dec["block"]), width,
                         buffer.dtype, parts[fields["sink"]["codes"]].shape[2])
    if list(layout.kernel_descriptor) != desc:
        raise ValueError(f"{_WHERE}: the {kind.upper()} store's descriptor {desc} does not describe its "
                         f"{len(parts)} tensors (read back as {list(layout.kernel_descriptor)}).")
    return layout


def _store_plan(layout: StoreLayout, q_dtype: torch.dtype, rows: int, **tokens) -> decode_plan.Plan:
    """The store kernel's plan for one latent store (K and V latents may
    differ in width, so each has its own), `rows` query rows a program."""
    return decode_plan.plan(layout, layout, q_dtype=q_dtype, heads=rows, kv_heads=1, **tokens)


def unsupported(k_layout: StoreLayout, v_layout: StoreLayout, head_dim: int) -> str | None:
    """Why the kernel cannot take these latent stores (None: it can)."""
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is above the kernel's {MAX_HEAD_DIM}"
    for name, layout in (("K", k_layout), ("V", v_layout)):
        tokens = dict(prefill_tokens=layout.prefill.block, decode_tokens=layout.decode.block,
                      sink_tokens=layout.sink_tokens, buffer_tokens=layout.decode.block, new_tokens=1,
                      mask_kind=0, softcap=0.0, interpret=False)
        width = _store_plan(layout, torch.float16, 16, **tokens).consts["E"]
        if width > MAX_LATENT_WIDTH:
            return (f"{name}'s latent rank {layout.head_dim} takes {width} extended channels a tile, above the "
                    f"Triton kernel's {MAX_LATENT_WIDTH} (its [tile, rank] latents are held in registers)")
    return None


def launch_plan(kl: StoreLayout, vl: StoreLayout, *, q_dtype: torch.dtype, D: int, G: int, T: int, rk: int,
                rv: int, lorc_sinks: int, mask_kind: int, causal: bool, rope: int, interpret: bool,
                **tokens) -> tuple[dict, dict, int, int]:
    """(constexprs, runtime ints, row blocks, static tiles) of one launch;
    `tokens`: the stores' prefill / decode / sink / buffer token slots and
    the call's new tokens, as `decode_plan.plan` takes them."""
    rows = G * T
    mp = min(MAX_ROWS, max(16, pow2(rows)))
    kp = _store_plan(kl, q_dtype, mp, mask_kind=mask_kind, softcap=0.0, interpret=interpret, **tokens)
    vp = _store_plan(vl, q_dtype, mp, mask_kind=mask_kind, softcap=0.0, interpret=interpret, **tokens)
    kc, vc, ks = kp.consts, vp.consts, kp.scalars
    consts = dict(
        G=G, MP=mp, D=D, DP=max(16, pow2(D)), RK=rk, RV=rv,
        KD=kc["D"], KW=kc["W"], KWP=kc["WP"], KPB=kc["PB"], KE=kc["E"],
        VD=vc["D"], VW=vc["W"], VWP=vc["WP"], VPB=vc["PB"], VE=vc["E"],
        BITS=kc["BITS"], STORE_EXACT=kc["STORE_EXACT"], K_CHANNEL=kc["K_CHANNEL"], V_CHANNEL=vc["V_CHANNEL"],
        K_GROUP=kc["K_GROUP"], P_R=kc["P_R"], D_R=kc["D_R"], RP=kc["RP"], D_K_ROW_TILE=kc["D_K_ROW_TILE"],
        P_K_OUT=kc["P_K_OUT"], D_K_OUT=kc["D_K_OUT"], CB=kc["CB"], VK2=vc["VK2"], OUT_UNIT=kc["OUT_UNIT"],
        MAGIC=kc["MAGIC"], FP32_DOT=kc["FP32_DOT"], MASK_KIND=mask_kind, CAUSAL=causal, ROPE=rope,
        SBT=kc["SBT"], LBT=min(64, max(16, pow2(lorc_sinks))), BT=TILE, DBT=kc["DBT"], D_TPB=kc["D_TPB"],
        XBT=kc["XBT"], NBT=kc["NBT"], DC=min(CHANNEL_CHUNK, max(16, pow2(D))), STAGES=STAGES)
    scalars = dict(P_CAP=ks["P_CAP"], D_CAP=ks["D_CAP"], d_block=ks["d_block"], BUF_CAP=ks["BUF_CAP"],
                   N_SINK=ks["N_SINK"], S_LORC=lorc_sinks, T_NEW=ks["T_NEW"], pk_group=ks["pk_group"],
                   pv_group=vp.scalars["pk_group"], dk_group=ks["dk_group"], dv_group=vp.scalars["dk_group"],
                   pk_k2=ks["pk_k2"], dk_k2=ks["dk_k2"])
    return consts, scalars, triton.cdiv(rows, mp), kp.tiles


def _mask(attn_mask: torch.Tensor | None, q: torch.Tensor):
    """(mask, kind 0 none / 1 bool / 2 additive, strides (b, h, t, l), length)."""
    if attn_mask is None:
        return q, 0, (0, 0, 0, 0), 0
    if attn_mask.dtype not in (torch.bool, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{_WHERE}: attn_mask must be bool or float32 / float16 / bfloat16, got {attn_mask.dtype}.")
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    kind = 1 if m.dtype == torch.bool else 2
    if kind == 1:   # Triton reads bytes
        m = m.to(torch.uint8)
    m = m.expand(*q.shape[:3], m.shape[-1])
    return m, kind, tuple(m.stride()), m.shape[-1]


def lorc_attention_launch(q, k_parts, v_parts, k_sinks, v_sinks, k_new, v_new, uk, uv, cos, sin, attn_mask,
                          scale: float, is_causal: bool, k_desc, v_desc, rope: int, rotary_dim: int, wrap=None,
                          num_splits: int | None = None, sm_count: int | None = None) -> torch.Tensor:
    """`gear::lorc_attention_cpu`'s arguments, run by the kernels (eagerly,
    or through `wrap` = torch.library.wrap_triton inside the triton_op):
    q [B, Hq, T, D]; the latent stores' parts in `StoreLayout.names` order
    and their descriptors; LoRC's sinks [B, Hkv, s, D] (K before RoPE, V);
    k_new [B, Hkv, T, D] (rotated) and v_new [B, 1, T, r_v] latents, or
    None; uk / uv [Hkv, r, D] (each KV head's rows of U^T); cos / sin [B or
    1, 1, past, rotary_dim] at the past's positions (rope 1 rotate-half, 2
    interleaved, 0 none); attn_mask None, bool (True = keep) or additive,
    broadcastable to [B, Hq, T, L_mask], its last column the newest key.
    `num_splits`: latent ranges per (row, KV head) (default
    `decode_plan.num_splits`)."""
    if q.dim() != 4:
        raise ValueError(f"{_WHERE}: q must be [B, Hq, T, D], got {tuple(q.shape)}.")
    B, Hq, T, D = q.shape
    kl, vl = store_layout(k_parts, k_desc, "k"), store_layout(v_parts, v_desc, "v")
    if k_sinks.dim() != 4 or k_sinks.shape[0] != B or k_sinks.shape[3] != D or v_sinks.shape != k_sinks.shape:
        raise ValueError(f"{_WHERE}: the sinks must be [B, KV heads, s, D] = [{B}, H, s, {D}], got "
                         f"{tuple(k_sinks.shape)} and {tuple(v_sinks.shape)}.")
    Hkv, s_lorc = k_sinks.shape[1], k_sinks.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{_WHERE}: query heads {Hq} are not a multiple of KV heads {Hkv}.")
    if rope not in (0, 1, 2):
        raise ValueError(f"{_WHERE}: rope must be 0 (none), 1 (rotate-half) or 2 (interleaved), got {rope}.")
    rk, rv = uk.shape[1], uv.shape[1]
    for name, up, r, layout in (("uk", uk, rk, kl), ("uv", uv, rv, vl)):
        if tuple(up.shape) != (Hkv, r, D):
            raise ValueError(f"{_WHERE}: {name} must be [KV heads, rank, head dim] = [{Hkv}, r, {D}], "
                             f"got {tuple(up.shape)}.")
        if layout.head_dim != r:
            raise ValueError(f"{_WHERE}: {name}'s rank {r} must equal its latent store's width {layout.head_dim}.")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_WHERE}: k_new and v_new come together, got one of them.")
    t_new = 0 if k_new is None else k_new.shape[2]
    if k_new is not None and (tuple(k_new.shape) != (B, Hkv, t_new, D) or tuple(v_new.shape) != (B, 1, t_new, rv)):
        raise ValueError(f"{_WHERE}: k_new must be [{B}, {Hkv}, T, {D}] and v_new V's latents [{B}, 1, T, {rv}], "
                         f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}.")
    if (why := unsupported(kl, vl, D)) is not None:
        raise ValueError(f"{_WHERE}: {why}.")
    launch = wrap if wrap is not None else (lambda kernel: kernel)
    q_layout, q = q, q.contiguous()
    cs_b = 0
    if rope:
        if cos is None or sin is None or cos.shape != sin.shape or cos.dim() < 2 or cos.shape[-1] != rotary_dim \
                or not (0 < rotary_dim <= D and rotary_dim % 2 == 0):
            raise ValueError(f"{_WHERE}: RoPE needs cos / sin [B or 1, 1, past, rotary_dim] with an even "
                             f"rotary_dim in (0, {D}], got rotary_dim {rotary_dim} and "
                             f"{None if cos is None else tuple(cos.shape)}.")
        cos = cos.reshape(-1, cos.shape[-2], rotary_dim).to(torch.float32).contiguous()
        sin = sin.reshape(cos.shape).to(torch.float32).contiguous()
        if cos.shape[0] not in (1, B):
            raise ValueError(f"{_WHERE}: cos / sin for {cos.shape[0]} rows, batch {B}.")
        cs_b = 0 if cos.shape[0] == 1 else cos.shape[1] * rotary_dim
    mask, mask_kind, ms, mask_len = _mask(attn_mask, q)
    named_k, named_v = dict(zip(kl.names, k_parts)), dict(zip(vl.names, v_parts))
    consts, scalars, nrb, tiles = launch_plan(
        kl, vl, q_dtype=q.dtype, D=D, G=Hq // Hkv, T=T, rk=rk, rv=rv, lorc_sinks=s_lorc, mask_kind=mask_kind,
        causal=bool(is_causal and T > 1), rope=rope, interpret=os.environ.get("TRITON_INTERPRET") == "1",
        prefill_tokens=named_k["p_codes"].shape[2], decode_tokens=named_k["d_codes"].shape[2],
        sink_tokens=named_k["sink"].shape[2], buffer_tokens=named_k["buffer"].shape[2], new_tokens=t_new)
    splits = num_splits or decode_plan.num_splits(B * Hkv * nrb, tiles, sm_count or _sm_count(q.device))
    po = torch.empty(B * Hq * T, splits + 1, D, dtype=torch.float32, device=q.device)
    plse = torch.empty(B * Hq * T, splits + 1, dtype=torch.float32, device=q.device)

    def held(x):    # an empty tensor's pointer may be null: q stands in (it is never read)
        return x.contiguous() if x is not None and x.numel() else q

    def parts(named, prefix):
        return [held(named.get(prefix + p)) for p in KERNEL_PARTS]

    tensors = [q, named_k["lengths"].to(q.device), mask, po, plse, uk.to(q.dtype).contiguous(),
               uv.to(q.dtype).contiguous(), held(cos if rope else None), held(sin if rope else None),
               held(k_sinks), held(v_sinks), held(k_new), held(v_new), held(named_k["sink"]),
               held(named_v["sink"]), held(named_k["buffer"]), held(named_v["buffer"]),
               *parts(named_k, "p_"), *parts(named_v, "p_"), *parts(named_k, "d_"), *parts(named_v, "d_")]
    launch(_lorc_kernel)[(B * Hkv * nrb, splits + 1)](
        *tensors, scale * _LOG2E, Hkv, splits, (Hq // Hkv) * T, T, nrb, rd=rotary_dim if rope else 0,
        cs_b=cs_b, **scalars, mask_sb=ms[0], mask_sh=ms[1], mask_st=ms[2], mask_sl=ms[3], mask_len=mask_len,
        **consts, num_warps=WARPS, num_stages=STAGES)
    out = torch.empty_like(q)
    # the store kernel's combine (its constexprs positional: D, DP, SC, no sink logits)
    launch(_combine_kernel)[(B * Hq * T,)](po, plse, out, q, splits + 1, Hq, D, pow2(D),
                                           min(COMBINE_CHUNK, max(16, pow2(splits + 1))), False)
    return out if q_layout.is_contiguous() else torch.empty_like(q_layout).copy_(out)


# ---- the ops --------------------------------------------------------------------

@torch.library.triton_op("gear::lorc_attention_triton", mutates_args=())
def lorc_attention_triton(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                          k_sinks: torch.Tensor, v_sinks: torch.Tensor, k_new: torch.Tensor | None,
                          v_new: torch.Tensor | None, uk: torch.Tensor, uv: torch.Tensor,
                          cos: torch.Tensor | None, sin: torch.Tensor | None, attn_mask: torch.Tensor | None,
                          scale: float, is_causal: bool, k_desc: list[int], v_desc: list[int], rope: int,
                          rotary_dim: int) -> torch.Tensor:
    """gear::lorc_attention_triton: `gear::lorc_attention_cpu`'s schema, the
    kernels wrapped so that Inductor sees (and emits) them."""
    return lorc_attention_launch(q, k_parts, v_parts, k_sinks, v_sinks, k_new, v_new, uk, uv, cos, sin, attn_mask,
                                 scale, is_causal, k_desc, v_desc, rope, rotary_dim, wrap=torch.library.wrap_triton)


@torch.library.custom_op("gear::lorc_attention_triton_interpreted", mutates_args=())
def lorc_attention_triton_interpreted(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                                      k_sinks: torch.Tensor, v_sinks: torch.Tensor, k_new: torch.Tensor | None,
                                      v_new: torch.Tensor | None, uk: torch.Tensor, uv: torch.Tensor,
                                      cos: torch.Tensor | None, sin: torch.Tensor | None,
                                      attn_mask: torch.Tensor | None, scale: float, is_causal: bool,
                                      k_desc: list[int], v_desc: list[int], rope: int,
                                      rotary_dim: int) -> torch.Tensor:
    """The same kernels run eagerly (under TRITON_INTERPRET=1 on a CPU): how
    the CPU tests run them inside compiled graphs (`ops.attention_triton_interpreted`'s
    counterpart)."""
    return lorc_attention_launch(q, k_parts, v_parts, k_sinks, v_sinks, k_new, v_new, uk, uv, cos, sin, attn_mask,
                                 scale, is_causal, k_desc, v_desc, rope, rotary_dim)


@lorc_attention_triton_interpreted.register_fake
def _lorc_attention_triton_interpreted_fake(q, *args):
    return torch.empty_like(q)


# ---- what the launcher can produce, for the no-GPU sm_90a build checks ----------

BUILD_METHODS = (("none", 16), ("gear", 4))


def sm90_build_specs(head_dims=(128,), ranks=(128, 256), gqa: int = 4, context: int = 32768,
                     q_dtypes=(torch.float16,)) -> list[BuildSpec]:
    """`_lorc_kernel` as the launcher builds it for a decode step (one new
    token, `gqa` query heads per KV head, 8 KV heads, a bool mask, 4 sinks
    of each kind, rotate-half over the whole head) over K and V latents of
    each rank, stored by each BUILD_METHODS codec, a `context`-token prefill
    block (`decode_attention.BuildSpec`; the combine kernel is the store
    kernel's, built by its own specs)."""
    from ..config import GearConfig
    specs = []
    for D in head_dims:
        for r in ranks:
            for method, bits in BUILD_METHODS:
                cfg = GearConfig(method=method, bits=bits if method != "none" else 4)
                for qdt in q_dtypes:
                    kl, vl = (StoreLayout.build(cfg, kind, r, qdt, context, 4) for kind in "kv")
                    consts, _, _, _ = launch_plan(
                        kl, vl, q_dtype=qdt, D=D, G=gqa, T=1, rk=r, rv=r, lorc_sinks=4, mask_kind=1, causal=False,
                        rope=1, interpret=False, prefill_tokens=context, decode_tokens=4 * kl.decode.block,
                        sink_tokens=4, buffer_tokens=kl.decode.block, new_tokens=1)
                    q = "*" + _TRITON_TYPE[qdt]
                    held = "*" + _TRITON_TYPE[kl.dtype]
                    sig = dict(Q=q, Lens="*i64", Mask="*u8", PO="*fp32", PLSE="*fp32", Uk=q, Uv=q, Cos="*fp32",
                               Sin="*fp32", LSk=q, LSv=q, Nk=q, Nv=q, SKc=held, SVc=held, BKc=held, BVc=held,
                               qk_scale="fp32")
                    for prefix, layout in (("PK", kl.prefill), ("PV", vl.prefill), ("DK", kl.decode),
                                           ("DV", vl.decode)):
                        dtypes = {p.name: p.dtype for p in layout.parts}
                        for arg, part in zip(("c", "s", "z", "a", "b", "ls", "ov", "oi", "op"), KERNEL_PARTS):
                            sig[prefix + arg] = "*" + _TRITON_TYPE[dtypes[part]] if part in dtypes else q
                    signature = {n: "constexpr" if n in consts else sig.get(n, "i32") for n in _lorc_kernel.arg_names}
                    specs.append(BuildSpec(f"lorc-{method}{bits}-r{r}-d{D}-{_TRITON_TYPE[qdt]}", _lorc_kernel,
                                           signature, consts, WARPS, STAGES, representative=True))
    return specs
