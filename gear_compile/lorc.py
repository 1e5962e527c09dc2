"""LoRC (arXiv 2410.03111): low-rank K/V projections, ranks set per layer.

The math of the method, separate from how a graph uses it.

Factorisation. A K or V projection is the affine map k = x W^T + b
(W: [H_kv * d, d_model]). The truncated SVD of the map (W with the bias as
one more input column, [W | b]) is U_r S_r V_r^T; its rank-r form is
x_aug (V_r S_r) U_r^T. The latent a cache holds is therefore c = k U_r,
the K (or V) the model already computes, projected onto the r leading
left singular vectors U_r ([H_kv * d, r], orthonormal columns), and the
rank-r K is c U_r^T. Nothing in the model's weights has to change: the
projection basis U_r is all a rewrite needs (`projection_basis`).

Calibrated basis (beyond the paper). The SVD of [W | b] is the basis that
minimises the error of k over inputs spread evenly in every direction.
Real inputs are not: on SmolLM2-135M, removing 60 % of K and V with the
weights' basis took perplexity from 34.9 to 27,411 (benchmarks/results/
lorc.md), and in a short check (160 tokens) dropping only the weakest of
192 directions of every V projection took it from 44.5 to 198: the
normalised hidden states are large along directions the weights scale down. Given the input's second moment C = E[x_aug x_aug^T]
(`second_moment`, from calibration text), the basis is the leading left
singular vectors of [W | b] C^(1/2): the principal directions of k itself,
which minimise E|k - U U^T k|^2 for those inputs. C = I is the paper's SVD.
`calibrate(model, input_ids)` records C for a model's K/V projections;
the compile pass then uses the calibrated basis for those weights.

Per layer or per KV head. `per="layer"` factors the whole [H_kv * d] output
(one latent shared by the layer's heads); `per="head"` factors each head's
[d] block (H_kv latents of r / H_kv each). At equal bytes, the per-layer
factorisation is never worse in the weight's Frobenius error (a per-head
basis is one particular per-layer basis), but rebuilding K from it costs H_kv
times more multiply-adds per cached token (every head reads the whole
latent). `benchmarks/lorc.py` measures both on SmolLM2.

Ranks (`layer_ranks`). The budget is `keep` = 1 - lorc, the fraction of the
K (and, separately, the V) cache kept: sum_l r_l = keep * L * full.
  uniform:      r_l = keep * full for every layer.
  progressive:  an error in layer l's K/V is amplified by every layer after
                it, so l's sensitivity is its cumulative condition number
                kappa_l^cum = prod_{j >= l} kappa_j, kappa_j = s_max / s_min of
                layer j's projection W_j. With u_l = log kappa_l^cum rescaled to
                [0, 1] (1 at the most sensitive layer, the first), the kept
                fraction is f_l = keep + a * (u_l - mean(u)), where the slope a
                is the largest that keeps every f_l in [keep / 2, 1] (shallow
                layers keep up to full rank, no layer drops below half the
                average). Equal condition numbers still give ranks falling
                linearly with depth (the cumulative product shrinks layer by
                layer); only perfectly conditioned projections (kappa = 1)
                give the uniform schedule.
Both round r_l to a multiple of `multiple` and then move single units
between layers (the largest rounding error first) until the sum meets the
budget exactly.

Neighbours: `benchmarks/lorc.py` (evaluation on SmolLM2; the rewrite that
caches the latent is not built yet).
"""
from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

SCHEDULES = ("progressive", "uniform")
PER = ("layer", "head")


def affine(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b]: the projection as one matrix over (x, 1), in fp64."""
    w = weight.detach().to(torch.float64)
    if bias is None:
        return w
    return torch.cat([w, bias.detach().to(torch.float64)[:, None]], dim=1)


# projection weight (by identity) -> the second moment of its input, from `calibrate`
MOMENTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, names=("k_proj", "v_proj"),
              chunk: int = 512) -> int:
    """Run `model` eagerly on `input_ids` ([B, N] text, `chunk` tokens at a
    time) and record the input second moment of every linear layer named in
    `names` (the K/V projections; Llama-style names by default). LoRC then
    factors those projections on their inputs (the calibrated basis) instead
    of their weights alone. Returns the number of layers calibrated."""
    moments, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
            def hook(mod, args):
                moments[mod] = moments.get(mod, 0) + second_moment(args[0], mod.bias is not None)
            hooks.append(module.register_forward_pre_hook(hook))
    if not hooks:
        raise ValueError(f"lorc.calibrate: no torch.nn.Linear named {list(names)} in the model")
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[1], chunk):
                model(input_ids=input_ids[:, start:start + chunk], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for module, moment in moments.items():
        MOMENTS[module.weight] = moment
    return len(moments)


def condition_number(weight: torch.Tensor) -> float:
    """s_max / s_min of a projection weight (inf when it is rank deficient)."""
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def second_moment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """sum over tokens of x_aug x_aug^T for inputs x [..., d_model] (x_aug =
    (x, 1) when the projection has a bias), in fp64: add these up over
    calibration batches; the scale does not matter to the basis."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return x.T @ x


def projection_basis(weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                     heads: int = 1, per: str = "layer",
                     moment: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal columns U_r spanning the rank-`rank` output of k = x W^T + b.

    per="layer": [H_kv * d, rank]. per="head": [heads, d, rank // heads] (rank
    must divide by heads), one basis per KV head's rows of W. moment: the
    input's `second_moment` (calibrated basis), None: the weights' SVD."""
    _check(per, PER, "per")
    out = weight.shape[0]
    if not 0 < rank <= out:
        raise ValueError(f"lorc: rank must be in [1, {out}], got {rank}")
    m = affine(weight, bias)
    if moment is not None:
        if moment.shape != (m.shape[1], m.shape[1]):
            raise ValueError(f"lorc: the input moment must be {m.shape[1]} x {m.shape[1]} "
                             f"(d_model{' + 1 for the bias' if bias is not None else ''}), "
                             f"got {tuple(moment.shape)}")
        e, v = torch.linalg.eigh(moment.to(torch.float64))
        m = m @ (v * e.clamp(min=0).sqrt()) @ v.T
    if per == "layer":
        u = torch.linalg.svd(m, full_matrices=False).U
        return u[:, :rank].to(weight.dtype)
    if rank % heads:
        raise ValueError(f"lorc: per-head rank {rank} does not divide by {heads} KV heads")
    blocks = m.reshape(heads, out // heads, m.shape[1])
    u = torch.linalg.svd(blocks, full_matrices=False).U
    return u[:, :, :rank // heads].to(weight.dtype)


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The latent of x [..., H_kv * d]: [..., r] (per-layer basis) or
    [..., H_kv, r / H_kv] (per-head basis)."""
    if basis.dim() == 2:
        return x @ basis
    heads, d, _ = basis.shape
    return torch.einsum("...hd,hdr->...hr", x.unflatten(-1, (heads, d)), basis)


def rebuild(latent: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The rank-r K or V [..., H_kv * d] from its latent (inverse of `project`
    on the basis' span)."""
    if basis.dim() == 2:
        return latent @ basis.T
    return torch.einsum("...hr,hdr->...hd", latent, basis).flatten(-2)


def layer_ranks(kappas: list[float], keep: float, full: int, schedule: str = "progressive",
                multiple: int = 8) -> list[int]:
    """Per-layer ranks (see the module docstring) for layers whose projections
    have condition numbers `kappas`, keeping `keep` of `full` dims on average."""
    _check(schedule, SCHEDULES, "lorc_schedule")
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
