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

    python benchmarks/lorc.py --bound                # results/lorc_bound.md

prints instead the machine's measured FMA rate, each LoRC row's rebuild (its
multiply-adds, its rate and share of the FMA rate, predicted against measured
tok/s at a 2k prompt) and how many 8k-token sequences each of dense, GEAR-4,
LoRC-30, GEAR-4 + LoRC-30 and GEAR-4 + LoRC-15 fits in a fixed KV budget.
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
from machine import cpu_name  # noqa: E402
from quality import kl_cell, log, score, top1_agreement  # noqa: E402

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
    p.add_argument("--score-text", default=qd.NOVEL,
                   help="the novel scored: emma (same source as the calibration: its VOLUME III) or another "
                        "of janeaustenr's (persuasion, prideprejudice, sensesensibility, mansfieldpark, "
                        "northangerabbey): cross-source, calibration still on Emma's VOLUME I")
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
    ids = scored_ids(corpus, tok, args)
    log(f"lorc: model and text loaded in {time.time() - t0:.0f} s")
    if any(isinstance(m, LoRCMethod) and m.basis != "weights" for _, m in rows):
        t1 = time.time()
        from gear_compile import lorc
        lorc.calibrate(model, corpus.passage("dev", args.calibration_tokens))
        log(f"lorc: calibrated on {args.calibration_tokens} dev tokens in {time.time() - t1:.0f} s")
    header = [f"machine: {cpu_name()}, torch threads {torch.get_num_threads()}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"python {platform.python_version()}",
              "command: `python " + " ".join([os.path.relpath(__file__, qd.REPO)] + (argv or sys.argv[1:])) + "`",
              (f"text: Emma, test passage (VOLUME III, CHAPTER I onward), first {args.tokens} tokens "
               "(same source as the calibration text); " if args.score_text == qd.NOVEL else
               f"text: {args.score_text} (janeaustenr), from its first chapter, first {args.tokens} tokens "
               "(cross-source: another book than the calibration text); ") +
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
              "and reserved decode capacity included). gear_compile.kv_bytes on a compiled LoRC-alone cache "
              "is higher than the LoRC-alone figure here because it counts what is allocated: the decode "
              "segment's reserved capacity and the empty buffer too (kv_breakdown's 'unused capacity' and "
              "'buffer empty'); without them the two agree to the ranks (`--bound` prints both)",
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


def scored_ids(corpus, tokenizer, args):
    """[1, tokens] of the scored text: Emma's test passage, or (cross-source)
    another novel from its first chapter heading on."""
    if args.score_text == qd.NOVEL:
        return corpus.passage("test", args.tokens)
    text = qd.paragraphs(qd.novel_lines(args.score_text, not args.no_install))
    starts = [i for i in (text.find("CHAPTER 1"), text.find("Chapter 1"), text.find("CHAPTER I")) if i >= 0]
    start = min(starts) if starts else 0
    ids = tokenizer(text[start:start + 200_000], return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < args.tokens:
        raise ValueError(f"{args.score_text} has only {ids.shape[1]} tokens, asked {args.tokens}")
    return ids[:, :args.tokens]


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


# ---------------------------------------------------------------- the compute bound (--bound)
# LoRC's K is rebuilt each step: L * r_k * H_kv * d multiply-adds per layer
# (RoPE makes each position's K its own: nothing folds into q). So its decode
# speed is bounded by the machine's FMA rate, and what it buys is memory.
BOUND_METHODS = {
    "dense": None,
    "GEAR-4": dict(method="gear", bits=4),
    "LoRC-30": dict(method="none", lorc=0.3),
    "GEAR-4 + LoRC-30": dict(method="gear", bits=4, lorc=0.3),
    "GEAR-4 + LoRC-15": dict(method="gear", bits=4, lorc=0.15),
}
BASE_OF = {"LoRC-30": "dense", "GEAR-4 + LoRC-30": "GEAR-4", "GEAR-4 + LoRC-15": "GEAR-4"}


def fma_rate(seconds: float = 2.0) -> float:
    """The machine's fp32 multiply-adds per second on all of torch's threads:
    the best of repeated 1024^3 sgemms (oneDNN / MKL reach ~90 % of peak)."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 1024 ** 3 / best


def _median_step(model, ids, steps: int, warmup: int = 3):
    """Prefill ids, then `steps` greedy one-token calls after `warmup`: the
    median step in seconds and the cache."""
    import statistics

    import torch
    from transformers import DynamicCache

    from gear_compile.hf_compat import cache_kwarg
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model, cache)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, **kw, use_cache=True, logits_to_keep=1)
        for i in range(warmup + steps):
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            out = model(input_ids=nxt, **kw, use_cache=True, logits_to_keep=1)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times), cache


def _kernel_time(cache, model, repeats: int = 20) -> float:
    """Seconds a step spends in gear::lorc_attention_cpu: the op run on each
    layer's latent stores of `cache` with a random query (best of repeats,
    summed over layers)."""
    import torch
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H, Hq = c.num_key_value_heads, c.num_attention_heads
    total = 0.0
    for layer in cache.layers:
        ks, vs = layer.keys.store, layer.values.store
        B, L = ks.buffer.shape[0], len(ks)
        rk, rv = ks.buffer.shape[-1], vs.buffer.shape[-1]
        uk, uv = torch.randn(H, rk, d) / rk ** 0.5, torch.randn(H, rv, d) / rv ** 0.5
        q, k_new, v_lat = torch.randn(B, Hq, 1, d), torch.randn(B, H, 1, d), torch.randn(B, 1, 1, rv)
        pos = torch.arange(L, dtype=torch.float32)[None, :, None] * torch.rand(d // 2)
        cos = torch.cat([pos, pos], -1).cos()[:, None]
        sin = torch.cat([pos, pos], -1).sin()[:, None]
        args = (q, ks.tensors()[:-1], vs.tensors()[:-1], ks.lorc_sinks, vs.lorc_sinks, k_new, v_lat, uk, uv,
                cos, sin, None, d ** -0.5, False, list(ks.layout.kernel_descriptor),
                list(vs.layout.kernel_descriptor), 1, d)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.ops.gear.lorc_attention_cpu(*args)
            times.append(time.perf_counter() - t)
        total += min(times)
    return total


def rebuild_rate(L: int = 2048, heads: int = 3, group: int = 3, d: int = 64, rank: int = 128,
                 repeats: int = 20) -> float:
    """The rebuild's own rate, multiply-adds per second: the fused kernel on
    exact fp32 latent stores at ranks `rank` and 2 * rank (SmolLM2's shape at
    LoRC-30: r_k ~ 134), the difference in time over the difference in
    multiply-adds (what the rest of the kernel costs cancels); best of repeats."""
    import torch

    from gear_compile.config import GearConfig
    from gear_compile.kernels import cpu
    from gear_compile.store import KVStore
    cpu.load()
    codec = GearConfig(method="none").codec
    times = []
    for rk in (rank, 2 * rank):
        ks = KVStore.from_prefill(torch.randn(1, 1, L, rk), codec, "k")
        vs = KVStore.from_prefill(torch.randn(1, 1, L, 32), codec, "v")
        pos = torch.arange(L, dtype=torch.float32)[None, :, None] * torch.rand(d // 2)
        cos, sin = torch.cat([pos, pos], -1).cos()[:, None], torch.cat([pos, pos], -1).sin()[:, None]
        args = (torch.randn(1, heads * group, 1, d), ks.tensors(), vs.tensors(), torch.randn(1, heads, 4, d),
                torch.randn(1, heads, 4, d), torch.randn(1, heads, 1, d), torch.randn(1, 1, 1, 32),
                torch.randn(heads, rk, d), torch.randn(heads, 32, d), cos, sin, None, d ** -0.5, False,
                list(ks.layout.kernel_descriptor), list(vs.layout.kernel_descriptor), 1, d)
        run = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.ops.gear.lorc_attention_cpu(*args)
            run.append(time.perf_counter() - t)
        times.append(min(run))
    extra = times[1] - times[0]
    return L * rank * heads * d / extra if extra > 0 else float("nan")     # nan: timing noise won


def _held_and_used(cache) -> tuple[int, int]:
    """KV bytes as allocated (`gear_compile.kv_bytes`: the reserved decode
    capacity and the empty buffer included) and those in use (without them)."""
    import gear_compile
    from gear_compile.store import RESERVED_KINDS
    b = gear_compile.kv_breakdown(cache)
    return b.held, b.held - sum(b.kinds.get(k, 0) for k in RESERVED_KINDS)


def _rebuild_fmas(cache, model) -> int:
    """K's rebuild per decode step: sum over layers of L * r_k * H_kv * d."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return sum(len(l.keys.store) * l.keys.store.buffer.shape[-1] * c.num_key_value_heads * d
               for l in cache.layers)


