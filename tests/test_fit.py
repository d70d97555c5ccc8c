"""Fitting on real data (Chinchilla, Clark et al. 2022), synthetic recovery, intervals, Fit JSON."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA
from moe_scaling.laws.errors import FitError, NoSamplesError
from moe_scaling.laws.fit import Fit, fit_law, load_fit, select_law
from moe_scaling.laws.published import published_fit
from moe_scaling.laws.noise import MIN_FAMILY_DOF, percentile_mc_se, pooled_seed_sd
from moe_scaling.laws.tables import canonical_table, holdout_mask
from moe_scaling.laws.registry import LAWS

# Besiroglu, Erdil, Barnett, You 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102),
# as recorded in ../shared/data/chinchilla/README.md: the grid fit (Hoffmann grid, L-BFGS, Huber 1e-3)
EPOCH_GRID_FIT = dict(A=477.8, B=2143.0, E=1.817, alpha=0.3473, beta=0.3672)
# ... and the bootstrap 95% intervals of their headline fit (repository notebook outputs, 4,000
# resamples; the paper reports the same numbers rounded), same README.
EPOCH_95 = dict(A=(285.0, 744.0), B=(1042.0, 5810.0), E=(1.769, 1.871), alpha=(0.317, 0.373), beta=(0.331, 0.415))


@pytest.fixture(scope="module")
def chinchilla_table():
    raw = pd.read_csv(SHARED_DATA / "chinchilla" / "svg_extracted_data.csv")
    return canonical_table(raw, {"params_active": "Model Size", "train_compute": "Training FLOP"})


# Bootstrap resamples of the Chinchilla refit. An interval endpoint is a percentile of this many
# draws, with Monte Carlo error ~ 1 / sqrt(BOOTSTRAP) (measured: 0.0044 on beta's 97.5th percentile at
# 1,000, ~0.01 at 200, where CPUs with and without AVX-512 landed 0.0154 and 0.014 from Epoch's).
BOOTSTRAP = 1000
EPOCH_BOOTSTRAP = 4000


@pytest.fixture(scope="module")
def chinchilla_fit(chinchilla_table):
    # the grid alone (no reference start), 240 points after dropping the 5 highest losses, D = C / 6N
    return fit_law("chinchilla", chinchilla_table, drop_highest_loss=5, bootstrap=BOOTSTRAP, kfold=0,
                   starts=LAWS["chinchilla"].start_grid(), keep_samples=BOOTSTRAP)


def sampling_sd(fit, name: str) -> float:
    """A coefficient's sampling uncertainty on its data, robustly: the width of its 95% bootstrap
    interval over 2 x 1.96 (the sd for a normal; the draws have heavy tails, where some resamples
    land far off, so their plain sd is no scale: B's is 2e9)."""
    lo, hi = fit.intervals[name]
    return (hi - lo) / (2 * 1.96)


def test_chinchilla_reproduces_the_epoch_grid_fit(chinchilla_fit):
    """The full-data optimum is deterministic up to the optimiser's convergence, so it is compared with
    Epoch's grid fit on a scale that does not come from any one machine's output: each coefficient's
    sampling uncertainty on these 240 runs (:func:`sampling_sd`). Two fits of the same data by the
    same criterion agree to a small fraction of it; 0.1 of it is E 0.0028, alpha 0.0015, beta 0.0022,
    A 11, B 125, while a fit that landed on another optimum, or used another data selection, moves
    by about one. Measured: E 2.6e-4 off, A 0.09, B 1.7, alpha 2e-5, beta 3e-6."""
    f = chinchilla_fit
    assert f.n_points == 240 and f.settings["n_starts"] == 4500
    for name, want in EPOCH_GRID_FIT.items():
        assert abs(f.params[name] - want) <= 0.1 * sampling_sd(f, name), (name, f.params[name], want)


def test_chinchilla_cold_bootstrap_intervals_match_epochs(chinchilla_fit):
    """Every bootstrap refit starts cold (a subset of the grid, never the full-data optimum); the
    95% intervals then land on Epoch's own 4,000-resample intervals within Monte Carlo error.

    Each endpoint is a percentile of finitely many resamples, so it moves with the draws (another
    seed) and with the last bits of the refits (a CPU with AVX-512 against one with AVX2 only: the
    same seed's refits land on slightly different optima). Its standard error ``se`` is read off our
    own draws (:func:`percentile_mc_se`, order statistics); Epoch's endpoint, a percentile of 4,000
    resamples of the same statistic, has ``se * sqrt(1000 / 4000)`` by the same ``1 / sqrt(n)`` law.
    Two estimates of one quantity agree when ``|ours - epoch| <= 4 sqrt(se^2 + se_epoch^2)``: a 4-sigma
    band, false alarm 6e-5 per endpoint (6e-4 over the ten). Measured at 1,000 resamples (AVX-512):
    the largest |z| is 1.7 (A's upper endpoint); at the old 200 resamples and a fixed 0.015 band,
    beta's 97.5th percentile (0.430 against 0.415) failed on AVX-512 and passed on AVX2."""
    f = chinchilla_fit
    assert f.interval_level == 0.95 and f.metrics["bootstrap_ok"] == BOOTSTRAP and f.settings["bootstrap_starts"] == 16
    assert f.samples.shape == (BOOTSTRAP, 5)
    for i, name in enumerate(LAWS["chinchilla"].params):
        for end, q in ((0, 2.5), (1, 97.5)):
            se = percentile_mc_se(f.samples[:, i], q)
            se_epoch = se * np.sqrt(BOOTSTRAP / EPOCH_BOOTSTRAP)
            ours, theirs = f.intervals[name][end], EPOCH_95[name][end]
            assert ours == pytest.approx(np.percentile(f.samples[:, i], q), rel=1e-12)
            assert abs(ours - theirs) <= 4 * np.hypot(se, se_epoch), (name, q, ours, theirs, se)
    assert f.metrics["heldout_rmse"] > 0 and f.metrics["heldout_n"] == 48


def test_percentile_mc_se_is_the_spread_of_the_percentile_over_redraws():
    """The standard error of a percentile, read off one sample, against the real spread of that
    percentile over 400 independent samples of n normal draws. An sd estimated from 400 replicates has
    relative sd 1 / sqrt(2 x 400) = 3.5%, so 4 of those (14%) bound the ratio at n = 1,000, plus the
    estimator's small upward bias in the tails (documented: ~6%). With few tail draws (n = 200) it
    errs wide on average; where the ranks run past the sample (n = 50, 97.5th) it says inf."""
    rng = np.random.default_rng(0)
    for n, q in ((1000, 2.5), (1000, 50.0), (1000, 97.5), (200, 2.5)):
        draws = rng.standard_normal((400, n))
        actual = np.percentile(draws, q, axis=1).std(ddof=1)
        estimated = np.mean([percentile_mc_se(d, q) for d in draws])
        if n == 1000:
            assert 1 - 0.14 <= estimated / actual <= 1 + 0.14 + 0.06, (n, q, estimated, actual)
        else:
            assert estimated >= actual, (n, q, estimated, actual)
    assert percentile_mc_se(rng.standard_normal(50), 97.5) == np.inf
    with pytest.raises(FitError, match="at least 2 draws"):
        percentile_mc_se(np.array([1.0]), 50.0)


def test_shipped_chinchilla_refit_matches(chinchilla_fit):
    shipped = load_fit(REPO / "fits" / "chinchilla_epoch.json")
    assert shipped.n_points == 240 and shipped.settings["drop_highest_loss"] == 5
    for name, value in chinchilla_fit.params.items():   # same scale as the Epoch comparison above
        assert abs(shipped.params[name] - value) <= 0.1 * sampling_sd(chinchilla_fit, name), name
    assert shipped.samples.shape == (200, 5)


@pytest.fixture(scope="module")
def clark_s_base():
    runs = pd.read_csv(SHARED_DATA / "clark2022_routing" / "curves.csv.gz")
    final = runs[runs["step"] == runs.groupby("hyper_id")["step"].transform("max")]
    s = final[(final["router_type"] == "S-Base") & (final["k"] == 1) & (final["routing_frequency"] == 0.5)]
    return pd.DataFrame({"loss": s["loss_validation"].to_numpy(), "params_active": s["dense_parameter_count"].to_numpy(),
                         "expansion": s["num_experts"].to_numpy(float)})


@pytest.fixture(scope="module")
def clark_auto(clark_s_base):
    """``--law auto`` on Clark et al.'s S-Base runs as a new user would fit them (tokens = 1.3e11, the
    paper's training length), the largest size (1.3B, 9 runs) held out."""
    table = clark_s_base.assign(tokens=1.3e11)
    return select_law(table, bootstrap=20, kfold=0, heldout_by="params_active", heldout_frac=0.1)


def test_clark_held_out_1_3b_beside_the_published_in_sample_error(clark_s_base, clark_auto):
    """The published S-Base coefficients, fitted on all runs, miss the 1.3B runs by RMSE 0.0107 (in
    sample). Fitted without them, auto's law predicts them at RMSE 0.0143 (saturating); the clark form
    alone misses by 0.039. The 0.0107 target is not reached: see the README's Results.

    Tolerances: the published RMSE is computed in float64 NumPy from coefficients printed to 3-4
    digits; 5e-4 is the last printed digit of "0.021"-style figures, far above float round-off. The
    two fitted RMSEs are optima of multi-start fits: their spread over the random starts' seed (0-3)
    is below 1e-5 for saturating and clark (joint_moe, with a flat direction, 3e-4), the same under
    --xla_cpu_max_isa=AVX2; 1e-3 and 2e-3 are 5% of each value, a change of the optimum found, not of
    its last bits."""
    big = (clark_s_base["params_active"] > 1e9).to_numpy()
    published = published_fit("clark", LAWS["clark"].reference, "Clark et al. 2022 Table 3, S-Base")
    pub_1_3b = float(np.sqrt(np.mean((published.predict(clark_s_base[big]) - clark_s_base["loss"][big]) ** 2)))
    fit, report = clark_auto
    scored = {r["law"]: r["heldout_rmse"] for r in report if "skipped" not in r}
    assert big.sum() == 9 and pub_1_3b == pytest.approx(0.0107, abs=5e-4)
    assert fit.metrics["heldout_n"] == 9 and fit.metrics["heldout_rule"] == "largest params_active"
    assert fit.law == "saturating" and fit.metrics["heldout_rmse"] == pytest.approx(0.0143, abs=1e-3)
    assert scored["clark"] == pytest.approx(0.039, abs=2e-3)
    print(f"\nClark S-Base, 1.3B held out: auto ({fit.law}) {fit.metrics['heldout_rmse']:.4f} vs published "
          f"in-sample {pub_1_3b:.4f}; " + ", ".join(f"{k} {v:.4f}" for k, v in scored.items()))


def _grid(**axes):
    rows = list(itertools.product(*axes.values()))
    return {k: np.array([r[i] for r in rows], float) for i, k in enumerate(axes)}


N, D = np.geomspace(3e7, 1e9, 5), np.geomspace(1e9, 1e11, 4)
_JOINT_TRUE = dict(a=60.0, alpha=-0.22, delta=-0.15, gamma=0.005, b=20.0, beta=-0.15, omega=0.3, zeta=-0.015,
                   E_start=3.0, E_max=150.0, c=1.6)
# Each law's data are drawn from coefficients away from its reference values (which are never a start)
SYNTHETIC = {
    "chinchilla": (_grid(params_active=np.geomspace(3e7, 1e9, 6), tokens=np.geomspace(1e9, 1e11, 5)),
                   dict(E=2.3, A=900.0, B=600.0, alpha=0.42, beta=0.3)),
    "krajewski": (_grid(params_total=N * 4, params_embedding=[1e6], tokens=D, granularity=[1, 2, 4, 8, 16]),
                  dict(a=30.0, alpha=0.15, b=15.0, beta=0.12, g=4.0, gamma=0.8, c=0.9)),
    "joint_moe": (_grid(params_active=N, params_embedding=[1e6], tokens=D, expansion=[1, 2, 4, 8, 16, 32, 64]), _JOINT_TRUE),
    "clark": (_grid(params_active=np.geomspace(1e7, 1.3e9, 6), expansion=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512]),
              dict(a=-0.07, b=-0.09, c=0.006, d=1.0, E_start=2.5, E_max=200.0)),
    "saturating": (_grid(params_active=N, params_embedding=[1e6], tokens=D, expansion=[1, 2, 4, 8, 16, 32, 64]),
                   dict(c=1.6, A=50.0, alpha=0.2, delta=0.1, B=300.0, beta=0.25, E_start=2.5, E_max=200.0)),
    "ondevice": (_grid(params_active=np.geomspace(3e7, 1e9, 4), params_embedding=[1e6], tokens=np.geomspace(1e9, 1e11, 3),
                       expansion=[1, 2, 8, 32, 64], granularity=[1, 4], n_shared=[0, 1]),
                 dict(_JOINT_TRUE, g=0.3, eta=0.8, sigma=0.1)),
}


