"""The Feynman–Kac engine: evidence bookkeeping, resampling triggers, transformations.

Oracles: exact recomputation of the estimator from the stored particle system (white
box), closed-form Z for constant potentials, and the Kalman filter (float64) for a
1-D linear-Gaussian model written as a generic one-particle Feynman–Kac model, with
tolerances of 4 Monte Carlo standard errors estimated from the replicates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import smcjax
from smcjax import core, kalman

RHO, SX, SY, T = 0.8, 1.0, 0.7, 8
YS = np.array([0.3, -0.5, 1.2, 0.8, -0.1, -1.0, 0.4, 2.0], np.float32)


def lg_model(vectorized=False):
    """1-D linear Gaussian model, bootstrap filter, as one-particle functions."""
    ys = jnp.asarray(YS)

    def log_g(t, x_prev, x):
        return -0.5 * ((ys[t] - x) / SY) ** 2 - jnp.log(SY * jnp.sqrt(2 * jnp.pi))

    if vectorized:
        return smcjax.FeynmanKac(
            init=lambda key, n: jax.random.normal(key, (n,)),
            propagate=lambda key, t, x: RHO * x + SX * jax.random.normal(key, x.shape),
            log_potential=log_g,
            vectorized=True,
        )
    return smcjax.FeynmanKac(
        init=lambda key: jax.random.normal(key),
        propagate=lambda key, t, x: RHO * x + SX * jax.random.normal(key),
        log_potential=log_g,
    )


def exact_log_z():
    with jax.enable_x64(True):
        params = kalman.LinearGaussianSSM(
            jnp.zeros(1),
            jnp.eye(1),
            RHO * jnp.eye(1),
            SX**2 * jnp.eye(1),
            jnp.eye(1),
            SY**2 * jnp.eye(1),
        )
        return float(kalman.log_likelihood(params, jnp.asarray(YS, jnp.float64)))


def _se(x):
    return np.std(x, ddof=1) / np.sqrt(len(x))


@pytest.mark.parametrize("vectorized", [False, True])
def test_evidence_unbiased_for_every_threshold(vectorized):
    """E[Z_hat] = Z with resampling always, ESS-triggered, and never."""
    fk = lg_model(vectorized)
    log_z = exact_log_z()

    @jax.jit
    def run(keys):
        def one(key):
            return [
                smcjax.smc(key, fk, 32, T, ess_threshold=thr).log_evidence
                for thr in (1.0, 0.5, 0.0)
            ]

        return jax.vmap(one)(keys)

    outs = run(jax.random.split(jax.random.key(0), 2000))
    for thr, est in zip((1.0, 0.5, 0.0), outs, strict=True):
        ratio = np.exp(np.asarray(est, np.float64) - log_z)
        assert abs(ratio.mean() - 1) < 4 * _se(ratio), (vectorized, thr, ratio.mean())


def test_log_evidence_recomputed_from_particle_system():
    """White box: rebuild every increment log Σ_n Ŵ_{t-1}^n G_t(X_t^n) from history."""
    fk = lg_model()
    res = jax.jit(
        lambda k: smcjax.smc(k, fk, 50, T, ess_threshold=0.5, return_history=True)
    )(jax.random.key(3))
    res = jax.tree.map(np.asarray, res)
    assert res.resampled[1:].any() and not res.resampled[1:].all()
    n = 50
    log_w = np.full(n, -np.log(n))
    total = 0.0
    for t in range(T):
        x = res.history[t].astype(np.float64)
        log_g = -0.5 * ((YS[t] - x) / SY) ** 2 - np.log(SY * np.sqrt(2 * np.pi))
        if t > 0:
            ess = 1.0 / np.sum(np.exp(2 * log_w))
            assert res.resampled[t] == (ess < 0.5 * n)
            if res.resampled[t]:
                log_w = np.full(n, -np.log(n))
            else:
                np.testing.assert_array_equal(res.ancestors[t], np.arange(n))
        incr = logsumexp(log_w + log_g)
        log_w = log_w + log_g - incr
        total += incr
        np.testing.assert_allclose(
            res.log_evidence_increments[t], incr, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(res.log_weights_history[t], log_w, atol=1e-4)
        np.testing.assert_allclose(res.ess[t], 1 / np.sum(np.exp(2 * log_w)), rtol=1e-4)
    np.testing.assert_allclose(res.log_evidence, total, rtol=1e-5)
    np.testing.assert_allclose(res.log_weights, log_w, atol=1e-4)


def test_constant_potentials_give_exact_evidence_and_propagation_uses_ancestors():
    """G_t ≡ c_t gives log Z_hat = Σ c_t exactly; a counter state checks the gather."""
    c = jnp.arange(1.0, T + 1.0)
    fk = smcjax.FeynmanKac(
        init=lambda key: jnp.array([0.0, jax.random.uniform(key)]),
        propagate=lambda key, t, x: x.at[0].add(1.0),
        log_potential=lambda t, xp, x: c[t] + 0.0 * x[0],
    )
    for thr in (1.0, 0.5, 0.0):
        res = smcjax.smc(
            jax.random.key(0), fk, 16, T, ess_threshold=thr, return_history=True
        )
        np.testing.assert_allclose(res.log_evidence, float(c.sum()), rtol=1e-6)
        np.testing.assert_allclose(res.ess, 16.0, rtol=1e-5)
        np.testing.assert_array_equal(res.particles[:, 0], T - 1)
        # Particle n at t descends from ancestors[t][n] at t-1: its uniform label is
        # carried over unchanged.
        for t in range(1, T):
            np.testing.assert_array_equal(
                res.history[t][:, 1], res.history[t - 1][res.ancestors[t], 1]
            )
        assert not res.resampled[0]
        assert res.resampled[1:].all() == (thr == 1.0)


def test_final_resample_and_history():
    fk = lg_model()
    res = smcjax.smc(
        jax.random.key(1),
        fk,
        40,
        T,
        final_resample=True,
        return_history=True,
        compute_means=True,
    )
    assert res.history.shape == (T, 40) and res.log_weights_history.shape == (T, 40)
    np.testing.assert_allclose(res.log_weights, -np.log(40.0), rtol=1e-6)
    np.testing.assert_array_equal(res.particles, res.history[-1][res.final_ancestors])
    w = np.exp(res.log_weights_history)
    np.testing.assert_allclose(
        res.filtering_means, (w * res.history).sum(1), rtol=1e-4, atol=1e-5
    )
    assert smcjax.smc(jax.random.key(1), fk, 40, T).final_ancestors is None


def _lg_batch_model(seen):
    """The vectorized model of :func:`lg_model`, accepting any batch size.

    Records the batch sizes it is traced with in ``seen``.
    """
    fk = lg_model(vectorized=True)

    def propagate(key, t, x):
        seen.append(x.shape[0])
        return fk.propagate(key, t, x)

    return fk._replace(propagate=propagate, any_batch_size=True)


@pytest.mark.parametrize("kind", ["vmapped", "any_batch_size"])
@pytest.mark.parametrize(
    ("resampling", "threshold", "n"),
    [
        ("systematic", 0.5, 100),
        ("multinomial", 1.0, 100),
        ("stratified", 1.0, 100),
        ("residual", 0.5, 100),
        ("systematic", 1.0, 1001),
    ],
)
def test_padding_rows_leave_the_filter_unchanged(
    monkeypatch, kind, resampling, threshold, n
):
    """``smc`` runs ``N`` rounded up to 16 rows; the extra rows change nothing.

    Oracle: the same filter without padding rows (``_PAD_FROM`` raised). Particles,
    ancestors, history and resampling flags must be identical (the first ``N`` keys
    and noise draws are the same and padding rows are never drawn as ancestors);
    sums over the particles (log-evidence, ESS, means, normalised log-weights) agree
    up to float32 summation order.
    """
    seen: list[int] = []
    fk = lg_model() if kind == "vmapped" else _lg_batch_model(seen)
    assert core._padded(n) > n

    def run():
        return jax.jit(
            lambda k: smcjax.smc(
                k,
                fk,
                n,
                T,
                resampling=resampling,
                ess_threshold=threshold,
                final_resample=True,
                return_history=True,
                compute_means=True,
            )
        )(jax.random.key(11))

    padded = run()
    if kind == "any_batch_size":
        assert set(seen) == {core._padded(n)}
    monkeypatch.setattr(core, "_PAD_FROM", 10**9)
    plain = run()
    if kind == "any_batch_size":
        assert seen[-1] == n
    _assert_same_filter(padded, plain, n)


def test_padding_rows_stay_at_zero_weight_when_every_weight_vanishes(monkeypatch):
    """All real weights zero at a step: real particles fall back to uniform
    weights, padding rows stay at zero, as in the filter without padding rows."""
    n = 100
    fk = smcjax.FeynmanKac(
        init=lambda key: jax.random.normal(key),
        propagate=lambda key, t, x: 0.5 * x + jax.random.normal(key),
        log_potential=lambda t, xp, x: jnp.where(t == 2, -jnp.inf, -0.5 * x**2),
    )

    def run():
        return smcjax.smc(jax.random.key(4), fk, n, 5, return_history=True)

    padded = run()
    assert padded.log_evidence == -np.inf
    np.testing.assert_allclose(padded.log_weights_history[2], -np.log(n))
    monkeypatch.setattr(core, "_PAD_FROM", 10**9)
    _assert_same_filter(padded, run(), n)


def _assert_same_filter(padded, plain, n):
    exact = ("particles", "ancestors", "resampled", "history", "final_ancestors")
    for field in padded._fields:
        a, b = getattr(padded, field), getattr(plain, field)
        if a is None:
            assert b is None, field
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, field
        if field in (*exact, "log_weights", "log_weights_history"):
            assert a.shape[-1] == n or field == "resampled", field  # cut back to n
        if field in exact:
            np.testing.assert_array_equal(a, b, err_msg=field)
        elif field == "ess":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * n, err_msg=field)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=field)


def test_vectorized_model_gets_exactly_num_particles_rows():
    """A vectorized model without ``any_batch_size`` is never padded (e.g. models
    with per-particle arrays of fixed length)."""
    n = 100
    offsets = jnp.linspace(-1.0, 1.0, n)
    fk = smcjax.FeynmanKac(
        init=lambda key, m: offsets + jax.random.normal(key, (m,)),
        propagate=lambda key, t, x: x + offsets + jax.random.normal(key, x.shape),
        log_potential=lambda t, xp, x: -0.5 * x**2,
        vectorized=True,
    )
    res = smcjax.smc(jax.random.key(0), fk, n, 4)
    assert res.particles.shape == (n,) and np.isfinite(res.log_evidence)


def test_zero_weights_everywhere_give_minus_inf_evidence_without_nan():
    fk = smcjax.FeynmanKac(
        init=lambda key: jax.random.normal(key),
        propagate=lambda key, t, x: x + jax.random.normal(key),
        log_potential=lambda t, xp, x: (
            0.0 * x + jnp.where(t == 2, -jnp.inf, jnp.where(t == 3, jnp.nan, 0.0))
        ),
    )
    res = smcjax.smc(jax.random.key(0), fk, 10, 5, ess_threshold=1.0)
    assert res.log_evidence == -np.inf
    assert np.isfinite(res.particles).all() and np.isfinite(res.log_weights).all()


def test_init_and_step_compose_into_smc():
    fk = lg_model()
    res = smcjax.smc(jax.random.key(5), fk, 20, T, ess_threshold=0.5)
    k0, k_loop, _ = jax.random.split(jax.random.key(5), 3)
    state, info = smcjax.core.init(k0, fk, 20)
    step = core.build_step(fk, ess_threshold=0.5)
    for k in jax.random.split(k_loop, T - 1):
        state, info = jax.jit(step)(k, state)
        assert info.ancestors.shape == (20,) and info.ess.shape == ()
    np.testing.assert_allclose(state.log_evidence, res.log_evidence, rtol=1e-5)
    np.testing.assert_allclose(state.particles, res.particles, rtol=1e-5, atol=1e-6)
    assert int(state.t) == T - 1


def test_jit_vmap_same_key():
    fk = lg_model()

    def run(key):
        return smcjax.smc(key, fk, 30, T, resampling="stratified")

    key = jax.random.key(11)
    a, b = run(key), run(key)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    j = jax.jit(run)(key)
    np.testing.assert_allclose(j.log_evidence, a.log_evidence, rtol=1e-5)
    keys = jax.random.split(key, 8)
    batched = jax.jit(jax.vmap(run))(keys)
    for i, k in enumerate(keys):
        np.testing.assert_allclose(
            batched.log_evidence[i], jax.jit(run)(k).log_evidence, rtol=1e-5
        )
    assert len(np.unique(np.asarray(batched.log_evidence))) == 8
    # A traced threshold (vmapped) takes the lax.cond path.
    thr = jnp.array([0.0, 0.5, 1.0])
    out = jax.jit(jax.vmap(lambda t: smcjax.smc(key, fk, 30, T, ess_threshold=t)))(thr)
    assert not out.resampled[0].any() and out.resampled[2, 1:].all()


def test_bad_inputs():
    fk = lg_model()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_particles"):
        smcjax.smc(key, fk, 0, T)
    with pytest.raises(ValueError, match="num_steps"):
        smcjax.smc(key, fk, 10, 0)
    with pytest.raises(ValueError, match="resampling"):
        smcjax.smc(key, fk, 10, T, resampling="nope")
    with pytest.raises(ValueError, match="ess_threshold"):
        smcjax.smc(key, fk, 10, T, ess_threshold=1.5)
    with pytest.raises(TypeError, match="FeynmanKac"):
        smcjax.smc(key, tuple(fk), 10, T)
    bad = fk._replace(log_potential=lambda t, xp, x: jnp.stack([x, x]))
    with pytest.raises(ValueError, match="log_potential"):
        smcjax.smc(key, bad, 10, T)
