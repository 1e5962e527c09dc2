"""The Triton paged decode kernel (kernels/paged_decode.py, called by
`paged_attention.attend_triton`) against the torch reference
(`paged_attention.attend`) over the same pool: varlen decode rows (no past,
a tail only, a whole page and no tail, many pages split over programs) with
a prefill chunk with a past beside them (a row per token), pages scattered
through the pool, the exact sinks, GQA 1 / 3 / 4, every codec family the
pool holds (exact, KIVI, KCVT, per-token, GEAR's low rank and outliers,
including K-record tiles that overflow their window), the model dtypes.
Run by the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1)
or compiled on a GPU where one is visible and TRITON_INTERPRET=0.

Bounds: `pages.TOL`, the store kernel's tests' (the kernel rounds the
dequantized tile and p to the query dtype before each tl.dot, as the store
kernel does)."""
import os

import pytest
import torch

from gear_compile.paged_attention import attend, block_table

import pages
from pages import L

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")


def scattered_pool(*args, **kwargs):
    return pages.scattered_pool(*args, device=DEVICE, **kwargs)


def compare(pool, rows, Hq, dtype, gen, layer=1):
    return pages.compare(pool, rows, Hq, dtype, gen, "triton", layer, DEVICE)


# (method, bits, H, Hq, D): every codec family, GQA 1 / 3 / 4, the GPU models' head dim 128
CASES = [("gear", 4, 2, 6, 64), ("gear", 2, 1, 4, 64), ("kivi", 2, 3, 3, 64), ("kivi", 4, 2, 8, 64),
         ("gear_l", 4, 2, 8, 64), ("kcvt", 4, 2, 6, 64), ("kcvt", 2, 1, 3, 64), ("per_token", 4, 2, 4, 64),
         ("none", 4, 2, 6, 32), ("gear", 4, 2, 8, 128)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_rows_of_every_length_beside_a_prefill_chunk(case):
    method, bits, H, Hq, D = case
    gen = torch.Generator().manual_seed(0)
    pool = scattered_pool(H, D, torch.float32, [0, 0, 0, 0, 0, 0, 0], gen, method=method, bits=bits)
    n = pool.page_tokens
    lengths = [5, n, n + 1, 2 * n - 1, 6 * n + 7, 3 * n + 2]
    for i, m in enumerate(lengths):                          # r1..r6 (r0: no past at all)
        pool.free(f"r{i + 1}")
        assert pool.reserve(f"r{i + 1}", m)
    pool.commit([(f"r{i + 1}", m) for i, m in enumerate(lengths)],
                torch.randn(L, 2, H, sum(lengths), D, generator=gen).to(DEVICE))
    assert pool.reserve("r0", 0)
    assert len(pool.pages("r5")) == 6 and pool.tail_tokens("r2") == 0 and pool.tail_tokens("r1") == 5
    rows = [("r1", 1), ("r0", 1), ("r2", 1), ("r6", 9), ("r3", 1), ("r4", 1), ("r5", 1)]
    compare(pool, rows, Hq, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,bits", [("gear", 4), ("kivi", 2)])
def test_model_dtypes(dtype, method, bits):
    gen = torch.Generator().manual_seed(1)
    pool = scattered_pool(2, 64, dtype, [200, 70, 3 * 64], gen, method=method, bits=bits)
    compare(pool, [("r0", 1), ("r1", 1), ("r2", 1)], 6, dtype, gen)


def test_sinks_shadow_the_first_page():
    """The first page's first s places hold copies of token s; the kernel
    reads the exact sinks there instead. Changing what the sinks hold moves
    the kernel's output exactly as it moves the reference's."""
    gen = torch.Generator().manual_seed(2)
    pool = scattered_pool(2, 64, torch.float32, [150, 300], gen, method="gear", bits=4)
    assert pool.sink_tokens > 0
    rows = [("r0", 1), ("r1", 1)]
    before = compare(pool, rows, 4, torch.float32, torch.Generator().manual_seed(9))
    pool.sink.mul_(3.0)
    after = compare(pool, rows, 4, torch.float32, torch.Generator().manual_seed(9))
    assert (after - before).abs().max() > 1e-3


def test_prefill_chunk_with_a_past_is_causal():
    """A 70-token chunk with a past (a row per token, the chunk's tokens
    [0, t] attended: several 16-token tiles of them) beside a decode
    row; the chunk's last tokens changed leave its first tokens' outputs as
    they were (nothing attends ahead)."""
    gen = torch.Generator().manual_seed(7)
    pool = scattered_pool(1, 64, torch.float32, [150, 64], gen, method="kivi", bits=2)
    rows = [("r0", 70), ("r1", 1)]
    q = torch.randn(1, 4, 71, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 1, 71, 64, generator=gen).to(DEVICE) for _ in range(2))
    table = block_table(pool, rows, device=DEVICE)
    assert not table.prefill[0].fresh
    want = attend(pool, 0, table, q, k, v, 0.125)
    got = attend(pool, 0, table, q, k, v, 0.125, kernel="triton")
    assert (got - want).abs().max().item() < 1e-5
    k2 = k.clone()
    k2[:, :, 40:70] += 1.0
    again = attend(pool, 0, table, q, k2, v, 0.125, kernel="triton")
    assert torch.equal(again[:40], got[:40]) and not torch.equal(again[40:70], got[40:70])


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_split_count_does_not_change_the_result(splits):
    """One long row's pages over 1, 3 or 7 programs, merged by log-sum-exp."""
    from gear_compile.kernels.paged_decode import paged_decode
    gen = torch.Generator().manual_seed(4)
    pool = scattered_pool(1, 64, torch.float32, [9 * 64 + 9, 70], gen, method="kivi", bits=2)
    rows = [("r0", 1), ("r1", 1)]
    q = torch.randn(1, 4, 2, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 1, 2, 64, generator=gen).to(DEVICE) for _ in range(2))
    table = block_table(pool, rows, device=DEVICE)
    want = attend(pool, 0, table, q, k, v, 0.125)
    ptr, ids, info = (t.to(DEVICE) for t in table.decode_kernel)
    got = paged_decode(pool, 0, q[0].transpose(0, 1), k[0], v[0], ptr, ids, info, 9, 0.125, num_splits=splits)
    assert (got - want).abs().max().item() < 1e-5


