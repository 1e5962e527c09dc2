"""Compressed KV under transformers' continuous batching (`generate_batch`,
`ContinuousBatchingManager`), with no model change: `enable(model, ...)`.

Why hooks and not the compiler route. transformers' paged cache writes and
reads K/V in `PagedAttentionCache.update`, which is decorated
`@torch.compiler.disable`: Dynamo never captures it, so there is no write or
read in any graph for a pass to match (generate()'s cache is matched because
its `torch.cat` is traced). transformers offers two extension points instead,
and this module uses exactly those two:

  the cache     `GearPagedCache`, a `PagedAttentionCache` whose `update`
                keeps the step's new K/V for the pool (`paged.PagedPool`)
                instead of writing dense pages. transformers' own block
                bookkeeping runs unchanged on a "meta" tensor (it allocates
                no bytes): its scheduler, request states, forking and
                streaming stay transformers'; admission asks the pool
                (`can_store_request_tokens`). By default ("grow", as
                transformers' dense cache does) a request takes pages as
                it needs them, so the pool runs as many requests as it
                holds now; when a running request cannot grow,
                transformers' preemption frees the newest starved ones and
                queues them to be prefilled anew (a soft reset), asking the
                pool how many can then grow (`count_storable_requests`).
                "reserve" takes a request's pages for its prompt and every
                new token at admission: it never preempts, and runs fewer.
                A request larger than the whole pool is refused at
                `add_request` with a message.
  attention     "gear_paged", registered with `AttentionInterface`: each
                layer's queries attend the pool's pages through the block
                table (`paged_attention.attend`: on the CPU the C++ paged
                kernel, which reads the pages where they lie, `kernel`
                "auto"; on CUDA the Triton paged kernel,
                kernels/paged_decode.py; else the torch reference), then
                that layer's new K/V are written (`PagedPool.write`: the
                pages they fill compressed a few at a time) and dropped, so
                a step never holds every layer's K/V at once; the step's
                pages and tails were accounted before its first layer
                (`PagedPool.plan`).

`enable` sets the model's `init_continuous_batching` (an instance attribute)
to build a `GearBatchingManager`, so `generate_batch`,
`init_continuous_batching` and `continuous_batching_context_manager` all use
it. What is left exact or off, and reported by `describe()`: prefix sharing
(transformers would skip computing a shared prefix the pool never saw), the
decode fast path (a flash block-table kernel that writes the cache itself),
CUDA graphs and async batching (the pool's Python bookkeeping runs between
layers), and sliding-window layers (refused at `enable`).
Neighbours: `paged` (the pool), `paged_attention` (attention: the reference and the C++ kernel's call),
`config` (options).
"""
from __future__ import annotations

import dataclasses
import logging
from math import ceil

import torch
from transformers import AttentionInterface, ContinuousBatchingConfig
from transformers.generation.continuous_batching import cache as cb_cache
from transformers.generation.continuous_batching import continuous_api

from .config import GearConfig
from . import hf_compat
from .paged import PagedPool
from .paged_attention import attend, block_table

