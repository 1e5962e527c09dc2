"""LoRC on a real model: perplexity against KV bytes for each rank schedule
and basis, alone and under the GEAR codec.

Usage:
    python benchmarks/lorc.py                        # the run of results/lorc.md
    python benchmarks/lorc.py --reductions 0.6 --prompt-lengths 64 --tokens 256   # quick look

Model, text and protocol are the quality benchmark's (`quality.py`): SmolLM2-
135M-Instruct in fp32, Emma's held-out passage, prefill P tokens, then one
token at a time through the decode path, every next token scored.
Calibration (`gear_compile.lorc.calibrate`) reads another passage.

How LoRC runs here: eagerly, as the compiled graph does it (`gear_compile.
passes.lorc`; tests/test_lorc.py checks the two give the same logits), ~10x
faster than compiling per configuration. `gear_compile.lorc.plan` chooses the
ranks and factors as the backend does; each layer's k_proj / v_proj output
(K before RoPE, and V) is projected to its latent by a forward hook: that is
what the cache holds, exactly or in a GEAR `KVStore` with the quality
benchmark's streaming protocol (prefill block compressed, n_b-token exact
buffer), beside the prompt's first `sinks` tokens exact. The prompt attends
its exact K/V; each decode step attends the past K rebuilt from the latents
(its sinks exact, then RoPE at the cached positions) and its own exact K,
and the V of every latent (sinks exact). With every rank full this is the
dense model.

KV bytes, % of the same K/V in fp16: LoRC alone counts the latent and the
sinks in fp16; with GEAR, and for GEAR alone, the bytes the stores hold at
the end of the pass (`KVStore.nbytes`, the exact buffer, held in fp16 for
this fp32 model (`GearConfig.held_dtype`), included, as in quality.md) plus
LoRC's sinks in the model's fp32.
Outputs: benchmarks/results/lorc.md and lorc.png.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import quality_data as qd  # noqa: E402
import quality_methods as qm  # noqa: E402
import torch  # noqa: E402
from quality import cpu_name, kl_cell, log, score, top1_agreement  # noqa: E402

from gear_compile.config import GearConfig  # noqa: E402

RESULTS = os.path.join(HERE, "results")

GEAR_OPTIONS = {"GEAR-4": dict(method="gear", bits=4),
                "GEAR-2": dict(method="gear", bits=2, group_size=32)}


# ---------------------------------------------------------------- the LoRC plan
def kv_projections(model):
    """[(k_proj, v_proj)] per decoder layer (Llama-style attention modules)."""
    return [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in model.model.layers]


# ---------------------------------------------------------------- the method
class LoRCMethod:
    """A LoRC cache (latents exact, or under a GEAR codec) for streaming_ppl.
    basis: "loss" / "moment" / "weights" (`gear_compile.lorc.plan`; the first
    two need `lorc.calibrate` to have run on the model); sinks: the first
    tokens kept exact (GearConfig.lorc_sinks)."""

    def __init__(self, label, reduction, schedule="auto", per="layer", gear=None, multiple=None,
                 basis="loss", sinks=4):
        self.label, self.reduction, self.schedule, self.per = label, reduction, schedule, per
        self.gear, self.multiple, self.basis, self.sinks = gear, multiple, basis, sinks
        self.hooks, self.plan = [], None

    def describe(self) -> str:
        codec = f" + {self.gear}" if self.gear else ""
        return (f"lorc={self.reduction:g} {self.schedule} per {self.per}, {self.basis} basis, "
                f"{self.sinks} sinks{codec}")

    def codec(self, model):
        """The codec of the latents, its defaults chosen by the model's head dim
        as the backend chooses them (`GearConfig.for_head_dim`)."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return GearConfig.from_options(GEAR_OPTIONS[self.gear] if self.gear else {"method": "none"}) \
            .for_head_dim(head_dim)

    def setup(self, model):
        from gear_compile import lorc
        multiple = self.multiple or (self.codec(model).rank_unit if self.gear else 8)
        heads = model.config.num_key_value_heads
        projections = [tuple((p.weight, p.bias) for p in pair) for pair in kv_projections(model)]
        self.plan = lorc.plan(projections, 1.0 - self.reduction, self.schedule,
                              multiple * (heads if self.per == "head" else 1), self.basis, self.per, heads)
        self.pending, self.exact = {}, {}
        for l, (k_proj, v_proj) in enumerate(kv_projections(model)):
            for i, proj in enumerate((k_proj, v_proj)):
                def hook(module, args, out, l=l, i=i):
                    latent = lorc.project(out, self.plan.factors[l][i])     # [B, T, r] or [B, T, H, r/H]
                    self.pending[l, i] = latent.unsqueeze(1) if latent.dim() == 3 else latent.transpose(1, 2)
                    if (l, i) not in self.exact:                                # the prefill's first tokens
                        self.exact[l, i] = out[:, :self.sinks].clone()
                self.hooks.append(proj.register_forward_hook(hook))
        self.rotary, self.kv_heads = model.model.rotary_emb, model.config.num_key_value_heads

    @property
    def ranks(self):
        return {"k": self.plan.ranks[0], "v": self.plan.ranks[1], "schedule": self.plan.schedule}

    def teardown(self, model):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def new_cache(self, model):
        from transformers.cache_utils import Cache

        config = self.codec(model)
        self.exact = {}
        return Cache(layers=[LoRCLayer(self, l, config) for l in range(len(self.plan.factors))])

    def rebuild(self, latent, l: int, i: int):
        """[B, Hl, T, r] latents -> [B, H, T, d] K (RoPE at positions 0..T-1) or
        V, the first `sinks` tokens exact."""
        import torch
        from transformers.models.llama.modeling_llama import rotate_half

        from gear_compile import lorc
        f = self.plan.factors[l][i]
        x = latent.squeeze(1) if f.down.dim() == 2 else latent.transpose(1, 2)
        out = lorc.rebuild(x, f)
        exact = self.exact[l, i]
        out = torch.cat([exact, out[:, exact.shape[1]:]], dim=1).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        if i == 1:
            return out
        positions = torch.arange(out.shape[2], device=out.device)[None]
        cos, sin = self.rotary(out, positions)
        return out * cos[:, None] + rotate_half(out) * sin[:, None]

    def cache_bytes(self, cache) -> int:
        tokens = cache.get_seq_length()
        sinks = sum(t.numel() * 2 for t in self.exact.values())             # fp16, as the latents
        if self.gear:
            return sum(layer.nbytes() for layer in cache.layers) + 2 * sinks   # the model's fp32
        return sum(sum(r) for r in self.plan.ranks) * tokens * 2 + sinks       # latents in fp16

    def cache_tokens(self, cache) -> int:
        return cache.get_seq_length()


