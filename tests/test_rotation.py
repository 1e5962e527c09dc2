"""The `rotate` option: stores hold each K / V head times an orthogonal R,
and the graph folds R into q, the new tokens and the output, so that
attention is what it was.

Specification: R is orthogonal for any head dim; with exact storage (method
none) a rotated cache decodes, beam-searches and crops exactly as eager does,
reads back densely as the unrotated K / V, and really holds x R; with a
codec, the compiled graph equals the eager simulation that rotates around
the store (benchmarks/quality_methods.py); the option is validated and
described.
"""
import pytest
import torch

import gear_compile
from gear_compile.config import GearConfig
from gear_compile.models import tiny_model
from gear_compile.rotation import hadamard, rotation, unrotate

from decoding import PROMPT, chunks_and_crops_match, decode_logits

EXACT = dict(method="none", buffer_size=8, inductor=False)


@pytest.mark.parametrize("head_dim,block", [(64, 64), (128, 128), (96, 32), (80, 16)])
def test_the_rotation_is_orthogonal_block_hadamard_for_any_head_dim(head_dim, block):
    r = hadamard(head_dim)
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    assert torch.equal(r[:block, block:], torch.zeros(block, head_dim - block))   # block-diagonal
    assert torch.allclose(r[:block, :block].abs(), torch.full((block, block), block ** -0.5))
    x = torch.randn(2, 3, 5, head_dim)
    torch.testing.assert_close(unrotate(x @ rotation(head_dim, x.dtype, x.device)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rotate", ["kv", "k", "v"])
def test_rotated_exact_storage_decodes_as_eager_and_reads_back_unrotated(rotate):
    reference, dense = decode_logits(tiny_model("llama"), 12)
    got, cache = decode_logits(gear_compile.compile(tiny_model("llama"), rotate=rotate, **EXACT), 12)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)       # flushes crossed at 8 and 16
    for kind, name in (("k", "keys"), ("v", "values")):
        stored, want = getattr(cache.layers[0], name), getattr(dense.layers[0], name)
        torch.testing.assert_close(stored.decompress(), want, rtol=1e-5, atol=1e-5)
        held = stored.store.prefill.codes            # method none: the prefill block's values, as held
        rotated = want[:, :, :held.shape[2]] @ rotation(want.shape[-1], want.dtype, want.device)
        torch.testing.assert_close(held, rotated if kind in rotate else want[:, :, :held.shape[2]],
                                   rtol=1e-5, atol=1e-5)


def test_rotated_exact_storage_beam_searches_and_crops_as_eager():
    with torch.no_grad():
        expected = tiny_model("llama").generate(PROMPT, num_beams=3, max_new_tokens=12, do_sample=False)
        model = gear_compile.compile(tiny_model("llama"), rotate="kv", **EXACT)
        assert torch.equal(model.generate(PROMPT, num_beams=3, max_new_tokens=12, do_sample=False), expected)
    # several tokens a call (appended by the runtime, rotated by the graph), then a crop
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(3))
    chunks_and_crops_match(model, tiny_model("llama"), ids)


def test_a_rotated_codec_compiles_to_the_simulation_that_rotates_around_the_store():
    """kivi at 2 bits, rotated: the compiled graph (rotations folded into q,
    the new tokens and the output) against the eager cache that rotates K / V
    before a KVStore and back after it (the quality benchmark's sim path)."""
    import quality_methods as qm

    options = dict(method="kivi", bits=2, group_size=8, buffer_size=8, rotate="kv")
    model = tiny_model("llama")
    sim, _ = decode_logits(model, 12, cache=qm.GearSimCache(model.config, GearConfig(**options)))
    plain, _ = decode_logits(model, 12, cache=qm.GearSimCache(model.config,
                                                               GearConfig(**dict(options, rotate="none"))))
    got, _ = decode_logits(gear_compile.compile(tiny_model("llama"), inductor=False, **options), 12)
    assert (sim - plain).abs().max() > 1e-2         # the rotation changes what the codec loses
    torch.testing.assert_close(got, sim, rtol=1e-3, atol=1e-3)
