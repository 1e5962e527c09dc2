"""What runs between compiled graph calls: the host side of the decode step.

`wrap(compiled, plan, config)` adapts Dynamo's calling convention to the
rewritten graph's: CompressedKV inputs go in as their inner tensors, and the
stores a call created or updated come back out as CompressedKV tensors for
the cache to keep. For each updated store it advances the host copy of the
lengths by the tokens the graph wrote (the graph itself updated the device
copy), so it knows without a device sync when a buffer holds n_b tokens, and
then compresses every full buffer of the call in one batched flush
(`store.flush_stores`): once every n_b tokens, after the attention of the
step that filled the block, outside the per-token graph (which thus stays
one static graph: no `torch.cond`, no host reads; the flush's own cost is
amortised over n_b steps). Capacity grows there too, never in the graph,
and a sliding-window layer's store drops the whole blocks that have left
its window (`KVStore.forget`). Within `reserving(n)`, a new store is sized
for n tokens at once, so it never grows (`static`).
Neighbours: `passes.rewrite` (the plan), `store` (counts, flush, append),
`compressed_kv` (the output tensors), `backend` (calls `wrap`).
"""
from __future__ import annotations

import contextlib
import contextvars

from .compressed_kv import CompressedKV
from .config import GearConfig
from .passes.rewrite import PrefillOut, RewritePlan, TensorOut
from .store import KVStore, flush_stores


# tokens each store a prefill creates must hold without growing (`reserving`)
_RESERVE: contextvars.ContextVar[int | None] = contextvars.ContextVar("gear_reserve", default=None)


@contextlib.contextmanager
def reserving(tokens: int):
    """Within the block, stores created by a prefill are sized at once for
    `tokens` tokens in all, so none grows (its shapes stay fixed) until then."""
    token = _RESERVE.set(tokens)
    try:
        yield
    finally:
        _RESERVE.reset(token)


def wrap(compiled, plan: RewritePlan, config: GearConfig):
    """The function Dynamo calls in place of the compiled graph."""

    def run(*args):
        results = compiled(*plan.flatten_inputs(args))
        outputs, stores, full, i = [], [], [], 0
        for spec in plan.outputs:
            if isinstance(spec, TensorOut):
                outputs.append(results[i])
                i += 1
                continue
            if isinstance(spec, PrefillOut):
                store = KVStore(config, spec.kind, list(results[i:i + spec.parts]), logical=spec.logical,
                                dtype=spec.dtype)
                i += spec.parts
                if (reserve := _RESERVE.get()) is not None:
                    store.grow(reserve - len(store) + store.layout.decode.block)
            else:
                store = args[spec.input].store
                if spec.written:
                    if store.wrote(spec.written):
                        full.append(store)
                else:
                    store.append(results[i])
                    i += 1
            stores.append((len(outputs), spec.keep))
            outputs.append(store)
        if full:
            flush_stores(full)
        for j, keep in stores:
            store, length = outputs[j], None
            if keep is not None:           # a sliding window: its logical tokens are the newest `keep`
                store.forget(keep)
                length = min(len(store), keep)
            outputs[j] = CompressedKV.of(store, length)
        return outputs

    return run
