"""The batched L-BFGS (moe_scaling.laws.lbfgs) on its own: no scaling law anywhere in this file.

Known minima (weighted least squares, solved in closed form), Rosenbrock, bounds and pinned
parameters, agreement with scipy's L-BFGS-B, row weights and masks, more tasks than slots,
failed starts, multi-start, float32 against float64. No start is the answer.

Tolerances follow the solver's own stopping rules: with TIGHT (ftol 1e-15, gtol 1e-10) a float64
minimum is found to ~1e-7 in x on these well-conditioned problems (gradient 1e-10 over curvatures of
order 1e-3 or more) and to float64 round-off in f (1e-10 to 1e-12 relative); no XLA kernel difference
between CPUs reaches those (float64 sums move by ~1e-13).
"""

import numpy as np
import pytest
from scipy.optimize import minimize

from moe_scaling.laws.lbfgs import _BUFFER, NoFiniteStart, Objective, minimize_batch, multi_start

TIGHT = dict(ftol=1e-15, gtol=1e-10)


# Objectives are module-level functions: the compiled kernel is cached per function object.
def quadratic_fit(Q, W, data):
    """Weighted mean squared error of y ~ a + b t + c t^2 (a convex quadratic in Q)."""
    import jax.numpy as jnp
    t = data["t"]
    r = data["y"] - (Q[:, 0:1] + Q[:, 1:2] * t + Q[:, 2:3] * t * t)
    return jnp.sum(W * r * r, -1) / jnp.sum(W, -1)


def exp_decay(Q, W, data):
    """Weighted mean squared error of y ~ a + b exp(-c t) (not convex)."""
    import jax.numpy as jnp
    r = data["y"] - (Q[:, 0:1] + Q[:, 1:2] * jnp.exp(-Q[:, 2:3] * data["t"]))
    return jnp.sum(W * r * r, -1) / jnp.sum(W, -1)


def rosenbrock(Q, W, data):
    """sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2; ignores the (absent) rows."""
    import jax.numpy as jnp
    return jnp.sum(100.0 * (Q[:, 1:] - Q[:, :-1] ** 2) ** 2 + (1.0 - Q[:, :-1]) ** 2, -1)


def tilted_double_well(Q, W, data):
    """(x^2 - 1)^2 + 0.3 x: a local minimum near x = 0.96, the global one near x = -1.04."""
    x = Q[:, 0]
    return (x * x - 1.0) ** 2 + 0.3 * x


def log_barrier(Q, W, data):
    """sum (x - 2)^2 - log(x): NaN for x < 0, minimum at x = 1 + sqrt(1.5)."""
    import jax.numpy as jnp
    return jnp.sum((Q - 2.0) ** 2 - jnp.log(Q), -1)


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(-1.0, 1.0, n)
    y = 0.5 - 1.5 * t + 2.0 * t * t + rng.normal(0.0, 0.1, n)
    return t, y


def _wls(t, y, w):
    """The closed-form minimum of quadratic_fit for weights w."""
    A = np.stack([np.ones_like(t), t, t * t], 1)
    return np.linalg.solve(A.T @ (w[:, None] * A), A.T @ (w * y))


def _quadratic(t, y, lo=-np.inf, hi=np.inf):
    return Objective(quadratic_fit, np.full(3, lo, float), np.full(3, hi, float), {"t": t, "y": y})


def test_batch_of_weighted_quadratics_reaches_the_closed_form_minima():
    # more tasks than float64 slots, so finished slots must be refilled with the next tasks
    t, y = _data()
    rng = np.random.default_rng(1)
    W = rng.integers(0, 4, size=(_BUFFER["float64"] + 36, t.size)).astype(float)
    W[:, :3] = 1.0                                  # every row keeps enough points to be well posed
    W[0] = 1.0
    W[1] = (t < 0.3).astype(float) + (t < -0.5)     # a mask (0: held out) and duplicated rows
    X0 = rng.normal(0.0, 5.0, size=(W.shape[0], 3))
    x, f, nev = minimize_batch(_quadratic(t, y), X0, W, np.arange(W.shape[0]), **TIGHT)
    want = np.stack([_wls(t, y, w) for w in W])
    assert np.abs(X0 - want).min() > 1e-3           # no start is the answer
    np.testing.assert_allclose(x, want, atol=1e-7)
    wf = np.array([np.sum(w * (y - (a + b * t + c * t * t)) ** 2) / w.sum() for w, (a, b, c) in zip(W, want)])
    np.testing.assert_allclose(f, wf, rtol=1e-10)
    assert (nev > 1).all() and (nev < 200).all()


