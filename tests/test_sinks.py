"""Sink logits: a per-head logit in the softmax's denominator whose value is zero
(the model's attention sinks, `self_attn.sinks`; not the store's exact first
tokens, `sink_tokens`, which test_store.py covers).

Specification: both forms transformers writes (gpt-oss: the sink logits as a
softmax column dropped after it; Granite SWA: the output rescaled by
sigmoid(logsumexp(scores) - sink)) are rewritten, on their sliding-window
and full layers alike; with exact storage the decode logits equal eager's
while the sink logits are large enough to change them; a lossy cache stays
compressed and close (8 bits). The kernels' sink-logit arithmetic is tested
against the written-out softmax in test_attention_kernels.py.
"""
import pytest
import torch

import gear_compile
from gear_compile import CompressedKV
from gear_compile.hf_compat import cache_of
from gear_compile.models import tiny_model


def _model(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:        # large and varied: they move the output
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 6.0, layer.self_attn.sinks.numel()))
    return model


def _logits(model, prompt, steps=30):
    out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), cache_of(out)


@pytest.mark.parametrize("arch", ["gpt_oss", "granite_swa"])
def test_sink_logits_are_rewritten_and_exact(arch):
    model = _model(arch)
    prompt = torch.randint(3, 256, (1, 90), generator=torch.Generator().manual_seed(0))
    report = gear_compile.explain(model, prompt, method="none")
    assert report.sites and all(s.rewritten and "sink logits" in s.reason for s in report.sites), \
        [(s.form, s.reason) for s in report.sites]
    with torch.no_grad():
        want_seq, want, _ = _logits(model, prompt)
        original = model.forward
        sink_logits = [layer.self_attn.sinks.clone() for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
        _, without, _ = _logits(model, prompt)
        for layer, s in zip(model.model.layers, sink_logits):
            layer.self_attn.sinks.copy_(s)
        assert (without - want).abs().max() > 0.02            # the sink logits matter here (500x the tolerance)

        gear_compile.compile(model, method="none", inductor=False)
        got_seq, got, cache = _logits(model, prompt)
        assert torch.equal(got_seq, want_seq)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert all(isinstance(layer.keys, CompressedKV) for layer in cache.layers)

        model.forward = original
        torch._dynamo.reset()
        # 8 bits: gpt-oss routes tokens to experts, so at 4 bits a small change
        # of the attention output can flip a route and the logits with it
        gear_compile.compile(model, method="gear", bits=8, inductor=False)
        seq, lossy, cache = _logits(model, prompt, steps=5)
        assert all(isinstance(layer.keys, CompressedKV) for layer in cache.layers)
        new = prompt.shape[1]
        same = next(i for i in range(5) if i == 4 or seq[0, new + i] != want_seq[0, new + i])
        steps = slice(1, same + 1)                # decode steps whose inputs agree with eager's
        err = (lossy[steps, 0] - want[steps, 0]).norm(dim=-1) / want[steps, 0].norm(dim=-1)
        assert same >= 1 and err.max() < 0.02, (same, err)


@pytest.mark.skipif(not hasattr(__import__("transformers"), "FlintConfig"),
                    reason="this transformers has no Flint model")
def test_fp32_attention_of_a_bf16_model_is_rewritten_and_cast_back():
    """Flint upcasts q and K to fp32 for its scores and has sink logits (no row-max
    shift): in bf16 the rewritten decode attention runs on the stored bf16
    K/V and its fp32 output is cast back to the model's dtype, as eager does."""
    import transformers as tf
    from arch_coverage import tiny_config
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("flint")).eval().to(torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    prompt = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    report = gear_compile.explain(model, prompt, method="none")
    assert report.sites and all(s.rewritten for s in report.sites), [s.reason for s in report.sites]
    with torch.no_grad():
        want_seq, want, _ = _logits(model, prompt, steps=25)
        gear_compile.compile(model, method="none", inductor=False)
        got_seq, got, cache = _logits(model, prompt, steps=25)
    assert got.dtype == want.dtype
    assert torch.equal(got_seq, want_seq)
    assert (got.float() - want.float()).abs().max() < 0.05     # bf16 logits: reduction order
    assert all(isinstance(layer.keys, CompressedKV) for layer in cache.layers)
