"""The attention kernels against the reference: the C++ CPU kernel
(`kernels/cpu_attention.cpp`) and the Triton decode kernel (run by the Triton
interpreter on CPU, or compiled for the GPU where one is visible and
TRITON_INTERPRET=0), each compared with dequantizing the SAME store, then
SDPA over it and the call's new tokens.

Tolerances: the Triton kernel rounds the dequantized K/V tile and the softmax
weights p to the query dtype before each tl.dot (fp32 accumulation), as flash
attention does, and adds the low-rank terms at score level ((q.B).A) rather
than to K; the C++ kernel computes in fp32 throughout and rounds once, at the
output. The reference rounds the rebuilt K/V once to the store dtype and runs
SDPA in fp32. Observed max errors on O(1) outputs: fp32 ~5e-7, fp16 ~1e-3
(fp16 ulp at 1 is 1e-3; bound 1e-2), bf16 ~7e-3 (8-bit mantissa; bound 4e-2).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from gear_compile import outliers
from gear_compile.config import GearConfig
from gear_compile.kernels.decode_attention import decode_attention_launch
from gear_compile.store import KVStore

from streams import streamed

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# where the Triton kernel runs: interpreted on the CPU (conftest's default), or on the GPU
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
IMPLS = ["cpu"] + (["triton"] if TRITON_DEVICE == "cpu" or torch.cuda.is_available() else [])


def on_triton_device(t):
    """t where the Triton kernel runs (None stays None)."""
    return None if t is None else t.to(TRITON_DEVICE)


def _uneven():
    """Chunk sizes 1, 3, 5, 7, 2, 4, 6, 8, 3, 5, ...: flushes happen mid-chunk."""
    step = 1
    while True:
        yield step
        step = step % 7 + 2


def _stores(cfg, B, Hkv, D, prefill, new, dtype, gen):
    """K and V stores from a `prefill`-token prompt then `new` appended tokens,
    in uneven chunks, without growing first (a flush that finds the capacity
    full grows it)."""
    k, v = (torch.randn(B, Hkv, prefill + new, D, generator=gen).to(dtype) for _ in range(2))
    return (streamed(k, cfg, "k", prefill, chunk=_uneven(), grow=False),
            streamed(v, cfg, "v", prefill, chunk=_uneven(), grow=False))


def attend(impl, q, ks, vs, k_new, v_new, mask, scale, causal=False, num_splits=None, softcap=0.0,
           sink_logits=None):
    """One implementation's attention of q over the stores plus the new tokens."""
    if impl == "triton":
        on = on_triton_device
        out = decode_attention_launch(on(q), [on(t) for t in ks.tensors()], [on(t) for t in vs.tensors()],
                                      on(k_new), on(v_new), on(mask), scale, ks.config.to_json(),
                                      num_splits=num_splits, softcap=softcap,
                                      sink_logits=on(sink_logits))
        return out.cpu()
    from gear_compile.kernels import cpu
    cpu.load()
    return torch.ops.gear.attention_cpu(q, ks.tensors(), vs.tensors(), k_new, v_new, mask, scale,
                                        causal, list(ks.layout.kernel_descriptor),
                                        list(vs.layout.kernel_descriptor), softcap, sink_logits)


def reference(q, ks, vs, k_new, v_new, mask, scale, causal=False, softcap=0.0, sink_logits=None):
    K, V = ks.decompress(torch.float32), vs.decompress(torch.float32)   # the kernels compute in fp32
    if k_new is not None:
        K, V = torch.cat([K, k_new.float()], 2), torch.cat([V, v_new.float()], 2)
    T, L = q.shape[2], K.shape[2]
    if mask is not None:
        mask = mask[..., -L:]
        mask = mask.float() if mask.dtype != torch.bool else mask
        # a short mask (a sliding window's) hides the keys before its first column
        mask = F.pad(mask, (L - mask.shape[-1], 0), value=False if mask.dtype == torch.bool else -float("inf"))
    elif causal:
        mask = torch.ones(T, L, dtype=torch.bool).tril(L - T)
    if softcap or sink_logits is not None:    # Gemma 2's soft-capped scores, gpt-oss's sink logits: written out
        G = q.shape[1] // K.shape[1]
        K, V = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
        scores = q.float() @ K.transpose(-1, -2) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask
        if sink_logits is None:
            return scores.softmax(-1) @ V
        column = sink_logits.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        return torch.cat([scores, column], -1).softmax(-1)[..., :-1] @ V
    return F.scaled_dot_product_attention(q.float(), K, V, attn_mask=mask, scale=scale, enable_gqa=True)


