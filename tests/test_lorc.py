"""LoRC: the factorisation and rank schedules (`gear_compile.lorc`), the
compiled latent cache (`passes.lorc`: against eager generation at full rank,
with left padding and beam search; bytes and reported ranks below it; a
model it cannot read), and the benchmark's eager latent cache
(benchmarks/lorc.py) against the compiled one."""
import math

import pytest
import torch

from gear_compile import lorc
from gear_compile.models import tiny_model

from decoding import decode_logits


def test_weight_factors_give_the_best_rank_r_map():
    torch.manual_seed(0)
    w, b = torch.randn(32, 48, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    x = torch.randn(100, 48, dtype=torch.float64)
    k = x @ w.T + b
    for rank in (4, 16):
        f = lorc.factors(w, b, rank)
        u = f.down
        assert u.shape == (32, rank) and f.up is u and f.rank == rank
        assert torch.allclose(u.T @ u, torch.eye(rank, dtype=torch.float64), atol=1e-10)
        approx = lorc.rebuild(lorc.project(k, f), f)
        # Eckart-Young: the error of the affine map equals its tail singular values
        m = torch.cat([w, b[:, None]], dim=1)
        s = torch.linalg.svdvals(m)
        map_error = torch.linalg.matrix_norm(m - u @ u.T @ m)
        assert math.isclose(float(map_error), float(s[rank:].square().sum().sqrt()), rel_tol=1e-9)
        assert (approx - k).norm() < (k.norm() * 0.99)
    full = lorc.factors(w, b, 32)
    assert torch.allclose(lorc.rebuild(lorc.project(k, full), full), k, atol=1e-9)


def test_loss_aware_factors_minimise_the_weighted_error():
    """With a gradient moment F, the factors minimise E[(k - k^)^T F (k - k^)]:
    the weighted error is the tail of loss_spectrum, no other rank-r encoder
    does better, and F = I gives the input-moment factors' span."""
    torch.manual_seed(0)
    w = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(500, 40, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)
    c = x.T @ x
    g = torch.randn(24, 24, dtype=torch.float64)
    fisher = g @ g.T
    k = x @ w.T

    def weighted(f):
        e = k - lorc.rebuild(lorc.project(k, f), f)
        return float(torch.einsum("ni,ij,nj->", e, fisher, e))

    spectrum = lorc.loss_spectrum(w, None, c, fisher)
    assert torch.all(spectrum[:-1] >= spectrum[1:])
    for rank in (3, 12):
        f = lorc.factors(w, None, rank, moment=c, fisher=fisher)
        assert math.isclose(weighted(f), float(spectrum[rank:].sum()), rel_tol=1e-6)
        assert weighted(f) < weighted(lorc.factors(w, None, rank, moment=c))
        assert weighted(f) < weighted(lorc.factors(w, None, rank))
        for _ in range(5):      # random rank-r encoders, each with its best decoder, do no better
            d = torch.randn(24, rank, dtype=torch.float64)
            ck = w @ c @ w.T
            up = torch.linalg.solve(d.T @ ck @ d, (ck @ d).T).T
            assert weighted(lorc.Factors(d, up)) >= weighted(f) * (1 - 1e-9)
    iso = lorc.factors(w, None, 6, moment=c, fisher=torch.eye(24, dtype=torch.float64))
    pca = lorc.factors(w, None, 6, moment=c)
    span = iso.down @ torch.linalg.pinv(iso.down)
    assert torch.allclose(span, pca.down @ pca.down.T, atol=1e-8)


def test_per_head_factors_project_each_head_alone():
    torch.manual_seed(0)
    w = torch.randn(3 * 16, 40, dtype=torch.float64)
    f = lorc.factors(w, None, 24, heads=3, per="head")
    u = f.down
    assert u.shape == (3, 16, 8) and f.rank == 24
    k = torch.randn(5, 40, dtype=torch.float64) @ w.T
    latent = lorc.project(k, f)
    assert latent.shape == (5, 3, 8)
    for h in range(3):
        uh = lorc.factors(w[16 * h:16 * (h + 1)], None, 8).down
        assert torch.allclose(latent[:, h].abs(), (k[:, 16 * h:16 * (h + 1)] @ uh).abs(), atol=1e-9)
    assert lorc.rebuild(latent, f).shape == k.shape
    # at equal rank the per-layer basis is never worse on the weight
    m = w
    per_layer = lorc.factors(w, None, 24).down
    err_layer = (m - per_layer @ per_layer.T @ m).norm()
    blocks = torch.cat([(u[h] @ u[h].T @ m[16 * h:16 * (h + 1)]) for h in range(3)])
    assert err_layer <= (m - blocks).norm() + 1e-9


def test_bad_values_are_named():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\], got 9"):
        lorc.factors(w, None, 9)
    with pytest.raises(ValueError, match="per must be one of"):
        lorc.factors(w, None, 4, per="row")
    with pytest.raises(ValueError, match="does not divide by 3"):
        lorc.factors(torch.randn(12, 8), None, 4, heads=3, per="head")
    with pytest.raises(ValueError, match=r"lorc_schedule must be one of \['progressive', 'uniform'\]"):
        lorc.layer_ranks([2.0, 3.0], 0.5, 64, "linear")
    with pytest.raises(ValueError, match=r"kept fraction must be in \(0, 1\], got 0"):
        lorc.layer_ranks([2.0, 3.0], 0.0, 64)
    with pytest.raises(ValueError, match=r"basis must be one of \['loss', 'moment', 'weights'\], got 'svd'"):
        lorc.plan([((w, None), (w, None))], 0.5, basis="svd")
    with pytest.raises(ValueError, match=r"'calibrated' needs the loss gradients.*lorc.calibrate"):
        lorc.plan([((torch.randn(8, 8), None), (torch.randn(8, 8), None))], 0.5, "calibrated")


