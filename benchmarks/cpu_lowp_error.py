"""Where BF16 / FP16 arithmetic would be exact enough in the CPU decode kernel.

Usage:
  python benchmarks/cpu_lowp_error.py                    # SmolLM2, 4,096 tokens of held-out text
  python benchmarks/cpu_lowp_error.py --tokens 2048 --bits 4 2

The C++ kernel (`kernels/cpu_attention_kernel.h`) computes in fp32, and its
VNNI path splits q into three int8 limbs so its integer dots are exact to
fp32 rounding. AVX-512 BF16 (`vdpbf16ps`: bf16 pairs, fp32 sums) and
AVX-512 FP16 (`vfmadd*ph`: fp16 products and sums) would halve or quarter the
operand bytes of the dots. This measures what each would cost in accuracy,
before any is written in C++: SmolLM2-135M-Instruct reads --tokens tokens of
Emma's held-out test passage (`quality_data`), and at the last position every
layer's query (captured in front of its attention, RoPE applied) attends its
past K/V, compressed by GEAR at --bits and rebuilt (`KVStore.decompress`).
Each stage of the kernel is then emulated in low precision, alone:

  scores bf16   q . K in bf16 operands, fp32 sums (vdpbf16ps)
  scores fp16   q . K in fp16 products and fp16 sums over the head dim (vfmaddph)
  p.V bf16      probabilities and V in bf16, fp32 sums over the tokens
  p.V fp16      the same in fp16 operands, fp32 sums (fp16 sums over thousands of
                tokens would overflow the 11-bit mantissa at once: not measured)

and the largest error of the attention output, relative to its largest
magnitude, is set beside three yardsticks: the kernel tests' fp32 bound (1e-5
absolute), rounding the fp32 output to bf16 / fp16 (what a bf16 / fp16 model
does with it anyway), and the codec's own error (the same attention over the
uncompressed K/V). A stage is "exact enough" for a model dtype when its error
stays below that dtype's own output rounding.
Neighbours: decode_attention (speed), quality (perplexity), kernels/cpu.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from machine import cpu_name

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def captured(model, ids):
    """Per layer: the last position's query [H, D] (RoPE applied) and the K/V
    [Hkv, T, D] it attends, from one forward pass."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    queries = {}

    def hook(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(h[:, -1:]).view(1, 1, -1, module.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        queries[module.layer_idx] = q[0, :, 0]

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    for handle in handles:
        handle.remove()
    cache = out.past_key_values
    return [(queries[i], layer.keys[0], layer.values[0]) for i, layer in enumerate(cache.layers)]


def attention(q, k, v, scores_fn=None, pv_fn=None):
    """fp32 decode attention of q [H, D] over k, v [Hkv, T, D] (GQA), with a
    stage optionally replaced by its low-precision emulation."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    s = (scores_fn or (lambda a, b: torch.einsum("hd,htd->ht", a, b)))(q, k) * q.shape[-1] ** -0.5
    p = torch.softmax(s, -1)
    return (pv_fn or (lambda a, b: torch.einsum("ht,htd->hd", a, b)))(p, v)


def bf16_dot(a, b):
    return torch.einsum("hd,htd->ht", a.bfloat16().float(), b.bfloat16().float())


def fp16_dot_fp16_sums(a, b):
    acc = torch.zeros(b.shape[:2], dtype=torch.float16)
    for d in range(a.shape[-1]):               # fp16 FMAs along the head dim, as vfmaddph chains them
        acc = (acc.float() + a[:, None, d].half().float() * b[..., d].half().float()).half()
    return acc.float()


def pv_in(dtype):
    return lambda p, v: torch.einsum("ht,htd->hd", p.to(dtype).float(), v.to(dtype).float())


STAGES = {"scores bf16": dict(scores_fn=bf16_dot), "scores fp16": dict(scores_fn=fp16_dot_fp16_sums),
          "p.V bf16": dict(pv_fn=pv_in(torch.bfloat16)), "p.V fp16": dict(pv_fn=pv_in(torch.float16))}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=[2, 4, 8])
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_lowp_error.md")
    args = p.parse_args(argv)
    import transformers
    from quality_data import Corpus, load_model
    from gear_compile.config import GearConfig
    from gear_compile.store import KVStore

    model, tokenizer = load_model()
    ids = Corpus(tokenizer).passage("test", args.tokens)
    print(f"{ids.shape[1]} tokens; capturing q, K, V per layer ...", flush=True)
    layers = captured(model, ids)
    rows = []
    for bits in args.bits:
        config = GearConfig(method="gear", bits=bits).codec
        worst = {name: 0.0 for name in ["codec", *STAGES]}
        for q, k, v in layers:
            kq = KVStore.from_prefill(k[None], config, "k").decompress(torch.float32)[0]
            vq = KVStore.from_prefill(v[None], config, "v").decompress(torch.float32)[0]
            exact = attention(q, kq, vq)
            worst["codec"] = max(worst["codec"], rel(exact, attention(q, k, v)))
            for name, stage in STAGES.items():
                worst[name] = max(worst[name], rel(attention(q, kq, vq, **stage), exact))
        rows.append((bits, worst))
        print(f"GEAR-{bits}: " + ", ".join(f"{n} {e:.2e}" for n, e in worst.items()), flush=True)

    bf16_round, fp16_round = 2.0 ** -9, 2.0 ** -12      # half an ulp, relative
    verdict = []
    for name in STAGES:
        err = max(w[name] for _, w in rows)
        ok = [d for d, bound in (("bf16", bf16_round), ("fp16", fp16_round)) if err < bound]
        verdict.append(f"- {name}: largest error {err:.2e} of the output's scale: "
                       + (f"below a {' and '.join(ok)} model's own output rounding" if ok else
                          "above both bf16's and fp16's output rounding")
                       + f"; {'within' if err < 1e-5 else 'outside'} the fp32 kernel bound (1e-5)")
    cpu = cpu_name()
    lines = ["# BF16 / FP16 arithmetic in the CPU decode kernel: the error it would add", "",
             f"- machine: {cpu}; torch {torch.__version__}, transformers {transformers.__version__} "
             "(the error is arithmetic, emulated in torch: it does not depend on the CPU)",
             f"- command: `python benchmarks/cpu_lowp_error.py {' '.join(argv or sys.argv[1:])}`",
             f"- SmolLM2-135M-Instruct (fp32), {ids.shape[1]} tokens of Emma's held-out passage, the last "
             "position's query of each of the 30 layers over its GEAR-compressed past; errors are the "
             "largest |error| over layers and heads relative to the output's largest magnitude",
             f"- yardsticks: bf16 output rounding {bf16_round:.2e}, fp16 {fp16_round:.2e}, fp32 kernel "
             "bound 1e-5 (absolute, outputs of order 1)", "",
             "| codec | codec's own error | " + " | ".join(STAGES) + " |",
             "|---|---:|" + "---:|" * len(STAGES)]
    for bits, worst in rows:
        lines.append(f"| GEAR-{bits} | {worst['codec']:.2e} | " + " | ".join(f"{worst[n]:.2e}" for n in STAGES) + " |")
    lines += ["", "## Where low precision is exact enough", ""] + verdict
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(verdict))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
