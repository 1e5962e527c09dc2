"""transformers' continuous batching over the compressed paged pool
(`serving.enable`), against transformers' own continuous batching and
against generate() with the same method, on a tiny random Llama."""
import inspect

import pytest
import torch
import transformers as tf
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import cache as cb_cache
from transformers.generation.continuous_batching import continuous_api

from gear_compile import hf_compat, serving

# transformers 5.17-5.18's continuous batching lacks the hooks serving overrides (tests/test_hf_compat.py)
pytestmark = pytest.mark.skipif(hf_compat.serving_unsupported() is not None,
                                reason=str(hf_compat.serving_unsupported()))

NEW = 40


def tiny_llama(peaked=1.0):
    config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            max_position_embeddings=1024)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(peaked)    # sharper logits: fewer near-ties for lossy methods to flip
    return model


def prompts(lengths=(40, 170, 9, 100, 64, 3)):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 256, (n,), generator=gen).tolist() for n in lengths]


def greedy(**kw):
    return GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0, **kw)


def cb_config(safety_margin=None):
    # 48-token batches: prompts longer than that are prefilled in chunks, beside decode rows;
    # safety_margin 0: transformers admits prompts until the pages run out (it keeps 15 % by default)
    cb = ContinuousBatchingConfig(page_size=16, max_batch_tokens=48, num_blocks=128)
    if safety_margin is not None:
        cb.safety_margin = safety_margin
    return cb


def tokens(out):
    return {k: list(v.generated_tokens) for k, v in out.items()}


def collect(manager, n, each=lambda: None):
    """The generated tokens of n requests by id, each back whole and without
    an error (`each` runs after every result)."""
    got = {}
    while len(got) < n:
        out = manager.get_result(timeout=60)
        assert out is not None, f"lost: {n - len(got)} requests never came back"
        assert out.error is None, out.error
        got[out.request_id] = list(out.generated_tokens)
        each()
    return got


def test_transformers_hooks_are_what_serving_overrides():
    """The hooks `serving` relies on, as transformers 5.19-5.25 name them."""
    update = inspect.signature(cb_cache.PagedAttentionCache.update).parameters
    assert list(update) == ["self", "key_states", "value_states", "layer_idx", "kwargs"]
    for name in ("can_store_request_tokens", "extend_read_and_write_indices", "free_blocks",
                 "free_all_requests", "prepare_fork_request", "compute_free_capacity", "count_storable_requests"):
        assert hasattr(cb_cache.PagedAttentionCache, name), name
    assert hf_compat.serving_unsupported() is None
    assert continuous_api.PagedAttentionCache is cb_cache.PagedAttentionCache
    assert hasattr(continuous_api.ContinuousBatchingManager, "_create_batch_processor")
    assert getattr(cb_cache.PagedAttentionCache.update, "_torchdynamo_disable", False), \
        "update is traceable now: the compiler route (match its index_copy / index_select) may serve better"


def test_method_none_is_transformers_continuous_batching_token_for_token():
    model = tiny_llama()
    inputs = prompts()
    want = tokens(model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config()))
    serving.enable(model, kv_budget_bytes=2_000_000, method="none")
    got = tokens(model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config()))
    assert got == want and all(len(v) == NEW for v in got.values())
    assert model._gear_paged_pool.whole(), "pages not all returned after the run"
    assert model.config._attn_implementation == "sdpa"      # restored when the manager stops


def test_queued_when_full_never_corrupted_and_refused_when_too_big():
    """A pool of two tails: six requests run two at a time, exact; a request
    larger than the whole pool is refused with a message."""
    model = tiny_llama()
    inputs = prompts()
    want = tokens(model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config()))
    serving.enable(model, kv_budget_bytes=400_000, max_requests=2, method="none")
    got = tokens(model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config()))
    assert got == want
    pool = model._gear_paged_pool
    assert pool.whole()
    too_long = [[1] * (pool.n_pages + 1) * pool.page_tokens]
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match="Raise kv_budget_bytes"):
        manager.add_request(too_long[0], max_new_tokens=NEW)
    assert f"{pool.n_pages} pages" in manager.describe() and "prefix sharing" in manager.describe()


def _admissions(monkeypatch):
    """Spy on the pool: per run (the key `run[0]`), each request id as it
    takes a tail slot, and the most requests the pool held at once."""
    run, taken, most = [None], {}, {}
    reserve = serving.PagedPool.reserve

    def spy(self, rid, total, dry_run=False):
        new = rid not in self.requests
        ok = reserve(self, rid, total, dry_run)
        if ok and new and not dry_run:
            taken.setdefault(run[0], []).append(rid)
            most[run[0]] = max(most.get(run[0], 0), len(self.requests))
        return ok

    monkeypatch.setattr(serving.PagedPool, "reserve", spy)
    return run, taken, most