def test_fits_start_from_the_grid_and_random_draws_never_the_reference(monkeypatch):
    """The starts handed to the optimiser: the law's grid plus 32 seeded draws over its range; the
    reference point is not among them."""
    import moe_scaling.laws.fit as fit_module

    seen = []

    def record(problem, starts, W=None, **kw):
        seen.append(np.array(starts))
        raise FitError("recorded")

    monkeypatch.setattr(fit_module, "fit_starts", record)
    law = LAWS["chinchilla"]
    X, true = SYNTHETIC["chinchilla"]
    with pytest.raises(FitError, match="recorded"):
        fit_law(law, {**X, "loss": law.predict(true, X)}, kfold=0)
    starts = seen[0]
    grid = law.start_grid()
    assert starts.shape == (len(grid) + 32, 5)
    ref = law.to_internal(law.reference)
    assert not np.any(np.all(np.isclose(starts, ref, rtol=1e-3, atol=1e-3), axis=1))
    lo, hi = grid.min(axis=0), grid.max(axis=0)
    assert np.all((starts >= lo) & (starts <= hi))


def test_synthetic_truths_are_away_from_the_references():
    for name, (_, true) in SYNTHETIC.items():
        ref = LAWS[name].reference
        assert set(true) == set(ref)
        assert all(true[p] != ref[p] for p in ref), name


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_recovery_and_extrapolation(name):
    """Data drawn from each law (coefficients away from its reference) with 0.3% multiplicative noise
    are fitted back from the grid and random starts; predictions at 3x and 10x the largest sizes lie
    inside the 95% interval of cold-started bootstrap refits. Where the truth falls (printed): 0.48 to
    0.84 of the way up its interval for every law and factor, on an AVX-512 CPU and under
    --xla_cpu_max_isa=AVX2 alike (krajewski moves 0.76 -> 0.72): no endpoint is within reach of the
    last-bit differences between CPUs, which move these endpoints by ~1% of the width."""
    law = LAWS[name]
    X, true = SYNTHETIC[name]
    rng = np.random.default_rng(1)
    loss = law.predict(true, X) * np.exp(rng.normal(0.0, 0.003, X[law.inputs[0]].size))
    f = fit_law(name, {**X, "loss": loss}, bootstrap=64, kfold=0, heldout_frac=0.0, seed=1)
    assert not f.fixed, f.notes
    assert f.metrics["rmse"] < 2 * 0.003 * loss.mean()      # the drawn noise is 0.3% of the loss
    # every coefficient's interval is cut by the data, not a bound; but saturating's E_max (200) lies
    # beyond the largest expansion drawn (64): measured, 5 of its 64 refits end on the 1e6 bound, so
    # its interval's upper end is there or near (a binomial count, not asserted either way)
    assert set(f.metrics["intervals_at_bounds"]) <= ({"E_max"} if name == "saturating" else set()), f.intervals
    sizes = [c for c in ("params_active", "params_total", "tokens") if c in X]
    for factor in (3.0, 10.0):
        Xe = {k: v[-1:] * (factor if k in sizes else 1.0) for k, v in X.items()}
        lo, hi = f.predict_interval(Xe, level=0.95)
        truth = law.predict(true, Xe)
        assert lo[0] <= truth[0] <= hi[0], f"{factor}x: {truth[0]} not in [{lo[0]}, {hi[0]}]"
        print(f"\n{name} {factor}x: truth at {(truth[0] - lo[0]) / (hi[0] - lo[0]):.2f} of the 95% interval")
        assert hi[0] - lo[0] < 0.05 * truth[0]          # informative: 16x the 0.3% noise of one run


