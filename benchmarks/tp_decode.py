"""Decoding under tensor parallelism: per-rank KV bytes and decode tok/s of
the dense cache and the compressed one, side by side in one run.

    python benchmarks/generate_throughput.py --tp 2                 # CPU, gloo, 8k prompt
    python benchmarks/generate_throughput.py --tp 2 --prompts 1024 --new-tokens 16
    python benchmarks/generate_throughput.py --tp 8 --device cuda   # GPUs, NCCL

The model has random weights shaped like SmolLM2-135M (30 layers, hidden
512, head dim 64) but with 8 query / 4 KV heads, which split over 2 or 4
ranks (SmolLM2's 3 KV heads do not split over 2). It is saved once, then
`torch.distributed.run` starts N ranks, each loading it with
`tp_plan="auto"`. On every rank, each method gets its own copy of the model
and its own compiled code, prefills the same prompt, then the methods take
their decode steps in turn, one each, round after round (every rank runs
the same calls, as its collectives require); "tok/s" = batch / median step
time on rank 0. Methods: `decode_methods.METHODS` (dense-eager,
dense-inductor, gear4, ...). Threads per rank: the cores divided by N.

Results: benchmarks/results/generate_throughput_tp_<device>.{md,json}.
Neighbours: generate_throughput (the launcher's options), decode_methods (the methods,
`own_forward`), tests/tp_worker.py (the correctness check of the same setting).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=16384, tie_word_embeddings=True)


def save_model(path: Path) -> None:
    import torch
    import transformers as tf
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE)).save_pretrained(path)


def rank_main(spec: dict) -> None:
    """One rank: every method side by side; rank 0 writes the result."""
    import torch
    import torch.distributed as dist
    import transformers as tf

    import gear_compile
    from gear_compile.hf_compat import cache_kwarg
    sys.path.insert(0, str(HERE))
    from decode_methods import cache_bytes, own_forward, setup

    device = spec["device"]
    batch, prompt = spec["batch"], spec["prompt"]
    ids = torch.randint(100, 40000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    runs = {}
    with torch.no_grad():
        for method in spec["methods"]:
            model = tf.AutoModelForCausalLM.from_pretrained(spec["dir"], tp_plan="auto", dtype=torch.float32
                                                            if device == "cpu" else torch.float16).eval()
            own_forward(model)
            cache = setup(model, method, device)()
            step = lambda x, m=model, c=cache: m(input_ids=x, **cache_kwarg(m, c),  # noqa: E731
                                                  use_cache=True).logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            nxt = step(ids.to(model.device))
            for _ in range(3):                          # compile and warm the decode step
                nxt = step(nxt)
            runs[method] = dict(step=step, next=nxt, times=[], cache=cache,
                                startup_s=time.perf_counter() - t0)
            if dist.get_rank() == 0:
                print(f"  {method}: prefill + 3 steps {runs[method]['startup_s']:.0f} s", flush=True)
        for _ in range(spec["new_tokens"]):
            for run in runs.values():
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                run["next"] = run["step"](run["next"])
                if device == "cuda":
                    torch.cuda.synchronize()
                run["times"].append(time.perf_counter() - t)
    kv = torch.tensor([cache_bytes(run["cache"], m) for m, run in runs.items()], dtype=torch.int64)
    every = [torch.zeros_like(kv) for _ in range(dist.get_world_size())]
    dist.all_gather(every, kv.to(model.device) if device == "cuda" else kv)
    if dist.get_rank() == 0:
        rows = {m: dict(tok_s=batch / statistics.median(run["times"]), startup_s=run["startup_s"],
                        kv_bytes_per_rank=[int(e[i]) for e in every],
                        compressed=any(isinstance(layer.keys, gear_compile.CompressedKV)
                                       for layer in run["cache"].layers))
                for i, (m, run) in enumerate(runs.items())}
        Path(spec["out"]).write_text(json.dumps(dict(spec, rows=rows, threads=torch.get_num_threads())))
    dist.destroy_process_group()


def run_tp(args, methods: list[str], prompt: int, batch: int) -> dict:
    """Save the model, start `args.tp` ranks, return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="gear_tp_") as tmp:
        save_model(Path(tmp) / "model")
        out = Path(tmp) / "out.json"
        spec = dict(dir=str(Path(tmp) / "model"), out=str(out), device=args.device, methods=methods,
                    prompt=prompt, batch=batch, new_tokens=args.new_tokens, ranks=args.tp)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.tp)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp),
               "--standalone", str(Path(__file__).resolve()), json.dumps(spec)]
        done = subprocess.run(cmd, env=env, timeout=args.timeout, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            return dict(spec, error=(done.stderr.strip().splitlines() or ["no output"])[-1][:300])
        return json.loads(out.read_text())


def write(args, results: list[dict], machine: list[str]) -> str:
    lines = [f"# Decoding under tensor parallelism: {args.tp} ranks, {args.device}", "", *machine,
             f"- model: random weights, {SHAPE['num_hidden_layers']} layers, {SHAPE['num_attention_heads']} "
             f"query / {SHAPE['num_key_value_heads']} KV heads, head dim "
             f"{SHAPE['hidden_size'] // SHAPE['num_attention_heads']} (SmolLM2-135M's size with heads "
             f"that split over ranks); tp_plan=\"auto\"; {results[0].get('threads', '?')} threads per rank",
             f"- decode tok/s: batch / median step time on rank 0 over {args.new_tokens} steps, methods "
             "interleaved step by step in one run; KV MiB: `kv_bytes` of each rank's cache after the run",
             "", "| prompt | batch | method | decode tok/s | vs dense-eager | KV MiB per rank | compressed |",
             "|---:|---:|---|---:|---:|---|---|"]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['prompt']} | {res['batch']} | error | | | | {res['error']} |")
            continue
        base = res["rows"].get("dense-eager", {}).get("tok_s")
        for method, row in res["rows"].items():
            ratio = f"{row['tok_s'] / base:.2f}x" if base else ""
            mib = " / ".join(f"{b / 2**20:.1f}" for b in row["kv_bytes_per_rank"])
            lines.append(f"| {res['prompt']} | {res['batch']} | {method} | {row['tok_s']:.2f} | {ratio} | "
                         f"{mib} | {'yes' if row['compressed'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    stem = args.out / f"{args.prefix}generate_throughput_tp_{args.device}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return text


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