def test_uniform_ranks_split_the_budget_evenly():
    assert lorc.layer_ranks([5.0, 2.0, 9.0, 3.0], 0.5, 64, "uniform") == [32, 32, 32, 32]
    ranks = lorc.layer_ranks([5.0] * 3, 0.4, 64, "uniform", multiple=8)
    assert sum(ranks) == 80 and all(r % 8 == 0 for r in ranks)      # 0.4 * 64 * 3 = 76.8 -> 80


def test_progressive_ranks_follow_the_cumulative_condition_number():
    kappas = [4.0, 3.0, 5.0, 2.0, 8.0, 1.5]
    keep, full = 0.5, 128
    ranks = lorc.layer_ranks(kappas, keep, full, "progressive", multiple=8)
    assert sum(ranks) == keep * full * len(kappas)
    # cumulative condition numbers fall with depth, so ranks never rise with depth
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]
    # the documented rule: f_l = keep + a (u_l - mean u), a the largest slope in [keep/2, 1]
    fractions = lorc.progressive_fractions(kappas, keep)
    logs = [math.log(k) for k in kappas]
    cum = [sum(logs[i:]) for i in range(len(logs))]
    u = [(c - min(cum)) / (max(cum) - min(cum)) for c in cum]
    slope = (fractions[0] - fractions[-1]) / (u[0] - u[-1])
    assert all(math.isclose(f, keep + slope * (x - sum(u) / len(u)), abs_tol=1e-12) for f, x in zip(fractions, u))
    assert min(fractions) >= keep / 2 - 1e-12 and max(fractions) <= 1 + 1e-12
    assert math.isclose(min(fractions), keep / 2) or math.isclose(max(fractions), 1.0)
    assert all(abs(r - f * full) <= 8 for r, f in zip(ranks, fractions))
    # equal condition numbers: ranks fall linearly with depth; kappa = 1: the uniform schedule
    assert lorc.layer_ranks([3.0] * 4, keep, full) == [96, 72, 56, 32]
    assert lorc.layer_ranks([1.0] * 4, keep, full) == lorc.layer_ranks([1.0] * 4, keep, full, "uniform")