def test_weight_zero_rows_do_not_count():
    t, y = _data()
    w = (np.arange(t.size) % 3 != 0).astype(float)
    y_outliers = np.where(w == 0, 1e3, y)           # what is held out may be anything
    X0 = np.array([[3.0, 3.0, -3.0]])
    x_clean, f_clean, _ = minimize_batch(_quadratic(t, y), X0, w[None], **TIGHT)
    x_dirty, f_dirty, _ = minimize_batch(_quadratic(t, y_outliers), X0, w[None], **TIGHT)
    np.testing.assert_allclose(x_dirty, x_clean, atol=1e-9)
    np.testing.assert_allclose(x_clean[0], _wls(t, y, w), atol=1e-7)
    assert abs(f_dirty[0] - f_clean[0]) <= 1e-12
    # and with all rows the answer differs (the mask matters)
    x_all, _, _ = minimize_batch(_quadratic(t, y), X0, **TIGHT)
    assert np.abs(x_all[0] - x_clean[0]).max() > 1e-3


@pytest.mark.parametrize("x0", [(-1.2, 1.0), (2.0, -1.0), (-2.0, 3.0), (0.5, 2.5)])
def test_rosenbrock_from_several_starts(x0):
    obj = Objective(rosenbrock, np.full(2, -10.0), np.full(2, 10.0))
    x, f, nev = minimize_batch(obj, np.array([x0]), max_evals=5000, **TIGHT)
    np.testing.assert_allclose(x[0], [1.0, 1.0], atol=1e-5)
    assert f[0] < 1e-10 and nev[0] > 10


def test_bounds_clip_starts_and_hold_the_minimum_on_the_boundary():
    t, y = _data()
    free = _wls(t, y, np.ones_like(t))              # about (0.5, -1.5, 2.0)
    lo, hi = np.array([-5.0, -1.0, -5.0]), np.array([5.0, 5.0, 1.0])   # b >= -1 and c <= 1 bind
    obj = Objective(quadratic_fit, lo, hi, {"t": t, "y": y})
    X0 = np.array([[4.0, 4.0, -4.0], [-9.0, 9.0, 9.0]])       # the second starts outside the box
    x, f, _ = minimize_batch(obj, X0, **TIGHT)
    assert free[1] < lo[1] and free[2] > hi[2]
    np.testing.assert_allclose(x[:, 1], lo[1], atol=1e-12)
    np.testing.assert_allclose(x[:, 2], hi[2], atol=1e-12)
    # the free coordinate is the conditional optimum given the two bound ones
    a = np.mean(y - lo[1] * t - hi[2] * t * t)
    np.testing.assert_allclose(x[:, 0], a, atol=1e-7)
    assert np.all((x >= lo) & (x <= hi))


def test_pinned_parameter_stays_and_the_rest_is_optimal():
    t, y = _data()
    lo, hi = np.array([-5.0, 0.25, -5.0]), np.array([5.0, 0.25, 5.0])  # b pinned at 0.25
    x, _, _ = minimize_batch(Objective(quadratic_fit, lo, hi, {"t": t, "y": y}),
                             np.array([[1.0, -3.0, 1.0]]), **TIGHT)
    assert x[0, 1] == 0.25
    A = np.stack([np.ones_like(t), t * t], 1)
    ac = np.linalg.lstsq(A, y - 0.25 * t, rcond=None)[0]
    np.testing.assert_allclose(x[0, [0, 2]], ac, atol=1e-7)


