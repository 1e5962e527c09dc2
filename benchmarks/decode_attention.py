"""Decode-attention latency: the GEAR Triton kernel vs dense FP16 SDPA vs
dequantize-then-SDPA (what Hugging Face's QuantizedCache does each step).

For each batch size, context length, method and bit width it builds a layer's
compressed K/V (a prompt of context - DECODE tokens, then DECODE appended
tokens, so the prefill block, several decode blocks and a partly full buffer
are all live), times one decode query against it with CUDA events (warm-up,
then the median of --iters timed calls), and reports

  us        median latency of one call (one layer)
  GB/s      bytes the method moves / time: for the kernel, the live part of
            the store (codes, scales, zero points, low-rank factors, outliers,
            buffer; its partial outputs, under 1 %, are left out); for FP16
            SDPA, dense K and V; for dequantize+SDPA, the store plus writing
            and re-reading dense K/V
  % peak    GB/s / the device's peak HBM bandwidth (--peak-gbps; known for
            H100 SXM and H200)
  ceiling   FP16 bytes / this method's bytes: the speedup a kernel running at
            FP16 SDPA's bandwidth would reach
  speedup   FP16 SDPA time / this method's time
  GEAR +%   time of gear / gear_l over its plain backbone (kcvt at 4 bits,
            kivi at 2), the cost of the low-rank and sparse terms

The method `none` (uncompressed fp16 store, read by the same kernel) is the
control: it separates the kernel's efficiency from the compression's gain.
Writes benchmarks/results/decode_attention.md, a plot of speedup vs context
(decode_attention.png: a line per method and bit width, one panel per batch
size) and a verdict on issue 5's targets at batch 16, context 32k.

  python benchmarks/decode_attention.py                 # the grid, on a CUDA GPU
  python benchmarks/decode_attention.py --batch 16 --context 32768   # the targets' cell
  python benchmarks/decode_attention.py --max-seconds 500 --prefix part1_   # within 600 s
  python benchmarks/decode_attention.py --bytes-only    # the byte model, any machine
  python benchmarks/decode_attention.py --device cpu --batch 1 --context 400 \\
      --iters 1 --warmup 0      # the interpreter: checks the script, times nothing real

--bytes-only builds the stores on the CPU (at batch 1: every part scales
linearly with the batch) and writes decode_attention_bytes.md: what each
method must move per decode step and hence its speedup ceiling.

Neighbours: gear_compile.kernels.decode_attention (the kernel),
gear_compile.compressed_kv (builds the stores).
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

DECODE = 150  # tokens appended after the prompt: kcvt (n_b=20) 7 decode blocks + 10 buffered,
              # kivi (n_b=64) 2 blocks + 22 buffered
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0,
             "H100 PCIe": 2000.0, "H200": 4800.0}
TARGET = dict(batch=16, context=32768, peak=0.80, speedup={4: 3.0, 2: 5.0}, gear_overhead=0.15)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 131072])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["none", "kcvt", "kivi", "gear_l", "gear"],
                   help="gear_compile methods (none: the fp16 control)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="override a gear / gear_l option, e.g. --option outlier_ratio=0.01 "
                        "--option rank_prefill=2 (the backbones keep their defaults)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu runs the kernel under TRITON_INTERPRET=1: a check of this "
                        "script, not a measurement")
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
                   help="skip shapes whose dense FP16 K+V exceed this many GB")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--prefix", default="", help="prepended to the output file names")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
    by the wall clock on the CPU (the interpreter)."""
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


def build_store(config, kind, B, H, L, D, device):
    """A store holding L tokens; compressed once at batch 1 and repeated over
    the batch (the kernel's cost does not depend on the values)."""
    from gear_compile.compressed_kv import KVStore

    x = torch.randn(1, H, L, D, device=device, dtype=torch.float16)
    store = KVStore.from_prefill(x[:, :, :L - DECODE], config, kind)
    store = store.grow(DECODE)
    store.append(x[:, :, L - DECODE:])
    if B == 1:
        return store
    parts = [t if i == 0 else t.repeat(B, *([1] * (t.dim() - 1)))
             for i, t in enumerate(store.tensors())]
    return KVStore.from_tensors(config, kind, parts)


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


