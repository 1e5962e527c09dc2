"""Rebuild sites: a KV cache read by something other than a recognised
attention (MLA's latent up-projection, ALiBi scores through baddbmm).

Specification: the pair of appends (keys, then values) is found, rewritten
and said so by `explain` ("rebuild", with what reads the cache); a cache
read by more than its append is not; the function's results are unchanged.
The model-level check (DeepSeek V2: method none equals eager, GEAR-4 shrinks
the latent cache) is in tests/test_arch_coverage.py.
"""
import torch

import gear_compile


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
