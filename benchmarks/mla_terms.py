"""Which of GEAR's terms pay on an MLA cache, which is already low-rank.

An MLA model (DeepSeek V2 / V3, MiniCPM3, GLM-4 MoE lite, ...) caches one
latent of kv_lora_rank channels a token and one shared rotary key part, not
per-head K/V. The gear backend compresses both as a "rebuild" site
(`passes.sites.rebuild_sites`). This runs a tiny MLA model of the sweep
(`arch_coverage.tiny_config`) through the backbone alone (KCVT / KIVI),
backbone + low-rank (GEAR-L) and backbone + low-rank + outliers (GEAR), at
4 and 2 bits: bytes held vs the same latent cache dense in the model's dtype,
the largest relative logits error vs eager while the tokens agree, and how
many greedy tokens equal eager's. Random weights: the errors compare the
terms with each other, not with a trained model's.

    python benchmarks/mla_terms.py                       # deepseek_v2, 200 + 50 tokens
    python benchmarks/mla_terms.py --arch minicpm3 --steps 50

Writes `benchmarks/results/mla_terms.md`.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
METHODS = [("kcvt", 4), ("gear_l", 4), ("gear", 4), ("kivi", 2), ("gear_l", 2), ("gear", 2)]


def run(arch: str, steps: int) -> list[dict]:
    import transformers as tf

    import arch_coverage as sweep
    import gear_compile
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(sweep.tiny_config(arch)).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    prompt = torch.randint(3, 256, (1, sweep.PROMPT), generator=torch.Generator().manual_seed(0))
    original, rows = model.forward, []
    with torch.no_grad():
        ref_tokens, ref_logits, _ = sweep._generate(model, prompt, steps)
        for method, bits in METHODS:
            gear_compile.compile(model, method=method, bits=bits)
            tokens, logits, cache = sweep._generate(model, prompt, steps)
            model.forward = original
            torch._dynamo.reset()
            rows.append(dict(method=method, bits=bits,
                             kv=gear_compile.kv_bytes(cache) / gear_compile.dense_bytes(cache, model.dtype),
                             err=sweep._logits_error(tokens, logits, ref_tokens, ref_logits),
                             same=sum(a == b for a, b in zip(tokens, ref_tokens)),
                             kinds=gear_compile.kv_breakdown(cache).kinds))
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="deepseek_v2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=HERE / "results" / "mla_terms.md")
    args = p.parse_args(argv)
    import transformers
    rows = run(args.arch, args.steps)
    lines = [f"# GEAR's terms on an MLA cache ({args.arch}, tiny random config)", "",
             f"- machine: {platform.machine()}; torch {torch.__version__}, transformers {transformers.__version__}",
             f"- command: `python benchmarks/mla_terms.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "- kv %: bytes held vs the same latent + rope cache dense in the model's dtype (fp32); "
             "logits err: largest relative L2 error of a decode step's logits vs eager while the tokens agree",
             "", "| method | bits | kv % | low-rank % | outliers % | logits err | tokens = eager |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        held = sum(r["kinds"].values())
        lines.append(f"| {r['method']} | {r['bits']} | {100 * r['kv']:.1f} | "
                     f"{100 * r['kinds'].get('low-rank', 0) / held:.1f} | "
                     f"{100 * r['kinds'].get('outliers', 0) / held:.1f} | {r['err']:.4f} | "
                     f"{r['same']} / {args.steps} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
