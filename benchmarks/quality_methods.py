"""KV-cache methods of the quality benchmark, behind one interface.

A `Method` prepares the model (`setup`), hands out a fresh cache (`new_cache`),
undoes its setup (`teardown`) and measures the bytes its cache holds
(`cache_bytes`). Kinds:

  dense     DynamicCache: the reference.
  compiled  our backend: `gear_compile.compile(model, **options)`, then a plain
            DynamicCache that the compiled forward fills with CompressedKV.
  sim       the same codec without the backend (eager): a cache layer that keeps
            a `gear_compile.store.KVStore` per K/V (prefill block
            compressed, its first sink_tokens exact, n_b-token streaming
            buffer, blocks compressed at each flush) and hands attention the
            store's reconstruction followed by the step's own exact K/V (the
            block that a step fills is compressed after its attention). The
            prompt's own forward attends to its exact K/V: checked against the
            compiled path (see quality.py --check-sim). Used for the long runs
            because it is ~10x faster here.
  peer      transformers' QuantizedCache (optimum-quanto backend).

The sim rotates K / V heads where the options say so (`rotate`, the
package's `rotation`), before the store and back after it, as the compiled
graph does around attention. `SimVariant` changes what the sim's codec sees
for a study the package does not ship: a relative dither of 1e-3 on K/V
(seeded), which moves values across quantization boundaries and so measures
how much perplexity moves between equally good codecs (the noise floor of a
comparison).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

import gear_compile
from gear_compile.store import KVStore
from gear_compile.config import GearConfig
from gear_compile.rotation import rotation
from gear_compile.segment import decompress as seg_decompress

# (label, options); options None = dense, {"peer": bits} = QuantizedCache
METHODS = [
    ("dense", None),
    ("KCVT-4", dict(method="kcvt", bits=4)),
    ("KIVI-4", dict(method="kivi", bits=4)),
    ("GEAR-L(KCVT-4)", dict(method="gear_l", bits=4, backbone="kcvt")),
    ("GEAR(KCVT-4)", dict(method="gear", bits=4, backbone="kcvt")),
    ("GEAR-L(KIVI-4)", dict(method="gear_l", bits=4, backbone="kivi")),
    ("GEAR(KIVI-4)", dict(method="gear", bits=4, backbone="kivi")),
    ("per-token-2 g64", dict(method="per_token", bits=2, group_size=64)),
    ("KIVI-2", dict(method="kivi", bits=2)),
    ("GEAR-L(KIVI-2)", dict(method="gear_l", bits=2)),
    ("GEAR(KIVI-2)", dict(method="gear", bits=2)),
    ("KCVT-4 rotated", dict(method="kcvt", bits=4, rotate="kv")),
    ("KIVI-2 rotated", dict(method="kivi", bits=2, rotate="kv")),
    ("GEAR(KIVI-2) rotated", dict(method="gear", bits=2, rotate="kv")),
    ("QuantizedCache-quanto-4", {"peer": 4}),
    ("QuantizedCache-quanto-2", {"peer": 2}),
]


def tensor_bytes(t) -> int:
    """Bytes of a tensor, recursing into wrapper subclasses (quanto QTensors)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(tensor_bytes(x) for x in t)
    if isinstance(t, dict):
        return sum(tensor_bytes(x) for x in t.values() if isinstance(x, torch.Tensor))
    return 0


# ---------------------------------------------------------------- sim path
@dataclass(frozen=True)
class SimVariant:
    """dither: a seed (0: none)."""

    dither: int = 0

    def describe(self) -> str:
        return f", dither seed {self.dither}" if self.dither else ""