@pytest.fixture(scope="module")
def small_fit():
    """A quick chinchilla fit on 40 synthetic runs, three of them broken (NaN / inf)."""
    X = _grid(params_active=np.geomspace(3e7, 1e9, 8), tokens=np.geomspace(1e9, 1e11, 5))
    loss = LAWS["chinchilla"].predict(LAWS["chinchilla"].reference, X)
    loss *= np.exp(np.random.default_rng(2).normal(0.0, 0.003, loss.size))
    loss[[3, 7]], X["tokens"][11] = np.nan, np.inf
    return fit_law("chinchilla", {**X, "loss": loss}, bootstrap=40, kfold=5, seed=3)


def test_nan_rows_dropped_and_counted(small_fit):
    assert small_fit.n_points == 37
    assert any("dropped 3 rows with NaN/inf" in n for n in small_fit.notes)
    assert small_fit.metrics["kfold_rmse"] > 0 and small_fit.metrics["heldout_rmse"] > 0


def test_fit_json_round_trip(small_fit, tmp_path):
    path = tmp_path / "fit.json"
    small_fit.save(path)
    back = load_fit(path)
    X = {"params_active": np.array([1e8, 1e10]), "tokens": np.array([1e10, 1e12]), "expansion": np.ones(2)}
    np.testing.assert_array_equal(back.predict(X), small_fit.predict(X))
    for a, b in zip(back.predict_interval(X), small_fit.predict_interval(X)):
        np.testing.assert_array_equal(a, b)
    assert back.params == small_fit.params and back.intervals == small_fit.intervals
    assert back.data_hash == small_fit.data_hash and back.data_hash.startswith("sha256:")
    d = json.loads(path.read_text())
    for key in ("law", "params", "intervals", "metrics", "n_points", "data_hash", "settings", "notes", "samples"):
        assert key in d
    lo, hi = back.predict_interval(X, level=0.5)
    lo9, hi9 = back.predict_interval(X, level=0.9)
    assert np.all(lo9 <= lo) and np.all(hi <= hi9) and np.all(lo < back.predict(X)) and np.all(back.predict(X) < hi9)