def backbone_of(method: str, cfg) -> str | None:
    """The plain method a gear / gear_l row is compared with (None for the rest)."""
    return cfg.quantizer if method in ("gear", "gear_l") else None


def gbps(row) -> float:
    """A timed row's achieved bandwidth: the bytes it moves over its latency."""
    return row["bytes"] / (row["us"] * 1e-6) / 1e9


def backbone_overhead(rows, key: str) -> None:
    """Adds `gear_over` to gear / gear_l rows: rows[key] over the row of the
    plain backbone (same batch, context, bits) minus 1."""
    base = {(r["batch"], r["context"], r["method"], r["bits"]): r[key] for r in rows}
    for r in rows:
        if r.get("backbone"):
            ref = base.get((r["batch"], r["context"], r["backbone"], r["bits"]))
            r["gear_over"] = r[key] / ref - 1 if ref else None


def measure(args, time_us, device: str, save) -> list[dict]:
    """The timed grid: FP16 SDPA, then the kernel and dequantize+SDPA per
    method, for each batch and context; save(rows) after each context, so a
    run cut short keeps what it measured."""
    from gear_compile.kernels.decode_attention import decode_attention_launch

    Hq, Hkv, D = args.q_heads, args.kv_heads, args.head_dim
    scale = D ** -0.5
    rows = []
    t_start = time.perf_counter()
    for B in args.batch:
        for L in args.context:
            dense = 2 * B * Hkv * L * D * 2
            if rows and args.max_seconds is not None \
                    and time.perf_counter() - t_start > args.max_seconds:
                print(f"stop before batch {B} context {L}: --max-seconds {args.max_seconds:g} "
                      "reached", flush=True)
                return rows
            if dense > args.max_dense_gb * 1e9:
                print(f"skip batch {B} context {L}: dense K+V {dense / 1e9:.1f} GB "
                      f"> --max-dense-gb {args.max_dense_gb:g}", flush=True)
                continue
            q = torch.randn(B, Hq, 1, D, device=device, dtype=torch.float16)
            k = torch.randn(B, Hkv, L, D, device=device, dtype=torch.float16)
            v = torch.randn_like(k)
            t_ref, backend, mode = best_sdpa(q, k, v, scale, time_us, args.iters, args.warmup)
            del k, v
            rows.append(dict(batch=B, context=L, method=f"fp16 sdpa ({backend})", bits=16,
                             us=t_ref, mode=mode, bytes=dense, ceiling=1.0, speedup=1.0))
            for method, bits, cfg in configs(args):
                ks = build_store(cfg, "k", B, Hkv, L, D, device)
                vs = build_store(cfg, "v", B, Hkv, L, D, device)
                # live lengths on the device, as in a compiled model: nothing to copy per call
                kp, vp = ([t.to(device) for t in s.tensors()] for s in (ks, vs))
                text = cfg.to_json()

                def kernel():
                    return decode_attention_launch(q, kp, vp, None, scale, text)
                t_k, mode = time_us(kernel, args.iters, args.warmup)
                t_eager = time_us(kernel, args.iters, 0, graph=False)[0] if mode == "graph" else t_k
                moved = live_bytes(ks) + live_bytes(vs)
                rows.append(dict(batch=B, context=L, method=method, bits=bits, us=t_k, mode=mode,
                                 eager_us=t_eager, bytes=moved, ceiling=dense / moved,
                                 speedup=t_ref / t_k, backbone=backbone_of(method, cfg)))

                def deq_sdpa():
                    return F.scaled_dot_product_attention(
                        q, ks.dequantize(), vs.dequantize(), scale=scale, enable_gqa=True)
                t_d, mode = time_us(deq_sdpa, max(1, args.iters // 5), min(2, args.warmup))
                rows.append(dict(batch=B, context=L, method=f"dequantize+sdpa {method}",
                                 bits=bits, us=t_d, mode=mode, bytes=moved + 2 * dense,
                                 ceiling=dense / (moved + 2 * dense), speedup=t_ref / t_d))
                del ks, vs, kp, vp
                if device == "cuda":
                    torch.cuda.empty_cache()
                for r in rows[-2:]:
                    print(f"B={B:3d} L={L:7d} {r['method']:24s} {r['bits']:2d}b "
                          f"{r['us']:10.1f} us  x{r['speedup']:.2f} (ceiling x{r['ceiling']:.2f})",
                          flush=True)
            backbone_overhead(rows, "us")
            save(rows)
    return rows


def bytes_model(args) -> list[dict]:
    """Per method, the bytes one decode step moves (built on the CPU at batch
    1, scaled by the batch) and the speedup ceiling they allow."""
    Hkv, D = args.kv_heads, args.head_dim
    rows = []
    for L in args.context:
        for method, bits, cfg in configs(args):
            t0 = time.perf_counter()
            ks = build_store(cfg, "k", 1, Hkv, L, D, "cpu")
            vs = build_store(cfg, "v", 1, Hkv, L, D, "cpu")
            k_bytes, v_bytes = live_bytes(ks), live_bytes(vs)
            print(f"L={L:7d} {method:7s} {bits:2d}b  K {k_bytes / 1e6:9.2f} MB/seq  "
                  f"V {v_bytes / 1e6:9.2f} MB/seq  ({time.perf_counter() - t0:.1f} s)", flush=True)
            for B in args.batch:
                dense = 2 * B * Hkv * L * D * 2
                moved = B * (k_bytes + v_bytes)
                rows.append(dict(batch=B, context=L, method=method, bits=bits, dense=dense,
                                 k=B * k_bytes, v=B * v_bytes, moved=moved, ceiling=dense / moved,
                                 backbone=backbone_of(method, cfg)))
    backbone_overhead(rows, "moved")
    return rows


def machine_lines(args, device: str) -> list[str]:
    """Device, versions and the command, for a results file's header."""
    import platform

    import triton

    import gear_compile
    cpu = f"CPU {platform.processor() or platform.machine()}"
    name = {"cuda": f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
            if device == "cuda" else "",
            "cpu": f"{cpu}, Triton interpreter: latencies are the interpreter's, NOT a "
                   "measurement; this run checks the script",
            "bytes": f"{cpu} (byte counts only, no timing)"}[device]
    return [f"- device: {name}",
            f"- torch {torch.__version__}, triton {triton.__version__}, "
            f"gear_compile {getattr(gear_compile, '__version__', '?')}",
            f"- command: `python benchmarks/decode_attention.py {' '.join(args.argv)}`"] + (
                [f"- gear / gear_l option overrides: {args.overrides}"] if args.overrides else [])


def peak_gbps(args, device: str) -> float | None:
    if args.peak_gbps is not None or device != "cuda":
        return args.peak_gbps
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return gbps
    sys.exit(f"unknown peak HBM bandwidth for {name!r}; pass --peak-gbps "
             f"(known: {', '.join(PEAK_GBPS)})")


def verdict(rows, peak) -> list[str]:
    """Issue 5's targets at batch 16, context 32k, from the measured rows."""
    at = [r for r in rows if r["batch"] == TARGET["batch"] and r["context"] == TARGET["context"]]
    if not at:
        return [f"(batch {TARGET['batch']}, context {TARGET['context']} not in this run: "
                "no verdict on the targets)"]
    out = [f"## Targets at batch {TARGET['batch']}, context {TARGET['context']}", ""]
    for r in at:
        if r["method"] in ("kcvt", "kivi", "gear", "gear_l"):
            need = TARGET["speedup"].get(r["bits"])
            line = f"- {r['method']} {r['bits']}-bit: x{r['speedup']:.2f} vs FP16 SDPA"
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


def write_timed(args, rows, device):
    peak = peak_gbps(args, device)
    head = [f"# Decode attention, one layer: Hq={args.q_heads}, Hkv={args.kv_heads}, "
            f"D={args.head_dim}, fp16", ""] + machine_lines(args, device) + [
        (f"- peak HBM bandwidth taken as {peak:g} GB/s" if peak else "- peak HBM bandwidth: n/a")
        + f"; latencies are medians of "
        f"{args.iters} timings after {args.warmup} warm-up calls (dequantize+sdpa: "
        f"{max(1, args.iters // 5)} after {min(2, args.warmup)})",
        "- timing `graph`: replays of a CUDA graph of the call (GPU time only); `eager`: "
        "Python launches timed as they come. `eager us` (kernel rows): the same call "
        "launched from Python each time, i.e. with the launcher's host overhead", ""]
    table = ["| batch | context | method | bits | timing | us | eager us | GB/s | % peak | "
             "ceiling | speedup | GEAR +% |",
             "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        over = f"{100 * r['gear_over']:+.0f}" if r.get("gear_over") is not None else ""
        pct = f"{100 * gbps(r) / peak:.0f}%" if peak else "n/a"
        eager = f"{r['eager_us']:.1f}" if "eager_us" in r else ""
        table.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['bits']} | "
                     f"{r['mode']} | {r['us']:.1f} | {eager} | {gbps(r):.0f} | {pct} | "
                     f"{r['ceiling']:.2f} | {r['speedup']:.2f} | {over} |")
    stem = "decode_attention" if device == "cuda" else "decode_attention_interpreter"
    text = "\n".join(head + verdict(rows, peak) + table) + "\n"
    return stem, text


def write_bytes(args, rows):
    head = [f"# Decode attention byte model: Hq={args.q_heads}, Hkv={args.kv_heads}, "
            f"D={args.head_dim}, fp16 inputs", "",
            "Bytes one decode step must move per layer (stores built on the CPU at batch 1 "
            f"from a {DECODE}-token-shorter prompt plus {DECODE} decoded tokens, scaled by the "
            "batch; no kernel runs): the live K and V stores, which is all the kernel reads "
            "(its partial outputs, under 1 %, aside). `ceiling` = FP16 K+V bytes / moved "
            "bytes: the speedup over FP16 SDPA of a kernel moving its bytes at SDPA's "
            "bandwidth. `GEAR +%`: bytes over the plain backbone.", ""] + machine_lines(args, "bytes") + [""]
    table = ["| batch | context | method | bits | FP16 MB | K MB | V MB | "
             "% of FP16 | ceiling | GEAR +% |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["context"])):
        over = f"{100 * r['gear_over']:+.0f}" if r.get("gear_over") is not None else ""
        table.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['bits']} | "
                     f"{r['dense'] / 1e6:.4g} | {r['k'] / 1e6:.4g} | {r['v'] / 1e6:.4g} | "
                     f"{100 * r['moved'] / r['dense']:.1f} | "
                     f"{r['ceiling']:.2f} | {over} |")
    return "decode_attention_bytes", "\n".join(head + table) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = "cpu" if args.bytes_only else args.device
    if device == "cpu" and not args.bytes_only:
        # the kernel module must be imported after this for triton.jit to interpret
        os.environ["TRITON_INTERPRET"] = "1"
    elif device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/decode_attention.py needs a CUDA GPU for timings; none is visible "
                 "here. Use --bytes-only for the byte model, or --device cpu to check this "
                 "script under the Triton interpreter.")
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
        plot(rows, args.batch, args.out / f"{stem}.png")
    print(text)
    print(f"wrote {args.out / stem}.md")


def plot(rows, batches, path):
    """Speedup vs context: one panel per batch, a line per method and bit
    width (kernel solid, dequantize+sdpa dashed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        lines = {}
        for r in rows:
            if r["batch"] == B and not r["method"].startswith("fp16"):
                lines.setdefault((r["method"], r["bits"]), []).append((r["context"], r["speedup"]))
        for (method, bits), pts in sorted(lines.items()):
            style = "--" if method.startswith("dequantize") else "-"
            ax.plot(*zip(*pts), style, marker="o", label=f"{method} {bits}b")
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="speedup vs FP16 SDPA",
               title=f"batch {B}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
