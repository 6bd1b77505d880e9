"""Particle smoothers against the RTS smoother (float64) on a 3-D linear-Gaussian model.

Each seed runs one particle filter and draws M trajectories; the per-seed average is
an estimate of the smoothed means E[x_t | y_{0:T-1}], and the error bar is the standard
error across seeds (so the correlation between trajectories of one run, e.g. from path
degeneracy, is accounted for).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smcjax
from smcjax import kalman, smoothing, ssm

D, T = 3, 8
_F = np.array([[0.8, 0.2, 0.0], [-0.1, 0.7, 0.1], [0.0, 0.3, 0.6]])
PARAMS = kalman.LinearGaussianSSM(
    np.zeros(D),
    np.eye(D),
    _F,
    0.5 * np.eye(D),
    np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]),
    0.3 * np.eye(2),
)
MODEL = kalman.to_state_space_model(
    kalman.LinearGaussianSSM(
        *(None if a is None else jnp.asarray(a, jnp.float32) for a in PARAMS)
    )
)


@pytest.fixture(scope="module")
def setup():
    _, ys = jax.jit(lambda k: ssm.simulate(k, MODEL, T))(jax.random.key(4))
    with jax.enable_x64(True):
        p64 = kalman.LinearGaussianSSM(
            *(None if a is None else jnp.asarray(a, jnp.float64) for a in PARAMS)
        )
        rts = kalman.rts_smoother(p64, jnp.asarray(np.asarray(ys), jnp.float64))
        rts = jax.tree.map(np.asarray, rts)
    num_seeds, n, m = 48, 300, 24

    @jax.jit
    def run(keys):
        def one(key):
            k_pf, k_g, k_b = jax.random.split(key, 3)
            res = smcjax.particle_filter(k_pf, MODEL, ys, n, return_history=True)
            gen = smoothing.genealogy(k_g, res, m)
            ffbs = smoothing.backward_sampling(k_b, MODEL, res, m)
            return gen.mean(0), ffbs.mean(0), gen, ffbs

        return jax.vmap(one)(keys)

    out = jax.tree.map(np.asarray, run(jax.random.split(jax.random.key(0), num_seeds)))
    return ys, rts, out


def _se(x):
    return x.std(0, ddof=1) / np.sqrt(x.shape[0])


@pytest.mark.parametrize("which", ["genealogy", "ffbs"])
def test_trajectories_match_rts_smoothed_means(setup, which):
    _, rts, (gen_mean, ffbs_mean, gen, ffbs) = setup
    est = gen_mean if which == "genealogy" else ffbs_mean
    assert est.shape == (48, T, D)
    err = np.abs(est.mean(0) - rts.smoothed_means)
    assert np.all(err < 5 * _se(est) + 1e-4), (err / _se(est)).max()
    # FFBS trajectories are less degenerate at t = 0 than traced genealogies.
    n_unique = {
        "genealogy": np.mean([len(np.unique(g[:, 0, 0])) for g in gen]),
        "ffbs": np.mean([len(np.unique(f[:, 0, 0])) for f in ffbs]),
    }
    assert n_unique["ffbs"] > n_unique["genealogy"]


def test_smoothed_covariance_from_ffbs(setup):
    """Across-seed pooled variance of FFBS draws matches the RTS marginal variances."""
    _, rts, (_, _, _, ffbs) = setup
    x = ffbs.reshape(-1, T, D)
    var = x.var(0, ddof=1)
    true = np.diagonal(rts.smoothed_covariances, axis1=1, axis2=2)
    # Loose (25%) check: catches wrong weights, e.g. ignoring the transition density.
    np.testing.assert_allclose(var, true, rtol=0.25)


def test_trace_genealogy_follows_ancestors():
    ancestors = jnp.array([[0, 1, 2], [2, 2, 0], [1, 0, 0], [2, 1, 1]])
    lineages = smoothing.trace_genealogy(ancestors, jnp.array([0, 1, 2]))
    # b_3 = (0,1,2); b_2 = A_3[b_3] = (2,1,1); b_1 = A_2[b_2] = (0,0,0); b_0 = A_1[b_1]
    np.testing.assert_array_equal(
        lineages, [[2, 2, 2], [0, 0, 0], [2, 1, 1], [0, 1, 2]]
    )
    with pytest.raises(ValueError, match="ancestors"):
        smoothing.trace_genealogy(ancestors[0], jnp.array([0]))


def test_requires_history():
    # Abstract evaluation is enough: the errors are raised at trace time.
    def result(return_history):
        return jax.eval_shape(
            lambda k: smcjax.particle_filter(
                k, MODEL, jnp.zeros((3, 2)), 8, return_history=return_history
            ),
            jax.random.key(0),
        )

    res = result(False)
    with pytest.raises(ValueError, match="return_history"):
        smoothing.genealogy(jax.random.key(0), res, 4)
    with pytest.raises(ValueError, match="return_history"):
        smoothing.backward_sampling(jax.random.key(0), MODEL, res, 4)
    with pytest.raises(TypeError, match="model"):
        smoothing.backward_sampling(jax.random.key(0), "model", result(True), 4)
