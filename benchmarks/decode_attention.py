"""Decode-attention latency: our kernels vs dense SDPA vs decompress-then-SDPA
(what Hugging Face's QuantizedCache does each step).

For each shape (query heads / KV heads / head dim), batch size, context
length, method and bit width it builds a layer's compressed K/V (a prompt of
context - DECODE tokens, then DECODE appended tokens, so the prefill block,
several decode blocks and a partly full buffer are all live), times one
decode query (plus its own new token) against it, and reports

  us        median latency of one call (one layer)
  GB/s      bytes the method moves / time: for the kernel, the live part of
            the store (codes, scales, zero points, low-rank factors, outliers,
            buffer; its partial outputs, under 1 %, are left out); for SDPA,
            dense K and V; for decompress+SDPA, the store plus writing and
            re-reading dense K/V
  % peak    GB/s / the device's peak bandwidth (--peak-gbps; known for H100
            SXM and H200)
  ceiling   dense bytes / this method's bytes: the speedup a kernel running
            at SDPA's bandwidth would reach
  speedup   SDPA time / this method's time
  GEAR +%   time of gear / gear_l over its plain backbone (kcvt at 4 bits,
            kivi at 2), the cost of the low-rank and sparse terms

Devices:
  cuda       the Triton kernel, fp16, timed by CUDA-graph replays (CUDA events)
  cpu        the C++ kernel (`gear::attention_cpu`), fp32 as CPU models run,
             against fp32 SDPA; methods interleaved call by call and medians
             taken (this machine's timings drift). A decode step reads every
             layer's cache once, so K/V cycle through as many layer copies as
             exceed --cold-mb of memory (a lone layer would sit in the CPU's
             cache, which a model's 30 layers do not); --cold-mb 0 times one
             warm layer
  interpret  the Triton kernel under TRITON_INTERPRET=1: checks this script,
             times nothing real

The method `none` (uncompressed store, read by the same kernel) is the
control: it separates the kernel's efficiency from the compression's gain.
Writes benchmarks/results/decode_attention{,_cpu,_interpreter}.md, a plot of
speedup vs context (a line per method and bit width, a panel per shape and
batch) and a verdict on the targets (issue 5's on a GPU, issue 10's on the
CPU).

  python benchmarks/decode_attention.py                 # the grid, on a CUDA GPU
  python benchmarks/decode_attention.py --batch 16 --context 32768   # the targets' cell
  python benchmarks/decode_attention.py --max-seconds 500 --prefix part1_   # within 600 s
  python benchmarks/decode_attention.py --device cpu    # the CPU grid (issue 10)
  python benchmarks/decode_attention.py --bytes-only    # the byte model, any machine
  python benchmarks/decode_attention.py --device interpret --batch 1 --context 400 \\
      --iters 1 --warmup 0      # the interpreter: checks the script, times nothing real

--bytes-only builds the stores on the CPU (at batch 1: every part scales
linearly with the batch) and writes decode_attention_bytes.md: what each
method must move per decode step and hence its speedup ceiling.

Neighbours: gear_compile.kernels (the kernels), gear_compile.store (builds
the stores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name

DECODE = 150  # tokens appended after the prompt: kcvt (n_b=20) 7 decode blocks + 10 buffered,
              # kivi (n_b=64) 2 blocks + 22 buffered
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0,
             "H100 PCIe": 2000.0, "H200": 4800.0}
TARGET = dict(batch=16, context=32768, peak=0.80, speedup={4: 3.0, 2: 5.0}, gear_overhead=0.15)


DEFAULTS = {   # device -> (shapes Hq/Hkv/D, batch sizes, contexts)
    "cuda": (["32/8/128"], [1, 4, 16, 64], [1024, 4096, 16384, 32768, 131072]),
    "cpu": (["32/8/128", "9/3/64"], [1, 4], [2048, 8192, 32768]),
    "interpret": (["32/8/128"], [1], [1024]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=list(DEFAULTS), default=None,
                   help="default: cuda where a GPU is visible, else cpu")
    p.add_argument("--shapes", nargs="+", default=None, metavar="HQ/HKV/D",
                   help="query heads / KV heads / head dim (default per device: "
                        + "; ".join(f"{d} {' '.join(v[0])}" for d, v in DEFAULTS.items()) + ")")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--context", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=["none", "kcvt", "kivi", "gear_l", "gear"],
                   help="gear_compile methods (none: the uncompressed control)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="override a gear / gear_l option, e.g. --option outlier_ratio=0.01 "
                        "--option rank_prefill=2 (the backbones keep their defaults)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default: cuda 50, cpu 15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: cuda 10, cpu 2)")
    p.add_argument("--cold-mb", type=float, default=256.0,
                   help="cpu: cycle K/V through layer copies totalling at least this many MB "
                        "of dense K/V, so that no call finds its layer in the CPU cache (0: "
                        "one warm layer)")
    p.add_argument("--no-graphs", action="store_true",
                   help="time Python launches instead of CUDA graph replays")
    p.add_argument("--bytes-only", action="store_true",
                   help="no timing: the bytes each method moves and its speedup ceiling")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak HBM bandwidth in GB/s (default: looked up from the device name: "
                        + ", ".join(f"{k} {v:g}" for k, v in PEAK_GBPS.items()) + ")")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="after this many seconds start no new shape (the first always runs; "
                        "the table so far is saved; the device tool allows 600 s per command)")
    p.add_argument("--max-dense-gb", type=float, default=24.0,
                   help="skip shapes whose dense K+V exceed this many GB")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--prefix", default="", help="prepended to the output file names")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, batch, context = DEFAULTS[args.device]
    args.batch = args.batch or batch
    args.context = args.context or context
    args.iters = args.iters if args.iters is not None else (15 if args.device == "cpu" else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.device == "cpu" else 10)
    args.shapes = [_shape(p, text) for text in (args.shapes or shapes)]
    args.overrides = {}
    for o in args.option:
        key, sep, value = o.partition("=")
        try:
            args.overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            sep = ""
        if not sep:
            p.error(f"--option {o!r}: expected KEY=JSON, e.g. outlier_ratio=0.01")
    try:
        configs(args)      # fail now, not after an hour of measuring
    except (ValueError, TypeError) as err:
        p.error(str(err))
    for L in args.context:
        if L <= DECODE:
            p.error(f"--context {L}: must exceed the {DECODE} decoded tokens")
    return args


def _shape(parser, text: str) -> tuple[int, int, int]:
    try:
        hq, hkv, d = (int(x) for x in text.split("/"))
    except ValueError:
        parser.error(f"--shapes {text!r}: expected HQ/HKV/D, e.g. 32/8/128")
    if hq % hkv:
        parser.error(f"--shapes {text!r}: {hq} query heads are not a multiple of {hkv} KV heads")
    return hq, hkv, d


def capture(fn):
    """fn recorded as a CUDA graph (warmed up on a side stream first, as
    capture requires): replaying it costs no Python or launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_timer(device: str, graphs: bool):
    """time_us(fn, iters, warmup, graph=True) -> (median us, "graph" | "eager"):
    by CUDA events on a GPU, replaying a CUDA graph of fn where graphs are on
    and capture works (so the time is the GPU's, not the launcher's Python),
    by the wall clock elsewhere (the interpreter)."""
    def time_us(fn, iters, warmup, graph=True):
        for _ in range(warmup):
            fn()
        mode, run = "eager", fn
        if graphs and graph and device == "cuda":
            try:
                mode, run = "graph", capture(fn)
            except RuntimeError as err:
                print(f"  CUDA graph capture failed ({str(err)[:120]}); timing eagerly")
        times = []
        for _ in range(max(1, iters)):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times), mode
    return time_us