def test_same_seed_same_fit(small_fit):
    X = _grid(params_active=np.geomspace(3e7, 1e9, 8), tokens=np.geomspace(1e9, 1e11, 5))
    loss = LAWS["chinchilla"].predict(LAWS["chinchilla"].reference, X)
    loss *= np.exp(np.random.default_rng(2).normal(0.0, 0.003, loss.size))
    loss[[3, 7]], X["tokens"][11] = np.nan, np.inf
    again = fit_law("chinchilla", {**X, "loss": loss}, bootstrap=40, kfold=5, seed=3)
    assert again.params == small_fit.params and again.intervals == small_fit.intervals


def test_published_fit_has_no_interval():
    f = load_fit(REPO / "fits" / "joint_moe_published.json")
    assert f.source == "published" and not f.has_samples
    X = {"params_active": np.array([1e9 + 2e8]), "params_embedding": np.array([2e8]), "tokens": np.array([2e10]),
         "expansion": np.array([1.0]), "granularity": np.ones(1), "n_shared": np.zeros(1), "params_total": np.ones(1)}
    # hand computation from docs/design.md, section 5: Ehat(1) = E_start = 2.0732, N = 1e9 non-embedding
    lE = np.log(2.0732)
    want = 35.91 * 2.0732 ** -0.2285 * 1e9 ** (-0.1889 + 0.0098 * lE) + 35.98 * 2.0732 ** 0.5529 * 2e10 ** (-0.1775 - 0.0259 * lE) + 1.3637
    assert f.predict(X)[0] == pytest.approx(want, rel=1e-12)
    with pytest.raises(NoSamplesError, match="no bootstrap samples"):
        f.predict_interval(X)


def test_few_points_fix_priors_and_say_so():
    X = _grid(params_active=np.geomspace(3e7, 1e9, 4), tokens=np.geomspace(1e9, 1e11, 3))
    loss = LAWS["chinchilla"].predict(LAWS["chinchilla"].reference, X)
    f = fit_law("chinchilla", {**X, "loss": loss}, bootstrap=0, kfold=0)       # 12 runs, 5 parameters
    assert set(f.fixed) == {"beta", "alpha", "B"} and f.settings["free"] == ["E", "A"]
    assert any("only 12 runs for 5 free parameters" in n for n in f.notes)
    g = fit_law("chinchilla", {**X, "loss": loss}, fix={"alpha": 0.34}, bootstrap=20, kfold=0, points_per_param=2)
    assert g.params["alpha"] == 0.34 and g.intervals["alpha"] == (0.34, 0.34) and g.fixed == {"alpha": 0.34}
    with pytest.raises(FitError, match="too few points"):
        fit_law("chinchilla", {k: v[:4] for k, v in {**X, "loss": loss}.items()})
    with pytest.raises(FitError, match="no parameter 'gamma'"):
        fit_law("chinchilla", {**X, "loss": loss}, fix={"gamma": 1.0})


def test_bad_tables():
    X = _grid(params_active=np.geomspace(3e7, 1e9, 6), tokens=np.geomspace(1e9, 1e11, 5))
    with pytest.raises(FitError, match="constant"):
        fit_law("chinchilla", {**X, "loss": np.full(30, 2.5)})
    with pytest.raises(FitError, match="column 'tokens' missing"):
        fit_law("chinchilla", {"params_active": X["params_active"], "loss": np.linspace(2, 3, 30)})
    with pytest.raises(FitError, match="<= 0"):
        fit_law("chinchilla", {**X, "loss": np.linspace(-1, 3, 30)})


def test_min_steps_drops_the_short_runs_before_fitting():
    """--min-steps: runs of fewer optimizer steps are left out before anything else (counted in
    the notes and recorded in the settings); the fit then equals a fit to the long runs alone. A
    table without a steps column is a one-line error."""
    X = _grid(params_active=np.geomspace(3e7, 1e9, 6), tokens=np.geomspace(1e9, 1e11, 5))
    loss = LAWS["chinchilla"].predict(LAWS["chinchilla"].reference, X)
    steps = (X["tokens"] / 1e7).astype(int)                     # 100 .. 10,000 steps
    short = steps < 1000
    loss = np.where(short, loss + 0.3, loss)                    # short runs: far above the law
    f = fit_law("chinchilla", {**X, "loss": loss, "steps": steps}, bootstrap=0, kfold=0, min_steps=1000)
    long_only = fit_law("chinchilla", {k: v[~short] for k, v in {**X, "loss": loss}.items()}, bootstrap=0, kfold=0)
    assert f.n_points == int((~short).sum()) == 18 and f.settings["min_steps"] == 1000
    assert any(f"dropped {int(short.sum())} runs of fewer than 1000 steps" in n for n in f.notes)
    assert f.params == pytest.approx(long_only.params, rel=1e-9)
    with pytest.raises(FitError, match="no 'steps' column"):
        fit_law("chinchilla", {**X, "loss": loss}, min_steps=10)


def test_holdout_mask_keeps_ties_together():
    v = np.array([1, 5, 3, 5, 2, 4, 5, 1.0])
    np.testing.assert_array_equal(holdout_mask(v, 0.1), v == 5)       # 1 wanted, the three 5s tied
    np.testing.assert_array_equal(holdout_mask(v, 0.5), v >= 4)


def test_select_law_reports_every_candidate(clark_auto):
    fit, report = clark_auto
    laws = {r["law"]: r for r in report}
    assert set(laws) == {n for n, law in LAWS.items() if law.in_auto}
    assert laws["krajewski"]["skipped"] == "no column params_total, granularity"
    assert laws["ondevice"]["skipped"] == "no column granularity, n_shared"
    scored = {n: r["heldout_rmse"] for n, r in laws.items() if "skipped" not in r}
    assert set(scored) == {"chinchilla", "joint_moe", "clark", "saturating"}
    assert fit.law == min(scored, key=scored.get) and fit.interval_level == 0.95
    # chinchilla cannot tell expert counts apart: every routed law with a floor beats it on the held-out 1.3B runs
    assert max(scored["saturating"], scored["joint_moe"]) < scored["chinchilla"]
    assert fit.metrics["candidates"] == report and any("held-out RMSE" in n for n in fit.notes)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a fit JSON"),
    (json.dumps({"format": "other"}), "format must be"),
    (json.dumps({"format": "moe-scaling-fit/1", "law": "kaplan", "params": {}}), "unknown law 'kaplan'"),
    (json.dumps({"format": "moe-scaling-fit/1", "law": "chinchilla", "params": {"E": 1.7}}), "malformed fit JSON"),
])
def test_load_fit_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FitError, match=message):
        load_fit(path)
    with pytest.raises(FitError, match="no such fit file"):
        load_fit(tmp_path / "missing.json")