def test_k_records_that_overflow_their_window():
    """GEAR with 512-token blocks at d 64: a block is four 128-token tiles,
    each reading a window of K outlier records (1.5x the block's mean,
    a power of two) smaller than the block's; K whose outliers all lie in a
    block's first tile overflow it, and the overflow programs read them
    (none is dropped)."""
    gen = torch.Generator().manual_seed(6)
    H, D = 1, 64
    n = 512
    total = 2 * n + 3
    kv = torch.randn(L, 2, H, total, D, generator=gen)
    kv[:, 0, :, 5:45] *= 8.0                  # every channel's largest values in first-tile tokens
    kv[:, 0, :, n + 5:n + 20] *= 8.0
    pool = scattered_pool(H, D, torch.float32, [total], gen, budget=24_000_000, kv=kv, method="gear", bits=4,
                          buffer_size=n)
    assert pool.page_tokens == n
    from gear_compile.kernels.paged_decode import kernel_consts, overflow
    consts, _ = kernel_consts(pool, torch.float32, 4, INTERPRET)
    assert overflow(consts) and consts["D_KC"] < pool.slabs["k"].out_val.shape[-1]    # the block's records
    ptr = pool.slabs["k"].out_ptr[pool.pages("r0")[0] * L + 1, 0, 0]    # layer 1, page 0: first tile's records
    assert (ptr[128 // 16] - ptr[0]).item() > consts["D_KC"]
    compare(pool, [("r0", 1)], 4, torch.float32, gen)


def test_refusals():
    from gear_compile import serving
    from gear_compile.kernels.paged_decode import paged_decode
    gen = torch.Generator().manual_seed(5)
    pool = scattered_pool(2, 64, torch.float32, [150], gen, method="gear", bits=4)
    q = torch.randn(1, 4, 64).to(DEVICE)
    k = torch.randn(2, 1, 64).to(DEVICE)
    table = block_table(pool, [("r0", 1)], device=DEVICE)
    ptr, ids, info = (t.to(DEVICE) for t in table.decode_kernel)
    with pytest.raises(ValueError, match="layer 2 of 2"):
        paged_decode(pool, L, q, k, k, ptr, ids, info, 2, 0.125)
    with pytest.raises(ValueError, match="query heads"):
        paged_decode(pool, 0, q[:, :3], k, k, ptr, ids, info, 2, 0.125)
    assert serving._kernel("auto", "cuda") == "triton" and serving._kernel("torch", "cuda") == "torch"
    if INTERPRET:
        assert serving._kernel("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="kernel must be"):
        serving._kernel("cuda", "cpu")


# ---- the kernel compiled for an H100 (sm_90a) without a GPU ----------------
# Each codec's launch (head dim 128, fp16 queries, GQA 4) built with Triton's pipeline and bundled
# ptxas in a subprocess (TRITON_INTERPRET unset) and read by benchmarks/kernel_sass.py, as
# tests/test_kernel_sm90_build.py does for the store kernel: ~1 min cold on 2 cores.
SM90_SPILLS = {"paged-gear2-d128-fp16":
               "GEAR-2 (low rank, K records, V outliers): 255 registers and a 32-byte stack: 14 local "
               "loads / stores, none in a tile loop, two at the head of the page loop (once a page)"}
_SM90 = {}


def _sm90_reports() -> dict:
    if not _SM90:
        import json
        import subprocess
        import sys
        from pathlib import Path
        root = Path(__file__).resolve().parents[1]
        code = ("import json, sys, torch; sys.path.insert(0, 'benchmarks'); import kernel_sass; "
                "from gear_compile.kernels.paged_decode import sm90_build_specs; "
                "print(json.dumps(kernel_sass.as_json(kernel_sass.reports("
                "sm90_build_specs(q_dtypes=(torch.float16,))))))")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             timeout=1800)
        assert run.returncode == 0, run.stderr[-4000:]
        _SM90.update(json.loads(run.stdout.strip().splitlines()[-1]))
    return _SM90


def _sm90_names():
    from gear_compile.kernels.paged_decode import BUILD_METHODS
    return [f"paged-{m}{b}-d128-fp16" for m, b in BUILD_METHODS]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=SM90_SPILLS[n])]
                                               if n in SM90_SPILLS else []) for n in _sm90_names()])