def test_calibrated_ranks_fill_the_largest_eigenvalues_first():
    """Water-filling: each step of `multiple` dims goes where the next
    eigenvalues are largest, so the kept sum is the budget's best."""
    spectra = [torch.tensor([9.0, 8, 1, 1, 0.5, 0.5, 0.1, 0.1]), torch.tensor([4.0, 4, 3, 3, 2, 2, 1, 1]),
               torch.tensor([0.2, 0.2, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0])]
    assert lorc.calibrated_ranks(spectra, 0.5, 8, multiple=2) == [4, 6, 2]
    assert lorc.calibrated_ranks(spectra, 1.0, 8, multiple=2) == [8, 8, 8]
    assert lorc.calibrated_ranks(spectra, 0.1, 8, multiple=2) == [2, 2, 2]   # never under one step
    ranks = lorc.calibrated_ranks(spectra, 0.5, 8, multiple=2)
    kept = sum(float(s[:r].sum()) for s, r in zip(spectra, ranks))
    import itertools
    best = max(sum(float(s[:r].sum()) for s, r in zip(spectra, rs))
               for rs in itertools.product(range(2, 9, 2), repeat=3) if sum(rs) == 12)
    assert math.isclose(kept, best)


# ---------------------------------------------------------------- the benchmark's latent cache
def _logits(model, method, ids, prefill=24):
    """Logits of a prefill then one-token decode steps through `method`'s cache
    (None: a DynamicCache, through whatever forward the model has, compiled or not)."""
    cache = method.new_cache(model) if method is not None else None
    return decode_logits(model, ids=ids[:, :prefill], tokens=ids[:, prefill:], cache=cache)[0]


@pytest.mark.parametrize("per", ["layer", "head"])
def test_latent_cache_at_full_rank_is_the_dense_model(per):
    import lorc as bench
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 40))
    dense = _logits(model, None, ids)
    method = bench.LoRCMethod("full", 0.0, per=per)
    method.setup(model)
    try:
        assert torch.allclose(_logits(model, method, ids), dense, atol=1e-4)
    finally:
        method.teardown(model)


def test_latent_cache_under_gear_holds_fewer_bytes_than_gear_alone():
    import lorc as bench
    import quality_methods as qm
    model = tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 256, (1, 120))
    method = bench.LoRCMethod("lorc+gear", 0.5, gear="GEAR-4")
    method.setup(model)
    try:
        from gear_compile.hf_compat import cache_kwarg
        cache = method.new_cache(model)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache))
        lorc_bytes = method.cache_bytes(cache)
    finally:
        method.teardown(model)
    gear = qm.Method("GEAR-4", dict(method="gear", bits=4))
    cache = gear.new_cache(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache))
    assert lorc_bytes < 0.7 * gear.cache_bytes(cache)


def test_calibrated_basis_follows_the_inputs_and_is_the_svd_for_isotropic_inputs():
    torch.manual_seed(0)
    w, b = torch.randn(24, 32, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    identity = torch.eye(33, dtype=torch.float64)
    svd = lorc.factors(w, b, 6).down
    iso = lorc.factors(w, b, 6, moment=identity).down
    assert torch.allclose(svd @ svd.T, iso @ iso.T, atol=1e-9)        # the same span
    # inputs large along a few directions the weights scale down
    scales = torch.ones(32, dtype=torch.float64)
    scales[:3] = 50.0
    x = torch.randn(2000, 32, dtype=torch.float64) * scales
    k = x @ w.T + b
    moment = lorc.second_moment(x, bias=True)
    assert moment.shape == (33, 33)
    cal = lorc.factors(w, b, 6, moment=moment).down
    err = {name: float((k @ u @ u.T - k).norm()) for name, u in (("svd", svd), ("cal", cal))}
    assert err["cal"] < 0.5 * err["svd"]
    # PCA of k: the calibrated span is the top eigenvectors of k's second moment
    top = torch.linalg.eigh(k.T @ k).eigenvectors[:, -6:]
    assert torch.allclose(cal @ cal.T, top @ top.T, atol=1e-6)
    with pytest.raises(ValueError, match=r"input moment must be 33 x 33 \(d_model \+ 1 for the bias\), got \(32, 32\)"):
        lorc.factors(w, b, 6, moment=torch.eye(32))


# ---------------------------------------------------------------- the compiled path
def _compiled(model, **options):
    import gear_compile
    gear_compile.compile(model, inductor=False, **options)
    return model


def _uncompile(model):
    model.__dict__.pop("forward", None)
    torch._dynamo.reset()


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_full_rank_lorc_reproduces_eager_generation(kv_heads):
    model = tiny_model("llama", num_key_value_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 30))
    dense = model.generate(ids, max_new_tokens=12, do_sample=False)
    _compiled(model, method="none", lorc=1e-4, lorc_basis="weights")        # every rank full: the basis is a rotation
    try:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, dense)
        keys = out.past_key_values.layers[0].keys
        assert type(keys).__name__ == "CompressedKV" and keys.store.logical == (kv_heads, 16)
        assert keys.store.buffer.shape[1:] == (1, keys.store.buffer.shape[2], 16 * kv_heads)
    finally:
        _uncompile(model)


