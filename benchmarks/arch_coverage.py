"""Architecture coverage: every decoder-only causal LM in the installed
transformers, unmodified, compiled with the gear backend.

For each `model_type` of transformers' causal-LM auto mapping a tiny random
config is built offline (2 layers, 4 query / 2 KV heads, head dim 32, a small
vocabulary; sliding windows of 16 tokens where the family has one) and, in a
fresh process, fed a 200-token random prompt:

  exact     `method="none"` generates the eager model's greedy tokens (12)
  sites     attention sites found, rewritten, and left exact (with reasons),
            over every graph compiled (prefill and decode)
  gear4     GEAR 4-bit over a prompt and `--steps` decode steps: the layers
            whose cache ends compressed, KV bytes vs the same cache dense in
            the model's dtype, the logits error vs eager while the tokens agree,
            and the graphs compiled
  agree     the report and the run agree: every layer reported rewritten ends
            with a compressed cache

A row is `full` (all of the above, every site rewritten), `partial` (correct;
some sites left exact, each reported), `WRONG` (tokens differ from eager with
method none, or the report and the run disagree), `error` (a crash, with its
message), or `n/a` (no attention KV cache, e.g. a recurrent model). Models
that cannot be built offline are listed with the reason.

    python benchmarks/arch_coverage.py                 # every architecture (~1 h on 2 cores)
    python benchmarks/arch_coverage.py --only llama gemma2
    python benchmarks/arch_coverage.py --ci            # the families CI runs

Writes `benchmarks/results/arch_coverage.{md,json}` and prints the headline:
% fully rewritten, % correct. `tests/test_arch_coverage.py` runs `sweep_one`
on the CI set.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gear_compile.hf_compat import cache_of

HERE = Path(__file__).resolve().parent

# What CI runs: the families most used, one of each attention form the
# matcher knows (SDPA with GQA, eager, MQA, fused QKV, partial rotary,
# sliding window, soft-capping, heads flattened into bmm), and one it reports
# (ALiBi through baddbmm).
CI_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2",
            "gpt_neox", "gpt_bigcode", "falcon", "starcoder2", "xglm", "bloom"]

# tiny sizes, set on each config that has the attribute
SIZES = {
    "hidden_size": 128, "n_embd": 128, "d_model": 128, "n_embed": 128,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 32,
    "intermediate_size": 256, "n_inner": 256, "ffn_dim": 256, "ffn_hidden_size": 256,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 512, "max_position_embeddings": 512, "n_positions": 512,
    "sliding_window": 128, "rotary_dim": 16,
}
PROMPT, NEW_TOKENS = 200, 12
MAX_PARAMETERS = 50_000_000      # a "tiny" model past this would take the machine's memory


def tiny_config(model_type: str):
    """A tiny random config of `model_type`, or raise ValueError(why not)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type].endswith("ForConditionalGeneration"):
        raise ValueError("a multimodal wrapper (its text model is swept under its own entry)")
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    if getattr(default, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ValueError("an encoder family (masked LM; a decoder only as is_decoder=True)")
    config = cls(**_tiny_kwargs(cls, default))
    for key, value in _in_vocabulary(config.to_dict()).items():
        if key.endswith("token_id"):
            setattr(config, key, value)
    return config


def _tiny_kwargs(cls, default) -> dict:
    """SIZES for the attributes `default` has (derived properties, e.g.
    falcon's head_dim, are not set), and the same for each nested sub-config
    (a composite model's text_config, ...: left at its defaults it would
    build a full-size model)."""
    kwargs = {k: v for k, v in SIZES.items()
              if hasattr(default, k) and not isinstance(getattr(cls, k, None), property)}
    if getattr(default, "sliding_window", None) is None:
        kwargs.pop("sliding_window", None)
    for name in getattr(cls, "sub_configs", {}):
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = _in_vocabulary(dict(sub.to_dict(), **_tiny_kwargs(type(sub), sub)))
    return kwargs


def _in_vocabulary(options: dict) -> dict:
    """Special token ids moved inside the tiny vocabulary."""
    return {k: 1 if k.endswith("token_id") and isinstance(v, int) and v >= 256 else v
            for k, v in options.items()}


def _parameters(config) -> int:
    """Parameters the model of `config` would have (built on the meta device)."""
    import transformers as tf
    with torch.device("meta"):
        return sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())


def _generate(model, prompt, new_tokens):
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, prompt.shape[1]:].tolist(), [x[0].float() for x in out.logits], cache_of(out)