def _check(impl, method, bits, D, Hq, Hkv, prefill, new, dtype=torch.float16, B=2,
           mask=None, num_splits=None, mask_extra=0, T=1, causal=False, softcap=0.0,
           sink_logits=False, mask_heads=False, **cfg_kw):
    gen = torch.Generator().manual_seed(hash((method, bits, D, Hq, prefill, new)) % 2**31)
    cfg = GearConfig(method=method, bits=bits, group_size=cfg_kw.pop("group_size", 16),
                     decode_capacity=cfg_kw.pop("decode_capacity", 64), **cfg_kw)
    ks, vs = _stores(cfg, B, Hkv, D, prefill, new, dtype, gen)
    k_new, v_new = (torch.randn(B, Hkv, T, D, generator=gen).to(dtype) for _ in range(2))
    L = len(ks) + T
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
    scale = D ** -0.5 * (8 if softcap else 1)         # scores large enough for the cap to bite
    attn_mask = None
    if mask is not None:
        pad = torch.tensor([0, min(3, L - 1)] + [1] * (B - 2))[:B]
        keep = torch.arange(L)[None, :] >= pad[:, None]             # left padding
        keep = keep[:, None, None, :] & torch.ones(T, L, dtype=torch.bool).tril(L - T)
        # a mask longer than the keys (e.g. a static cache's): its last L columns
        # count; a shorter one (a sliding window's): the keys before it are hidden
        attn_mask = torch.cat([torch.zeros(B, 1, T, max(mask_extra, 0), dtype=torch.bool),
                               keep[..., max(-mask_extra, 0):]], -1)
        if mask_heads:   # a row per query head: head h also hides key column 5 h (never the newest)
            attn_mask = attn_mask.expand(B, Hq, T, -1).clone()
            for h in range(Hq):
                if 5 * h < attn_mask.shape[-1] - 1:
                    attn_mask[:, h, :, 5 * h] = False
        if mask == "additive":
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
    # sink logits: one per query head, from far below the scores to far above
    sink_logits = torch.linspace(-4, 4, Hq).to(dtype) if sink_logits else None
    out = attend(impl, q, ks, vs, k_new, v_new, attn_mask, scale, causal, num_splits, softcap, sink_logits)
    ref = reference(q, ks, vs, k_new, v_new, attn_mask, scale, causal, softcap, sink_logits)
    if softcap or sink_logits is not None:    # the cap or the sink logits change the result: not ignored
        assert (ref - reference(q, ks, vs, k_new, v_new, attn_mask, scale, causal)).abs().max() > 0.05
    assert out.shape == q.shape and out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[dtype], f"{impl}: max abs error {err:.3g} (L={L}, counts={ks.counts()})"


# (method, bits, D, Hq, Hkv, prefill, new): each row covers several axes at once
FAST = [
    ("gear", 4, 64, 4, 1, 37, 5),          # MQA-ish ratio 4, odd prompt, buffer only
    ("gear", 2, 128, 8, 1, 33, 45),        # kivi backbone at 2 bits, 2 decode blocks
    ("gear_l", 4, 64, 3, 1, 50, 40),       # GQA 3, kcvt n_b=20: 2 full blocks, empty buffer
    ("kcvt", 8, 128, 2, 2, 21, 19),        # ratio 1, full buffer minus one
    ("kivi", 2, 64, 8, 1, 40, 30),         # prefill split: 32 tokens + buffer
    ("per_token", 4, 64, 4, 2, 16, 16),    # prefill only + one block, empty buffer
    ("none", 4, 64, 4, 1, 9, 25),          # exact storage
    ("gear", 4, 64, 4, 4, 1, 0),           # a single token
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", FAST, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(impl, case):
    _check(impl, *case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method, prefill, mask", [("gear", 37, "bool"), ("kivi", 40, None),
                                                    ("kcvt", 3, "additive")])
