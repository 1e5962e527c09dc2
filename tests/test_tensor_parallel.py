"""The gear backend under tensor parallelism (transformers' tp_plan="auto"
on torch.distributed, 2 CPU ranks on gloo, launched by torchrun).

Specification: every rank rewrites its own heads; method none generates
exactly the eager tensor-parallel tokens over 100 decode steps, and the same
beams under beam search; GEAR 4-bit holds on each rank the single-process
cache's bytes divided by the ranks (within 5 %) and, fed the eager tokens,
its logits stay close to eager TP's at every step.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import gear_compile
from gear_compile.hf_compat import cache_of
from gear_compile.models import tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT, STEPS, RANKS = 150, 100, 2


def tiny_llama():
    return tiny_model("llama", hidden_size=256, intermediate_size=256)


def single_process_gear_bytes() -> int:
    model = gear_compile.compile(tiny_llama(), method="gear", bits=4, inductor=False)
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    return gear_compile.kv_bytes(cache_of(out))


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    tiny_llama().save_pretrained(root / "model")
    out = root / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
           "--standalone", os.path.join(HERE, "tp_worker.py"), str(root / "model"), str(out),
           str(PROMPT), str(STEPS)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_method_none_generates_the_eager_tensor_parallel_tokens(tp_run):
    assert tp_run["local_kv_heads"] == 1                    # 2 KV heads over 2 ranks
    assert tp_run["none_compressed"]
    assert len(tp_run["eager"]) == STEPS and tp_run["none"] == tp_run["eager"]


def test_beam_search_under_tensor_parallelism_equals_eager(tp_run):
    assert tp_run["beams_none"] == tp_run["beams_eager"]


def test_gear_shards_the_cache_bytes_and_stays_close_to_eager(tp_run):
    single = single_process_gear_bytes()
    for rank_bytes in tp_run["gear_kv_bytes"]:
        assert abs(rank_bytes - single / RANKS) <= 0.05 * single / RANKS, (rank_bytes, single)
    assert tp_run["gear_logits_error"] < 0.1, tp_run         # the largest over 100 teacher-forced steps
