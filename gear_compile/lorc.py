"""LoRC (arXiv 2410.03111): low-rank K/V projections, ranks set per layer.

The math of the method, separate from how a graph uses it.

Factors. A K or V projection is the affine map k = x W^T + b (W: [H_kv * d,
d_model]). The cache holds a latent c = k D ([r] per token instead of
H_kv * d) and attention reads k^ = c U^T: `Factors(down=D, up=U)`, both
[H_kv * d, r]. Nothing in the model's weights changes. Three ways to choose
them, each optimal for its objective:

  weights      (the paper) D = U = the r leading left singular vectors of
               [W | b]: the best rank-r map for inputs spread evenly in
               every direction.
  input moment with C = E[x_aug x_aug^T] from calibration text, D = U = the
               r leading eigenvectors of C_k = [W | b] C [W | b]^T, the
               principal directions of k itself: min E|k - k^|^2.
  loss-aware   with F = E[g g^T] as well, g = dLoss/dk (the next-token loss,
               from the same text), D = F^(1/2) V_r where V_r are the r
               leading eigenvectors of F^(1/2) C_k F^(1/2), and U = C_k D
               (D^T C_k D)^-1 (the least-squares decoder of k from c): this
               minimises E[(k - k^)^T F (k - k^)], the second-order estimate
               of the loss increase. It weighs K's directions by what the
               queries read and V's by what the output projection and the
               layers above read, which the input moment cannot see.
Measured on SmolLM2-135M (benchmarks/results/lorc.md, P = 64): removing
60 % of K and V with the weights' factors took perplexity from 34.9 to
27,411; with the input moment (and 8,192 calibration tokens) +25.1 %; loss-
aware, under the calibrated schedule (below), +16.6 %, and with the sinks
kept exact (below) +8.5 %. Those three are the backend's default once
`calibrate` has seen the model.

`calibrate(model, input_ids)` runs the model forward and backward over the
text and records C (`MOMENTS`) and F (`FISHER`) for the K/V projections, by
weight; `plan` uses them wherever they exist.

Sinks. The first `sinks` tokens of a sequence take most of the attention
(attention sinks) and their K/V are outliers no basis fitted on the rest
represents: on SmolLM2 (every V at 70 % rank, K exact, a teacher-forced
pass) perplexity rose +11.8 % with the first token rebuilt and +2.2 % with it
kept exact. A LoRC cache keeps
its first `sinks` tokens' K and V exact beside the latents (`passes.lorc`).

Ranks (`plan`). keep = 1 - lorc is the fraction of the K/V cache kept.
  uniform:      r_l = keep * full for every layer, K and V alike.
  progressive:  (the paper) an error in layer l's K/V is amplified by every
                layer after it, so l's sensitivity is its cumulative condition
                number kappa_l^cum = prod_{j >= l} kappa_j, kappa_j = s_max /
                s_min of layer j's projection W_j. With u_l = log kappa_l^cum
                rescaled to [0, 1] (1 at the most sensitive layer, the first),
                the kept fraction is f_l = keep + a * (u_l - mean(u)), where
                the slope a is the largest that keeps every f_l in [keep / 2,
                1]. K and V each get keep * L * full. Equal condition numbers
                still give ranks falling linearly with depth; only perfectly
                conditioned projections (kappa = 1) give the uniform schedule.
  calibrated:   (ours; needs `calibrate`) the loss-aware objective's error at
                rank r is the tail sum of the eigenvalues of F^(1/2) C_k
                F^(1/2), in units of loss for every layer and for K and V
                alike. Starting from `multiple` everywhere, give `multiple`
                more dims, one step at a time, to the (layer, K or V) whose
                next `multiple` eigenvalues are largest (water-filling), until
                K and V together hold keep * 2 * L * full.
The first two round r_l to a multiple of `multiple` and then move single
units between layers (the largest rounding error first) until the sum meets
the budget exactly.

Per layer or per KV head. `per="layer"` factors the whole [H_kv * d] output
(one latent shared by the layer's heads); `per="head"` factors each head's
[d] block (H_kv latents of r / H_kv each; the moment bases only). At equal
bytes the per-layer factorisation is never worse on its objective (a
per-head basis is one particular per-layer basis), and on SmolLM2 at 60 %
(input-moment bases, P = 64) per head cost +57.8 % with the sinks exact,
per layer +25.1 % without them (lorc.md); the backend factors per layer.

Neighbours: `passes.lorc` (the graph rewrite that caches the latents),
`benchmarks/lorc.py` (evaluation on SmolLM2).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

SCHEDULES = ("auto", "calibrated", "progressive", "uniform")
PER = ("layer", "head")
BASES = ("loss", "moment", "weights")
USER_BASES = ("calibrated", "weights")    # the `lorc_basis` option: calibrate's records, or the weights alone
CALIBRATION_HINT = ("run gear_compile.lorc.calibrate(model, input_ids) first, on text like yours (2,048 tokens "
                    "or more; benchmarks/lorc.py uses 8,192), or ask for the paper's weights-only factors "
                    "by name with lorc_basis='weights'")


def require_calibration(weights) -> None:
    """Raise unless `calibrate` has recorded statistics for one of `weights`
    (LoRC's default basis needs them: without, the factors are the weights'
    alone, which can wreck a model)."""
    if not any(w in MOMENTS for w in weights):
        raise ValueError("gear options: lorc > 0 with lorc_basis='calibrated' (the default), but the model "
                         "has not been calibrated: " + CALIBRATION_HINT + ".")


@dataclass(frozen=True)
class Factors:
    """A projection's rank-r factors: latent = k @ down, k^ = latent @ up.T.
    Per layer both are [H_kv * d, r]; per head [H_kv, d, r / H_kv]."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[-1] * (self.down.shape[0] if self.down.dim() == 3 else 1)


