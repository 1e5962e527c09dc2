"""Helpers shared by the model-level tests: the tiny models' prompt, greedy
`generate`, a prefill followed by one call per token, the way decoding feeds
a cache, and several-token calls with a crop after each, checked against
eager."""
import torch
from transformers import DynamicCache

from gear_compile.hf_compat import cache_kwarg

PROMPT = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1))


def greedy(model, ids, steps, **kwargs):
    """`model.generate` greedily for exactly `steps` new tokens (no EOS stop),
    without autograd; returns the generate output (`.sequences`, the cache,
    and `.logits` where `output_logits=True` is passed)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              return_dict_in_generate=True, **kwargs)


def decode_logits(model, steps=0, ids=PROMPT, *, tokens=None, cache=None):
    """Prefill `ids`, then one call per token: the greedy token `steps` times,
    or each column of `tokens` [B, n] (teacher forcing). Returns the last
    position's logits of every call, stacked [B, 1 + n, vocab], and the cache
    (a fresh DynamicCache unless one is given)."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    n = steps if tokens is None else tokens.shape[1]
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True)
        logits.append(out.logits[:, -1])
        for i in range(n):
            # a fresh [B, 1] tensor, as the greedy token is: a column view keeps the row stride
            # of `tokens`, on which Dynamo fails under tensor parallelism (DTensor embedding)
            nxt = (out.logits[:, -1:].argmax(-1) if tokens is None
                   else tokens[:, i:i + 1].clone(memory_format=torch.contiguous_format))
            out = model(input_ids=nxt, **cache_kwarg(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


def chunks_and_crops_match(model, reference, ids, bounds=(11, 15, 19), crop=2):
    """Feed ids[:, a:b] for consecutive bounds to `model` and to `reference`,
    each with its own cache, cropping `crop` tokens after every call (a
    speculative decoder's rollback); every call's logits must match. Returns
    the model's cache."""
    caches = DynamicCache(config=model.config), DynamicCache(config=reference.config)
    with torch.no_grad():
        for a, b in zip((0,) + tuple(bounds), bounds):
            outs = [m(input_ids=ids[:, a:b], **cache_kwarg(m, c), use_cache=True).logits
                    for m, c in zip((model, reference), caches)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
            for c in caches:
                c.crop(-crop)
    return caches[0]