def time_interleaved(calls: dict, iters: int, warmup: int) -> dict:
    """Median wall-clock us of each call, the calls taken in turn round after
    round, so that a drift in the machine's speed reaches all of them alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for _ in range(max(1, iters)):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def build_store(config, kind, B, H, L, D, device, dtype=torch.float16):
    """A store holding L tokens; compressed once at batch 1 and repeated over
    the batch (the kernel's cost does not depend on the values)."""
    from gear_compile.store import KVStore

    x = torch.randn(1, H, L, D, device=device, dtype=dtype)
    store = KVStore.from_prefill(x[:, :, :L - DECODE], config, kind)
    store.grow(DECODE)
    store.append(x[:, :, L - DECODE:])
    if B == 1:
        return store
    parts = [t if i == 0 else t.repeat(B, *([1] * (t.dim() - 1)))
             for i, t in enumerate(store.tensors())]
    return KVStore(config, kind, parts, store.counts())


def live_bytes(store) -> int:
    """Bytes of the store a decode step reads: the prefill segment, the used
    fraction of the decode capacity (every part scales with tokens), the used
    buffer rows."""
    n_pre, n_dec, n_buf = store.counts()
    buf = store.buffer
    return (store.prefill.nbytes() + store.decode.nbytes() * n_dec // max(1, store.capacity)
            + buf[:, :, :n_buf].numel() * buf.element_size())


def best_sdpa(q, k, v, scale, time_us, iters, warmup):
    """Fastest SDPA backend that accepts the shapes: (us, backend name, timing mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "none", "eager")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        try:
            run()
        except RuntimeError:
            continue
        best = min(best, (*time_us(run, iters, warmup), backend.name),
                   key=lambda b: b[0])
    us, mode, name = best
    return us, name, mode


def configs(args):
    """(label, GearConfig) for each requested method and bit width; the
    control `none` once."""
    from gear_compile.config import GearConfig

    out = []
    for method in args.methods:
        for bits in ([args.bits[0]] if method == "none" else args.bits):
            extra = args.overrides if method in ("gear", "gear_l") else {}
            cfg = GearConfig.from_options(dict(extra, method=method, bits=bits))
            out.append((method, 16 if method == "none" else bits, cfg))
    return out


def backbone_of(method: str, cfg, head_dim: int) -> str | None:
    """The plain method a gear / gear_l row is compared with (None for the rest):
    its backbone at this head dim."""
    return cfg.for_head_dim(head_dim).quantizer if method in ("gear", "gear_l") else None


def gbps(row) -> float:
    """A timed row's achieved bandwidth: the bytes it moves over its latency."""
    return row["bytes"] / (row["us"] * 1e-6) / 1e9


def backbone_overhead(rows, key: str) -> None:
    """Adds `gear_over` to gear / gear_l rows: rows[key] over the row of the
    plain backbone (same shape, batch, context, bits) minus 1."""
    base = {(r["shape"], r["batch"], r["context"], r["method"], r["bits"]): r[key] for r in rows}
    for r in rows:
        if r.get("backbone"):
            ref = base.get((r["shape"], r["batch"], r["context"], r["backbone"], r["bits"]))
            r["gear_over"] = r[key] / ref - 1 if ref else None


def kernel_call(device: str, q, ks, vs, k_new, v_new, scale, config):
    """One decode query through the device's kernel (stores' tensors as given)."""
    if device == "cpu":
        from gear_compile.kernels import cpu
        cpu.load()
        kd, vd = list(ks.layout.kernel_descriptor), list(vs.layout.kernel_descriptor)
        return lambda kp, vp: torch.ops.gear.attention_cpu(q, kp, vp, k_new, v_new, None, scale,
                                                            False, kd, vd)
    from gear_compile.kernels.decode_attention import decode_attention_launch
    text = config.to_json()
    return lambda kp, vp: decode_attention_launch(q, kp, vp, k_new, v_new, None, scale, text)


def rotating(fn, copies):
    """A call that takes the next copy of its arguments each time (a model's
    next layer)."""
    state = {"i": 0}

    def call():
        args = copies[state["i"] % len(copies)]
        state["i"] += 1
        return fn(*args)
    return call


def measure(args, time_us, device: str, save) -> list[dict]:
    """The timed grid: SDPA, then the kernel and decompress+SDPA per method,
    for each shape, batch and context; save(rows) after each context, so a
    run cut short keeps what it measured."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    rows = []
    t_start = time.perf_counter()
    for Hq, Hkv, D in args.shapes:
        shape = f"{Hq}/{Hkv}/{D}"
        scale = D ** -0.5
        for B in args.batch:
            for L in args.context:
                dense = 2 * B * Hkv * L * D * dtype.itemsize
                if rows and args.max_seconds is not None \
                        and time.perf_counter() - t_start > args.max_seconds:
                    print(f"stop before {shape} batch {B} context {L}: --max-seconds "
                          f"{args.max_seconds:g} reached", flush=True)
                    return rows
                if dense > args.max_dense_gb * 1e9:
                    print(f"skip {shape} batch {B} context {L}: dense K+V {dense / 1e9:.1f} GB "
                          f"> --max-dense-gb {args.max_dense_gb:g}", flush=True)
                    continue
                rows += measure_cell(args, time_us, device, dtype, shape, Hq, Hkv, D, B, L, scale)
                backbone_overhead(rows, "us")
                save(rows)
    return rows


def measure_cell(args, time_us, device, dtype, shape, Hq, Hkv, D, B, L, scale) -> list[dict]:
    """Every method at one shape, batch and context."""
    dense = 2 * B * Hkv * L * D * dtype.itemsize
    n_copies = 1 if device != "cpu" or args.cold_mb <= 0 else max(1, -(-int(args.cold_mb * 1e6) // dense))
    dev = "cuda" if device == "cuda" else "cpu"
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
    k_new, v_new = (torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype) for _ in range(2))
    dense_kv = [tuple(torch.randn(B, Hkv, L, D, device=dev, dtype=dtype) for _ in range(2))
                for _ in range(n_copies)]
    calls, meta, results = {}, {}, {}
    if device == "cuda":       # the fastest SDPA backend, then the dense K/V are freed
        t_ref, backend, mode = best_sdpa(q, *dense_kv[0], scale, time_us, args.iters, args.warmup)
        results["sdpa"] = (t_ref, mode)
        dense_kv = None
    else:
        backend = "default"
        calls["sdpa"] = rotating(lambda k, v: F.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=True), dense_kv)
    meta["sdpa"] = dict(method=f"{'fp32' if dtype == torch.float32 else 'fp16'} sdpa ({backend})",
                        bits=dtype.itemsize * 8, bytes=dense)
    for method, bits, cfg in configs(args):
        ks = build_store(cfg, "k", B, Hkv, L - 1, D, dev, dtype)
        vs = build_store(cfg, "v", B, Hkv, L - 1, D, dev, dtype)
        # live lengths on the device, as in a compiled model: nothing to copy per call
        copies = [([t.clone() for t in ks.tensors()], [t.clone() for t in vs.tensors()])
                  for _ in range(n_copies)]
        moved = live_bytes(ks) + live_bytes(vs)
        text = cfg.to_json()
        calls[(method, bits)] = rotating(kernel_call(device, q, ks, vs, k_new, v_new, scale, cfg), copies)
        calls[("decompress", method, bits)] = rotating(lambda kp, vp, text=text: torch.ops.gear.attention_reference(
            q, kp, vp, k_new, v_new, None, scale, False, text), copies)
        meta[(method, bits)] = dict(method=method, bits=bits, bytes=moved, ceiling=dense / moved,
                                    backbone=backbone_of(method, cfg, D))
        meta[("decompress", method, bits)] = dict(method=f"decompress+sdpa {method}", bits=bits,
                                           bytes=moved + 2 * dense,
                                           ceiling=dense / (moved + 2 * dense))
    if device == "cpu":      # kernels with SDPA; the slow decompress+SDPA calls apart, fewer times
        fast = {k: fn for k, fn in calls.items() if k[0] != "decompress"}
        slow = {k: fn for k, fn in calls.items() if k[0] == "decompress"}
        timed = time_interleaved(fast, args.iters, args.warmup)
        timed.update(time_interleaved(slow, max(1, args.iters // 5), min(1, args.warmup)))
        results = {k: (us, "eager") for k, us in timed.items()}
    else:
        for key, fn in calls.items():
            if key[0] == "decompress":
                results[key] = time_us(fn, max(1, args.iters // 5), min(2, args.warmup))
            else:
                us, mode = time_us(fn, args.iters, args.warmup)
                eager = time_us(fn, args.iters, 0, graph=False)[0] if mode == "graph" else us
                results[key] = (us, mode, eager)
    t_ref = results["sdpa"][0]
    rows = []
    for key, m in meta.items():
        us, mode = results[key][:2]
        row = dict(dict(ceiling=1.0), shape=shape, batch=B, context=L, us=us, mode=mode,
                   layers=n_copies, speedup=t_ref / us, **m)
        if device == "cuda" and key != "sdpa" and key[0] != "decompress":
            row["eager_us"] = results[key][2]
        rows.append(row)
        if key != "sdpa":
            print(f"{shape} B={B:3d} L={L:7d} {row['method']:24s} {row['bits']:2d}b "
                  f"{us:10.1f} us  x{row['speedup']:.2f} (ceiling x{row['ceiling']:.2f})", flush=True)
    return rows


def bytes_model(args) -> list[dict]:
    """Per method, the bytes one decode step moves (built on the CPU at batch
    1, fp16, scaled by the batch) and the speedup ceiling they allow."""
    rows = []
    for Hq, Hkv, D in args.shapes:
        shape = f"{Hq}/{Hkv}/{D}"
        for L in args.context:
            for method, bits, cfg in configs(args):
                t0 = time.perf_counter()
                ks = build_store(cfg, "k", 1, Hkv, L, D, "cpu")
                vs = build_store(cfg, "v", 1, Hkv, L, D, "cpu")
                k_bytes, v_bytes = live_bytes(ks), live_bytes(vs)
                print(f"{shape} L={L:7d} {method:7s} {bits:2d}b  K {k_bytes / 1e6:9.2f} MB/seq  "
                      f"V {v_bytes / 1e6:9.2f} MB/seq  ({time.perf_counter() - t0:.1f} s)", flush=True)
                for B in args.batch:
                    dense = 2 * B * Hkv * L * D * 2
                    moved = B * (k_bytes + v_bytes)
                    rows.append(dict(shape=shape, batch=B, context=L, method=method, bits=bits,
                                     dense=dense, k=B * k_bytes, v=B * v_bytes, moved=moved,
                                     ceiling=dense / moved, backbone=backbone_of(method, cfg, D)))
    backbone_overhead(rows, "moved")
    return rows


def machine_lines(args, device: str) -> list[str]:
    """Device, versions and the command, for a results file's header."""
    import triton

    import gear_compile
    cpu = f"CPU {cpu_name()}, {torch.get_num_threads()} torch threads"
    name = {"cuda": f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
            if device == "cuda" else "",
            "cpu": f"{cpu}; kernel path {_cpu_isa()}",
            "interpret": f"{cpu}, Triton interpreter: latencies are the interpreter's, NOT a "
                         "measurement; this run checks the script",
            "bytes": f"{cpu} (byte counts only, no timing)"}[device]
    return [f"- device: {name}",
            f"- torch {torch.__version__}, triton {triton.__version__}, "
            f"gear_compile {getattr(gear_compile, '__version__', '?')}",
            f"- command: `python benchmarks/decode_attention.py {' '.join(args.argv)}`"] + (
                [f"- gear / gear_l option overrides: {args.overrides}"] if args.overrides else [])


def _cpu_isa() -> str:
    """The instruction set the C++ kernel runs (gear_compile.kernels.cpu.isa)."""
    from gear_compile.kernels import cpu
    return cpu.isa() if cpu.available() else "unavailable (reference path)"


def peak_gbps(args, device: str) -> float | None:
    if args.peak_gbps is not None or device != "cuda":
        return args.peak_gbps
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return gbps
    sys.exit(f"unknown peak HBM bandwidth for {name!r}; pass --peak-gbps "
             f"(known: {', '.join(PEAK_GBPS)})")


def verdict(rows, peak, device: str) -> list[str]:
    return verdict_cpu(rows) if device == "cpu" else verdict_gpu(rows, peak)


def verdict_gpu(rows, peak) -> list[str]:
    """Issue 5's targets at batch 16, context 32k, from the measured rows."""
    at = [r for r in rows if r["batch"] == TARGET["batch"] and r["context"] == TARGET["context"]]
    if not at:
        return [f"(batch {TARGET['batch']}, context {TARGET['context']} not in this run: "
                "no verdict on the targets)"]
    out = [f"## Targets at batch {TARGET['batch']}, context {TARGET['context']}", ""]
    for r in at:
        if r["method"] in ("kcvt", "kivi", "gear", "gear_l"):
            need = TARGET["speedup"].get(r["bits"])
            line = f"- {r['shape']} {r['method']} {r['bits']}-bit: x{r['speedup']:.2f} vs FP16 SDPA"
            if need:
                line += f" (target >= x{need:g}: {'met' if r['speedup'] >= need else 'MISSED'})"
            if peak:
                frac = gbps(r) / peak
                line += (f"; {100 * frac:.0f} % of peak HBM (target >= "
                         f"{100 * TARGET['peak']:.0f} %: {'met' if frac >= TARGET['peak'] else 'MISSED'})")
            if r.get("gear_over") is not None:
                ok = r["gear_over"] <= TARGET["gear_overhead"]
                line += (f"; GEAR terms +{100 * r['gear_over']:.0f} % over {r['backbone']} "
                         f"(target <= {100 * TARGET['gear_overhead']:.0f} %: {'met' if ok else 'MISSED'})")
            out.append(line)
    return out + [""]


CPU_TARGETS = [  # (bits, context, speedup over fp32 SDPA) of issue 10
    (4, 8192, 1.0), (4, 32768, 1.5), (2, 32768, 1.5)]


def verdict_cpu(rows) -> list[str]:
    """Issue 10's CPU targets: 4-bit >= 1.0x fp32 SDPA at 8k and >= 1.5x at 32k,
    >= 4x decompress-then-SDPA; 2-bit >= 1.5x at 32k (every GEAR variant and
    backbone, every shape and batch measured)."""
    out = ["## Targets (issue 10, CPU)", ""]
    decompressed = {(r["shape"], r["batch"], r["context"], r["method"].split()[-1], r["bits"]): r["us"]
                    for r in rows if r["method"].startswith("decompress")}
    for bits, L, need in CPU_TARGETS:
        for r in rows:
            if r["bits"] == bits and r["context"] == L and r["method"] in ("kcvt", "kivi", "gear_l", "gear"):
                line = (f"- {r['shape']} batch {r['batch']} {r['method']}-{bits} at {L}: "
                        f"x{r['speedup']:.2f} vs fp32 SDPA (target >= x{need:g}: "
                        f"{'met' if r['speedup'] >= need else 'MISSED'})")
                d = decompressed.get((r["shape"], r["batch"], L, r["method"], bits))
                if bits == 4 and d:
                    ratio = d / r["us"]
                    line += f"; x{ratio:.1f} vs decompress+SDPA (target >= x4: {'met' if ratio >= 4 else 'MISSED'})"
                out.append(line)
    if len(out) == 2:
        out.append("(no measured row at the targets' contexts)")
    return out + [""]


def write_timed(args, rows, device):
    peak = peak_gbps(args, device)
    what = {"cuda": "the Triton kernel, fp16", "cpu": "the C++ kernel, fp32",
            "interpret": "the Triton kernel under the interpreter"}[device]
    head = [f"# Decode attention, one layer: {what}", ""] + machine_lines(args, device) + [
        (f"- peak HBM bandwidth taken as {peak:g} GB/s" if peak else "- peak bandwidth: n/a")
        + f"; latencies are medians of {args.iters} timings after {args.warmup} warm-up calls"
        + (" (decompress+sdpa: "
           f"{max(1, args.iters // 5)} after {min(2, args.warmup)})" if device == "cuda" else
           ", SDPA and every kernel timed in turn, round by round (decompress+sdpa: "
           f"{max(1, args.iters // 5)} rounds of its own)"),
        "- timing `graph`: replays of a CUDA graph of the call (GPU time only); `eager`: "
        "launches timed as they come. `eager us` (GPU kernel rows): the same call "
        "launched from Python each time, i.e. with the launcher's host overhead",
        "- `layers`: copies of the K/V cycled through, call by call, so that each call reads "
        "its layer from memory as a model's decode step does (CPU)", ""]
    table = ["| shape | batch | context | method | bits | layers | timing | us | eager us | GB/s | "
             "% peak | ceiling | speedup | GEAR +% |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        over = f"{100 * r['gear_over']:+.0f}" if r.get("gear_over") is not None else ""
        pct = f"{100 * gbps(r) / peak:.0f}%" if peak else "n/a"
        eager = f"{r['eager_us']:.1f}" if "eager_us" in r else ""
        table.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['method']} | {r['bits']} | "
                     f"{r['layers']} | {r['mode']} | {r['us']:.1f} | {eager} | {gbps(r):.3g} | {pct} | "
                     f"{r['ceiling']:.2f} | {r['speedup']:.2f} | {over} |")
    stem = {"cuda": "decode_attention", "cpu": "decode_attention_cpu",
            "interpret": "decode_attention_interpreter"}[device]
    text = "\n".join(head + verdict(rows, peak, device) + table) + "\n"
    return stem, text


