"""Predicted decode-attention latency on an H100, from the compiled kernel's SASS.

Job: for one cell (default: batch 16, context 32k, GQA 32/8, head dim 128,
fp16, the targets' cell of issue 28) and every method, predict the Triton
kernel's microseconds and its speedup over fp16 SDPA, with no GPU:

  launches   the real launcher (`decode_attention_launch`) runs on meta
             tensors shaped like the cell's stores, its kernels wrapped by a
             recorder instead of launched, and told the device's SM count:
             the grid, constants and warps it would launch there. An
             autotuned kernel yields one candidate per config; the model
             takes the fastest it predicts, as the autotuner would.
  SASS       each launch compiled for sm_90a as the runtime would
             (kernel_sass.spec_from_launch) and its main loop counted
             (kernel_sass): issue slots, tensor-core flops, async copies,
             inner loops; registers and shared memory give the occupancy.
  bytes      benchmarks/decode_attention.py's byte model (`bytes_model`, the
             live store a step reads), spread evenly over the cell's tiles.

The main launch is the one streaming K/V tiles (tensor-core ops in its main
loop) with the most programs; it carries every tile: each of its programs
runs n = ceil(B * Hkv * ceil(L / BT) / programs) iterations. Per SM, with k
of its programs resident (registers, shared memory, warps), one round of
iterations (each program one tile) costs the most of

  memory      k * tile bytes / (the SM's share of HBM bandwidth at 92 %,
              what fp16 SDPA reaches on an H100)
  issue       k * warps * SASS lines / 4 schedulers, at one line a cycle
              each when a scheduler has 4 or more warps to pick from, at
              warps/4 of that below (a lone warp waits on its own results)
  tensor      k * warps * MMA flops / the SM's mma.sync rate
  latency     one program's own issue time plus its exposed DRAM latency:
              2 round trips (K, then V) a tile without async copies, 2 /
              (num_stages - 1) with them (the pipeline keeps that many tiles
              in flight), plus one round trip per inner loop (a walk whose
              loads depend on the previous trip: a lower bound)

and the grid runs in waves of (SMs x k) programs, the last one partial
(wave quantization). Every other launch adds a fixed launch cost. fp16
SDPA is predicted by the same memory term: dense K/V at 92 % of peak.

Every figure this writes is a PREDICTION of a first-order model; it says
which limit a kernel hits and how far it is from the byte ceiling, not what
a GPU will measure (benchmarks/gpu_check.py measures, beside these figures).
The table also shows the last H100 measurement of each method and the
kernel it measured, so the model's error on that kernel can be read.

  python benchmarks/kernel_model.py                    # the targets' cell -> results/kernel_model_h100.md
  python benchmarks/kernel_model.py --batch 1 --context 8192 --out /tmp

Must run without TRITON_INTERPRET. Neighbours: kernel_sass.py (compiles and
counts), decode_attention.py (the byte model; timings on a GPU),
gear_compile.kernels.decode_attention (the launcher it records).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode_attention as bench   # noqa: E402  (the byte model and the stores' recipe)
import kernel_sass                  # noqa: E402
from gear_compile.kernels import decode_plan   # noqa: E402


@dataclass(frozen=True)
class Device:
    """What the model needs of a GPU."""

    name: str
    sms: int
    clock_ghz: float                  # sustained SM clock under load
    hbm_gbps: float                   # peak
    hbm_efficiency: float             # fraction of peak a streaming kernel sustains
    regs_per_sm: int
    shared_per_sm: int                # bytes of shared memory, summed over resident programs
    max_shared_per_program: int
    max_warps_per_sm: int
    max_programs_per_sm: int
    dram_latency_cycles: int          # one dependent round trip under load
    mma_flops_per_cycle: float        # per SM, mma.sync (HMMA) fp16 with fp32 accumulate
    launch_us: float                  # a small launch's cost inside a CUDA graph


# H100 SXM: 3.35 TB/s (fp16 SDPA measured 92 % of it, decode_attention_h100_1d98f39.md);
# 989 dense fp16 TFLOPS by wgmma at 1.98 GHz is 3,784 flops a cycle an SM, mma.sync reaches about
# two thirds; DRAM latency about 600 ns loaded; 227 KB of shared memory a program at most.
H100 = Device("H100 SXM (model)", sms=132, clock_ghz=1.755, hbm_gbps=3350.0, hbm_efficiency=0.92,
              regs_per_sm=65536, shared_per_sm=228 * 1024, max_shared_per_program=227 * 1024,
              max_warps_per_sm=64, max_programs_per_sm=32,
              dram_latency_cycles=1000, mma_flops_per_cycle=2520.0, launch_us=2.0)
ISSUE_DEPTH = 4       # warps a scheduler needs to issue every cycle (dependent ALU latency ~4 cycles)
METHODS = [("none", 16), ("kcvt", 2), ("kcvt", 4), ("kivi", 2), ("kivi", 4), ("gear_l", 2),
           ("gear_l", 4), ("gear", 2), ("gear", 4)]
# issue 28's targets at batch 16 / 32k: x fp16 SDPA
TARGETS = {("none", 16): 0.95, ("kcvt", 4): 3.0, ("kivi", 4): 3.0, ("kivi", 2): 5.0, ("gear", 4): 2.5,
           ("gear", 2): 4.0}
# The last H100 measurement at batch 16 / 32k / 32/8/128 (us), and the kernel it measured
MEASURED = {("none", 16): 1114.4, ("kcvt", 2): 1214.3, ("kcvt", 4): 1326.8, ("kivi", 2): 2119.1,
            ("kivi", 4): 2204.5, ("gear_l", 2): 2676.0, ("gear_l", 4): 2649.0, ("gear", 2): 8299.0,
            ("gear", 4): 7139.0}
MEASURED_AT = ("decode_attention_h100_1d98f39.md (none, kcvt, kivi: the kernel before issue 28) and "
               "commit 7f902f0's message (gear_l, gear: the same kernel with tl.dot low-rank terms)")


@dataclass(frozen=True)
class Launch:
    kernel: object        # a JITFunction, or an Autotuner over one
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


# ---------------------------------------------------------------- the launches
def meta_store(cfg, kind: str, B: int, H: int, L: int, D: int):
    """A store shaped as decode_attention.build_store makes it (a prompt of
    L - DECODE tokens, room grown for DECODE more), on the meta device: the
    launcher reads only shapes (its grid depends on nothing else)."""
    from gear_compile.codec import resolve
    from gear_compile.store import KVStore, StoreLayout

    codec = resolve(cfg, D)
    split = codec.split(L - bench.DECODE)
    layout = StoreLayout.build(codec, kind, D, torch.float16, split.prefill, split.sinks)
    tensors = [torch.empty(shape, dtype=dtype, device="meta")
               for shape, dtype in layout.shapes(B, H, codec.decode_capacity_for(0))]
    store = KVStore(cfg, kind, tensors, [split.prefill, 0, split.buffer])
    store.grow(bench.DECODE)
    return store


def record_launches(cfg, B: int, Hq: int, Hkv: int, D: int, L: int, device: Device) -> list[Launch]:
    """The launches `decode_attention_launch` makes for one decode query over
    the cell's stores (plus its own new token, as the benchmark times it)."""
    from gear_compile.kernels.decode_attention import decode_attention_launch

    ks, vs = (meta_store(cfg, kind, B, Hkv, L - 1, D) for kind in "kv")
    q = torch.empty(B, Hq, 1, D, dtype=torch.float16, device="meta")
    new = torch.empty(B, Hkv, 1, D, dtype=torch.float16, device="meta")
    found = []

    def wrap(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: found.append(Launch(kernel, tuple(grid), args, kwargs))
        return Grid()

    decode_attention_launch(q, ks.tensors(), vs.tensors(), new, new, None, D ** -0.5,
                            cfg.to_json(), wrap=wrap, sm_count=device.sms)
    return found


def candidates(launch: Launch, name: str) -> list[kernel_sass.Build]:
    """The builds a launch can run: one, or one per autotuning config its
    pruning keeps (the autotuner's own `prune_configs` on these arguments)."""
    from triton.runtime.jit import JITFunction

    fn = launch.kernel
    while not isinstance(fn, JITFunction):      # an Autotuner / Heuristics wraps the kernel as .fn
        fn = fn.fn
    if not getattr(launch.kernel, "configs", None):
        return [kernel_sass.spec_from_launch(name, fn, launch.args, launch.kwargs)]
    tuner = launch.kernel
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        configs = tuner.prune_configs(dict(launch.kwargs))
    finally:
        tuner.nargs = None
    return [kernel_sass.spec_from_launch(f"{name}-" + "".join(f"{k}{v}" for k, v in c.kwargs.items())
                                         + f"-w{c.num_warps}s{c.num_stages}",
                                         fn, launch.args, dict(launch.kwargs, **c.all_kwargs()))
            for c in configs]


# ---------------------------------------------------------------- the cost of a tile
def resident_programs(r: kernel_sass.SassReport, device: Device) -> int:
    """Programs of this kernel one SM holds at once: registers (allocated per
    warp in 256s), shared memory (1 KB reserved a program) and warps."""
    regs_per_warp = math.ceil(max(r.regs, 1) * 32 / 256) * 256
    by_regs = device.regs_per_sm // (regs_per_warp * r.num_warps)
    by_shared = device.shared_per_sm // (r.shared_bytes + 1024)
    by_warps = device.max_warps_per_sm // r.num_warps
    return max(1, min(by_regs, by_shared, by_warps, device.max_programs_per_sm))


def round_cycles(r: kernel_sass.SassReport, k: int, tile_bytes: float, device: Device) -> dict:
    """Cycles for k resident programs to each finish one iteration, per limit."""
    loop = r.main_loop
    warps_per_scheduler = k * r.num_warps / 4
    issue_rate = min(1.0, warps_per_scheduler / ISSUE_DEPTH)
    own_issue = r.num_warps * loop["all"] / 4 / issue_rate
    bytes_per_cycle = device.hbm_gbps * 1e9 * device.hbm_efficiency / device.sms / (device.clock_ghz * 1e9)
    in_flight = max(1, r.num_stages - 1) if loop.get("async_copy") else 1
    exposed = (2 / in_flight + loop.get("inner_loops", 0)) * device.dram_latency_cycles
    return dict(memory=k * tile_bytes / bytes_per_cycle, issue=k * own_issue,
                tensor=k * r.num_warps * loop.get("mma_flops", 0) / device.mma_flops_per_cycle,
                latency=own_issue + exposed)


def predict_launch(r: kernel_sass.SassReport, programs: int, iterations: int, tile_bytes: float,
                   device: Device) -> dict:
    """Microseconds of the main launch and what bounds it."""
    k = resident_programs(r, device)
    slots = device.sms * k
    full, rest = divmod(programs, slots)
    waves = [(full, k)] + ([(1, math.ceil(rest / device.sms))] if rest else [])
    cycles, bound = 0.0, {}
    for count, k_wave in waves:
        if count:
            parts = round_cycles(r, k_wave, tile_bytes, device)
            cycles += count * iterations * max(parts.values())
            bound = bound or parts
    us = cycles / (device.clock_ghz * 1e3)
    return dict(us=us, resident=k, waves=programs / slots, limit=max(bound, key=bound.get), per_tile=bound)


def predict(cfg, method: str, bits: int, moved: int, dense: int, B: int, Hq: int, Hkv: int, D: int,
            L: int, device: Device) -> dict:
    """The prediction for one method at one cell."""
    launches = record_launches(cfg, B, Hq, Hkv, D, L, device)
    best = None
    reports = {}
    for i, launch in enumerate(launches):
        for build in candidates(launch, f"{method}{bits}-launch{i}"):
            reports[build.name] = (launch, build, kernel_sass.report(build))
    streaming = [(launch, build, r) for launch, build, r in reports.values() if r.main_loop.get("mma")]
    main_programs = max(launch.programs for launch, _, _ in streaming)
    for launch, build, r in streaming:
        if launch.programs != main_programs or r.shared_bytes > device.max_shared_per_program:
            continue        # not the main launch, or a config the GPU cannot launch (the autotuner skips it)
        bt = build.constexprs["BT"]
        tiles = B * Hkv * math.ceil(L / bt)
        # with K outlier records, half the grid are overflow programs: each scans its twin's range
        # for tiles past their record window (rare) and exits; the other half carry the tiles
        carriers = launch.programs
        if decode_plan.overflow_programs(build.constexprs):
            carriers //= 2
        iterations = math.ceil(tiles / carriers)
        p = predict_launch(r, carriers, iterations, moved / tiles, device)
        p.update(build=build.name, report=r, programs=carriers, iterations=iterations, tile=bt)
        if best is None or p["us"] < best["us"]:
            best = p
    best["us"] += (len(launches) - 1) * device.launch_us
    sdpa_us = dense / (device.hbm_gbps * 1e9 * device.hbm_efficiency) * 1e6
    best.update(method=method, bits=bits, launches=len(launches), sdpa_us=sdpa_us, speedup=sdpa_us / best["us"],
                ceiling=dense / moved, moved=moved, pct_peak=moved / (best["us"] * 1e-6) / (device.hbm_gbps * 1e9))
    return best


# ---------------------------------------------------------------- the table
def bytes_rows(methods, B: int, Hq: int, Hkv: int, D: int, L: int) -> dict:
    """(method, bits) -> the byte model's row at the cell."""
    args = bench.parse_args(["--bytes-only", "--batch", str(B), "--context", str(L), "--shapes",
                             f"{Hq}/{Hkv}/{D}", "--methods", *sorted({m for m, _ in methods}),
                             "--bits", *sorted({str(b) for m, b in methods if m != "none"} or {"4"})])
    return {(r["method"], r["bits"]): r for r in bench.bytes_model(args)}


def write(rows: list[dict], args, device: Device) -> str:
    import triton
    head = ["# Decode attention on an H100: PREDICTED by kernel_model.py (no GPU ran)", "",
            f"- cell: batch {args.batch}, context {args.context}, GQA {args.hq}/{args.hkv}, head dim "
            f"{args.head_dim}, fp16; device model: {device.name}, {device.sms} SMs at {device.clock_ghz} GHz, "
            f"{device.hbm_gbps:g} GB/s at {100 * device.hbm_efficiency:.0f} %, DRAM latency "
            f"{device.dram_latency_cycles} cycles, mma.sync {device.mma_flops_per_cycle:g} flops/cycle/SM",
            f"- kernels compiled for sm_90a on this machine: torch {torch.__version__}, triton {triton.__version__}; "
            f"code {bench_commit()}",
            f"- command: `python benchmarks/kernel_model.py {' '.join(args.argv)}`",
            "- us: predicted latency of one call; x SDPA: predicted fp16 SDPA time (dense K/V at the same "
            "92 % of peak) / us; % peak: the method's live bytes / us over peak HBM; limit: the term that "
            "bounds the main launch's iteration (memory / issue / tensor / latency); regs, k: registers a "
            "thread and programs resident a SM; waves: programs / (SMs x k); per-tile cycles: each term "
            "for k programs' iteration",
            f"- measured: the last H100 figure for the method, from {MEASURED_AT}; it measures the kernel "
            "this table predicts only while that kernel is unchanged", ""]
    table = ["| method | bits | predicted us | predicted x SDPA | target | measured us (H100) | ceiling | "
             "% peak | limit | build | programs x iters | tile | regs | k | waves | LDG | async | cvt | "
             "SASS/iter | per-tile cycles mem / issue / tensor / latency |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in rows:
        r, t = p["report"], p["per_tile"]
        target = TARGETS.get((p["method"], p["bits"]))
        verdict = "" if target is None else f">= x{target:g}: {'met' if p['speedup'] >= target else 'MISSED'}"
        measured = MEASURED.get((p["method"], p["bits"]))
        table.append(
            f"| {p['method']} | {p['bits']} | {p['us']:.0f} | {p['speedup']:.2f} | {verdict} | "
            f"{'' if measured is None else f'{measured:.0f}'} | {p['ceiling']:.2f} | {100 * p['pct_peak']:.0f} | "
            f"{p['limit']} | {p['build']} | {p['programs']} x {p['iterations']} | {p['tile']} | {r.regs} | "
            f"{p['resident']} | {p['waves']:.2f} | {r.main_loop.get('ldg', 0)} | {r.main_loop.get('async_copy', 0)} | "
            f"{r.main_loop.get('cvt', 0)} | {r.main_loop.get('all', 0)} | "
            f"{t['memory']:.0f} / {t['issue']:.0f} / {t['tensor']:.0f} / {t['latency']:.0f} |")
    return "\n".join(head + table) + "\n"


def bench_commit() -> str:
    import subprocess
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gear_compile/kernels"],
                               capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout.strip()
        return rev + (" (kernels modified in the working tree)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD:BITS",
                   help="default: " + " ".join(f"{m}:{b}" for m, b in METHODS))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_model.py compiles for sm_90a: run it without TRITON_INTERPRET=1.")
    from gear_compile.config import GearConfig

    methods = METHODS if args.methods is None else [
        (m, int(b or 16 if m == "none" else b or 4)) for m, _, b in (s.partition(":") for s in args.methods)]
    cell = (args.batch, args.hq, args.hkv, args.head_dim, args.context)
    moved = bytes_rows(methods, *cell)
    rows = []
    for method, bits in methods:
        cfg = GearConfig.from_options(dict(method=method, bits=4 if method == "none" else bits))
        m = moved[(method, bits)]
        rows.append(predict(cfg, method, bits, m["moved"], m["dense"], *cell, H100))
        r = rows[-1]
        print(f"{method:7s} {bits:2d}b  predicted {r['us']:8.0f} us  x{r['speedup']:.2f} SDPA  "
              f"({r['limit']}-bound, {r['programs']} programs x {r['iterations']} tiles, k={r['resident']})",
              flush=True)
    text = write(rows, args, H100)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("kernel_model_h100.md" if cell == (16, 32, 8, 128, 32768)
                       else f"kernel_model_h100_b{args.batch}_l{args.context}.md")
    path.write_text(text)
    print(text)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