def test_left_padded_batch_keeps_each_rows_positions():
    """Rows of a left-padded batch start at different cache indices; the
    rebuilt K is rotated at each row's own positions."""
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (2, 24))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    _compiled(model, method="none", lorc=1e-4, lorc_basis="weights")
    try:
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), dense)
    finally:
        _uncompile(model)


@pytest.mark.parametrize("sinks", [4, 0])
@pytest.mark.parametrize("codec", [{"method": "none"}, {"method": "gear", "bits": 4}], ids=["exact", "gear4"])
def test_compiled_lorc_is_the_benchmarks_latent_cache(codec, sinks):
    """benchmarks/lorc.py's eager latent cache and the compiled graph agree,
    so the benchmark's figures are the backend's. The benchmark rebuilds V
    with its sink rows exact; the graph adds the sinks' residuals through
    their attention probabilities: the same V."""
    import lorc as bench
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 50))
    method = bench.LoRCMethod("x", 0.5, gear=None if codec["method"] == "none" else "GEAR-4", sinks=sinks)
    method.setup(model)
    try:
        sim = _logits(model, method, ids)
    finally:
        method.teardown(model)
    dense = _logits(model, None, ids)
    _compiled(model, lorc=0.5, lorc_sinks=sinks, lorc_basis="weights", **codec)
    try:
        compiled = _logits(model, None, ids)
    finally:
        _uncompile(model)
    assert torch.allclose(compiled, sim, atol=1e-5)
    assert not torch.allclose(compiled, dense, atol=1e-3)


def test_the_first_tokens_are_kept_exact_and_cropped_with_the_cache():
    """A LoRC store's sinks are the prompt's first K (before RoPE) and V as
    the projections computed them; a prompt shorter than lorc_sinks keeps
    all of it; cropping below the sinks drops those past the crop."""
    model = tiny_model("llama")
    seen = {}
    hooks = [proj.register_forward_hook(lambda m, a, out, n=name: seen.setdefault(n, out.detach().clone()))
             for name, proj in (("k", model.model.layers[1].self_attn.k_proj),
                                ("v", model.model.layers[1].self_attn.v_proj))]
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        model(ids)                                         # eager: the projections' outputs
    for h in hooks:
        h.remove()
    _compiled(model, method="gear", bits=4, lorc=0.6, lorc_basis="weights")
    try:
        cache = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True).past_key_values
        short = model.generate(ids[:, :2], max_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True).past_key_values
    finally:
        _uncompile(model)
    layer = cache.layers[1]
    for kind, store in (("k", layer.keys.store), ("v", layer.values.store)):
        assert store.lorc_sinks.shape == (2, 2, 4, 16)
        exact = seen[kind][:, :4].unflatten(-1, (2, 16)).transpose(1, 2)
        assert torch.allclose(store.lorc_sinks, exact, rtol=0, atol=1e-6)
    assert short.layers[1].keys.store.lorc_sinks.shape[2] == 2
    before = layer.values.store.lorc_sinks
    cache.crop(3 - cache.get_seq_length())                 # keep 3 tokens
    assert cache.layers[1].keys.store.lorc_sinks.shape[2] == 3 and cache.get_seq_length() == 3
    assert torch.equal(cache.layers[1].values.store.lorc_sinks, before[:, :, :3])


