"""benchmarks/cpu_lowp_error.py: its fp32 attention is SDPA's, and each
low-precision stage it emulates rounds what that hardware rounds (exact on
values the format holds, inexact on others)."""
import torch
import torch.nn.functional as F

import cpu_lowp_error as bench


def test_the_fp32_attention_is_sdpa_with_gqa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 16, generator=g), torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    want = F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], enable_gqa=True)[0, :, 0]
    assert torch.allclose(bench.attention(q, k, v), want, atol=1e-6)


def test_each_stage_is_exact_on_values_its_format_holds_and_rounds_the_rest():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (4, 16), generator=g).float()      # small integers: exact in bf16 and fp16
    k = torch.randint(-8, 8, (4, 30, 16), generator=g).float()
    exact = torch.einsum("hd,htd->ht", q, k)
    assert torch.equal(bench.bf16_dot(q, k), exact)
    assert torch.equal(bench.fp16_dot_fp16_sums(q, k), exact)
    q, k = q + 1e-3, k + 1e-3                                      # no longer representable
    exact = torch.einsum("hd,htd->ht", q, k)
    assert not torch.equal(bench.bf16_dot(q, k), exact)
    assert not torch.equal(bench.fp16_dot_fp16_sums(q, k), exact)
    for name in ("p.V bf16", "p.V fp16"):
        p, v = torch.softmax(torch.randn(4, 30, generator=g), -1), torch.randn(4, 30, 16, generator=g)
        err = (bench.STAGES[name]["pv_fn"](p, v) - torch.einsum("ht,htd->hd", p, v)).abs().max()
        assert 0 < err < (1e-2 if "bf16" in name else 1e-3), (name, err)