log = logging.getLogger("gear_compile")
ATTENTION = "gear_paged"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: [1, Hq, T, D] queries of a packed
    batch; returns ([1, T, Hq, D], None) as sdpa does."""
    cache: GearPagedCache = kwargs["gear_paged"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(cache.gear_pool, module.layer_idx, cache.table, query, key, value, scale, cache.kernel)
    cache.gear_pool.write(cache.step, module.layer_idx, key[0], value[0])
    return out[None], None


AttentionInterface.register(ATTENTION, _attention)


class GearPagedCache(cb_cache.PagedAttentionCache):
    """transformers' paged cache with the K/V in a compressed `PagedPool`
    (module docstring). `pool` stays transformers' sector pool; ours is
    `gear_pool`."""

    def __init__(self, config, continuous_batching_config, device, distributed_helper, dtype=torch.float16,
                 model_supports_logits_to_keep=False, *, gear_pool: PagedPool, kernel: str = "torch",
                 admission: str = "grow"):
        self.gear_pool = gear_pool
        self.admission = admission                      # "grow" or "reserve" (module docstring)
        self.gear_scheduler = None                      # transformers' scheduler, set by the manager
        cb = continuous_batching_config
        # transformers' blocks only track requests here: as many as the pool can hold, and no bytes
        tokens = gear_pool.capacity_tokens() + gear_pool.max_requests * gear_pool.page_tokens
        cb.num_blocks = ceil(tokens / cb.page_size) + 1
        super().__init__(config, cb, "meta", distributed_helper, dtype, model_supports_logits_to_keep)
        self.device = device
        self._rows: list[tuple[str, int, int]] = []   # (request, past, new tokens) of the batch being prepared
        self.step_rows: list[tuple[str, int]] = []    # (request, new tokens) of the batch running
        self.table = None                               # its block table (`paged_attention.block_table`)
        self.kernel = kernel                            # attention's: "cpu" (C++), "triton" or "torch" (`_kernel`)
        self.step = []                                  # its writes (`PagedPool.plan`)
        self._new_batch = True

    # -- admission: the pool decides ---------------------------------------
    def can_store_request_tokens(self, state, request_len: int, dry_run: bool = False) -> bool:
        total = state.current_len() + request_len
        if self.admission == "reserve":
            total = max(total, _final_len(state))
        if not (self.gear_pool.reserve(state.request_id, total, dry_run=True)
                and super().can_store_request_tokens(state, request_len, dry_run=True)):
            return False
        if dry_run:
            return True
        self.gear_pool.reserve(state.request_id, total)
        return super().can_store_request_tokens(state, request_len)

    def count_storable_requests(self, list_blocks_needed: list[dict[str, int]]) -> int:
        """How many of the scheduler's starved requests, in order, could take
        the pages their next rows need: transformers' preemption asks this
        before each soft reset (its `list_blocks_needed` count its own
        blocks, which here only track requests; the pool's pages bind)."""
        starved = self.gear_scheduler.starved_requests[:len(list_blocks_needed)]
        ours = self.gear_pool.storable([(s.request_id, s.current_len() + n) for s, n in starved])
        return min(ours, super().count_storable_requests(list_blocks_needed))

    def compute_free_capacity(self, relative: bool = True) -> int | float:
        pool = self.gear_pool
        free = len(pool.free_pages) * pool.page_bytes
        return free / (pool.n_pages * pool.page_bytes) if relative else free

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        self.gear_pool.free(request_id)
        super().free_blocks(request_id, no_cache)

    def free_all_requests(self, clear_ledgers: bool = False) -> None:
        for rid in list(self.gear_pool.requests):
            self.gear_pool.free(rid)
        super().free_all_requests(clear_ledgers)

    def prepare_fork_request(self, src_state, dst_req_ids, copy_src_and_dst):
        forked = super().prepare_fork_request(src_state, dst_req_ids, copy_src_and_dst)
        done = []
        for rid in forked:                             # a prefix: the rest are prefilled anew
            if len(done) == forked.index(rid) and self.gear_pool.fork(src_state.request_id, rid):
                done.append(rid)
            else:
                super().free_blocks(rid)
        return done

    # -- a step: rows, then every layer's update and attention ---------------
    def extend_read_and_write_indices(self, request_id, past_length, query_length, read_index, write_index):
        """Called for each request of a batch being prepared, in token order:
        its row. No index is built: nothing reads transformers' pages."""
        if self._new_batch:
            self._rows, self._new_batch = [], False
        self._rows.append((request_id, past_length, query_length))

    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx, kwargs):
        """Hand the layer's new K/V [1, H, T, D] to attention as they are
        (it writes them into the pool after reading the pool's past)."""
        if layer_idx == 0:
            self._start_step()
        kwargs["gear_paged"] = self
        return key_states, value_states

    def _start_step(self) -> None:
        for rid, past, _ in self._rows:
            held = self.gear_pool.tokens(rid)
            if held != past:
                raise RuntimeError(f"gear paged cache: request {rid} holds {held} tokens where transformers "
                                   f"resumes it at {past}")
        self.step_rows = [(rid, T) for rid, _, T in self._rows]
        self.table = block_table(self.gear_pool, self.step_rows, device=self.gear_pool.tail.device)
        self.step = self.gear_pool.plan(self.step_rows)
        self._new_batch = True


def _final_len(state) -> int:
    """The most tokens a request's cache will hold: its prompt and every new
    token but the last (which is never fed back)."""
    if state.max_new_tokens is None:
        return 0
    return len(state.initial_tokens) + max(0, state.max_new_tokens - 1)


class GearBatchingManager(continuous_api.ContinuousBatchingManager):
    """transformers' manager with a `GearPagedCache` and the "gear_paged"
    attention. `pool` is the `PagedPool`, allocated here."""

    def __init__(self, model, generation_config, continuous_batching_config, workload_hints=None, *,
                 settings: dict):
        # transformers' CPU offloading would copy its own (empty, "meta") blocks: preemption soft-resets
        cb = dataclasses.replace(continuous_batching_config, allow_block_sharing=False, max_blocks_per_request=0,
                                 use_async_batching=False, use_cuda_graph=False, cpu_offload_space=0.0)
        self.settings = settings
        text = model.config.get_text_config()
        self.kernel = _kernel(settings["kernel"], model.device)
        self.pool = PagedPool(settings["config"].codec, text.num_hidden_layers, hf_compat.num_kv_heads(text),
                              hf_compat.head_dim(text), model.dtype, settings["kv_budget_bytes"],
                              settings["page_tokens"], settings["max_requests"], model.device,
                              settings["typical_tokens"])
        model._gear_paged_pool = self.pool
        super().__init__(model, generation_config, cb, workload_hints)
        log.info(self.describe())

    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
        if model.config._attn_implementation != ATTENTION:
            self._original_attn_impl = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION)

    def add_request(self, input_ids, request_id=None, max_new_tokens=None, *args, **kwargs):
        new = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        need = len(input_ids) + max(0, (new or 0) - 1)
        if not self.pool.fits_alone(need):
            raise ValueError(f"gear paged pool: a request of {len(input_ids)} prompt + {new} new tokens needs "
                             f"{need // self.pool.page_tokens} pages of {self.pool.page_tokens} tokens; the pool "
                             f"holds {self.pool.n_pages} ({self.settings['kv_budget_bytes']} bytes). Raise "
                             f"kv_budget_bytes or shorten the request.")
        return super().add_request(input_ids, request_id, max_new_tokens, *args, **kwargs)

    def _create_batch_processor(self):
        # transformers builds its cache by name in this module: ours, for this call only
        original = continuous_api.PagedAttentionCache
        continuous_api.PagedAttentionCache = lambda *a, **k: GearPagedCache(
            *a, **k, gear_pool=self.pool, kernel=self.kernel, admission=self.settings["admission"])
        try:
            processor = super()._create_batch_processor()
        finally:
            continuous_api.PagedAttentionCache = original
        processor.cache.gear_scheduler = processor.scheduler     # preemption asks the pool (count_storable_requests)
        return processor

    def describe(self) -> str:
        p = self.pool
        return (f"gear paged pool: {self.settings['config'].describe()}; pages of {p.page_tokens} tokens "
                f"({p.page_bytes} B each, {p.n_pages} pages), {p.max_requests} exact tails of "
                f"{p.tail_bytes} B, {p.nbytes()} B in all; admission {self.settings['admission']}; "
                f"attention '{ATTENTION}' "
                f"(paged_attention.attend, kernel {self.kernel}); prefix sharing, decode fast path, CUDA graphs "
                f"and async batching off")


