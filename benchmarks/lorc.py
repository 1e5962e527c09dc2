"""LoRC on a real model: perplexity against KV bytes, progressive vs uniform
ranks, alone and under the GEAR codec.

Usage:
    python benchmarks/lorc.py                        # the run of results/lorc.md
    python benchmarks/lorc.py --reductions 0.6 --prompt-lengths 64 --tokens 256   # quick look

Model, text and protocol are the quality benchmark's (`quality.py`): SmolLM2-
135M-Instruct in fp32, Emma's held-out passage, prefill P tokens, then one
token at a time through the decode path, every next token scored.

How LoRC runs here: eagerly, as the compiled graph does it (`gear_compile.
passes.lorc`; tests/test_lorc.py checks the two give the same logits), ~10x
faster than compiling per configuration. Each layer's k_proj / v_proj output
(K before RoPE, and V) is projected onto its rank-r basis
(`gear_compile.lorc.projection_basis`) by a forward hook: that latent is what
the cache holds, exactly or in a GEAR `KVStore` with the quality benchmark's
streaming protocol (prefill block compressed, n_b-token exact buffer). The
prompt attends its exact K/V; each decode step attends the past K rebuilt
from the latents (times the basis, then RoPE at the cached positions) and
its own exact K, and the V of every latent. With every rank full this is the
dense model.

KV bytes, % of the same K/V in fp16: LoRC alone counts the latent in fp16
(sum of ranks over the dense widths); with GEAR, and for GEAR alone, the
bytes the stores hold at the end of the pass (`KVStore.nbytes`, the exact
buffer in the model's fp32 included, as in quality.md).
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
from quality import cpu_name, log, score, top1_agreement  # noqa: E402

from gear_compile.config import GearConfig  # noqa: E402

RESULTS = os.path.join(HERE, "results")

GEAR_OPTIONS = {"GEAR-4": dict(method="gear", bits=4),
                "GEAR-2": dict(method="gear", bits=2, group_size=32)}


# ---------------------------------------------------------------- the LoRC plan
def kv_projections(model):
    """[(k_proj, v_proj)] per decoder layer (Llama-style attention modules)."""
    return [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in model.model.layers]


def input_moments(model, ids):
    """Per layer, the second moment of the K/V projections' shared input over
    `ids` (`gear_compile.lorc.calibrate`, as a user would run it)."""
    from gear_compile import lorc
    lorc.calibrate(model, ids)
    return [lorc.MOMENTS[k_proj.weight] for k_proj, _ in kv_projections(model)]


def lorc_plan(model, reduction: float, schedule: str, per: str, multiple: int, moments=None):
    """Per layer (K basis, V basis) and the ranks, for a fraction `reduction`
    removed; moments: per-layer input moments (calibrated bases), or None."""
    import torch

    from gear_compile import lorc
    projections = kv_projections(model)
    c = model.config
    heads = c.num_key_value_heads
    full = projections[0][0].weight.shape[0]
    unit = multiple * (heads if per == "head" else 1)
    keep = 1.0 - reduction
    ranks = {}
    for i, kind in enumerate("kv"):
        kappas = [lorc.condition_number(p[i].weight) for p in projections]
        ranks[kind] = lorc.layer_ranks(kappas, keep, full, schedule, unit)
        ranks[kind + "_kappa"] = kappas
    with torch.no_grad():
        bases = [tuple(lorc.projection_basis(p[i].weight, p[i].bias, ranks[kind][l], heads, per,
                                             moments[l] if moments else None)
                       for i, kind in enumerate("kv"))
                 for l, p in enumerate(projections)]
    return bases, ranks, full


# ---------------------------------------------------------------- the method
class LoRCMethod:
    """A LoRC cache (latents exact, or under a GEAR codec) for streaming_ppl."""

    def __init__(self, label, reduction, schedule="progressive", per="layer", gear=None, multiple=None,
                 moments=None):
        self.label, self.reduction, self.schedule, self.per = label, reduction, schedule, per
        self.gear, self.multiple, self.moments = gear, multiple, moments
        self.hooks, self.bases, self.ranks = [], None, None

    def describe(self) -> str:
        codec = f" + {self.gear}" if self.gear else ""
        basis = "calibrated" if self.moments else "weights"
        return f"lorc={self.reduction:g} {self.schedule} per {self.per}, {basis} basis{codec}"

    def codec(self, model):
        """The codec of the latents, its defaults chosen by the model's head dim
        as the backend chooses them (`GearConfig.for_head_dim`)."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return GearConfig.from_options(GEAR_OPTIONS[self.gear] if self.gear else {"method": "none"}) \
            .for_head_dim(head_dim)

    def setup(self, model):
        from gear_compile import lorc
        moments = self.moments() if callable(self.moments) else self.moments
        multiple = self.multiple or (self.codec(model).rank_unit if self.gear else 8)
        self.bases, self.ranks, self.full = lorc_plan(model, self.reduction, self.schedule, self.per,
                                                      multiple, moments)
        self.pending = {}
        for l, (k_proj, v_proj) in enumerate(kv_projections(model)):
            for i, proj in enumerate((k_proj, v_proj)):
                def hook(module, args, out, l=l, i=i):
                    latent = lorc.project(out, self.bases[l][i])        # [B, T, r] or [B, T, H, r/H]
                    self.pending[l, i] = latent.unsqueeze(1) if latent.dim() == 3 else latent.transpose(1, 2)
                self.hooks.append(proj.register_forward_hook(hook))
        self.rotary, self.kv_heads = model.model.rotary_emb, model.config.num_key_value_heads

    def teardown(self, model):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def new_cache(self, model):
        from transformers.cache_utils import Cache

        config = self.codec(model)
        return Cache(layers=[LoRCLayer(self, l, config) for l in range(len(self.bases))])

    def rebuild(self, latent, l: int, i: int):
        """[B, Hl, T, r] latents -> [B, H, T, d] K (RoPE at positions 0..T-1) or V."""
        import torch
        from transformers.models.llama.modeling_llama import rotate_half

        from gear_compile import lorc
        basis = self.bases[l][i]
        x = latent.squeeze(1) if basis.dim() == 2 else latent.transpose(1, 2)
        out = lorc.rebuild(x, basis).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        if i == 1:
            return out
        positions = torch.arange(out.shape[2], device=out.device)[None]
        cos, sin = self.rotary(out, positions)
        return out * cos[:, None] + rotate_half(out) * sin[:, None]

    def cache_bytes(self, cache) -> int:
        if self.gear:
            return sum(layer.nbytes() for layer in cache.layers)
        tokens = cache.get_seq_length()
        return sum(sum(self.ranks[k]) for k in "kv") * tokens * 2      # latents in fp16

    def cache_tokens(self, cache) -> int:
        return cache.get_seq_length()


