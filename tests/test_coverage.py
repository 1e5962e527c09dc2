"""What the matcher cannot rewrite is reported, never skipped and never wrong.

Specification: an attention form the matcher does not read (scores through
einsum, ALiBi through baddbmm) appears in the report as an `unknown` site
with what sets it apart, the cache feeding it is compressed and rebuilt in
front of it (a `rebuild` site), and the compiled function still equals eager; heads whose dim the group size does not divide
fall back with a reason naming both and a group size that fits, and
generation runs exactly instead of crashing. A form is declared as a pattern
(`passes.pattern`): it binds what it matches, and a near miss says why.
"""
import operator

import pytest
import torch
import torch.nn.functional as F

import gear_compile
from gear_compile.models import tiny_model
from gear_compile.passes.match import EAGER
from gear_compile.passes.pattern import Call, Capture, match


def _cat(past, new):
    return torch.cat([past, new], dim=-2)


def einsum_scores(q, past_k, new_k, past_v, new_v):
    k, v = _cat(past_k, new_k), _cat(past_v, new_v)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * 0.25
    return torch.softmax(scores, dim=-1) @ v, k, v


def alibi(q, past_k, new_k, past_v, new_v):
    k, v = _cat(past_k, new_k), _cat(past_v, new_v)
    B, H, T, D = q.shape
    bias = torch.linspace(0, 1, k.shape[2]).expand(B * H, T, -1)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, -1, D).transpose(1, 2))
    probs = torch.softmax(scores.view(B, H, T, -1), dim=-1)
    return probs @ v, k, v


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, *shape, generator=g) for shape in ((1, 16), (9, 16), (1, 16), (9, 16), (1, 16))]


def test_an_unrecognised_attention_is_reported_and_its_cache_rebuilt_in_front_of_it():
    """The attention is left as written and reported with what sets it apart;
    the cache it reads is compressed and rebuilt densely before it (a
    'rebuild' site), so method none is exact and a lossy prompt step, which
    attends its exact K/V, still is."""
    for fn, feature in ((einsum_scores, "scores through einsum"), (alibi, "baddbmm")):
        inputs = _inputs()
        report = gear_compile.explain(fn, *inputs, method="gear", bits=4)
        forms = sorted((s.form, s.rewritten) for s in report.sites)
        assert forms == [("rebuild", True), ("unknown", False)], forms
        reasons = " ".join(s.reason for s in report.sites)
        assert feature in reasons and "cache compressed, read back densely" in reasons
        for method in ("none", "gear"):
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend="gear", options=dict(method=method, inductor=False))
            got, want = compiled(*inputs), fn(*inputs)
            torch.testing.assert_close(got[0], want[0])
            if method == "none":
                for g, w in zip(got[1:], want[1:]):
                    torch.testing.assert_close(g, w)


class Differential(torch.nn.Module):
    """DiffLlama's form: V's heads split in two halves, each attended over the whole K."""

    def forward(self, q, past_k, new_k, past_v, new_v):
        k, v = _cat(past_k, new_k), _cat(past_v, new_v)
        v1, v2 = (half.repeat(1, 2, 1, 1) for half in torch.chunk(v, 2, dim=1))
        return F.scaled_dot_product_attention(q, k, v1) - 0.5 * F.scaled_dot_product_attention(q, k, v2), k, v


class ValueMasked(torch.nn.Module):
    """Doge's form: a mask computed from the whole V cache, then SDPA over it."""

    def forward(self, q, past_k, new_k, past_v, new_v):
        k, v = _cat(past_k, new_k), _cat(past_v, new_v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=v.mean(-1)[:, :, None, :]), k, v


class Layer(torch.nn.Module):
    """An attention as a submodule, so its sites carry a layer's module path, as in a model."""

    def __init__(self, attention):
        super().__init__()
        self.self_attn = attention

    def forward(self, *inputs):
        return self.self_attn(*inputs)


@pytest.mark.parametrize("module,why", [(Differential, "K/V do not come from a KV-append"),
                                        (ValueMasked, "is also read by mean")])
def test_a_recognised_attention_it_cannot_fuse_has_its_cache_rebuilt_in_front_of_it(module, why):
    """An SDPA whose V is not the appended cache itself (split into halves),
    or whose appended V is also read elsewhere (a mask computed from it), is
    not fused; the cache is compressed and rebuilt before those readers, and
    the attention is named in the rebuild site's reason."""
    inputs, fn = _inputs(), Layer(module())
    report = gear_compile.explain(fn, *inputs, method="gear", bits=4)
    assert [(s.form, s.rewritten) for s in report.sites] == [("rebuild", True)], report.text()
    assert why in report.sites[0].reason and "left as written: sdpa" in report.sites[0].reason
    for method in ("none", "gear"):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="gear", options=dict(method=method, inductor=False))
        got, want = compiled(*inputs), fn(*inputs)
        torch.testing.assert_close(got[0], want[0])