def test_lorc_cuts_kv_bytes_by_the_ranks_and_explain_reports_them():
    import gear_compile
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(0, 256, (1, 40))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    _compiled(model, method="none")
    try:
        exact = gear_compile.kv_bytes(model.generate(ids, max_new_tokens=3, do_sample=False,
                                                     return_dict_in_generate=True).past_key_values)
    finally:
        _uncompile(model)
    _compiled(model, method="none", lorc=0.5, lorc_basis="weights")
    try:
        cache = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True).past_key_values
    finally:
        _uncompile(model)
    kappas = {kind: [lorc.condition_number(getattr(layer.self_attn, f"{kind}_proj").weight)
                     for layer in model.model.layers] for kind in "kv"}
    ranks = {kind: lorc.layer_ranks(kappas[kind], 0.5, 32) for kind in "kv"}
    assert ranks["k"][0] > ranks["k"][-1]                    # progressive
    held = [cache.layers[i].keys.store.buffer.shape[-1] for i in range(4)]
    assert held == ranks["k"]
    lengths_bytes = 4 * 2 * 3 * 8
    sinks_bytes = 4 * 2 * (2 * 4 * 16) * 4             # layers x K/V x (heads x sinks x head dim) x fp32
    assert gear_compile.kv_breakdown(cache).kinds["exact sinks"] == sinks_bytes
    expected = (sum(ranks["k"]) + sum(ranks["v"])) / (2 * 4 * 32)
    held = gear_compile.kv_bytes(cache) - lengths_bytes - sinks_bytes
    assert abs(held / (exact - lengths_bytes) - expected) < 0.01
    assert gear_compile.kv_bytes(out.past_key_values) > 0
    report = gear_compile.explain(model, ids, method="none", lorc=0.5, lorc_basis="weights")
    decode = [s for s in report.sites if s.phase == "decode"]
    for site, rk, rv in zip(decode, ranks["k"], ranks["v"]):
        assert f"LoRC ranks K {rk} / V {rv} of 32" in site.reason


def test_a_model_lorc_cannot_read_is_reported_and_left_exact():
    """gpt2 projects q, k and v with one Conv1D (addmm): no K/V linear to factor."""
    import gear_compile
    model = tiny_model("gpt2")
    ids = torch.randint(0, 256, (1, 20))
    dense = model.generate(ids, max_new_tokens=8, do_sample=False)
    report = gear_compile.explain(model, ids, method="none", lorc=0.5, lorc_basis="weights")
    assert report.sites and all("LoRC not applied: " in s.reason for s in report.sites if s.rewritten)
    _compiled(model, method="none", lorc=0.5, lorc_basis="weights")
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), dense)
    finally:
        _uncompile(model)


def test_beam_search_keeps_the_latent_cache():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 24))
    dense = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    _compiled(model, method="none", lorc=1e-4, lorc_basis="weights")
    try:
        out = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, dense)
        assert type(out.past_key_values.layers[0].keys).__name__ == "CompressedKV"
    finally:
        _uncompile(model)


def test_lorc_options_are_validated():
    from gear_compile import GearConfig
    with pytest.raises(ValueError, match=r"lorc must be a number in \[0, 1\).*got 1.5"):
        GearConfig(lorc=1.5)
    with pytest.raises(ValueError, match=r"lorc_schedule must be one of \['auto', 'calibrated', 'progressive', "
                                         r"'uniform'\], got 'linear'"):
        GearConfig(lorc_schedule="linear")
    with pytest.raises(ValueError, match=r"lorc_sinks must be an integer >= 0, got -1"):
        GearConfig(lorc=0.5, lorc_sinks=-1)
    assert GearConfig(method="kivi", bits=2, group_size=32, lorc=0.3).rank_unit == 32


