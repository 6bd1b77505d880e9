"""Kalman filter / RTS smoother against brute-force conditioning of the joint Gaussian.

The oracle stacks (x_{0:T-1}, y_{0:T-1}) = mean + A·ε with ε ~ N(0, I) in float64
NumPy and conditions the joint Gaussian directly (no recursion shared with the code
under test), so the comparison is to rounding error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from smcjax import kalman


def _random_model(rng, d, p, n_steps, time_varying=False):
    def spd(k):
        a = rng.normal(size=(k, k))
        return a @ a.T / k + 0.3 * np.eye(k)

    m0 = rng.normal(size=d)
    p0 = spd(d)
    if time_varying:
        f = np.stack(
            [0.9 * np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(n_steps)]
        )
        q = np.stack([spd(d) for _ in range(n_steps)])
        b = rng.normal(size=(n_steps, d))
    else:
        f = 0.9 * np.linalg.qr(rng.normal(size=(d, d)))[0]
        q = spd(d)
        b = rng.normal(size=d)
    h = rng.normal(size=(p, d))
    r = spd(p)
    c = rng.normal(size=p)
    return kalman.LinearGaussianSSM(m0, p0, f, q, h, r, b, c)


def _joint(params, n_steps):
    """Mean and covariance of the stacked (x_0..x_{T-1}, y_0..y_{T-1})."""
    m0, p0, f, q, h, r, b, c = (np.asarray(a, np.float64) for a in params)
    d, p = m0.shape[0], h.shape[0]

    def at(a, nd, t):
        return a[t] if a.ndim > nd else a

    n_eps = d * n_steps + p * n_steps
    xs_mean, xs_a = [], []
    mean, a = m0, np.zeros((d, n_eps))
    a[:, :d] = np.linalg.cholesky(p0)
    for t in range(n_steps):
        if t > 0:
            mean = at(f, 2, t) @ mean + at(b, 1, t)
            a = at(f, 2, t) @ a
            a[:, t * d : (t + 1) * d] += np.linalg.cholesky(at(q, 2, t))
        xs_mean.append(mean)
        xs_a.append(a.copy())
    ys_mean, ys_a = [], []
    chol_r = np.linalg.cholesky(r)
    for t in range(n_steps):
        ys_mean.append(h @ xs_mean[t] + c)
        ay = h @ xs_a[t]
        ay[:, d * n_steps + t * p : d * n_steps + (t + 1) * p] += chol_r
        ys_a.append(ay)
    mu = np.concatenate(xs_mean + ys_mean)
    big_a = np.concatenate(xs_a + ys_a)
    return mu, big_a @ big_a.T, d, p


def _condition(mu, cov, idx_x, idx_y, y):
    s_xy = cov[np.ix_(idx_x, idx_y)]
    s_yy = cov[np.ix_(idx_y, idx_y)]
    gain = np.linalg.solve(s_yy, s_xy.T).T
    m = mu[idx_x] + gain @ (y - mu[idx_y])
    c = cov[np.ix_(idx_x, idx_x)] - gain @ s_xy.T
    return m, c


@pytest.mark.parametrize("time_varying", [False, True])
def test_filter_and_smoother_match_brute_force(time_varying):
    rng = np.random.default_rng(0)
    n_steps, d, p = 6, 3, 2
    params = _random_model(rng, d, p, n_steps, time_varying)
    mu, cov, d, p = _joint(params, n_steps)
    y = rng.multivariate_normal(mu, cov)[d * n_steps :].reshape(n_steps, p)

    with jax.enable_x64(True):
        p64 = kalman.LinearGaussianSSM(*(jnp.asarray(a, jnp.float64) for a in params))
        out = kalman.rts_smoother(p64, jnp.asarray(y))
        out = jax.tree.map(np.asarray, out)

    iy = np.arange(d * n_steps, d * n_steps + p * n_steps)
    ll = stats.multivariate_normal(mu[iy], cov[np.ix_(iy, iy)]).logpdf(y.ravel())
    np.testing.assert_allclose(out.log_likelihood, ll, rtol=1e-10)
    for t in range(n_steps):
        ix = np.arange(t * d, (t + 1) * d)
        m, c = _condition(mu, cov, ix, iy[: (t + 1) * p], y[: t + 1].ravel())
        np.testing.assert_allclose(out.filtered_means[t], m, atol=1e-9)
        np.testing.assert_allclose(out.filtered_covariances[t], c, atol=1e-9)
        m, c = _condition(mu, cov, ix, iy, y.ravel())
        np.testing.assert_allclose(out.smoothed_means[t], m, atol=1e-9)
        np.testing.assert_allclose(out.smoothed_covariances[t], c, atol=1e-9)
        m, c = _condition(mu, cov, ix, iy[: t * p], y[:t].ravel())
        np.testing.assert_allclose(out.predicted_means[t], m, atol=1e-9)
        np.testing.assert_allclose(out.predicted_covariances[t], c, atol=1e-9)


def test_float32_jit_vmap_and_scalar_observations():
    params = kalman.LinearGaussianSSM(
        jnp.zeros(1),
        jnp.eye(1),
        0.9 * jnp.eye(1),
        jnp.eye(1),
        jnp.eye(1),
        0.25 * jnp.eye(1),
    )
    ys = jnp.asarray(np.random.default_rng(1).normal(size=(4, 20)), jnp.float32)
    batched = jax.jit(jax.vmap(lambda y: kalman.log_likelihood(params, y)))(ys)
    single = np.array([kalman.log_likelihood(params, y) for y in ys])
    assert batched.dtype == jnp.float32
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    with jax.enable_x64(True):
        p64 = kalman.LinearGaussianSSM(
            *(jnp.asarray(a, jnp.float64) for a in params[:6])
        )
        ref = np.array(
            [kalman.log_likelihood(p64, jnp.asarray(y, jnp.float64)) for y in ys]
        )
    np.testing.assert_allclose(batched, ref, rtol=1e-5)


def test_shape_errors_name_the_argument():
    params = kalman.LinearGaussianSSM(
        jnp.zeros(2), jnp.eye(2), jnp.eye(2), jnp.eye(2), jnp.ones((1, 2)), jnp.eye(1)
    )
    with pytest.raises(ValueError, match="emission_matrix"):
        kalman.kalman_filter(params, jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="transition_matrix"):
        kalman.kalman_filter(
            params._replace(transition_matrix=jnp.eye(3)), jnp.zeros((5, 1))
        )
    with pytest.raises(ValueError, match="observations"):
        kalman.kalman_filter(params, jnp.zeros((0, 1)))
    # A time-varying parameter whose length differs from len(observations).
    with pytest.raises(
        ValueError, match=r"emission_covariance.*T = len\(observations\) = 5"
    ):
        kalman.kalman_filter(
            params._replace(emission_covariance=jnp.ones((6, 1, 1))), jnp.zeros((5, 1))
        )
    with pytest.raises(TypeError, match="params"):
        kalman.kalman_filter(tuple(params), jnp.zeros((5, 1)))
