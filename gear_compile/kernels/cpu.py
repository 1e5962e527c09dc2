"""Build and load the CPU attention kernel (`cpu_attention.cpp`): `gear::attention_cpu`.

The kernel is C++ against libtorch's headers, compiled once per machine with
the system C++ compiler (the one Inductor uses for its own CPU code) into
`~/.cache/gear_compile/` (or $GEAR_COMPILE_CACHE), under a name that hashes
the sources, the torch version and the flags; later processes just load it.
Building takes about 15 s on 2 cores and is logged. OpenMP is torch's own
runtime (at::parallel_for), so the kernel shares torch's threads.

No -march: the library holds one walk per instruction set (AVX-512, AVX2,
portable; `cpu_simd.h`), each compiled for its own target, and picks the
best the CPU has at run time, so a cache directory shared between machines
(an AVX-512 Xeon and an AVX2-only EPYC) never runs an instruction its CPU
lacks. `isa()` reports or forces the set; $GEAR_CPU_ISA (avx512, avx2,
scalar, auto) sets it for a whole process.

Why C++ and not Inductor-generated loops: measured on the 2-core CPU machine
(the "decode step as a graph" study of the project's design notes, which are not
part of this repository), Inductor's best formulation of attention over packed codes
reached 0.45-0.84x fp32 SDPA at 8k-32k tokens; this kernel's numbers are in
benchmarks/results/decode_attention_cpu.md.
Neighbours: `store` (the descriptor the kernel reads), `ops` (routes CPU
attention here, builds the kernel on first use, the fake implementation).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sysconfig
import tempfile
import time

import torch

log = logging.getLogger("gear_compile")

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cpp")
# Every header beside the source is part of the build's hash: a kernel added as
# a header of its own (and included by the source) rebuilds without a list to edit.
HEADERS = sorted(SOURCE.parent.glob("cpu_*.h"))
# C++20: torch 2.15's headers need it (std::strong_ordering, requires-clauses); 2.11-2.14's build under it too
FLAGS = ["-O3", "-std=gnu++20", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared",
         "-fno-math-errno", "-w"]


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GEAR_COMPILE_CACHE",
                                       pathlib.Path.home() / ".cache" / "gear_compile"))


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("gear CPU kernel: no C++ compiler found (set CXX, or install g++); "
                       "use kernel='torch' to run the reference path without it.")


def _command(cxx: str, out: pathlib.Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths
    lib = pathlib.Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
            f"-I{SOURCE.parent}",
            str(SOURCE), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-o", str(out)]


def library_path() -> pathlib.Path:
    """Where the built library for these sources, torch and flags lives."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in [SOURCE, *HEADERS]) + " ".join(
        [torch.__version__, _compiler(), *FLAGS]).encode()).hexdigest()[:16]
    return cache_dir() / f"gear_attention_cpu_{key}.so"


@functools.lru_cache(maxsize=1)
def load() -> None:
    """Build (once per machine) and load the kernel; raises RuntimeError with
    the compiler's output if that fails."""
    if hasattr(torch.ops.gear, "attention_cpu"):
        return
    cxx = _compiler()
    path = library_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.warning("gear: building the CPU attention kernel (once per machine, ~15 s) into %s", path)
        start = time.time()
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = pathlib.Path(tmp) / path.name
            result = subprocess.run(_command(cxx, out), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"gear CPU kernel: building {SOURCE.name} failed:\n"
                                   f"{' '.join(_command(cxx, out))}\n{result.stderr[-4000:]}")
            os.replace(out, path)        # atomic: concurrent builders (ranks) never see half a file
        log.warning("gear: built the CPU attention kernel in %.1f s", time.time() - start)
    torch.ops.load_library(str(path))
    torch.library.register_fake("gear::attention_cpu")(_attention_cpu_fake)


def isa(name: str = "") -> str:
    """The instruction set the kernel runs ("avx512", "avx2" or "scalar");
    a name picks it for this process ("auto": the best this CPU has), and a
    set the CPU lacks is refused with a RuntimeError."""
    load()
    return torch.ops.gear.cpu_isa(name)


def _attention_cpu_fake(q, k_parts, v_parts, k_new, v_new, attn_mask, scale, is_causal,
                        k_desc, v_desc, softcap=0.0, sink_logits=None):
    return torch.empty_like(q)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can be used here (built and loaded); logs why not."""
    try:
        load()
        return True
    except (RuntimeError, OSError) as err:
        log.warning("gear: the CPU attention kernel is unavailable, attention falls back to "
                    "the reference path (decompress + SDPA): %s", err)
        return False
