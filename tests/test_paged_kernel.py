"""The C++ paged kernel (`gear::paged_attention_cpu`, kernels/cpu_paged_attention.h,
called by `paged_attention.attend_cpu`) against the torch reference
(`paged_attention.attend`) over the same pool: varlen decode rows (no past,
a tail only, whole pages and no tail, many pages split across items), a
prefill chunk with a past beside them, the exact sinks, GQA ratios, every
codec family, the model dtypes, pages scattered through the pool, every
instruction set and thread count.

Bounds: `pages.TOL`, the store kernel's tests'."""
import pytest
import torch

from gear_compile.kernels import cpu
from gear_compile.paged_attention import attend, block_table

import pages
from pages import L, scattered_pool

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel is not built")


def compare(pool, rows, Hq, dtype, gen, layer=1):
    return pages.compare(pool, rows, Hq, dtype, gen, "cpu", layer)


# (method, bits, H, Hq, D): every codec family, GQA 1 / 3 / 4
CASES = [("gear", 4, 2, 6, 64), ("gear", 2, 1, 4, 64), ("kivi", 2, 3, 3, 64), ("gear_l", 4, 2, 8, 64),
         ("kcvt", 4, 2, 6, 64), ("per_token", 4, 2, 4, 64), ("none", 4, 2, 6, 32)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_rows_of_every_length_and_a_prefill_chunk(case):
    method, bits, H, Hq, D = case
    gen = torch.Generator().manual_seed(0)
    pool = scattered_pool(H, D, torch.float32, [0, 0, 5, 0, 0, 0, 0], gen, method=method, bits=bits)
    n = pool.page_tokens
    lengths = [5, n, n + 1, 2 * n - 1, 13 * n + 7, 3 * n + 2]
    for i, m in enumerate(lengths):                          # r1..r6 (r0: no past at all)
        pool.free(f"r{i + 1}")
        assert pool.reserve(f"r{i + 1}", m)
    pool.commit([(f"r{i + 1}", m) for i, m in enumerate(lengths)],
                torch.randn(L, 2, H, sum(lengths), D, generator=gen))
    assert pool.reserve("r0", 0)
    assert len(pool.pages("r5")) == 13 and pool.tail_tokens("r2") == 0 and pool.tail_tokens("r1") == 5
    rows = [("r1", 1), ("r0", 1), ("r2", 1), ("r6", 9), ("r3", 1), ("r4", 1), ("r5", 1)]
    compare(pool, rows, Hq, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_dtypes(dtype):
    gen = torch.Generator().manual_seed(1)
    pool = scattered_pool(2, 64, dtype, [200, 70, 3 * 64], gen, method="gear", bits=4)
    compare(pool, [("r0", 1), ("r1", 4), ("r2", 1)], 6, dtype, gen)


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


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
def test_every_instruction_set(isa):
    try:
        cpu.isa(isa)
    except RuntimeError:
        pytest.skip(f"{isa} not available on this CPU")
    try:
        gen = torch.Generator().manual_seed(3)
        pool = scattered_pool(2, 64, torch.float32, [700, 64, 90], gen, method="gear", bits=2)
        compare(pool, [("r0", 1), ("r1", 1), ("r2", 6)], 6, torch.float32, gen)
    finally:
        cpu.isa("auto")


@pytest.mark.parametrize("threads", [1, 3])
def test_split_plan_does_not_change_the_result(threads):
    """One long row split over several items (the thread count sets how
    many) gives the reference's output."""
    gen = torch.Generator().manual_seed(4)
    pool = scattered_pool(1, 64, torch.float32, [40 * 64 + 9], gen, budget=12_000_000, method="kivi", bits=2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(pool, [("r0", 1)], 4, torch.float32, gen)
    finally:
        torch.set_num_threads(old)


def test_bad_block_table_is_refused():
    gen = torch.Generator().manual_seed(5)
    pool = scattered_pool(2, 64, torch.float32, [150], gen, method="gear", bits=4)
    table = block_table(pool, [("r0", 1)])
    ptr, ids, info = table.decode_kernel
    table.decode_kernel = (ptr, ids + pool.n_pages, info)
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64)
    with pytest.raises(RuntimeError, match="is not in the pool"):
        attend(pool, 0, table, q, k, k, 0.125, kernel="cpu")
    table.decode_kernel = (ptr, ids, info)
    with pytest.raises(RuntimeError, match="layer 2 of 2"):
        attend(pool, L, table, q, k, k, 0.125, kernel="cpu")