def test_calibration_reaches_the_compiled_factors():
    """`lorc.calibrate` records the K/V projections' input and gradient
    moments; the pass then plans loss-aware (the "auto" schedule turns
    calibrated), as the benchmark does."""
    import gear_compile
    import lorc as bench
    model = tiny_model("llama")
    text, ids = torch.randint(0, 256, (1, 300)), torch.randint(0, 256, (2, 50))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        assert lorc.calibrate(model, text) == 4                       # 2 layers x (k_proj, v_proj)
        assert all(torch.equal(p, before[n]) and p.requires_grad and p.grad is None
                   for n, p in model.named_parameters())
        for pair in bench.kv_projections(model):
            for proj in pair:
                assert lorc.MOMENTS[proj.weight].shape == (64, 64)
                assert lorc.FISHER[proj.weight].shape == (32, 32) and lorc.FISHER[proj.weight].trace() > 0
        method = bench.LoRCMethod("x", 0.5)
        method.setup(model)
        try:
            sim = _logits(model, method, ids)
        finally:
            method.teardown(model)
        assert method.ranks["schedule"] == "calibrated"
        _compiled(model, method="none", lorc=0.5)
        try:
            compiled = _logits(model, None, ids)
        finally:
            _uncompile(model)
        assert torch.allclose(compiled, sim, atol=1e-5)
        report = gear_compile.explain(model, ids, method="none", lorc=0.5)
        assert all("(calibrated schedule, 4 exact sinks)" in s.reason for s in report.sites if s.rewritten)
    finally:
        lorc.MOMENTS.clear()
        lorc.FISHER.clear()
    with pytest.raises(ValueError, match=r"not been calibrated: run gear_compile.lorc.calibrate\(model, "
                                         r"input_ids\) first.*2,048 tokens.*lorc_basis='weights'"):
        _compiled(model, method="none", lorc=0.5)                 # uncalibrated: refused before compiling
    with pytest.raises(Exception, match=r"not been calibrated"):  # torch.compile's route: at the first call
        model.forward = torch.compile(model.forward, backend="gear", options={"method": "none", "lorc": 0.5})
        _logits(model, None, ids)
    _uncompile(model)
    _compiled(model, method="none", lorc=0.5, lorc_basis="weights")   # asked for by name: the weights' factors
    try:
        assert not torch.allclose(_logits(model, None, ids), sim, atol=1e-4)
    finally:
        _uncompile(model)
    with pytest.raises(ValueError, match=r"no torch.nn.Linear named \['qkv'\]"):
        lorc.calibrate(model, text, names=("qkv",))


def test_two_models_with_different_ranks_in_one_process():
    """The second model's decode graph sees stores of other ranks through the
    same code: Dynamo makes the rank a symbol, and the plan reads it as the
    int it is (a SymInt used to reach the factor cache and fail)."""
    first, second = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (1, 20))
    try:
        for model, removed in ((first, 0.5), (second, 0.25)):
            import gear_compile
            gear_compile.compile(model, inductor=False, method="none", lorc=removed, lorc_basis="weights")
            cache = model.generate(ids, max_new_tokens=4, do_sample=False,
                                   return_dict_in_generate=True).past_key_values
            ranks = [layer.keys.store.buffer.shape[-1] for layer in cache.layers]
            assert sum(ranks) == 32 * (1 - removed) * len(ranks)
    finally:
        for model in (first, second):
            model.__dict__.pop("forward", None)
        torch._dynamo.reset()


# ---------------------------------------------------------------- the fused rebuild
def _both_paths(monkeypatch, model, run, **options):
    """run(model) under the fused kernel and under the replay path (K rebuilt
    in torch over the whole past), same options."""
    from gear_compile.passes import lorc_fused
    out = []
    for fused in (True, False):
        monkeypatch.setattr(lorc_fused, "FUSED", fused)
        _compiled(model, **options)
        try:
            out.append(run(model))
        finally:
            _uncompile(model)
    return out


CODECS = [{"method": "none"}, {"method": "gear", "bits": 4}]


@pytest.mark.parametrize("codec", CODECS, ids=["exact", "gear4"])
def test_fused_rebuild_equals_replay_with_left_padding(monkeypatch, codec):
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (3, 40))
    mask = torch.ones_like(ids)
    ids[0, :6], mask[0, :6] = 0, 0
    ids[2, :3], mask[2, :3] = 0, 0

    def run(m):
        out = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores, 1)

    (seq_f, sc_f), (seq_r, sc_r) = _both_paths(monkeypatch, model, run, lorc=0.5, lorc_basis="weights", **codec)
    assert torch.equal(seq_f, seq_r)
    assert torch.allclose(sc_f, sc_r, atol=1e-4, rtol=0), (sc_f - sc_r).abs().max()


