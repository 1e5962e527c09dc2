"""Reproduce the KV-size column of the GEAR paper's Table 1 from measured bytes.

Usage:
    python benchmarks/kv_size.py [--heads 32] [--head-dim 128] [--prefill 900] [--generate 256]
                                 [--capacity needed|N] [--out benchmarks/results/kv_size.md]

At the paper's setting (32 heads, head dim 128, a 900-token prefill then 256
tokens appended one at a time through the streaming buffer; n_b = 20 for the
KCVT rows, 64 for the KIVI and per-token rows, as in the paper) each method's
K and V stores are built with `KVStore.from_prefill` + `append`, and
`kv_bytes` (every part actually held: codes, scales, zero points, low-rank
factors, outlier values and indices, the exact buffer, reserved-but-unused
decode capacity) is divided by the FP16 bytes of the same K/V.

Decode capacity: `--capacity needed` (the default) reserves what the run will
flush, floor((prefill tokens left in the buffer + generate) / n_b) * n_b, as a
server that knows max_new_tokens can do up front; `--capacity N` reserves N
tokens instead and, as the compiled backend does, grows when a flush finds it
full (at least a quarter more, in whole blocks); its cost over the exact
reservation stays measurable. The buffer is counted at its
allocated n_b tokens, split into the tokens it holds and its empty slots.

Reconstruction error is measured on synthetic K/V with the structure the
paper reports, fixed seed: relative Frobenius error of K, of V, and of both
together. Why this data is realistic: KIVI (Liu et al. 2024, Fig. 2) and GEAR
(Sec. 3) show that keys of real LLMs carry a few fixed channels ~10x larger
than the rest (hence per-channel key quantization), that values have no
channel structure but heavy-tailed entries (hence per-token value
quantization and GEAR's sparse part), and that the quantization residual keeps
a coherent low-rank component across tokens (GEAR Fig. 2: fast-decaying
singular values), which is what L captures. So: K = N(0,1) + 2 * shared
rank-4 term, its first head_dim/32 channels scaled by 8; V = Student-t(3) +
the shared term. The ordering section checks the paper's claim on this data:
GEAR < GEAR-L < its backbone in K+V error.

The rows hold no exact sinks (`sink_tokens=0`): the paper's layout, and this
synthetic data has no attention sink. The product's default keeps 4 tokens
exact, 4 of these 1,156 tokens in fp16 (+0.35 pt of FP16 over the table).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time

import torch

from gear_compile.store import BYTE_KINDS, KVStore
from gear_compile.codec import Codec, resolve
from gear_compile.config import GearConfig
from gear_compile.lowrank import relative_error
from machine import cpu_name

# (label, options, the paper's average KV size in % of FP16, Table 1 / Table 9)
ROWS = [
    ("KCVT-4", dict(method="kcvt", bits=4, sink_tokens=0), 27.1),
    ("KIVI-4", dict(method="kivi", bits=4, sink_tokens=0), 34.2),
    ("GEAR-L(KCVT-4, r4)", dict(method="gear_l", bits=4, backbone="kcvt", sink_tokens=0), 29.0),
    ("GEAR(KCVT-4, s2%, r4)", dict(method="gear", bits=4, backbone="kcvt", sink_tokens=0), 31.0),
    ("per-token-2 g64", dict(method="per_token", bits=2, group_size=64, sink_tokens=0), 21.7),
    ("KIVI-2", dict(method="kivi", bits=2, sink_tokens=0), 21.7),
    ("GEAR-L(KIVI-2)", dict(method="gear_l", bits=2, backbone="kivi", sink_tokens=0), 23.6),
    ("GEAR(KIVI-2)", dict(method="gear", bits=2, backbone="kivi", sink_tokens=0), 27.6),
]
COLUMNS = BYTE_KINDS      # KVStore.breakdown: what each held byte holds
# the paper's claim, checked on the synthetic data: error(GEAR) < error(GEAR-L) < error(backbone)
ORDERINGS = [("GEAR(KCVT-4, s2%, r4)", "GEAR-L(KCVT-4, r4)", "KCVT-4"),
             ("GEAR(KIVI-2)", "GEAR-L(KIVI-2)", "KIVI-2")]
# GEAR's terms (low rank + outliers) over their backbone's bytes: issue 13's budget
TERMS_BUDGET = {4: 15.0, 2: 20.0}


def kv_like(heads, tokens, head_dim, seed=0):
    """fp16 K, V [1, heads, tokens, head_dim] with the structure described in the
    module docstring (outlier key channels, heavy-tailed values, shared rank 4)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, heads, tokens, 4, generator=g) @ torch.randn(1, heads, 4, head_dim, generator=g)
    k = torch.randn(1, heads, tokens, head_dim, generator=g) + 2 * shared
    k[..., : max(1, head_dim // 32)] *= 8
    torch.manual_seed(seed)
    v = torch.distributions.StudentT(3.0).sample((1, heads, tokens, head_dim)) + shared
    return k.half(), v.half()


def needed_capacity(config: Codec, prefill: int, generate: int) -> int:
    """Decode tokens the run will flush into the decode segment."""
    left = config.split(prefill).buffer
    return (left + generate) // config.block_size * config.block_size


def build(x, options, kind, prefill, capacity):
    """Prefill then append the rest one token at a time, as decoding does."""
    generate = x.shape[2] - prefill
    config = resolve(GearConfig(**options), x.shape[-1])      # the defaults the backend would choose
    reserve = needed_capacity(config, prefill, generate) if capacity == "needed" else int(capacity)
    config = dataclasses.replace(config, decode_capacity=max(1, reserve))
    store = KVStore.from_prefill(x[:, :, :prefill], config, kind)
    for t in range(prefill, x.shape[2]):
        store.append(x[:, :, t:t + 1])    # grows at a flush that finds it full, as the backend does
    return store


def per_tensor(stores) -> dict:
    """Bytes of each stored tensor over the K and V stores, decode parts counted
    over their filled blocks only (the rest is 'unused capacity')."""
    out = {}
    for store in stores:
        n_dec = store.counts()[1]
        for prefix, seg, used in (("p_", store.prefill, None), ("d_", store.decode, n_dec)):
            for name, t in seg.parts().items():
                nbytes = t.numel() * t.element_size()
                if used is not None:
                    nbytes = nbytes * used // store.capacity if store.capacity else 0
                out[prefix + name] = out.get(prefix + name, 0) + nbytes
    return out


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prefill", type=int, default=900)
    p.add_argument("--generate", type=int, default=256)
    p.add_argument("--capacity", default="needed",
                   help="decode tokens to reserve: 'needed' (what the run flushes) or a number")
    p.add_argument("--out", default="benchmarks/results/kv_size.md")
    args = p.parse_args(argv)
    if args.capacity != "needed" and not args.capacity.isdigit():
        p.error("--capacity must be 'needed' or a number of tokens")

    total = args.prefill + args.generate
    k, v = kv_like(args.heads, total, args.head_dim)
    fp16 = 2 * k.numel() * 2
    command = " ".join(["python", "benchmarks/kv_size.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# KV size (paper Table 1 column) from measured bytes",
        "",
        f"- machine: {machine()}; torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `{command}`",
        f"- setting: 1 sequence, {args.heads} KV heads, head dim {args.head_dim}, prefill {args.prefill} "
        f"tokens then {args.generate} appended one at a time; fp16 K/V; n_b = 20 (KCVT rows), "
        f"64 (KIVI / per-token rows); r_p = 4, r_g = 2, s = 2 %; decode capacity reserved: "
        + ("what the run flushes (whole blocks)" if args.capacity == "needed"
           else f"{args.capacity} tokens, grown as the backend does (at a flush that finds it full)"),
        "- KV size = kv_bytes(K) + kv_bytes(V) at the end of generation over the FP16 bytes of the "
        "same K/V; every held part counted; part columns in % of FP16 and sum to the KV size",
        "- error: relative Frobenius error on synthetic K/V (K: outlier channels; V: Student-t(3); "
        "shared rank-4 component; see the module docstring for why), seed 0",
        "",
        "| method | KV size % (ours) | paper % | target (ours <= paper) | rel err K | rel err V | rel err K+V | "
        + " | ".join(f"{c} %" for c in COLUMNS) + " |",
        "|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(COLUMNS),
    ]
    errors, details, sizes, floors = {}, {}, {}, {}
    for label, options, paper in ROWS:
        start = time.time()
        stores = [build(x, options, kind, args.prefill, args.capacity) for x, kind in ((k, "k"), (v, "v"))]
        held = sum(s.nbytes() for s in stores)
        parts = dict.fromkeys(COLUMNS, 0)
        for s in stores:
            for name, b in s.breakdown().items():
                parts[name] += b
        assert sum(parts.values()) == held, (parts, held)
        ek = relative_error(k, stores[0].decompress())
        ev = relative_error(v, stores[1].decompress())
        nk, nv = k.float().norm().item() ** 2, v.float().norm().item() ** 2
        ekv = math.sqrt((ek ** 2 * nk + ev ** 2 * nv) / (nk + nv))
        errors[label] = ekv
        details[label] = per_tensor(stores)
        ours = 100 * held / fp16
        sizes[label] = ours
        verdict = "met" if ours <= paper else f"MISSED by {ours - paper:.1f} pt"
        if ours > paper:   # what no encoding of K's per-block decode stats can take below
            k_stats = sum(b for n, b in per_tensor(stores[:1]).items() if n in ("d_scale", "d_zero"))
            floors[label] = (paper, 100 * (held - k_stats) / fp16,
                             100 * (parts["buffer held"] + parts["buffer empty"]) / fp16)
        pct = [f"{100 * parts[n] / fp16:.2f}" for n in COLUMNS]
        lines.append(f"| {label} | {ours:.1f} | {paper:.1f} | {verdict} | {ek:.4f} | {ev:.4f} | {ekv:.4f} | "
                     + " | ".join(pct) + " |")
        print(f"{label:<24} ours {ours:5.1f} %  paper {paper:5.1f} %  {verdict:<18} "
              f"err K {ek:.4f} V {ev:.4f} K+V {ekv:.4f}  ({time.time() - start:.1f} s)", flush=True)
    lines += ["", "Per stored tensor (K and V summed; prefill segment p_, decode segment d_, filled "
              "blocks only), % of FP16:", ""]
    for label, detail in details.items():
        lines.append(f"- {label}: " + ", ".join(f"{n} {100 * b / fp16:.2f}" for n, b in detail.items() if b))
    lines += ["", "Error ordering (the paper's claim: GEAR < GEAR-L < backbone, K+V error):", ""]
    for chain in ORDERINGS:
        holds = all(errors[a] < errors[b] for a, b in zip(chain, chain[1:]))
        lines.append("- " + " < ".join(f"{c} ({errors[c]:.4f})" for c in chain)
                     + (": holds" if holds else ": DOES NOT HOLD"))
        print(lines[-1])
    lines += ["", "GEAR's terms over the bytes of their backbone (budget: <= +15 % at 4 bits, "
              "<= +20 % at 2 bits):", ""]
    for gear, _, backbone in ORDERINGS:
        over = 100 * (sizes[gear] / sizes[backbone] - 1)
        budget = TERMS_BUDGET[int(backbone[-1])]
        lines.append(f"- {gear} over {backbone}: +{over:.1f} % ({'met' if over <= budget else 'MISSED'})")
        print(lines[-1])
    lines += [
        "", "Where the bytes above the paper's figures come from (fixed by the storage layout, "
        "which this benchmark does not change):", "",
        "- K scale/zero of decode blocks: one fp16 (scale, zero) per channel per n_b-token block "
        "= 2/n_b of those tokens' FP16 bytes (10 % of K at n_b = 20; 3.1 % at 64).",
        "- d_lr_b / d_lr_s: Algorithm 1 fits a rank-r_g L = A B^T to each n_b-token block, so each "
        "block stores its own B (D x r_g, int8) and one fp32 scale per rank: r_g/(2 n_b) of the "
        "block's FP16 bytes (5 % at n_b = 20, r_g = 2; fp16 B was 10 %); "
        "p_lr_a / d_lr_a: r int8 values per token = r/(2D) (1.6 % at r_p = 4, D = 128). Each "
        "column of A and of B is scaled to [-127, 127]; fp16 A and B took 1.2 pt more of the "
        "GEAR(KCVT-4) row at the same errors to 3 decimals.",
        "- outliers: each value is an int8 count of its group's quantization steps past what the "
        "codes rebuild there (`outliers.steps`; fp16 values took 1.55 pt of the GEAR(KCVT-4) row "
        "and 1.90 of GEAR(KIVI-2), K+V errors 0.0549 / 0.2571, now 0.0548 / 0.2523). K's outliers "
        "are tile-CSR records (`outliers.records`): per block, each outlier's value and a 16-bit "
        "(token mod 256, channel) position, sorted, plus one int32 pointer per 16-token tile, so "
        "a kernel finds a tile's outliers by two loads (3 bytes a record where the per-channel "
        "table with one-byte span offsets took about 2.4, but had to be walked or searched).",
        "- buffer: allocated at n_b tokens; held tokens are exact FP16, empty slots are still held.",
    ]
    if floors:
        lines += ["", "The rows that miss, with K's decode-block scale/zero taking no bytes at all (the "
                  "most any encoding or sharing of them could save):", ""]
        for label, (paper, floor, buffer) in floors.items():
            lines.append(f"- {label}: {floor:.2f} % against the paper's {paper:.1f} % "
                         + ("(still above: " if floor > paper else "(under: ")
                         + f"the exact streaming buffer, n_b FP16 tokens held and empty, is {buffer:.2f} %)")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
