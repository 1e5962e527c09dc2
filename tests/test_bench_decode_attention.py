"""benchmarks/decode_attention.py end to end on the CPU: the CPU kernel's
timed grid (small shapes: this checks the script, its byte accounting and its
verdict), the GPU path under the Triton interpreter (its latencies mean
nothing; this checks the script a GPU session will run) and the byte model."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import decode_attention as bench  # noqa: E402

SHAPE = ["--shapes", "4/2/64", "--context", "400"]


def table(text: str) -> list[dict]:
    """The rows of a results file's table, as dicts keyed by its header."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]))) for line in lines[1:]]


def test_cpu_run_times_the_kernel_against_sdpa_and_gives_a_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CPU_TARGETS", [(4, 400, 1.0), (2, 400, 1.5)])
    bench.main(SHAPE + ["--shapes", "4/2/64", "6/3/32", "--device", "cpu", "--batch", "1",
                        "--methods", "kcvt", "gear", "--bits", "4", "--iters", "2", "--warmup", "0",
                        "--cold-mb", "1", "--out", str(tmp_path)])
    text = (tmp_path / "decode_attention_cpu.md").read_text()
    rows = table(text)
    assert [r["method"] for r in rows if r["shape"] == "6/3/32"] == [
        "fp32 sdpa (default)", "kcvt", "dequantize+sdpa kcvt", "gear", "dequantize+sdpa gear"]
    assert {r["timing"] for r in rows} == {"eager"}
    # 2 MB of dense K/V per layer at most: cold runs cycle through several layers
    assert all(int(r["layers"]) >= 2 for r in rows)
    gear = next(r for r in rows if r["method"] == "gear" and r["shape"] == "4/2/64")
    assert gear["GEAR +%"].startswith(("+", "-")) and float(gear["us"]) > 0
    assert float(gear["ceiling"]) > 2 and float(gear["GB/s"]) > 0
    assert "## Targets (issue 10, CPU)" in text
    assert "- 4/2/64 batch 1 gear-4 at 400: x" in text and "vs dequantize+SDPA" in text
    assert (tmp_path / "decode_attention_cpu.png").stat().st_size > 0


def test_timed_run_on_the_interpreter_writes_table_plot_and_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TARGET", dict(bench.TARGET, batch=1, context=400))
    bench.main(SHAPE + ["--device", "interpret", "--batch", "1", "--methods", "kivi", "gear",
                        "--bits", "2", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)])
    text = (tmp_path / "decode_attention_interpreter.md").read_text()
    assert "NOT a measurement" in text
    rows = table(text)
    assert {r["timing"] for r in rows} == {"eager"}      # no CUDA graphs on the CPU
    assert rows[0]["method"].startswith("fp16 sdpa") and [r["method"] for r in rows[1:]] == [
        "kivi", "dequantize+sdpa kivi", "gear", "dequantize+sdpa gear"]
    assert rows[3]["GEAR +%"].startswith(("+", "-"))    # GEAR time over its kivi backbone
    # compressed bytes allow a speedup; dequantize+sdpa moves more than FP16
    assert float(rows[1]["ceiling"]) > 4 and float(rows[2]["ceiling"]) < 1
    assert "## Targets at batch 1, context 400" in text
    assert "- 4/2/64 kivi 2-bit: x" in text and "target >= x5" in text
    assert "GEAR terms" in text
    assert (tmp_path / "decode_attention_interpreter.png").stat().st_size > 0


def test_byte_model_scales_with_batch_and_ranks_methods(tmp_path):
    bench.main(SHAPE + ["--bytes-only", "--batch", "1", "4", "--out", str(tmp_path)])
    rows = {(int(r["batch"]), r["method"], int(r["bits"])): r
            for r in table((tmp_path / "decode_attention_bytes.md").read_text())}
    assert float(rows[(1, "none", 16)]["% of FP16"]) == pytest.approx(100.0, abs=0.1)
    for key in [("kivi", 2), ("gear", 2), ("kcvt", 4), ("gear", 4)]:
        one, four = rows[(1, *key)], rows[(4, *key)]
        for col in ("K MB", "V MB"):
            assert float(four[col]) == pytest.approx(4 * float(one[col]), rel=0.02)
        assert float(four["ceiling"]) == pytest.approx(float(one["ceiling"]), rel=0.01)
    ceiling = {k: float(rows[(1, *k)]["ceiling"]) for k in [("kivi", 2), ("gear_l", 2), ("gear", 2)]}
    assert ceiling[("kivi", 2)] > ceiling[("gear_l", 2)] > ceiling[("gear", 2)] > 2


def test_options_reach_the_gear_methods_only(tmp_path):
    # no low rank and no outliers: GEAR stores exactly its backbone
    bench.main(SHAPE + ["--bytes-only", "--batch", "1", "--methods", "kivi", "gear", "--bits", "2",
                        "--option", "outlier_ratio=0", "--option", "rank_prefill=0",
                        "--option", "rank_decode=0", "--prefix", "plain_", "--out", str(tmp_path)])
    text = (tmp_path / "plain_decode_attention_bytes.md").read_text()
    assert "option overrides: {'outlier_ratio': 0" in text
    gear = [r for r in table(text) if r["method"] == "gear"]
    assert gear and gear[0]["GEAR +%"] == "+0"


@pytest.mark.parametrize("option, message", [("rank_prefill", "KEY=JSON"),
                                             ("outlier_ratio=2", "outlier_ratio")])
def test_bad_options_are_refused_before_any_work(option, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(SHAPE + ["--option", option])
    assert message in capsys.readouterr().err


def test_time_budget_stops_the_grid_between_shapes(tmp_path):
    bench.main(SHAPE + ["--device", "interpret", "--batch", "1", "2", "--methods", "kivi", "--bits", "2",
                        "--iters", "1", "--warmup", "0", "--max-seconds", "0", "--out", str(tmp_path)])
    rows = table((tmp_path / "decode_attention_interpreter.md").read_text())
    assert {r["batch"] for r in rows} == {"1"} and "kivi" in [r["method"] for r in rows]


def test_context_must_exceed_the_decoded_tokens():
    with pytest.raises(SystemExit):
        bench.parse_args(["--context", str(bench.DECODE)])


@pytest.mark.parametrize("shape, message", [("32-8-128", "expected HQ/HKV/D"),
                                            ("6/4/64", "not a multiple of 4 KV heads")])
def test_bad_shapes_are_refused_naming_the_value(shape, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", shape])
    assert message in capsys.readouterr().err
