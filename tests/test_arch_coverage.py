"""benchmarks/arch_coverage.py on the CI set: unmodified decoder families
compiled with the gear backend.

Specification: for each family, `method="none"` generates the eager tokens,
the report and the run agree (every layer reported rewritten ends compressed,
no other does), and a lossy 4-bit cache stays close to eager; the families
whose attention the matcher reads are fully rewritten and their cache shrinks;
the others are reported, with their reasons. The full sweep is the benchmark.
"""
import pytest

import arch_coverage as sweep
from rendered import row, table

# what the matcher does not read yet, and says so (see the README's table)
PARTIAL = {"bloom": "baddbmm"}          # ALiBi scores through baddbmm


@pytest.mark.parametrize("arch", sweep.CI_ARCHS)
def test_a_family_is_rewritten_or_reported_and_never_wrong(arch):
    row = sweep.sweep_one(arch, steps=20)
    assert row["status"] in ("full", "partial"), row
    assert row["exact"] and row["agree"], row
    if arch in PARTIAL:
        assert row["status"] == "partial" and any(PARTIAL[arch] in f for f in row["fallbacks"]), row
    else:
        assert row["status"] == "full", row
        assert row["kv_ratio"] < 0.5 and row["logits_error"] < 0.1, row
        assert row["graphs"] <= 3, row


def test_the_table_and_the_headline_count_what_was_swept(tmp_path):
    rows = [dict(arch="a", status="full", sites=4, rewritten=4, fallbacks=[], exact=True, agree=True,
                 compressed_layers=2, attention_layers=2, kv_ratio=0.3, logits_error=0.01, graphs=2),
            dict(arch="b", status="WRONG", sites=4, rewritten=4, fallbacks=[], exact=True, agree=False,
                 compressed_layers=0, attention_layers=2, kv_ratio=1.0, logits_error=0.0, graphs=2),
            dict(arch="c", status="error", reason="RuntimeError: boom"),
            dict(arch="d", status="not built", reason="encoder-decoder")]
    assert sweep.headline(rows).startswith("3 architectures with an attention KV cache swept: "
                                           "1 fully rewritten (33.3 %")
    assert "33.3 % correct (target 100 %: 1 wrong, 1 errors)" in sweep.headline(rows)
    sweep.write(rows, type("Args", (), {"steps": 20})(), tmp_path / "cov")
    text = (tmp_path / "cov.md").read_text()
    shown = table(text)
    assert [r["arch"] for r in shown] == ["a", "b", "c"]            # d was not built: listed below
    assert row(shown, arch="b") == {
        "arch": "b", "status": "WRONG", "sites rewritten / found": "4 / 4", "none == eager": "yes",
        "compressed layers": "0 / 2", "kv %": "100", "logits err": "0.000", "graphs": "2",
        "fallbacks / reason": "report and run disagree"}
    assert row(shown, arch="c")["status"] == "error"
    assert row(shown, arch="c")["fallbacks / reason"] == "RuntimeError: boom"
    assert "- d: encoder-decoder" in text