def preemptions(ids: list) -> int:
    """Preemptions among a run's admissions (`_admissions`' ids): a preempted
    request takes a tail slot again when it is prefilled anew."""
    return len(ids) - len(set(ids))


def test_growing_requests_are_preempted_and_prefilled_anew_exactly(monkeypatch):
    """admission "grow" in a pool of 10 pages of 40 tokens that the eight
    requests' whole lengths overfill (18 pages): it admits more requests at once than
    "reserve", and those that cannot grow are preempted (their pages freed,
    prefilled anew later) with outputs still transformers' own, token for
    token; the pool is whole after either run."""
    model = tiny_llama(peaked=4.0)
    inputs = prompts((40, 170, 9, 100, 64, 3, 120, 80))
    want = tokens(model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config()))
    run, taken, most = _admissions(monkeypatch)
    for admission in ("reserve", "grow"):
        run[0] = admission
        serving.enable(model, kv_budget_bytes=(8 + 10) * 40 * 1024, page_tokens=40, max_requests=8,
                       method="none", admission=admission)     # a 40-token tail or page: 40 KiB
        got = tokens(model.generate_batch(inputs, generation_config=greedy(),
                                          continuous_batching_config=cb_config()))
        pool = model._gear_paged_pool
        assert (pool.n_pages, pool.page_tokens) == (10, 40)
        assert got == want, admission
        assert pool.whole(), admission
    preempted = {a: preemptions(ids) for a, ids in taken.items()}
    assert preempted["reserve"] == 0 and preempted["grow"] > 0, taken
    assert most["grow"] > most["reserve"], most


def test_admission_names_its_choices():
    with pytest.raises(ValueError, match="'grow' or 'reserve', got 'lazy'"):
        serving.enable(tiny_llama(), kv_budget_bytes=1 << 20, admission="lazy")


def test_requests_join_mid_run_and_stream():
    """Manager API: a second wave added after the first has produced tokens,
    one request streamed token by token; all equal transformers' outputs."""
    model = tiny_llama()
    inputs = prompts()
    want = list(tokens(model.generate_batch(inputs, generation_config=greedy(),
                                            continuous_batching_config=cb_config())).values())
    serving.enable(model, kv_budget_bytes=2_000_000, method="none")
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    manager.start()
    try:
        first = [manager.add_request(x, request_id=f"a{i}", max_new_tokens=NEW) for i, x in enumerate(inputs[:3])]
        seen = manager.get_result(timeout=60)               # the first wave is running
        assert seen is not None
        streamed = manager.add_request(inputs[3], request_id="s", max_new_tokens=NEW, streaming=True)
        late = [manager.add_request(x, request_id=f"b{i}", max_new_tokens=NEW) for i, x in enumerate(inputs[4:])]
        chunks = []
        for out in manager.request_id_iter(streamed):
            chunks.append(len(out.generated_tokens))
            if out.is_finished():
                stream_tokens = list(out.generated_tokens)
                break
        results = {seen.request_id: seen}
        while len(results) < len(first) + len(late):
            out = manager.get_result(timeout=60)
            assert out is not None, "a request was lost"
            results[out.request_id] = out
    finally:
        manager.stop(block=True, timeout=30)
    assert len(chunks) > 1 and chunks == sorted(chunks)     # tokens arrived as they were made
    assert stream_tokens == want[3]
    assert [list(results[r].generated_tokens) for r in first + late] == want[:3] + want[4:]
    assert model._gear_paged_pool.whole()


def test_num_return_sequences_forks_share_pages(monkeypatch):
    """Children forked from their parent after its prefill share its
    compressed pages; with top_k=1 every child continues as the parent."""
    model = tiny_llama()
    inputs = prompts((100, 20))
    cfg = GenerationConfig(max_new_tokens=NEW, do_sample=True, top_k=1, num_return_sequences=3, eos_token_id=-1,
                           pad_token_id=0)
    serving.enable(model, kv_budget_bytes=2_000_000, method="gear", bits=8)
    forks = []
    fork = serving.PagedPool.fork
    monkeypatch.setattr(serving.PagedPool, "fork", lambda self, s, d: forks.append((s, len(self.pages(s))))
                        or fork(self, s, d))
    got = tokens(model.generate_batch(inputs, generation_config=cfg, continuous_batching_config=cb_config()))
    assert len(got) == 6 and all(len(v) == NEW for v in got.values())
    assert sorted(forks) == [("req_0", 1), ("req_0", 1), ("req_1", 0), ("req_1", 0)]   # 100 tokens: an 80-token page
    for rid in ("req_0", "req_1"):
        assert got[f"{rid}__child#0"] == got[f"{rid}__child#1"] == got[rid]
    assert model._gear_paged_pool.whole()


