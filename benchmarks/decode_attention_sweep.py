"""Where the Triton decode kernel's time goes, on a GPU: its latency at one
shape, batch and context as the launch changes, per method, against the
fastest SDPA. Two knobs:

  splits  programs per (batch, KV head) over the token range (0: the
          launcher's default, about PROGRAMS_PER_SM per SM): does the kernel
          lack parallelism (too few loads in flight)?
  tile    the prefill tile's tokens per iteration (a fixed
          `decode_plan.TileConfig` instead of the autotuner's choice):
          does each iteration move too few bytes?

A kernel that is bandwidth-bound barely moves with either; one that is
latency-bound speeds up with both. Writes decode_attention_sweep.md (one row
per method and launch: us, GB/s of its live bytes, % of the device's peak,
and the max abs error against decompress + SDPA of the same store).

  python benchmarks/decode_attention_sweep.py --batch 16 --context 32768 \\
      --methods none kcvt:4 kivi:2 gear:4 --splits 0 32 --tiles 32 64 128
  python benchmarks/decode_attention_sweep.py --device interpret --batch 1 \\
      --context 300 --shape 4/2/64 --iters 1 --warmup 0   # checks the script

Neighbours: decode_attention.py (the benchmark whose stores, timer and byte
count this reuses), gear_compile.kernels.decode_attention (the launcher).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "interpret"], default="cuda")
    p.add_argument("--shape", default="32/8/128", metavar="HQ/HKV/D")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--methods", nargs="+", default=["none", "kcvt:4", "kivi:2", "gear:4"],
                   metavar="METHOD:BITS")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 32])
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "interpret":
        os.environ["TRITON_INTERPRET"] = "1"      # before the kernel module is imported
    elif not torch.cuda.is_available():
        sys.exit("decode_attention_sweep.py needs a CUDA GPU (or --device interpret).")
    import decode_attention as bench

    sdpa_us, rows = sweep(args, bench)
    machine = bench.machine_lines(argparse.Namespace(argv=[], overrides={}), args.device)[:2]
    write(args, rows, sdpa_us, machine)
    return rows


def sweep(args, bench) -> tuple[float, list[dict]]:
    """SDPA's latency, and a row per method, tile and splits."""
    from gear_compile.config import GearConfig
    from gear_compile.kernels import decode_attention as kernel

    dev = "cuda" if args.device == "cuda" else "cpu"
    Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
    B, L, dtype = args.batch, args.context, torch.float16
    time_us = bench.make_timer(args.device, graphs=True)
    torch.manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
    k_new, v_new = (torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype) for _ in range(2))
    dense = [torch.randn(B, Hkv, L, D, device=dev, dtype=dtype) for _ in range(2)]
    sdpa_us = time_us(lambda: F.scaled_dot_product_attention(q, *dense, scale=D ** -0.5, enable_gqa=True),
                      args.iters, args.warmup)[0]
    dense.clear()       # the stores below need the memory
    peak = bench.peak_gbps(argparse.Namespace(peak_gbps=None), args.device)
    rows = []
    for spec in args.methods:
        method, _, bits = spec.partition(":")
        cfg = GearConfig.from_options(dict(method=method, bits=int(bits or 4)))
        ks, vs = (bench.build_store(cfg, kind, B, Hkv, L - 1, D, dev, dtype) for kind in "kv")
        moved = bench.live_bytes(ks) + bench.live_bytes(vs)
        text = cfg.to_json()
        ref = torch.ops.gear.attention_reference(q, ks.tensors(), vs.tensors(), k_new, v_new, None,
                                                 D ** -0.5, False, text).float()
        for tile in args.tiles:
            for splits in args.splits:
                def call():
                    return kernel.decode_attention_launch(q, ks.tensors(), vs.tensors(), k_new,
                                                          v_new, None, D ** -0.5, text,
                                                          num_splits=splits or None,
                                                          tile_config=kernel.TileConfig(
                                                              tile, kernel.DEFAULT_TILE_CONFIG.warps,
                                                              kernel.DEFAULT_TILE_CONFIG.stages))
                err = (call().float() - ref).abs().max().item()
                us = time_us(call, args.iters, args.warmup)[0]
                gbps = moved / (us * 1e-6) / 1e9
                rows.append(dict(method=spec, tile=tile, splits=splits or "default", us=us,
                                 gbps=gbps, peak=f"{100 * gbps / peak:.0f}%" if peak else "n/a",
                                 speedup=sdpa_us / us, err=err))
                print(f"{spec:8s} tile {tile:4d} splits {splits or 'default':>7} {us:9.1f} us "
                      f"{gbps:8.1f} GB/s  x{sdpa_us / us:.2f} vs SDPA  max err {err:.1e}", flush=True)
    return sdpa_us, rows


def write(args, rows, sdpa_us, machine):
    lines = ["# Decode kernel launch sweep", "", *machine,
             f"- command: `python benchmarks/decode_attention_sweep.py {' '.join(sys.argv[1:])}`",
             f"- shape {args.shape}, batch {args.batch}, context {args.context}, fp16; "
             f"fastest SDPA: {sdpa_us:.1f} us", "",
             "| method | tile | splits | us | GB/s | % peak | speedup vs SDPA | max abs error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['tile']} | {r['splits']} | {r['us']:.1f} | {r['gbps']:.1f} | "
              f"{r['peak']} | {r['speedup']:.2f} | {r['err']:.1e} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("decode_attention_sweep.md" if args.device == "cuda"
                       else "decode_attention_sweep_interpreter.md")
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
