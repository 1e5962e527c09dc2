"""Absorbed MLA attention (`passes.mla`): an MLA layer's decode step attends
its compressed latent with W_uk folded into the query and W_uv into the
output, never building the past's per-head K / V.

Specification: `explain` says which sites absorb and which keep the rebuild
(an attention the form does not cover: V not the latent's up-projection, K's
rotary part not the cached one); the decode graph no longer calls the
up-projection nor builds K; with method none a tiny DeepSeek V2 generates
eager's tokens and logits for a batch with a padded row, a bias on the up-projection (legal in the form,
absent from the shipped models) included; with GEAR-4 the absorbed attention
equals rebuild-then-attend over the same compressed cache. A sliding-window
latent cache (dots3's windowed layers) is absorbed too, unless another layer
reads its window (Gemma 3n's KV sharing), which stays exact.
"""
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import arch_coverage as sweep
import gear_compile
from decoding import PROMPT, decode_logits, greedy

HEADS, NOPE, ROPE, VALUE, RANK = 4, 16, 8, 24, 32


def _mla_attention(past_latent, past_rope, latent, rope, q, w, rope_read=lambda r: r, value_read=lambda v: v):
    """transformers' expand_kv and attention, as a function of the cache."""
    latents = torch.cat([past_latent, latent], dim=-2)          # [B, 1, L, r]
    ropes = torch.cat([past_rope, rope], dim=-2)                 # [B, 1, L, d_r]
    kv = F.linear(latents, w).view(1, latents.shape[2], -1, NOPE + VALUE).transpose(1, 2)
    k_nope, v = torch.split(kv, [NOPE, VALUE], dim=-1)
    k = torch.cat([k_nope, rope_read(ropes).expand(-1, HEADS, -1, -1)], dim=-1)
    return F.scaled_dot_product_attention(q, k, value_read(v)), latents, ropes


def _args():
    return [torch.randn(1, 1, 0, RANK), torch.randn(1, 1, 0, ROPE), torch.randn(1, 1, 40, RANK),
            torch.randn(1, 1, 40, ROPE), torch.randn(1, HEADS, 40, NOPE + ROPE),
            torch.randn(HEADS * (NOPE + VALUE), RANK)]


class _Model(torch.nn.Module):
    """`attention` as a model's layer: the attention and the cache it reads are then one
    layer's (a plain function's sites have no layer in common)."""

    def __init__(self, attention):
        super().__init__()
        self.layer = torch.nn.Module()
        self.layer.forward = attention

    def forward(self, *args):
        return self.layer(*args)


def _reason(fn):
    model = _Model(fn)
    (site,) = gear_compile.explain(model, *_args(), method="none", inductor=False).sites
    assert site.form == "rebuild" and site.rewritten
    return site.reason


def test_the_up_projection_form_is_absorbed_and_others_keep_the_rebuild():
    assert "decode steps absorb the attention" in _reason(_mla_attention)
    for changed in (lambda *a: _mla_attention(*a, rope_read=lambda r: r * 2),       # K's rope: not the cache's
                    lambda *a: _mla_attention(*a, value_read=torch.tanh)):          # V: not the up-projection
        assert "read back densely" in _reason(changed)


