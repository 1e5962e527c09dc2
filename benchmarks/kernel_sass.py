"""What a Triton kernel configuration compiles to on an H100, read without a GPU.

Job: compile a kernel configuration for sm_90a with Triton's own pipeline
(front end, MLIR passes, Triton's bundled ptxas), disassemble the cubin with
the bundled nvdisasm / cuobjdump, and report

  regs, stack     registers and the stack frame per thread (cuobjdump); Triton
                  keeps no arrays in local memory, so a stack frame, or any
                  local load / store (LDL / STL) in the kernel, is a spill.
                  Read from the cubin, so a kernel from Triton's cache
                  reports the same as a fresh compile
  shared          Triton's dynamic shared memory (pipeline buffers, layout
                  conversions), from its metadata
  the main loop   found by its backward branch in the SASS control flow: the
                  loop doing the most tensor-core flops, the first in the
                  code among equals (a kernel whose passes follow its work
                  list, sinks then prefill block then decode blocks, has its
                  long pass first), the longest where no loop uses tensor
                  cores (fp32 products as FFMAs); software pipelining peels a prologue and
                  an epilogue off the source loop, and the backward branch is
                  the steady state, so its body is what one iteration costs
  per iteration   SASS counts in that body, per thread (each SASS line runs
                  once per warp): async copies (LDGSTS = cp.async, UTMALDG /
                  UBLKCP = TMA), tensor-core ops (HMMA / HGMMA / IMMA ...),
                  conversions (I2F, F2F, F2I, I2FP, F2FP, I2I, F2IP and
                  HADD2.F32, the fp16 -> fp32 move), shuffles (SHFL),
                  barriers (BAR), local loads / stores (LDL / STL), global
                  loads (LDG), shared loads / stores, every instruction
                  (issue slots), and the tensor-core flops one warp issues
                  (from each MMA's shape)
  inner loops     other backward branches inside the main loop (a data-
                  dependent walk the main loop waits on)

A configuration is anything with `name, fn, signature, constexprs,
num_warps, num_stages` (gear_compile.kernels.decode_attention's BuildSpec),
or a launch as the launcher makes it (`spec_from_launch`: Triton's own
binder turns the arguments into the signature, constants and divisibility
attributes the runtime would compile).

  python benchmarks/kernel_sass.py                     # every sm90_build_specs() configuration
  python benchmarks/kernel_sass.py --sass NAME         # and NAME's main loop, line by line
  python benchmarks/kernel_sass.py --json out.json     # the reports as JSON
  python benchmarks/kernel_sass.py --kernel lorc       # LoRC's kernel (kernels/lorc_launch.py's specs)

Must run without TRITON_INTERPRET (under it `triton.jit` makes interpreted
functions that do not compile). Neighbours: kernel_model.py (turns these
counts into a time), tests/test_kernel_sm90_build.py (the CI checks on them),
gear_compile.kernels.decode_attention (the kernels and their specs).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ARCH = 90
# opcode families counted per main-loop iteration (the mnemonic before its first '.')
ASYNC_COPY = ("LDGSTS", "UTMALDG", "UBLKCP")
TENSOR_CORE = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA")
CONVERSION = ("I2F", "F2F", "F2I", "I2FP", "F2FP", "I2I", "I2IP", "F2IP")
FAMILIES = dict(async_copy=ASYNC_COPY, mma=TENSOR_CORE, cvt=CONVERSION, shfl=("SHFL",), bar=("BAR",),
                local=("LDL", "STL"), ldg=("LDG",), lds=("LDS", "LDSM"), sts=("STS", "STSM"),
                stg=("STG",))
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def older_triton() -> bool:
    """Whether the installed Triton is older than 3.9 (3.6: the lent GPUs' and
    `.ci/versions oldest`'s), whose compiler spills some configurations
    differently: the tests' expected spills and misses name both."""
    import triton
    from torch.torch_version import TorchVersion
    return TorchVersion(triton.__version__) < (3, 9)


@dataclass(frozen=True)
class Build:
    """What triton.compile takes for one configuration."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    attrs: dict = field(default_factory=dict, hash=False)   # {(arg index,): [["tt.divisibility", 16]]}


@dataclass
class SassReport:
    """One configuration's resources and its main loop's per-iteration counts."""

    name: str
    kernel: str               # the @triton.jit function's name
    num_warps: int
    num_stages: int
    regs: int
    stack_bytes: int          # per thread: spill slots (a Triton kernel has no local arrays)
    local_ops: int            # LDL / STL lines anywhere in the kernel
    shared_bytes: int         # Triton's dynamic shared memory (its pipeline buffers, layout shuffles)
    instructions: int         # SASS lines of the whole kernel
    loops: list               # every loop: {"start", "end" (SASS addresses), family -> count}
    main_loop: dict           # family -> count per iteration, plus "all" and "inner_loops"
    main_loop_sass: list = field(default_factory=list, repr=False)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_ops > 0


def tool(name: str) -> str:
    """Path of one of Triton's bundled CUDA binaries (ptxas, cuobjdump, nvdisasm)."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", ARCH, 32)


def pointer_attrs(fn, signature: dict) -> dict:
    """Divisibility by 16 on every pointer argument: what the runtime
    specializes a torch allocation to (CUDA allocations are 256-byte aligned)."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
            for n, ty in signature.items() if ty.startswith("*")}


def build_of(spec) -> Build:
    """A Build from a BuildSpec (the pointers taken as aligned; int arguments
    carry divisibility only where the spec gives `attrs`)."""
    attrs = getattr(spec, "attrs", None) or pointer_attrs(spec.fn, spec.signature)
    return Build(spec.name, spec.fn, dict(spec.signature), dict(spec.constexprs), spec.num_warps,
                 spec.num_stages, attrs)


def spec_from_launch(name: str, fn, args: tuple, kwargs: dict) -> Build:
    """The Build the Triton runtime would compile for `fn[grid](*args, **kwargs)`
    on an sm_90 device: its own binder specializes each argument (tensors by
    dtype and alignment, ints by size and divisibility by 16, 1 as a constant)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target())
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    kernel_kwargs = {k: v for k, v in kwargs.items() if k not in options}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*args, **kernel_kwargs)
    names = list(bound)
    signature = {n: s[0] for n, s in zip(names, specialization)}
    constexprs = {n: bound[n] for n, s in zip(names, specialization) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(specialization)
             if s[0] != "constexpr" and isinstance(s[1], str) and backend.parse_attr(s[1])}
    return Build(name, fn, signature, constexprs, options.get("num_warps", 4),
                 options.get("num_stages", 3), attrs)


