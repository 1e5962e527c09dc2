"""`gear-compile inspect`: the console script reports every site and writes the diff."""
import subprocess

from gear_compile.graph_diff import NOTE


def test_inspect_writes_the_graph_diff_for_the_builtin_model(tmp_path):
    out = tmp_path / "gear.diff"
    result = subprocess.run(["gear-compile", "inspect", "--model", "gpt2", "--method", "kivi",
                             "--bits", "2", "--group-size", "16", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformer.h.1.attn" in result.stdout and "rewritten" in result.stdout
    text = out.read_text()
    lines = text.splitlines()      # layer 1's rewrite is layer 0's: abridged, and says so first
    assert lines[0] == NOTE and lines[1].startswith("# graph") and "+++ graph_1_after.py" in lines
    assert "torch.ops.gear.attention_cpu" in text


def test_inspect_rejects_an_unknown_method():
    result = subprocess.run(["gear-compile", "inspect", "--method", "fp3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'fp3'" in result.stderr