def test_agrees_with_scipy_lbfgsb_on_a_bounded_nonconvex_fit():
    rng = np.random.default_rng(3)
    t = np.linspace(0.0, 3.0, 50)
    y = 0.3 + 2.0 * np.exp(-2.0 * t) + rng.normal(0.0, 0.02, t.size)
    lo, hi = np.array([-1.0, 0.0, 0.1]), np.array([1.0, 5.0, 1.5])    # c <= 1.5 binds (truth 2)
    starts = np.array([[0.0, 1.0, 0.5], [-0.5, 4.0, 1.0], [0.8, 0.5, 0.2]])
    x, f, _ = minimize_batch(Objective(exp_decay, lo, hi, {"t": t, "y": y}), starts, **TIGHT)

    def fun(q):
        e = np.exp(-q[2] * t)
        r = y - (q[0] + q[1] * e)
        g = -2.0 / t.size * np.array([r.sum(), (r * e).sum(), -(r * q[1] * t * e).sum()])
        return np.mean(r * r), g

    for x0, xi, fi in zip(starts, x, f):
        ref = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi)),
                       options=dict(ftol=1e-15, gtol=1e-12, maxiter=10000))
        np.testing.assert_allclose(xi, ref.x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fi, ref.fun, rtol=1e-9)
        assert xi[2] == 1.5


def test_float32_lands_near_float64():
    t, y = _data()
    X0 = np.array([[4.0, -4.0, 4.0], [-2.0, 2.0, -2.0]])
    x64, f64, _ = minimize_batch(_quadratic(t, y), X0, **TIGHT)
    x32, f32, _ = minimize_batch(_quadratic(t, y), X0, dtype="float32", ftol=1e-6, gtol=1e-6)
    assert x32.dtype == np.float64 and f32.dtype == np.float64    # results come back in float64
    # float32 stops at ftol 1e-6 (relative objective change): f within ~1e-6 relative of the optimum
    # (1e-4: float32's eps summed over the data), and on a quadratic x's error goes as the square root
    # of f's, sqrt(1e-6) = 1e-3 times the scale of x (~1): 2e-3
    np.testing.assert_allclose(x32, x64, atol=2e-3)
    np.testing.assert_allclose(f32, f64, rtol=1e-4)
    assert np.abs(x32 - x64).max() > 0                            # it did run in lower precision


def test_a_start_with_no_finite_objective_fails_alone():
    lo, hi = np.full(2, -5.0), np.full(2, 5.0)
    obj = Objective(log_barrier, lo, hi)
    x, f, _ = minimize_batch(obj, np.array([[-1.0, -2.0], [0.5, 4.0]]), **TIGHT)
    assert f[0] == np.inf
    np.testing.assert_allclose(x[1], 1.0 + np.sqrt(1.5), atol=1e-6)
    assert np.isfinite(f[1])


def test_max_evals_stops_a_slot():
    obj = Objective(rosenbrock, np.full(2, -10.0), np.full(2, 10.0))
    x, f, nev = minimize_batch(obj, np.array([[-1.2, 1.0]]), max_evals=8, chunk=4, **TIGHT)
    assert nev[0] == 8 and f[0] > 1e-3                  # stopped far from (1, 1), best point kept
    assert np.isfinite(f[0]) and not np.allclose(x[0], [1.0, 1.0], atol=1e-2)


def test_multi_start_keeps_the_global_minimum_and_every_distinct_optimum():
    obj = Objective(tilted_double_well, np.array([-3.0]), np.array([3.0]))
    starts = np.array([[0.5], [1.5], [2.5], [0.8], [-2.0]])     # four in the local basin
    x, f, optima = multi_start(obj, starts)
    grid = np.linspace(-3, 3, 600001)
    g = (grid ** 2 - 1) ** 2 + 0.3 * grid
    np.testing.assert_allclose(x[0, 0], grid[np.argmin(g)], atol=1e-5)
    np.testing.assert_allclose(f[0], g.min(), atol=1e-9)
    assert optima[0].shape == (2, 1) and optima[0][0, 0] < 0 < optima[0][1, 0]   # best first


def test_multi_start_with_no_finite_start_raises():
    obj = Objective(log_barrier, np.full(1, -5.0), np.full(1, 5.0))
    with pytest.raises(NoFiniteStart):
        multi_start(obj, np.array([[-1.0], [-3.0]]))