@dataclass(frozen=True)
class Plan:
    """What `plan` chose: the schedule it ran ("auto" resolved), each
    layer's K and V ranks, their factors, and whether those are loss-aware
    (the factors of other ranks for the same weights must be made alike)."""

    schedule: str
    ranks: tuple[list[int], list[int]]
    factors: list[tuple[Factors, Factors]]
    loss_aware: bool


def affine(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b]: the projection as one matrix over (x, 1), in fp64."""
    w = weight.detach().to(torch.float64)
    if bias is None:
        return w
    return torch.cat([w, bias.detach().to(torch.float64)[:, None]], dim=1)


# projection weight (by identity) -> its input's second moment C / its output
# gradient's second moment F, from `calibrate`
MOMENTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
FISHER: WeakIdKeyDictionary = WeakIdKeyDictionary()


def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, names=("k_proj", "v_proj"),
              chunk: int = 512) -> int:
    """Run `model` on `input_ids` ([B, N] text, `chunk` tokens at a time),
    forward and back through its next-token loss, and record for every
    linear layer named in `names` (the K/V projections; Llama-style names by
    default) its input's second moment (`MOMENTS`) and its output gradient's
    (`FISHER`). The weights get no gradient and are left as they were.
    LoRC then factors those projections loss-aware (module docstring).
    Returns the number of layers calibrated."""
    moments, fisher, hooks = {}, {}, []

    def record(mod, args, out):
        moments[mod] = moments.get(mod, 0) + second_moment(args[0], mod.bias is not None)

        def gradient(g):
            fisher[mod] = fisher.get(mod, 0) + second_moment(g, False)
        out.register_hook(gradient)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
            hooks.append(module.register_forward_hook(record))
    if not hooks:
        raise ValueError(f"lorc.calibrate: no torch.nn.Linear named {list(names)} in the model")
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for start in range(0, input_ids.shape[1] - 1, chunk):
                ids = input_ids[:, start:start + chunk]
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
                torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                  reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
        for p in trained:
            p.requires_grad_(True)
    for module, moment in moments.items():
        MOMENTS[module.weight] = moment
        FISHER[module.weight] = fisher[module]
    return len(moments)


def condition_number(weight: torch.Tensor) -> float:
    """s_max / s_min of a projection weight (inf when it is rank deficient)."""
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def second_moment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """sum over tokens of x_aug x_aug^T for x [..., n] (x_aug = (x, 1) when
    `bias`), in fp64: add these up over calibration batches."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return x.T @ x


