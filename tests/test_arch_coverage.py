"""benchmarks/arch_coverage.py on the CI set: unmodified decoder families
compiled with the gear backend.

Specification: for each family, `method="none"` generates the eager tokens,
the report and the run agree (every layer reported rewritten ends compressed,
no other does), a lossy 4-bit cache stays close to eager, and every family is
fully rewritten with its cache shrunk: fused where the matcher reads the
attention, rebuilt in front of it where it does not (bloom's ALiBi). One of each newer family too: an
MLA model (its latent cache compressed), a hybrid (its attention layer
compressed, its recurrent states exact and counted apart) and a model whose
layers differ in head dim. The tiny configs keep what sets each family apart.
The full sweep is the benchmark.
"""
import pytest
import torch

import arch_coverage as sweep
from rendered import row, table

# caches read by an attention the matcher does not fuse: compressed, rebuilt before the model's own code
REBUILT = {"bloom"}                     # ALiBi scores through baddbmm


@pytest.mark.parametrize("arch", sweep.CI_ARCHS)
def test_a_family_is_rewritten_and_never_wrong(arch):
    row = sweep.sweep_one(arch, steps=20)
    assert row["status"] == "full" and row["exact"] and row["agree"], row
    assert row["kv_ratio"] < 0.5 and row["logits_error"] < 0.1, row
    assert row["graphs"] <= 3, row
    assert ("rebuild" in row["forms"]) == (arch in REBUILT), row


# an MLA model, a hybrid (Mamba + attention), a model with a wider head dim on its global layers,
# one whose V head dim is not K's (MiMo: attended by the reference, still compressed)
NEW_FAMILIES = ["deepseek_v2", "jamba", "gemma4_text", "mimo_v2_flash"]


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_a_newer_family_is_fully_rewritten_and_its_attention_cache_shrinks(arch):
    row = sweep.sweep_one(arch, steps=8)
    assert row["status"] == "full" and row["exact"] and row["agree"], row
    assert row["kv_ratio"] < 0.45 and row["logits_error"] < 0.3, row
    if arch == "deepseek_v2":         # prefill writes the latent and the rope key part; decode absorbs over them
        assert row["forms"] == ["mla", "rebuild"], row
    if arch == "jamba":               # the Mamba layer's states are held exact and counted apart
        assert row["state_bytes"] > 0, row


def test_the_tiny_configs_keep_what_sets_a_family_apart():
    mla = sweep.tiny_config("deepseek_v2")
    assert (mla.kv_lora_rank, mla.q_lora_rank, mla.qk_rope_head_dim) == (32, 16, 16)
    assert mla.qk_head_dim == mla.qk_nope_head_dim + mla.qk_rope_head_dim      # derived by the constructor
    hybrid = sweep.tiny_config("qwen3_next")
    assert hybrid.num_hidden_layers == 4 and "full_attention" in hybrid.layer_types \
        and "linear_attention" in hybrid.layer_types
    assert "full_attention" in sweep.tiny_config("granitemoehybrid").layer_types   # its defaults have none
    gemma4 = sweep.tiny_config("gemma4_text")
    dims = {gemma4.per_layer_config[i].head_dim if hasattr(gemma4, "per_layer_config") else None
            for i in range(gemma4.num_hidden_layers)}
    assert len(dims) == 2, dims                                  # the global layer's wider head dim
    with pytest.raises(ValueError, match="encoder-decoder"):
        sweep.tiny_config("bart")


def test_the_table_and_the_headline_count_what_was_swept(tmp_path):
    rows = [dict(arch="a", status="full", sites=4, rewritten=4, fallbacks=[], exact=True, agree=True,
                 compressed_layers=2, attention_layers=2, kv_ratio=0.3, logits_error=0.01, graphs=2),
            dict(arch="b", status="WRONG", sites=4, rewritten=4, fallbacks=[], exact=True, agree=False,
                 compressed_layers=0, attention_layers=2, kv_ratio=1.0, logits_error=0.0, graphs=2,
                 forms=["mla", "rebuild"]),
            dict(arch="c", status="error", reason="RuntimeError: boom"),
            dict(arch="d", status="not built", reason="encoder-decoder",
                 provenance="`python benchmarks/arch_coverage.py --only d`, transformers 5.25.0, commit abc")]
    assert sweep.headline(rows).startswith("3 buildable architectures with an attention KV cache, 3 swept: "
                                           "1 fully rewritten (33.3 %")
    assert "33.3 % of those swept correct (target 100 %: 1 wrong, 1 errors)" in sweep.headline(rows)
    # a decoder built but not swept counts in the denominator, not as correct or wrong
    pending = rows + [dict(arch="e", status="pending", reason="not swept")]
    assert sweep.headline(pending).startswith("4 buildable architectures with an attention KV cache, 3 swept "
                                              "(1 built but not swept yet): 1 fully rewritten (25.0 %")
    sweep.write(rows, type("Args", (), {"steps": 20, "merge": None})(), tmp_path / "cov")
    text = (tmp_path / "cov.md").read_text()
    shown = table(text)
    assert [r["arch"] for r in shown] == ["a", "b", "c"]            # d was not built: listed below
    assert row(shown, arch="b") == {
        "arch": "b", "status": "WRONG", "sites rewritten / found": "4 / 4", "forms": "mla rebuild",
        "none == eager": "yes",
        "compressed layers": "0 / 2", "kv %": "100", "logits err": "0.000", "graphs": "2", "run": "1",
        "fallbacks / reason": "report and run disagree"}
    assert row(shown, arch="a")["forms"] == ""                      # swept before forms were recorded
    assert row(shown, arch="c")["status"] == "error"
    assert row(shown, arch="c")["fallbacks / reason"] == "RuntimeError: boom"
    assert "- d: encoder-decoder (run 2)" in text
    assert "1. not recorded" in text and "2. `python benchmarks/arch_coverage.py --only d`" in text