def compile_sm90(build: Build):
    """The compiled kernel for sm_90a (from Triton's cache where it has it)."""
    import triton
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(build.fn, build.signature, build.constexprs, build.attrs),
                          target=target(),
                          options=dict(num_warps=build.num_warps, num_stages=build.num_stages))


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(nvdisasm's SASS, cuobjdump's resource usage) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return sass, usage


def parse_sass(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, instruction) lines and label -> address."""
    lines, labels, pending = [], {}, []
    for raw in text.splitlines():
        if m := _LABEL.match(raw.strip()):
            pending.append(m.group(1))
        elif m := _LINE.search(raw):
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            lines.append((addr, m.group(2)))
    return lines, labels


def opcode(instruction: str) -> str:
    """The full mnemonic (with modifiers) of a SASS line, its predicate dropped."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def family_counts(instructions: list[str]) -> dict[str, int]:
    ops = [opcode(i) for i in instructions]
    base = [o.split(".")[0] for o in ops]
    out = {fam: sum(b in names for b in base) for fam, names in FAMILIES.items()}
    # fp16 -> fp32 goes through the half adder on sm_90: a conversion under another name
    out["cvt"] += sum(o.startswith("HADD2.F32") for o in ops)
    out["all"] = len(ops)
    out["mma_flops"] = sum(mma_flops(o) for o in ops)
    return out


def mma_flops(op: str) -> int:
    """Multiply-adds x 2 one warp's tensor-core instruction performs:
    HMMA.16816 is m16 n8 k16; HGMMA.64x128x16 is one warpgroup's (four
    warps') m64 n128 k16, a quarter of it per warp. 0 for anything else."""
    fields = op.split(".")
    if len(fields) < 2 or fields[0] not in TENSOR_CORE:
        return 0
    if m := re.fullmatch(r"(\d+)x(\d+)x(\d+)", fields[1]):
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4
    if m := re.fullmatch(r"(16|8)(8)(\d+)", fields[1]):
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return 0


def loops(lines, labels) -> list[tuple[int, int]]:
    """(first address, branch address) of every backward branch (a branch to
    itself, the trap after EXIT, is no loop)."""
    out = []
    for addr, ins in lines:
        if opcode(ins).split(".")[0] == "BRA" and (m := _TARGET.search(ins)):
            start = labels.get(m.group(1))
            if start is not None and start < addr:
                out.append((start, addr))
    return out


def main_loop_of(lines, found) -> tuple[list[str], dict[str, int]]:
    """The main loop's SASS lines and their family counts (with `inner_loops`):
    of the backward branches `found`, the one doing the most tensor-core
    flops outside the loops nested in it (a rare path that repeats a tile
    around an inner loop, GEAR's overflow programs, is not the main loop),
    the first among equals; without tensor-core work anywhere, the longest.
    ([], {}) without loops."""
    def body(span):
        return [ins for addr, ins in lines if span[0] <= addr <= span[1]]

    def own_flops(span):    # its tensor-core flops outside the loops nested in it
        inner = [(a, b) for a, b in found if span[0] <= a <= b <= span[1] and (a, b) != span]
        return family_counts([ins for addr, ins in lines if span[0] <= addr <= span[1]
                              and not any(a <= addr <= b for a, b in inner)])["mma_flops"]

    if not found:
        return [], {}
    if any(family_counts(body(s))["mma_flops"] for s in found):
        span = max(found, key=lambda s: (own_flops(s), -s[0]))
    else:       # no tensor-core work (fp32 products run as FFMAs): the longest loop
        span = max(found, key=lambda s: (len(body(s)), -s[0]))
    counts = family_counts(body(span))
    counts["inner_loops"] = sum(span[0] <= a <= b <= span[1] and (a, b) != span for a, b in found)
    return body(span), counts