def test_ondevice_won_held_out_error_on_our_sweep_and_is_an_auto_candidate():
    """fits/sparsity_granularity.json is `moe-fit results/sparsity_granularity` (--law auto, the 13
    largest-compute runs held out): ondevice has the lowest held-out RMSE of every candidate (0.0092;
    chinchilla 0.0156, saturating 0.0158, joint_moe 0.0160), which is what makes it an auto candidate,
    and its granularity coefficient is positive with an interval above 0. The file is read, not
    refitted: 5e-4 is the rounding of the figures quoted here (4 decimals) with room to spare."""
    assert LAWS["ondevice"].in_auto
    fit = load_fit(REPO / "fits" / "sparsity_granularity.json")
    scored = {c["law"]: c["heldout_rmse"] for c in fit.metrics["candidates"] if "skipped" not in c}
    assert set(scored) == {n for n, law in LAWS.items() if law.in_auto}
    assert fit.law == "ondevice" == min(scored, key=scored.get)
    assert scored["ondevice"] == pytest.approx(0.0092, abs=5e-4) and scored["chinchilla"] == pytest.approx(0.0156, abs=5e-4)
    assert fit.params["g"] > 0 and fit.intervals["g"][0] > 0 and fit.settings["bootstrap"] == 200


def test_noise_floor_pools_every_repeat_degree_of_freedom():
    """Runs equal in every configuration column are repeats (they differ in seed); the pooled sd weighs
    each configuration by its n_i - 1, checked against the formula by hand. On the committed isoFLOP
    study, runs of 700+ steps: 0.0178 over 18 configurations (36 dof), the README's 0.018."""
    t = pd.DataFrame({"params_active": [1e6, 1e6, 1e6, 2e6, 2e6, 3e6], "tokens": [1e8] * 6,
                      "loss": [2.0, 2.1, 2.3, 1.9, 1.95, 1.7], "seed": [0, 1, 2, 0, 1, 0]})
    got = pooled_seed_sd(t)
    want = np.sqrt((2 * np.var([2.0, 2.1, 2.3], ddof=1) + 1 * np.var([1.9, 1.95], ddof=1)) / 3)
    assert got == {"noise_floor": pytest.approx(want, rel=1e-12), "noise_floor_dof": 3, "noise_floor_configs": 2,
                   "noise_floor_steps": None, "noise_floor_by_steps": None, "noise_floor_by_family": None}
    # per step regime (0-1000, 1000-3000, ...): each configuration's own pooled sd here
    by = pooled_seed_sd(t.assign(steps=[500, 500, 500, 2000, 2000, 2000]))["noise_floor_by_steps"]
    assert [(b["steps"], b["configs"], b["dof"]) for b in by] == [([0, 1000], 1, 2), ([1000, 3000], 1, 1)]
    assert [b["noise_floor"] for b in by] == pytest.approx([np.std([2.0, 2.1, 2.3], ddof=1),
                                                            np.std([1.9, 1.95], ddof=1)], rel=1e-12)
    # by family: dense (expansion 1) and MoE runs pooled apart (MoE runs scatter more), and every MoE
    # layout (expansion, with or without a shared expert) on its own
    fam = pooled_seed_sd(t.assign(expansion=[1, 1, 1, 4, 4, 4]))["noise_floor_by_family"]
    assert [(b["family"], b["configs"], b["dof"]) for b in fam] == [("dense", 1, 2), ("moe", 1, 1), ("moe x4", 1, 1)]
    assert [b["noise_floor"] for b in fam] == pytest.approx([np.std([2.0, 2.1, 2.3], ddof=1)]
                                                            + 2 * [np.std([1.9, 1.95], ddof=1)], rel=1e-12)
    assert [b["family"] for b in pooled_seed_sd(t.assign(expansion=4))["noise_floor_by_family"]] == ["moe", "moe x4"]
    fam = pooled_seed_sd(t.assign(expansion=[4, 4, 4, 16, 16, 16], n_shared=[1, 1, 1, 0, 0, 0]))["noise_floor_by_family"]
    assert [(b["family"], b["configs"], b["dof"]) for b in fam] == [("moe", 2, 3), ("moe x4 + shared", 1, 2),
                                                                    ("moe x16", 1, 1)]
    assert fam[0]["noise_floor"] == pytest.approx(want, rel=1e-12)
    assert pooled_seed_sd(pd.concat([t, t]))["noise_floor_dof"] == 3         # a run listed twice counts once
    assert pooled_seed_sd(t.drop(columns="seed"))["noise_floor"] is None    # no seeds: nothing says what repeats
    assert pooled_seed_sd(t.assign(lr=[1, 2, 3, 4, 5, 6]))["noise_floor"] is None     # other lr: no repeats
    study = canonical_table(pd.read_parquet(REPO / "results" / "ondevice_isoflop" / "runs.parquet")
                            .rename(columns={"eval_loss": "loss"}))
    long = pooled_seed_sd(study[study["steps"] >= 700])
    assert (long["noise_floor_configs"], long["noise_floor_dof"], long["noise_floor_steps"]) == (18, 36, [769, 3909])
    assert long["noise_floor"] == pytest.approx(0.0178, abs=5e-5)      # float64 NumPy on a committed table


def test_fit_errors_are_also_given_in_noise_floors():
    """Issue 23's yardsticks (in-sample RMSE <= 1.5 floors, held-out <= 2): the fit reports both
    errors over the pooled seed noise floor of its own runs, and moe-fit prints them."""
    from moe_scaling.cli.fit import format_fit, summary

    law = LAWS["chinchilla"]
    truth = dict(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.37)
    N, D = np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e9, 1e11, 4))
    X = {"params_active": np.repeat(N.ravel(), 3), "tokens": np.repeat(D.ravel(), 3)}
    loss = law.predict(truth, X) + np.random.default_rng(3).normal(0.0, 0.01, X["tokens"].size)
    f = fit_law("chinchilla", {**X, "loss": loss, "seed": np.tile([0, 1, 2], 20)}, bootstrap=0, kfold=0)
    m = f.metrics
    assert m["noise_floor_configs"] == 20 and 0.007 < m["noise_floor"] < 0.013      # the drawn sd, 40 dof
    assert m["rmse_over_noise_floor"] == pytest.approx(m["rmse"] / m["noise_floor"], rel=1e-12)
    assert m["heldout_rmse_over_noise_floor"] == pytest.approx(m["heldout_rmse"] / m["noise_floor"], rel=1e-12)
    assert f"rmse {m['rmse_over_noise_floor']:.2g}x the floor, held-out" in format_fit(summary(f))


