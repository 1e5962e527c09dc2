"""benchmarks/generate_throughput.py: the report and its verdict from given
rows (default suite), the GPU mode's code path on a tiny model on the CPU,
and a small real CPU run (slow)."""
import json

import pytest

import generate_throughput as bench
from rendered import row as table_row, table


def row(method, tok_s, batch=1, prompt=1024, startup=100.0, rss=200.0, kv=10.0, graphs=2):
    return dict(method=method, batch=batch, prompt=prompt, new_tokens=8, tok_s=tok_s,
                alone_tok_s=tok_s, prefill_s=1.0, first_step_s=1.0, startup_s=startup,
                rss_mib=rss, kv_mib=kv, graphs=graphs)


def test_the_verdict_compares_gear4_with_the_faster_dense_run_and_the_peer(tmp_path):
    rows = [row("dense-eager", 10.0), row("dense-inductor", 12.0, startup=100.0),
            row("gear4", 11.0, startup=125.0), row("quanto4", 5.0),
            row("dense-eager", 6.0, prompt=8192), row("dense-inductor", 5.0, prompt=8192),
            row("gear4", 8.4, prompt=8192), row("quanto4", 4.0, prompt=8192)]
    lines = bench.verdict_cpu(rows)
    text = "\n".join(lines)
    assert "batch 1, prompt 1024: GEAR-4 0.92x the faster dense (dense-inductor) (target >= 0.9x: met)" in text
    assert "2.20x QuantizedCache-4 (target >= 2x: met)" in text
    assert "start-up 1.25x dense Inductor's (target <= 1.2x: MISSED)" in text
    assert "prompt 8192: GEAR-4 1.40x the faster dense (dense-eager) (target >= 1.3x: met)" in text
    assert "2.10x QuantizedCache-4" in text


def test_the_memory_target_is_judged_at_8k_batch_4():
    rows = [row("dense-eager", 2.0, batch=4, prompt=8192, rss=1000.0),
            row("gear4", 3.0, batch=4, prompt=8192, rss=300.0)]
    assert "RSS above weights 0.30x dense eager's (target <= 0.4x: met)" in "\n".join(bench.verdict_cpu(rows))


def test_the_report_lists_every_run_and_failures_without_breaking(tmp_path, monkeypatch):
    args = bench.parse_args(["--out", str(tmp_path), "--new-tokens", "8"])
    rows = [row("dense-eager", 10.0), row("gear4", 11.0),
            dict(method="kivi2", batch=1, prompt=1024, new_tokens=8, error="timed out after 5 s")]
    text = bench.write_cpu(args, rows)
    shown = table(text)
    gear = table_row(shown, method="gear4")
    assert (gear["batch"], gear["prompt"], gear["decode tok/s"], gear["vs dense-eager"]) == (
        "1", "1024", "11.00", "1.10x")
    assert table_row(shown, method="kivi2")["decode tok/s"] == "error: timed out after 5 s"
    assert (tmp_path / "generate_throughput_cpu.md").read_text() == text
    assert (tmp_path / "generate_throughput_cpu.png").stat().st_size > 0


def test_side_by_side_rows_alone_report_their_ratio_and_verdict_with_the_lone_columns_blank(tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--side-only", "--prompts", "8192", "--batch", "1"])
    rows = [dict(method=m, batch=1, prompt=8192, tok_s=t)
            for m, t in (("dense-eager", 10.0), ("dense-inductor", 9.0), ("gear4", 12.0))]
    text = bench.write_cpu(args, rows)
    gear = table_row(table(text), method="gear4")
    assert (gear["decode tok/s"], gear["vs dense-eager"], gear["alone tok/s"], gear["RSS +MiB"]) == (
        "12.00", "1.20x", "", "")
    assert "prompt 8192: GEAR-4 1.20x the faster dense (dense-eager) (target >= 1.3x: MISSED)" in text


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "gear9"])
    assert "invalid choice: 'gear9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--new-tokens", "1"])


def test_the_gpu_mode_runs_its_code_on_a_tiny_model_on_the_cpu(tmp_path):
    """Doubling the batch until a limit, dense vs gear, in fresh processes."""
    bench.main(["--gpu", "--device", "cpu", "--gpu-model", "tiny", "--methods", "dense-eager",
                "gear4", "--gpu-prompt", "40", "--gpu-new-tokens", "3", "--max-batch", "2",
                "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "generate_throughput_gpu.json").read_text())
    assert [(r["method"], r["batch"]) for r in rows] == [
        ("dense-eager", 1), ("dense-eager", 2), ("gear4", 1), ("gear4", 2)]
    assert all(not r.get("oom") and "error" not in r and r["tok_s"] > 0 and r["kv_mib"] > 0
               for r in rows)
    assert "- tiny gear4: " in (tmp_path / "generate_throughput_gpu.md").read_text()


@pytest.mark.slow
def test_a_small_cpu_run_measures_every_method_alone_and_side_by_side(tmp_path):
    bench.main(["--prompts", "64", "--batch", "1", "--new-tokens", "4",
                "--methods", "dense-eager", "kivi2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "generate_throughput_cpu.json").read_text())
    assert [r["method"] for r in rows] == ["dense-eager", "kivi2"]
    assert all("error" not in r and r["tok_s"] > 0 and r["alone_tok_s"] > 0 for r in rows)
    assert rows[1]["kv_mib"] < rows[0]["kv_mib"] and rows[1]["graphs"] == 2
