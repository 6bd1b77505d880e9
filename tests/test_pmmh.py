"""PMMH on the 1-d linear-Gaussian model against the exact (Kalman, grid) posterior.

Model: x_0 ~ N(0, 1), x_t = ρ x_{t-1} + N(0, 1), y_t = x_t + N(0, 0.5²), ρ ~ U(-1, 1).
The oracle is p(ρ | y) ∝ p(y | ρ) on a fine grid, p(y | ρ) from a scalar Kalman filter.
The chains are independent, so the standard error of a posterior moment is the
between-chain standard deviation of the per-chain averages over sqrt(num_chains).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import smcjax
import smcjax.numpyro as snp
from smcjax.pmmh import pmmh, random_walk_pmmh

RHO, Q, R_OBS, T = 0.7, 1.0, 0.5, 80
CHAINS, ITERS, BURN = 16, 800, 200
TOL = 4.5


def lg_model(rho):
    return smcjax.StateSpaceModel(
        initial=lambda: dist.Normal(0.0, 1.0),
        transition=lambda t, x: dist.Normal(rho * x, Q**0.5),
        emission=lambda t, x: dist.Normal(x, R_OBS),
    )


def _data():
    rng = np.random.default_rng(3)
    x = np.empty(T)
    x[0] = rng.normal()
    for t in range(1, T):
        x[t] = RHO * x[t - 1] + np.sqrt(Q) * rng.normal()
    return x + R_OBS * rng.normal(size=T)


def _kalman_loglik(rhos, y):
    """Vectorised over a grid of ρ (float64)."""
    m = np.zeros_like(rhos)
    p = np.ones_like(rhos)
    ll = np.zeros_like(rhos)
    for t, yt in enumerate(y):
        if t > 0:
            m, p = rhos * m, rhos**2 * p + Q
        s = p + R_OBS**2
        ll += -0.5 * (np.log(2 * np.pi * s) + (yt - m) ** 2 / s)
        k = p / s
        m, p = m + k * (yt - m), (1 - k) * p
    return ll


def _oracle(y):
    grid = np.linspace(-0.999, 0.999, 20001)
    lw = _kalman_loglik(grid, y)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return (w * grid).sum(), (w * grid**2).sum()


def _check(rho_draws, y):
    m1, m2 = _oracle(y)
    draws = np.asarray(rho_draws, np.float64)[:, BURN:]
    for stat, truth, what in [(draws, m1, "E[rho]"), (draws**2, m2, "E[rho^2]")]:
        per_chain = stat.mean(1)
        se = per_chain.std(ddof=1) / np.sqrt(per_chain.size)
        z = (per_chain.mean() - truth) / se
        assert abs(z) < TOL, f"{what}: {per_chain.mean()} vs {truth}, z={z}"


def test_pmmh_recovers_rho():
    y = jnp.asarray(_data(), jnp.float32)

    def log_prior(params):
        rho = params["rho"]
        return jnp.where(jnp.abs(rho) < 1.0, jnp.log(0.5), -jnp.inf)

    run = jax.jit(
        lambda k: pmmh(
            k,
            lambda p: lg_model(p["rho"]),
            log_prior,
            y,
            {"rho": jnp.asarray(0.0)},
            num_particles=100,
            num_iterations=ITERS,
            num_chains=CHAINS,
            step_size=0.1,
        )
    )
    res = run(jax.random.key(0))
    assert res.samples["rho"].shape == (CHAINS, ITERS)
    acc = np.asarray(res.acceptance_rate)
    assert np.all((acc > 0.03) & (acc < 0.9)), acc
    _check(res.samples["rho"], y)


def test_pmmh_through_a_numpyro_model():
    """SSM -> NumPyro: the particle filter's log-likelihood as numpyro.factor."""
    y = jnp.asarray(_data(), jnp.float32)

    def model(y):
        rho = numpyro.sample("rho", dist.Uniform(-1.0, 1.0))
        snp.particle_filter_factor("pf", lg_model(rho), y, 100)

    res = jax.jit(
        lambda k: snp.pmmh(
            k, model, y, num_iterations=ITERS, num_chains=CHAINS, step_size=0.5
        )
    )(jax.random.key(1))
    assert res.samples["rho"].shape == (CHAINS, ITERS)
    assert np.all(np.abs(np.asarray(res.samples["rho"])) < 1.0)
    _check(res.samples["rho"], y)


def test_exact_likelihood_random_walk_matches_grid():
    """random_walk_pmmh with the exact (Kalman) likelihood: plain RWM, same oracle."""
    y = _data()
    yj = jnp.asarray(y, jnp.float32)

    def kalman(rho):
        def body(c, t_y):
            m, p, ll = c
            t, yt = t_y
            m, p = jnp.where(t > 0, rho * m, m), jnp.where(t > 0, rho**2 * p + Q, p)
            s = p + R_OBS**2
            ll = ll - 0.5 * (jnp.log(2 * jnp.pi * s) + (yt - m) ** 2 / s)
            k = p / s
            return (m + k * (yt - m), (1 - k) * p, ll), None

        (_, _, ll), _ = jax.lax.scan(body, (0.0, 1.0, 0.0), (jnp.arange(T), yj))
        return ll

    def log_target(key, theta):
        return jnp.where(jnp.abs(theta) < 1, kalman(theta), -jnp.inf)

    res = jax.jit(
        lambda k: random_walk_pmmh(
            k, log_target, jnp.zeros(CHAINS), num_iterations=ITERS, step_size=0.15
        )
    )(jax.random.key(2))
    _check(res.samples, y)


def test_pmmh_errors():
    y = jnp.zeros(5)
    with pytest.raises(ValueError, match="num_particles"):
        pmmh(jax.random.key(0), lg_model, lambda p: 0.0, y, 0.0, 0, 10)
    with pytest.raises(ValueError, match="num_iterations"):
        random_walk_pmmh(
            jax.random.key(0), lambda k, p: 0.0, jnp.zeros(2), num_iterations=0
        )
    with pytest.raises(ValueError, match="cov"):
        random_walk_pmmh(
            jax.random.key(0),
            lambda k, p: 0.0,
            jnp.zeros((2, 3)),
            num_iterations=2,
            cov=jnp.eye(2),
        )
    with pytest.raises(ValueError, match="needs a key"), pytest.warns(UserWarning):
        snp.particle_filter_factor("pf", lg_model(0.5), y, 10)
