r"""The NumPyro bridge, in both directions.

**Model → target.** A NumPyro model defines a joint density over latent sites
:math:`\theta` and observed sites :math:`y`. :func:`split_model` splits it, on the
unconstrained space :math:`u = T^{-1}(\theta)` (``biject_to(support)``) used by
NumPyro's own samplers, into

.. math::

    \log p_0(u) = \sum_{\text{latent } s} \log p(\theta_s \mid \cdot)
    + \log \left|\det J_T(u)\right|,
    \qquad
    \log L(u) = \sum_{\text{observed } s} \log p(y_s \mid \cdot),

(``numpyro.factor`` sites count as observed). Since the Jacobian goes with the prior,
:math:`\int p_0(u) L(u)\,du = p(y)`: the tempered sampler's :math:`\hat Z` estimates the
model evidence. :func:`tempered_smc` draws the initial particles from the prior by
running the model, tempers with :func:`smcjax.tempered_smc`, and maps the particles back
to the constrained space (with the model's ``deterministic`` sites), like
``MCMC.get_samples()``.

**SSM → model.** :func:`particle_filter_factor` adds a particle filter's log-likelihood
estimate :math:`\log \hat p(y_{0:T-1} \mid \theta)` to a NumPyro model as a
``numpyro.factor``; :func:`pmmh` runs particle-marginal Metropolis–Hastings on such a
model (a fresh filter, with a fresh key, at every proposal).

Note: this module is ``smcjax.numpyro``; inside it ``import numpyro`` is the real
NumPyro package (absolute imports).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.distributions import biject_to

from smcjax.tempered import TemperedSMCResult
from smcjax.tempered import tempered_smc as _tempered_smc
from smcjax.types import Array, PRNGKey

__all__ = [
    "NumPyroSMCResult",
    "NumPyroTarget",
    "particle_filter_factor",
    "pmmh",
    "split_model",
    "tempered_smc",
    "to_arviz",
]


class NumPyroTarget(NamedTuple):
    """A NumPyro model split into one-particle functions on the unconstrained space.

    Attributes
    ----------
    log_prior
        ``u -> scalar``: latent log-densities plus the log-Jacobian of ``u -> θ``.
    log_likelihood
        ``u -> scalar``: the observed (and ``factor``) sites.
    sample_prior
        ``(key, num_particles) -> u``: i.i.d. prior draws (dict of arrays, leading
        axis ``N``), unconstrained.
    constrain
        ``u -> dict``: constrained latent values and ``deterministic`` sites.
    latent_sites, observed_sites
        Site names.
    """

    log_prior: Callable[[dict], Array]
    log_likelihood: Callable[[dict], Array]
    sample_prior: Callable[[PRNGKey, int], dict]
    constrain: Callable[[dict], dict]
    latent_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]


class NumPyroSMCResult(NamedTuple):
    r"""Output of :func:`tempered_smc`.

    Attributes
    ----------
    samples
        Dict of constrained site values, leading axis ``N`` (equally weighted), like
        ``numpyro.infer.MCMC.get_samples()``; includes ``deterministic`` sites.
    log_evidence
        :math:`\log \hat p(y)`.
    smc
        The full :class:`smcjax.tempered.TemperedSMCResult` (unconstrained particles,
        temperatures, acceptance rates, ...).
    """

    samples: dict
    log_evidence: Array
    smc: TemperedSMCResult

    def to_arviz(self, **kwargs: Any):
        """Convert to ``arviz.InferenceData``; see :func:`to_arviz`."""
        return to_arviz(self, **kwargs)


def _site_log_prob(site) -> Array:
    fn, value = site["fn"], site["value"]
    if site["intermediates"]:
        lp = fn.log_prob(value, site["intermediates"])
    else:
        lp = fn.log_prob(value)
    if site["scale"] is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


def _is_latent(site) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary", False)
    )


def split_model(
    model: Callable[..., Any],
    *model_args: Any,
    model_kwargs: dict | None = None,
    seed: int = 0,
) -> NumPyroTarget:
    """Split a NumPyro model into prior and likelihood on the unconstrained space.

    Parameters
    ----------
    model
        A NumPyro model (a callable with ``numpyro.sample`` sites).
    *model_args, model_kwargs
        Arguments of the model (data).
    seed
        The model is run under ``handlers.seed(model, seed)`` when evaluating
        densities, so models that call ``numpyro.prng_key()`` stay deterministic.

    Raises
    ------
    ValueError
        If the model has no observed site or no continuous latent site, or a latent
        site is discrete.
    """
    if not callable(model):
        raise TypeError(f"model must be a NumPyro model (callable), got {model!r}")
    kwargs = {} if model_kwargs is None else dict(model_kwargs)
    proto = handlers.trace(handlers.seed(model, jax.random.key(seed))).get_trace(
        *model_args, **kwargs
    )
    latent = tuple(name for name, s in proto.items() if _is_latent(s))
    observed = tuple(
        name for name, s in proto.items() if s["type"] == "sample" and s["is_observed"]
    )
    if not observed:
        raise ValueError(
            "model has no observed site (numpyro.sample(..., obs=...) or "
            "numpyro.factor): tempered SMC needs a likelihood to temper"
        )
    if not latent:
        raise ValueError("model has no latent sample site to infer")
    for name in latent:
        if proto[name]["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete; smcjax.numpyro supports continuous "
                "latent sites only (marginalise it out or use enumeration)"
            )
    latent_set = set(latent)

    def run(u: dict):
        jac = []

        def sub(site):
            name = site["name"]
            if name in latent_set and site["type"] == "sample":
                t = biject_to(site["fn"].support)
                x = t(u[name])
                jac.append(jnp.sum(t.log_abs_det_jacobian(u[name], x)))
                return x
            return None

        tr = handlers.trace(
            handlers.substitute(
                handlers.seed(model, jax.random.key(seed)), substitute_fn=sub
            )
        ).get_trace(*model_args, **kwargs)
        return tr, sum(jac, start=jnp.zeros(()))

    def parts(u: dict) -> tuple[Array, Array]:
        tr, log_jac = run(u)
        lp = log_jac
        ll = jnp.zeros(())
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            if name in latent_set:
                lp = lp + _site_log_prob(site)
            elif site["is_observed"]:
                ll = ll + _site_log_prob(site)
        return lp, ll

    def log_prior(u: dict) -> Array:
        return parts(u)[0]

    def log_likelihood(u: dict) -> Array:
        return parts(u)[1]

    def sample_one(key: PRNGKey) -> dict:
        tr = handlers.trace(handlers.seed(model, key)).get_trace(*model_args, **kwargs)
        return {
            name: biject_to(tr[name]["fn"].support).inv(tr[name]["value"])
            for name in latent
        }

    def sample_prior(key: PRNGKey, num_particles: int) -> dict:
        return jax.vmap(sample_one)(jax.random.split(key, num_particles))

    def constrain(u: dict) -> dict:
        tr, _ = run(u)
        return {
            name: site["value"]
            for name, site in tr.items()
            if name in latent_set or site["type"] == "deterministic"
        }

    return NumPyroTarget(
        log_prior, log_likelihood, sample_prior, constrain, latent, observed
    )


def tempered_smc(
    key: PRNGKey,
    model: Callable[..., Any],
    *model_args: Any,
    num_particles: int,
    model_kwargs: dict | None = None,
    **kw: Any,
) -> NumPyroSMCResult:
    r"""Tempered SMC from a NumPyro model's prior to its posterior.

    Parameters
    ----------
    key
        PRNG key.
    model, *model_args, model_kwargs
        The NumPyro model and its arguments.
    num_particles
        ``N`` (static).
    **kw
        Options of :func:`smcjax.tempered_smc` (``kernel``, ``num_mcmc_steps``,
        ``target_ess``, ``schedule``, ``waste_free``, ...).

    Returns
    -------
    NumPyroSMCResult
        ``samples`` (dict of constrained values, leading axis ``N``),
        ``log_evidence`` (:math:`\log \hat p(y)`), and the raw ``smc`` result;
        ``.to_arviz()`` converts to ArviZ.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> def model(y):
    ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ...     numpyro.sample("y", dist.Normal(mu, sigma), obs=y)
    >>> out = tempered_smc(jax.random.key(0), model, jnp.array([0.3, -0.2, 0.5]),
    ...                    num_particles=500)
    >>> bool(jnp.all(out.samples["sigma"] > 0))
    True
    """
    _check_sampler_options(kw)
    target = split_model(model, *model_args, model_kwargs=model_kwargs)
    k_init, k_smc = jax.random.split(key)
    u0 = target.sample_prior(k_init, num_particles)
    res = _tempered_smc(k_smc, target.log_prior, target.log_likelihood, u0, **kw)
    samples = jax.vmap(target.constrain)(res.particles)
    return NumPyroSMCResult(samples, res.log_evidence, res)


def _check_sampler_options(kw: dict) -> None:
    """Reject keywords that are not options of :func:`smcjax.tempered_smc`.

    A model keyword passed by mistake as ``y=...`` would otherwise be silently
    lost (the model would then have no observed site).
    """
    import inspect

    params = inspect.signature(_tempered_smc).parameters
    allowed = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(
            f"unknown keyword argument(s) {unknown} for smcjax.numpyro.tempered_smc; "
            f"pass the model's keyword arguments as model_kwargs={{...}}, e.g. "
            f"model_kwargs={{{unknown[0]!r}: ...}}; sampler options are "
            f"{sorted(allowed)}"
        )


def to_arviz(result: NumPyroSMCResult, **kwargs: Any):
    """Convert a :class:`NumPyroSMCResult` to ``arviz.InferenceData``.

    The particles become the draws of one chain; if ``result`` comes from
    ``jax.vmap`` over keys (``log_evidence`` has shape ``(R,)``) each replicate is a
    chain. The log-evidence (a float, or a list per chain) is stored in
    ``idata.attrs["log_evidence"]`` and ``idata.posterior.attrs["log_evidence"]``, and
    as ``sample_stats["log_evidence"]`` (constant per chain). Extra ``kwargs`` go to
    ``arviz.from_dict``.
    """
    import arviz as az
    import numpy as np

    log_z = np.asarray(result.log_evidence)
    batched = log_z.ndim == 1
    posterior = {
        k: (np.asarray(v) if batched else np.asarray(v)[None])
        for k, v in result.samples.items()
    }
    chains, draws = next(iter(posterior.values())).shape[:2]
    lz = log_z.reshape(-1)
    stats = {"log_evidence": np.broadcast_to(lz[:, None], (chains, draws)).copy()}
    attrs = {"log_evidence": lz.tolist() if batched else float(lz[0])}
    idata = az.from_dict(posterior=posterior, sample_stats=stats, attrs=attrs, **kwargs)
    idata.posterior.attrs["log_evidence"] = attrs["log_evidence"]
    return idata


# ------------------------------------------------------------ SSM -> NumPyro model


def particle_filter_factor(
    name: str,
    model: Any,
    observations: Array,
    num_particles: int,
    *,
    key: PRNGKey | None = None,
    **pf_kwargs: Any,
) -> Array:
    r"""Add :math:`\log \hat p(y_{0:T-1} \mid \theta)` to a NumPyro model as a factor.

    Runs :func:`smcjax.particle_filter` on the :class:`smcjax.StateSpaceModel`
    ``model`` (built from the model's latent parameters) and records its
    log-evidence with ``numpyro.factor(name, ...)``. The key is ``key`` or, when
    ``None``, ``numpyro.prng_key()`` (the model must then run under
    ``handlers.seed``, as in :func:`pmmh`). Returns the log-likelihood estimate.

    Because :math:`\hat p` is unbiased, a Metropolis–Hastings chain that keeps the
    estimate of its current state targets the exact posterior (Andrieu, Doucet &
    Holenstein 2010): use :func:`pmmh`, not gradient-based samplers.
    """
    from smcjax.ssm import particle_filter

    if key is None:
        key = numpyro.prng_key()
        if key is None:
            raise ValueError(
                "particle_filter_factor needs a key: pass key=... or run the model "
                "under numpyro.handlers.seed (smcjax.numpyro.pmmh does this)"
            )
    res = particle_filter(key, model, observations, num_particles, **pf_kwargs)
    numpyro.factor(name, res.log_evidence)
    return res.log_evidence


class NumPyroPMMHResult(NamedTuple):
    """Output of :func:`pmmh`.

    Attributes
    ----------
    samples
        Dict of constrained latent values, shape ``(num_chains, num_iterations, ...)``.
    acceptance_rate
        ``(num_chains,)`` fraction of accepted proposals.
    log_target
        ``(num_chains, num_iterations)`` the current (estimated) log-target.
    """

    samples: dict
    acceptance_rate: Array
    log_target: Array


def pmmh(
    key: PRNGKey,
    model: Callable[..., Any],
    *model_args: Any,
    num_iterations: int,
    num_chains: int = 1,
    step_size: float | Array = 0.1,
    cov: Array | None = None,
    init_params: dict | None = None,
    model_kwargs: dict | None = None,
) -> NumPyroPMMHResult:
    r"""Particle-marginal Metropolis–Hastings on a NumPyro model.

    The model's (noisy, unbiased) likelihood typically comes from
    :func:`particle_filter_factor`. The chain lives on the unconstrained space
    :math:`u` with target :math:`p_0(u)\,\hat L(u)` (Jacobian included), proposes
    :math:`u' = u + h\,C^{1/2} z` and re-runs the model under a fresh seed for every
    proposal; see :func:`smcjax.pmmh.random_walk_pmmh`.

    ``init_params``: dict of constrained initial values (default: one prior draw per
    chain).
    """
    from smcjax.pmmh import random_walk_pmmh

    kwargs = {} if model_kwargs is None else dict(model_kwargs)
    target = split_model(model, *model_args, model_kwargs=kwargs)
    latent = set(target.latent_sites)

    def log_target(k: PRNGKey, u: dict) -> Array:
        jac = []

        def sub(site):
            if site["name"] in latent and site["type"] == "sample":
                t = biject_to(site["fn"].support)
                x = t(u[site["name"]])
                jac.append(jnp.sum(t.log_abs_det_jacobian(u[site["name"]], x)))
                return x
            return None

        tr = handlers.trace(
            handlers.substitute(handlers.seed(model, k), substitute_fn=sub)
        ).get_trace(*model_args, **kwargs)
        out = sum(jac, start=jnp.zeros(()))
        for site in tr.values():
            if site["type"] == "sample":
                out = out + _site_log_prob(site)
        return out

    k_init, k_run = jax.random.split(key)
    if init_params is None:
        u0 = target.sample_prior(k_init, num_chains)
    else:
        proto = handlers.trace(handlers.seed(model, 0)).get_trace(*model_args, **kwargs)
        u0 = {
            name: jnp.broadcast_to(
                biject_to(proto[name]["fn"].support).inv(jnp.asarray(v)),
                (num_chains, *jnp.shape(proto[name]["value"])),
            )
            for name, v in init_params.items()
        }
        missing = latent - set(u0)
        if missing:
            raise ValueError(f"init_params is missing latent sites {sorted(missing)}")
    res = random_walk_pmmh(
        k_run,
        log_target,
        u0,
        num_iterations=num_iterations,
        step_size=step_size,
        cov=cov,
    )
    samples = jax.vmap(jax.vmap(target.constrain))(res.samples)
    samples = {k: v for k, v in samples.items() if k in latent}
    return NumPyroPMMHResult(samples, res.acceptance_rate, res.log_target)