def _logits_error(tokens, logits, ref_tokens, ref_logits) -> float:
    """Largest relative L2 error of a step's logits vs the reference's, over
    the decode steps whose inputs are still the same tokens (up to and
    including the first step that picks a different one)."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens) - 1)
    return max(float((logits[i] - ref_logits[i]).norm() / ref_logits[i].norm())
               for i in range(1, same + 1)) if same else 0.0


def _attention_layers(cache) -> tuple[int, int]:
    """(layers holding K/V, of which compressed) of a generate() cache."""
    from gear_compile import CompressedKV
    layers = [layer for layer in getattr(cache, "layers", [])
              if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    return len(layers), sum(isinstance(layer.keys, CompressedKV) for layer in layers)


def sweep_one(model_type: str, steps: int = 50) -> dict:
    """Everything the table records for one architecture (see the module doc)."""
    import transformers as tf

    import gear_compile
    from gear_compile.report import collect
    row = dict(arch=model_type)
    try:
        config = tiny_config(model_type)
        params = _parameters(config)
    except Exception as e:       # noqa: BLE001 - any reason a config cannot be built is reported
        return dict(row, status="not built", reason=f"{type(e).__name__}: {e}"[:200])
    if params > MAX_PARAMETERS:
        return dict(row, status="not built", reason=f"the tiny config still builds {params / 1e6:.0f} M "
                                                      f"parameters (sizes SIZES does not reach)")
    try:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        row["class"] = type(model).__name__
        prompt = torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        original = model.forward
        with torch.no_grad():
            eager_tokens, eager_logits, cache = _generate(model, prompt, max(steps, NEW_TOKENS))
            row["attention_layers"], _ = _attention_layers(cache)
    except Exception as e:       # noqa: BLE001 - the tiny config itself does not run
        return dict(row, status="not built",
                    reason=f"the tiny config does not run eagerly: {type(e).__name__}: {e}".splitlines()[0][:300])
    try:
        with torch.no_grad():
            gear_compile.compile(model, method="none")
            tokens, _, _ = _generate(model, prompt, NEW_TOKENS)
            row["exact"] = tokens == eager_tokens[:NEW_TOKENS]
            model.forward = original
            torch._dynamo.reset()

            gear_compile.compile(model, method="gear", bits=4)
            with collect() as reports:
                tokens, logits, cache = _generate(model, prompt, steps)
            model.forward = original
            torch._dynamo.reset()
    except Exception as e:       # noqa: BLE001 - a crash is a row of the table, not the end of the sweep
        return dict(row, status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    sites = [s for g in reports for s in g.sites]
    row.update(
        sites=len(sites), rewritten=sum(s.rewritten for s in sites),
        fallbacks=sorted({f"{s.form}: {s.reason}" for s in sites if not s.rewritten}),
        graphs=len(reports),
        logits_error=_logits_error(tokens, logits, eager_tokens, eager_logits))
    layers, compressed = _attention_layers(cache)
    row["compressed_layers"] = compressed
    # a generate() that returns no cache (mpt) or one without attention layers (xLSTM's)
    attention_cache = cache is not None and hasattr(cache, "layers")
    row["kv_ratio"] = 0.0 if not attention_cache else \
        gear_compile.kv_bytes(cache) / max(1, gear_compile.dense_bytes(cache, model.dtype))
    decode = [s for g in reports for s in g.sites if s.phase == "decode"]
    # layers the report says are compressed: by module path, or (a model that
    # runs one attention module for several cache layers, e.g. HRM's
    # recurrence) by rewritten decode sites in one graph
    per_graph = [sum(s.rewritten for s in g.sites if s.phase == "decode") for g in reports]
    reported = max([len({s.layer for s in decode if s.rewritten})] + per_graph)
    row["agree"] = compressed == reported or (not decode and compressed == 0)
    if not row["attention_layers"] and compressed == 0:
        row["status"] = "n/a"         # attention without a cache (e.g. openai-gpt) has nothing to compress
        row["reason"] = "no attention KV cache"
    elif not row["exact"] or not row["agree"]:
        row["status"] = "WRONG"
    elif sites and row["rewritten"] == len(sites) and compressed == layers:
        row["status"] = "full"
    else:
        row["status"] = "partial"
    return row


def architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def spawn(model_type: str, steps: int, timeout: float) -> dict:
    """`sweep_one` in a fresh process (fresh Dynamo state; a hang or a crash
    of the interpreter is a row, not the end of the sweep)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, "--steps", str(steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(arch=model_type, status="error", reason=f"timed out after {timeout:g} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        died = f"the worker died with exit code {done.returncode}" + (
            " (killed: out of memory?)" if done.returncode in (-9, 137) else "")
        tail = (done.stderr.strip().splitlines() or [died])[-1]
        return dict(arch=model_type, status="error", reason=tail[:300])
    return json.loads(lines[-1])


def headline(rows: list[dict]) -> str:
    swept = [r for r in rows if r["status"] in ("full", "partial", "WRONG", "error")]
    n = max(1, len(swept))
    full = sum(r["status"] == "full" for r in swept)
    wrong = sum(r["status"] == "WRONG" for r in swept)
    errors = sum(r["status"] == "error" for r in swept)
    return (f"{len(swept)} architectures with an attention KV cache swept: {full} fully rewritten "
            f"({100 * full / n:.1f} %, target >= 90 %), {100 * (n - wrong - errors) / n:.1f} % correct "
            f"(target 100 %: {wrong} wrong, {errors} errors)")


def write(rows: list[dict], args, path: Path, command: str | None = None) -> None:
    import transformers
    lines = [
        "# Architecture coverage: unmodified decoders through the gear backend", "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- command: `{command or 'python benchmarks/arch_coverage.py ' + ' '.join(sys.argv[1:])}`",
        f"- tiny random configs (see `SIZES`), prompt {PROMPT} tokens, exact check over {NEW_TOKENS} "
        f"greedy tokens, GEAR 4-bit over {args.steps} decode steps; "
        "kv %: bytes held vs the same cache dense in the model's dtype; "
        "logits err: largest relative L2 error of a decode step's logits vs eager while the tokens agree",
        f"- **{headline(rows)}**", "",
        "| arch | status | sites rewritten / found | none == eager | compressed layers | kv % | "
        "logits err | graphs | fallbacks / reason |",
        "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] == "not built":
            continue
        if "sites" not in r:
            lines.append(f"| {r['arch']} | {r['status']} | | | | | | | {r.get('reason', '')} |")
            continue
        notes = "; ".join(r["fallbacks"]) or ("report and run disagree" if not r["agree"] else "")
        lines.append(
            f"| {r['arch']} | {r['status']} | {r['rewritten']} / {r['sites']} | "
            f"{'yes' if r['exact'] else 'NO'} | {r['compressed_layers']} / {r['attention_layers']} | "
            f"{100 * r['kv_ratio']:.0f} | {r['logits_error']:.3f} | {r['graphs']} | "
            f"{notes.replace('|', '/')} |")
    skipped = [r for r in rows if r["status"] == "not built"]
    if skipped:
        lines += ["", "## Not built offline", ""] + [f"- {r['arch']}: {r['reason']}" for r in skipped]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", help="these model types (default: all)")
    p.add_argument("--ci", action="store_true", help=f"the CI set: {' '.join(CI_ARCHS)}")
    p.add_argument("--steps", type=int, default=50, help="GEAR-4 decode steps per architecture")
    p.add_argument("--timeout", type=float, default=600, help="seconds per architecture")
    p.add_argument("--out", type=Path, default=HERE / "results" / "arch_coverage")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="write one table from the rows of several runs (e.g. halves run with --only on "
                        "separate cores), in architecture order")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(sweep_one(args.worker, args.steps)))
        return
    if args.merge:
        rows = sorted((r for f in args.merge for r in json.loads(f.read_text())), key=lambda r: r["arch"])
        write(rows, args, args.out, command=f"python benchmarks/arch_coverage.py --steps {args.steps}, "
                                            f"rows of {len(args.merge)} run(s) with --only, merged")
        print(headline(rows))
        return
    known = architectures()
    chosen = CI_ARCHS if args.ci else args.only or known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        p.error(f"unknown model type(s) {unknown}; valid: {' '.join(known)}")
    rows = []
    for i, arch in enumerate(chosen):
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(chosen)}] {arch} ...", end=" ", flush=True)
        row = spawn(arch, args.steps, args.timeout)
        rows.append(row)
        print(f"{row['status']} ({time.perf_counter() - t0:.0f} s) {row.get('reason', '')}", flush=True)
        write(rows, args, args.out)
    print(headline(rows))


if __name__ == "__main__":
    main()