def test_prediction_interval_adds_the_seed_noise_of_a_mean_of_k_runs():
    """The interval for a new run's measured loss mixes the bootstrap samples' predictions with the
    seed noise sigma / sqrt(k): one sample gives exactly p -+ z sigma / sqrt(k); many give a mixture
    whose CDF at the endpoints is the tail (bisection: to 1e-9); seeds=None is the law's own interval;
    a dense and a MoE row each take their family's floor."""
    from scipy.special import ndtr
    from scipy.stats import norm

    law = LAWS["chinchilla"]
    p = dict(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.37)
    X = {"params_active": np.array([1e8, 1e9]), "tokens": np.array([2e9, 2e10])}
    one = Fit(law="chinchilla", params=p, samples=np.array([[p[k] for k in law.params]]),
              metrics={"noise_floor": 0.02})
    lo, hi = one.predict_interval(X, level=0.9, seeds=4)
    centre = law.predict(p, X)
    np.testing.assert_allclose(hi - centre, norm.ppf(0.95) * 0.02 / 2, rtol=1e-9)
    np.testing.assert_allclose(centre - lo, norm.ppf(0.95) * 0.02 / 2, rtol=1e-9)
    rng = np.random.default_rng(0)
    samples = np.array([[p[k] * f for k, f in zip(law.params, row)] for row in 1 + 0.02 * rng.standard_normal((50, 5))])
    fit = Fit(law="chinchilla", params=p, samples=samples, metrics={"noise_floor": 0.02})
    lo, hi = fit.predict_interval(X, level=0.9)
    pred = law.predict(samples, X)
    for end, tail in ((lo, 0.05), (hi, 0.95)):
        np.testing.assert_allclose(ndtr((end - pred) / 0.02).mean(axis=0), tail, atol=1e-9)
    plo, phi = fit.predict_interval(X, level=0.9, seeds=None)
    np.testing.assert_array_equal(plo, np.percentile(pred, 5, axis=0))
    assert np.all(lo < plo) and np.all(phi < hi)                        # noise widens the law's interval
    with pytest.raises(ValueError, match="seeds = 0"):
        fit.predict_interval(X, seeds=0)
    # each row takes its family's floor (dense: expansion 1; MoE otherwise) where the fit has them
    fam = Fit(law="chinchilla", params=p, samples=one.samples, metrics={
        "noise_floor": 0.02, "noise_floor_by_family": [{"family": "dense", "noise_floor": 0.004},
                                                       {"family": "moe", "noise_floor": 0.03}]})
    lo, hi = fam.predict_interval({**X, "expansion": np.array([1.0, 8.0])}, level=0.9, seeds=1)
    np.testing.assert_allclose(hi - centre, norm.ppf(0.95) * np.array([0.004, 0.03]), rtol=1e-9)
    np.testing.assert_allclose(centre - lo, norm.ppf(0.95) * np.array([0.004, 0.03]), rtol=1e-9)
    lo, hi = fam.predict_interval(X, level=0.9, seeds=1)                  # no expansion: the pooled floor
    np.testing.assert_allclose(hi - centre, norm.ppf(0.95) * 0.02, rtol=1e-9)
    # a MoE layout's own floor once it has MIN_FAMILY_DOF dof (x16 here), else every MoE run's (x4 + shared)
    layouts = Fit(law="chinchilla", params=p, samples=one.samples, metrics={
        "noise_floor": 0.02, "noise_floor_by_family": [
            {"family": "dense", "dof": 2, "noise_floor": 0.004}, {"family": "moe", "dof": 40, "noise_floor": 0.03},
            {"family": "moe x16", "dof": MIN_FAMILY_DOF, "noise_floor": 0.05},
            {"family": "moe x4 + shared", "dof": MIN_FAMILY_DOF - 1, "noise_floor": 0.01}]})
    X4 = {k: np.repeat(v, 2) for k, v in X.items()}
    sd = layouts.seed_noise({**X4, "expansion": np.array([1.0, 16.0, 4.0, 4.0]), "n_shared": np.array([0, 0, 1, 0])})
    assert sd.tolist() == [0.004, 0.05, 0.03, 0.03]
    assert layouts.seed_noise({**X, "expansion": np.array([16.0, 16.0])}).tolist() == [0.05, 0.05]   # no n_shared
    assert layouts.seed_noise({**X, "expansion": np.array([np.nan, 16.0])}).tolist() == [0.02, 0.05]  # no family: pooled


def test_published_granularity_factor_is_krajewskis_on_the_joint_laws_parameter_term():
    """The joint law's N term times (g G^-gamma + a) / (g + a) with Krajewski et al.'s published a, g,
    gamma, computed here from the two published forms directly: the N term is the joint prediction
    minus the same law with a -> 0 (its D term and floor). float64 NumPy on both sides (conftest.F64_TOL)."""
    from moe_scaling.laws.published import with_published_granularity

    joint = load_fit(REPO / "fits" / "joint_moe_published.json")
    both = with_published_granularity(joint)
    G = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    X = {"params_active": np.full(5, 3e8), "params_embedding": np.full(5, 2e7), "tokens": np.full(5, 6e9),
         "expansion": np.full(5, 8.0), "granularity": G, "n_shared": np.zeros(5)}
    rest = LAWS["joint_moe"].predict({**joint.params, "a": 1e-300}, X)
    n_term = joint.predict(X) - rest
    k = LAWS["krajewski"].reference
    want = rest + n_term * (k["g"] * G ** -k["gamma"] + k["a"]) / (k["g"] + k["a"])
    np.testing.assert_allclose(both.predict(X), want, rtol=1e-12)
    assert both.predict({**X, "n_shared": np.ones(5)}).tolist() == both.predict(X).tolist()   # no shared term
    assert [t["law"] for t in both.settings["terms"]] == ["joint_moe", "krajewski", None]
    with pytest.raises(FitError, match="goes on a joint_moe fit"):
        with_published_granularity(load_fit(REPO / "fits" / "chinchilla_epoch.json"))