def test_exact_sink_tokens_shadow_the_prefill_block(impl, method, prefill, mask):
    """sink_tokens: the stores' exact first tokens are a segment of their own
    that the kernels read in place of the prefill block's first tokens (a
    3-token prompt: all of them), under masks."""
    _check(impl, method, 2 if method == "kivi" else 4, 64, 4, 2, prefill, 30, B=3, mask=mask,
           sink_tokens=4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(impl, dtype):
    _check(impl, "gear", 4, 64, 4, 1, 30, 23, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_left_padding_mask(impl, mask):
    _check(impl, "gear", 4, 64, 4, 2, 26, 21, B=3, mask=mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["bool", "additive"])
@pytest.mark.parametrize("method, bits", [("gear", 4), ("kivi", 2)])
def test_a_mask_row_per_query_head(impl, mask, method, bits):
    # the Triton kernel loads a [GP, BT] tile of such a mask, a [BT] vector of one shared by the heads
    _check(impl, method, bits, 64, 4, 2, 26, 21, B=3, mask=mask, mask_heads=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_odd_head_dim_long_mask_fp32_mqa(impl):
    # D = 96: packed width 24 padded to 32 per field; a mask 5 columns too long
    _check(impl, "gear", 2, 96, 8, 1, 27, 30, dtype=torch.float32, mask="bool", mask_extra=5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_a_short_mask_hides_the_oldest_keys(impl, mask):
    # a sliding-window layer's store holding 23 tokens older than its mask:
    # the whole prefill block, two decode blocks and part of a third
    _check(impl, "gear", 4, 64, 4, 2, 12, 60, B=3, mask=mask, mask_extra=-23)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_soft_capped_scores(impl, dtype):
    _check(impl, "gear", 4, 64, 4, 2, 30, 23, B=2, mask="additive", dtype=dtype, softcap=2.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sink_logits(impl, dtype):
    _check(impl, "gear", 4, 64, 4, 2, 30, 23, B=2, mask="bool", dtype=dtype, sink_logits=True)
    _check(impl, "kivi", 2, 64, 8, 1, 40, 30, B=1, dtype=dtype, sink_logits=True, num_splits=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_splits_and_long_prefill(impl):
    # several programs per segment (split-K) plus a prefill block of many tiles
    # with its own (larger) outlier count
    _check(impl, "gear", 4, 64, 2, 1, 300, 50, num_splits=5, B=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_prefill_splits_start_mid_block(impl):
    # 2k = 20 K outliers per channel in a 1000-token prefill block, 4 programs
    # (Triton) / 3 splits (C++, 2 threads): those starting mid-block
    # binary-search each channel's sorted table
    with _threads(2):
        _check(impl, "gear", 4, 64, 4, 1, 1000, 3, num_splits=4, B=1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_cpu_kernel_attends_several_new_tokens(causal, mask):
    """Several query tokens at once (chunked prefill, speculative decoding):
    causal among the new tokens, by flag or by the model's mask."""
    _check("cpu", "gear", 4, 64, 6, 2, 45, 27, T=5, causal=causal, mask=mask, B=3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_kernel_does_not_depend_on_the_thread_count(threads):
    """Splits follow the thread count; their merge must not change the result."""
    with _threads(threads):
        _check("cpu", "gear", 2, 64, 9, 3, 700, 45, dtype=torch.float32, B=1)


class _threads:
    def __init__(self, n):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [2, 4])
def test_k_outliers_clustered_in_one_tile(impl, bits):
    """Twenty spiked tokens hold every channel's 2k = 20 prefill outliers: two
    16-token record tiles hold all 1,280 of the block's records (far past any
    kernel's fixed window: its overflow path) while their neighbours have
    none; a program starts inside them."""
    gen = torch.Generator().manual_seed(bits)
    cfg = GearConfig(method="gear", bits=bits, group_size=16, decode_capacity=64)
    x = torch.randn(1, 2, 1000, 64, generator=gen)
    x[:, :, 200:210] += 12                             # (fp16 rounds larger values coarser than TOL)
    x[:, :, 210:220] -= 12
    ks = KVStore.from_prefill(x.half(), cfg, "k")
    vs = KVStore.from_prefill(torch.randn(1, 2, 1000, 64, generator=gen).half(), cfg, "v")
    idx, _ = outliers.record_positions(ks.prefill.out_idx, ks.prefill.out_ptr, 64)
    assert ((idx >= 200) & (idx < 220)).all()          # every outlier sits in the spike
    q = torch.randn(1, 6, 1, 64, generator=gen).half()
    for splits in (1, 5, 31):                          # 31: a program starts at token 192
        with _threads(1 + splits % 3):                 # C++: 1-3 splits
            out = attend(impl, q, ks, vs, None, None, None, 0.125, num_splits=splits)
        ref = reference(q, ks, vs, None, None, None, 0.125)
        assert (out.float() - ref).abs().max().item() < TOL[torch.float16], splits


@pytest.mark.parametrize("impl", IMPLS)
def test_k_outliers_of_a_long_block_keep_their_256_token_base(impl):
    """A 1000-token prefill block's K records keep each token's offset mod
    256, the rest coming from the record tile's pointer. Spikes straddling
    the 256-token boundaries at 256 and 512 hold every channel's 2k = 20
    outliers; they must add at their own tokens whichever tile a program
    starts in, in every (batch, KV head), one of which has its spikes elsewhere."""
    gen = torch.Generator().manual_seed(5)
    cfg = GearConfig(method="gear", bits=4, backbone="kivi", group_size=16, decode_capacity=64)
    x = torch.randn(2, 2, 1000, 64, generator=gen)
    x[:, :, 250:260] += 12
    x[:, :, 508:518] -= 12
    x[1, 1, 508:518] += 12                             # one (batch, head) whose spikes differ
    x[1, 1, 700:710] -= 12
    ks = KVStore.from_prefill(x.half(), cfg, "k")
    vs = KVStore.from_prefill(torch.randn(2, 2, 1000, 64, generator=gen).half(), cfg, "v")
    ptr = ks.prefill.out_ptr[:, :, 0].long()           # [B, H, tiles + 1]
    assert ks.prefill.out_idx.dtype == torch.int16 and ptr.shape[-1] == -(-ks.p_layout.block // 16) + 1
    idx, _ = outliers.record_positions(ks.prefill.out_idx, ks.prefill.out_ptr, 64)
    assert (((idx[0] >= 250) & (idx[0] < 260)) | ((idx[0] >= 508) & (idx[0] < 518))).all()
    assert ptr[0, :, 16].eq(6 * 64).all() and ptr[0, :, 32].eq(14 * 64).all()   # tokens < 256, < 512
    assert ptr[1, 1, 16].eq(6 * 64).all() and ptr[1, 1, 32].eq(10 * 64).all() and ptr[1, 1, 48].eq(20 * 64).all()
    q = torch.randn(2, 6, 1, 64, generator=gen).half()
    ref = reference(q, ks, vs, None, None, None, 0.125)
    for splits in (1, 4, 9, 31):                       # programs start in spans 0-3, mid-span
        with _threads(1 + splits % 3):
            out = attend(impl, q, ks, vs, None, None, None, 0.125, num_splits=splits)
        assert (out.float() - ref).abs().max().item() < TOL[torch.float16], splits


@pytest.mark.skipif("triton" not in IMPLS, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("margin", [0.01, 1.5])
def test_triton_k_record_windows_overflow_without_dropping_a_record(monkeypatch, margin):
    """The Triton kernel reads a tile's K outlier records in a fixed window
    (`decode_plan.record_window`: margin x the mean per tile); a tile holding
    more is skipped by the pipelined loop and read by the overflow path.
    Margin 0.01 shrinks the window to one record per token, under the mean
    (1.28 at D = 64), so the tiles overflow; the default, 1.5, leaves them in
    the window (test_k_outliers_clustered_in_one_tile mixes the two). Either
    way every record counts."""
    from gear_compile.kernels import decode_plan
    monkeypatch.setattr(decode_plan, "RECORD_MARGIN", margin)
    gen = torch.Generator().manual_seed(7)
    cfg = GearConfig(method="gear", bits=4, group_size=16, decode_capacity=64)
    ks, vs = _stores(cfg, 1, 2, 64, 600, 45, torch.float16, gen)
    tile = decode_plan.DEFAULT_TILE_CONFIG.tile
    window = decode_plan.record_window(ks.p_layout, 1) * tile
    ptr = ks.prefill.out_ptr[:, :, 0].long()                       # [B, H, record tiles + 1]
    per = tile // outliers.TILE
    ends = torch.clamp(torch.arange(per, ptr.shape[-1] - 1 + per, per), max=ptr.shape[-1] - 1)
    counts = ptr[..., ends] - ptr[..., ends - per]                 # records per kernel tile
    over = (counts > window).float().mean().item()
    assert over > 0.5 if margin < 1 else over == 0, (window, counts)
    q = torch.randn(1, 4, 1, 64, generator=gen).half()
    ref = reference(q, ks, vs, None, None, None, 0.125)
    for splits in (1, 3):                                          # 3: programs start mid-block
        out = attend("triton", q, ks, vs, None, None, None, 0.125, num_splits=splits)
        assert (out.float() - ref).abs().max().item() < TOL[torch.float16], splits


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_vectors_count_each_outlier_once(impl):
    """A K channel and some V tokens constant (nonzero): every entry ties, and
    the outlier tables must still hold distinct entries the kernel adds once."""
    gen = torch.Generator().manual_seed(3)
    cfg = GearConfig(method="gear", bits=2, group_size=16, decode_capacity=64)
    k, v = torch.randn(2, 1, 2, 70, 64, generator=gen)
    k[:, :, :, 5] = 1.5
    v[:, :, 10:30] = -0.75
    ks, vs = KVStore.from_prefill(k.half(), cfg, "k"), KVStore.from_prefill(v.half(), cfg, "v")
    q = torch.randn(1, 4, 1, 64, generator=gen).half()
    out = attend(impl, q, ks, vs, None, None, None, 0.125)
    ref = reference(q, ks, vs, None, None, None, 0.125)
    assert (out.float() - ref).abs().max().item() < TOL[torch.float16]


@pytest.mark.skipif(torch.__version__ < "2.13" and os.environ.get("TRITON_INTERPRET") == "1",
                    reason="torch < 2.13: wrap_triton refuses the interpreter's kernels")
@pytest.mark.skipif("triton" not in IMPLS, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
def test_registered_triton_op_runs_eagerly():
    gen = torch.Generator().manual_seed(0)
    cfg = GearConfig(method="gear", bits=4)
    ks, vs = _stores(cfg, 1, 2, 64, 40, 3, torch.float16, gen)
    q = torch.randn(1, 4, 1, 64, generator=gen).half()
    kn, vn = (torch.randn(1, 2, 1, 64, generator=gen).half() for _ in range(2))
    on = on_triton_device   # the op runs where its inputs are: the GPU, or the CPU under the interpreter
    out = torch.ops.gear.attention_triton(on(q), [on(t) for t in ks.tensors()], [on(t) for t in vs.tensors()],
                                          on(kn), on(vn), None, 0.125, False, cfg.to_json()).cpu()
    ref = reference(q, ks, vs, kn, vn, None, 0.125)
    assert (out.float() - ref).abs().max().item() < TOL[torch.float16]


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_segment_beyond_capacity_is_ignored(impl):
    # capacity 100 tokens (5 blocks) with 2 used: idle programs add nothing
    _check(impl, "kcvt", 4, 64, 4, 1, 8, 47, decode_capacity=100, B=1, num_splits=8)


SLOW = [(m, b, D, Hq, Hkv, P, n)
        for m in ("gear", "gear_l", "kcvt", "kivi", "per_token", "none")
        for b in (2, 4, 8)
        for D in (64, 128)
        for (Hq, Hkv) in ((4, 4), (6, 2), (8, 2), (8, 1))
        for (P, n) in ((1, 0), (23, 41), (64, 20))
        if not (m == "none" and b != 4)]


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SLOW, ids=lambda c: "-".join(map(str, c)))
def test_grid(impl, case):
    _check(impl, *case, dtype=torch.float16)


def test_triton_launch_plan_splits_and_tile_configs():
    """The Triton launcher's host-side choices (`decode_plan`): the split
    count follows FlashAttention-2's wave-efficiency rule (batch 16 x 8 KV
    heads on an H100's 132 SMs: 2 splits fill 97 % of 264 program slots),
    is bounded by the work, and the autotuner's key names kernel arguments
    (a wrong name fails only at a GPU launch) over configs the pruning model
    keeps."""
    from gear_compile.kernels import decode_attention as da, decode_plan as dp
    assert dp.num_splits(128, 512 * 64, 132) == 2
    assert dp.num_splits(1 * 8, 512 * 64, 132) >= 132 * dp.PROGRAMS_PER_SM // 8 * dp.WAVE_EFFICIENCY
    assert dp.num_splits(8, 8, 132) == 2                       # 8 tiles: at least 4 a split
    assert set(da.AUTOTUNE_KEY) <= set(da._attention_kernel.arg_names)
    kept = dp.prune_tile_configs(dp.TILE_CONFIGS, 128, 128, 4, 4)
    assert dp.DEFAULT_TILE_CONFIG in kept and len(kept) < len(dp.TILE_CONFIGS)
    assert all(8 <= c.tile * 128 / (32 * c.warps) <= 64 for c in kept)
    # method none moves 2 fp16 rows a token: 4 stages of 128 tokens exceed the shared-memory budget
    assert dp.TileConfig(128, 8, 4) not in dp.prune_tile_configs(dp.TILE_CONFIGS, 128, 128, 16, 0)
    # with outliers at most 16 values a thread (32 spill on sm_90a): at d 128 the 32-token tile,
    # 8 warps, which the default sm_90a checks build in the default's place
    kept = dp.prune_tile_configs(dp.TILE_CONFIGS, 128, 128, 4, 4, outliers=True)
    assert kept == [dp.TileConfig(32, 8, 3), dp.TileConfig(32, 8, 4)]
    assert dp.representative(kept) == dp.TileConfig(32, 8, 3)


def test_triton_launch_splits_over_the_given_sm_count():
    """`sm_count` is the SM count the split rule fills (the kernel model
    passes its device's): the launch's grid has the splits `num_splits`
    gives for it (twice, with K outlier records: each split's overflow
    program), whatever device the query is on."""
    from gear_compile.kernels import decode_plan as dp
    gen = torch.Generator().manual_seed(0)
    cfg = GearConfig(method="gear", bits=4)
    ks, vs = _stores(cfg, 2, 2, 64, 700, 3, torch.float16, gen)
    q = torch.randn(2, 8, 1, 64, generator=gen).half()
    k, v = KVStore(cfg, "k", ks.tensors()), KVStore(cfg, "v", vs.tensors())
    tiles = dp.plan(k.layout, v.layout, q_dtype=q.dtype, heads=8, kv_heads=2,
                    prefill_tokens=k.prefill.codes.shape[2], decode_tokens=k.decode.codes.shape[2],
                    sink_tokens=k.sink.shape[2], buffer_tokens=k.buffer.shape[2], new_tokens=0,
                    mask_kind=0, softcap=0.0, interpret=True).tiles
    grids = []

    def record(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: grids.append(tuple(grid))
        return Grid()
    for sms in (1, 132):
        grids.clear()
        decode_attention_launch(q, ks.tensors(), vs.tensors(), None, None, None, 0.125, cfg.to_json(),
                                wrap=record, sm_count=sms)
        # GEAR-4 has K outlier records: programs S.. 2S - 1 read the tiles overflowing their window
        assert grids[0] == (2 * 2, 2 * dp.num_splits(2 * 2, tiles, sms)), sms
    assert dp.num_splits(4, tiles, 1) < dp.num_splits(4, tiles, 132)     # the count matters here


def test_triton_rank_axis_is_wider_than_the_query_rows():
    """With tensor cores the low-rank axis RP is padded past the GP query
    rows (a [GP, RP] rank-space dot with RP <= GP makes Triton lay the whole
    dot chain's warps along M: `decode_plan.rank_width`); fp32 FMA products
    keep tl.dot's smallest 16. Either way it holds the rank."""
    from gear_compile.kernels import decode_plan as dp
    for gp, rank in ((16, 4), (16, 2), (32, 4), (16, 40)):
        rp = dp.rank_width(gp, rank, tensor_cores=True)
        assert rp > gp and rp >= rank and rp & (rp - 1) == 0, (gp, rank, rp)
    assert dp.rank_width(16, 4, tensor_cores=False) == 16
    assert dp.rank_width(16, 40, tensor_cores=False) == 64
