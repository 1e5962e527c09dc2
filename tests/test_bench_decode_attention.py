"""benchmarks/decode_attention.py end to end on the CPU: the CPU kernel's
timed grid (small shapes: this checks the script, its byte accounting and its
verdict), the GPU path under the Triton interpreter (its latencies mean
nothing; this checks the script a GPU session will run) and the byte model."""
import pytest

import decode_attention as bench
from rendered import row, table

SHAPE = ["--shapes", "4/2/64", "--context", "400"]


def test_cpu_run_times_the_kernel_against_sdpa_and_gives_a_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CPU_TARGETS", [(4, 400, 1.0), (2, 400, 1.5)])
    bench.main(SHAPE + ["--shapes", "4/2/64", "6/3/32", "--device", "cpu", "--batch", "1",
                        "--methods", "kivi", "gear", "--bits", "4", "--iters", "2", "--warmup", "0",
                        "--cold-mb", "1", "--out", str(tmp_path)])
    text = (tmp_path / "decode_attention_cpu.md").read_text()
    rows = table(text)
    assert [r["method"] for r in rows if r["shape"] == "6/3/32"] == [
        "fp32 sdpa (default)", "kivi", "decompress+sdpa kivi", "gear", "decompress+sdpa gear"]
    assert {r["timing"] for r in rows} == {"eager"}
    # 2 MB of dense K/V per layer at most: cold runs cycle through several layers
    assert all(int(r["layers"]) >= 2 for r in rows)
    gear = row(rows, method="gear", shape="4/2/64")
    assert gear["GEAR +%"].startswith(("+", "-")) and float(gear["us"]) > 0
    assert float(gear["ceiling"]) > 2 and float(gear["GB/s"]) > 0
    assert "## Targets (issue 10, CPU)" in text
    assert "- 4/2/64 batch 1 gear-4 at 400: x" in text and "vs decompress+SDPA" in text
    assert (tmp_path / "decode_attention_cpu.png").stat().st_size > 0


def test_timed_run_on_the_interpreter_writes_table_plot_and_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TARGET", dict(bench.TARGET, batch=1, context=400))
    bench.main(SHAPE + ["--device", "interpret", "--batch", "1", "--methods", "kivi", "gear",
                        "--bits", "2", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)])
    text = (tmp_path / "decode_attention_interpreter.md").read_text()
    assert "NOT a measurement" in text
    rows = table(text)
    assert {r["timing"] for r in rows} == {"eager"}      # no CUDA graphs on the CPU
    assert [r["method"] for r in rows] == [
        "fp16 sdpa (default)", "kivi", "decompress+sdpa kivi", "gear", "decompress+sdpa gear"]
    assert row(rows, method="gear")["GEAR +%"].startswith(("+", "-"))    # GEAR time over its kivi backbone
    # compressed bytes allow a speedup; decompress+sdpa moves more than FP16
    assert float(row(rows, method="kivi")["ceiling"]) > 4
    assert float(row(rows, method="decompress+sdpa kivi")["ceiling"]) < 1
    assert "## Targets at batch 1, context 400" in text
    assert "- 4/2/64 kivi 2-bit: x" in text and "target >= x5" in text
    assert "GEAR terms" in text
    assert (tmp_path / "decode_attention_interpreter.png").stat().st_size > 0


def test_byte_model_scales_with_batch_and_ranks_methods():
    rows = {(r["batch"], r["method"], r["bits"]): r
            for r in bench.bytes_model(bench.parse_args(SHAPE + ["--bytes-only", "--batch", "1", "4"]))}
    assert rows[(1, "none", 16)]["moved"] / rows[(1, "none", 16)]["dense"] == pytest.approx(1.0, abs=1e-3)
    for key in [("kivi", 2), ("gear", 2), ("kcvt", 4), ("gear", 4)]:
        one, four = rows[(1, *key)], rows[(4, *key)]
        for part in ("k", "v"):
            assert four[part] == 4 * one[part]
        assert four["ceiling"] == pytest.approx(one["ceiling"])
    ceiling = {k: rows[(1, *k)]["ceiling"] for k in [("kivi", 2), ("gear_l", 2), ("gear", 2)]}
    assert ceiling[("kivi", 2)] > ceiling[("gear_l", 2)] > ceiling[("gear", 2)] > 2


def test_options_reach_the_gear_methods_only(tmp_path):
    # no low rank and no outliers: GEAR stores exactly its backbone
    bench.main(SHAPE + ["--bytes-only", "--batch", "1", "--methods", "kivi", "gear", "--bits", "2",
                        "--option", "outlier_ratio=0", "--option", "rank_prefill=0",
                        "--option", "rank_decode=0", "--prefix", "plain_", "--out", str(tmp_path)])
    text = (tmp_path / "plain_decode_attention_bytes.md").read_text()
    assert "option overrides: {'outlier_ratio': 0" in text
    assert row(table(text), method="gear")["GEAR +%"] == "+0"


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


def test_launch_sweep_checks_every_launch_against_the_reference(tmp_path):
    import decode_attention_sweep as sweep

    rows = sweep.main(["--device", "interpret", "--shape", "4/2/64", "--batch", "1", "--context", "300",
                       "--methods", "kcvt:4", "gear:2", "--tiles", "32", "64", "--splits", "0", "3",
                       "--iters", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert [(r["method"], r["tile"], r["splits"]) for r in rows] == [
        (m, t, s) for m in ("kcvt:4", "gear:2") for t in (32, 64) for s in ("default", 3)]
    assert all(r["err"] < 1e-2 and r["us"] > 0 for r in rows)     # fp16 outputs
    assert (tmp_path / "decode_attention_sweep_interpreter.md").exists()
    with pytest.raises(ValueError, match=r"tile_config.tile must be one of \[32, 64, 128\].*got 16"):
        sweep.main(["--device", "interpret", "--shape", "4/2/64", "--batch", "1", "--context", "300",
                    "--methods", "gear:2", "--tiles", "16", "--splits", "0", "--iters", "1", "--warmup", "0",
                    "--out", str(tmp_path)])