class GearSimLayer(DynamicLayer):
    """Eager GEAR cache layer built on the package's own KVStore."""

    def __init__(self, config: GearConfig, variant: SimVariant = SimVariant(), index: int = 0):
        super().__init__()
        self.config, self.variant, self.index = config, variant, index
        self.stores = None
        self.rec = None          # per K/V: (n_dec reconstructed, prefill+decode reconstruction)
        self.length = 0
        self.calls = 0

    def update(self, key_states, value_states, *args, **kwargs):
        v, cfg = self.variant, self.config
        if not (cfg.rotate != "none" or v.dither):
            return self._update(key_states, value_states)
        self.calls += 1
        noise = torch.Generator().manual_seed(v.dither * 1000003 + self.calls * 7919 + self.index)
        D, dtype, device = key_states.shape[-1], key_states.dtype, key_states.device
        seen = []
        for kind, x in (("k", key_states), ("v", value_states)):
            if v.dither:
                x = x * (1 + 1e-3 * torch.randn(x.shape, generator=noise, dtype=x.dtype))
            seen.append(x @ rotation(D, dtype, device) if cfg.rotates(kind) else x)
        out = self._update(*seen)
        back = rotation(D, dtype, device, inverse=True)
        return tuple(o @ back if cfg.rotates(kind) else o for kind, o in zip("kv", out))

    def _update(self, key_states, value_states):
        if self.stores is None:
            self.lazy_initialization(key_states, value_states)
            self.stores = [KVStore.from_prefill(key_states, self.config, "k"),
                           KVStore.from_prefill(value_states, self.config, "v")]
            self.rec = [None, None]
            self.length = key_states.shape[2]
            self._refresh()
            return key_states, value_states   # the prompt attends to its exact K/V
        # attention sees the store as it was before this call, then the new
        # tokens exactly; the append (and any flush it triggers) follows, as in
        # the compiled decode step
        out = []
        for i, new in enumerate((key_states, value_states)):
            n_buf = self.stores[i].counts()[2]
            held = self.stores[i].buffer[:, :, :n_buf].to(new.dtype)
            out.append(torch.cat([self.rec[i][1], held, new], dim=2))
            self.stores[i].append(new)
        self.length += key_states.shape[2]
        self._refresh()
        return out[0], out[1]

    def _refresh(self):
        for i, st in enumerate(self.stores):
            _, n_dec, _ = st.counts()
            if self.rec[i] is not None and self.rec[i][0] == n_dec:
                continue
            if self.rec[i] is None:
                self.pre = getattr(self, "pre", [None, None])
                self.pre[i] = st.decompress_prefill(st.dtype)
            dec = seg_decompress(st.decode, st.d_layout, n_dec, st.dtype)
            self.rec[i] = (n_dec, torch.cat([self.pre[i], dec], dim=2))

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stores) if self.stores else 0


class GearSimCache(Cache):
    def __init__(self, model_config, gear_config: GearConfig, variant: SimVariant = SimVariant()):
        n = model_config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[GearSimLayer(gear_config, variant, i) for i in range(n)])


# ---------------------------------------------------------------- methods
class Method:
    def __init__(self, label: str, options, path: str = "sim", variant: SimVariant = SimVariant()):
        self.label, self.options, self.variant = label, options, variant
        if options is None:
            self.kind = "dense"
        elif "peer" in options:
            self.kind = "peer"
        else:
            self.kind = path
            self.config = GearConfig.from_options(options, inductor=False) if path == "compiled" \
                else GearConfig.from_options(options)

    @property
    def bits(self):
        if self.options is None:
            return 16
        return self.options.get("peer") or self.options["bits"]

    def describe(self) -> str:
        if self.kind == "dense":
            return "DynamicCache"
        if self.kind == "peer":
            return (f"QuantizedCache(backend='quanto', nbits={self.bits}, q_group_size=64, "
                    f"residual_length=128, axis 0)")
        return self.config.describe() + self.variant.describe()

    def setup(self, model):
        if self.kind == "compiled":
            torch._dynamo.reset()
            gear_compile.compile(model, **dict(self.options, inductor=False))

    def teardown(self, model):
        if self.kind == "compiled":
            model.__dict__.pop("forward", None)   # back to the class's eager forward
            torch._dynamo.reset()

    def new_cache(self, model):
        if self.kind in ("dense", "compiled"):
            return DynamicCache(config=model.config)
        if self.kind == "sim":
            return GearSimCache(model.config, self.config, self.variant)
        from transformers import QuantizedCache
        return QuantizedCache(backend="quanto", config=model.config, nbits=self.bits)

    def cache_bytes(self, cache) -> int:
        if self.kind == "sim":
            return sum(layer.nbytes() for layer in cache.layers)
        if self.kind == "peer":
            return sum(tensor_bytes(getattr(layer, n, None)) for layer in cache.layers
                       for n in ("_quantized_keys", "_quantized_values", "keys", "values"))
        return gear_compile.kv_bytes(cache)

    def cache_tokens(self, cache) -> int:
        return cache.get_seq_length()


def ensure_peer(install: bool = True) -> None:
    import importlib.util
    if importlib.util.find_spec("optimum") is not None and \
            importlib.util.find_spec("optimum.quanto") is not None:
        return
    import subprocess
    import sys
    if not install:
        raise RuntimeError("the QuantizedCache peer needs optimum-quanto: pip install optimum-quanto")
    print("quality: installing optimum-quanto (QuantizedCache peer)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "optimum-quanto"], check=True)
    importlib.invalidate_caches()
