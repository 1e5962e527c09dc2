"""A codec resolved for one head dim: what a store is, with nothing left to choose.

`CodecConfig` (`config`) holds the user's options, two of which default by
head dim (group_size, and the backbone of 4-bit GEAR). `resolve(config,
head_dim)` makes those choices once and returns a `Codec`, the form every
store, layout and op takes. A `Codec` cannot be built with a choice left
open, so its derived fields never raise for want of a head dim:
  key_spec / value_spec   how K and V are quantized (`QuantSpec`)
  split(P, streamed)      how a P-token prompt divides between the prefill
                          block, straight-to-decode blocks, the buffer and
                          the exact sinks (`PromptSplit`): the one statement
                          of that rule, read by the store, the ops' fake
                          shapes and the rewrite
  decode_capacity_for     the decode room a store reserves
  unfit(config, head_dim) why a site's heads cannot be stored (None: they can)
Neighbours: `config` (the options and their validation), `store` and
`segment` (layouts built from a Codec), `ops` and `passes.rewrite` (read
the prompt split), `backend` (asks `unfit` per site).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from .config import CodecConfig, codec_of
from .packing import ceil_div


@dataclass(frozen=True)
class QuantSpec:
    """How one of K or V is quantized.

    axis="channel": statistics over tokens, one (scale, zero) per channel per
    token group of `group` tokens (None: the whole block). axis="token": one
    (scale, zero) per token per group of `group` channels (None: the whole head
    dim). bits=16 means "stored exactly" (method none).
    """

    bits: int
    axis: str
    group: int | None

    def unfit(self, head_dim: int) -> str | None:
        """Why heads of `head_dim` cannot be stored with this spec (None: they
        can). The one rule: per-token statistics over groups of `group`
        channels need the group to divide the head dim."""
        if self.axis == "token" and self.group and head_dim % self.group:
            return f"group_size {self.group} does not divide head_dim {head_dim}"
        return None


@dataclass(frozen=True)
class PromptSplit:
    """Where the tokens of a prompt go in a new store (they sum to the prompt)."""

    prefill: int     # the prefill block (one block, rank r_p)
    decode: int      # whole n_b blocks compressed straight into the decode segment (streamed)
    buffer: int      # exact, newest
    sinks: int       # of the prefill block's first tokens, also held exact


@dataclass(frozen=True)
class Codec(CodecConfig):
    """A `CodecConfig` with group_size and the backbone chosen (`resolve`)."""

    def __post_init__(self):
        super().__post_init__()
        if self.group_size is None or self.backbone_unchosen:
            raise ValueError("gear: a Codec has its group_size and backbone chosen; "
                             "build it with codec.resolve(config, head_dim)")

    def key_spec(self) -> QuantSpec:
        q = self.quantizer
        if q == "none":
            return QuantSpec(16, "token", None)
        if q == "kcvt":
            return QuantSpec(self.bits, "channel", None)
        if q == "kivi":
            return QuantSpec(self.bits, "channel", self.group)
        return QuantSpec(self.bits, "token", self.group)

    def value_spec(self) -> QuantSpec:
        q = self.quantizer
        if q == "none":
            return QuantSpec(16, "token", None)
        if q == "kcvt":
            return QuantSpec(self.bits, "token", None)
        return QuantSpec(self.bits, "token", self.group)

    def split(self, prompt_tokens: int, streamed: bool = False) -> PromptSplit:
        """How a prompt fills a new store. Kivi's prefill block takes whole
        token groups, the other backbones the whole prompt; the rest waits in
        the buffer. A streamed store (a sliding-window layer's) has no prefill
        block: its whole n_b blocks go to the decode segment, as if the prompt
        had been decoded token by token, so that its oldest blocks can leave
        the window one at a time. The sinks are the prefill block's first
        tokens (`CodecConfig.sinks`)."""
        n = prompt_tokens
        if streamed:
            decode = n // self.block_size * self.block_size
            return PromptSplit(0, decode, n - decode, 0)
        prefill = n // self.group * self.group if self.quantizer == "kivi" else n
        return PromptSplit(prefill, 0, n - prefill, self.sinks(prefill))

    @property
    def initial_decode_capacity(self) -> int:
        """decode_capacity rounded up to whole blocks, at least two: a part with
        one row per block would otherwise start with a size-1 dim, which
        Dynamo specialises, and recompile at the first growth."""
        return max(2, ceil_div(self.decode_capacity, self.block_size)) * self.block_size

    def decode_capacity_for(self, tokens: int) -> int:
        """The decode capacity of a store whose prompt put `tokens` (whole
        blocks) into decode blocks: the initial one, or room for one more block."""
        return max(self.initial_decode_capacity, tokens + self.block_size)


def resolve(config: CodecConfig, head_dim: int) -> Codec:
    """The codec of `config` (any options object) for heads of `head_dim`:
    the choices `CodecConfig.for_head_dim` makes, compile-only options dropped."""
    if type(config) is Codec:
        return config
    if not isinstance(head_dim, int):            # tracing: a SymInt, which a cache cannot hash
        return _resolve.__wrapped__(codec_of(config), head_dim)
    return _resolve(codec_of(config), head_dim)


@functools.lru_cache(maxsize=256)
def _resolve(config: CodecConfig, head_dim: int) -> Codec:
    chosen = config.for_head_dim(head_dim)
    return Codec(**{f.name: getattr(chosen, f.name) for f in dataclasses.fields(CodecConfig)})


def unfit(config: CodecConfig, head_dim: int) -> str | None:
    """Why `config` cannot store heads of `head_dim` (None: it can). A site
    whose heads do not fit is left exact and reported with this."""
    codec = resolve(config, head_dim)
    for name in ("rank_prefill", "rank_decode"):
        if codec.uses_low_rank and getattr(codec, name) > head_dim:
            return (f"{name}={getattr(codec, name)} exceeds head_dim {head_dim} (a residual of "
                    f"{head_dim}-channel heads has at most that rank); {name}={head_dim} or less fits; "
                    f"left exact")
    for kind, spec in (("K", codec.key_spec()), ("V", codec.value_spec())):
        if why := spec.unfit(head_dim):
            divisors = [g for g in (64, 32, 16, 8) if head_dim % g == 0]
            hint = f"; group_size={divisors[0]} fits" if divisors else ""
            return f"{why} ({codec.quantizer} groups {kind}'s channels){hint}; left exact"
    return None
