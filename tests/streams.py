"""Helpers shared by the store and cache-tensor tests: build a store the way
the backend does, and read back the decode blocks flushed so far."""
import itertools

from gear_compile.store import KVStore


def streamed(x, config, kind, prefill, chunk=1, grow=True, **from_prefill):
    """A store built from x[:, :, :prefill], the rest appended `chunk` tokens at a
    time (an int, or an iterable of chunk sizes for uneven chunks), growing the
    capacity first when `grow`, as the backend does (without it, a flush that
    finds the capacity full grows it). `from_prefill`: KVStore.from_prefill's
    options (check_finite, streamed)."""
    store = KVStore.from_prefill(x[:, :, :prefill], config, kind, **from_prefill)
    sizes = itertools.repeat(chunk) if isinstance(chunk, int) else iter(chunk)
    t = prefill
    while t < x.shape[2]:
        new = x[:, :, t:t + next(sizes)]
        if grow:
            store.grow(new.shape[2] + store.config.block_size)
        store.append(new)
        t += new.shape[2]
    return store


def filled_decode_parts(store):
    """Clones of the decode parts over the blocks filled so far."""
    n_dec, blk = store.counts()[1], store.d_layout.block
    out = {}
    for name, t in store.decode.parts().items():
        rows = t.shape[2] * n_dec // store.capacity        # every part is proportional to capacity
        out[name] = t[:, :, :rows].clone()
    assert n_dec % blk == 0
    return out
