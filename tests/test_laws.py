"""The scaling-law registry: formulas against hand-written references, coordinates, inputs, Clark's RMSE."""

# Tolerances: the laws are NumPy float64 closed forms, so two forms of one law agree to float64
# round-off (rtol 1e-12, conftest.F64_TOL); 1e-6 where an exponent is evaluated at a huge argument
# (E = 1e9 .. 1e12, tokens 1e60: the saturation's 1 - 1e-9-size terms) and a published RMSE to its
# last printed digit.

import math

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA
from moe_scaling.laws.registry import CANONICAL_COLUMNS, LAWS, LawInputError, get_law

RNG = np.random.default_rng(0)
N = 10 ** RNG.uniform(7, 10, 12)
X = {"params_active": N, "params_total": N * RNG.uniform(1, 8, 12), "params_embedding": N * 0.1,
     "tokens": 10 ** RNG.uniform(9, 12, 12), "expansion": 2.0 ** RNG.integers(0, 8, 12),
     "granularity": 2.0 ** RNG.integers(0, 5, 12), "n_shared": RNG.integers(0, 2, 12).astype(float)}
X["d_expert"] = 2.0 ** RNG.integers(8, 12, 12) / X["granularity"]


def ehat(E, Es, Em):
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / Es - 1.0 / Em)) + 1.0 / Em)


def reference_loss(name, p, X):
    """Each law written out directly from docs/design.md, section 5 (no log-space tricks)."""
    D = X["tokens"]
    if name == "chinchilla":
        return p["E"] + p["A"] / X["params_active"] ** p["alpha"] + p["B"] / D ** p["beta"]
    if name == "krajewski":
        Nt = X["params_total"] - X["params_embedding"]
        return p["c"] + (p["g"] / X["granularity"] ** p["gamma"] + p["a"]) / Nt ** p["alpha"] + p["b"] / D ** p["beta"]
    if name == "clark":
        Eh = ehat(X["expansion"], p["E_start"], p["E_max"])
        lN, lE = np.log10(X["params_active"]), np.log10(Eh)
        return 10 ** (p["a"] * lN + p["b"] * lE + p["c"] * lN * lE + p["d"])
    Eh = ehat(X["expansion"], p["E_start"], p["E_max"])
    Na = X["params_active"] - X["params_embedding"]
    if name == "saturating":
        return p["c"] + p["A"] / (Eh ** p["delta"] * Na ** p["alpha"]) + p["B"] / D ** p["beta"]
    n_term = p["a"] * Eh ** p["delta"] * Na ** (p["alpha"] + p["gamma"] * np.log(Eh))
    d_term = p["b"] * Eh ** p["omega"] * D ** (p["beta"] + p["zeta"] * np.log(Eh))
    if name in ("ondevice", "layout"):
        n_term = n_term * (1 + p["g"] * (X["granularity"] ** -p["eta"] - 1)) * (1 + X["n_shared"]) ** -p["sigma"]
    if name == "layout":
        n_term = n_term * (1 + (p["w"] / X["d_expert"]) ** p["rho"])
        d_term = d_term * (1 + X["n_shared"]) ** -p["sigma_d"]
    return n_term + d_term + p["c"]


@pytest.mark.parametrize("name", list(LAWS))
def test_predict_matches_the_formula(name):
    law = LAWS[name]
    p = dict(law.reference)
    if name in ("ondevice", "layout"):
        p.update(g=0.4, eta=0.8, sigma=0.15)
    if name == "layout":
        p.update(w=30.0, rho=0.7, sigma_d=0.2)
    if name == "saturating":
        p.update(delta=0.2)
    np.testing.assert_allclose(law.predict(p, X), reference_loss(name, p, X), rtol=1e-12)


@pytest.mark.parametrize("name", list(LAWS))
def test_registry_entries_are_consistent(name):
    law = get_law(name)
    assert law.name == name and set(law.inputs) <= set(CANONICAL_COLUMNS)
    lo, hi = law.internal_bounds()
    ref = law.to_internal(law.reference)
    assert np.all(lo <= ref) and np.all(ref <= hi), "reference coefficients lie inside the bounds"
    grid = law.start_grid()
    assert grid.shape[1] == len(law.params) and np.all(np.isfinite(law.predict(law.to_natural(grid[:3]), X)))
    np.testing.assert_allclose(law.to_natural(law.to_internal(law.reference)), list(law.reference.values()))
    assert law.citation and law.formula


