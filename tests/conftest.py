"""Shared test set-up, in the one place pytest reads before any test module:

- TRITON_INTERPRET=1 unless the user set it, so that the Triton kernels run on
  the interpreter on a CPU; it must be in the environment before triton is
  first imported, which is why it is set here, at import;
- benchmarks/ on sys.path, so a test imports a benchmark script by its module
  name (`import decode_attention as bench`), the same way in every module;
- deterministic seeds and a clean Dynamo state per test.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
