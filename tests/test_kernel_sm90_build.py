"""The Triton kernels build for a real GPU (sm_90: front end, MLIR passes and
ptxas) on a machine without one: what the interpreter tests cannot check.
Runs this file as a script in a subprocess, since under TRITON_INTERPRET=1
`triton.jit` yields interpreted functions that cannot be compiled."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _partial_variants():
    """(query dtype, bits, K on channel axis, rank, tile, mask kind, fp32 dot,
    K outliers (table index type, LOGK, span ends' type or None), V outliers,
    K fold, V fold) covering every constexpr branch."""
    return [("fp16", 4, True, 2, 32, 1, False, ("u8", 10, "u8"), True, True, True),
            ("fp16", 2, True, 4, 32, 2, False, ("u8", 2, None), True, False, False),
            ("bf16", 8, False, 0, 16, 0, False, None, False, False, False),
            ("fp32", 4, True, 2, 32, 0, True, ("i16", 10, None), False, True, False),
            ("fp16", 16, False, 0, 32, 1, False, None, False, False, False),
            ("fp16", 4, True, 4, 64, 1, False, ("u8", 10, "i16"), True, True, True)]


def _build_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gear_compile.kernels import decode_attention as da

    target = GPUTarget("cuda", 90, 32)

    def build(fn, types, consts, num_warps=4):
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": num_warps})

    D, G = 128, 4
    for qdt, bits, kch, rank, bt, mask, fp32, kout, vout, kfold, vfold in _partial_variants():
        exact = bits == 16
        pb = 1 if exact else 8 // bits
        w = D if exact else D // pb
        cdt = qdt if exact else "u8"
        ptrs = dict(Q=qdt, Kc=cdt, Vc=cdt, Lens="i64", Mask="u8" if mask == 1 else qdt,
                    PO="fp32", PLSE="fp32", Koi=kout[0] if kout else "u8", Voi="u8", Ka="i8", Va="i8",
                    Kb="i8", Vb="i8", Kls="fp32", Vls="fp32", Koe=kout and kout[2] or "u8", Voe="u8")
        types = {n: "*" + ptrs.get(n, "fp16") for n in da._partial_kernel.arg_names[:23]}
        # the float arguments as Triton's launcher types them (fp32), as Inductor's does (fp64,
        # the fp16 variants) and as torch's mutation analysis traces them (constants, bf16)
        floats = dict(fp16="fp64", fp32="fp32", bf16="constexpr")[qdt]
        types["qk_scale"] = types["cap"] = floats
        build(da._partial_kernel, types,
              dict(dict(qk_scale=0.125, cap=0.0) if floats == "constexpr" else {},
                   SEG=1, G=G, GP=16, D=D, W=w, WP=w, PB=pb, E=D, BITS=0 if exact else bits,
                   EXACT=exact, K_CHANNEL=kch, V_CHANNEL=False, R=rank, RP=16, BT=bt, MASK_KIND=mask,
                   FP32_DOT=fp32, K_OUT=kout is not None, LOGK=kout[1] if kout else 0,
                   K_SPANS=bool(kout and kout[2]), OUT_UNIT=0.0625 if bits == 2 else 1.0,
                   V_OUT=vout, K_FOLD=kfold, V_FOLD=vfold), num_warps=8)
    for sinks in (False, True):
        build(da._combine_kernel, dict(PO="*fp32", PLSE="*fp32", Out="*fp16", Sinks="*fp32"),
              dict(D=D, DP=D, SC=64, SINKS=sinks))


def test_kernels_build_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


if __name__ == "__main__":
    _build_all()