def test_max_train_compute_under_each_rule_and_the_granularity_factor_keeps_bootstrap_samples():
    """max_train_compute by hand (6 N_non-embedding D and 3 F D); a joint fit's bootstrap samples
    travel into the composed ondevice fit column by column, with the factor's fixed values."""
    from moe_scaling.laws.published import with_published_granularity
    from moe_scaling.laws.noise import max_train_compute

    t = pd.DataFrame({"params_active": [1e6, 4e6], "params_embedding": [1e5, 2e5], "tokens": [1e9, 2e8],
                      "flops_per_token_forward": [3e6, 9e6]})
    got = max_train_compute(t)
    assert got["6N"] == pytest.approx(max(6 * 9e5 * 1e9, 6 * 3.8e6 * 2e8), rel=1e-12)
    assert got["3x-forward"] == pytest.approx(max(3 * 3e6 * 1e9, 3 * 9e6 * 2e8), rel=1e-12)
    joint = LAWS["joint_moe"]
    ref = [joint.reference[p] for p in joint.params]
    samples = np.array([ref, [v * 1.01 for v in ref], [v * 0.99 for v in ref]])
    fit = Fit(law="joint_moe", params=dict(joint.reference), samples=samples, metrics={"noise_floor": 0.01})
    both = with_published_granularity(fit)
    law = LAWS["ondevice"]
    cols = {p: both.samples[:, i] for i, p in enumerate(law.params)}
    for i, p in enumerate(joint.params):
        np.testing.assert_array_equal(cols[p], samples[:, i])
    assert np.all(cols["g"] == both.params["g"]) and np.all(cols["sigma"] == 0.0)
    X = {"params_active": np.array([3e8]), "params_embedding": np.array([2e7]), "tokens": np.array([6e9]),
         "expansion": np.array([8.0]), "granularity": np.array([4.0]), "n_shared": np.array([0.0])}
    lo, hi = both.predict_interval(X, level=0.9, seeds=3)
    assert lo[0] < both.predict(X)[0] < hi[0]


def test_intervals_at_bounds_names_the_free_coefficients_whose_interval_a_bound_cuts():
    """An interval endpoint on a bound (internal coordinates: log for scale coefficients) means at
    least (1 - level) / 2 of the refits ended there; fixed coefficients are not named."""
    from moe_scaling.laws.fit import intervals_at_bounds

    law = LAWS["ondevice"]
    iv = {p: (0.9 * v, 1.1 * v) if v > 0 else (1.1 * v, 0.9 * v) for p, v in law.reference.items()}
    iv |= {"g": (0.0, 0.3), "eta": (0.5, 1.5), "sigma": (-0.1, 0.2), "E_max": (200.0, 1e6)}
    free = [i for i, p in enumerate(law.params) if p != "E_max"]
    assert intervals_at_bounds(law, iv, free) == ["g"]
    assert intervals_at_bounds(law, iv, range(len(law.params))) == ["E_max", "g"]
    assert intervals_at_bounds(law, {}, free) == []


def test_layout_effects_recover_the_drawn_granularity_and_shared_gaps():
    """On runs drawn from ``ondevice`` (g = 0.3, eta = 0.8, sigma = 0.1, 0.3% noise), the fit's
    layout effects at the middle size: G* = 4 (the finest drawn), and the true gaps, by hand from the
    law's sum of terms (L = N-term + D-term + c, the N-term scaled by 1 + g (G^-eta - 1) and by
    (1 + n_shared)^-sigma), lie inside their 95% intervals."""
    law = LAWS["ondevice"]
    X, true = SYNTHETIC["ondevice"]
    loss = law.predict(true, X) * np.exp(np.random.default_rng(1).normal(0.0, 0.003, X["params_active"].size))
    f = fit_law("ondevice", {**X, "loss": loss}, bootstrap=64, kfold=0, heldout_frac=0.0, seed=1)
    eff = f.metrics["layout_effects"]
    active = np.unique(X["params_active"])
    assert eff["at"]["params_active"] == active[(len(active) - 1) // 2]
    assert eff["granularities"] == [1.0, 4.0]
    assert [e["expansion"] for e in eff["by_expansion"]] == [2.0, 8.0, 32.0, 64.0]
    at = eff["at"]
    for entry in eff["by_expansion"]:
        e = entry["expansion"]
        one = {k: np.array([v]) for k, v in {**at, "expansion": e, "granularity": 1.0, "n_shared": 0.0}.items()}
        joint = dict(true)
        n_term = LAWS["joint_moe"].predict({p: joint[p] for p in LAWS["joint_moe"].params}, one)[0] \
            - LAWS["joint_moe"].predict({**{p: joint[p] for p in LAWS["joint_moe"].params}, "a": 1e-12}, one)[0]
        factor = 1 + true["g"] * (4.0 ** -true["eta"] - 1)
        g_gap = n_term * (1 - factor)
        s_gap = n_term * factor * (1 - 2.0 ** -true["sigma"])
        assert entry["best_granularity"] == 4.0
        for key, truth in (("granularity", g_gap), ("shared", s_gap)):
            lo, hi = entry[key]["interval"]
            assert lo <= truth <= hi, (e, key, truth, entry[key])
            assert entry[key]["width"] == pytest.approx(hi - lo)
    from moe_scaling.cli.fit import format_fit, summary
    lines = format_fit(summary(f)).splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("layout effects at the middle size"))
    assert lines[i + 1].startswith("  E 2: L(G=1) - L(G=4) +") and "L(no shared) - L(shared) +" in lines[i + 1]
    # drawn without repeated seeds: no noise floor to judge the gaps' widths against, and it says so
    assert not eff["identified"] and eff["unmet"] == [
        "no noise floor (the runs repeat no configuration over seeds): gap widths cannot be judged"]
    assert lines[i + 5] == "  layout not identified: " + eff["unmet"][0]