def test_a_backend_crash_is_reported_with_its_cause():
    """Dynamo's BackendCompilerFailed says "backend='gear' raised:" on its
    first line and holds the cause apart (raised `from None`): the row names the cause."""
    from torch._dynamo.exc import BackendCompilerFailed

    def gear():
        pass
    cause = RuntimeError("your tensor may have escaped from inside a function being vmapped\nmore")
    try:
        raise BackendCompilerFailed(gear, cause, None) from None
    except BackendCompilerFailed as e:
        assert sweep.crash(e) == ("BackendCompilerFailed: backend='gear' raised: RuntimeError: your tensor "
                                  "may have escaped from inside a function being vmapped")
    assert sweep.crash(ValueError("boom\nsecond line")) == "ValueError: boom"


def route(x, counts):
    """A MoE's split by routing counts (`.tolist()`: a graph break, then a guard on the counts' values)."""
    return torch.cat([part * i for i, part in enumerate(x.split(counts.tolist()))])


def test_a_function_past_dynamos_recompile_limit_is_named():
    """A frame that hits the recompile limit runs eagerly from then on (its
    cache read back dense): the row names it and the guard that failed, here
    a MoE's routing sizes through `.tolist()`, as JetMoE's are."""
    compiled = torch.compile(route, backend="eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1), sweep.recompile_limits() as hits:
        for counts in ([1, 3], [2, 2], [3, 1]):
            compiled(torch.ones(4), torch.tensor(counts))
    torch._dynamo.reset()
    assert len(hits) == 1, hits
    assert hits[0].startswith("Dynamo's recompile_limit (1) hit in 'torch_dynamo_resume_in_route_at_") and \
        "runs eagerly from then on" in hits[0] and "(last recompile: " in hits[0], hits


def test_a_frame_dynamo_gave_up_on_is_partial_while_its_tokens_are_exact():
    """CPM-Ant feeds the whole sequence at every step: each step recompiles
    until Dynamo's limit, then the frame runs eagerly and its cache is read
    back dense. Fewer layers end compressed than were reported rewritten;
    that is partial (the row names the frame), WRONG only if tokens differ."""
    row = dict(attention_layers=2, compressed_layers=0, exact=True, agree=False, sites=4, rewritten=4)
    assert sweep.status(row, 2) == "WRONG"
    assert sweep.status(row, 2, gave_up=True) == "partial"
    assert sweep.status(dict(row, exact=False), 2, gave_up=True) == "WRONG"
    assert sweep.status(dict(row, compressed_layers=2, agree=True), 2) == "full"
    assert sweep.status(dict(row, attention_layers=0), 0) == "n/a"


def test_an_append_concatenated_with_entries_cached_apart_is_left_exact_and_said_so():
    """DeepSeek V4's form: a sliding window's append, then the compressor's
    long-range entries (cached apart) after it along the sequence, K = V. No
    single cache's append is what the attention reads: the site falls back
    exactly and its reason says why (not "the cached full is also read")."""
    import gear_compile

    def window_then_entries(q, past, new, entries):
        full = torch.cat([past, new], dim=-2)
        kv = torch.cat([full, entries], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
        return out, full[:, :, -7:, :]

    args = (torch.randn(1, 2, 1, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 3, 16))
    report = gear_compile.explain(window_then_entries, *args, method="none", inductor=False)
    assert report.sites and not any(s.rewritten for s in report.sites), report.text()
    assert "no single cache's append is attended" in report.text(), report.text()
    got = torch.compile(window_then_entries, backend="gear", options={"method": "none", "inductor": False})(*args)
    for g, e in zip(got, window_then_entries(*args)):
        torch.testing.assert_close(g, e)