class TwoLayers(torch.nn.Module):
    """Two einsum attentions, the first one's past keys also read outside its append."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Layer(EinsumScores(past_key_read=True)), Layer(EinsumScores())

    def forward(self, q, past_k0, past_v0, past_k1, past_v1, new):
        out, k0, v0 = self.first(q, past_k0, new, past_v0, new)
        out, k1, v1 = self.second(out, past_k1, new, past_v1, new)
        return out, k0, v0, k1, v1


class EinsumScores(torch.nn.Module):
    def __init__(self, past_key_read=False):
        super().__init__()
        self.past_key_read = past_key_read

    def forward(self, q, past_k, new_k, past_v, new_v):
        out, k, v = einsum_scores(q, past_k, new_k, past_v, new_v)
        return (out + past_k.mean() if self.past_key_read else out), k, v


def test_a_rebuild_site_pairs_one_layers_keys_and_values():
    """The first layer's keys cannot be rebuilt (its past is also read): its
    values are left exact with them, not paired with the next layer's keys."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, *shape, generator=g) for shape in ((1, 16), (9, 16), (9, 16), (9, 16), (9, 16),
                                                                   (1, 16))]
    report = gear_compile.explain(TwoLayers(), *inputs, method="gear", bits=4)
    rebuilt = [s.layer for s in report.sites if s.form == "rebuild"]
    assert rebuilt == ["second.self_attn"], report.text()
    assert all(s.layer == "first.self_attn" for s in report.sites if not s.rewritten), report.text()


def einsum_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function the matcher does not read (scores through einsum)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    scores = torch.einsum("bhtd,bhsd->bhts", query, key) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    return (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).contiguous(), None


