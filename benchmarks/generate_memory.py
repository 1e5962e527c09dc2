"""Peak RSS of one generate()-style run at a long prompt, dense against GEAR,
and which phase raised it: the prefill, the prompt stores' compression,
Inductor's compile, the decode steps.

Usage:
  python benchmarks/generate_memory.py --prompt 8192 --methods dense gear4
  python benchmarks/generate_memory.py --prompt 8192 --prefill-chunk 1024 --warm
  python benchmarks/generate_memory.py --prompt 8192 --prefill-chunk 1024 --warm --rounds 3 \\
      --methods dense gear4 gear2      # methods interleaved, three runs each: medians and ranges

--prefill-chunk N feeds the prompt N tokens per call, as a server's chunked
prefill does (transformers' continuous batching, vLLM, SGLang): the
activations of one chunk, not of the whole prompt, then sit beside the KV.
--warm compiles first, on a short prompt in a cache of its own (three chunks
of the run's size and two decode steps), and resets the peak after it, as a
server warms up before it takes requests: the peak is then the steady
state's, without Inductor's one-time compile.

Each method runs in a fresh process: SmolLM2-135M (fp32, `models.load_smollm2`),
the heap trimmed (glibc's malloc_trim) and the peak reset (/proc/self/clear_refs)
after loading, then a prefill of a random prompt and `--steps` greedy steps
through the model's forward with `logits_to_keep=1`, as generate() calls it
(the logits of every prompt token, 1.5 GiB at 8k, would hide the rest).
dense: transformers' DynamicCache, eager; gear4 / gear2: `gear_compile.compile`.
VmHWM is read at the entry and exit of each phase (the prefill and decode
calls; the codec in the prompt stores, `store.compress`; Inductor's
`compile_fx`; and, for dense only, whose forward is not traced, the MLPs,
SDPA and the LM head), each rise charged to the innermost phase running.
The phase that raised the peak is where it was reached, not all it holds:
what is resident then (weights aside) includes the KV written so far.
Results: benchmarks/results/serve_cpu_memory.md (its generate() section).
Neighbours: serve.py (the same measure under continuous batching).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from machine import cpu_name
from peak_memory import PeakPhases, reset_peak, rss_bytes
from rounds import summary

METHODS = {"dense": None, "gear4": dict(method="gear", bits=4), "gear2": dict(method="gear", bits=2)}


def warm_up_pieces(ids, chunk: int) -> list:
    """The calls of a chunked run at its own chunk size, as a server warms up: a first
    chunk, two later ones (pasts of two lengths, so Dynamo's graph for them turns
    dynamic and a longer past reuses it), then two decode steps. A step's ids are
    a fresh [B, 1] tensor, as the run's argmax (and generate()'s next token) is: a
    column slice of the prompt keeps its row stride, and the decode graph compiled
    for that guards on it (`2 <= input_ids.stride()[0]`), so the run's first step
    compiled its graph again, inside the measured peak."""
    import torch
    n = 3 * chunk
    steps = [ids[:, s:s + 1].clone(memory_format=torch.contiguous_format) for s in (n, n + 1)]
    return [ids[:, s:s + chunk] for s in range(0, n, chunk)] + steps


def worker(method: str, prompt: int, steps: int, chunk: int = 0, warm: bool = False) -> dict:
    import torch
    import torch._inductor.compile_fx as compile_fx
    import torch.nn.functional as F
    from transformers import DynamicCache

    import gear_compile
    from gear_compile import store
    from gear_compile.models import load_smollm2
    model, _ = load_smollm2()
    reset_peak()
    base = rss_bytes("VmRSS")
    phases = PeakPhases("outside a call")
    if METHODS[method]:
        gear_compile.compile(model, **METHODS[method])
    phases.wrap(store, "compress", "codec (prompt stores)")
    phases.wrap(compile_fx, "compile_fx", "Inductor compile")
    if METHODS[method] is None:      # eager: Dynamo would trace these wrappers
        phases.wrap(F, "scaled_dot_product_attention", "SDPA")
        phases.wrap(model.lm_head, "forward", "LM head")
        phases.wrap(type(model.model.layers[0].mlp), "forward", "MLP")
    ids = torch.randint(100, model.config.vocab_size - 100, (1, prompt), generator=torch.Generator().manual_seed(0))
    chunk = chunk or prompt
    if warm:          # the graphs a run needs, on a short prompt in a cache of its own
        with torch.no_grad():
            short = DynamicCache(config=model.config)
            for piece in warm_up_pieces(ids, chunk if chunk < prompt else 96):
                model(input_ids=piece, past_key_values=short, use_cache=True, logits_to_keep=1)
            del short
        reset_peak()
        base = rss_bytes("VmRSS")
        phases.start()           # the run's rises only: the warm-up's compiles are not the run's
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, prompt, chunk):
            out = phases.run("prefill", model, input_ids=ids[:, start:start + chunk], past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        for step in range(1, steps + 1):
            ids = out.logits[:, -1:].argmax(-1)
            del out
            out = phases.run("decode step 1" if step == 1 else "later decode steps", model, input_ids=ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        del out
    rises = phases.mib()
    return dict(method=method, prompt=prompt, chunk=chunk, warm=warm, peak_above_weights_mib=(rss_bytes("VmHWM") - base) / 2**20,
                kv_mib=gear_compile.kv_bytes(cache) / 2**20, rises_mib=rises)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=["dense", "gear4"], choices=list(METHODS))
    p.add_argument("--prefill-chunk", type=int, default=0, help="prompt tokens per call (0: the whole prompt)")
    p.add_argument("--warm", action="store_true", help="compile on a short prompt first, then reset the peak")
    p.add_argument("--rounds", type=int, default=1, help="runs of every method, interleaved (a median and range)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("ROW " + json.dumps(worker(args.worker, args.prompt, args.steps, args.prefill_chunk, args.warm)),
              flush=True)
        return
    rows = [run(args, method) | dict(round=r + 1) for r in range(args.rounds) for method in args.methods]
    print(f"- machine: {cpu_name()}; command: `python benchmarks/generate_memory.py {' '.join(sys.argv[1:])}`")
    print(f"- {args.rounds} round(s), methods interleaved, each run a fresh process\n")
    print("| round | method | prompt | chunk | warm | KV MiB | peak RSS above weights MiB | x dense | peak raised by (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = next((d for d in rows if d["method"] == "dense" and d["round"] == r["round"]), None)
        ratio = f"{r['peak_above_weights_mib'] / dense['peak_above_weights_mib']:.2f}" if dense else "-"
        rises = "; ".join(f"{k} {v:g}" for k, v in r["rises_mib"].items() if v > 0)
        print(f"| {r['round']} | {r['method']} | {r['prompt']} | {r['chunk']} | {'yes' if r['warm'] else 'no'} | "
              f"{r['kv_mib']:.1f} | {r['peak_above_weights_mib']:.0f} | {ratio} | {rises} |")
    if args.rounds > 1:
        print()
        print(summary(rows, "peak_above_weights_mib", "peak MiB"))


def run(args, method: str) -> dict:
    """One method's run in a fresh process (`worker`), its row."""
    proc = subprocess.run([sys.executable, __file__, "--prompt", str(args.prompt), "--steps", str(args.steps),
                           "--prefill-chunk", str(args.prefill_chunk), *(["--warm"] if args.warm else []),
                           "--worker", method], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
    if line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{method} failed")
    row = json.loads(line[4:])
    print(f"[{method}] peak {row['peak_above_weights_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    main()
