"""Helpers shared by the LoRC attention kernels' tests (test_lorc_kernel: C++,
test_lorc_triton: Triton): one decode step's inputs over latent stores of a
codec (`case`), the same attention written out in torch (`reference`:
decompress the latents, times U^T, the sinks' exact rows, RoPE, SDPA) and
the C++ op run on them (`fused`)."""
import torch
import torch.nn.functional as F

from gear_compile.config import GearConfig
from gear_compile.kernels import cpu
from gear_compile.store import KVStore


def rot(x, mode):
    if mode == 1:
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)
    return torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)


def rope(k, cos, sin, mode, rd):
    """k [B, H, L, D]; cos / sin [B or 1, 1, L, rd]."""
    if mode == 0:
        return k
    head, rest = k[..., :rd], k[..., rd:]
    return torch.cat([head * cos + rot(head, mode) * sin, rest], -1)


def tables(positions, rd, mode, base=100.0):
    """cos / sin [B, 1, L, rd] at positions [B, L], as HF builds them."""
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    freqs = positions[..., None].float() * inv
    emb = torch.cat([freqs, freqs], -1) if mode == 1 else freqs.repeat_interleave(2, -1)
    return emb.cos()[:, None], emb.sin()[:, None]


def reference(q, ks, vs, k_sinks, v_sinks, k_new, v_lat, uk, uv, cos, sin, mask, scale, mode, rd):
    lk, lv = ks.decompress(torch.float32)[:, 0], vs.decompress(torch.float32)[:, 0]
    K = torch.einsum("blr,hrd->bhld", lk, uk.float())
    V = torch.einsum("blr,hrd->bhld", lv, uv.float())
    s = k_sinks.shape[2]
    K[:, :, :s], V[:, :, :s] = k_sinks.float(), v_sinks.float()
    K = rope(K, cos, sin, mode, rd)
    K = torch.cat([K, k_new.float()], 2)
    V = torch.cat([V, torch.einsum("blr,hrd->bhld", v_lat[:, 0].float(), uv.float())], 2)
    return F.scaled_dot_product_attention(q.float(), K, V, attn_mask=mask, scale=scale, enable_gqa=True)


def case(method, bits, mode, rd, B=2, Hkv=2, G=3, D=64, rk=48, rv=32, prefill=45, appended=30, s=4,
         dtype=torch.float32, pad=(0, 5), T=1, seed=0, outlier_ratio=None):
    """The op's arguments (q, stores, sinks, new tokens, U^T, tables, mask,
    scale, RoPE form, rotary dims): latent stores of `method` / `bits` holding
    `prefill` + `appended` tokens, rows left-padded by `pad`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = GearConfig(method=method, bits=bits, group_size=16, decode_capacity=64,
                     outlier_ratio=outlier_ratio).codec
    lat_k = torch.randn(B, 1, prefill + appended, rk, generator=gen).to(dtype)
    lat_v = torch.randn(B, 1, prefill + appended, rv, generator=gen).to(dtype)
    ks = KVStore.from_prefill(lat_k[:, :, :prefill], cfg, "k")
    vs = KVStore.from_prefill(lat_v[:, :, :prefill], cfg, "v")
    for t in range(prefill, prefill + appended, 7):
        ks.append(lat_k[:, :, t:t + 7])
        vs.append(lat_v[:, :, t:t + 7])
    L = prefill + appended
    uk = torch.randn(Hkv, rk, D, generator=gen) / rk ** 0.5
    uv = torch.randn(Hkv, rv, D, generator=gen) / rv ** 0.5
    k_sinks = torch.randn(B, Hkv, s, D, generator=gen).to(dtype)
    v_sinks = torch.randn(B, Hkv, s, D, generator=gen).to(dtype)
    k_new = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    v_lat = torch.randn(B, 1, T, rv, generator=gen).to(dtype)
    q = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype)
    pads = torch.tensor(pad[:B])
    # each row's positions: left padding shifts them (and hides the padded keys)
    positions = torch.arange(L)[None, :] - pads[:, None]
    cos, sin = tables(positions, rd, mode) if mode else (None, None)
    keep = torch.arange(L + T)[None, :] >= pads[:, None]
    mask = keep[:, None, None, :] & torch.ones(T, L + T, dtype=torch.bool).tril(L)
    return (q, ks, vs, k_sinks, v_sinks, k_new, v_lat, uk, uv, cos, sin, mask, D ** -0.5, mode, rd)


def op_args(q, ks, vs, k_sinks, v_sinks, k_new, v_lat, uk, uv, cos, sin, mask, scale, mode, rd):
    """A case as the LoRC attention ops take it."""
    return (q, ks.tensors(), vs.tensors(), k_sinks, v_sinks, k_new, v_lat, uk, uv, cos, sin, mask, scale, False,
            list(ks.layout.kernel_descriptor), list(vs.layout.kernel_descriptor), mode, rd)


def fused(*args):
    """The C++ op on a case."""
    cpu.load()
    return torch.ops.gear.lorc_attention_cpu(*op_args(*args))