@pytest.mark.parametrize("method,bits", [("gear", 4), pytest.param("kivi", 2, marks=pytest.mark.slow)])
def test_lossy_quality_per_request_close_to_generate_with_the_same_method(method, bits):
    """Each request's greedy tokens agree with the dense ones about as long
    as generate() with the same method agrees with dense generate()."""
    import gear_compile
    model = tiny_llama(peaked=4.0)
    inputs = prompts((120, 200, 80))
    dense = [model.generate(torch.tensor([x]), generation_config=greedy())[0, len(x):].tolist() for x in inputs]
    compiled = gear_compile.compile(tiny_llama(peaked=4.0), method=method, bits=bits, inductor=False)
    ref = [compiled.generate(torch.tensor([x]), generation_config=greedy())[0, len(x):].tolist() for x in inputs]
    serving.enable(model, kv_budget_bytes=2_000_000, method=method, bits=bits)
    got = list(tokens(model.generate_batch(inputs, generation_config=greedy(),
                                           continuous_batching_config=cb_config())).values())

    def agree(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    for d, r, g in zip(dense, ref, got):
        assert agree(d, g) >= min(agree(d, r), NEW) - 8, (method, agree(d, g), agree(d, r))
    assert sum(agree(d, g) for d, g in zip(dense, got)) >= 0.75 * sum(agree(d, r) for d, r in zip(dense, ref))


# the pools of the random-arrival runs: six tails in 1 MB (its tails bind; 80-token pages), or twelve
# tails of 20 tokens and 16 pages of 20, a 20 KiB page or tail (its pages bind: requests are preempted)
POOLS = {"slots": dict(kv_budget_bytes=1_000_000, max_requests=6),
         "pages": dict(kv_budget_bytes=(12 + 16) * 20 * 1024, max_requests=12, page_tokens=20)}


@pytest.mark.parametrize("bound", ["slots", "pages"])
@pytest.mark.parametrize("n", [40, pytest.param(500, marks=pytest.mark.slow)])
def test_random_arrivals_lose_and_corrupt_nothing(n, bound, monkeypatch):
    """n requests of random lengths arriving at random moments into a pool
    that holds a few at a time (method none): every one comes back, equal to
    transformers' own continuous batching of the same prompts, and the pool
    is whole at the end. Where the pages bind, some requests are preempted
    (taken back in) on the way."""
    import random
    import threading
    import time
    rng = random.Random(n)
    model = tiny_llama(peaked=4.0)
    inputs = [[rng.randrange(1, 256) for _ in range(rng.randrange(1, 120))] for _ in range(n)]
    new = [rng.randrange(1, 24) for _ in range(n)]
    cb = cb_config(safety_margin=0.0 if bound == "pages" else None)
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb)
    manager.start()
    try:
        ids = [manager.add_request(x, request_id=f"d{i}", max_new_tokens=m) for i, (x, m) in
               enumerate(zip(inputs, new))]
        want = {}
        while len(want) < n:
            out = manager.get_result(timeout=60)
            assert out is not None, "transformers' own run lost a request"
            want[out.request_id] = list(out.generated_tokens)
    finally:
        manager.stop(block=True, timeout=30)
    _, taken, _ = _admissions(monkeypatch)
    serving.enable(model, method="none", **POOLS[bound])
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb)
    manager.start()

    def arrive():
        for i, (x, m) in enumerate(zip(inputs, new)):
            time.sleep(rng.random() * 0.01)
            manager.add_request(x, request_id=f"g{i}", max_new_tokens=m)

    feeder = threading.Thread(target=arrive)
    feeder.start()
    try:
        got = collect(manager, n)
    finally:
        feeder.join()
        manager.stop(block=True, timeout=30)
    assert [got[f"g{i}"] for i in range(n)] == [want[d] for d in ids]
    assert model._gear_paged_pool.whole()
    preempted = preemptions(taken[None])
    print(f"\n{n} requests, {bound} bound: {preempted} preempted")
    assert (preempted > 0) == (bound == "pages"), preempted


# GEAR-4's pools (64-token pages of 12,416 B, tails of 34,816 B with the sinks): tails bind, or pages
LOSSY_POOLS = {"slots": dict(kv_budget_bytes=1_000_000, max_requests=6),
               "pages": dict(kv_budget_bytes=12 * 34_816 + 4 * 12_416, max_requests=12)}


