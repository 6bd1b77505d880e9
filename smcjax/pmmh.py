r"""Particle-marginal Metropolis–Hastings (Andrieu, Doucet & Holenstein 2010).

For a family of state-space models :math:`\{p_\theta\}` the marginal likelihood
:math:`p_\theta(y_{0:T-1})` is intractable, but a particle filter gives an unbiased
estimate :math:`\hat p_\theta(y)`. A Metropolis–Hastings chain on :math:`\theta` that

1. proposes :math:`\theta' = \theta + h L z`, :math:`z \sim N(0, I)`
   (:math:`LL^\top` = ``cov``),
2. runs a *fresh* particle filter to get :math:`\hat p_{\theta'}(y)`,
3. accepts with probability :math:`\min\{1, r\}`,
   :math:`r = \frac{p(\theta')\,\hat p_{\theta'}(y)}{p(\theta)\,\hat p_\theta(y)}`,
   and otherwise keeps :math:`\theta` *and its old estimate*,

is exactly invariant for the posterior :math:`p(\theta \mid y)` (it is an MCMC chain on
the extended space of :math:`\theta` and the filter's random numbers). Many chains run
at once: the iterations are a ``lax.scan`` over a ``vmap`` over chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from smcjax.types import Array, ArrayLike, ArrayTree, PRNGKey

__all__ = ["PMMHResult", "pmmh", "random_walk_pmmh"]


class PMMHResult(NamedTuple):
    r"""Output of :func:`pmmh` and :func:`random_walk_pmmh`.

    Attributes
    ----------
    samples
        Parameters, leading axes ``(num_chains, num_iterations)``.
    acceptance_rate
        ``(num_chains,)`` fraction of accepted proposals.
    log_target
        ``(num_chains, num_iterations)``: :math:`\log p(\theta) + \log \hat
        p_\theta(y)` of the current state.
    """

    samples: ArrayTree
    acceptance_rate: Array
    log_target: Array


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return value


def random_walk_pmmh(
    key: PRNGKey,
    log_target_estimate: Callable[[PRNGKey, ArrayTree], Array],
    init_params: ArrayTree,
    *,
    num_iterations: int,
    step_size: float | ArrayLike = 0.1,
    cov: ArrayLike | None = None,
) -> PMMHResult:
    r"""Pseudo-marginal random-walk Metropolis for many chains.

    Parameters
    ----------
    key
        PRNG key.
    log_target_estimate
        ``(key, params) -> scalar``: an estimate of :math:`\log \pi(\theta)` whose
        exponential is unbiased (e.g. log-prior + a particle filter's log-evidence),
        for ONE chain. ``NaN`` counts as ``-inf`` (rejected).
    init_params
        Pytree with a leading chain axis ``C``.
    num_iterations
        Iterations per chain (static).
    step_size, cov
        Proposal :math:`\theta' = \theta + h L z` with :math:`LL^\top` = ``cov``
        (``(d, d)`` or ``(d,)`` variances; identity when ``None``) on the flattened
        parameters.
    """
    _check_int("num_iterations", num_iterations)
    leaves = jax.tree.leaves(init_params)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError(
            "init_params must be a pytree of arrays with a leading chain axis"
        )
    c = jnp.shape(leaves[0])[0]
    one = jax.tree.map(lambda x: x[0], init_params)
    flat_one, unravel = ravel_pytree(one)
    d = flat_one.shape[0]
    if cov is None:
        scale = jnp.ones((d,), flat_one.dtype)
    else:
        cov = jnp.asarray(cov, flat_one.dtype)
        if cov.shape == (d,):
            scale = jnp.sqrt(cov)
        elif cov.shape == (d, d):
            scale = jnp.linalg.cholesky(cov)
        else:
            raise ValueError(
                f"cov must have shape ({d},) or ({d}, {d}), got {cov.shape}"
            )
    h = jnp.asarray(step_size, flat_one.dtype)

    def estimate(k, flat):
        v = jnp.asarray(log_target_estimate(k, unravel(flat)))
        if v.shape != ():
            raise ValueError(
                f"log_target_estimate must return a scalar, got shape {v.shape}"
            )
        return jnp.where(jnp.isnan(v), -jnp.inf, v)

    def step(k, theta, log_t):
        k_prop, k_est, k_acc = jax.random.split(k, 3)
        z = jax.random.normal(k_prop, theta.shape, theta.dtype)
        prop = theta + h * (scale * z if scale.ndim == 1 else scale @ z)
        log_p = estimate(k_est, prop)
        accept = jnp.log(jax.random.uniform(k_acc)) < log_p - log_t
        return jnp.where(accept, prop, theta), jnp.where(accept, log_p, log_t), accept

    flat0 = jax.vmap(lambda p: ravel_pytree(p)[0])(init_params)
    k_init, k_run = jax.random.split(key)
    log_t0 = jax.vmap(estimate)(jax.random.split(k_init, c), flat0)

    def body(carry, keys):
        theta, log_t = carry
        theta, log_t, acc = jax.vmap(step)(keys, theta, log_t)
        return (theta, log_t), (theta, log_t, acc)

    keys = jax.random.split(k_run, (num_iterations, c))
    _, (thetas, log_ts, accs) = jax.lax.scan(body, (flat0, log_t0), keys)
    samples = jax.vmap(jax.vmap(unravel))(jnp.swapaxes(thetas, 0, 1))
    return PMMHResult(samples, jnp.mean(accs, axis=0), jnp.swapaxes(log_ts, 0, 1))


def pmmh(
    key: PRNGKey,
    model_fn: Callable[[ArrayTree], Any],
    log_prior: Callable[[ArrayTree], Array],
    observations: ArrayLike,
    init_params: ArrayTree,
    num_particles: int,
    num_iterations: int,
    *,
    num_chains: int = 4,
    step_size: float | ArrayLike = 0.1,
    cov: ArrayLike | None = None,
    **pf_kwargs: Any,
) -> PMMHResult:
    r"""PMMH over the parameters of a :class:`smcjax.StateSpaceModel` family.

    Parameters
    ----------
    key
        PRNG key.
    model_fn
        ``params -> StateSpaceModel``.
    log_prior
        ``params -> scalar`` :math:`\log p(\theta)` (``-inf`` outside the support).
    observations
        ``(T, ...)`` observations.
    init_params
        Parameters of ONE chain; every chain starts there.
    num_particles
        Particles of each filter (static).
    num_iterations
        Iterations per chain (static).
    num_chains
        Chains run in parallel (``vmap``).
    step_size, cov
        Random-walk proposal, see :func:`random_walk_pmmh`.
    **pf_kwargs
        Options of :func:`smcjax.particle_filter` (``resampling``, ``ess_threshold``,
        ``proposal``, ...).

    Returns
    -------
    PMMHResult
        ``samples`` with leading axes ``(num_chains, num_iterations)``,
        ``acceptance_rate`` per chain.
    """
    from smcjax.ssm import particle_filter

    _check_int("num_particles", num_particles)
    _check_int("num_chains", num_chains)
    if not callable(model_fn):
        raise TypeError("model_fn must be a callable params -> StateSpaceModel")
    if not callable(log_prior):
        raise TypeError("log_prior must be a callable params -> scalar")

    def log_target(k, params):
        lp = jnp.asarray(log_prior(params))
        ok = jnp.isfinite(lp)
        pf = particle_filter(
            k, model_fn(params), observations, num_particles, **pf_kwargs
        )
        return jnp.where(ok, lp + pf.log_evidence, -jnp.inf)

    init = jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (num_chains, *jnp.shape(x))),
        init_params,
    )
    return random_walk_pmmh(
        key,
        log_target,
        init,
        num_iterations=num_iterations,
        step_size=step_size,
        cov=cov,
    )