def test_identification_names_every_unmet_target_of_issue_23_item_2():
    """A fit identifies the layout when no free layout coefficient's interval reaches a bound and
    every gap interval is under 2 noise floors; each failing target is named, a held or non-layout
    coefficient at a bound is not."""
    from moe_scaling.laws.effects import identification

    eff = {"noise_floor": 0.01, "by_expansion": [
        {"expansion": 4.0, "granularity": {"width": 0.015}, "shared": {"width": 0.025}},
        {"expansion": 16.0, "granularity": {"width": 0.0199}, "shared": {"width": 0.001}}]}
    free = ["a", "E_max", "g", "eta", "sigma"]
    assert identification(eff, [], free) == {
        "identified": False, "unmet": ["E 4: the shared gap's interval is 2.50 noise floors wide (at most 2)"]}
    eff["by_expansion"][0]["shared"]["width"] = 0.02                 # exactly 2 floors: not narrower
    assert not identification(eff, [], free)["identified"]
    eff["by_expansion"][0]["shared"]["width"] = 0.019
    assert identification(eff, [], free) == {"identified": True, "unmet": []}
    assert identification(eff, ["E_max", "w"], free)["identified"]   # not a layout term; w is held
    assert identification(eff, ["E_max", "eta"], free)["unmet"] == ["eta's interval reaches its bound"]
    assert identification(eff, None, free)["unmet"] == ["no bootstrap: no intervals to judge (fit with bootstrap > 0)"]
    assert identification({**eff, "noise_floor": None}, [], free)["unmet"] == [
        "no noise floor (the runs repeat no configuration over seeds): gap widths cannot be judged"]
    assert identification(None, [], free)["unmet"] == ["the law reads neither granularity nor the shared expert"]


def test_layout_effects_give_each_granularity_its_expert_width():
    """A law that reads the experts' width (``layout``) is asked about G at the middle size's own FFN
    width: experts d_ff / G wide (d_ff = d_expert x G of that size's runs). With a narrow-expert
    factor the best G is interior, and every predicted loss is the law's at that width."""
    from moe_scaling.laws.effects import layout_effects

    law = LAWS["layout"]
    p = {**LAWS["ondevice"].reference, "g": 0.3, "eta": 1.0, "sigma": 0.0, "w": 16.0, "rho": 1.0, "sigma_d": 0.0}
    d_model = np.repeat([32.0, 64.0, 128.0], 4)
    G = np.tile([1.0, 2.0, 4.0, 8.0], 3)
    cols = {"params_active": 1e3 * d_model ** 2, "params_embedding": 256 * d_model, "tokens": 1e8 * np.ones(12),
            "expansion": np.full(12, 4.0), "granularity": G, "n_shared": np.zeros(12), "d_expert": 4 * d_model / G}
    eff = layout_effects(law, p, None, cols)
    assert eff["at"]["d_ff"] == 256.0                       # the middle size, d_model 64
    (entry,) = eff["by_expansion"]
    for g, loss in entry["predicted_by_granularity"].items():
        row = {**{k: np.array([v]) for k, v in eff["at"].items()}, "expansion": np.array([4.0]),
               "granularity": np.array([float(g)]), "n_shared": np.array([0.0]), "d_expert": np.array([256.0 / float(g)])}
        assert loss == pytest.approx(law.predict(p, row)[0], rel=1e-12)
    assert entry["best_granularity"] in (2.0, 4.0)          # finer helps, then narrow experts cost more


def _layout_study_inputs() -> dict[str, np.ndarray]:
    """The law's inputs of every run of sweeps/layout_isoflop.yaml (360 runs), and their steps."""
    from moe_scaling.costs import param_counts
    from moe_scaling.sweep.runner import plan_sweep

    rows = []
    for r in plan_sweep(REPO / "sweeps" / "layout_isoflop.yaml").runs:
        c = param_counts(r.model)
        rows.append((c.active, c.embedding, r.train.tokens, r.model.expansion, r.model.granularity, r.model.n_shared,
                     r.train.steps(r.data.seq_len), r.train.seed))
    names = ("params_active", "params_embedding", "tokens", "expansion", "granularity", "n_shared", "steps", "seed")
    return dict(zip(names, np.array(rows, float).T))


def test_the_layout_study_design_identifies_granularity_and_the_shared_expert():
    """Issue 23, item 2, checked on the design before its 10 CPU hours: losses drawn from ``ondevice``
    on the 360 runs of sweeps/layout_isoflop.yaml (the joint terms of fits/ondevice_isoflop.json, a
    granularity gain g = 0.15, eta = 1, a shared-expert term sigma = 0.1) with the seed noise the
    committed study measured per step regime (sd 0.035 under 1,000 steps, 0.013 to 3,000, 0.007
    beyond), fitted back with moe-fit's defaults (each bootstrap refit from 16 cold starts and the
    full-data optimum): g, eta and sigma have intervals off their bounds, the best G at the middle
    size is the finest (8) and both layout gaps' 95% intervals hold the truth and are narrower than 2
    pooled noise floors. (From the 16 cold starts alone, a third of the refits sent the parameter
    term to zero, and a gap interval was 12.8 noise floors wide: the refits missed the optimum's
    basin, not the data's uncertainty.)"""
    X = _layout_study_inputs()
    law = LAWS["ondevice"]
    truth = {**load_fit(REPO / "fits" / "ondevice_isoflop.json").params, "g": 0.15, "eta": 1.0, "sigma": 0.1}
    sd = np.select([X["steps"] < 1000, X["steps"] < 3000], [0.035, 0.013], 0.007)
    loss = law.predict(truth, X) + np.random.default_rng(0).normal(0.0, sd)
    f = fit_law("ondevice", {**X, "loss": loss}, bootstrap=40, kfold=0, seed=0)
    # (the coefficients themselves trade against the parameter term's scale: over noise draws 0-3 the
    # truths g = 0.15 and sigma = 0.1 sit at the lower ends of their intervals, once just outside;
    # the gaps, which is what a search uses, hold their truths in all four)
    assert not {"g", "eta", "sigma"} & set(f.metrics["intervals_at_bounds"])
    eff = f.metrics["layout_effects"]
    floor = f.metrics["noise_floor"]
    for entry in eff["by_expansion"]:
        assert entry["best_granularity"] == 8.0
        one = {k: np.array([v]) for k, v in {**eff["at"], "expansion": entry["expansion"], "granularity": 1.0,
                                             "n_shared": 0.0}.items()}
        for key, other in (("granularity", {"granularity": np.array([8.0])}),
                           ("shared", {"granularity": np.array([8.0]), "n_shared": np.array([1.0])})):
            a = {**one, **({} if key == "granularity" else {"granularity": np.array([8.0])})}
            truth_gap = law.predict(truth, a)[0] - law.predict(truth, {**one, **other})[0]
            lo, hi = entry[key]["interval"]
            assert lo <= truth_gap <= hi and hi - lo < 2 * floor, (entry["expansion"], key, truth_gap, entry[key])
    assert eff["identified"] and eff["unmet"] == []
