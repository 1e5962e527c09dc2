"""Decode-step time of an MLA model at long context: transformers' own
(eager, dense latent cache, the past up-projected every step) against the
gear backend's compressed latent, attended absorbed (`passes.mla`) or
decompressed and up-projected as the model wrote it (`mla_absorb=False`).

The model is DeepSeek-V2-Lite's attention shape with random weights and two
dense layers (hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128,
qk_rope 64, v_head_dim 128, fp32): per past token, the up-projection costs
r H (d_n + d_v) = 2.1 M multiply-adds a layer, the absorbed attention
H (2 r + d_r) = 17 k. Each method prefills the same prompt once, then the
methods take turns, `--steps` greedy decode steps each, for `--rounds`
rounds (interleaved: a drift of the shared machine hits all alike); the
median step time of each is reported, with the ratio to transformers' eager.

    python benchmarks/mla_decode.py                        # prompt 4096, 4 rounds of 4 steps
    python benchmarks/mla_decode.py --prompt 1024 --rounds 2

Writes benchmarks/results/mla_decode_cpu.md (and .json).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name

HERE = Path(__file__).resolve().parent
METHODS = {                                   # name: gear options (None: transformers' eager)
    "eager": None,
    "gear4 rebuild": dict(method="gear", bits=4, mla_absorb=False),
    "gear4 absorbed": dict(method="gear", bits=4),
    "none absorbed": dict(method="none"),
}


def lite_config():
    from transformers import DeepseekV2Config
    return DeepseekV2Config(vocab_size=1024, hidden_size=2048, intermediate_size=2048, num_hidden_layers=2,
                            num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=2,
                            max_position_embeddings=16384)


def run(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, DynamicCache

    import gear_compile
    from gear_compile.hf_compat import cache_kwarg
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(lite_config()).eval()
    prompt = torch.randint(0, 1024, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    state = {}
    with torch.no_grad():
        for name in args.methods:
            options = METHODS[name]
            model = copy.deepcopy(base)
            if options is not None:
                gear_compile.compile(model, **options)
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            out = model(input_ids=prompt, **cache_kwarg(model, cache), use_cache=True)
            print(f"{name}: prefill {args.prompt} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
            state[name] = dict(model=model, cache=cache, token=out.logits[:, -1:].argmax(-1), times=[])
            _step(state[name])                       # compiles the decode graph; not timed
        for r in range(args.rounds):
            for name in args.methods:
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    _step(state[name])
                    state[name]["times"].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {statistics.median(s['times']) * 1e3:.1f} ms" for n, s in state.items()), flush=True)
    eager = statistics.median(state["eager"]["times"]) if "eager" in state else None
    rows = []
    for name, s in state.items():
        ms = statistics.median(s["times"]) * 1e3
        rows.append(dict(method=name, step_ms=ms, x_eager=(eager * 1e3 / ms) if eager else None,
                         kv_bytes=gear_compile.kv_bytes(s["cache"]),
                         tokens=s["cache"].get_seq_length()))
    return rows


def _step(s):
    from gear_compile.hf_compat import cache_kwarg
    out = s["model"](input_ids=s["token"], **cache_kwarg(s["model"], s["cache"]), use_cache=True)
    s["token"] = out.logits[:, -1:].argmax(-1)


def report(args, rows) -> str:
    import transformers
    eager_kv = next((r["kv_bytes"] for r in rows if r["method"] == "eager"), None)
    lines = ["# MLA decode step: absorbed attention over the compressed latent", "",
             f"- machine: {cpu_name()}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}",
             f"- command: `python benchmarks/mla_decode.py {' '.join(args.argv)}`",
             f"- DeepSeek-V2-Lite attention shape, 2 dense layers, random fp32 weights; prompt {args.prompt} "
             f"tokens, then {args.rounds} rounds of {args.steps} decode steps a method, methods in turn",
             "", "| method | step ms (median) | x eager | KV bytes | x eager's |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        x = f"{r['x_eager']:.2f}" if r["x_eager"] else "-"
        kv = f"{r['kv_bytes'] / eager_kv:.2f}" if eager_kv else "-"
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {x} | {r['kv_bytes']:,} | {kv} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "mla_decode_cpu")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    rows = run(args)
    text = report(args, rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