class LoRCLayer(qm.GearSimLayer):
    """Holds one layer's K and V latents in KVStores (method none: exactly).
    As in the compiled graph (`gear_compile.passes.lorc`), the prompt attends
    its exact K/V; each decode step attends K rebuilt from the past's latents
    (its sinks exact) followed by the step's own exact K, and V from every
    latent, its own included (the graph attends the latents and up-projects
    the output, adding the sinks' residuals)."""

    def __init__(self, method: LoRCMethod, index: int, config):
        super().__init__(config)
        self.method, self.index = method, index

    def update(self, key_states, value_states, *args, **kwargs):
        k_lat = self.method.pending.pop((self.index, 0))
        v_lat = self.method.pending.pop((self.index, 1))
        prefill = self.stores is None
        k_seen, v_seen = super().update(k_lat, v_lat)
        if prefill:
            return key_states, value_states
        k_past = self.method.rebuild(k_seen[:, :, :-key_states.shape[2]], self.index, 0)
        return torch.cat([k_past, key_states], dim=2), self.method.rebuild(v_seen, self.index, 1)


# ---------------------------------------------------------------- the run
def methods_for(reductions, gear_labels, weight_reductions=(0.6,), ablations=(0.6,),
                compared=(0.3, 0.45, 0.6)):
    """(label, method) in run order: dense, GEAR alone, LoRC with the paper's
    weight-SVD basis, then with the loss-aware factors and sinks: the
    calibrated schedule alone and under each GEAR codec, the paper's
    progressive and uniform schedules at the `compared` reductions, and the
    ablations: without sinks, the input-moment basis (the previous release),
    and per KV head."""
    rows = [("dense", qm.Method("dense", None))]
    rows += [(g, qm.Method(g, GEAR_OPTIONS[g])) for g in gear_labels]
    for r in (r for r in reductions if r in weight_reductions):
        for schedule in ("progressive", "uniform"):
            label = f"LoRC-{100 * r:g} {schedule} weights"
            rows.append((label, LoRCMethod(label, r, schedule, basis="weights", sinks=0)))
    for r in reductions:
        pct = f"LoRC-{100 * r:g}"
        schedules = ("calibrated", "progressive", "uniform") if r in compared else ("calibrated",)
        rows += [(f"{pct} {s}", LoRCMethod(f"{pct} {s}", r, s)) for s in schedules]
        rows += [(f"{pct} + {g}", LoRCMethod(f"{pct} + {g}", r, "calibrated", gear=g)) for g in gear_labels]
        if r in ablations:
            rows += [(f"{pct} calibrated no sinks", LoRCMethod(f"{pct} calibrated no sinks", r, "calibrated",
                                                               sinks=0)),
                     (f"{pct} progressive moment basis no sinks",
                      LoRCMethod(f"{pct} progressive moment basis no sinks", r, "progressive", basis="moment",
                                 sinks=0)),
                     (f"{pct} progressive per head moment basis",
                      LoRCMethod(f"{pct} progressive per head moment basis", r, "progressive", "head",
                                 basis="moment"))]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the passage scored (prompt included)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512])
    p.add_argument("--reductions", type=float, nargs="+", default=[0.15, 0.3, 0.45, 0.6],
                   help="fractions of the K/V cache LoRC removes")
    p.add_argument("--gear", nargs="*", default=list(GEAR_OPTIONS), choices=list(GEAR_OPTIONS),
                   help="GEAR codecs to run alone and under LoRC")
    p.add_argument("--calibration-tokens", type=int, default=8192,
                   help="tokens of the dev passage (never scored) that lorc.calibrate reads")
    p.add_argument("--only", nargs="+", default=None, help="run only these labels (and dense)")
    p.add_argument("--prefix", default="lorc", help="output file prefix under benchmarks/results/")
    p.add_argument("--no-install", action="store_true")
    args = p.parse_args(argv)

    qd.ensure_python_packages(not args.no_install)
    import torch
    import transformers
    rows = methods_for(args.reductions, args.gear)
    if args.only:
        valid = [label for label, _ in rows]
        unknown = sorted(set(args.only) - set(valid))
        if unknown:
            p.error(f"unknown labels {unknown}; valid: {valid}")
        rows = [(label, m) for label, m in rows if label == "dense" or label in args.only]
    t0 = time.time()
    model, tok = qd.load_model(not args.no_install)
    corpus = qd.Corpus(tok, not args.no_install)
    ids = corpus.passage("test", args.tokens)
    log(f"lorc: model and text loaded in {time.time() - t0:.0f} s")
    if any(isinstance(m, LoRCMethod) and m.basis != "weights" for _, m in rows):
        t1 = time.time()
        from gear_compile import lorc
        lorc.calibrate(model, corpus.passage("dev", args.calibration_tokens))
        log(f"lorc: calibrated on {args.calibration_tokens} dev tokens in {time.time() - t1:.0f} s")
    header = [f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"python {platform.python_version()}",
              "command: `python " + " ".join([os.path.relpath(__file__, qd.REPO)] + (argv or sys.argv[1:])) + "`",
              f"text: Emma, test passage (VOLUME III, CHAPTER I onward), first {args.tokens} tokens; "
              "SmolLM2-135M-Instruct fp32 on CPU; protocol of quality.py (prefill P, then one token at a time)",
              "LoRC runs eagerly (module docstring): latents from k_proj / v_proj hooks, cached exactly or "
              "in GEAR KVStores, K rebuilt then RoPE'd at the cached positions",
              "factors (gear_compile/lorc.py): 'weights' = the paper's SVD of [W | b]; 'moment' = the "
              "principal directions of K/V on calibration text; 'loss' (the default) = loss-aware, from "
              f"gear_compile.lorc.calibrate over {args.calibration_tokens} tokens of Emma's dev passage "
              "(VOLUME I, never scored); schedules: calibrated (water-filling the estimated loss over "
              "layers and K/V), progressive (the paper's cumulative condition number), uniform; "
              "sinks: the first tokens kept exact (GearConfig.lorc_sinks)",
              "KV % of fp16: LoRC alone: the latents and sinks in fp16 over the dense K/V in fp16; GEAR and "
              "LoRC + GEAR: bytes the stores hold at the end (the exact buffer in fp16, LoRC's sinks in fp32 "
              "and reserved decode capacity included)",
              f"GEAR codecs: {', '.join(f'{g} = {GEAR_OPTIONS[g]}' for g in args.gear)}; under LoRC the "
              "latent is one 'head' per layer, its ranks in multiples of the codec's rank_unit at the model's head dim (8; 32 where KIVI groups 32 channels)"]
    results, plans = {}, {}
    for label, m in rows:
        log(f"lorc: {label}")
        m.setup(model)
        try:
            if isinstance(m, LoRCMethod):
                plans[label] = m.ranks
            score(model, m, ids, args.prompt_lengths, label, results, "lorc")
        finally:
            m.teardown(model)
        write_outputs(args, header, results, plans, model)
    log(f"lorc: done in {time.time() - t0:.0f} s")


