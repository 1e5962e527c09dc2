"""The Triton decode kernel inside compiled graphs: the backend routes
single-token decode attention to it with kernel="triton" (on a CPU under the
interpreter) or by default on a GPU (compiled, inside Inductor's output), and
the logits match the torch reference path."""
import os

import pytest
import torch

import gear_compile
from gear_compile.models import tiny_model

from decoding import PROMPT, decode_logits


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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("method,bits,dtype", [("gear", 4, torch.float16), ("kivi", 2, torch.float32)])
def test_triton_kernel_compiled_for_the_gpu_matches_the_torch_path(method, bits, dtype):
    options = dict(method=method, bits=bits, group_size=8, buffer_size=8)
    ids = PROMPT.cuda()

    def model():
        return tiny_model("llama").to("cuda", dtype)
    reference, _ = decode_logits(gear_compile.compile(model(), kernel="torch", **options), 12, ids)
    torch._dynamo.reset()
    assert "gear.attention_triton" in gear_compile.explain(model(), ids, **options).diff()
    torch._dynamo.reset()
    got, _ = decode_logits(gear_compile.compile(model(), **options), 12, ids)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, reference, rtol=tol, atol=tol)