def write_bytes(args, rows):
    head = ["# Decode attention byte model, fp16 inputs", "",
            "Bytes one decode step must move per layer (stores built on the CPU at batch 1 "
            f"from a {DECODE}-token-shorter prompt plus {DECODE} decoded tokens, scaled by the "
            "batch; no kernel runs): the live K and V stores, which is all the kernel reads "
            "(its partial outputs, under 1 %, aside). `ceiling` = FP16 K+V bytes / moved "
            "bytes: the speedup over FP16 SDPA of a kernel moving its bytes at SDPA's "
            "bandwidth. `GEAR +%`: bytes over the plain backbone.", ""] + machine_lines(args, "bytes") + [""]
    table = ["| shape | batch | context | method | bits | FP16 MB | K MB | V MB | "
             "% of FP16 | ceiling | GEAR +% |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["shape"], r["batch"], r["context"])):
        over = f"{100 * r['gear_over']:+.0f}" if r.get("gear_over") is not None else ""
        table.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['method']} | {r['bits']} | "
                     f"{r['dense'] / 1e6:.4g} | {r['k'] / 1e6:.4g} | {r['v'] / 1e6:.4g} | "
                     f"{100 * r['moved'] / r['dense']:.1f} | "
                     f"{r['ceiling']:.2f} | {over} |")
    return "decode_attention_bytes", "\n".join(head + table) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = "bytes" if args.bytes_only else args.device
    if device == "interpret":
        # the kernel module must be imported after this for triton.jit to interpret
        os.environ["TRITON_INTERPRET"] = "1"
    elif device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/decode_attention.py --device cuda needs a CUDA GPU; none is visible "
                 "here. Use --device cpu for the CPU kernel, --bytes-only for the byte model, "
                 "or --device interpret to check this script under the Triton interpreter.")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(stem, text):
        stem = args.prefix + stem
        (args.out / f"{stem}.md").write_text(text)
        return stem, text

    if args.bytes_only:
        stem, text = save(*write_bytes(args, bytes_model(args)))
    else:
        timer = make_timer(device, graphs=not args.no_graphs)
        rows = measure(args, timer, device, lambda rows: save(*write_timed(args, rows, device)))
        stem, text = save(*write_timed(args, rows, device))
        plot(rows, args.out / f"{stem}.png")
    print(text)
    print(f"wrote {args.out / stem}.md")


def plot(rows, path):
    """Speedup vs context: one panel per shape and batch, a line per method
    and bit width (kernel solid, decompress+sdpa dashed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    panels = sorted({(r["shape"], r["batch"]) for r in rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, B) in zip(axes[0], panels):
        lines = {}
        for r in rows:
            if (r["shape"], r["batch"]) == (shape, B) and "sdpa (" not in r["method"]:
                lines.setdefault((r["method"], r["bits"]), []).append((r["context"], r["speedup"]))
        for (method, bits), pts in sorted(lines.items()):
            style = "--" if method.startswith("decompress") else "-"
            ax.plot(*zip(*pts), style, marker="o", label=f"{method} {bits}b")
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="speedup vs SDPA",
               title=f"Hq/Hkv/D {shape}, batch {B}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