def write_outputs(args, header, results, plans, model):
    lines = ["# LoRC on SmolLM2-135M-Instruct: perplexity vs KV bytes", ""]
    lines += [f"- {h}" for h in header] + [""]
    for P, rs in results.items():
        dense = rs.get("dense")
        lines += [f"## P = {P} prompt tokens, {args.tokens - P - 1} tokens decoded one at a time and scored", "",
                  "| method | config | ppl | delta vs dense | KL to dense, 1e-3 nats/token (± SE) | KV % of fp16 "
                  "| top-1 agreement | decode tok/s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in rs.items():
            delta = 100 * (r["ppl"] / dense["ppl"] - 1) if dense else float("nan")
            agree = 100 * top1_agreement(r, dense) if dense else float("nan")
            lines.append(f"| {label} | {r['config']} | {r['ppl']:.3f} | {delta:+.2f} % | {kl_cell(r)} | "
                         f"{100 * r['kv_bytes'] / r['dense_bytes']:.1f} % | {agree:.1f} % | {r['decode_tok_s']:.1f} |")
        lines.append("")
        lines += verdict(rs)
    if plans:
        c = model.config
        lines += [f"## Ranks per layer (K / V), out of {c.num_key_value_heads * c.head_dim}", ""]
        lines += [f"- {label} ({ranks['schedule']}): K {ranks['k']}; V {ranks['v']}"
                  for label, ranks in plans.items()] + [""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.prefix}.md"), "w") as f:
        f.write("\n".join(lines))
    plot(results, os.path.join(RESULTS, f"{args.prefix}.png"))


def verdict(rs: dict) -> list[str]:
    """The issue's three targets, from one prompt length's rows."""
    dense = rs.get("dense")
    if not dense:
        return []

    def delta(label):
        return 100 * (rs[label]["ppl"] / dense["ppl"] - 1) if label in rs else None

    def kv(label):
        return 100 * rs[label]["kv_bytes"] / rs[label]["dense_bytes"]

    out = []
    for label in [lab for lab in rs if lab.endswith(" progressive") or lab.endswith(" progressive weights")]:
        other = label.replace("progressive", "uniform")
        if other in rs:
            d_p, d_u = delta(label), delta(other)
            out.append(f"- {label} {d_p:+.2f} % vs {other} {d_u:+.2f} %: progressive "
                       f"{'beats' if d_p < d_u else 'does NOT beat'} uniform at equal bytes")
    for label in [lab for lab in rs if lab.endswith(" calibrated")]:
        others = [o for o in (label.replace("calibrated", s) for s in ("progressive", "uniform")) if o in rs]
        if others:
            best = min(others, key=delta)
            out.append(f"- {label} {delta(label):+.2f} % vs the better of the paper's schedules ({best}) "
                       f"{delta(best):+.2f} %")
    if "LoRC-60 calibrated" in rs:
        d = delta("LoRC-60 calibrated")
        out.append(f"- LoRC-60 calibrated alone: {d:+.2f} % (target <= +2 %: {'met' if d <= 2 else 'MISSED'})")
    if "GEAR-4" in rs:
        combos = [lab for lab in rs if lab.endswith("+ GEAR-4") and delta(lab) <= 1.0]
        best = min(combos, key=kv) if combos else None
        if best and kv(best) < kv("GEAR-4"):
            out.append(f"- {best}: {delta(best):+.2f} % at {kv(best):.1f} % KV vs GEAR-4 alone "
                       f"{delta('GEAR-4'):+.2f} % at {kv('GEAR-4'):.1f} % (target: smaller at <= +1 %: met)")
        else:
            out.append("- no LoRC + GEAR-4 row is smaller than GEAR-4 alone at <= +1 % (target: MISSED)")
    return out + [""]


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("lorc: matplotlib missing, no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (P, rs) in zip(axes[0], results.items()):
        dense = rs.get("dense")
        if not dense:
            continue
        lines = {}
        for label, r in rs.items():
            if label == "dense":
                continue
            series = label.split(" ", 1)[1] if label.startswith("LoRC-") else label
            lines.setdefault(series, []).append(
                (100 * r["kv_bytes"] / r["dense_bytes"], 100 * (r["ppl"] / dense["ppl"] - 1)))
        for series, pts in lines.items():
            pts.sort()
            style = "o" if len(pts) == 1 else "o-"
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=series, markersize=5)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("KV bytes, % of the dense cache in fp16")
        ax.set_ylabel("perplexity delta vs dense, %")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"SmolLM2-135M, Emma, P = {P}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
