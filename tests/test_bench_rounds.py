"""benchmarks/rounds.py: the medians, ranges and per-round ratios that the
interleaved benchmarks (generate_memory.py, serve.py) report."""
from rounds import summary


def _rows(pairs, **extra):
    return [dict(method=m, round=i // 2 + 1, peak=p, **extra) for i, (m, p) in enumerate(pairs)]


def test_medians_and_each_rounds_own_ratio():
    rows = _rows([("dense", 500), ("gear4", 260), ("dense", 700), ("gear4", 250), ("dense", 600), ("gear4", 400)])
    table = summary(rows, "peak", "peak MiB")
    assert "| gear4 | 3 | 260 | 250-400 | 0.43 | 0.52, 0.36, 0.67 |" in table, table
    assert "| dense | 3 | 600 | 500-700 | 1.00 | 1.00, 1.00, 1.00 |" in table, table


def test_groups_pair_a_run_with_its_own_groups_baseline():
    """Per budget: a method is divided by the baseline of its budget and round, not another budget's."""
    rows = (_rows([("dense", 10.0), ("gear4", 15.0), ("dense", 12.0), ("gear4", 24.0)], budget=256.0)
            + _rows([("dense", 20.0), ("gear4", 20.0)], budget=512.0))
    table = summary(rows, "peak", "tok/s", group="budget", fmt=".1f")
    assert "| 256 | gear4 | 2 | 19.5 | 15.0-24.0 | 1.77 | 1.50, 2.00 |" in table, table
    assert "| 512 | gear4 | 1 | 20.0 | 20.0-20.0 | 1.00 | 1.00 |" in table, table


def test_no_baseline_reads_as_a_dash():
    table = summary(_rows([("gear4", 1), ("gear2", 2)]), "peak", "peak MiB")
    assert "| gear4 | 1 | 1 | 1-1 | - | - |" in table, table
