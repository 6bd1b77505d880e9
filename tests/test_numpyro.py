"""The NumPyro bridge: model -> tempered SMC, against quadrature and NumPyro's NUTS.

SMC error bars come from R independent replicates (vmap over keys); NUTS error bars from
its effective sample size (numpyro.diagnostics). Differences are compared with the
combined standard error, |SMC - NUTS| < 4.5 sqrt(se_smc² + se_nuts²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from scipy import integrate, stats

import smcjax.numpyro as snp

R = 16
TOL = 4.5


def _smc(model, *args, num_particles=1000, **kw):
    run = jax.jit(
        jax.vmap(
            lambda k: snp.tempered_smc(
                k, model, *args, num_particles=num_particles, **kw
            )
        )
    )
    return run(jax.random.split(jax.random.key(7), R))


def _nuts(model, *args, num_samples=2000, num_chains=1):
    mcmc = MCMC(
        NUTS(model),
        num_warmup=500,
        num_samples=num_samples,
        num_chains=num_chains,
        progress_bar=False,
    )
    mcmc.run(jax.random.key(11), *args)
    return mcmc.get_samples(group_by_chain=True)


def _compare(smc_samples, nuts_samples, names):
    for name in names:
        s = np.asarray(smc_samples[name], np.float64)  # (R, N, ...)
        per_rep = s.mean(1)
        m_smc = per_rep.mean(0)
        se_smc = per_rep.std(0, ddof=1) / np.sqrt(R)
        x = np.asarray(nuts_samples[name], np.float64)  # (C, S, ...)
        ess = np.asarray(effective_sample_size(x))
        m_nuts = x.mean((0, 1))
        se_nuts = x.std((0, 1)) / np.sqrt(ess)
        z = (m_smc - m_nuts) / np.sqrt(se_smc**2 + se_nuts**2)
        assert np.all(np.abs(z) < TOL), f"{name}: smc {m_smc} nuts {m_nuts} z {z}"


# ------------------------------------------- HalfNormal scale: quadrature oracle

Y_SCALE = jnp.array([0.8, -1.3, 2.1, 0.4, -0.6, 1.7])


def scale_model(y):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.deterministic("variance", sigma**2)
    numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def test_constrained_scale_evidence_and_posterior():
    """σ ~ HalfNormal(1), y_i ~ N(0, σ²): log p(y) and E[σ | y] by 1-d quadrature.

    The sampler runs on log σ, so a missing or wrong Jacobian would bias both.
    """
    y = np.asarray(Y_SCALE, np.float64)
    dens = lambda s: stats.halfnorm.pdf(s) * np.prod(stats.norm.pdf(y, 0, s))
    opts = dict(points=[0.5, 1, 2, 4], limit=500)
    z = integrate.quad(dens, 0, 50, **opts)[0]
    mean = integrate.quad(lambda s: s * dens(s), 0, 50, **opts)[0] / z

    res = _smc(scale_model, Y_SCALE, num_particles=2000)
    sig = np.asarray(res.samples["sigma"])
    assert sig.shape == (R, 2000)
    assert np.all(sig > 0)  # constrained space
    np.testing.assert_allclose(res.samples["variance"], sig**2, rtol=1e-5)
    for est, truth, what in [
        (np.asarray(res.log_evidence), np.log(z), "log Z"),
        (sig.mean(1), mean, "E[sigma]"),
    ]:
        se = est.std(ddof=1) / np.sqrt(R)
        assert abs(est.mean() - truth) < TOL * se, (what, est.mean(), truth, se)

    idata = snp.to_arviz(res)
    assert idata.posterior["sigma"].shape == (R, 2000)
    np.testing.assert_allclose(
        idata.attrs["log_evidence"], np.asarray(res.log_evidence), rtol=1e-6
    )
    assert "log_evidence" in idata.sample_stats
    one = jax.tree.map(lambda a: a[0], res)
    idata1 = one.to_arviz()
    assert idata1.posterior["sigma"].shape == (1, 2000)
    assert idata1.posterior.attrs["log_evidence"] == pytest.approx(
        float(res.log_evidence[0])
    )


# ------------------------------------------------------------------ eight schools

Y8 = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA8 = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def test_eight_schools_matches_nuts():
    res = _smc(eight_schools, SIGMA8, Y8, num_particles=1000, num_mcmc_steps=10)
    nuts = _nuts(eight_schools, SIGMA8, Y8, num_samples=3000, num_chains=1)
    assert np.all(np.asarray(res.samples["tau"]) > 0)
    assert res.samples["theta"].shape == (R, 1000, 8)
    _compare(res.samples, nuts, ["mu", "tau", "theta"])
    assert np.all(np.isfinite(np.asarray(res.log_evidence)))


# -------------------------------------------------------------- logistic regression


def _logistic_data():
    rng = np.random.default_rng(1)
    n, d = 120, 4
    x = rng.normal(size=(n, d))
    w = np.array([1.0, -2.0, 0.5, 0.0])
    y = rng.random(n) < 1 / (1 + np.exp(-(x @ w + 0.3)))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def logistic(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 2.0).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    numpyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


def test_logistic_regression_matches_nuts():
    x, y = _logistic_data()
    res = _smc(logistic, x, y, num_particles=1000, kernel="mala", num_mcmc_steps=5)
    nuts = _nuts(logistic, x, y, num_samples=2000)
    _compare(res.samples, nuts, ["w", "b"])


# ------------------------------------------------------------------------ errors


def test_model_without_observed_site_is_an_error():
    def prior_only():
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed site"):
        snp.tempered_smc(jax.random.key(0), prior_only, num_particles=10)


def test_model_keyword_passed_as_sampler_option_is_an_error():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(TypeError, match=r"model_kwargs=\{'y': \.\.\.\}"):
        snp.tempered_smc(jax.random.key(0), model, y=1.0, num_particles=10)


def test_discrete_latent_site_is_an_error():
    def model(y):
        k = numpyro.sample("k", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(ValueError, match="'k' is discrete"):
        snp.tempered_smc(jax.random.key(0), model, 1.0, num_particles=10)


def test_split_model_sites_and_jacobian():
    t = snp.split_model(scale_model, Y_SCALE)
    assert t.latent_sites == ("sigma",)
    assert t.observed_sites == ("y",)
    u = {"sigma": jnp.asarray(0.3)}
    s = np.exp(0.3)
    # log HalfNormal(e^u) + u (Jacobian of exp)
    np.testing.assert_allclose(
        t.log_prior(u), stats.halfnorm.logpdf(s) + 0.3, rtol=1e-5
    )
    np.testing.assert_allclose(
        t.log_likelihood(u),
        stats.norm.logpdf(np.asarray(Y_SCALE), 0, s).sum(),
        rtol=1e-5,
    )
    assert set(t.constrain(u)) == {"sigma", "variance"}
