"""`gear-compile inspect`: show what the gear backend rewrites in a model.

    gear-compile inspect                      # built-in tiny Llama
    gear-compile inspect --model gpt2         # another tiny architecture
    gear-compile inspect --model /path/to/model [--gguf-file F.gguf]
    gear-compile inspect --method kivi --bits 2 --out gear.diff
    gear-compile inspect --model gpt2 --method kivi --group-size 16   # head dim 16

Prints each attention site (rewritten or fallback and why) and writes the
before/after graph diff to --out. Neighbours: `explain`, `models`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .config import BITS, METHODS
from .models import TINY


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gear-compile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="report attention sites and write the graph diff")
    p.add_argument("--model", default="llama",
                   help=f"a built-in tiny model ({', '.join(TINY)}) or a local model directory")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's directory")
    p.add_argument("--method", default="gear", choices=METHODS)
    p.add_argument("--bits", type=int, default=4, choices=BITS)
    p.add_argument("--group-size", type=int, default=None,
                   help="group_size (default: GearConfig's); must divide the head dim under kivi")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--inductor", action="store_true", help="lower through Inductor (slower)")
    p.add_argument("--out", default="gear_graphs.diff", help="where to write the diff")
    args = parser.parse_args(argv)

    from .explain import explain
    model = _load(args.model, args.gguf_file)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    print(f"gear-compile inspect: {args.model} ({type(model).__name__}), method={args.method}, "
          f"bits={args.bits}, prompt {args.prompt_len} tokens + 1 decode step", flush=True)
    options = {} if args.group_size is None else {"group_size": args.group_size}
    report = explain(model, ids, method=args.method, bits=args.bits, inductor=args.inductor, **options)
    print(report.text())
    path = report.write(args.out)
    print(f"diff written to {path}")
    fallbacks = [s for s in report.sites if not s.rewritten]
    if fallbacks:
        print(f"{len(fallbacks)} site(s) left exact (see reasons above)")
    return 0


def _load(name: str, gguf_file: str | None):
    from .models import tiny_model
    if name in TINY:
        return tiny_model(name)
    from transformers import AutoModelForCausalLM
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()


if __name__ == "__main__":
    sys.exit(main())