def test_builds_for_sm90a_without_spilling(name):
    pytest.importorskip("triton.backends.nvidia")
    r = _sm90_reports()[name]
    assert not isinstance(r, str), f"{name} does not build for sm_90a: {r}"
    assert r["shared_bytes"] <= 227 * 1024
    assert r["main_loop"]["local"] == 0, f"{name}: the main loop spills"
    assert r["stack_bytes"] == 0 and r["local_ops"] == 0, \
        f"{name}: {r['regs']} registers, a {r['stack_bytes']}-byte stack, {r['local_ops']} local loads / stores"


def test_served_tokens_equal_the_reference_kernels(monkeypatch):
    """transformers' continuous batching over the pool with kernel="triton"
    (decode rows and prefill chunks with a past by this kernel) gives the
    tokens of kernel="torch": a tiny fp32 Llama, GEAR-4, prompts longer
    than a page beside short ones, chunked prefill beside decode rows."""
    from transformers import GenerationConfig

    from gear_compile import hf_compat, serving
    from test_serving import cb_config, prompts, tiny_llama, tokens
    if not INTERPRET:
        pytest.skip("the tiny model runs on the CPU: under the interpreter only")
    if hf_compat.serving_unsupported():
        pytest.skip(hf_compat.serving_unsupported())
    from gear_compile.kernels import paged_decode
    calls = []
    original = paged_decode.paged_decode
    monkeypatch.setattr(paged_decode, "paged_decode", lambda *a, **k: calls.append(a[2].shape[0]) or original(*a, **k))
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    inputs = prompts((70, 9, 140))
    out = {}
    for kernel in ("torch", "triton"):
        model = serving.enable(tiny_llama(peaked=4.0), kv_budget_bytes=2_000_000, method="gear", bits=4,
                               kernel=kernel)
        out[kernel] = tokens(model.generate_batch(inputs, generation_config=gen,
                                                  continuous_batching_config=cb_config()))
        assert model._gear_paged_pool.whole()
    assert out["triton"] == out["torch"]
    assert len(calls) >= 2 * 5 and 3 in calls       # every layer's rows, the three decode rows at once
