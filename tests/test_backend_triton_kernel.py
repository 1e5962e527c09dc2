"""The Triton decode kernel inside compiled graphs, on a CPU under the
interpreter: the backend routes single-token decode attention to it with
kernel="triton", and the logits match the torch reference path."""
import os

import pytest
import torch

import gear_compile
from gear_compile.models import tiny_model

from decoding import decode_logits


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs TRITON_INTERPRET=1 before triton is imported")
@pytest.mark.parametrize("method,bits", [("gear", 4), ("kivi", 2)])
def test_triton_kernel_in_the_graph_matches_the_torch_path(method, bits):
    options = dict(method=method, bits=bits, inductor=False, group_size=8, buffer_size=8)
    reference, _ = decode_logits(gear_compile.compile(tiny_model("llama"), kernel="torch", **options), 12)
    torch._dynamo.reset()
    report = gear_compile.explain(tiny_model("llama"), torch.randint(0, 256, (1, 11)),
                                  kernel="triton", **options)
    assert "gear.attention_triton_interpreted" in report.diff()
    torch._dynamo.reset()
    got, _ = decode_logits(gear_compile.compile(tiny_model("llama"), kernel="triton", **options), 12)
    torch.testing.assert_close(got, reference, rtol=2e-3, atol=2e-3)
