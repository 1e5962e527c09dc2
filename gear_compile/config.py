"""Options of the gear backend: two frozen, validated objects.

`CodecConfig` holds the options of what a compressed store is: method, bits,
groups, ranks, outliers, block and buffer sizes. Stores, the custom ops and
the cache tensor carry it (as JSON). Two of its options default by head dim;
`codec.resolve(config, head_dim)` chooses them and gives the `Codec` every
layout derives from. `GearConfig` adds the options that only shape
compilation (`inductor`, `kernel`, `dump_graphs`, the `lorc_*` options);
`GearConfig.codec` drops them, so changing one of them never changes what a
graph's ops or guards see.
`GearConfig.from_options(dict)` is the only door from user options (the dict
that `torch.compile(..., options=...)` hands the backend) into the package.
Every other module reads the derived fields (`quantizer`, `block_size`, a
`Codec`'s specs, ...) and never re-interprets method names. The package's
docstring holds the glossary of names.
Neighbours: `codec` (the options resolved for a head dim), `backend` (parses
options), `explain` (lists them).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass

import torch

from .lorc import SCHEDULES as LORC_SCHEDULES, USER_BASES as LORC_BASES

METHODS = ("gear", "gear_l", "kcvt", "kivi", "per_token", "none")
BACKBONES = ("kcvt", "kivi", "per_token")
BITS = (2, 4, 8)
KERNELS = ("auto", "cpu", "triton", "torch")
ROTATIONS = ("none", "k", "v", "kv")


@dataclass(frozen=True)
class CodecConfig:
    """How a store compresses K/V, with the paper's defaults.

    method       gear (quant + low-rank + sparse), gear_l (quant + low-rank),
                 kcvt / kivi / per_token (a backbone alone), none (the rewrite
                 with exact storage: the test of the rewrite itself).
    backbone     quantizer under gear / gear_l; None: chosen by head dim
                 (`for_head_dim`): kivi at 2 bits, as in the paper; at 4 bits
                 kivi up to head dim 64 where its groups fit, else kcvt (the
                 paper's, whose models have head dim 128); kcvt at 8 bits.
    bits         2, 4 or 8.
    group_size   g of kivi (token groups for K, channel groups for V) and of
                 per_token (channel groups for K and V); None: chosen by head
                 dim (`for_head_dim`): 32 up to head dim 64, else 64 (the
                 paper's, whose models have head dim 128).
    outlier_ratio  s, the fraction of each vector kept out of its quantization
                 range as sparse outliers (s/2 largest and s/2 smallest, one
                 byte each: `outliers`); None: 0.02 for gear, else 0.
    rank_prefill, rank_decode  r_p and r_g of the low-rank residual.
    buffer_size  n_b, tokens kept exact before a block is compressed; None:
                 20 for kcvt, group_size for kivi / per_token.
    power_iters  iterations of the power method for the low-rank factors.
    decode_capacity  tokens of compressed decode storage reserved at prefill
                 (rounded up to whole blocks, at least two; grown by at least a
                 quarter when a flush finds it full). kv_bytes counts it.
    rotate       none, k, v or kv: store those heads rotated by a randomised
                 Hadamard transform (`rotation`), folded into q and the output
                 so attention is unchanged. It spreads a channel's outliers
                 over all channels, which helps the per-channel-grouped 2-bit
                 backbones most (benchmarks/results/quality_rotated.md).
    sink_tokens  the first tokens of each sequence also held exact, and kept
                 out of their quantization groups (attention sinks: the first
                 token draws much of every head's attention, and its K/V, far
                 from the rest, stretch the ranges of the groups it falls in).
                 They shadow their places in the prefill block, whose groups
                 stay where they were. 4 of them, 4 tokens of K/V a layer,
                 roughly halve every method's perplexity gap on SmolLM2
                 (benchmarks/results/quality_sinks.md against
                 quality_nosinks.md). 0: none (the paper's layout). No sinks
                 without a prefill block (a streamed, sliding-window store; a
                 kivi prompt shorter than a group).
    """

    method: str = "gear"
    backbone: str | None = None
    bits: int = 4
    group_size: int | None = None
    outlier_ratio: float | None = None
    rank_prefill: int = 4
    rank_decode: int = 2
    buffer_size: int | None = None
    power_iters: int = 3
    decode_capacity: int = 64
    rotate: str = "none"
    sink_tokens: int = 4

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("rotate", self.rotate, ROTATIONS)
        if self.backbone is not None:
            _check_choice("backbone", self.backbone, BACKBONES)
            if self.method not in ("gear", "gear_l"):
                raise ValueError(
                    f"gear options: backbone is only used by method gear or gear_l, "
                    f"got backbone={self.backbone!r} with method={self.method!r}.")
        _check_choice("bits", self.bits, BITS)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1)
        _check_int("rank_prefill", self.rank_prefill, 0)
        _check_int("rank_decode", self.rank_decode, 0)
        _check_int("power_iters", self.power_iters, 1)
        _check_int("decode_capacity", self.decode_capacity, 1)
        _check_int("sink_tokens", self.sink_tokens, 0)
        if self.buffer_size is not None:
            _check_int("buffer_size", self.buffer_size, 1)
        if self.outlier_ratio is not None and not (
                isinstance(self.outlier_ratio, (int, float)) and 0 <= self.outlier_ratio < 1):
            raise ValueError(f"gear options: outlier_ratio must be a number in [0, 1), "
                             f"got {self.outlier_ratio!r}.")
        if not self.backbone_unchosen and self.quantizer == "kivi" and self.group_size and \
                self.block_size % self.group_size:
            raise ValueError(
                f"gear options: with the kivi backbone buffer_size must be a multiple of "
                f"group_size={self.group_size} (K is grouped by tokens), got {self.block_size}.")

    # ---- construction -------------------------------------------------
    def to_json(self) -> str:
        """Compact JSON (non-default fields only): the form ops carry in graphs."""
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str) -> CodecConfig:
        """The config `to_json` wrote; cached, as ops parse theirs at every call."""
        return _from_json(cls, text)

    def for_head_dim(self, head_dim: int) -> CodecConfig:
        """These options for heads of `head_dim`: group_size and the backbone
        chosen where unset (an option the user sets is kept).

        group_size: 32 up to head dim 64, else 64. At head dim 64 the paper's
        g = 64 makes every V token a single group and spans 64 tokens of K per
        (scale, zero); g = 32 costs 1 more bit of scales per 32 values and
        buys a clearly lower perplexity at 2 bits (benchmarks/results/quality_g32.md).
        backbone at 4 bits: kivi up to head dim 64 where its groups fit (g
        divides the head dim and a buffer_size the user set), else kcvt. KCVT's one
        (scale, zero) per channel per block spans all of a block's tokens,
        which costs quality at small head dims (benchmarks/results/quality.md);
        at head dim 128 (the paper's models) its per-block scales amortise into
        fewer bytes (benchmarks/results/generate_throughput_cpu_kivi4.md)."""
        chosen = {}
        if self.group_size is None:
            chosen["group_size"] = 32 if head_dim <= 64 else 64
        if self.backbone is None and self.uses_low_rank:
            group = chosen.get("group_size", self.group_size)
            kivi_fits = head_dim <= 64 and head_dim % group == 0 and \
                (self.buffer_size is None or self.buffer_size % group == 0)
            chosen["backbone"] = "kivi" if self.bits == 2 or (self.bits == 4 and kivi_fits) else "kcvt"
        if not chosen:
            return self
        try:
            return dataclasses.replace(self, **chosen)
        except ValueError as err:
            said = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
            raise ValueError(f"{err} ({said}: the defaults for head dim {head_dim}; set them to "
                             f"choose others)") from None

    # ---- derived ------------------------------------------------------
    @property
    def group(self) -> int:
        """g, once chosen (`for_head_dim`)."""
        if self.group_size is None:
            raise RuntimeError("gear: group_size is chosen per head dim; "
                               "use for_head_dim(head_dim) first.")
        return self.group_size

    @property
    def compresses(self) -> bool:
        return self.method != "none"

    def rotates(self, kind: str) -> bool:
        """Whether the `kind` ("k" or "v") store holds rotated heads."""
        return self.rotate != "none" and kind in self.rotate

    @property
    def quantizer(self) -> str:
        """The backbone actually used: kcvt, kivi, per_token, or none (gear and
        gear_l at 4 bits: once chosen, `for_head_dim`)."""
        if self.method in BACKBONES or self.method == "none":
            return self.method
        if self.backbone is not None:
            return self.backbone
        if self.backbone_unchosen:
            raise RuntimeError("gear: the 4-bit backbone is chosen per head dim; "
                               "use for_head_dim(head_dim) first.")
        return "kcvt" if self.bits > 4 else "kivi"

    @property
    def backbone_unchosen(self) -> bool:
        """gear / gear_l at 4 bits before `for_head_dim` picks the backbone."""
        return self.uses_low_rank and self.backbone is None and self.bits == 4

    @property
    def uses_low_rank(self) -> bool:
        return self.method in ("gear", "gear_l")

    @property
    def outliers(self) -> float:
        if self.outlier_ratio is not None:
            return float(self.outlier_ratio) if self.method != "none" else 0.0
        return 0.02 if self.method == "gear" else 0.0

    @property
    def block_size(self) -> int:
        """n_b: decode tokens compressed together at each flush point."""
        if self.buffer_size is not None:
            return self.buffer_size
        return 20 if self.quantizer in ("kcvt", "none") else self.group

    def held_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a store holds exact values in (the streaming buffer) for
        K/V of `dtype`: fp32 K/V in fp16 when compressing, since the codec's
        scales and zeros are fp16, so a store's range is fp16's anyway, and an
        fp32 buffer doubles the bytes of up to n_b tokens (on SmolLM2 the
        perplexity moved less than the noise floor measured in
        benchmarks/results/quality_study.md); fp16 and bf16 as they are;
        method none stores exactly what it is given."""
        if dtype == torch.float32 and self.compresses:
            return torch.float16
        return dtype

    def sinks(self, prefill_block: int) -> int:
        """How many of a prefill block's first tokens a store also holds
        exact, as its sinks (`sink_tokens`; none for exact storage, or
        without a prefill block: a streamed store, or a prompt shorter than
        a token group)."""
        if not self.compresses:
            return 0
        # a user's own value only: the default's 4 sinks may well cover a short prompt
        if isinstance(prefill_block, int) and 0 < prefill_block <= self.sink_tokens \
                and self.sink_tokens > CodecConfig.sink_tokens:
            _warn_once(f"gear: sink_tokens={self.sink_tokens} covers the whole {prefill_block}-token "
                       f"prefill block, so none of the prompt is compressed (sinks are the first few "
                       f"tokens; the default is 4)")
        return min(self.sink_tokens, prefill_block)

    def describe(self) -> str:
        """The options in the paper's terms; sinks and rotation only where
        they are not the default."""
        suffix = f", {self.rotate.upper()} rotated" if self.rotate != "none" else ""
        if not self.compresses:
            return f"none (exact storage{suffix})"
        if self.sink_tokens != CodecConfig.sink_tokens:
            suffix = (f", {self.sink_tokens} sinks" if self.sink_tokens else ", no sinks") + suffix
        if self.backbone_unchosen:
            return self._describe_unchosen() + suffix
        parts = [f"{self.quantizer}-{self.bits}"]
        if self.uses_low_rank:
            parts.append(f"r={self.rank_prefill}/{self.rank_decode}")
        if self.outliers:
            parts.append(f"s={self.outliers:g}")
        grouped = self.quantizer in ("kivi", "per_token")
        if grouped:
            parts.append(f"g={self.group_size}" if self.group_size else "g by head dim")
        if self.group_size or self.buffer_size or not grouped:
            parts.append(f"n_b={self.block_size}")
        return f"{self.method}(" + ", ".join(parts) + ")" + suffix

    def _describe_unchosen(self) -> str:
        parts = ["4 bits, backbone by head dim", f"r={self.rank_prefill}/{self.rank_decode}"]
        if self.outliers:
            parts.append(f"s={self.outliers:g}")
        return f"{self.method}(" + ", ".join(parts) + ")"

    @property
    def rank_unit(self) -> int:
        """LoRC ranks are multiples of this: 8, or the channel group of a
        codec that groups channels (kivi's V, per_token's K and V: the
        latent is their head dim)."""
        return max(8, self.group) if self.quantizer in ("kivi", "per_token") else 8


COMPILE_OPTIONS = ("inductor", "kernel", "dump_graphs", "mla_absorb", "lorc", "lorc_schedule", "lorc_sinks",
                   "lorc_basis")


@dataclass(frozen=True)
class GearConfig(CodecConfig):
    """Every option of the backend: the codec's (`CodecConfig`) and these,
    which shape compilation only.

    inductor     lower through Inductor (True) or run the rewritten graph with
                 AOT autograd but no codegen (False: fast compiles for tests).
    kernel       attention over the compressed cache: auto (Triton on CUDA for
                 one-token decode, the C++ kernel on CPU, else the reference),
                 cpu (the C++ kernel, built on first use), triton, or torch (the
                 reference: decompress, then SDPA).
    dump_graphs  a directory: write each compiled graph's before/after diff.
    mla_absorb   an MLA layer's decode step attends its compressed latent with
                 the up-projection folded into the query and the output (True,
                 `passes.mla`), or decompresses the latent and runs the
                 model's own up-projection and attention over it (False).
    lorc         LoRC: the fraction of the K/V cache removed by projecting
                 each layer's K / V onto low-rank factors of its projection
                 (`gear_compile.lorc`; 0: off). The cache holds the latents
                 (under the codec of `method`); the graph rebuilds K (then its
                 RoPE) from them and attends V's latents directly.
    lorc_schedule  ranks per layer and between K and V: calibrated (water-
                 filling on the loss estimated from `lorc.calibrate`),
                 progressive (the paper: shallow layers keep more, by
                 cumulative condition number) or uniform; auto: calibrated
                 when `lorc.calibrate` has seen the model, else progressive.
    lorc_sinks   the first tokens of a sequence whose K and V a LoRC cache
                 keeps exact (attention sinks; 0: none).
    lorc_basis   where LoRC's factors come from: calibrated (the default:
                 the statistics `gear_compile.lorc.calibrate(model, input_ids)`
                 recorded; compiling without them raises, since the weights
                 alone can wreck a model's perplexity: benchmarks/results/lorc.md)
                 or weights (the paper's SVD of the projection
                 weights, only when asked for by name).
    """

    inductor: bool = True
    kernel: str = "auto"
    dump_graphs: str | None = None
    mla_absorb: bool = True
    lorc: float = 0.0
    lorc_schedule: str = "auto"
    lorc_sinks: int = 4
    lorc_basis: str = "calibrated"

    def __post_init__(self):
        super().__post_init__()
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("lorc_schedule", self.lorc_schedule, LORC_SCHEDULES)
        _check_int("lorc_sinks", self.lorc_sinks, 0)
        _check_choice("lorc_basis", self.lorc_basis, LORC_BASES)
        if isinstance(self.lorc, bool) or not isinstance(self.lorc, (int, float)) or not 0 <= self.lorc < 1:
            raise ValueError(f"gear options: lorc must be a number in [0, 1) (the fraction of the K/V "
                             f"cache removed; 0 = off), got {self.lorc!r}.")
        if self.lorc and self.rotate != "none":
            raise ValueError(f"gear options: rotate={self.rotate!r} does not combine with lorc "
                             f"(LoRC's latents are not heads); use one of them.")
        for name in ("inductor", "mla_absorb"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"gear options: {name} must be True or False, got {getattr(self, name)!r}.")

    @classmethod
    def from_options(cls, options: dict | GearConfig | None = None, **overrides) -> GearConfig:
        """Build from a user dict; unknown keys raise, naming the valid ones."""
        if isinstance(options, GearConfig):
            return dataclasses.replace(options, **overrides) if overrides else options
        merged = dict(options or {})
        merged.update(overrides)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(merged) - set(valid))
        if unknown:
            raise ValueError(f"gear options: unknown option(s) {unknown}; valid options are {valid}.")
        return cls(**merged)

    def as_options(self) -> dict:
        """The options dict `from_options` turns back into this config: what
        `torch.compile(..., backend="gear", options=...)` takes."""
        return dataclasses.asdict(self)

    @property
    def codec(self) -> CodecConfig:
        """What stores and ops see: these options less the compile-only ones."""
        return codec_of(self)

    def describe(self) -> str:
        lorc = (f" + lorc={self.lorc:g} {self.lorc_schedule}, {self.lorc_sinks} sinks"
                + (", weights' basis" if self.lorc_basis == "weights" else "")) if self.lorc else ""
        return super().describe() + lorc


def codec_of(config: CodecConfig) -> CodecConfig:
    """The `CodecConfig` of any config (itself when it is one)."""
    if type(config) is CodecConfig:
        return config
    return _codec(config)


@functools.lru_cache(maxsize=64)
def _codec(config: GearConfig) -> CodecConfig:
    return CodecConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(CodecConfig)})


@functools.lru_cache(maxsize=64)
def _to_json(config: CodecConfig) -> str:
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != f.default}
    return json.dumps(changed, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _from_json(cls: type, text: str) -> CodecConfig:
    return cls(**json.loads(text))


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """Log an option's warning once per process (configs are consulted at
    every compile and flush)."""
    logging.getLogger("gear_compile").warning(message)


def _check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"gear options: {name} must be one of {list(valid)}, got {value!r}.")


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"gear options: {name} must be an integer >= {minimum}, got {value!r}.")
