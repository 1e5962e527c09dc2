"""benchmarks/gpu_check.py and the end-to-end CUDA-graph grid of
generate_throughput.py, on the parts that run without a GPU: the commands it
would run, the join of a measured cell with kernel_model's predictions, and
the largest-batch estimate from two measured peaks."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

MEASURED = """
| shape | batch | context | method | bits | layers | timing | us | eager us | GB/s | % peak | ceiling | speedup | GEAR +% |
|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|
| 32/8/128 | 16 | 32768 | fp16 sdpa (CUDNN_ATTENTION) | 16 | 1 | graph | 699.7 |  | 3.07e+03 | 92% | 1.00 | 1.00 |  |
| 32/8/128 | 16 | 32768 | kcvt | 4 | 1 | graph | 200.0 | 250.0 | 2.77e+03 | 83% | 3.87 | 3.50 |  |
| 32/8/128 | 16 | 32768 | decompress+sdpa kcvt | 4 | 1 | eager | 29788.1 |  | 163 | 5% | 0.44 | 0.02 |  |
| 32/8/128 | 16 | 32768 | gear | 2 | 1 | graph | 300.0 | 320.0 | 1e+03 | 30% | 5.21 | 2.33 | +50 |
"""
PREDICTED = """
# header
| method | bits | predicted us | predicted x SDPA | target |
|---|---:|---:|---:|---|
| kcvt | 4 | 250 | 2.79 | >= x3: MISSED |
| kivi | 2 | 150 | 4.65 | >= x5: MISSED |
"""


def test_the_cell_is_joined_with_the_prediction_of_its_method_and_bits():
    import gpu_check
    rows = gpu_check.joined_cell(MEASURED, PREDICTED)
    body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    # SDPA and decompress+SDPA rows are not the kernel's; gear 2 has no prediction
    assert body == [["kcvt", "4", "200", "3.50", "250", "2.79", "0.80"],
                    ["gear", "2", "300", "2.33", "", "", ""]]


def test_the_dry_run_lists_the_steps_in_the_issue_order_within_8_minutes():
    import gpu_check
    steps = gpu_check.main(["--dry-run"])
    assert [s.name for s in steps] == ["warm", "tests", "cell", "sweep", "e2e"]
    assert sum(s.limit_s for s in steps) <= 8 * 60
    cell = next(s for s in steps if s.name == "cell").command
    assert cell[cell.index("--batch") + 1] == "16" and cell[cell.index("--context") + 1] == "32768"
    e2e = next(s for s in steps if s.name == "e2e").command
    assert "--graphs" in e2e and int(e2e[e2e.index("--gpu-prompt") + 1]) >= 8192


def test_the_serving_step_runs_only_when_named():
    """Issue 31's GPU mode: serve.py --gpu with dense beside GEAR-4, outside the default 8 minutes."""
    import gpu_check
    (serve,) = gpu_check.main(["--dry-run", "--steps", "serve"])
    assert serve.command[1] == "benchmarks/serve.py" and "--gpu" in serve.command
    methods = serve.command[serve.command.index("--methods") + 1:serve.command.index("--out")]
    assert methods == ["dense", "gear4"] and serve.limit_s <= 8 * 60


@pytest.mark.parametrize("runs,fit", [
    # peak = 2 GiB fixed + 0.5 GiB a sequence: 80 GiB holds (80 - 2) / 0.5 = 156
    ([dict(batch=1, oom=False, peak_gib=2.5), dict(batch=40, oom=False, peak_gib=22.0)], 156),
    ([dict(batch=1, oom=False, peak_gib=2.5), dict(batch=40, oom=True)], None),     # one point: no line
])
def test_the_largest_batch_is_read_off_the_line_through_two_peaks(runs, fit):
    import generate_throughput
    assert generate_throughput.largest_fit(dict(runs=runs, device_gib=80.0)) == fit