def test_fused_rebuild_equals_replay_under_beam_search(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 30))

    def run(m):
        out = m.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
        return out.sequences, out.sequences_scores

    (seq_f, s_f), (seq_r, s_r) = _both_paths(monkeypatch, model, run, method="gear", bits=4, lorc=0.5,
                                             lorc_basis="weights")
    assert torch.equal(seq_f, seq_r) and torch.allclose(s_f, s_r, atol=1e-5)


def test_fused_rebuild_equals_replay_after_a_crop(monkeypatch):
    """Decode, crop the cache below where it was (a speculative decoder's
    rollback, here into the exact sinks' range too), decode on."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 60))

    def run(m):
        logits, cache = decode_logits(m, ids=ids[:, :30], tokens=ids[:, 30:38])
        cache.crop(33 - cache.get_seq_length())
        more, _ = decode_logits(m, ids=ids[:, 33:34], tokens=ids[:, 34:44], cache=cache)
        cache.crop(3 - cache.get_seq_length())
        last, _ = decode_logits(m, ids=ids[:, 3:4], tokens=ids[:, 4:10], cache=cache)
        return torch.cat([logits, more, last], 1)

    fused, replay = _both_paths(monkeypatch, model, run, method="gear", bits=4, lorc=0.5, lorc_basis="weights")
    assert torch.allclose(fused, replay, atol=1e-4, rtol=0), (fused - replay).abs().max()


def _decode_aten_graph(monkeypatch, **options):
    from torch._functorch.aot_autograd import aot_module_simplified

    import gear_compile
    from gear_compile import backend
    codes = []

    def capture(gm, example_inputs):
        codes.append(gm.code)
        return gm

    monkeypatch.setattr(backend, "_lower", lambda gm, inputs, *rest: aot_module_simplified(
        gm, inputs, fw_compiler=capture))
    model = tiny_model("llama")
    try:
        decode_logits(gear_compile.compile(model, **options), steps=2)
    finally:
        _uncompile(model)
    return [c for c in codes if "lorc_attention_cpu" in c or "gear.decompress" in c]


@pytest.mark.parametrize("codec", CODECS, ids=["exact", "gear4"])
def test_the_decode_graph_never_decompresses_the_latent_store(monkeypatch, codec):
    (code,) = _decode_aten_graph(monkeypatch, lorc=0.5, lorc_basis="weights", **codec)
    assert code.count("torch.ops.gear.lorc_attention_cpu.default") == 2        # one per layer
    assert "gear.decompress" not in code
    # the RoPE tables of the past are computed once and shared by the layers
    assert code.count("torch.ops.aten.cos.default") == 2                      # the new token's, the past's


def test_the_replayed_decode_graph_decompresses_the_latent_store(monkeypatch):
    """The counterpart of the test above, so the op name it looks for is the
    one the graph would hold: the replay path (kernel="torch") reads each
    layer's K and V latent stores back densely with gear::decompress."""
    (code,) = _decode_aten_graph(monkeypatch, method="gear", bits=4, lorc=0.5, lorc_basis="weights",
                                 kernel="torch")
    assert "lorc_attention_cpu" not in code
    assert code.count("torch.ops.gear.decompress.default") == 4               # K and V, two layers


def test_explain_reports_which_path_rebuilds_k():
    import gear_compile
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 30))
    for kernel, said in (("auto", "LoRC K rebuilt inside the attention kernel"),
                         ("torch", "LoRC K rebuilt by replay (decompress, U^T, RoPE over the past): kernel='torch'")):
        report = gear_compile.explain(model, ids, method="gear", bits=4, lorc=0.5, lorc_basis="weights",
                                      kernel=kernel)
        decode = [s for s in report.sites if s.phase == "decode"]
        assert decode and all(said in s.reason for s in decode), [s.reason for s in decode]
