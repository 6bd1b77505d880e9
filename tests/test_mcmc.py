"""Tests of the per-particle moves in smcjax.mcmc.

Invariance test: start C independent chains at exact draws of a non-Gaussian target
(a "banana": x ~ N(0, 1), y | x ~ N(x², 0.5²)), apply k moves, and check that the
moments are still those of the target. The chains are independent, so each moment's
standard error is the sample sd / sqrt(C); a wrong Hastings ratio (MALA) or a
non-symplectic integrator (HMC) shifts the moments by many standard errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smcjax import mcmc

SIG = 0.5


def banana_logdensity(pos):
    x, y = pos["x"], pos["y"]
    return -0.5 * x**2 - 0.5 * ((y - x**2) / SIG) ** 2


def banana_draws(key, c):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (c,))
    y = x**2 + SIG * jax.random.normal(ky, (c,))
    return {"x": x, "y": y}


def _stats(pos):
    x, y = np.asarray(pos["x"]), np.asarray(pos["y"])
    return np.stack([x, y, x**2, y**2, x * y], axis=1)


# E[x]=0, E[y]=1, E[x²]=1, E[y²]=Var(y)+1 = (2 + SIG²) + 1, E[xy]=E[x³]=0
TRUTH = np.array([0.0, 1.0, 1.0, 3.0 + SIG**2, 0.0])


def _flat(pos):
    return jnp.stack([pos["x"], pos["y"]], axis=1)


@pytest.mark.parametrize(
    ("name", "diagonal"),
    [("rwm", False), ("mala", False), ("mala", True), ("hmc", False)],
)
def test_moves_leave_target_invariant(name, diagonal):
    c, k = 4000, 15
    kernel = {"rwm": mcmc.rwm, "mala": mcmc.mala, "hmc": mcmc.hmc}[name](
        diagonal=diagonal
    )
    pos0 = banana_draws(jax.random.key(0), c)
    params = kernel.tune(kernel.default_params(2), _flat(pos0), None, None)
    # the banana is curved: shrink the gradient moves' step below the Gaussian default
    shrink = {"rwm": 1.0, "mala": 0.4, "hmc": 0.4}[name]
    params = params._replace(step_size=shrink * params.step_size)

    @jax.jit
    def run(key, pos0):
        states = jax.vmap(kernel.init, in_axes=(0, None))(pos0, banana_logdensity)

        def one(key, s):
            return mcmc.apply_kernel(key, s, kernel.step, banana_logdensity, params, k)

        keys = jax.random.split(key, c)
        return jax.vmap(one)(keys, states)

    final, infos = run(jax.random.key(1), pos0)
    acc = float(infos.acceptance_rate.mean())
    assert 0.05 < acc < 0.99, acc
    s = _stats(final.position)
    se = s.std(0, ddof=1) / np.sqrt(c)
    z = (s.mean(0) - TRUTH) / se
    assert np.all(np.abs(z) < 4.5), z
    # the chains moved (not a no-op kernel)
    moved = np.mean(np.asarray(final.position["x"]) != np.asarray(pos0["x"]))
    assert moved > 0.3
    # the stored log-density is that of the stored position
    np.testing.assert_allclose(
        final.logdensity,
        jax.vmap(banana_logdensity)(final.position),
        rtol=1e-4,
        atol=1e-4,
    )


def test_moves_converge_from_a_bad_start():
    """Started away from a correlated 4-d Gaussian, tuned chains reach its moments."""
    c, d = 2000, 4
    a = jnp.array([[2.0, 0, 0, 0], [1.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.9, 0.3]])
    cov = a @ a.T
    prec = jnp.linalg.inv(cov)
    mu = jnp.array([1.0, -1.0, 0.5, 0.0])

    def logdensity(x):
        return -0.5 * (x - mu) @ prec @ (x - mu)

    cloud = mu + jax.random.normal(jax.random.key(5), (c, d)) @ a.T
    for kernel in (mcmc.rwm(), mcmc.mala(), mcmc.hmc()):
        params = kernel.tune(kernel.default_params(d), cloud, None, None)
        pos0 = jnp.tile(mu + 3.0, (c, 1))

        @jax.jit
        def run(key, pos0, kernel=kernel, params=params):
            st = jax.vmap(kernel.init, in_axes=(0, None))(pos0, logdensity)
            keys = jax.random.split(key, c)
            return jax.vmap(
                lambda k_, s: mcmc.apply_kernel(
                    k_, s, kernel.step, logdensity, params, 150
                )[0]
            )(keys, st)

        x = np.asarray(run(jax.random.key(2), pos0).position)
        se = x.std(0, ddof=1) / np.sqrt(c)
        z = (x.mean(0) - np.asarray(mu)) / se
        assert np.all(np.abs(z) < 5.0), z
        # variances: se of a sample variance ≈ σ² sqrt(2/(c-1)) for a Gaussian
        var_truth = np.diag(np.asarray(cov))
        z_var = (x.var(0, ddof=1) - var_truth) / (var_truth * np.sqrt(2 / (c - 1)))
        assert np.all(np.abs(z_var) < 5.0), z_var


def test_aux_is_carried_and_nan_is_rejected():
    def logdensity(x):
        lp = -0.5 * jnp.sum(x**2)
        # NaN in half of the space: such proposals must be rejected
        val = jnp.where(x[0] > 1.0, jnp.nan, lp)
        return val, {"lp": lp, "twice": 2 * lp}

    for kernel in (mcmc.rwm(), mcmc.mala(), mcmc.hmc(num_integration_steps=3)):
        s0 = kernel.init(jnp.zeros(3), logdensity)
        assert set(s0.aux) == {"lp", "twice"}
        params = mcmc.KernelParams(jnp.asarray(1.0), jnp.ones(3))
        states, infos = mcmc.apply_kernel(
            jax.random.key(3),
            s0,
            kernel.step,
            logdensity,
            params,
            300,
            keep_states=True,
        )
        assert states.position.shape == (301, 3)
        assert np.all(np.asarray(states.position[:, 0]) <= 1.0)
        assert np.all(np.isfinite(np.asarray(states.logdensity)))
        np.testing.assert_allclose(
            states.aux["twice"], 2 * states.logdensity, rtol=1e-5, atol=1e-5
        )
        acc = np.asarray(infos.acceptance_rate)
        assert np.all((acc >= 0) & (acc <= 1))


def test_tuning_uses_the_cloud_covariance_and_acceptance():
    key = jax.random.key(0)
    cov = jnp.array([[4.0, 1.2], [1.2, 1.0]])
    x = jax.random.multivariate_normal(key, jnp.zeros(2), cov, (20000,))
    p0 = mcmc.KernelParams(jnp.asarray(1.0), jnp.eye(2))
    p = mcmc.tune_params(p0, x, None, jnp.asarray(0.234), target_acceptance=0.234)
    np.testing.assert_allclose(p.scale @ p.scale.T, cov, atol=0.12)
    assert float(p.step_size) == pytest.approx(1.0)
    up = mcmc.tune_params(p0, x, None, jnp.asarray(0.9), target_acceptance=0.234)
    down = mcmc.tune_params(p0, x, None, jnp.asarray(0.0), target_acceptance=0.234)
    assert float(up.step_size) > 1.0 > float(down.step_size)
    # weights: the weighted covariance of a two-point cloud
    pts = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    mean, c = mcmc.weighted_covariance(pts, jnp.log(jnp.array([0.25, 0.75])))
    np.testing.assert_allclose(mean, [1.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(c[0, 0], 4 * 0.25 * 0.75, atol=1e-6)


def test_errors_name_the_argument():
    kernel = mcmc.rwm()
    s = kernel.init(jnp.zeros(3), lambda x: -jnp.sum(x**2))
    with pytest.raises(ValueError, match=r"params.scale"):
        kernel.step(
            jax.random.key(0),
            s,
            lambda x: -jnp.sum(x**2),
            mcmc.KernelParams(1.0, jnp.eye(2)),
        )
    with pytest.raises(ValueError, match="scalar"):
        kernel.init(jnp.zeros(3), lambda x: -(x**2))
    with pytest.raises(ValueError, match="unknown kernel"):
        mcmc.get_kernel("nuts")
    with pytest.raises(ValueError, match="num_integration_steps"):
        mcmc.hmc(num_integration_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        mcmc.apply_kernel(jax.random.key(0), s, kernel.step, None, None, -1)