class LoRCLayer(qm.GearSimLayer):
    """Holds one layer's K and V latents in KVStores (method none: exactly).
    As in the compiled graph (`gear_compile.passes.lorc`), the prompt attends
    its exact K/V; each decode step attends K rebuilt from the past's latents
    followed by the step's own exact K, and V from every latent, its own
    included (the graph attends the latents and up-projects the output)."""

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
def methods_for(reductions, gear_labels, moments, weight_reductions=(0.6,)):
    """(label, method) in run order: dense, GEAR alone, LoRC with the paper's
    weight-SVD basis, then with the calibrated basis: both schedules per
    layer, progressive per head (the per-head / per-layer choice), and under
    each GEAR codec. `moments`: a function returning the input moments."""
    rows = [("dense", qm.Method("dense", None))]
    rows += [(g, qm.Method(g, GEAR_OPTIONS[g])) for g in gear_labels]
    for r in (r for r in reductions if r in weight_reductions):
        for schedule in ("progressive", "uniform"):
            label = f"LoRC-{100 * r:g} {schedule} weights"
            rows.append((label, LoRCMethod(label, r, schedule)))
    for r in reductions:
        pct = f"{100 * r:g}"
        rows += [(f"LoRC-{pct} progressive", LoRCMethod(f"LoRC-{pct} progressive", r, moments=moments)),
                 (f"LoRC-{pct} uniform", LoRCMethod(f"LoRC-{pct} uniform", r, "uniform", moments=moments)),
                 (f"LoRC-{pct} progressive per head",
                  LoRCMethod(f"LoRC-{pct} progressive per head", r, per="head", moments=moments))]
        rows += [(f"LoRC-{pct} + {g}", LoRCMethod(f"LoRC-{pct} + {g}", r, gear=g, moments=moments))
                 for g in gear_labels]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the passage scored (prompt included)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512])
    p.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.45, 0.6],
                   help="fractions of the K/V cache LoRC removes")
    p.add_argument("--gear", nargs="*", default=list(GEAR_OPTIONS), choices=list(GEAR_OPTIONS),
                   help="GEAR codecs to run alone and under LoRC")
    p.add_argument("--calibration-tokens", type=int, default=2048,
                   help="tokens of the dev passage (never scored) for the calibrated bases")
    p.add_argument("--only", nargs="+", default=None, help="run only these labels (and dense)")
    p.add_argument("--prefix", default="lorc", help="output file prefix under benchmarks/results/")
    p.add_argument("--no-install", action="store_true")
    args = p.parse_args(argv)

    qd.ensure_python_packages(not args.no_install)
    import torch
    import transformers
    moments = []

    def calibrated():
        if not moments:
            log(f"lorc: input moments over {args.calibration_tokens} dev tokens")
            moments.extend(input_moments(model, corpus.passage("dev", args.calibration_tokens)))
        return moments

    rows = methods_for(args.reductions, args.gear, calibrated)
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
    header = [f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"python {platform.python_version()}",
              "command: `python " + " ".join([os.path.relpath(__file__, qd.REPO)] + (argv or sys.argv[1:])) + "`",
              f"text: Emma, test passage (VOLUME III, CHAPTER I onward), first {args.tokens} tokens; "
              "SmolLM2-135M-Instruct fp32 on CPU; protocol of quality.py (prefill P, then one token at a time)",
              "LoRC runs eagerly (module docstring): latents from k_proj / v_proj hooks, cached exactly or "
              "in GEAR KVStores, K rebuilt then RoPE'd at the cached positions",
              "bases: 'weights' = the paper's SVD of [W | b]; unmarked = calibrated on the input's second "
              f"moment over {args.calibration_tokens} tokens of Emma's dev passage (VOLUME I; "
              "gear_compile/lorc.py)",
              "KV % of fp16: LoRC alone: the latents in fp16 over the dense K/V in fp16; GEAR and LoRC + GEAR: "
              "bytes the stores hold at the end (exact fp32 buffer and reserved decode capacity included)",
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
                  "| method | config | ppl | delta vs dense | KV % of fp16 | top-1 agreement | decode tok/s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for label, r in rs.items():
            delta = 100 * (r["ppl"] / dense["ppl"] - 1) if dense else float("nan")
            agree = 100 * top1_agreement(r, dense) if dense else float("nan")
            lines.append(f"| {label} | {r['config']} | {r['ppl']:.3f} | {delta:+.2f} % | "
                         f"{100 * r['kv_bytes'] / r['dense_bytes']:.1f} % | {agree:.1f} % | {r['decode_tok_s']:.1f} |")
        lines.append("")
        lines += verdict(rs)
    if plans:
        lines += ["## Ranks per layer (K / V), out of "
                  f"{model.config.num_key_value_heads * model.config.hidden_size // model.config.num_attention_heads}",
                  ""]
        first = next(iter(plans.values()))
        lines.append("condition numbers: K " + " ".join(f"{k:.0f}" for k in first["k_kappa"]) +
                     "; V " + " ".join(f"{k:.0f}" for k in first["v_kappa"]))
        lines.append("")
        for label, ranks in plans.items():
            lines.append(f"- {label}: K {ranks['k']}; V {ranks['v']}")
        lines.append("")
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
    alone = [lab for lab in rs if " progressive" in lab and "per head" not in lab and "+" not in lab]
    for label in alone:
        if label.replace("progressive", "uniform") in rs:
            d_p, d_u = delta(label), delta(label.replace("progressive", "uniform"))
            out.append(f"- {label} {d_p:+.2f} % vs uniform {d_u:+.2f} %: progressive "
                       f"{'beats' if d_p < d_u else 'does NOT beat'} uniform at equal bytes")
    for label in alone:
        if label.startswith("LoRC-60 "):
            d = delta(label)
            out.append(f"- {label} alone: {d:+.2f} % (target <= +2 %: {'met' if d <= 2 else 'MISSED'})")
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