def analyze(build: Build, kernel) -> SassReport:
    sass, usage = disassemble(kernel.asm["cubin"])
    lines, labels = parse_sass(sass)
    found = loops(lines, labels)
    main_sass, main_loop = main_loop_of(lines, found)
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return SassReport(name=build.name, kernel=build.fn.__name__, num_warps=build.num_warps,
                      num_stages=build.num_stages,
                      regs=regs, stack_bytes=stack, local_ops=family_counts([i for _, i in lines])["local"],
                      shared_bytes=int(kernel.metadata.shared), instructions=len(lines),
                      loops=[dict(start=a, end=b, **family_counts([i for x, i in lines if a <= x <= b]))
                             for a, b in sorted(found)],
                      main_loop=main_loop, main_loop_sass=main_sass)


def report(spec_or_build) -> SassReport:
    """Compile one configuration for sm_90a and read its SASS."""
    build = spec_or_build if isinstance(spec_or_build, Build) else build_of(spec_or_build)
    return analyze(build, compile_sm90(build))


def build_key(build: Build) -> tuple:
    """What makes two configurations compile to the same kernel."""
    return (build.fn.__module__, build.fn.__name__, tuple(sorted(build.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in build.constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in build.attrs.items())), build.num_warps, build.num_stages)


def reports(specs) -> dict[str, SassReport | str]:
    """name -> report (or the compile error's text) for every spec; specs that
    compile to the same kernel share one compile."""
    out, done = {}, {}
    for spec in specs:
        build = spec if isinstance(spec, Build) else build_of(spec)
        key = build_key(build)
        if key not in done:
            try:
                done[key] = report(build)
            except Exception as err:      # a configuration that does not build is a finding, not a crash
                done[key] = f"{type(err).__name__}: {str(err)[-2000:]}"
        r = done[key]
        out[spec.name] = r if isinstance(r, str) else dataclasses.replace(r, name=spec.name)
    return out


COLUMNS = ("regs", "stack_bytes", "local_ops", "shared_bytes", "num_warps", "num_stages")
LOOP_COLUMNS = ("all", "ldg", "async_copy", "mma", "cvt", "shfl", "bar", "local", "inner_loops")


def table(found: dict) -> str:
    """A markdown table of `reports`' result, a row per configuration."""
    head = "| config | " + " | ".join(COLUMNS) + " | " + " | ".join(f"loop {c}" for c in LOOP_COLUMNS) + " |"
    rows = [head, "|---" + "|---:" * (len(COLUMNS) + len(LOOP_COLUMNS)) + "|"]
    for name, r in found.items():
        if isinstance(r, str):
            rows.append(f"| {name} | build failed: {r.splitlines()[0][:200]} |")
            continue
        rows.append(f"| {name} | " + " | ".join(str(getattr(r, c)) for c in COLUMNS) + " | "
                    + " | ".join(str(r.main_loop.get(c, "-")) for c in LOOP_COLUMNS) + " |")
    return "\n".join(rows)


def as_json(found: dict) -> dict:
    return {name: r if isinstance(r, str) else {k: v for k, v in dataclasses.asdict(r).items()
                                                if k != "main_loop_sass"}
            for name, r in found.items()}


SPEC_MODULES = {"store": "gear_compile.kernels.decode_attention", "lorc": "gear_compile.kernels.lorc_launch"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these configurations")
    p.add_argument("--sass", default=None, metavar="NAME", help="print NAME's main loop")
    p.add_argument("--json", type=Path, default=None, help="write the reports here")
    p.add_argument("--kernel", choices=sorted(SPEC_MODULES), default="store",
                   help="whose sm90_build_specs(): the store kernel's or LoRC's")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_sass.py compiles for sm_90a: run it without TRITON_INTERPRET=1.")
    specs = importlib.import_module(SPEC_MODULES[args.kernel]).sm90_build_specs()

    found = reports([s for s in specs if args.only is None or s.name in args.only])
    if args.sass in found and not isinstance(found[args.sass], str):
        print("\n".join(found[args.sass].main_loop_sass))
    print(table(found))
    if args.json:
        args.json.write_text(json.dumps(as_json(found), indent=1))


if __name__ == "__main__":
    main()