def test_a_sliding_window_cache_read_by_an_unrecognised_attention_stays_exact():
    """A sliding-window layer (the cache keeps the append's last W - 1
    tokens) whose attention the matcher does not read is left exact and
    reported: its window is not rebuilt (rebuilt, Inkling2's tokens changed
    under method none; `mla.leave_windows_exact`), and generation equals
    eager past the window."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    from test_sliding_window import generate, windowed_model
    AttentionInterface.register("einsum", einsum_attention)
    AttentionMaskInterface.register("einsum", eager_mask)
    ids = torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    want = generate(windowed_model("einsum"), ids, steps=20).sequences
    report = gear_compile.explain(windowed_model("einsum"), ids, method="none", inductor=False)
    assert report.sites and not any(s.rewritten for s in report.sites), report.text()
    assert all("scores through einsum" in s.reason for s in report.sites), report.text()
    assert all("not trusted exact" in s.reason for s in report.sites if s.form == "rebuild"), report.text()
    model = gear_compile.compile(windowed_model("einsum"), method="none", buffer_size=4, inductor=False)
    assert torch.equal(generate(model, ids, steps=20).sequences, want)


def test_heads_the_group_size_does_not_divide_fall_back_instead_of_crashing():
    model = tiny_model("llama", head_dim=32)
    prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    want = model.generate(prompt, max_new_tokens=40, do_sample=False)     # crosses a flush
    report = gear_compile.explain(model, prompt, method="kivi", bits=2, group_size=64)   # set: never overridden
    assert report.sites and not any(s.rewritten for s in report.sites)
    assert all("group_size 64 does not divide head_dim 32" in s.reason and "group_size=32 fits" in s.reason
               for s in report.sites), [s.reason for s in report.sites]
    gear_compile.compile(model, method="kivi", bits=2, group_size=64, inductor=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False), want)


def test_a_softmax_over_a_linear_layer_is_not_reported_as_an_attention():
    """A MoE router's softmax (over a linear layer's logits, not a product of
    two tensors) is no attention: nothing to report."""
    def router(x, w):
        return torch.softmax(torch.nn.functional.linear(x, w).float(), dim=-1)
    g = torch.Generator().manual_seed(0)
    report = gear_compile.explain(router, torch.randn(3, 16, generator=g), torch.randn(4, 16, generator=g))
    assert report.sites == []


def past_also_read(q, past_k, new_k, past_v, new_v):
    k, v = _cat(past_k, new_k), _cat(past_v, new_v)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out + past_k.mean(), k, v


def test_a_past_read_by_more_than_its_append_is_left_exact_and_reported():
    inputs = _inputs()
    report = gear_compile.explain(past_also_read, *inputs, method="gear", bits=4)
    assert report.sites and not any(s.rewritten for s in report.sites)
    assert any("is also read by" in s.reason and "not only appended to" in s.reason for s in report.sites), \
        [s.reason for s in report.sites]
    torch._dynamo.reset()
    compiled = torch.compile(past_also_read, backend="gear", options=dict(method="gear", inductor=False))
    for got, want in zip(compiled(*inputs), past_also_read(*inputs)):
        torch.testing.assert_close(got, want)


def _eager(dims=(2, 3), dropout=None):
    """matmul([dropout](softmax(matmul(q, k.transpose(*dims)) * 0.25, dim=-1)), v) as Dynamo records it."""
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    qk = graph.call_function(torch.matmul, (q, graph.call_method("transpose", (k, *dims))))
    probs = graph.call_function(F.softmax, (graph.call_function(operator.mul, (qk, 0.25)),), {"dim": -1})
    if dropout is not None:
        probs = graph.call_function(F.dropout, (probs, *dropout[0]), dropout[1])
    return graph.call_function(torch.matmul, (probs, v))


@pytest.mark.parametrize("args,kwargs,active", [
    ((), {"training": True}, True),             # p left out: F.dropout's default, 0.5
    ((0.1,), {"training": True}, True),
    ((), {"p": 0.0, "training": True}, False),
    ((), {"p": 0.1, "training": False}, False)])
def test_attention_weights_through_a_training_dropout_are_not_matched(args, kwargs, active):
    """A dropout node as Dynamo records it: the arguments as the model wrote them."""
    found = match(EAGER, _eager(dropout=(args, kwargs)))
    assert bool(found) is not active
    assert not active or "dropout active in training" in found.reason, found


def test_a_declared_form_binds_what_it_matches_and_a_near_miss_says_why():
    found = match(EAGER, _eager())
    assert [found[name].name for name in ("query", "key", "value")] == ["q", "k", "v"]
    assert found["factor"] == 0.25 and found.get("mask") is None and found.get("softcap") is None
    assert [n.target for n in found.nodes] == [torch.matmul, F.softmax, operator.mul, torch.matmul, "transpose"]
    miss = match(EAGER, _eager(dims=(1, 2)))
    assert not miss and "transposes dims (1, 2), not (2, 3)" in miss.reason, miss

    # a new form is a new pattern: soft-capping, a name bound twice being one value
    capped = Call(operator.mul, Call(torch.tanh, Call(operator.truediv, Capture("x"), Capture("cap"))), Capture("cap"))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    tanh = graph.call_function(torch.tanh, (graph.call_function(operator.truediv, (x, 30.0)),))
    assert match(capped, graph.call_function(operator.mul, (tanh, 30.0)))["x"] is x
    miss = match(capped, graph.call_function(operator.mul, (tanh, 50.0)))
    assert not miss and miss.reason == "cap is 50.0 here but 30.0 before", miss


class _SharedWindow(torch.nn.Module):
    """A second layer attends the first layer's appended window (Gemma 3n's KV
    sharing): the first layer's cache keeps the append's last 8 tokens."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Module(), torch.nn.Module()
        self.first.forward = self._append_and_attend
        self.second.forward = F.scaled_dot_product_attention

    @staticmethod
    def _append_and_attend(q, past_k, new_k, past_v, new_v):
        k, v = torch.cat([past_k, new_k], dim=-2), torch.cat([past_v, new_v], dim=-2)
        return F.scaled_dot_product_attention(q, k, v), k, v, k[:, :, -8:], v[:, :, -8:]

    def forward(self, q, past_k, new_k, past_v, new_v):
        out, k, v, kept_k, kept_v = self.first(q, past_k, new_k, past_v, new_v)
        return out + self.second(q, k, v), kept_k, kept_v


def test_a_window_another_layer_attends_is_left_exact_and_says_so():
    """Neither attention's site nor a rebuild takes it (rebuilding such a
    window changed Gemma 3n's tokens); the reason names the other layer."""
    inputs = [torch.randn(1, 2, *shape) for shape in ((1, 16), (7, 16), (1, 16), (7, 16), (1, 16))]
    report = gear_compile.explain(_SharedWindow(), *inputs, method="gear", bits=4)
    assert not any(s.rewritten for s in report.sites), report.text()
    first = [s for s in report.sites if s.layer == "first"]
    assert first and "attended by another layer, second" in first[0].reason, report.text()