def bound_main(argv=None):
    p = argparse.ArgumentParser(description="LoRC's compute bound and its capacity under a memory budget")
    p.add_argument("--bound", action="store_true")
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens of the speed rows (batch 1)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per method")
    p.add_argument("--context", type=int, default=8192, help="context of the capacity rows")
    p.add_argument("--budget-gib", type=float, default=4.0, help="memory budget for the KV caches")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=list(BOUND_METHODS), choices=list(BOUND_METHODS))
    p.add_argument("--prefix", default="lorc_bound", help="output file prefix under benchmarks/results/")
    p.add_argument("--no-install", action="store_true")
    args = p.parse_args(argv)
    import torch
    import transformers

    import gear_compile
    model, tok = qd.load_model(not args.no_install)
    corpus = qd.Corpus(tok, not args.no_install)
    if any(BOUND_METHODS[m] and BOUND_METHODS[m].get("lorc") for m in args.methods):
        gear_compile.lorc.calibrate(model, corpus.passage("dev", args.calibration_tokens))
    rate = fma_rate()
    own = rebuild_rate()
    log(f"bound: measured FMA rate {rate / 1e9:.1f} GFMA/s ({torch.get_num_threads()} threads); "
        f"the rebuild's own {own / 1e9:.1f} GFMA/s ({100 * own / rate:.0f} %)")
    prompt = corpus.passage("test", args.prompt)[:, :args.prompt]
    long = corpus.passage("test", args.context)[:, :args.context]
    rows = {}
    for name in args.methods:
        options = BOUND_METHODS[name]
        if options is not None:
            gear_compile.compile(model, **options)
        try:
            step, cache = _median_step(model, prompt, args.steps)
            row = {"step": step, "kv": gear_compile.kv_bytes(cache)}
            if options and options.get("lorc"):
                row["fmas"] = _rebuild_fmas(cache, model)
                row["kernel"] = _kernel_time(cache, model)
            del cache
            _, cache = _median_step(model, long, 1, warmup=0)
            row["kv_context"], row["kv_context_used"] = _held_and_used(cache)
            del cache
        finally:
            model.__dict__.pop("forward", None)
            torch._dynamo.reset()
        rows[name] = row
        log(f"bound: {name}: {1 / row['step']:.2f} tok/s, KV at {args.context}: {row['kv_context'] / 2**20:.1f} MiB")
    budget = args.budget_gib * 2 ** 30
    lines = ["# LoRC's compute bound and capacity: SmolLM2-135M-Instruct (fp32), CPU", "",
             f"- machine: {cpu_name()}, {torch.get_num_threads()} threads, {platform.platform()}",
             f"- torch {torch.__version__}, transformers {transformers.__version__}",
             f"- command: `python benchmarks/lorc.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- measured FMA rate (fp32 sgemm 1024^3, best of 2 s): **{rate / 1e9:.1f} GFMA/s**",
             f"- the rebuild's own rate (fused kernel at r_k 128 and 256, 2k tokens, 3 KV heads x 64: the "
             f"difference in time over the difference in multiply-adds): **{own / 1e9:.1f} GFMA/s, "
             f"{100 * own / rate:.0f} % of the FMA rate**",
             "- rebuild: L * r_k * H_kv * d multiply-adds per layer and step (K under RoPE cannot fold into q); "
             "kernel: the step's gear::lorc_attention_cpu calls, timed alone on the run's stores; "
             "rebuild rate: rebuild FMAs / kernel time (the whole kernel counted as rebuild: a lower bound); "
             "predicted: the base method's measured step plus the rebuild at the measured FMA rate",
             "", f"## Speed (prompt {args.prompt}, batch 1, {args.steps} steps, methods one after another)", "",
             "| method | tok/s | x dense | rebuild MFMA / step | kernel ms / step | rebuild GFMA/s | % of FMA rate "
             "| predicted tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    dense = rows.get("dense", {}).get("step")
    for name, row in rows.items():
        x = f"{dense / row['step']:.2f}x" if dense else ""
        if "fmas" in row:
            achieved = row["fmas"] / row["kernel"]
            base = rows.get(BASE_OF[name], {}).get("step")
            pred = f"{1 / (base + row['fmas'] / rate):.2f}" if base else ""
            lines.append(f"| {name} | {1 / row['step']:.2f} | {x} | {row['fmas'] / 1e6:.1f} | {row['kernel'] * 1e3:.1f} "
                         f"| {achieved / 1e9:.1f} | {100 * achieved / rate:.0f} % | {pred} |")
        else:
            lines.append(f"| {name} | {1 / row['step']:.2f} | {x} | | | | | |")
    lines += ["", f"## Capacity: sequences of {args.context} tokens in a {args.budget_gib:g} GiB KV budget", "",
              "| method | KV MiB / sequence, held | in use | held % of dense | sequences that fit (held) "
              "| x GEAR-4 | fit (in use) | x GEAR-4 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    g4 = rows.get("GEAR-4")
    for name, row in rows.items():
        kv, used = row["kv_context"], row["kv_context_used"]
        ref = f"{(budget // kv) / (budget // g4['kv_context']):.2f}x" if g4 else ""
        ref_used = f"{(budget // used) / (budget // g4['kv_context_used']):.2f}x" if g4 else ""
        pct = f"{100 * kv / rows['dense']['kv_context']:.1f} %" if "dense" in rows else ""
        lines.append(f"| {name} | {kv / 2**20:.1f} | {used / 2**20:.1f} | {pct} | {int(budget // kv)} | {ref} "
                     f"| {int(budget // used)} | {ref_used} |")
    lines += ["", "held: `gear_compile.kv_bytes` (as allocated: the dense cache in the model's fp32; the "
              "stores' reserved decode capacity and empty buffer, the exact buffer and sinks included); "
              "in use: without the reserved room (`kv_breakdown`'s 'unused capacity' and 'buffer empty'). "
              "The weights are not in the budget.",
              "", "Quality of these rows: results/lorc.md (perplexity); LoRC pays where decoding is memory-bound "
              "(many sequences or long contexts in a fixed memory), not in tok/s at batch 1, where the rebuild's "
              "multiply-adds are added to a step that dense spends reading K."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(RESULTS, f"{args.prefix}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    bound_main() if "--bound" in sys.argv[1:] else main()