def _deepseek(bias_on_first_layer: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(sweep.tiny_config("deepseek_v2")).eval()
    if bias_on_first_layer:
        up = model.model.layers[0].self_attn.kv_b_proj
        up.bias = torch.nn.Parameter(torch.randn(up.out_features) * 0.5)
    return model


def test_method_none_generates_eagers_tokens_without_building_k_or_v(tmp_path):
    model = _deepseek(bias_on_first_layer=True)          # layer 0 with a bias, layer 1 without
    ids = torch.randint(3, 256, (2, 30))
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0                       # a left-padded row: the attention's mask is read
    padded = dict(attention_mask=mask, pad_token_id=0, output_logits=True)
    expected = greedy(model, ids, 10, **padded)
    report = gear_compile.explain(model, PROMPT, method="none")
    decode = [s for s in report.sites if s.phase == "decode"]
    assert len(decode) == 2 and all(s.form == "mla" and "attention absorbed" in s.reason for s in decode), \
        report.text()
    gear_compile.compile(model, method="none", dump_graphs=str(tmp_path))
    got = greedy(model, ids, 10, **padded)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
    diffs = [p.read_text() for p in sorted(tmp_path.glob("*.diff"))]
    decode_diff = next(d for d in diffs if "decompress" in d)
    removed = [line for line in decode_diff.splitlines() if line.startswith("-")]
    kept = [line for line in decode_diff.splitlines() if not line.startswith("-")]
    assert any("kv_b_proj" in line and "linear" in line for line in removed)
    assert not any("kv_b_proj" in line and "linear" in line for line in kept)
    assert not any("new_empty" in line for line in kept)


def test_gear4_absorbed_equals_rebuilding_k_and_v():
    """Same compressed cache, two ways of attending it (`mla_absorb`)."""
    results = []
    for absorb in (True, False):
        model = _deepseek()
        reasons = [s.reason for s in gear_compile.explain(model, PROMPT, method="gear", bits=4,
                                                          mla_absorb=absorb).sites]
        assert all(("absorb" in r) == absorb for r in reasons), reasons
        gear_compile.compile(model, method="gear", bits=4, mla_absorb=absorb)
        results.append(decode_logits(model, steps=8)[0])
    assert results[0].shape[1] == 9
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def _windowed(keep):
    """`_mla_attention` over a sliding-window cache that keeps its last `keep` tokens."""
    def attention(*args):
        out, latents, ropes = _mla_attention(*args)
        return out, latents[:, :, -keep:], ropes[:, :, -keep:]
    return attention


class _Shared(torch.nn.Module):
    """A second layer reads the first's windowed append (Gemma 3n's KV sharing)."""

    def __init__(self, keep):
        super().__init__()
        self.first, self.second = torch.nn.Module(), torch.nn.Module()
        self.first.forward = lambda *args: (lambda out, latents, ropes: (
            out, latents, latents[:, :, -keep:], ropes[:, :, -keep:]))(*_mla_attention(*args))
        self.second.forward = lambda latents: latents.sum()

    def forward(self, *args):
        out, full, latents, ropes = self.first(*args)
        return out + self.second(full), latents, ropes


def test_a_windowed_latent_cache_is_rebuilt_unless_another_layer_reads_it():
    """dots3's sliding MLA layers keep their last tokens: compressed, absorbed, and
    the function's results unchanged. A window another layer reads stays exact."""
    model = _Model(_windowed(30))
    (site,) = gear_compile.explain(model, *_args(), method="none", inductor=False).sites
    assert site.form == "rebuild" and site.rewritten and "absorb" in site.reason, site.reason
    compiled = torch.compile(model, backend="gear", options=dict(method="none", inductor=False))
    args = _args()
    for got, want in zip(compiled(*args), model(*args)):
        torch.testing.assert_close(got, want)
    report = gear_compile.explain(_Shared(30), *_args(), method="none", inductor=False)
    assert not any(s.rewritten for s in report.sites), report.text()


def test_dots3s_windowed_mla_layers_decode_past_their_window_as_eager_does():
    """A tiny dots3 (two indexed MLA layers, two with a 16-token window), a
    40-token prompt: every decode site absorbed, method none equal to eager."""
    torch.manual_seed(0)
    config = sweep.tiny_config("dots3_note_text")
    config.sliding_window = 16
    model = AutoModelForCausalLM.from_config(config).eval()
    assert "sliding_attention" in model.config.layer_types
    ids = torch.randint(3, 200, (1, 40))
    expected = greedy(model, ids, 12, output_logits=True)
    report = gear_compile.explain(model, ids, method="none")
    decode = [s for s in report.sites if s.phase == "decode"]
    assert len(decode) == 4 and all(s.form == "mla" for s in decode), report.text()
    gear_compile.compile(model, method="none")
    got = greedy(model, ids, 12, output_logits=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
