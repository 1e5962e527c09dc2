"""benchmarks/decode_attention.py end to end on the CPU: the timed path under
the Triton interpreter (its latencies mean nothing; this checks the script
that a GPU session will run, its byte accounting and its verdict on the
targets) and the byte model."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import decode_attention as bench  # noqa: E402

SHAPE = ["--q-heads", "4", "--kv-heads", "2", "--head-dim", "64", "--context", "400"]


def test_timed_run_on_the_interpreter_writes_table_plot_and_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TARGET", dict(bench.TARGET, batch=1, context=400))
    bench.main(SHAPE + ["--device", "cpu", "--batch", "1", "--methods", "kivi", "gear",
                        "--bits", "2", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)])
    text = (tmp_path / "decode_attention_interpreter.md").read_text()
    assert "NOT a measurement" in text
    rows = [r.split("|")[1:-1] for r in text.splitlines() if r.startswith("| 1 | 400 |")]
    methods = [r[2].strip() for r in rows]
    assert {r[4].strip() for r in rows} == {"eager"}      # no CUDA graphs on the CPU
    assert methods[0].startswith("fp16 sdpa") and methods[1:] == [
        "kivi", "dequantize+sdpa kivi", "gear", "dequantize+sdpa gear"]
    gear = rows[3]
    assert gear[-1].strip().startswith(("+", "-"))          # GEAR time over its kivi backbone
    # compressed bytes allow a speedup; dequantize+sdpa moves more than FP16
    assert float(rows[1][9]) > 4 and float(rows[2][9]) < 1
    assert "## Targets at batch 1, context 400" in text
    assert "- kivi 2-bit: x" in text and "target >= x5" in text
    assert "GEAR terms" in text
    assert (tmp_path / "decode_attention_interpreter.png").stat().st_size > 0


def test_byte_model_scales_with_batch_and_ranks_methods(tmp_path):
    bench.main(SHAPE + ["--bytes-only", "--batch", "1", "4", "--out", str(tmp_path)])
    rows = {}
    for line in (tmp_path / "decode_attention_bytes.md").read_text().splitlines():
        if line.startswith("| ") and line[2].isdigit():
            c = [x.strip() for x in line.split("|")[1:-1]]
            rows[(int(c[0]), c[2], int(c[3]))] = c
    assert float(rows[(1, "none", 16)][7]) == pytest.approx(100.0, abs=0.1)
    for key in [("kivi", 2), ("gear", 2), ("kcvt", 4), ("gear", 4)]:
        one, four = rows[(1, *key)], rows[(4, *key)]
        for col in (5, 6):                                                    # K, V MB
            assert float(four[col]) == pytest.approx(4 * float(one[col]), rel=0.02)
        assert float(four[8]) == pytest.approx(float(one[8]), rel=0.01)       # ceiling
    ceiling = {k: float(rows[(1, *k)][8]) for k in [("kivi", 2), ("gear_l", 2), ("gear", 2)]}
    assert ceiling[("kivi", 2)] > ceiling[("gear_l", 2)] > ceiling[("gear", 2)] > 2


def test_options_reach_the_gear_methods_only(tmp_path):
    # no low rank and no outliers: GEAR stores exactly its backbone
    bench.main(SHAPE + ["--bytes-only", "--batch", "1", "--methods", "kivi", "gear", "--bits", "2",
                        "--option", "outlier_ratio=0", "--option", "rank_prefill=0",
                        "--option", "rank_decode=0", "--prefix", "plain_", "--out", str(tmp_path)])
    text = (tmp_path / "plain_decode_attention_bytes.md").read_text()
    assert "option overrides: {'outlier_ratio': 0" in text
    gear = [r for r in text.splitlines() if r.startswith("| 1 | 400 | gear | 2 |")]
    assert gear and gear[0].rstrip(" |").endswith("+0")


@pytest.mark.parametrize("option, message", [("rank_prefill", "KEY=JSON"),
                                             ("outlier_ratio=2", "outlier_ratio")])
def test_bad_options_are_refused_before_any_work(option, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(SHAPE + ["--option", option])
    assert message in capsys.readouterr().err


def test_time_budget_stops_the_grid_between_shapes(tmp_path):
    bench.main(SHAPE + ["--device", "cpu", "--batch", "1", "2", "--methods", "kivi", "--bits", "2",
                        "--iters", "1", "--warmup", "0", "--max-seconds", "0", "--out", str(tmp_path)])
    text = (tmp_path / "decode_attention_interpreter.md").read_text()
    assert "| 1 | 400 | kivi |" in text and "| 2 | 400 |" not in text


def test_context_must_exceed_the_decoded_tokens():
    with pytest.raises(SystemExit):
        bench.parse_args(["--context", str(bench.DECODE)])
