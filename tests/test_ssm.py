"""State-space particle filters against exact answers.

Oracles: the Kalman filter in float64 for linear-Gaussian models (exact log Z and
filtering means) and `particles` 0.4 for the stochastic-volatility model. Tolerances
are multiples (4–5) of Monte Carlo standard errors estimated from the replicates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

import smcjax
from smcjax import kalman, ssm

# --------------------------------------------------------------------------- fixtures

D, P, T = 3, 2, 10
_F = np.array([[0.8, 0.2, 0.0], [-0.1, 0.7, 0.1], [0.0, 0.3, 0.6]])
_Q = np.array([[0.5, 0.1, 0.0], [0.1, 0.4, 0.05], [0.0, 0.05, 0.3]])
_H = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
_R = np.array([[0.3, 0.05], [0.05, 0.2]])
PARAMS = kalman.LinearGaussianSSM(
    np.array([0.5, -0.5, 0.0]), np.eye(D), _F, _Q, _H, _R, np.array([0.1, 0.0, -0.1])
)
MODEL = kalman.to_state_space_model(
    kalman.LinearGaussianSSM(
        *(None if a is None else jnp.asarray(a, jnp.float32) for a in PARAMS)
    )
)


def _kalman64(params, ys):
    with jax.enable_x64(True):
        p64 = kalman.LinearGaussianSSM(
            *(None if a is None else jnp.asarray(a, jnp.float64) for a in params)
        )
        out = kalman.kalman_filter(p64, jnp.asarray(np.asarray(ys), jnp.float64))
        return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def data():
    _, ys = jax.jit(lambda k: ssm.simulate(k, MODEL, T))(jax.random.key(42))
    return ys, _kalman64(PARAMS, ys)


def _optimal_proposal(inflate):
    """p(x_t | x_{t-1}, y_t) of the linear-Gaussian model, covariance inflated."""
    f, q, h, r = (jnp.asarray(a, jnp.float32) for a in (_F, _Q, _H, _R))
    b, m0 = (
        jnp.asarray(PARAMS.transition_offset, jnp.float32),
        jnp.asarray(PARAMS[0], jnp.float32),
    )
    hr = h.T @ jnp.linalg.inv(r)

    def moments(prior_mean, prior_cov, y):
        prec_prior = jnp.linalg.inv(prior_cov)
        cov = jnp.linalg.inv(prec_prior + hr @ h)
        return cov @ (prec_prior @ prior_mean + hr @ y), cov

    def proposal(t, x_prev, y):
        if x_prev is None:
            mean, cov = moments(m0, jnp.eye(D), y)
        else:
            mean, cov = moments(f @ x_prev + b, q, y)
        return dist.MultivariateNormal(mean, covariance_matrix=inflate * cov)

    return proposal


FILTERS = {
    "bootstrap": {},
    "guided": {"proposal": _optimal_proposal(1.5)},
    "auxiliary": {"auxiliary": True},
}


def _se(x, axis=0):
    return np.std(x, axis=axis, ddof=1) / np.sqrt(x.shape[axis])


# ---------------------------------------------------------- unbiasedness vs Kalman


@pytest.mark.parametrize("kind", list(FILTERS))
def test_evidence_unbiased_and_means_match_kalman(kind, data):
    ys, kf = data
    num_seeds, n = 200, 400
    kw = FILTERS[kind]

    @jax.jit
    def run(keys):
        def one(key):
            outs = {}
            for thr in (1.0, 0.2):
                r = smcjax.particle_filter(key, MODEL, ys, n, ess_threshold=thr, **kw)
                outs[thr] = (r.log_evidence, r.filtering_means, r.resampled)
            return outs

        return jax.vmap(one)(keys)

    outs = jax.tree.map(np.asarray, run(jax.random.split(jax.random.key(7), num_seeds)))
    for thr, (log_z, means, resampled) in outs.items():
        # E[Z_hat / Z] = 1 (unbiasedness on the natural scale).
        ratio = np.exp(log_z.astype(np.float64) - kf.log_likelihood)
        assert abs(ratio.mean() - 1.0) < 4 * _se(ratio), (
            kind,
            thr,
            ratio.mean(),
            _se(ratio),
        )
        # Filtering means: O(1/N) bias is well below the error bar at N=400, 200 seeds.
        err = np.abs(means.mean(0) - kf.filtered_means)
        assert np.all(err < 5 * _se(means) + 1e-4), (
            kind,
            thr,
            (err / _se(means)).max(),
        )
        if thr == 1.0:
            assert resampled[:, 1:].all() and not resampled[:, 0].any()
        else:
            # ESS-triggered (threshold 0.2): some steps resample, some do not.
            assert 0 < resampled[:, 1:].mean() < 1, resampled.mean()


def test_log_evidence_bias_shrinks_with_n(data):
    ys, kf = data
    keys = jax.random.split(jax.random.key(3), 300)

    def bias(n):
        f = jax.jit(
            jax.vmap(lambda k: smcjax.particle_filter(k, MODEL, ys, n).log_evidence)
        )
        err = np.asarray(f(keys), np.float64) - kf.log_likelihood
        return err.mean(), _se(err)

    b_small, se_small = bias(10)
    b_large, se_large = bias(160)
    # log Z_hat is biased downwards by ~Var/2 = O(1/N): clearly negative at N=10,
    # and the bias at N=160 is smaller by a margin of many standard errors.
    assert b_small < -4 * se_small
    assert b_large - b_small > 4 * np.hypot(se_small, se_large)
    assert abs(b_large) < abs(b_small) / 4


def test_time_varying_model_matches_kalman():
    n_steps = 12
    rng = np.random.default_rng(5)
    f = 0.5 + 0.4 * rng.uniform(size=(n_steps, 1, 1))
    r = 0.1 + rng.uniform(size=(n_steps, 1, 1))
    params = kalman.LinearGaussianSSM(
        np.zeros(1), np.eye(1), f, 0.5 * np.ones((1, 1)), np.ones((1, 1)), r
    )

    def model_fn(t, x):  # time-varying through t, written by hand (scalar state)
        return dist.Normal(jnp.asarray(f[:, 0, 0], jnp.float32)[t] * x, np.sqrt(0.5))

    model = ssm.StateSpaceModel(
        initial=lambda: dist.Normal(0.0, 1.0),
        transition=model_fn,
        emission=lambda t, x: dist.Normal(
            x, jnp.sqrt(jnp.asarray(r[:, 0, 0], jnp.float32)[t])
        ),
    )
    _, ys = ssm.simulate(jax.random.key(1), model, n_steps)
    kf = _kalman64(params, ys)
    f_run = jax.jit(jax.vmap(lambda k: smcjax.particle_filter(k, model, ys, 300)))
    out = f_run(jax.random.split(jax.random.key(2), 200))
    ratio = np.exp(np.asarray(out.log_evidence, np.float64) - kf.log_likelihood)
    assert abs(ratio.mean() - 1) < 4 * _se(ratio)
    means = np.asarray(out.filtering_means)
    assert means.shape == (200, n_steps)
    assert np.all(
        np.abs(means.mean(0) - kf.filtered_means[:, 0]) < 5 * _se(means) + 1e-4
    )


def test_simulate_matches_prior_moments():
    xs, ys = jax.jit(jax.vmap(lambda k: ssm.simulate(k, MODEL, 5)))(
        jax.random.split(jax.random.key(0), 4000)
    )
    assert xs.shape == (4000, 5, D) and ys.shape == (4000, 5, P)
    m = np.asarray(PARAMS.initial_mean)
    for t in range(5):
        if t > 0:
            m = _F @ m + PARAMS.transition_offset
        assert np.all(
            np.abs(np.asarray(xs[:, t]).mean(0) - m) < 5 * _se(np.asarray(xs[:, t]))
        )
        assert np.all(
            np.abs(np.asarray(ys[:, t]).mean(0) - _H @ m)
            < 5 * _se(np.asarray(ys[:, t]))
        )


# --------------------------------------------------------- stochastic volatility


def test_stochastic_volatility_matches_particles():
    """log Z_hat of smcjax and of `particles` 0.4 have the same law.

    Same algorithm (bootstrap, systematic, ESS threshold 0.5) and same N, so their
    means agree within error bars.
    """
    particles = pytest.importorskip("particles", reason="particles 0.4 is the oracle")
    from particles import state_space_models as pssm

    mu, rho, sigma = -1.02, 0.9702, 0.178  # Pitt & Shephard (1999)
    n_steps, n = 100, 10_000
    sv = pssm.StochVol(mu=mu, rho=rho, sigma=sigma)
    rng = np.random.default_rng(11)
    x = np.empty(n_steps)
    x[0] = mu + sigma / np.sqrt(1 - rho**2) * rng.normal()
    for t in range(1, n_steps):
        x[t] = mu + rho * (x[t - 1] - mu) + sigma * rng.normal()
    y = np.exp(0.5 * x) * rng.normal(size=n_steps)

    np.random.seed(0)  # noqa: NPY002 -- particles draws from NumPy's global RNG
    ref = []
    for _ in range(8):
        fk = particles.SMC(
            fk=pssm.Bootstrap(ssm=sv, data=y), N=n, resampling="systematic", ESSrmin=0.5
        )
        fk.run()
        ref.append(fk.logLt)
    ref = np.array(ref)

    model = ssm.StateSpaceModel(
        initial=lambda: dist.Normal(mu, sigma / np.sqrt(1 - rho**2)),
        transition=lambda t, x: dist.Normal(mu + rho * (x - mu), sigma),
        emission=lambda t, x: dist.Normal(0.0, jnp.exp(0.5 * x)),
    )
    ys = jnp.asarray(y, jnp.float32)
    f = jax.jit(
        jax.vmap(lambda k: smcjax.particle_filter(k, model, ys, n).log_evidence)
    )
    ours = np.asarray(f(jax.random.split(jax.random.key(0), 16)), np.float64)
    diff = ours.mean() - ref.mean()
    assert abs(diff) < 4 * np.hypot(_se(ours), _se(ref)), (ours.mean(), ref.mean())


# ------------------------------------------------------ transformations and inputs


def test_jit_vmap_and_determinism(data):
    ys, _ = data

    def run(key):
        return smcjax.particle_filter(key, MODEL, ys, 64, auxiliary=True)

    key = jax.random.key(9)
    f = jax.jit(run)
    a, b = f(key), f(key)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # same key -> identical
    keys = jax.random.split(key, 8)
    batched = jax.jit(jax.vmap(run))(keys)
    assert batched.log_evidence.shape == (8,) and batched.filtering_means.shape == (
        8,
        T,
        D,
    )
    for i, k in enumerate(keys):
        single = f(k)
        np.testing.assert_allclose(
            batched.log_evidence[i], single.log_evidence, rtol=1e-5
        )
        np.testing.assert_allclose(
            batched.filtering_means[i], single.filtering_means, rtol=1e-4, atol=1e-5
        )
    assert len(np.unique(np.asarray(batched.log_evidence))) == 8


def test_rbg_keys_are_supported():
    """A faster-on-accelerators PRNG (``impl="rbg"``) works and is unbiased."""
    model = ssm.StateSpaceModel(
        initial=lambda: dist.Normal(0.0, 1.0),
        transition=lambda t, x: dist.Normal(0.9 * x, 1.0),
        emission=lambda t, x: dist.Normal(x, 0.5),
    )
    ys = jnp.asarray([0.5, -0.3, 1.1, 0.2, -0.8, 0.0], jnp.float32)
    params = kalman.LinearGaussianSSM(
        np.zeros(1), np.eye(1), 0.9 * np.eye(1), np.eye(1), np.eye(1), 0.25 * np.eye(1)
    )
    log_z = _kalman64(params, ys[:, None]).log_likelihood
    keys = jax.vmap(lambda i: jax.random.key(i, impl="rbg"))(jnp.arange(500))
    f = jax.jit(
        jax.vmap(lambda k: smcjax.particle_filter(k, model, ys, 32).log_evidence)
    )
    ratio = np.exp(np.asarray(f(keys), np.float64) - log_z)
    assert abs(ratio.mean() - 1) < 4 * _se(ratio)
    assert len(np.unique(ratio)) == 500


def test_bad_inputs_raise_naming_the_argument(data):
    ys, _ = data
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="observations"):
        smcjax.particle_filter(key, MODEL, ys[:, :1], 10)  # wrong event shape
    with pytest.raises(ValueError, match="observations"):
        smcjax.particle_filter(key, MODEL, ys[:0], 10)  # zero time steps
    with pytest.raises(ValueError, match="observations"):
        smcjax.particle_filter(key, MODEL, ys[0], 10)  # missing time axis
    bad = np.asarray(ys).copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"observations must be finite.*\[3, 1\]"):
        smcjax.particle_filter(key, MODEL, bad, 10)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="observations must be finite"):
        jax.jit(lambda k: smcjax.particle_filter(k, MODEL, bad, 10).log_evidence)(key)
    with pytest.raises(ValueError, match="resampling"):
        smcjax.particle_filter(key, MODEL, ys, 10, resampling="sysstematic")
    with pytest.raises(ValueError, match="num_particles"):
        smcjax.particle_filter(key, MODEL, ys, 0)
    with pytest.raises(TypeError, match="proposal"):
        smcjax.particle_filter(key, MODEL, ys, 10, proposal="optimal")
    with pytest.raises(TypeError, match="model"):
        smcjax.particle_filter(key, MODEL[:2], ys, 10)
    no_event = ssm.StateSpaceModel(
        MODEL.initial,
        MODEL.transition,
        lambda t, x: dist.Normal(_H.astype(np.float32) @ x, 1.0),
    )
    with pytest.raises(ValueError, match="to_event"):
        smcjax.particle_filter(key, no_event, ys, 10)


# ------------------------------------------------------------- batched sampling


@pytest.mark.parametrize(
    "make, cdf",
    [
        (lambda p: dist.Normal(p, 2.0), stats.norm(1.0, 2.0).cdf),
        (lambda p: dist.Laplace(p, 1.0), stats.laplace(1.0, 1.0).cdf),
        (lambda p: dist.Cauchy(p, 1.0), stats.cauchy(1.0, 1.0).cdf),
        (lambda p: dist.Uniform(p, 3.0), stats.uniform(1.0, 2.0).cdf),
        (lambda p: dist.Exponential(p), stats.expon(scale=1.0).cdf),
        (lambda p: dist.Gamma(2.0 * p, 1.0), stats.gamma(2.0).cdf),
        (
            lambda p: dist.MultivariateNormal(jnp.full(2, p), jnp.eye(2)),
            stats.norm(1.0).cdf,
        ),
        (
            lambda p: dist.LowRankMultivariateNormal(
                jnp.full(2, p), jnp.zeros((2, 1)), jnp.ones(2)
            ),
            stats.norm(1.0).cdf,
        ),
        (lambda p: dist.Normal(jnp.full(2, p), 1.0).to_event(1), stats.norm(1.0).cdf),
        (
            lambda p: dist.LogNormal(p, 1.0),
            stats.lognorm(1.0, scale=np.e).cdf,
        ),  # fallback
        (lambda p: dist.StudentT(3.0, p, 1.0), stats.t(3.0, 1.0).cdf),  # fallback
    ],
)
def test_sample_batched_draws_independent_particles(make, cdf):
    n = 2000
    draws = np.asarray(ssm.sample_batched(jax.random.key(0), make, jnp.ones(n)))
    first = draws.reshape(n, -1)[:, 0]
    assert len(np.unique(first)) == n  # one independent draw per particle
    assert stats.kstest(first, cdf).pvalue > 1e-4
