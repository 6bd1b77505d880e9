r"""Tempered SMC: from the prior to the posterior through a ladder of temperatures.

The targets are the geometric bridge

.. math::

    \pi_\lambda(x) = \frac{p_0(x)\,L(x)^\lambda}{Z_\lambda},
    \qquad 0 = \lambda_0 < \lambda_1 < \dots < \lambda_K = 1,

so :math:`\pi_0 = p_0` is the prior, :math:`\pi_1` the posterior and :math:`Z_1 = Z`
the model evidence. As a Feynman–Kac model (Del Moral, Doucet & Jasra 2006; Chopin &
Papaspiliopoulos 2020, ch. 17) step :math:`k` is *reweight → resample → move*:

1. *reweight* with :math:`G_k(x) = L(x)^{\delta_k}`, :math:`\delta_k = \lambda_k -
   \lambda_{k-1}`; the particles are equally weighted, so
   :math:`\log \hat Z_{\lambda_k} - \log \hat Z_{\lambda_{k-1}} = \log \frac1N
   \sum_n L(x^n)^{\delta_k}`;
2. *resample* (systematic by default);
3. *move* every particle with ``num_mcmc_steps`` steps of a :math:`\pi_{\lambda_k}`-
   invariant kernel (:mod:`smcjax.mcmc`) tuned from the weighted cloud.

The estimate :math:`\hat Z = \prod_k \frac1N\sum_n L(x^n_{k-1})^{\delta_k}` is unbiased
for a fixed schedule.

**Adaptive schedule.** When ``schedule`` is ``None`` the next temperature solves

.. math::

    \mathrm{ESS}(\delta) = \frac{\left(\sum_n e^{\delta \ell^n}\right)^2}
    {\sum_n e^{2\delta \ell^n}} = \text{target\_ess}\cdot N,
    \qquad \ell^n = \log L(x^n),

by bisection on :math:`\delta \in (0, 1 - \lambda]` (``lax.while_loop``); note the
``+`` sign: the weights are :math:`L^{\delta}`, so particles of *higher* likelihood gain
weight (BlackJAX issue #914 was a sign error here that symmetric tests could not see).
If :math:`\mathrm{ESS}(1-\lambda) \ge` target the run jumps to :math:`\lambda = 1`.

**Waste-free SMC** (Dau & Chopin 2022). With ``waste_free=True`` only
:math:`M = \lceil N / P\rceil` particles are resampled, :math:`P =`
``num_mcmc_steps + 1``, and *every* state of their :math:`P`-long chains is kept (the
first :math:`N` of the :math:`M P`), so a step costs :math:`\approx N` MCMC moves
instead of :math:`N \cdot` ``num_mcmc_steps``.

**NaN.** A particle whose log-prior or log-likelihood is ``NaN`` gets weight zero
(``-inf``) and is not resampled; the run continues and ``num_nan`` counts them. An MCMC
proposal with a ``NaN`` log-density is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from smcjax import mcmc as _mcmc
from smcjax.core import gather
from smcjax.resampling import Resampler, ess, get_resampler, log_normalize
from smcjax.types import Array, ArrayLike, ArrayTree, PRNGKey

__all__ = ["TemperedSMCResult", "tempered_smc"]


class TemperedSMCResult(NamedTuple):
    r"""Output of :func:`tempered_smc`.

    Arrays of length ``max_steps + 1`` are indexed by the SMC step ``k = 0..K``
    (``K = num_steps``) and padded with ``NaN`` after ``K``.

    Attributes
    ----------
    particles
        ``(N, ...)`` equally weighted particles targeting the posterior.
    log_evidence
        :math:`\log \hat Z`.
    temperatures
        :math:`\lambda_0 = 0, \dots, \lambda_K = 1`, then ``NaN``.
    acceptance_rate
        Mean acceptance probability of the moves at step ``k`` (``NaN`` at ``k=0``).
    num_steps
        ``K``, the number of tempering steps taken.
    ess
        ESS of the incremental weights :math:`L^{\delta_k}` at step ``k``
        (``NaN`` at 0).
    log_evidence_increments
        :math:`\log(\hat Z_{\lambda_k}/\hat Z_{\lambda_{k-1}})` (``0`` at ``k=0``).
    step_size
        Step size of the moves used at step ``k`` (``NaN`` if the kernel has none).
    num_nan
        Number of particle weightings where the log-density was ``NaN`` (those
        particles got weight zero).
    reached_max_steps
        ``True`` when the adaptive schedule hit ``max_steps`` before 1: the last step
        then jumped straight to :math:`\lambda = 1` (valid but with a low ESS).
    log_prior, log_likelihood
        ``(N,)`` values at the final particles.
    """

    particles: ArrayTree
    log_evidence: Array
    temperatures: Array
    acceptance_rate: Array
    num_steps: Array
    ess: Array
    log_evidence_increments: Array
    step_size: Array
    num_nan: Array
    reached_max_steps: Array
    log_prior: Array
    log_likelihood: Array


class _Carry(NamedTuple):
    key: Array
    k: Array
    lam: Array
    particles: ArrayTree
    log_prior: Array
    log_lik: Array
    log_z: Array
    params: Any
    last_acc: Array
    num_nan: Array
    temperatures: Array
    acceptance: Array
    ess: Array
    incr: Array
    step_size: Array
    forced: Array


def _num_particles(particles: ArrayTree) -> int:
    leaves = jax.tree.leaves(particles)
    if not leaves:
        raise ValueError("initial_particles must be a pytree with array leaves")
    n = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
    for leaf in leaves:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
            raise ValueError(
                "initial_particles: every leaf needs the same leading (particle) axis; "
                f"got shapes {[jnp.shape(x) for x in leaves]}"
            )
    if n < 2:
        raise ValueError(f"initial_particles must hold at least 2 particles, got {n}")
    return n


def _check_schedule(schedule: ArrayLike) -> Array:
    try:
        s = np.asarray(schedule, dtype=np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError):
        s = None
    if s is None:  # traced: only shape checks
        s_j = jnp.asarray(schedule)
        if s_j.ndim != 1 or s_j.shape[0] < 1:
            raise ValueError("schedule must be a 1-d array of temperatures")
        return s_j
    if s.ndim != 1 or s.size < 1:
        raise ValueError(f"schedule must be a 1-d array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("schedule must be finite")
    if s[0] != 0.0:
        s = np.concatenate([[0.0], s])
    if np.any(np.diff(s) <= 0) or s[0] < 0:
        raise ValueError(
            "schedule must be strictly increasing in (0, 1], "
            "e.g. jnp.linspace(0, 1, 20)"
        )
    if abs(s[-1] - 1.0) > 1e-12:
        raise ValueError(f"schedule must end at 1.0, got {s[-1]}")
    return jnp.asarray(s, jnp.float32)


def _solve_delta(log_lik: Array, max_delta: Array, target: float, n: int) -> Array:
    r"""Solve the adaptive increment by bisection.

    Returns the largest :math:`\delta \le` ``max_delta`` (to a relative ESS tolerance
    of 1e-3) with :math:`\mathrm{ESS}(\delta\ell) \ge` ``target·N``.
    """
    goal = target * n

    def ess_at(delta):
        return ess(jnp.where(jnp.isneginf(log_lik), -jnp.inf, delta * log_lik))

    def cond(c):
        i, lo, hi, e_lo = c
        return (i < 50) & ((e_lo - goal) > 1e-3 * goal) & (hi - lo > 1e-12)

    def body(c):
        i, lo, hi, e_lo = c
        mid = 0.5 * (lo + hi)
        e_mid = ess_at(mid)
        ok = e_mid >= goal
        return (
            i + 1,
            jnp.where(ok, mid, lo),
            jnp.where(ok, hi, mid),
            jnp.where(ok, e_mid, e_lo),
        )

    full_ok = ess_at(max_delta) >= goal
    zero = jnp.zeros_like(max_delta)
    _, lo, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), zero, max_delta, ess_at(zero))
    )
    # never return a zero increment: that would loop forever
    lo = jnp.maximum(lo, 1e-7 * max_delta)
    return jnp.where(full_ok, max_delta, lo)


def tempered_smc(
    key: PRNGKey,
    log_prior: Callable[[ArrayTree], Array],
    log_likelihood: Callable[[ArrayTree], Array],
    initial_particles: ArrayTree,
    *,
    kernel: str | _mcmc.Kernel | tuple = "rwm",
    num_mcmc_steps: int = 10,
    target_ess: float = 0.5,
    schedule: ArrayLike | None = None,
    waste_free: bool = False,
    resampling: str | Resampler = "systematic",
    max_steps: int = 500,
    kernel_params: Any = None,
    tune: bool = True,
) -> TemperedSMCResult:
    r"""Tempered SMC sampler from ``log_prior`` to ``log_prior + log_likelihood``.

    Parameters
    ----------
    key
        PRNG key.
    log_prior, log_likelihood
        One-particle functions :math:`\log p_0(x)` and :math:`\log L(x)` (scalars).
    initial_particles
        Pytree with leading axis ``N``: i.i.d. draws from the prior :math:`p_0`.
    kernel
        ``"rwm" | "mala" | "hmc"``, a :class:`smcjax.mcmc.Kernel`, or an
        ``(init, step)`` pair (see :mod:`smcjax.mcmc` for the protocol).
    num_mcmc_steps
        Moves per particle per tempering step (static); with ``waste_free`` the chain
        length is ``num_mcmc_steps + 1``.
    target_ess
        Fraction of ``N`` the ESS of the incremental weights should keep (adaptive).
    schedule
        ``None`` for adaptive tempering, else increasing temperatures ending at 1 (a
        leading 0 is added if missing; a *traced* schedule, e.g. a ``jit`` argument,
        is not checked and must start with 0).
    waste_free
        Waste-free SMC (Dau & Chopin 2022), see the module docstring.
    resampling
        Resampler name or callable (:mod:`smcjax.resampling`).
    max_steps
        Cap on adaptive steps (static; sizes the trace arrays). If reached, the last
        step goes to :math:`\lambda = 1` and ``reached_max_steps`` is set.
    kernel_params
        Initial parameters of the move (default ``kernel.default_params(d)``).
    tune
        Tune the move from the particle cloud at every step (``kernel.tune``).

    Returns
    -------
    TemperedSMCResult
        ``particles``, ``log_evidence``, ``temperatures``, ``acceptance_rate`` and the
        traces; see :class:`TemperedSMCResult`.

    Notes
    -----
    The whole sampler is one ``lax.while_loop``; it runs under ``jax.jit`` (functions
    and options static) and ``jax.vmap`` over keys.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> x0 = jax.random.normal(jax.random.key(0), (500, 2))
    >>> res = tempered_smc(jax.random.key(1), lambda x: -0.5 * x @ x,
    ...                    lambda x: -0.5 * jnp.sum((x - 1.0) ** 2), x0)
    >>> bool(res.temperatures[res.num_steps] == 1.0)
    True
    """
    n = _num_particles(initial_particles)
    kern = _mcmc.get_kernel(kernel)
    resampler = get_resampler(resampling)
    if (
        isinstance(num_mcmc_steps, bool)
        or not isinstance(num_mcmc_steps, int)
        or num_mcmc_steps < 1
    ):
        raise ValueError(
            f"num_mcmc_steps must be a Python int >= 1, got {num_mcmc_steps!r}"
        )
    if not isinstance(target_ess, int | float) or not 0.0 < target_ess < 1.0:
        raise ValueError(f"target_ess must be a float in (0, 1), got {target_ess!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a Python int >= 1, got {max_steps!r}")
    if not callable(log_prior):
        raise TypeError("log_prior must be a callable x -> scalar")
    if not callable(log_likelihood):
        raise TypeError("log_likelihood must be a callable x -> scalar")
    sched = None if schedule is None else _check_schedule(schedule)
    if sched is not None:
        max_steps = sched.shape[0] - 1
        if max_steps < 1:
            raise ValueError("schedule must contain at least one temperature > 0")

    one = jax.tree.map(lambda x: x[0], initial_particles)
    flat_one, _ = ravel_pytree(one)
    d = flat_one.shape[0]
    dtype = jnp.result_type(flat_one.dtype, jnp.float32)
    if not jnp.issubdtype(flat_one.dtype, jnp.floating):
        raise TypeError("initial_particles must have floating-point leaves")

    def lp_ll(x):
        lp = jnp.asarray(log_prior(x))
        ll = jnp.asarray(log_likelihood(x))
        if lp.shape != () or ll.shape != ():
            raise ValueError(
                "log_prior and log_likelihood must return scalars for one particle; "
                f"got shapes {lp.shape} and {ll.shape}"
            )
        return lp.astype(dtype), ll.astype(dtype)

    def clean(lp, ll):
        bad = jnp.isnan(lp) | jnp.isnan(ll) | (lp == jnp.inf)
        ll = jnp.where(bad, -jnp.inf, ll)
        lp = jnp.where(bad, -jnp.inf, lp)
        return lp, ll, jnp.sum(bad).astype(jnp.int32)

    if kernel_params is not None:
        params0 = kernel_params
    elif kern.default_params is not None:
        params0 = kern.default_params(d)
    else:
        params0 = None
    do_tune = tune and kern.tune is not None and params0 is not None

    p_len = num_mcmc_steps + 1
    m = math.ceil(n / p_len) if waste_free else n

    def flatten(particles):
        return jax.vmap(lambda x: ravel_pytree(x)[0])(particles)

    def move(key, lam, particles, lp, ll, params):
        """Move ``particles`` (already resampled) at temperature ``lam``."""

        def target(x):
            a, b = lp_ll(x)
            return a + lam * b, (a, b)

        def target_plain(x):
            a, b = lp_ll(x)
            return a + lam * b

        if kern.supports_aux:
            if kern.needs_grad:
                states = jax.vmap(kern.init, in_axes=(0, None))(particles, target)
            else:
                val = jnp.where(jnp.isneginf(ll), -jnp.inf, lp + lam * ll)
                states = _mcmc.MCMCState(particles, val, None, (lp, ll))
            fn = target
        else:
            states = jax.vmap(kern.init, in_axes=(0, None))(particles, target_plain)
            fn = target_plain

        states, infos = _mcmc.apply_kernel_batched(
            key, states, kern.step, fn, params, num_mcmc_steps, keep_states=waste_free
        )
        acc = jnp.mean(infos.acceptance_rate)
        if waste_free:
            # (P, M, ...) -> (M·P, ...) -> first N
            states = jax.tree.map(
                lambda a: jnp.swapaxes(a, 0, 1).reshape((-1, *a.shape[2:]))[:n],
                states,
            )
        new = states.position
        if kern.supports_aux:
            new_lp, new_ll = states.aux
        else:
            new_lp, new_ll = jax.vmap(lp_ll)(new)
        return new, new_lp, new_ll, acc

    def cond(c: _Carry):
        return (c.lam < 1.0) & (c.k < max_steps)

    def body(c: _Carry) -> _Carry:
        key, k_res, k_move = jax.random.split(c.key, 3)
        k = c.k + 1
        max_delta = 1.0 - c.lam
        if sched is None:
            solved = _solve_delta(c.log_lik, max_delta, target_ess, n)
            forced = (k >= max_steps) & (solved < max_delta)
            delta = jnp.where(k >= max_steps, max_delta, solved)
            lam = jnp.where(delta >= max_delta, 1.0, c.lam + delta)
        else:
            lam = sched[k].astype(dtype)
            delta = lam - c.lam
            forced = jnp.array(False)
        lam = lam.astype(dtype)
        log_w = jnp.where(jnp.isneginf(c.log_lik), -jnp.inf, delta * c.log_lik)
        log_w_norm, log_sum = log_normalize(log_w)
        incr = log_sum - jnp.log(float(n))
        params = c.params
        if do_tune:
            acc_in = jnp.where(c.k > 0, c.last_acc, jnp.nan)
            params = kern.tune(params, flatten(c.particles), log_w_norm, acc_in)
        idx = resampler(k_res, log_w_norm, m).astype(jnp.int32)
        x = gather(c.particles, idx)
        new, lp, ll, acc = move(
            k_move, lam, x, c.log_prior[idx], c.log_lik[idx], params
        )
        lp, ll, nbad = clean(lp, ll)
        step_size = (
            jnp.asarray(params.step_size, dtype)
            if isinstance(params, _mcmc.KernelParams)
            else jnp.asarray(jnp.nan, dtype)
        )
        return _Carry(
            key=key,
            k=k,
            lam=lam,
            particles=new,
            log_prior=lp,
            log_lik=ll,
            log_z=c.log_z + incr,
            params=params,
            last_acc=acc.astype(dtype),
            num_nan=c.num_nan + nbad,
            temperatures=c.temperatures.at[k].set(lam),
            acceptance=c.acceptance.at[k].set(acc.astype(dtype)),
            ess=c.ess.at[k].set(ess(log_w).astype(dtype)),
            incr=c.incr.at[k].set(incr.astype(dtype)),
            step_size=c.step_size.at[k].set(step_size),
            forced=forced,
        )

    lp0, ll0 = jax.vmap(lp_ll)(initial_particles)
    lp0, ll0, nbad0 = clean(lp0, ll0)
    nan_trace = jnp.full((max_steps + 1,), jnp.nan, dtype)
    carry = _Carry(
        key=key,
        k=jnp.int32(0),
        lam=jnp.zeros((), dtype),
        particles=initial_particles,
        log_prior=lp0,
        log_lik=ll0,
        log_z=jnp.zeros((), dtype),
        params=params0,
        last_acc=jnp.asarray(jnp.nan, dtype),
        num_nan=nbad0,
        temperatures=nan_trace.at[0].set(0.0),
        acceptance=nan_trace,
        ess=nan_trace,
        incr=jnp.zeros((max_steps + 1,), dtype),
        step_size=nan_trace,
        forced=jnp.array(False),
    )
    out = jax.lax.while_loop(cond, body, carry)
    return TemperedSMCResult(
        particles=out.particles,
        log_evidence=out.log_z,
        temperatures=out.temperatures,
        acceptance_rate=out.acceptance,
        num_steps=out.k,
        ess=out.ess,
        log_evidence_increments=out.incr,
        step_size=out.step_size,
        num_nan=out.num_nan,
        reached_max_steps=out.forced,
        log_prior=out.log_prior,
        log_likelihood=out.log_lik,
    )
