"""The C++ CPU kernel's instruction-set paths (`kernels/cpu_simd_*.h`, picked
at run time by `kernels/cpu.isa`): every path this CPU has, forced in turn,
matches the reference within the kernel tests' bounds (test_attention_kernels:
the same `_check`); the paths agree with each other to float rounding; the
automatic choice is the best set the CPU reports; a set the CPU lacks or an
unknown name is refused; and the built library holds no vector instruction
outside the two paths that run only after that check, so a library built on
an AVX-512 Xeon never faults on an AVX2-only EPYC and the other way round.
"""
import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from gear_compile.kernels import cpu
from test_attention_kernels import _check

ISAS = ["avx512vnni", "avx512", "avx2", "scalar"]


def _cpu_flags() -> set[str]:
    text = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _has(isa: str) -> bool:
    """What the path needs, read from the kernel's own report of the CPU
    (the paths below `auto`'s choice are all available)."""
    cpu.load()
    with forced("auto"):
        best = cpu.isa()
    return ISAS.index(isa) >= ISAS.index(best)


@contextlib.contextmanager
def forced(isa):
    cpu.load()
    before = cpu.isa()
    cpu.isa(isa)
    try:
        yield
    finally:
        cpu.isa(before)


# (method, bits, D, Hq, Hkv, prefill, new, keywords): tails of every width
# (D = 96 and 40 leave 8 channels past a 16-float register), GQA ratios 1-8,
# several query tokens, masks, fp32 / fp16 / bf16, soft-capping and sink
# logits, exact sink tokens, a long prefill block with many splits
CASES = [
    ("gear", 4, 64, 9, 3, 300, 45, dict(dtype=torch.float32, B=1)),
    ("gear", 2, 96, 8, 1, 27, 30, dict(dtype=torch.float32, mask="bool", mask_extra=5)),
    ("gear", 4, 40, 4, 2, 45, 27, dict(T=5, causal=True, B=3, group_size=8)),
    ("gear_l", 4, 128, 4, 4, 50, 40, dict(dtype=torch.bfloat16)),
    ("kcvt", 8, 64, 6, 2, 21, 19, dict(mask="additive", B=3)),
    ("kivi", 2, 64, 8, 1, 40, 30, dict(sink_logits=True, dtype=torch.float32)),
    ("per_token", 4, 64, 4, 2, 16, 16, dict(softcap=2.0)),
    ("none", 4, 64, 4, 1, 9, 25, dict()),
    ("gear", 4, 64, 2, 1, 1000, 3, dict(B=1, sink_tokens=4)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_each_path_matches_the_reference(isa, case):
    if not _has(isa):
        pytest.skip(f"this CPU lacks {isa}")
    *args, kw = case
    with forced(isa):
        _check("cpu", *args, **kw)


def test_the_paths_agree_to_float_rounding():
    """fp32 in, fp32 out: the sets differ only in the order of their sums."""
    from test_attention_kernels import _stores, attend
    from gear_compile.config import GearConfig
    gen = torch.Generator().manual_seed(7)
    cfg = GearConfig(method="gear", bits=4, group_size=16, decode_capacity=64)
    ks, vs = _stores(cfg, 1, 3, 64, 700, 45, torch.float32, gen)
    q = torch.randn(1, 9, 1, 64, generator=gen)
    outs = {}
    for isa in ISAS:
        if _has(isa):
            with forced(isa):
                outs[isa] = attend("cpu", q, ks, vs, None, None, None, 0.125)
    assert len(outs) >= 2, outs.keys()         # x86-64 always has the portable path and AVX2 here
    for isa, out in outs.items():
        assert (out - outs["scalar"]).abs().max().item() < 2e-6, isa


@pytest.mark.skipif(not _cpu_flags(), reason="needs /proc/cpuinfo (Linux)")
def test_auto_picks_the_best_set_the_cpu_reports():
    flags = _cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    best = "avx512vnni" if avx512 and "avx512_vnni" in flags else "avx512" if avx512 else \
        "avx2" if avx2 else "scalar"
    with forced("auto"):
        assert cpu.isa() == best


def test_a_missing_set_or_an_unknown_name_is_refused():
    cpu.load()
    before = cpu.isa()
    with pytest.raises(RuntimeError, match="one of auto, avx512vnni, avx512, avx2, scalar"):
        cpu.isa("sse9")
    for isa in ISAS:
        if not _has(isa):
            with pytest.raises(RuntimeError, match="not available on this CPU"):
                cpu.isa(isa)
    assert cpu.isa() == before                 # a refused name changes nothing


def test_the_environment_variable_sets_a_process_path():
    code = "from gear_compile.kernels import cpu; print(cpu.isa())"
    env = dict(os.environ, GEAR_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "scalar", out.stderr[-2000:]
    env["GEAR_CPU_ISA"] = "avx1024"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "avx1024" in out.stderr


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_no_vector_instruction_outside_the_checked_paths():
    """Any VEX/EVEX instruction (v-prefixed, ymm/zmm or mask registers) must sit
    in gear_cpu::avx2:: or gear_cpu::avx512::, and the AVX2 path must hold no
    AVX-512 one (zmm, mask registers, the upper 16 vector registers)."""
    cpu.load()
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(cpu.library_path())],
                          capture_output=True, text=True, check=True).stdout
    outside, in_avx2, checked = set(), set(), 0
    fn = ""
    avx512_only = re.compile(r"zmm|%k[0-7]|[xy]mm(1[6-9]|2[0-9]|3[01])\b")
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        ins = fields[-1].strip()
        vector = ins.startswith("v") or "ymm" in ins or "zmm" in ins or "%k" in ins
        if "gear_cpu::avx512::" in fn:
            checked += vector
        elif "gear_cpu::avx2::" in fn:
            checked += vector
            if avx512_only.search(ins):
                in_avx2.add(fn[:120])
        elif vector:
            outside.add(fn[:120])
    assert checked > 1000                      # the disassembly was read: the paths are there
    assert not outside, sorted(outside)[:10]
    assert not in_avx2, sorted(in_avx2)[:10]