def _kernel(kernel: str, device) -> str:
    """The attention kernel for `device`: "auto" picks the C++ kernel on the
    CPU where it builds, the Triton paged kernel (kernels/paged_decode.py) on
    CUDA, else the torch reference; "cpu" and "triton" insist on theirs."""
    import os

    from .kernels import cpu
    kind = torch.device(device).type
    if kernel == "auto":
        if kind == "cpu":
            return "cpu" if cpu.available() else "torch"
        return "triton" if kind == "cuda" else "torch"
    if kernel not in ("cpu", "torch", "triton"):
        raise ValueError(f"gear paged pool: kernel must be auto, cpu, triton or torch, got {kernel!r}")
    if kernel == "cpu" and kind != "cpu":
        raise ValueError("gear paged pool: the C++ paged kernel reads host memory; the model is on " + str(device))
    if kernel == "triton" and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("gear paged pool: the Triton paged kernel runs on CUDA (or under TRITON_INTERPRET=1); "
                         "the model is on " + str(device))
    return kernel


def enable(model, kv_budget_bytes: int, page_tokens: int | None = None, max_requests: int | None = None,
           typical_tokens: int | None = None, kernel: str = "auto", admission: str = "grow", **options):
    """Serve `model` with compressed paged KV: `model.generate_batch(...)` and
    the manager API then keep K/V in a `PagedPool` of `kv_budget_bytes`
    (pages of `page_tokens`, default the smallest whole number of codec
    blocks >= 64; `max_requests` exact tails, or as many as requests of
    `typical_tokens` fill the budget with, by default a quarter of it).
    kernel: attention's ("auto": the C++ paged kernel on the CPU where it
    builds, the Triton paged kernel on CUDA, else the torch reference;
    "cpu"; "triton"; "torch").
    admission: "grow" (a request takes pages as it needs them; one that
    cannot grow is preempted and prefilled anew, as transformers' dense
    cache does) or "reserve" (its prompt and every new token reserved at
    admission: no preemption, fewer requests at once).
    options: `GearConfig`'s (method, bits, ...). Returns the model.
    Needs transformers 5.19 or newer (`hf_compat.serving_unsupported`)."""
    unsupported = hf_compat.serving_unsupported()
    if unsupported:
        raise RuntimeError(unsupported)
    if admission not in ("grow", "reserve"):
        raise ValueError(f"gear paged pool: admission must be 'grow' or 'reserve', got {admission!r}")
    config = GearConfig.from_options(options)
    text = model.config.get_text_config()
    if "sliding_attention" in cb_cache.group_layers_by_attn_type(text):
        raise ValueError("gear paged pool: sliding-window layers are not supported under continuous batching")
    settings = dict(config=config, kv_budget_bytes=int(kv_budget_bytes), page_tokens=page_tokens,
                    max_requests=max_requests, typical_tokens=typical_tokens, kernel=kernel,
                    admission=admission)
    original = type(model).init_continuous_batching

    def init_continuous_batching(generation_config=None, continuous_batching_config=None, workload_hints=None):
        cached = getattr(model, "_cached_continuous_batching_manager", None)
        if isinstance(cached, GearBatchingManager):
            return original(model, generation_config, continuous_batching_config, workload_hints)
        gen = generation_config if generation_config is not None else model.generation_config
        if gen.eos_token_id is None:
            gen.eos_token_id = -1
        cb = continuous_batching_config or ContinuousBatchingConfig()
        return GearBatchingManager(model, gen, cb, workload_hints, settings=settings)

    model.init_continuous_batching = init_continuous_batching
    return model
