"""Rebuild sites: a KV cache read by something other than a recognised
attention (MLA's latent up-projection, ALiBi scores through baddbmm).

Specification: the pair of appends (keys, then values) is found, rewritten
and said so by `explain` ("rebuild", with what reads the cache); a cache
read by more than its append is not; the function's results are unchanged.
The model-level check (DeepSeek V2: method none equals eager, GEAR-4 shrinks
the latent cache) is in tests/test_arch_coverage.py.
"""
import operator

import torch

import gear_compile
from gear_compile.passes.sites import find_sites


def _latent_cache_update(past_latent, past_rope, latent, rope, up):
    latents = torch.cat([past_latent, latent], dim=-2)      # [B, 1, L, r]: MLA's cached latent
    ropes = torch.cat([past_rope, rope], dim=-2)             # [B, 1, L, d]: its shared rotary key part
    keys = latents @ up                                       # the up-projection reads the cache
    return keys.sum(-1) + ropes.sum(-1), latents, ropes


def _args(past: int = 0):
    return [torch.randn(1, 1, past, 32), torch.randn(1, 1, past, 16), torch.randn(1, 1, 40, 32),
            torch.randn(1, 1, 40, 16), torch.randn(32, 64)]


def test_a_cache_read_by_an_up_projection_is_a_rebuild_site():
    report = gear_compile.explain(_latent_cache_update, *_args(), method="none", inductor=False)
    (site,) = report.sites
    assert site.form == "rebuild" and site.rewritten, report.text()
    assert "cache compressed, read back densely before" in site.reason, report.text()
    assert "rebuild" in report.text()


def test_a_cache_also_read_elsewhere_is_not_rebuilt():
    def read_twice(past_latent, past_rope, latent, rope, up):
        out, latents, ropes = _latent_cache_update(past_latent, past_rope, latent, rope, up)
        return out + past_latent.sum(), latents, ropes
    report = gear_compile.explain(read_twice, *_args(4), method="none", inductor=False)
    assert not any(s.rewritten for s in report.sites), report.text()


def test_the_results_are_unchanged():
    args = _args()
    got = torch.compile(_latent_cache_update, backend="gear", options={"method": "none", "inductor": False})(*args)
    for g, e in zip(got, _latent_cache_update(*args)):
        torch.testing.assert_close(g, e)       # the caches come back compressed, read densely here



def test_a_past_whose_length_is_read_first_is_still_rebuilt():
    """A past read for its length before its append (DeepSeek V3.2's sparse
    attention, AXK2, HY V4: `past.size()` on the first layer's keys, which
    the mask's sizes come from) is a rebuild site: the rebuilt past answers
    the size. Any other read of the past still keeps it exact."""
    def graph(other_read):
        g = torch.fx.Graph()
        q, past_k, new_k, past_v, new_v = (g.placeholder(n) for n in ("q", "past_k", "new_k", "past_v", "new_v"))
        length = g.call_function(operator.getitem, (g.call_method("size", (past_k,)), 2))
        k = g.call_function(torch.cat, ([past_k, new_k],), {"dim": -2})
        v = g.call_function(torch.cat, ([past_v, new_v],), {"dim": -2})
        scores = g.call_function(torch.einsum, ("bhtd,bhsd->bhts", q, k))
        out = g.call_function(torch.matmul, (g.call_function(torch.softmax, (scores, -1)), v))
        extra = g.call_method(other_read, (past_k,)) if other_read else length
        g.output((out, k, v, extra, length))
        return g
    sites = find_sites(graph(None))
    rebuilt = [(s.form, s.rewritable) for s in sites if s.form != "unknown"]
    assert rebuilt == [("rebuild", True)], [s.reason for s in sites]
    sites = find_sites(graph("mean"))
    assert not any(s.rewritable for s in sites) and "also read by mean" in " ".join(s.reason for s in sites)
