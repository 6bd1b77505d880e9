"""Conditional SMC and particle Gibbs against exact linear-Gaussian oracles.

Model: x_0 ~ N(0, P0), x_t = A x_{t-1} + N(0, Q), y_t = x_t + N(0, R). The oracle is
a float64 NumPy Kalman filter / RTS smoother / forward-filter backward-sampler written
here (independent of smcjax). Tolerances are 5 Monte Carlo standard errors, estimated
from independent replicates or from batch means of the chains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from smcjax.core import FeynmanKac
from smcjax.pgibbs import (
    build_kernel,
    conditional_smc,
    from_state_space,
    init,
    particle_gibbs,
)
from smcjax.ssm import StateSpaceModel

A, Q, R, P0 = 0.9, 1.0, 1.0, 1.0
T = 100
N = 5
Z = 5.0  # tolerance in standard errors


def lg_model(a=A):
    return StateSpaceModel(
        initial=lambda: dist.Normal(0.0, np.sqrt(P0)),
        transition=lambda t, x: dist.Normal(a * x, np.sqrt(Q)),
        emission=lambda t, x: dist.Normal(x, np.sqrt(R)),
    )


def simulate(seed, length, a=A):
    rng = np.random.default_rng(seed)
    x = np.empty(length)
    x[0] = rng.normal(0, np.sqrt(P0))
    for t in range(1, length):
        x[t] = a * x[t - 1] + rng.normal(0, np.sqrt(Q))
    return x + rng.normal(0, np.sqrt(R), length)


def kalman(y, a=A):
    """Filter means/vars, RTS means/vars, lag-one smoothed covariances, log p(y)."""
    length = len(y)
    mf, pf = np.empty(length), np.empty(length)
    m, p, ll = 0.0, P0, 0.0
    for t in range(length):
        if t > 0:
            m, p = a * m, a * a * p + Q
        s = p + R
        ll += -0.5 * (np.log(2 * np.pi * s) + (y[t] - m) ** 2 / s)
        k = p / s
        m, p = m + k * (y[t] - m), (1 - k) * p
        mf[t], pf[t] = m, p
    ms, ps, cs = mf.copy(), pf.copy(), np.empty(length - 1)
    for t in range(length - 2, -1, -1):
        pp = a * a * pf[t] + Q
        g = pf[t] * a / pp
        ms[t] = mf[t] + g * (ms[t + 1] - a * mf[t])
        ps[t] = pf[t] + g * g * (ps[t + 1] - pp)
        cs[t] = g * ps[t + 1]
    return mf, pf, ms, ps, cs, ll


def ffbs(rng, y, num):
    """``num`` exact draws from p(x_{0:T-1} | y) (forward filter, backward sample)."""
    mf, pf, *_ = kalman(y)
    x = np.empty((num, len(y)))
    x[:, -1] = rng.normal(mf[-1], np.sqrt(pf[-1]), num)
    for t in range(len(y) - 2, -1, -1):
        pp = A * A * pf[t] + Q
        g = pf[t] * A / pp
        mean = mf[t] + g * (x[:, t + 1] - A * mf[t])
        x[:, t] = rng.normal(mean, np.sqrt(pf[t] - g * g * pp), num)
    return x


def batch_means_se(samples, num_batches=10):
    """Standard error of the mean of ``samples`` (chains, iterations, ...)."""
    c, n = samples.shape[:2]
    b = n // num_batches
    means = samples[:, : b * num_batches].reshape(c, num_batches, b, -1).mean(2)
    means = means.reshape(c * num_batches, -1)
    return means.std(0, ddof=1) / np.sqrt(c * num_batches)


@pytest.fixture(scope="module")
def data():
    y = simulate(0, T)
    _, _, ms, ps, cs, _ = kalman(y)
    return dict(y=y, yj=jnp.asarray(y, jnp.float32), ms=ms, ps=ps, cs=cs)


CHAINS, ITERS, BURN = 8, 1000, 100


@pytest.fixture(scope="module")
def runs(data):
    out = {}
    for name, kw in {
        "pgas": dict(ancestor_sampling=True),
        "csmc": dict(ancestor_sampling=False),
        "bs": dict(ancestor_sampling=False, backward_sampling=True),
    }.items():
        f = jax.jit(
            lambda k, kw=kw: particle_gibbs(
                k, lg_model(), data["yj"], N, ITERS, num_chains=CHAINS, **kw
            )
        )
        out[name] = f(jax.random.key(11))
    return out


def check_smoothing_moments(traj, data):
    """Standardised draws z_t: E z_t = 0, E z_t^2 = 1 per t, batch-means errors."""
    z = (np.asarray(traj, np.float64)[:, BURN:] - data["ms"]) / np.sqrt(data["ps"])
    for stat in (z, z**2 - 1.0):
        est = stat.mean((0, 1))
        se = batch_means_se(stat)
        assert np.all(np.abs(est) < Z * se), (np.max(np.abs(est) / se), est, se)


# ---------------------------------------------------------------- the reference slot


@pytest.mark.parametrize(
    ("pinned", "kw", "vectorized"),
    [
        (0, dict(ancestor_sampling=False), False),
        (2, dict(ancestor_sampling=True), False),
        (3, dict(ancestor_sampling=True, resampling="systematic"), True),
        (1, dict(ancestor_sampling=False, backward_sampling=True), True),
    ],
)
def test_reference_keeps_its_slot_and_lineage(pinned, kw, vectorized):
    # Only the reference has a finite potential, so the only trajectory with positive
    # weight is the reference itself: the sweep must return it exactly. This fails
    # if the reference is not in slot `pinned`, or its lineage is broken by the
    # conditional resampler / ancestor sampling / backward sampling.
    length = 12
    ref = jax.random.normal(jax.random.key(3), (length,))

    def log_potential(t, x_prev, x):
        return jnp.where(x == ref[t], 0.0, -jnp.inf)

    def log_transition(t, x_prev, x):
        return -0.5 * (x - x_prev) ** 2

    if vectorized:
        model = FeynmanKac(
            init=lambda key, n: jax.random.normal(key, (n,)),
            propagate=lambda key, t, x: x + jax.random.normal(key, x.shape),
            log_potential=log_potential,
            vectorized=True,
        )
    else:
        model = FeynmanKac(
            init=lambda key: jax.random.normal(key),
            propagate=lambda key, t, x: x + jax.random.normal(key),
            log_potential=log_potential,
        )
    sweep = jax.jit(
        lambda k: conditional_smc(
            k, model, ref, 4, log_transition=log_transition, pinned=pinned, **kw
        )
    )
    for seed in range(3):
        new, info = sweep(jax.random.key(seed))
        np.testing.assert_array_equal(np.asarray(new), np.asarray(ref))
        assert not np.any(np.asarray(info.updated))


# ---------------------------------------------------------------- exact invariance


@pytest.mark.parametrize(
    "kw",
    [
        dict(ancestor_sampling=True),
        dict(ancestor_sampling=True, resampling="systematic"),
        dict(ancestor_sampling=False, backward_sampling=True),
    ],
    ids=["pgas", "pgas-systematic", "bs"],
)
def test_one_sweep_from_the_posterior_stays_at_the_posterior(data, kw):
    # Start M independent chains at exact smoothing draws (FFBS); after one CSMC sweep
    # they must still be exact draws: means, variances and lag-one covariances of
    # the standardised states agree with the RTS smoother (independent replicates).
    m = 3000
    x0 = jnp.asarray(ffbs(np.random.default_rng(5), data["y"], m), jnp.float32)
    fk, lt = from_state_space(lg_model(), data["yj"])
    sweep = jax.jit(
        jax.vmap(
            lambda k, ref: conditional_smc(
                k, fk, ref, N, log_transition=lt, potential_uses_prev=False, **kw
            )[0]
        )
    )
    x1 = np.asarray(sweep(jax.random.split(jax.random.key(7), m), x0), np.float64)
    sd = np.sqrt(data["ps"])
    z = (x1 - data["ms"]) / sd
    lag = z[:, :-1] * z[:, 1:] - data["cs"] / (sd[:-1] * sd[1:])
    moved = np.mean(np.any(x1 != np.asarray(x0), axis=1))
    assert moved > 0.5  # the kernel is not the identity
    for stat in (z, z**2 - 1.0, lag):
        est = stat.mean(0)
        se = stat.std(0, ddof=1) / np.sqrt(m)
        assert np.all(np.abs(est) < Z * se), (np.max(np.abs(est) / se), kw)


@pytest.mark.parametrize("ancestor_sampling", [False, True])
def test_flat_potential_leaves_the_prior_invariant(ancestor_sampling):
    # G = 1: the target is the prior of the Markov chain; prior draws pushed through
    # three kernel steps (build_kernel / init API) keep mean 0 and the AR(1) variance.
    length, m = 30, 3000
    var = np.empty(length)
    var[0] = P0
    for t in range(1, length):
        var[t] = A * A * var[t - 1] + Q
    model = FeynmanKac(
        init=lambda key: np.sqrt(P0) * jax.random.normal(key),
        propagate=lambda key, t, x: A * x + np.sqrt(Q) * jax.random.normal(key),
        log_potential=lambda t, x_prev, x: jnp.zeros(()),
    )

    def log_transition(t, x_prev, x):
        return -0.5 * (x - A * x_prev) ** 2 / Q

    kernel = build_kernel(
        model, N, log_transition=log_transition, ancestor_sampling=ancestor_sampling
    )

    def chain(key, x):
        def body(state, k):
            state, info = kernel(k, state)
            return state, info.updated

        state, upd = jax.lax.scan(body, init(x), jax.random.split(key, 3))
        return state.trajectory, upd

    rng = np.random.default_rng(1)
    x = np.empty((m, length))
    x[:, 0] = rng.normal(0, np.sqrt(P0), m)
    for t in range(1, length):
        x[:, t] = A * x[:, t - 1] + rng.normal(0, np.sqrt(Q), m)
    out, upd = jax.jit(jax.vmap(chain))(
        jax.random.split(jax.random.key(2), m), jnp.asarray(x, jnp.float32)
    )
    z = np.asarray(out, np.float64) / np.sqrt(var)
    # the kernel moves (plain CSMC renews mostly the late states)
    assert np.mean(np.asarray(upd)) > (0.3 if ancestor_sampling else 0.05)
    for stat in (z, z**2 - 1.0):
        est = stat.mean(0)
        se = stat.std(0, ddof=1) / np.sqrt(m)
        assert np.all(np.abs(est) < Z * se), np.max(np.abs(est) / se)


# ---------------------------------------------------------------- mixing


def test_pgas_with_five_particles_matches_the_rts_smoother(runs, data):
    res = runs["pgas"]
    assert res.trajectories.shape == (CHAINS, ITERS, T)
    check_smoothing_moments(res.trajectories, data)


def test_backward_sampling_matches_the_rts_smoother(runs, data):
    check_smoothing_moments(runs["bs"].trajectories, data)


def test_without_ancestor_sampling_the_early_states_degenerate(runs):
    # Update rate of x_0: plain CSMC with N=5 over T=100 steps almost never renews
    # x_0 (the genealogy coalesces on the reference); PGAS and BS renew it often.
    rates = {k: np.asarray(r.update_rate)[:, 0] for k, r in runs.items()}
    for good in ("pgas", "bs"):
        diff = rates[good] - rates["csmc"]
        se = diff.std(ddof=1) / np.sqrt(CHAINS)
        assert diff.mean() > Z * se and diff.mean() > 0.3, (good, rates)
    assert rates["csmc"].mean() < 0.05
    # the late states are renewed in all three (the filter is not degenerate there)
    assert np.asarray(runs["csmc"].update_rate)[:, -1].mean() > 0.5


# ---------------------------------------------------------------- Gibbs on parameters


def test_gibbs_update_of_the_ar_coefficient_matches_the_kalman_posterior(data):
    # a ~ N(0, 1) prior; a | x is Gaussian (conjugate). The marginal posterior
    # p(a | y) ∝ p(a) p(y | a) is computed on a grid with the Kalman likelihood.
    s0 = 1.0

    def update(key, a, x, y):
        prec = 1.0 / s0**2 + jnp.sum(x[:-1] ** 2) / Q
        mean = jnp.sum(x[:-1] * x[1:]) / Q / prec
        return mean + jax.random.normal(key) / jnp.sqrt(prec)

    chains, iters, burn = 4, 1500, 200
    f = jax.jit(
        lambda k: particle_gibbs(
            k,
            lg_model,
            data["yj"],
            N,
            iters,
            params=jnp.asarray(0.5),
            param_update=update,
            num_chains=chains,
        )
    )
    res = f(jax.random.key(4))
    a = np.asarray(res.params, np.float64)[:, burn:]
    assert a.shape == (chains, iters - burn)

    grid = np.linspace(0.3, 1.3, 801)
    logp = np.array([kalman(data["y"], g)[-1] for g in grid]) - 0.5 * grid**2 / s0**2
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean = np.sum(w * grid)
    sd = np.sqrt(np.sum(w * (grid - mean) ** 2))
    for stat, truth in ((a, mean), ((a - mean) ** 2, sd**2)):
        se = batch_means_se(stat[..., None])[0]
        assert abs(stat.mean() - truth) < Z * se, (stat.mean(), truth, se)


# ---------------------------------------------------------------- transformations


def test_jit_vmap_and_same_key_same_output(data):
    # num_chains vmaps one chain per split key: chain i must equal a single-chain
    # run with key i and the same (per-chain) initial trajectory; same key, same
    # output under jit.
    y = data["yj"][:10]
    start = jnp.stack([jnp.zeros(10), jnp.ones(10)])
    key = jax.random.key(0)
    chains = jax.jit(
        lambda k: particle_gibbs(
            k, lg_model(), y, 4, 10, num_chains=2, init_trajectory=start
        )
    )(key)
    assert chains.trajectories.shape == (2, 10, 10)
    assert chains.update_rate.shape == (2, 10)
    assert chains.log_evidence.shape == (2, 10)
    single = jax.jit(
        lambda k, x0: (
            particle_gibbs(k, lg_model(), y, 4, 10, init_trajectory=x0).trajectories
        )
    )
    keys = jax.random.split(key, 2)
    for i in range(2):
        out = np.asarray(single(keys[i], start[i]))
        np.testing.assert_allclose(np.asarray(chains.trajectories[i]), out, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(single(keys[0], start[0])), np.asarray(single(keys[0], start[0]))
    )


def test_bad_input_is_reported(data):
    y = data["yj"][:10]
    with pytest.raises(ValueError, match="num_particles"):
        particle_gibbs(jax.random.key(0), lg_model(), y, 1, 5)
    with pytest.raises(ValueError, match="observations must be finite"):
        particle_gibbs(jax.random.key(0), lg_model(), y.at[3].set(jnp.nan), 4, 5)
    with pytest.raises(ValueError, match="params and param_update"):
        particle_gibbs(jax.random.key(0), lg_model(), y, 4, 5, params=1.0)
    with pytest.raises(ValueError, match="init_trajectory"):
        particle_gibbs(jax.random.key(0), lg_model(), y, 4, 5, init_trajectory=y[:5])
    fk = FeynmanKac(
        lambda k: jax.random.normal(k),
        lambda k, t, x: x + jax.random.normal(k),
        lambda t, xp, x: -0.5 * x**2,
    )
    with pytest.raises(ValueError, match="log_transition"):
        particle_gibbs(jax.random.key(0), fk, None, 4, 5, num_steps=10)
    with pytest.raises(ValueError, match="resampling"):
        conditional_smc(
            jax.random.key(0),
            fk,
            jnp.zeros(5),
            4,
            ancestor_sampling=False,
            resampling="nope",
        )
    # a FeynmanKac model without observations runs with num_steps
    out = jax.jit(
        lambda k: particle_gibbs(
            k, fk, None, 4, 3, num_steps=10, ancestor_sampling=False
        )
    )(jax.random.key(0))
    assert out.trajectories.shape == (3, 10)
