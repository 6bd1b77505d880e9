"""Parallel tempering: bimodal target with known mode weights, DEO vs SEO, oracles.

Bimodal target: prior N(0, 3^2), likelihood 0.25 N(-4, 0.2^2) + 0.75 N(4, 0.2^2). As
N(±4; 0, 9 + 0.04) is the same for both signs, the posterior keeps the mode weights
0.25 / 0.75 exactly, with components N(±4·9/9.04, 9·0.04/9.04). Tolerances are 5
Monte Carlo standard errors from batch means (or from independent replicates).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

from smcjax.pgibbs import state_space_log_densities, tempered_csmc_kernel
from smcjax.pt import parallel_tempering, update_schedule
from smcjax.ssm import StateSpaceModel

Z = 5.0
SIG, PRIOR_SD, W_RIGHT = 0.2, 3.0, 0.75
POST_MEAN = 4.0 * PRIOR_SD**2 / (PRIOR_SD**2 + SIG**2)


def log_prior(x):
    return norm.logpdf(x, 0.0, PRIOR_SD)


def log_likelihood(x):
    return jnp.logaddexp(
        jnp.log(1 - W_RIGHT) + norm.logpdf(x, -4.0, SIG),
        jnp.log(W_RIGHT) + norm.logpdf(x, 4.0, SIG),
    )


def batch_means_se(samples, num_batches=20):
    """Standard error of the mean over (replicates, iterations)."""
    c, n = samples.shape
    b = n // num_batches
    means = samples[:, : b * num_batches].reshape(c * num_batches, b).mean(1)
    return means.std(ddof=1) / np.sqrt(c * num_batches)


SEEDS, CHAINS, ADAPT, STEPS = 3, 24, 1000, 3000


@pytest.fixture(scope="module")
def runs():
    out = {}
    for swap in ("deo", "seo"):
        f = jax.jit(
            jax.vmap(
                lambda k, swap=swap: parallel_tempering(
                    k,
                    log_prior,
                    log_likelihood,
                    jnp.zeros((CHAINS,)),
                    STEPS,
                    swap=swap,
                    num_adapt_steps=ADAPT,
                )
            )
        )
        out[swap] = f(jax.random.split(jax.random.key(0), SEEDS))
    return out


def test_beta_one_chain_has_the_right_mode_weights(runs):
    res = runs["deo"]
    s = np.asarray(res.samples, np.float64)
    assert s.shape == (SEEDS, STEPS)
    right = (s > 0).astype(float)
    assert abs(right.mean() - W_RIGHT) < Z * batch_means_se(right)
    # within the right mode: the component mean
    x = np.where(s > 0, s - POST_MEAN, 0.0)
    assert abs(x.mean()) < Z * batch_means_se(x)
    np.testing.assert_allclose(np.asarray(res.inverse_temperatures)[:, -1], 1.0)
    assert np.all(np.asarray(res.inverse_temperatures)[:, 0] == 0.0)


def test_a_single_chain_with_the_same_kernel_gets_stuck():
    # same RWM kernel and step-size tuning, one chain at beta = 1, started in the
    # small mode: the 200-nat barrier at 0 is never crossed.
    res = jax.jit(
        lambda k: parallel_tempering(
            k, log_prior, log_likelihood, jnp.full((1,), -4.0), 2000
        )
    )(jax.random.key(1))
    s = np.asarray(res.samples)
    assert np.all(s < 0)
    assert res.swap_rate.shape == (0,)
    assert 0.1 < float(res.acceptance_rate[0]) < 0.5  # the kernel itself works


def test_deo_makes_more_round_trips_than_seo(runs):
    deo = np.asarray(runs["deo"].round_trips, float)
    seo = np.asarray(runs["seo"].round_trips, float)
    diff = deo - seo
    se = diff.std(ddof=1) / np.sqrt(SEEDS)
    assert diff.mean() > Z * se and deo.mean() > 2 * seo.mean(), (deo, seo)
    # both estimate the same communication barrier
    lam = {k: np.asarray(r.global_barrier) for k, r in runs.items()}
    se = np.sqrt(lam["deo"].var(ddof=1) / SEEDS + lam["seo"].var(ddof=1) / SEEDS + 1e-6)
    assert abs(lam["deo"].mean() - lam["seo"].mean()) < Z * se, lam
    # DEO's round-trip rate is close to its theoretical value under efficient local
    # exploration, 1 / (2 + 2 Σ r/(1-r)) (Syed et al. 2022, Thm 3), and below it.
    r = 1.0 - np.asarray(runs["deo"].swap_rate)
    tau = 1.0 / (2.0 + 2.0 * np.sum(r / (1.0 - r), axis=1))
    rate = np.asarray(runs["deo"].round_trip_rate)
    assert np.all(rate < 1.1 * tau) and np.all(rate > 0.5 * tau), (rate, tau)


def test_adapted_schedule_equalises_the_rejection_rates(runs):
    # after adaptation the rejection rates are nearly equal, far more so than on a
    # linear schedule run with the same budget
    r = 1.0 - np.asarray(runs["deo"].swap_rate)
    lin = jax.jit(
        lambda k: parallel_tempering(
            k,
            log_prior,
            log_likelihood,
            jnp.zeros((CHAINS,)),
            STEPS,
            adapt_schedule=False,
            num_adapt_steps=ADAPT,
        )
    )(jax.random.key(3))
    r_lin = 1.0 - np.asarray(lin.swap_rate)
    assert np.std(r, axis=1).max() < 0.25 * np.std(r_lin)
    assert np.all(np.diff(np.asarray(runs["deo"].inverse_temperatures), axis=1) > 0)


def test_update_schedule_inverts_a_known_barrier():
    # local barrier lambda(b) = 3 b^2 (Lambda(b) = b^3): rejection rates of a
    # schedule are the barrier increments; one update gives Lambda(b_k) = k/K.
    betas = jnp.linspace(0.0, 1.0, 201)
    r = jnp.diff(betas**3)
    new = update_schedule(betas, r)
    target = (jnp.arange(201) / 200.0) ** (1 / 3)
    np.testing.assert_allclose(np.asarray(new), np.asarray(target), atol=2e-3)
    # all-zero rates: unchanged
    np.testing.assert_allclose(
        np.asarray(update_schedule(betas, jnp.zeros(200))), np.asarray(betas), atol=1e-6
    )


def test_conjugate_gaussian_with_mala():
    # prior N(0, 1), one observation y = 2 with unit noise: posterior N(1, 1/2).
    lp = lambda x: -0.5 * jnp.sum(x**2)
    ll = lambda x: -0.5 * jnp.sum((x - 2.0) ** 2)
    res = jax.jit(
        jax.vmap(
            lambda k: parallel_tempering(
                k, lp, ll, jnp.zeros((4, 2)), 2000, kernel="mala", num_adapt_steps=500
            )
        )
    )(jax.random.split(jax.random.key(5), 2))
    s = np.asarray(res.samples, np.float64)  # (2, 2000, 2)
    assert s.shape == (2, 2000, 2)
    for stat in (s - 1.0, (s - 1.0) ** 2 - 0.5):
        for d in range(2):
            x = stat[..., d]
            assert abs(x.mean()) < Z * batch_means_se(x), (x.mean(), d)


def kalman_smoother(y, a, q, r, p0):
    length = len(y)
    mf, pf = np.empty(length), np.empty(length)
    m, p = 0.0, p0
    for t in range(length):
        if t > 0:
            m, p = a * m, a * a * p + q
        k = p / (p + r)
        m, p = m + k * (y[t] - m), (1 - k) * p
        mf[t], pf[t] = m, p
    ms, ps = mf.copy(), pf.copy()
    for t in range(length - 2, -1, -1):
        pp = a * a * pf[t] + q
        g = pf[t] * a / pp
        ms[t] = mf[t] + g * (ms[t + 1] - a * mf[t])
        ps[t] = pf[t] + g * g * (ps[t + 1] - pp)
    return ms, ps


def test_conditional_smc_as_the_per_chain_kernel():
    # PT over trajectories of a linear-Gaussian model, every chain moved by a CSMC
    # sweep on the tempered model: the beta = 1 chain matches the RTS smoother.
    a, length = 0.9, 20
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=length)) * 0.5
    y = x + rng.normal(size=length)
    model = StateSpaceModel(
        initial=lambda: dist.Normal(0.0, 1.0),
        transition=lambda t, x: dist.Normal(a * x, 1.0),
        emission=lambda t, x: dist.Normal(x, 1.0),
    )
    yj = jnp.asarray(y, jnp.float32)
    kernel = tempered_csmc_kernel(model, yj, 5)
    lp, ll = state_space_log_densities(model, yj)
    res = jax.jit(
        jax.vmap(
            lambda k: parallel_tempering(
                k,
                lp,
                ll,
                jnp.zeros((4, length)),
                1000,
                kernel=kernel,
                num_adapt_steps=200,
            )
        )
    )(jax.random.split(jax.random.key(2), 2))
    ms, ps = kalman_smoother(y, a, 1.0, 1.0, 1.0)
    z = (np.asarray(res.samples, np.float64) - ms) / np.sqrt(ps)  # (2, 1000, T)
    for stat in (z, z**2 - 1.0):
        for t in range(length):
            assert abs(stat[..., t].mean()) < Z * batch_means_se(stat[..., t]), t
    assert np.all(np.asarray(res.swap_rate) > 0.0)


def test_jit_vmap_and_same_key_same_output():
    def run(k):
        return parallel_tempering(
            k, log_prior, log_likelihood, jnp.zeros((3,)), 50, num_adapt_steps=40
        ).samples

    keys = jax.random.split(jax.random.key(0), 2)
    single = jax.jit(run)
    first = np.asarray(single(keys[0]))
    np.testing.assert_array_equal(first, np.asarray(single(keys[0])))
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(run))(keys)[0]), first, rtol=1e-5, atol=1e-5
    )


def test_bad_input_is_reported():
    x0 = jnp.zeros((3,))
    with pytest.raises(ValueError, match="inverse_temperatures"):
        parallel_tempering(
            jax.random.key(0),
            log_prior,
            log_likelihood,
            x0,
            5,
            inverse_temperatures=jnp.array([0.0, 0.7, 0.5]),
        )
    with pytest.raises(ValueError, match="inverse_temperatures"):
        parallel_tempering(
            jax.random.key(0),
            log_prior,
            log_likelihood,
            x0,
            5,
            inverse_temperatures=jnp.array([0.0, 0.5, 0.9]),
        )
    with pytest.raises(ValueError, match="swap"):
        parallel_tempering(
            jax.random.key(0), log_prior, log_likelihood, x0, 5, swap="x"
        )
    with pytest.raises(ValueError, match="initial_positions"):
        parallel_tempering(
            jax.random.key(0), log_prior, log_likelihood, x0, 5, num_chains=4
        )
    with pytest.raises(ValueError, match="kernel"):
        parallel_tempering(
            jax.random.key(0), log_prior, log_likelihood, x0, 5, kernel="nope"
        )