def test_chinchilla_grid_is_hoffmanns_4500_starts():
    grid = LAWS["chinchilla"].start_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 1])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]       # log A
    assert sorted(set(grid[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0]                 # alpha


def test_batched_parameters_and_extra_columns():
    law = LAWS["joint_moe"]
    params = np.array([list(law.reference.values())] * 3) * np.array([[1.0], [1.01], [0.99]])
    out = law.predict(params, {**X, "unrelated": np.zeros(12)})
    assert out.shape == (3, 12)
    np.testing.assert_allclose(out[0], law.predict(law.reference, X))


def test_ondevice_nests_joint_moe():
    p = {**LAWS["joint_moe"].reference, "g": 0.0, "eta": 2.0, "sigma": 0.0}
    np.testing.assert_allclose(LAWS["ondevice"].predict(p, X), LAWS["joint_moe"].predict(p, X), rtol=1e-12)
    dense = {**X, "granularity": np.ones(12), "n_shared": np.zeros(12)}
    p.update(g=0.5, sigma=0.3)
    np.testing.assert_allclose(LAWS["ondevice"].predict(p, dense), LAWS["joint_moe"].predict(p, dense), rtol=1e-12)


def test_layout_nests_ondevice_and_penalises_narrow_experts():
    """w -> 0 and sigma_d = 0 is ondevice (to the width factor's (w / d_expert)^rho, here < 1e-9);
    with w > 0 the loss falls as experts widen at a fixed granularity, and a shared expert lowers
    the data term by (1 + n_shared)^-sigma_d."""
    lay, ond = LAWS["layout"], LAWS["ondevice"]
    p = {**ond.reference, "g": 0.4, "eta": 0.8, "sigma": 0.15, "w": 1e-3, "rho": 4.0, "sigma_d": 0.0}
    np.testing.assert_allclose(lay.predict(p, X), ond.predict(p, X), rtol=1e-9)
    p.update(w=64.0, rho=0.5)
    widths = {**X, "d_expert": np.outer([16.0, 64.0, 256.0], np.ones(12))}
    by_width = lay.predict(p, {k: np.broadcast_to(v, (3, 12)) for k, v in widths.items()})
    assert np.all(np.diff(by_width, axis=0) < 0)
    p.update(sigma_d=0.3)
    shared = {**X, "n_shared": np.ones(12)}
    assert np.all(lay.predict(p, shared) < lay.predict({**p, "sigma_d": 0.0}, shared))


def test_ehat_saturates_between_e_start_and_e_max():
    law = LAWS["clark"]
    p = dict(law.reference, a=0.0, c=0.0, d=0.0, b=1.0)          # log10 L = log10 Ehat
    E = np.array([1.0, 1e9])
    got = law.predict(p, {"params_active": np.ones(2), "expansion": E})
    np.testing.assert_allclose(got, [p["E_start"], p["E_max"]], rtol=1e-6)


def test_saturating_nests_chinchilla_and_saturates_in_experts():
    """delta = 0 is Chinchilla on non-embedding active parameters; the parameter term falls by
    Ehat^-delta, from E_start^-delta at E = 1 to E_max^-delta as E grows."""
    sat, chin = LAWS["saturating"], LAWS["chinchilla"]
    p = dict(c=1.7, A=400.0, alpha=0.33, delta=0.0, B=1500.0, beta=0.3, E_start=2.0, E_max=200.0)
    Xc = {**X, "params_active": X["params_active"] - X["params_embedding"]}
    q = dict(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.3)
    np.testing.assert_allclose(sat.predict(p, X), chin.predict(q, Xc), rtol=1e-12)
    p["delta"] = 0.5
    one = {"params_active": np.full(2, 1e9), "params_embedding": np.zeros(2), "tokens": np.full(2, 1e60),
           "expansion": np.array([1.0, 1e12])}
    np.testing.assert_allclose(sat.predict(p, one) - 1.7, 400.0 * 1e9 ** -0.33 * np.array([2.0, 200.0]) ** -0.5,
                               rtol=1e-6)


def test_random_starts_cover_the_grid_range_and_are_seeded():
    law = LAWS["joint_moe"]
    a = law.random_starts(200, np.random.default_rng(5))
    grid = law.start_grid()
    assert a.shape == (200, len(law.params))
    np.testing.assert_array_equal(a, law.random_starts(200, np.random.default_rng(5)))
    assert np.all(a >= grid.min(axis=0)) and np.all(a <= grid.max(axis=0))
    spread = grid.max(axis=0) > grid.min(axis=0)
    assert np.all(a.std(axis=0)[spread] > 0.2 * (grid.max(axis=0) - grid.min(axis=0))[spread])
    assert np.all(a[:, ~spread] == grid[0, ~spread])


def test_missing_inputs():
    with pytest.raises(LawInputError, match="needs column 'tokens'"):
        LAWS["chinchilla"].predict(LAWS["chinchilla"].reference, {"params_active": N})
    with pytest.raises(LawInputError, match="unknown law 'nope'"):
        get_law("nope")
    # params_embedding is optional: absent means the counts are already non-embedding
    law = LAWS["joint_moe"]
    no_emb = {k: v for k, v in X.items() if k != "params_embedding"}
    np.testing.assert_allclose(law.predict(law.reference, no_emb),
                               law.predict(law.reference, {**X, "params_embedding": np.zeros(12)}))


def test_clark_published_s_base_reproduces_rmse_0021():
    """Clark et al. 2022 Table 3 S-Base coefficients on their released runs (final step, k = 1,
    routing frequency 0.5): RMSE 0.021, as the data README records."""
    runs = pd.read_csv(SHARED_DATA / "clark2022_routing" / "curves.csv.gz")
    final = runs[runs["step"] == runs.groupby("hyper_id")["step"].transform("max")]
    s = final[(final["router_type"] == "S-Base") & (final["k"] == 1) & (final["routing_frequency"] == 0.5)]
    law = LAWS["clark"]
    pred = law.predict(law.reference, {"params_active": s["dense_parameter_count"].to_numpy(float),
                                       "expansion": s["num_experts"].to_numpy(float)})
    rmse = math.sqrt(np.mean((pred - s["loss_validation"].to_numpy()) ** 2))
    assert len(s) == 53 and rmse == pytest.approx(0.021, abs=5e-4)      # "0.021": half its last digit
