"""Where one decode step's time goes through `generate`: dense against GEAR, in one process.

Usage:
  python benchmarks/decode_step_profile.py                      # prompts 3072 and 8192: dense, gear4
  python benchmarks/decode_step_profile.py --prompts 3072 --steps 16 --methods dense gear4 gear2

SmolLM2-135M (fp32), one copy per method, each with its own forward code
object (`decode_methods.own_forward`: Dynamo's caches stay apart); dense
is transformers' eager DynamicCache, gearN `gear_compile.compile(model,
method="gear", bits=N)` (Inductor). For each prompt length every method
answers once to compile and warm up, then the methods take turns, --rounds
times, at one `generate` call of --steps decode tokens each under
torch.profiler. The streamer opens a profiler range per decode step (the
prefill is left out), and each bucket is the CPU time of the events inside
those ranges, per step (median over the rounds):

  step         the whole decode step, generate's own work included
  attention    aten::scaled_dot_product_attention (dense), gear::attention_cpu
  gemv         aten::mm / aten::addmm: the weights' products, lm_head included
  flush        `store.flush_stores` (once every n_b steps; its amortised share)
  host glue    ours between graph calls (`runtime.wrap`'s run less the
               compiled graph and the flush: wrapping stores as CompressedKV,
               counting lengths)
  guards       Dynamo's cache lookup (its guards, CompressedKV flattening included)
  pre-graph    Dynamo's bytecode gathering the graph's inputs
  aot wrapper  AOT autograd's run-time prologue and epilogue

Ratios between methods come from rounds taken in turn; the buckets say
where the time goes, not how a lone run would time (profiling adds a few
microseconds an event).
Neighbours: generate_throughput (throughput side by side), examples/quickstart.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from machine import cpu_name

HERE = Path(__file__).parent
METHODS = {"dense": None, "gear4": dict(method="gear", bits=4), "gear2": dict(method="gear", bits=2)}
STEP = "decode step"
BUCKETS = {   # bucket -> profiler event names
    "attention": ("aten::scaled_dot_product_attention", "gear::attention_cpu"),
    "gemv": ("aten::mm", "aten::addmm"),
    "flush": ("gear: flush",),
    "runtime run": ("gear: runtime run",),
    "graph": ("gear: compiled graph",),
    "guards": ("TorchDynamo Cache Lookup",),
    "pre-graph": ("Pregraph bytecode",),
    "aot wrapper": ("AOTDispatcher Runtime Wrapper Prologue", "AOTDispatcher Runtime Wrapper Epilogue"),
}


class StepRanges:
    """A generate() streamer that opens a profiler range at each decode step."""

    def __init__(self):
        self.puts, self.range, self.times = 0, None, []

    def put(self, value):
        self.close()
        self.puts += 1
        if self.puts > 1:            # the first put is the prompt, before the prefill
            self.range = record_function(STEP)
            self.range.__enter__()
            self.times.append(time.perf_counter())

    def close(self):
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.times[-1] = time.perf_counter() - self.times[-1]
            self.range = None

    def end(self):
        self.close()
        self.times = self.times[:-1]       # the last range opened after the last token


def instrument():
    """Profiler ranges around the runtime's run, its compiled call and the flush."""
    from gear_compile import runtime
    wrap, flush = runtime.wrap, runtime.flush_stores

    def wrap_ranged(compiled, plan, config):
        def graph(*args):
            with record_function("gear: compiled graph"):
                return compiled(*args)
        run = wrap(graph, plan, config)

        def ranged(*args):
            with record_function("gear: runtime run"):
                return run(*args)
        return ranged

    def flush_ranged(stores, *args, **kwargs):
        with record_function("gear: flush"):
            return flush(stores, *args, **kwargs)

    runtime.wrap, runtime.flush_stores = wrap_ranged, flush_ranged
    from gear_compile import backend
    backend.wrap = wrap_ranged


def load(options):
    sys.path.insert(0, str(HERE))
    import gear_compile
    from gear_compile.models import load_smollm2
    from decode_methods import own_forward
    model, _ = load_smollm2()
    own_forward(model)
    if options is not None:
        gear_compile.compile(model, **options)
    return model


def answer(model, ids, steps, streamer=None):
    with torch.no_grad():
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                       streamer=streamer)


def buckets(prof, steps: int) -> dict:
    """Per-step CPU ms of each bucket, from the events inside the step ranges."""
    totals = dict.fromkeys(["step", *BUCKETS], 0.0)
    names = {name: bucket for bucket, names in BUCKETS.items() for name in names}

    def walk(event, inside):
        if inside and event.name in names:
            totals[names[event.name]] += event.cpu_time_total / 1e3
            if event.name in ("aten::mm", "aten::addmm"):
                return                  # an addmm's mm is the same product
        for child in event.cpu_children:
            walk(child, inside)

    for event in prof.events():
        if event.name == STEP and event.cpu_parent is None:
            totals["step"] += event.cpu_time_total / 1e3
            walk(event, True)
    out = {k: v / steps for k, v in totals.items()}
    if out["runtime run"]:
        out["host glue"] = out["runtime run"] - out["graph"] - out["flush"]
    out.pop("runtime run"), out.pop("graph")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[3072, 8192])
    p.add_argument("--steps", type=int, default=16, help="decode steps per profiled generate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["dense", "gear4"], choices=list(METHODS))
    args = p.parse_args()
    instrument()
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    models = {m: load(METHODS[m]) for m in args.methods}
    for prompt in args.prompts:
        ids = torch.randint(100, 40000, (1, prompt), generator=torch.Generator().manual_seed(0))
        for model in models.values():
            answer(model, ids, 2)                  # compiles every graph
        rows = {m: [] for m in args.methods}
        for r in range(args.rounds):
            for m in args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]:
                clock = StepRanges()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    answer(models[m], ids, args.steps, clock)
                row = buckets(prof, len(clock.times))
                row["wall"] = 1e3 * statistics.median(clock.times)
                rows[m].append(row)
        keys = list(rows[args.methods[0]][0])
        print(f"\n## prompt {prompt}: ms per decode step (median of {args.rounds} rounds; wall: the "
              f"median step under the profiler)\n")
        print("| bucket | " + " | ".join(args.methods) + " |")
        print("|---|" + "---:|" * len(args.methods))
        for key in sorted(set(keys) | {k for m in args.methods for k in rows[m][0]},
                          key=lambda k: (k != "wall", k != "step", k)):
            cells = [statistics.median(r.get(key, 0.0) for r in rows[m]) for m in args.methods]
            print(f"| {key} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        dense = [r["wall"] for r in rows.get("dense", [])]
        for m in args.methods:
            if m != "dense" and dense:
                ratios = [d["wall"] / g["wall"] for d, g in zip(rows["dense"], rows[m])]
                print(f"{m} speed / dense, round by round: median {statistics.median(ratios):.2f}x "
                      f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
