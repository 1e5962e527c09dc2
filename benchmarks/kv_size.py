"""Reproduce the KV-size column of the GEAR paper's Table 1 from measured bytes.

Usage:
    python benchmarks/kv_size.py [--heads 32] [--head-dim 128] [--prefill 900] [--generate 256]
                                 [--out benchmarks/results/kv_size.md]

At the paper's setting (32 heads, head dim 128, a 900-token prefill then 256
tokens appended one at a time through the streaming buffer; n_b = 20 for the
KCVT rows, 64 for the KIVI and per-token rows, as in the paper) each method's
K and V stores are built with `KVStore.from_prefill` + `append`, and
`kv_bytes` (every part actually held: codes, scales, zero points, low-rank
factors, outlier values and indices, the exact buffer, reserved-but-unused
decode capacity) is divided by the FP16 bytes of the same K/V. The decode
capacity is reserved to what the run needs (`decode_capacity=generate`).

Reconstruction error is measured on synthetic K/V with the structure the
paper reports (K: a few large-magnitude channels; V: heavy-tailed; both with
a shared low-rank component across tokens), fixed seed: relative Frobenius
error of K, of V, and of both together.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch

from gear_compile.compressed_kv import KVStore
from gear_compile.config import GearConfig
from gear_compile.lowrank import relative_error

# (label, options, the paper's average KV size in % of FP16, Table 1 / Table 9)
ROWS = [
    ("KCVT-4", dict(method="kcvt", bits=4), 27.1),
    ("KIVI-4", dict(method="kivi", bits=4), 34.2),
    ("GEAR-L(KCVT-4, r4)", dict(method="gear_l", bits=4, backbone="kcvt"), 29.0),
    ("GEAR(KCVT-4, s2%, r4)", dict(method="gear", bits=4, backbone="kcvt"), 31.0),
    ("per-token-2 g64", dict(method="per_token", bits=2, group_size=64), 21.7),
    ("KIVI-2", dict(method="kivi", bits=2), 21.7),
    ("GEAR-L(KIVI-2)", dict(method="gear_l", bits=2, backbone="kivi"), 23.6),
    ("GEAR(KIVI-2)", dict(method="gear", bits=2, backbone="kivi"), 27.6),
]
PART_GROUPS = {"codes": ("codes",), "scale/zero": ("scale", "zero"), "low-rank": ("lr_a", "lr_b"),
               "outliers": ("out_val", "out_idx")}


def kv_like(heads, tokens, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, heads, tokens, 4, generator=g) @ torch.randn(1, heads, 4, head_dim, generator=g)
    k = torch.randn(1, heads, tokens, head_dim, generator=g) + 2 * shared
    k[..., : max(1, head_dim // 32)] *= 8
    torch.manual_seed(seed)
    v = torch.distributions.StudentT(3.0).sample((1, heads, tokens, head_dim)) + shared
    return k.half(), v.half()


def build(x, config, kind, prefill):
    store = KVStore.from_prefill(x[:, :, :prefill], config, kind)
    for t in range(prefill, x.shape[2]):
        store.append(x[:, :, t:t + 1])
    return store


def breakdown(store) -> dict:
    """Bytes per part; 'unused capacity' is the reserved decode room not yet filled."""
    out = {name: 0 for name in list(PART_GROUPS) + ["buffer", "unused capacity"]}
    n_dec = store.counts()[1]
    for seg, used in ((store.prefill, None), (store.decode, n_dec)):
        for name, t in seg.parts().items():
            group = next(g for g, names in PART_GROUPS.items() if name in names)
            nbytes = t.numel() * t.element_size()
            if used is not None and store.capacity:
                filled = nbytes * used // store.capacity
                out["unused capacity"] += nbytes - filled
                nbytes = filled
            out[group] += nbytes
    out["buffer"] = store.buffer.numel() * store.buffer.element_size()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prefill", type=int, default=900)
    p.add_argument("--generate", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/kv_size.md")
    args = p.parse_args(argv)

    total = args.prefill + args.generate
    k, v = kv_like(args.heads, total, args.head_dim)
    fp16 = 2 * k.numel() * 2
    lines = [
        "# KV size (paper Table 1 column) from measured bytes",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- setting: 1 sequence, {args.heads} KV heads, head dim {args.head_dim}, prefill {args.prefill} "
        f"tokens then {args.generate} appended one at a time; fp16 K/V; n_b = 20 (KCVT rows), "
        f"64 (KIVI / per-token rows); decode capacity reserved = {args.generate} tokens (whole blocks)",
        "- KV size = kv_bytes(K) + kv_bytes(V) over the FP16 bytes of the same K/V; every held part counted",
        "- error: relative Frobenius error on synthetic K/V (K: outlier channels; V: Student-t(3); "
        "shared rank-4 component), seed 0",
        "",
        "| method | KV size % (ours) | paper % | target (ours <= paper) | rel err K | rel err V | rel err K+V |"
        " codes % | scale/zero % | low-rank % | outliers % | buffer % | unused capacity % |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, options, paper in ROWS:
        start = time.time()
        config = GearConfig(decode_capacity=args.generate, **options)
        stores = [build(x, config, kind, args.prefill) for x, kind in ((k, "k"), (v, "v"))]
        held = sum(s.nbytes() for s in stores)
        parts = {}
        for s in stores:
            for name, b in breakdown(s).items():
                parts[name] = parts.get(name, 0) + b
        assert sum(parts.values()) == held
        ek = relative_error(k, stores[0].dequantize())
        ev = relative_error(v, stores[1].dequantize())
        nk, nv = k.float().norm().item() ** 2, v.float().norm().item() ** 2
        ekv = math.sqrt((ek ** 2 * nk + ev ** 2 * nv) / (nk + nv))
        ours = 100 * held / fp16
        verdict = "met" if ours <= paper else f"missed by {ours - paper:.1f} pt"
        pct = [f"{100 * parts[n] / fp16:.2f}" for n in
               ("codes", "scale/zero", "low-rank", "outliers", "buffer", "unused capacity")]
        lines.append(f"| {label} | {ours:.1f} | {paper:.1f} | {verdict} | {ek:.4f} | {ev:.4f} | {ekv:.4f} | "
                     + " | ".join(pct) + " |")
        print(f"{label:<24} ours {ours:5.1f} %  paper {paper:5.1f} %  {verdict:<16} "
              f"err K {ek:.4f} V {ev:.4f}  ({time.time() - start:.1f} s)", flush=True)
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
