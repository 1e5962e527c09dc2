"""Decode-attention latency: the GEAR Triton kernel vs dense FP16 SDPA vs
dequantize-then-SDPA (what Hugging Face's QuantizedCache does each step).

GPU only. For each batch size, context length, method and bit width it builds
a layer's compressed K/V (a prompt of context - DECODE tokens, then DECODE
appended tokens, so the prefill block, several decode blocks and a partly full
buffer are all live), times one decode query against it with CUDA events
(warm-up, then the median of --iters timed calls), and reports

  us        median latency of one call (one layer)
  GB/s      bytes the method reads from HBM / time: for the kernel, the live
            part of the store (codes, scales, zero points, low-rank factors,
            outliers, buffer); for FP16 SDPA, dense K and V; for
            dequantize+SDPA, the store plus writing and re-reading dense K/V
  % peak    GB/s / --peak-gbps (H100 SXM HBM3: 3350 GB/s)
  speedup   FP16 SDPA time / this method's time

and writes benchmarks/results/decode_attention.md and a plot of speedup vs
context (a line per method and bit width, one panel per batch size).

  python benchmarks/decode_attention.py --batch 1 8 64 --context 1024 16384 131072

Neighbours: gear_compile.kernels.decode_attention (the kernel),
gear_compile.compressed_kv (builds the stores).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DECODE = 150  # tokens appended after the prompt: kcvt (n_b=20) 7 decode blocks + 10 buffered,
              # kivi (n_b=64) 2 blocks + 22 buffered


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["gear", "gear_l", "kcvt", "kivi"])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--peak-gbps", type=float, default=3350.0,
                   help="peak HBM bandwidth of the device in GB/s (default: H100 SXM)")
    p.add_argument("--max-dense-gb", type=float, default=24.0,
                   help="skip shapes whose dense FP16 K+V exceed this many GB")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def time_us(fn, iters: int, warmup: int) -> float:
    """Median latency of fn() in microseconds, each call timed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def build_store(config, kind, B, H, L, D):
    """A store holding L tokens; compressed once at batch 1 and repeated over
    the batch (the kernel's cost does not depend on the values)."""
    from gear_compile.compressed_kv import KVStore

    x = torch.randn(1, H, L, D, device="cuda", dtype=torch.float16)
    store = KVStore.from_prefill(x[:, :, :L - DECODE], config, kind)
    store = store.grow(DECODE)
    store.append(x[:, :, L - DECODE:])
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


def best_sdpa(q, k, v, scale, iters, warmup):
    """Fastest SDPA backend that accepts the shapes: (us, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        try:
            run()
        except RuntimeError:
            continue
        best = min(best, (time_us(run, iters, warmup), backend.name))
    return best


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_attention.py needs a CUDA GPU (the kernel is Triton on CUDA); "
                 "none is visible here. Kernel correctness on CPU: "
                 "TRITON_INTERPRET=1 pytest tests/test_kernel_decode_attention.py")
    import triton

    from gear_compile.config import GearConfig
    from gear_compile.kernels.decode_attention import decode_attention_launch

    torch.manual_seed(0)
    B_list, Hq, Hkv, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    scale = D ** -0.5
    rows = []
    for B in B_list:
        for L in args.context:
            dense_bytes = 2 * B * Hkv * L * D * 2
            if dense_bytes > args.max_dense_gb * 1e9 or L <= DECODE:
                print(f"skip batch {B} context {L}: dense K+V {dense_bytes / 1e9:.1f} GB")
                continue
            q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
            k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            t_ref, backend = best_sdpa(q, k, v, scale, args.iters, args.warmup)
            del k, v
            rows.append(dict(batch=B, context=L, method=f"fp16 sdpa ({backend})", bits=16,
                             us=t_ref, bytes=dense_bytes, speedup=1.0))
            for method in args.methods:
                for bits in args.bits:
                    cfg = GearConfig(method=method, bits=bits)
                    ks = build_store(cfg, "k", B, Hkv, L, D)
                    vs = build_store(cfg, "v", B, Hkv, L, D)
                    kp, vp, text = ks.tensors(), vs.tensors(), cfg.to_json()
                    t_k = time_us(lambda: decode_attention_launch(q, kp, vp, None, scale, text),
                                  args.iters, args.warmup)
                    read = live_bytes(ks) + live_bytes(vs)
                    rows.append(dict(batch=B, context=L, method=f"gear kernel {method}", bits=bits,
                                     us=t_k, bytes=read, speedup=t_ref / t_k))

                    def deq_sdpa():
                        return F.scaled_dot_product_attention(
                            q, ks.dequantize(), vs.dequantize(), scale=scale, enable_gqa=True)
                    t_d = time_us(deq_sdpa, max(5, args.iters // 5), 2)
                    rows.append(dict(batch=B, context=L, method=f"dequantize+sdpa {method}",
                                     bits=bits, us=t_d, bytes=read + 2 * dense_bytes,
                                     speedup=t_ref / t_d))
                    del ks, vs
                    torch.cuda.empty_cache()
            for r in rows[-(1 + 2 * len(args.methods) * len(args.bits)):]:
                print(f"B={r['batch']:3d} L={r['context']:7d} {r['method']:28s} {r['bits']:2d}b "
                      f"{r['us']:10.1f} us  x{r['speedup']:.2f}")

    header = [f"# Decode attention, one layer: Hq={Hq}, Hkv={Hkv}, D={D}, fp16",
              "", f"- device: {torch.cuda.get_device_name()}",
              f"- torch {torch.__version__}, triton {triton.__version__}",
              f"- command: `python {' '.join(sys.argv)}`",
              f"- peak HBM bandwidth taken as {args.peak_gbps:g} GB/s; latencies are medians "
              f"of {args.iters} CUDA-event timings after {args.warmup} warm-up calls", ""]
    table = ["| batch | context | method | bits | us | GB/s | % peak | speedup vs FP16 SDPA |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gbps = r["bytes"] / (r["us"] * 1e-6) / 1e9
        table.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['bits']} | "
                     f"{r['us']:.1f} | {gbps:.0f} | {100 * gbps / args.peak_gbps:.0f}% | "
                     f"{r['speedup']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "decode_attention.md"
    md.write_text("\n".join(header + table) + "\n")
    print("\n".join(header + table))
    print(f"wrote {md}")
    plot(rows, B_list, args.out / "decode_attention.png")


def plot(rows, batches, path):
    """Speedup vs context: one panel per batch, a line per method and bit width."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        lines = {}
        for r in rows:
            if r["batch"] == B and r["bits"] != 16:
                lines.setdefault(f"{r['method']} {r['bits']}b", []).append((r["context"], r["speedup"]))
        for label, pts in sorted(lines.items()):
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="speedup vs FP16 SDPA",
               title=f"batch {B}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