@pytest.mark.parametrize("bound", ["slots", "pages"])
@pytest.mark.parametrize("n", [24, pytest.param(500, marks=pytest.mark.slow)])
def test_random_arrivals_lossy_pool_loses_and_corrupts_nothing(n, bound, monkeypatch):
    """GEAR-4 with its sinks, compressed pages and the C++ paged kernel (on
    the CPU): n requests arriving at random moments into a pool that holds a
    few at a time, then the same requests one at a time, each alone in the
    pool. Every request comes back with all its tokens and no error, the
    pool is whole after each run, and each request's tokens in the crowd are
    those it gets alone: a page, tail or sink read from another request, or
    stale in a reused slot, changes them. Equality is asked of all but n / 8:
    alone, a long prompt is prefilled in other chunks than in the crowd, so a
    query may see a key exact (its own chunk) that it sees compressed in the
    other run, a lossy method's legitimate difference (1 of 24 here; a
    kernel reading one row's tail slot for another's: 12 of 24). Where the
    pages bind, requests are preempted in the crowd (their compressed pages
    freed and reused, their prompts and tokens prefilled anew): the same
    holds. The outputs stay close to dense ones."""
    import random
    import threading
    import time
    rng = random.Random(n + 1)
    model = tiny_llama(peaked=4.0)
    inputs = [[rng.randrange(1, 256) for _ in range(rng.randrange(1, 120))] for _ in range(n)]
    new = [rng.randrange(1, 24) for _ in range(n)]

    cb = cb_config(safety_margin=0.0 if bound == "pages" else None)

    def run(pause, alone=False):
        manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb)
        manager.start()
        done = threading.Semaphore(0)

        def arrive():
            for i, (x, m) in enumerate(zip(inputs, new)):
                time.sleep(rng.random() * pause)
                manager.add_request(x, request_id=f"g{i}", max_new_tokens=m)
                if alone:
                    done.acquire(timeout=60)

        feeder = threading.Thread(target=arrive)
        feeder.start()
        try:
            got = collect(manager, n, each=done.release)
        finally:
            feeder.join()
            manager.stop(block=True, timeout=30)
        return [got[f"g{i}"] for i in range(n)]

    dense = run(0.0)
    serving.enable(model, method="gear", bits=4, **LOSSY_POOLS[bound])
    pool_of = lambda: model._gear_paged_pool         # noqa: E731 (each manager allocates its own)
    _, taken, _ = _admissions(monkeypatch)
    random_arrivals = run(0.01)
    assert pool_of().whole() and pool_of().sink_tokens > 0
    assert (pool_of().page_bytes, pool_of().tail_bytes) == (12_416, 34_816)
    preempted = preemptions(taken[None])
    assert (preempted > 0) == (bound == "pages"), preempted
    alone = run(0.0, alone=True)
    assert pool_of().whole()
    assert [len(x) for x in random_arrivals] == [len(x) for x in alone] == new
    differ = sum(x != y for x, y in zip(random_arrivals, alone))

    def agree(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a)

    agreement = sum(agree(d, g) for d, g in zip(dense, random_arrivals)) / n
    print(f"\n{n} requests, {bound} bound, {preempted} preempted: {differ} differ between the crowd and alone; "
          f"mean share of each request's "
          f"tokens before its first difference from dense {agreement:.3f}")
    assert differ <= n // 8
    assert agreement >= 0.8


def test_each_layer_is_written_right_after_its_attention(monkeypatch):
    """A step's K/V go into the pool one layer at a time, each right after
    that layer's attention, with that layer's own tokens: no step holds
    every layer's K/V at once (the peak-memory fix of issue 31)."""
    model = tiny_llama()
    serving.enable(model, kv_budget_bytes=2_000_000, method="gear", bits=4)
    events = []
    attend, write = serving.attend, serving.PagedPool.write
    monkeypatch.setattr(serving, "attend", lambda pool, layer, table, q, k, *a: events.append(
        ("attend", layer, k.shape[2])) or attend(pool, layer, table, q, k, *a))
    monkeypatch.setattr(serving.PagedPool, "write", lambda self, step, layer, k, v: events.append(
        ("write", layer, k.shape[1])) or write(self, step, layer, k, v))
    got = tokens(model.generate_batch(prompts((100, 20)), generation_config=greedy(),
                                      continuous_batching_config=cb_config()))
    assert all(len(v) == NEW for v in got.values())
    layers = model.config.num_hidden_layers
    assert len(events) % (2 * layers) == 0 and events
    for at in range(0, len(events), 2):
        (a, la, ta), (w, lw, tw) = events[at], events[at + 1]
        assert (a, w) == ("attend", "write") and la == lw == at // 2 % layers and ta == tw
    assert model._gear_paged_pool.whole()
