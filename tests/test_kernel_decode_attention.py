"""The Triton decode-attention kernel (run by the Triton interpreter on CPU)
against the reference: dequantize the SAME store, then SDPA.

Tolerances: the kernel rounds the dequantized K/V tile and the softmax
weights p to the query dtype before each tl.dot (fp32 accumulation), as flash
attention does, and adds the low-rank terms at score level ((q.B).A) rather
than to K; the reference rounds the rebuilt K/V once to the store dtype and runs
SDPA in fp32. Observed max errors on O(1) outputs: fp32 ~5e-7, fp16 ~1e-3
(fp16 ulp at 1 is 1e-3; bound 1e-2), bf16 ~7e-3 (8-bit mantissa; bound 4e-2).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gear_compile.compressed_kv import KVStore  # noqa: E402
from gear_compile.config import GearConfig  # noqa: E402
from gear_compile.kernels.decode_attention import decode_attention_launch  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _stores(cfg, B, Hkv, D, prefill, new, dtype, gen):
    """K and V stores from a `prefill`-token prompt then `new` appended tokens
    (appended in uneven chunks, so flushes happen mid-chunk)."""
    x = lambda n: torch.randn(B, Hkv, n, D, generator=gen).to(dtype)  # noqa: E731
    ks = KVStore.from_prefill(x(prefill), cfg, "k")
    vs = KVStore.from_prefill(x(prefill), cfg, "v")
    left = new
    step = 1
    while left:
        n = min(step, left)
        ks.append(x(n))
        vs.append(x(n))
        left -= n
        step = step % 7 + 2
    return ks, vs


def _check(method, bits, D, Hq, Hkv, prefill, new, dtype=torch.float16, B=2,
           mask=None, num_splits=None, mask_extra=0, **cfg_kw):
    gen = torch.Generator().manual_seed(hash((method, bits, D, Hq, prefill, new)) % 2**31)
    cfg = GearConfig(method=method, bits=bits, group_size=cfg_kw.pop("group_size", 16),
                     decode_capacity=cfg_kw.pop("decode_capacity", 64), **cfg_kw)
    ks, vs = _stores(cfg, B, Hkv, D, prefill, new, dtype, gen)
    L = sum(ks.counts())
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dtype)
    scale = D ** -0.5
    attn_mask = None
    if mask is not None:
        pad = torch.tensor([0, min(3, L - 1)] + [1] * (B - 2))[:B]
        keep = torch.arange(L)[None, :] >= pad[:, None]             # left padding
        attn_mask = keep[:, None, None, :]
        # a mask longer than the keys (e.g. a static cache's): its last L columns count
        attn_mask = torch.cat([torch.zeros(B, 1, 1, mask_extra, dtype=torch.bool), attn_mask], -1)
        if mask == "additive":
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
    out = decode_attention_launch(q, ks.tensors(), vs.tensors(), attn_mask, scale,
                                  cfg.to_json(), num_splits=num_splits)
    K, V = ks.dequantize(), vs.dequantize()
    ref_mask = None if mask is None else attn_mask[..., mask_extra:]
    ref_mask = ref_mask.float() if mask == "additive" else ref_mask
    ref = F.scaled_dot_product_attention(q.float(), K.float(), V.float(), attn_mask=ref_mask,
                                         scale=scale, enable_gqa=True)
    assert out.shape == q.shape and out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.3g} (L={L}, counts={ks.counts()})"


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


@pytest.mark.parametrize("case", FAST, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(case):
    _check(*case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    _check("gear", 4, 64, 4, 1, 30, 23, dtype=dtype)


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_left_padding_mask(mask):
    _check("gear", 4, 64, 4, 2, 26, 21, B=3, mask=mask)


def test_odd_head_dim_long_mask_fp32_mqa():
    # D = 96: packed width 24 padded to 32 per field; a mask 5 columns too long
    _check("gear", 2, 96, 8, 1, 27, 30, dtype=torch.float32, mask="bool", mask_extra=5)


def test_many_splits_and_long_prefill():
    # several programs per segment (split-K) plus a prefill block of many tiles
    # with its own (larger) outlier count
    _check("gear", 4, 64, 2, 1, 300, 50, num_splits=5, B=1)


def test_long_prefill_programs_start_mid_block():
    # 2k = 20 K outliers per channel in a 1000-token prefill block, 4 programs:
    # three start mid-block and binary-search each channel's sorted table
    _check("gear", 4, 64, 4, 1, 1000, 3, num_splits=4, B=1)


@pytest.mark.parametrize("bits", [2, 4])
def test_k_outliers_clustered_in_one_tile(bits):
    """Twenty spiked tokens hold every channel's 2k = 20 prefill outliers, so
    one tile's run is 20 entries long in every channel (the scan's longest
    trip) while its neighbours have none; a program starts inside the run."""
    gen = torch.Generator().manual_seed(bits)
    cfg = GearConfig(method="gear", bits=bits, group_size=16, decode_capacity=64)
    x = torch.randn(1, 2, 1000, 64, generator=gen)
    x[:, :, 200:210] += 50
    x[:, :, 210:220] -= 50
    ks = KVStore.from_prefill(x.half(), cfg, "k")
    vs = KVStore.from_prefill(torch.randn(1, 2, 1000, 64, generator=gen).half(), cfg, "v")
    idx = ks.prefill.out_idx.long()
    assert ((idx >= 200) & (idx < 220)).all()          # every outlier sits in the spike
    q = torch.randn(1, 6, 1, 64, generator=gen).half()
    for splits in (1, 5, 31):                          # 31: a program starts at token 192
        out = decode_attention_launch(q, ks.tensors(), vs.tensors(), None, 0.125,
                                      cfg.to_json(), num_splits=splits)
        ref = F.scaled_dot_product_attention(q.float(), ks.dequantize().float(),
                                             vs.dequantize().float(), scale=0.125, enable_gqa=True)
        assert (out.float() - ref).abs().max().item() < TOL[torch.float16], splits


def test_constant_vectors_count_each_outlier_once():
    """A K channel and some V tokens constant (nonzero): every entry ties, and
    the outlier tables must still hold distinct entries the kernel adds once."""
    gen = torch.Generator().manual_seed(3)
    cfg = GearConfig(method="gear", bits=2, group_size=16, decode_capacity=64)
    k, v = torch.randn(2, 1, 2, 70, 64, generator=gen)
    k[:, :, :, 5] = 1.5
    v[:, :, 10:30] = -0.75
    ks, vs = KVStore.from_prefill(k.half(), cfg, "k"), KVStore.from_prefill(v.half(), cfg, "v")
    q = torch.randn(1, 4, 1, 64, generator=gen).half()
    out = decode_attention_launch(q, ks.tensors(), vs.tensors(), None, 0.125, cfg.to_json())
    ref = F.scaled_dot_product_attention(q.float(), ks.dequantize().float(),
                                         vs.dequantize().float(), scale=0.125, enable_gqa=True)
    assert (out.float() - ref).abs().max().item() < TOL[torch.float16]


def test_registered_triton_op_runs_eagerly():
    gen = torch.Generator().manual_seed(0)
    cfg = GearConfig(method="gear", bits=4)
    ks, vs = _stores(cfg, 1, 2, 64, 40, 3, torch.float16, gen)
    q = torch.randn(1, 4, 1, 64, generator=gen).half()
    out = torch.ops.gear.decode_attention_triton(q, ks.tensors(), vs.tensors(), None, 0.125,
                                                 cfg.to_json())
    ref = F.scaled_dot_product_attention(q.float(), ks.dequantize().float(),
                                         vs.dequantize().float(), scale=0.125, enable_gqa=True)
    assert (out.float() - ref).abs().max().item() < TOL[torch.float16]


def test_decode_segment_beyond_capacity_is_ignored():
    # capacity 100 tokens (5 blocks) with 2 used: idle programs add nothing
    _check("kcvt", 4, 64, 4, 1, 8, 47, decode_capacity=100, B=1, num_splits=8)


SLOW = [(m, b, D, Hq, Hkv, P, n)
        for m in ("gear", "gear_l", "kcvt", "kivi", "per_token", "none")
        for b in (2, 4, 8)
        for D in (64, 128)
        for (Hq, Hkv) in ((4, 4), (6, 2), (8, 2), (8, 1))
        for (P, n) in ((1, 0), (23, 41), (64, 20))
        if not (m == "none" and b != 4)]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=lambda c: "-".join(map(str, c)))
def test_grid(case):
    _check(*case, dtype=torch.float16)
