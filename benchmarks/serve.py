"""Serving benchmark: transformers' continuous batching with its own dense paged
cache against the compressed paged pool (`gear_compile.serving`), under the
same KV memory budget.

Usage:
  python benchmarks/serve.py                       # the full CPU run: 64 requests, prompts 256-4096, 64-256 new
  python benchmarks/serve.py --requests 12 --prompt-max 1024 --new-min 32 --new-max 64 --budgets-mib 48 96
  python benchmarks/serve.py --gpu                 # Llama-3-8B-shaped random fp16 weights on CUDA
  python benchmarks/serve.py --memory --requests 6 --prompt-min 256 --prompt-max 512 --new-min 16 \
      --new-max 32 --methods dense gear4 gear2     # peak RSS at the same concurrency

Each (budget, method) cell runs in a fresh process (its own peak RSS), the
cells in turn, method after method within a budget, so that drifts of the
shared machine hit every method alike; `--rounds N` makes N such passes and
adds each method's median, range and each round's own ratio to dense
(`rounds.summary`). The results are rewritten after every cell. A cell
loads the model, sizes the KV store to the budget (dense: transformers'
`num_blocks` of the model's dtype; GEAR: `serving.enable(model,
kv_budget_bytes=...)`, with as many request slots, each an exact tail, as
requests of the workload's mean length fill the budget with), adds every
request at once through the manager API (`init_continuous_batching`, `add_request`,
`get_result`: the loop `generate_batch` runs, which cannot give each request
its own max_new_tokens) and waits for all of them. Greedy decoding, no EOS.

Reported per cell: requests/s and output tokens/s (wall time from the first
add to the last result), the largest number of requests holding KV at once
(the scheduler's active requests, read at every forward), TTFT (first token
time minus creation) and TPOT (mean time between a request's tokens), p50 /
p99 over requests, KV bytes allocated, and the process's peak RSS above its
RSS after loading the weights (the heap trimmed and the peak reset there:
`reset_peak`), and the tokens redone: those fed to the model beyond each
request's prompt and new tokens once, the prefills preemption repeats (dense's
soft resets, and the pool's under --admission grow).
Results: benchmarks/results/serve_<device>.{md,json,png}.

Memory mode (--memory): every method gets the KV budget that holds all the
requests at once (dense: their blocks; the pool: their pages and a tail
each), so each runs the same requests at the same concurrency and peak RSS
above the weights compares like for like (issue 31's target: the pool's at
most 0.5x dense's). Each cell also says which phase raised the peak and by
how much: VmHWM read at the entry and exit of the model's forward, its MLPs
and attentions, the pool's write and the codec, each rise charged to the
innermost phase running (the rest of the forward: embeddings, norms,
projections, the LM head). Results: benchmarks/results/serve_<device>_memory.*.

Methods: dense (transformers' paged cache, "sdpa"), gear4 / gear2
(method="gear", 4 / 2 bits), kivi2 (method="kivi", 2 bits). The pool's
attention (--kernel): by default the C++ paged kernel on the CPU and the
Triton one on CUDA (kernels/cpu_paged_attention.h, kernels/paged_decode.py),
both reading the pages in place; --kernel torch times the
torch reference (paged_attention.attend), which rebuilds pages a chunk at a
time. Each row records which ran.
GPU mode (--gpu): a random-weight fp16 model shaped like Llama-3-8B (32
layers, GQA 32/8, head dim 128), dense with transformers' CUDA graphs where
its continuous batching uses them; the pool runs without (its bookkeeping is
Python between layers) and attends with the Triton paged kernel (decode rows
and prefill chunks with a past). Budgets default to 2, 4 and 8 GiB (an 8B model's
token is 128 KiB of fp16 K/V: dense then holds about 7, 14 and 28 of the
default workload's requests, so it is memory-bound at each). Results:
benchmarks/results/serve_gpu.*.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

from machine import cpu_name
from peak_memory import PeakPhases, reset_peak, rss_bytes
from rounds import summary

METHODS = {"dense": None, "gear4": dict(method="gear", bits=4), "gear2": dict(method="gear", bits=2),
           "kivi2": dict(method="kivi", bits=2)}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-min", type=int, default=256)
    p.add_argument("--prompt-max", type=int, default=4096)
    p.add_argument("--new-min", type=int, default=64)
    p.add_argument("--new-max", type=int, default=256)
    p.add_argument("--budgets-mib", type=float, nargs="+", default=None,
                   help="KV budgets (default 256 512 on the CPU, where 128 MiB of dense fp32 cache would "
                        "not hold the largest requests (up to 4,352 tokens); 2048 4096 8192 with --gpu)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--admission", default="grow", choices=["grow", "reserve"],
                   help="the pool's (serving.enable): grow (pages as needed, preempting as dense does) or "
                        "reserve (a request's whole length at admission)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over every cell, interleaved (medians, ranges, each round's own ratio)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--memory", action="store_true", help="each method's budget holds every request at once")
    p.add_argument("--kernel", default="auto", choices=["auto", "cpu", "triton", "torch"],
                   help="the pool's attention: auto (the C++ paged kernel on the CPU, Triton on CUDA), cpu, "
                        "triton, torch (the reference)")
    p.add_argument("--out", default=None, help="results stem (default results/serve_<cpu|gpu>)")
    p.add_argument("--cell", nargs=2, metavar=("METHOD", "BUDGET_MIB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budgets_mib is None:        # an 8B model's token is 128 KiB in fp16: GiB budgets
        args.budgets_mib = [2048, 4096, 8192] if args.gpu else [256, 512]
    return args


def load(args):
    import torch
    import transformers as tf
    if not args.gpu:        # the GGUF dequantized once (~25 s), its weights then loaded in each cell
        cached = os.path.expanduser("~/.cache/gear_compile/smollm2-135m-fp32.pt")
        if not os.path.exists(cached):
            from gear_compile.models import load_smollm2
            model = load_smollm2(torch.float32)[0]
            config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.save(dict(config=config, state=model.state_dict()), cached)
        saved = torch.load(cached)
        config = tf.LlamaConfig.from_dict(saved["config"])
        config._attn_implementation = "sdpa"
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.load_state_dict(saved["state"])
        return model
    config = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float16,
                                                   attn_implementation="sdpa").eval()


def workload(args, vocab: int):
    import torch
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.requests,), generator=g).tolist()
    new = torch.randint(args.new_min, args.new_max + 1, (args.requests,), generator=g).tolist()
    return [(torch.randint(1, vocab, (n,), generator=g).tolist(), m) for n, m in zip(lengths, new)]


def run_cell(args, method: str, budget: int) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from gear_compile import serving
    model = load(args)
    text = model.config.get_text_config()
    page = 64
    reqs = workload(args, text.vocab_size)
    if args.memory:
        budget = memory_budget(model, method, reqs, page)
    rises = serving_phases(model) if args.memory else None
    reset_peak()
    base_rss = rss_bytes()
    if rises:
        rises.start()
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = dict(page_size=page, max_batch_tokens=args.max_batch_tokens, max_memory_percent=0.9)
    if METHODS[method] is None:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        block = page * text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * model.dtype.itemsize
        cb["num_blocks"] = max(1, budget // block)
        cb["use_cuda_graph"] = bool(args.gpu)
    else:
        # tails sized from this traffic's mean request (prompt + new tokens), as a server would:
        # "reserve" holds each admitted request whole, so one tail per mean request; under "grow"
        # the running requests hold part of theirs (prompts arrive in max_batch_tokens chunks,
        # the preempted start again), so twice as many tails, each 68 exact fp16 tokens here
        typical = (args.prompt_min + args.prompt_max + args.new_min + args.new_max) // 2
        if args.admission == "grow":
            typical //= 2
        sizing = dict(max_requests=len(reqs)) if args.memory else dict(typical_tokens=typical)
        serving.enable(model, kv_budget_bytes=budget, kernel=args.kernel, admission=args.admission, **sizing,
                       **METHODS[method])
    manager = model.init_continuous_batching(generation_config=gen,
                                             continuous_batching_config=ContinuousBatchingConfig(**cb))
    active, fed = [], [0]
    forward = model.forward

    @functools.wraps(forward)       # its signature: transformers passes logits_to_keep only if it sees it
    def counting(*a, **k):
        active.append(len(manager.batch_processor.scheduler.active_requests))
        fed[0] += (k["input_ids"] if "input_ids" in k else a[0]).shape[-1]
        return forward(*a, **k)

    model.forward = counting
    manager.start()
    results = {}
    try:
        t0 = time.perf_counter()
        for i, (ids, new) in enumerate(reqs):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=new, record_timestamps=True)
        while len(results) < len(reqs):
            out = manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError(f"{method}: no result in 600 s ({len(results)} of {len(reqs)} done)")
            if out.is_finished():
                results[out.request_id] = out
        wall = time.perf_counter() - t0
        cache = manager.batch_processor.cache
        kv = (cache.gear_pool.nbytes() if METHODS[method]
              else cache.cache_tensor.numel() * cache.cache_tensor.element_size())
    finally:
        manager.stop(block=True, timeout=60)
    errors = [r for r, o in results.items() if o.error is not None]
    wrong = [f"r{i}" for i, (_, new) in enumerate(reqs) if len(results[f"r{i}"].generated_tokens) != new]
    done = [o for o in results.values() if o.error is None and o.timestamps]
    ttft = [o.timestamps[0] - o.created_time for o in done]
    tpot = [(o.timestamps[-1] - o.timestamps[0]) / (len(o.timestamps) - 1) for o in done if len(o.timestamps) > 1]
    out_tokens = sum(len(o.generated_tokens) for o in done)
    return dict(method=method, kernel=manager.kernel if METHODS[method] else "sdpa",
                budget_mib=budget / 2**20, kv_bytes=kv, requests=len(reqs), wall_s=wall,
                requests_per_s=len(reqs) / wall, output_tok_per_s=out_tokens / wall,
                max_concurrent=max(active), redone_tokens=fed[0] - sum(len(ids) + new - 1 for ids, new in reqs),
                ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99),
                tpot_p50=_pct(tpot, 50), tpot_p99=_pct(tpot, 99),
                peak_rss_above_weights_mib=(rss_bytes("VmHWM") - base_rss) / 2**20,
                peak_rises_mib=rises.mib() if rises else None,
                errors=errors, wrong_lengths=wrong,
                pool_whole=bool(model._gear_paged_pool.whole()) if METHODS[method] else None,
                slots=model._gear_paged_pool.max_requests if METHODS[method] else None)


def memory_budget(model, method: str, reqs, page: int) -> int:
    """KV bytes that hold every request of `reqs` at once: dense, each
    request's `page`-token blocks of its prompt and new tokens; the pool,
    its pages (as `serving` reserves them) and a tail each."""
    from gear_compile.config import GearConfig
    from gear_compile.paged import PagedPool
    text = model.config.get_text_config()
    heads, layers = text.num_key_value_heads, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if METHODS[method] is None:
        block = page * layers * 2 * heads * head_dim * model.dtype.itemsize
        return sum(-(-(len(ids) + new) // page) for ids, new in reqs) * block
    codec = GearConfig.from_options(METHODS[method]).codec      # sizes only: a pool on "meta"
    pool = PagedPool(codec, layers, heads, head_dim, model.dtype, 2**30, max_requests=1, device="meta")
    pages = sum((len(ids) + new - 1) // pool.page_tokens for ids, new in reqs)
    return len(reqs) * pool.tail_bytes + pages * pool.page_bytes


def serving_phases(model) -> PeakPhases:
    """The phases of a continuous-batching step whose peak RSS rises are told apart."""
    import torch.nn.functional as F

    from gear_compile import paged, serving
    phases = PeakPhases("outside the forward (KV allocation, scheduling)")
    phases.wrap(type(model), "forward", "forward: embeddings, norms, projections, LM head")
    for m in {type(x) for x in model.modules() if type(x).__name__.endswith("MLP")}:
        phases.wrap(m, "forward", "MLP")
    phases.wrap(F, "scaled_dot_product_attention", "attention over exact K/V (sdpa)")
    phases.wrap(serving, "attend", "attention over the pool (paged_attention.attend)")
    phases.wrap(paged.PagedPool, "write", "pool write (tails, pages)")
    phases.wrap(paged, "compress", "codec (segment.compress of filled pages)")
    return phases


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def table(rows) -> str:
    head = ("| round | budget MiB | method | KV MiB held | max concurrent (pool slots) | x dense | req/s | "
            "out tok/s | x dense | TTFT p50 / p99 s | TPOT p50 / p99 ms | peak RSS above weights MiB | "
            "tokens redone | lost/wrong | pool whole |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {(r["budget_mib"], r.get("round")): r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense.get((r["budget_mib"], r.get("round")))
        conc = f"{r['max_concurrent'] / d['max_concurrent']:.2f}" if d and d["max_concurrent"] else "-"
        tok = f"{r['output_tok_per_s'] / d['output_tok_per_s']:.2f}" if d and d["output_tok_per_s"] else "-"
        name = r["method"] + (f" ({r['kernel']})" if r.get("kernel") not in (None, "sdpa") else "")
        slots = f" ({r['slots']})" if r.get("slots") else ""
        lines.append(f"| {r.get('round', 1)} | {r['budget_mib']:g} | {name} | {r['kv_bytes'] / 2**20:.1f} | "
                     f"{r['max_concurrent']}{slots} | {conc} | {r['requests_per_s']:.3f} | "
                     f"{r['output_tok_per_s']:.1f} | {tok} | {r['ttft_p50']:.1f} / {r['ttft_p99']:.1f} | "
                     f"{1e3 * r['tpot_p50']:.0f} / {1e3 * r['tpot_p99']:.0f} | "
                     f"{r['peak_rss_above_weights_mib']:.0f} | {r.get('redone_tokens', '-')} | "
                     f"{len(r['errors'])}/{len(r['wrong_lengths'])} | {r['pool_whole']} |")
    return "\n".join(lines)


def memory_table(rows) -> str:
    head = ("| round | method | requests | max concurrent | KV budget MiB | KV MiB allocated | "
            "peak RSS above weights MiB | x dense | lost/wrong | peak raised by (MiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {r.get("round"): r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense.get(r.get("round"))
        ratio = f"{r['peak_rss_above_weights_mib'] / d['peak_rss_above_weights_mib']:.2f}" if d else "-"
        rises = "; ".join(f"{k} {v:g}" for k, v in r["peak_rises_mib"].items())
        lines.append(f"| {r.get('round', 1)} | {r['method']} | {r['requests']} | {r['max_concurrent']} | "
                     f"{r['budget_mib']:.1f} | {r['kv_bytes'] / 2**20:.1f} | "
                     f"{r['peak_rss_above_weights_mib']:.0f} | {ratio} | "
                     f"{len(r['errors'])}/{len(r['wrong_lengths'])} | {rises} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m in dict.fromkeys(r["method"] for r in rows):        # each budget's median, every round a dot
        budgets = sorted({r["budget_mib"] for r in rows if r["method"] == m})
        for a, key in zip(ax, ("output_tok_per_s", "max_concurrent")):
            runs = [[r[key] for r in rows if r["method"] == m and r["budget_mib"] == b] for b in budgets]
            line, = a.plot(budgets, [statistics.median(v) for v in runs], "o-", label=m)
            a.scatter([b for b, v in zip(budgets, runs) for _ in v], [x for v in runs for x in v], s=10,
                      color=line.get_color(), alpha=0.5)
    for a, t in zip(ax, ("output tokens/s", "max concurrent requests")):
        a.set_xlabel("KV memory budget (MiB)")
        a.set_ylabel(t)
        a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse(argv)
    if args.cell:       # a cell's process, started below once the check has passed
        print("CELL " + json.dumps(run_cell(args, args.cell[0], int(float(args.cell[1]) * 2**20))), flush=True)
        return
    from gear_compile import hf_compat
    if (why := hf_compat.serving_unsupported()) is not None:     # dense's config too: page_size is 5.19's
        raise SystemExit(f"serve.py: {why}. Without an index (the lent GPU has 5.17), bring a wheel: "
                         f"README, 'On a lent GPU'.")
    rows = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    cells = [(rnd, budget, method) for rnd in range(1, args.rounds + 1)
             for budget in ([0] if args.memory else args.budgets_mib)     # --memory: each method's own budget
             for method in args.methods]
    for rnd, budget, method in cells:
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--cell", method, str(budget)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("CELL ")), None)
        if line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"cell {method} @ {budget} MiB failed")
        rows.append(json.loads(line[5:]) | dict(round=rnd))
        r = rows[-1]
        print(f"round {rnd}, {r['budget_mib']:.1f} MiB {method}: {r['output_tok_per_s']:.1f} tok/s, "
              f"{r['max_concurrent']} concurrent, peak RSS +{r['peak_rss_above_weights_mib']:.0f} MiB, "
              f"{r['wall_s']:.0f} s", flush=True)
        text = write(args, passthrough, rows)       # after every cell: a long run's finished cells are kept
    print(text)


def write(args, passthrough: list[str], rows: list[dict]) -> str:
    """The results so far, as json, markdown and (not in memory mode) a PNG; returns the tables."""
    import torch
    import transformers
    stem = args.out or os.path.join(RESULTS, ("serve_gpu" if args.gpu else "serve_cpu")
                                    + ("_memory" if args.memory else ""))
    device = torch.cuda.get_device_name() if args.gpu else cpu_name()
    command = "python benchmarks/serve.py " + " ".join(passthrough)
    with open(stem + ".json", "w") as f:
        json.dump(dict(command=command, device=device, torch=torch.__version__,
                       transformers=transformers.__version__, rows=rows), f, indent=1)
    text = memory_table(rows) if args.memory else table(rows)
    if args.rounds > 1:
        text += ("\n\nOver the rounds:\n\n" + (
            summary(rows, "peak_rss_above_weights_mib", "peak RSS above weights MiB") if args.memory else
            summary(rows, "output_tok_per_s", "out tok/s", group="budget_mib", fmt=".1f") + "\n\n"
            + summary(rows, "max_concurrent", "max concurrent", group="budget_mib")))
    title = ("peak RSS at the same concurrency, dense vs the compressed paged pool" if args.memory
             else "dense vs the compressed paged pool")
    with open(stem + ".md", "w") as f:
        f.write(f"# Serving: transformers' continuous batching, {title}\n\n"
                f"`{command}`\n\n{device}; torch {torch.__version__}, transformers {transformers.__version__}; "
                f"{args.requests} requests, prompts {args.prompt_min}-{args.prompt_max}, "
                f"{args.new_min}-{args.new_max} new tokens, max_batch_tokens {args.max_batch_tokens}, "
                f"pool admission {args.admission}; "
                f"{args.rounds} round(s), cells run one after another in fresh processes "
                f"(see the script's docstring).\n\n" + text + "\n")
    if not args.memory:
        plot(rows, stem + ".png")
    return text


if __name__ == "__main__":
    main()