def factors(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, heads: int = 1,
            per: str = "layer", moment: torch.Tensor | None = None,
            fisher: torch.Tensor | None = None) -> Factors:
    """The rank-`rank` factors of k = x W^T + b (module docstring): from the
    weights alone, the input `moment` C, or C and the gradient moment
    `fisher` F (per layer only)."""
    _check(per, PER, "per")
    out = weight.shape[0]
    if not 0 < rank <= out:
        raise ValueError(f"lorc: rank must be in [1, {out}], got {rank}")
    ck = _output_moment(weight, bias, moment)
    if per == "head":
        if rank % heads:
            raise ValueError(f"lorc: per-head rank {rank} does not divide by {heads} KV heads")
        if fisher is not None:
            raise ValueError("lorc: per-head factors are fitted on the moments alone, not the loss")
        d = out // heads
        blocks = torch.stack([ck[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(heads)])
        u = _leading(blocks, rank // heads).to(weight.dtype)
        return Factors(u, u)
    if fisher is None:
        u = _leading(ck, rank).to(weight.dtype)
        return Factors(u, u)
    w, weighted = _loss_weighted(ck, fisher)
    down = w @ _leading(weighted, rank)
    up = torch.linalg.solve(down.T @ ck @ down, (ck @ down).T).T
    return Factors(down.to(weight.dtype), up.to(weight.dtype))


def loss_spectrum(weight: torch.Tensor, bias: torch.Tensor | None, moment: torch.Tensor,
                  fisher: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of F^(1/2) C_k F^(1/2), largest first: the estimated
    loss each dim of the loss-aware latent saves (`calibrated_ranks`)."""
    _, weighted = _loss_weighted(_output_moment(weight, bias, moment), fisher)
    return torch.linalg.eigvalsh(weighted).flip(-1).clamp(min=0)


def _loss_weighted(ck: torch.Tensor, fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F^(1/2), F^(1/2) C_k F^(1/2)): the loss-aware objective's weight and
    the moment whose leading eigenvectors it keeps."""
    w = _psd_sqrt(fisher.to(torch.float64))
    return w, w @ ck @ w


def _output_moment(weight, bias, moment):
    """C_k = [W | b] C [W | b]^T (C = I without a moment)."""
    m = affine(weight, bias)
    if moment is None:
        return m @ m.T
    if moment.shape != (m.shape[1], m.shape[1]):
        raise ValueError(f"lorc: the input moment must be {m.shape[1]} x {m.shape[1]} "
                         f"(d_model{' + 1 for the bias' if bias is not None else ''}), "
                         f"got {tuple(moment.shape)}")
    return m @ moment.to(torch.float64) @ m.T


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading eigenvectors of symmetric m [..., n, n]: [..., n, r]."""
    return torch.linalg.eigh(m).eigenvectors.flip(-1)[..., :r]


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """m^(1/2) of a PSD matrix, its eigenvalues floored at 1e-9 of the largest
    (a direction no gradient reached keeps a little weight)."""
    e, v = torch.linalg.eigh(m)
    return (v * e.clamp(min=float(e.max()) * 1e-9).sqrt()) @ v.T


def project(x: torch.Tensor, f: Factors) -> torch.Tensor:
    """The latent of x [..., H_kv * d]: [..., r] (per layer) or
    [..., H_kv, r / H_kv] (per head)."""
    if f.down.dim() == 2:
        return x @ f.down
    heads, d, _ = f.down.shape
    return torch.einsum("...hd,hdr->...hr", x.unflatten(-1, (heads, d)), f.down)


def rebuild(latent: torch.Tensor, f: Factors) -> torch.Tensor:
    """The rank-r K or V [..., H_kv * d] from its latent."""
    if f.up.dim() == 2:
        return latent @ f.up.T
    return torch.einsum("...hr,hdr->...hd", latent, f.up).flatten(-2)


def plan(projections: list, keep: float, schedule: str = "auto", multiple: int = 8,
         basis: str = "loss", per: str = "layer", heads: int = 1) -> Plan:
    """Ranks and factors for layers whose K and V projections are
    `projections` [((W_k, b_k), (W_v, b_v))], keeping `keep` of the cache.
    basis: the most of `calibrate`'s records the factors may use: "loss"
    (C and F, where every projection has F), "moment" (C alone) or "weights"
    (neither: the paper's). schedule "auto" is "calibrated" where the loss-
    aware factors apply, else "progressive"."""
    _check(schedule, SCHEDULES, "lorc_schedule")
    _check(basis, BASES, "basis")
    pairs = [p for layer in projections for p in layer]
    full = pairs[0][0].shape[0]
    loss_aware = basis == "loss" and per == "layer" and all(w in FISHER for w, _ in pairs)
    if schedule == "auto":
        schedule = "calibrated" if loss_aware else "progressive"
    if schedule == "calibrated":
        if not loss_aware:
            raise ValueError("lorc: lorc_schedule='calibrated' needs the loss gradients of a per-layer "
                             "calibration: run gear_compile.lorc.calibrate(model, input_ids) first "
                             f"(valid schedules: {list(SCHEDULES)})")
        flat = calibrated_ranks([loss_spectrum(w, b, MOMENTS[w], FISHER[w]) for w, b in pairs],
                                keep, full, multiple)
        ranks = (flat[0::2], flat[1::2])
    else:
        ranks = tuple(layer_ranks([condition_number(layer[i][0]) for layer in projections], keep, full,
                                  schedule, multiple) for i in (0, 1))
    with torch.no_grad():
        fs = [tuple(factors(w, b, r, heads, per, MOMENTS.get(w) if basis != "weights" else None,
                            FISHER[w] if loss_aware else None)
                    for (w, b), r in zip(layer, (rk, rv)))
              for layer, rk, rv in zip(projections, *ranks)]
    return Plan(schedule, ranks, fs, loss_aware)


def calibrated_ranks(spectra: list[torch.Tensor], keep: float, full: int, multiple: int = 8) -> list[int]:
    """Water-filling (module docstring): ranks in steps of `multiple` for
    projections whose `loss_spectrum`s are `spectra`, summing to `keep` of
    len(spectra) * full (rounded to `multiple`)."""
    if not 0 < keep <= 1:
        raise ValueError(f"lorc: the kept fraction must be in (0, 1], got {keep}")
    ranks = [min(multiple, full)] * len(spectra)
    budget = max(sum(ranks), round(keep * full * len(spectra) / multiple) * multiple)
    gains = [(-float(s[r:r + multiple].sum()), i) for i, (s, r) in enumerate(zip(spectra, ranks)) if r < full]
    heapq.heapify(gains)
    while sum(ranks) < budget and gains:
        _, i = heapq.heappop(gains)
        ranks[i] = min(full, ranks[i] + multiple)
        if ranks[i] < full:
            heapq.heappush(gains, (-float(spectra[i][ranks[i]:ranks[i] + multiple].sum()), i))
    return ranks


def layer_ranks(kappas: list[float], keep: float, full: int, schedule: str = "progressive",
                multiple: int = 8) -> list[int]:
    """Per-layer ranks (see the module docstring) for layers whose projections
    have condition numbers `kappas`, keeping `keep` of `full` dims on average."""
    _check(schedule, ("progressive", "uniform"), "lorc_schedule")
    if not 0 < keep <= 1:
        raise ValueError(f"lorc: the kept fraction must be in (0, 1], got {keep}")
    n = len(kappas)
    if schedule == "uniform" or n == 1:
        fractions = [keep] * n
    else:
        fractions = progressive_fractions(kappas, keep)
    return _round_to_budget([f * full for f in fractions], round(keep * full * n), full, multiple)


def progressive_fractions(kappas: list[float], keep: float) -> list[float]:
    """f_l = keep + a (u_l - mean u), u = rescaled log cumulative condition number."""
    logs = [math.log(min(k, 1e300)) for k in kappas]
    cumulative = [sum(logs[l:]) for l in range(len(logs))]
    lo, hi = min(cumulative), max(cumulative)
    if hi - lo < 1e-12:
        return [keep] * len(kappas)
    u = [(c - lo) / (hi - lo) for c in cumulative]
    mean = sum(u) / len(u)
    slopes = [((1.0 if x > mean else keep / 2) - keep) / (x - mean) for x in u if abs(x - mean) > 1e-12]
    a = min(slopes)
    return [keep + a * (x - mean) for x in u]


def _round_to_budget(targets: list[float], budget: int, full: int, multiple: int) -> list[int]:
    """Round each target to a multiple of `multiple` in [multiple, full] with
    sum == budget rounded to a multiple, moving one unit at a time where the
    rounding lost (or gained) the most."""
    unit = multiple
    budget = max(unit * len(targets), round(budget / unit) * unit)
    ranks = [min(full, max(unit, round(t / unit) * unit)) for t in targets]
    while sum(ranks) != budget:
        grow = sum(ranks) < budget
        candidates = [i for i, r in enumerate(ranks) if (r + unit <= full if grow else r - unit >= unit)]
        if not candidates:
            break
        i = max(candidates, key=lambda j: (targets[j] - ranks[j]) * (1 if grow else -1))
        ranks[i] += unit if grow else -unit
    return ranks


def _check(value, valid, name):
    if value not in valid:
        raise ValueError(f"lorc: {name} must be one of {list(valid)}, got {value!r}")
