r"""State-space models written with NumPyro distributions, and their particle filters.

A state-space model is

.. math::

    X_0 \sim p_0, \qquad X_t \mid X_{t-1} \sim p_t(\cdot \mid x_{t-1}), \qquad
    Y_t \mid X_t \sim f_t(\cdot \mid x_t), \qquad t = 0, \dots, T-1,

given by one-particle functions that return NumPyro distributions. Its particle filters
are Feynman–Kac models (Chopin & Papaspiliopoulos 2020, ch. 10) run by
:func:`smcjax.smc`; each estimates :math:`Z = p(y_{0:T-1})` without bias.

*Bootstrap* (:func:`bootstrap`): :math:`M_t = p_t`,
:math:`G_t(x_{t-1}, x_t) = f_t(y_t \mid x_t)`.

*Guided* (:func:`guided`) with a proposal :math:`q_t(x_t \mid x_{t-1}, y_t)`:
:math:`M_t = q_t` and

.. math::

    G_0(x_0) = \frac{p_0(x_0) f_0(y_0 \mid x_0)}{q_0(x_0 \mid y_0)}, \qquad
    G_t(x_{t-1}, x_t) = \frac{p_t(x_t \mid x_{t-1}) f_t(y_t \mid x_t)}
                             {q_t(x_t \mid x_{t-1}, y_t)}.

*Auxiliary* (:func:`auxiliary`, Pitt & Shephard 1999) with a look-ahead
:math:`\eta_t(x_{t-1}) \approx p(y_t \mid x_{t-1})`: the potentials become
:math:`\tilde G_t = G_t\, \eta_{t+1}(x_t) / \eta_t(x_{t-1})` with
:math:`\eta_T \equiv 1`, so particles are resampled towards those that will explain the
next observation. The product of the :math:`\tilde G_t` telescopes to that of the
:math:`G_t`, hence the final :math:`\hat Z_{T-1}` still estimates
:math:`p(y_{0:T-1})` without bias, while the intermediate weights target
:math:`\pi_t(x_t)\,\eta_{t+1}(x_t)`; :func:`particle_filter` divides by
:math:`\eta_{t+1}` again to report the filtering means.

Performance: the filters below are ``vectorized`` Feynman–Kac models. They vmap the
user's one-particle *distribution constructors* and draw the noise of all particles in
ONE batched call with one key (for NumPyro distribution types whose batched sampling
is known to be exact, listed in :data:`BATCHED_SAMPLING_TYPES`); other distributions
fall back to one key per particle. Log-densities are vmapped one-particle
``log_prob`` calls. A (default) Threefry key draws these batched samples through
an unrolled Threefry hash (``smcjax.resampling._fast_key``): bit-for-bit the draws of
``jax.random``, ~1.7x faster on CPU, where JAX lowers the hash with a rolled loop. Any
key implementation works: ``jax.random.key(seed, impl="rbg")`` (or ``"unsafe_rbg"``)
uses XLA's RngBitGenerator, typically faster than Threefry on GPU/TPU but slower on
CPU (see ``benchmarks/bench_pf.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions.batch_util import promote_batch_shape

from smcjax.core import FeynmanKac, SMCResult, smc, weighted_mean
from smcjax.resampling import Resampler, _fast_key, get_resampler, log_normalize
from smcjax.types import Array, ArrayLike, PRNGKey

__all__ = [
    "BATCHED_SAMPLING_TYPES",
    "StateSpaceModel",
    "auxiliary",
    "bootstrap",
    "guided",
    "particle_filter",
    "simulate",
]

Distribution = Any  # numpyro.distributions.Distribution
#: ``proposal(t, x_prev, y_t) -> Distribution``; ``x_prev`` is ``None`` at ``t = 0``.
Proposal = Callable[[Any, Any, Any], Distribution]
#: ``log_lookahead(t, x_prev, y_t) -> scalar``, :math:`\log \eta_t(x_{t-1})`.
LookAhead = Callable[[Any, Any, Any], Array]


class StateSpaceModel(NamedTuple):
    r"""A state-space model given by one-particle NumPyro distributions.

    Attributes
    ----------
    initial
        ``initial() -> Distribution`` of :math:`X_0`.
    transition
        ``transition(t, x_prev) -> Distribution`` of :math:`X_t \mid X_{t-1}`
        (``t >= 1``).
    emission
        ``emission(t, x) -> Distribution`` of :math:`Y_t \mid X_t` (``t >= 0``).

    ``t`` is an ``int32`` scalar (traced inside the filters), so time-varying models
    index arrays with it, e.g. ``dist.Normal(a[t] * x, s)``.
    """

    initial: Callable[[], Distribution]
    transition: Callable[[Any, Any], Distribution]
    emission: Callable[[Any, Any], Distribution]


# --------------------------------------------------------------------------- sampling

#: NumPyro distribution types whose ``sample`` draws independent noise for every batch
#: element once their batch shape is promoted (checked in the tests). Subclasses are
#: NOT trusted: e.g. ``LogNormal`` (a ``TransformedDistribution``) would silently
#: share one draw across the batch.
BATCHED_SAMPLING_TYPES: tuple[type, ...] = (
    dist.Normal,
    dist.MultivariateNormal,
    dist.LowRankMultivariateNormal,
    dist.Laplace,
    dist.Cauchy,
    dist.Uniform,
    dist.Exponential,
    dist.Gamma,
)


def _batchable(d: Distribution, n: int) -> bool:
    if type(d) is dist.Independent:
        return d.batch_shape[:1] == (n,) and _batchable(d.base_dist, n)
    return type(d) in BATCHED_SAMPLING_TYPES and d.batch_shape[:1] == (n,)


def sample_batched(
    key: PRNGKey, make_dist: Callable[..., Distribution], *args
) -> Array:
    """Draw one sample per particle from ``make_dist(*args_n)``, ``n = 1..N``.

    ``args`` are batched along axis 0 (``None`` entries are passed through). The
    one-particle constructor is vmapped; when the resulting batched distribution is of
    a type in :data:`BATCHED_SAMPLING_TYPES`, all ``N`` draws come from ONE ``sample``
    call with ``key`` (no per-particle key splitting); otherwise each particle gets its
    own key, split from ``key``.
    """
    batched = [a for a in args if a is not None]
    n = jax.tree.leaves(batched)[0].shape[0]
    in_axes = tuple(None if a is None else 0 for a in args)
    try:
        d = promote_batch_shape(jax.vmap(make_dist, in_axes=in_axes)(*args))
        fast = _batchable(d, n)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        fast = False
    if fast:
        return d.sample(_fast_key(key))  # same draws, unrolled Threefry on CPU
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k, *a: make_dist(*a).sample(k), in_axes=(0, *in_axes))(
        keys, *args
    )


# ---------------------------------------------------------------------------- simulate


def simulate(
    key: PRNGKey, model: StateSpaceModel, num_steps: int
) -> tuple[Array, Array]:
    """Simulate states and observations ``(x_{0:T-1}, y_{0:T-1})`` from ``model``.

    Returns arrays with leading axis ``T = num_steps``. Works under ``jax.jit`` (with
    ``model`` and ``num_steps`` static) and ``jax.vmap`` over keys.
    """
    _check_model(model)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    k0, ky0, k_loop = jax.random.split(key, 3)
    x0 = model.initial().sample(k0)
    y0 = model.emission(jnp.zeros((), jnp.int32), x0).sample(ky0)

    def body(x_prev, inp):
        t, k = inp
        kx, ky = jax.random.split(k)
        x = model.transition(t, x_prev).sample(kx)
        y = model.emission(t, x).sample(ky)
        return x, (x, y)

    ts = jnp.arange(1, num_steps, dtype=jnp.int32)
    _, (xs, ys) = jax.lax.scan(body, x0, (ts, jax.random.split(k_loop, num_steps - 1)))
    xs = jnp.concatenate([x0[None], xs], axis=0)
    ys = jnp.concatenate([y0[None], ys], axis=0)
    return xs, ys


# ------------------------------------------------------------------- Feynman–Kac models


def _check_model(model: Any) -> None:
    if not isinstance(model, StateSpaceModel):
        raise TypeError(
            f"model must be a smcjax.StateSpaceModel, got {type(model).__name__}"
        )


def _check_observations(model: StateSpaceModel, observations: ArrayLike) -> Array:
    """Validate ``observations`` against the model at trace time; return an array."""
    if isinstance(observations, jax.core.Tracer):
        ys = observations  # values unknown at trace time: only shapes are checked
    else:
        host = np.asarray(observations)
        if np.issubdtype(host.dtype, np.inexact) and not np.all(np.isfinite(host)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(host))[0])
            raise ValueError(
                f"observations must be finite; observations[{', '.join(map(str, bad))}]"
                f" = {host[bad]}"
            )
        ys = jnp.asarray(observations)
    if ys.ndim < 1 or ys.shape[0] < 1:
        raise ValueError(
            f"observations must have shape (T, ...) with T >= 1 time steps, got shape "
            f"{ys.shape}"
        )
    # Shapes of one observation vs. the emission's event shape (abstract evaluation).
    x0 = jax.eval_shape(lambda k: model.initial().sample(k), jax.random.key(0))
    expected = jax.eval_shape(
        lambda x: model.emission(jnp.zeros((), jnp.int32), x).sample(jax.random.key(0)),
        x0,
    ).shape
    if tuple(ys.shape[1:]) != tuple(expected):
        raise ValueError(
            f"observations must have shape (T, *{tuple(expected)}) to match the "
            f"emission distribution; got {ys.shape}"
        )
    return ys


def _log_prob(d: Distribution, value: Array, what: str) -> Array:
    lp = d.log_prob(value)
    if jnp.shape(lp) != ():
        raise ValueError(
            f"{what}.log_prob must be a scalar per particle, got shape "
            f"{jnp.shape(lp)}; use .to_event(...) for vector-valued variables"
        )
    return lp


def _feynman_kac(
    model: StateSpaceModel,
    observations: Array,
    proposal: Proposal | None,
    log_lookahead: LookAhead | None,
) -> FeynmanKac:
    """Build the (vectorized) Feynman–Kac model of the bootstrap/guided/APF filter."""
    ys = observations
    n_steps = ys.shape[0]

    def obs(t):
        return ys[t]

    def log_g_one(t, x_prev, x):
        """Return log G_t for one particle (bootstrap or guided, no look-ahead)."""
        y = obs(t)
        lg = _log_prob(model.emission(t, x), y, "emission(t, x)")
        if proposal is None:
            return lg
        if x_prev is None:
            lp = _log_prob(model.initial(), x, "initial()")
            lq = _log_prob(proposal(t, None, y), x, "proposal(0, None, y)")
        else:
            lp = _log_prob(model.transition(t, x_prev), x, "transition(t, x_prev)")
            lq = _log_prob(proposal(t, x_prev, y), x, "proposal(t, x_prev, y)")
        return lg + lp - lq

    def log_eta(t, x_prev):
        """Return log eta_t(x_{t-1}) for t = 1..T-1, and 0 at t = T (clamped index)."""
        t_next = jnp.minimum(t, n_steps - 1)
        val = log_lookahead(t_next, x_prev, obs(t_next))
        return jnp.where(t < n_steps, val, 0.0)

    def log_g_aux(t, x_prev, x):
        lg = log_g_one(t, x_prev, x) + log_eta(t + 1, x)
        if x_prev is not None:
            lg = lg - log_eta(t, x_prev)
        return lg

    log_g = log_g_one if log_lookahead is None else log_g_aux

    def init(key, n):
        t0 = jnp.zeros((), jnp.int32)
        d0 = model.initial() if proposal is None else proposal(t0, None, obs(t0))
        return d0.sample(_fast_key(key), (n,))

    def propagate(key, t, x_prev):
        if proposal is None:
            return sample_batched(key, lambda xp: model.transition(t, xp), x_prev)
        y = obs(t)
        return sample_batched(key, lambda xp: proposal(t, xp, y), x_prev)

    def log_potential(t, x_prev, x):
        if x_prev is None:
            return jax.vmap(lambda xn: log_g(t, None, xn))(x)
        return jax.vmap(lambda xp, xn: log_g(t, xp, xn))(x_prev, x)

    return FeynmanKac(
        init, propagate, log_potential, vectorized=True, any_batch_size=True
    )


def bootstrap(model: StateSpaceModel, observations: ArrayLike) -> FeynmanKac:
    """Return the bootstrap filter of ``model`` as a :class:`FeynmanKac` model."""
    _check_model(model)
    return _feynman_kac(model, _check_observations(model, observations), None, None)


def guided(
    model: StateSpaceModel, observations: ArrayLike, proposal: Proposal
) -> FeynmanKac:
    """Return the guided filter with ``proposal(t, x_prev, y_t) -> Distribution``.

    ``proposal(0, None, y_0)`` is the proposal of :math:`X_0`. The proposal must
    dominate the model's transition (and initial) distribution.
    """
    _check_model(model)
    if not callable(proposal):
        raise TypeError(f"proposal must be callable, got {type(proposal).__name__}")
    return _feynman_kac(model, _check_observations(model, observations), proposal, None)


def default_log_lookahead(model: StateSpaceModel) -> LookAhead:
    r"""Return the look-ahead :math:`\eta_t(x_{t-1}) = f_t(y_t \mid \mu_t(x_{t-1}))`.

    :math:`\mu_t(x_{t-1})` is the mean of ``transition(t, x_prev)`` (Pitt & Shephard
    1999). Requires the transition distribution to implement ``.mean``.
    """

    def log_lookahead(t, x_prev, y):
        mean = model.transition(t, x_prev).mean
        return model.emission(t, mean).log_prob(y)

    return log_lookahead


def auxiliary(
    model: StateSpaceModel,
    observations: ArrayLike,
    *,
    proposal: Proposal | None = None,
    log_lookahead: LookAhead | None = None,
) -> FeynmanKac:
    r"""Return the auxiliary particle filter (see the module doc).

    ``log_lookahead(t, x_prev, y_t) -> scalar`` is :math:`\log \eta_t(x_{t-1})`;
    defaults to :func:`default_log_lookahead`. ``proposal`` as in :func:`guided`
    (bootstrap moves when ``None``). Only the FINAL log-evidence of this Feynman–Kac
    model estimates :math:`\log p(y_{0:T-1})`; use :func:`particle_filter` for
    filtering means.
    """
    _check_model(model)
    ys = _check_observations(model, observations)
    if log_lookahead is None:
        log_lookahead = default_log_lookahead(model)
    if not callable(log_lookahead):
        raise TypeError(
            f"log_lookahead must be callable, got {type(log_lookahead).__name__}"
        )
    if proposal is not None and not callable(proposal):
        raise TypeError(f"proposal must be callable, got {type(proposal).__name__}")
    return _feynman_kac(model, ys, proposal, log_lookahead)


# --------------------------------------------------------------------- particle_filter


def particle_filter(
    key: PRNGKey,
    model: StateSpaceModel,
    observations: ArrayLike,
    num_particles: int,
    *,
    proposal: Proposal | None = None,
    resampling: str | Resampler = "systematic",
    ess_threshold: float = 0.5,
    auxiliary: bool | LookAhead = False,
    final_resample: bool = False,
    return_history: bool = False,
) -> SMCResult:
    r"""Filter ``observations`` with a particle filter of ``model``.

    Parameters
    ----------
    key
        PRNG key (any implementation, e.g. ``jax.random.key(0, impl="rbg")``).
    model
        A :class:`StateSpaceModel`.
    observations
        ``(T, *event_shape)`` array of :math:`y_{0:T-1}`; must be finite (checked when
        concrete; under ``jax.jit`` a non-finite observation gives
        ``log_evidence = -inf``).
    num_particles
        ``N >= 1`` (static).
    proposal
        ``None`` for the bootstrap filter, else ``proposal(t, x_prev, y_t) ->
        Distribution`` (guided filter; ``x_prev`` is ``None`` at ``t = 0``).
    resampling
        Resampler name (``"systematic"``, ``"stratified"``, ``"multinomial"``,
        ``"residual"``) or callable.
    ess_threshold
        Resample when ESS < ``ess_threshold·N`` (1.0: every step; 0.0: never).
    auxiliary
        ``True`` for the auxiliary particle filter with the default look-ahead, or a
        callable ``log_lookahead(t, x_prev, y_t)``; ``False`` (default) for none.
    final_resample, return_history
        As in :func:`smcjax.smc`. With ``return_history`` the ``log_weights_history``
        are the *filtering* weights (for the auxiliary filter: with the look-ahead
        divided out), ready for :func:`smcjax.smoothing.backward_sampling`.

    Returns
    -------
    SMCResult
        ``log_evidence`` estimates :math:`\log p(y_{0:T-1})` (unbiased on the natural
        scale), ``filtering_means`` is ``(T, *state_shape)``:
        :math:`\sum_n W_t^n X_t^n \approx \mathbb{E}[X_t \mid y_{0:t}]`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro.distributions as dist
    >>> import smcjax
    >>> model = smcjax.StateSpaceModel(
    ...     initial=lambda: dist.Normal(0.0, 1.0),
    ...     transition=lambda t, x: dist.Normal(0.9 * x, 1.0),
    ...     emission=lambda t, x: dist.Normal(x, 0.5))
    >>> xs, ys = smcjax.ssm.simulate(jax.random.key(0), model, 50)
    >>> out = smcjax.particle_filter(jax.random.key(1), model, ys, 1000)
    >>> out.filtering_means.shape
    (50,)
    """
    _check_model(model)
    get_resampler(resampling)  # fail early, naming the argument
    ys = _check_observations(model, observations)
    if isinstance(auxiliary, bool):
        log_lookahead = default_log_lookahead(model) if auxiliary else None
    elif callable(auxiliary):
        log_lookahead = auxiliary
    else:
        raise TypeError(f"auxiliary must be a bool or a callable, got {auxiliary!r}")
    if proposal is not None and not callable(proposal):
        raise TypeError(f"proposal must be callable, got {type(proposal).__name__}")
    fk = _feynman_kac(model, ys, proposal, log_lookahead)
    n_steps = ys.shape[0]

    def summary(t, particles, log_weights):
        """Return the filtering mean (and weights), look-ahead divided out."""
        if log_lookahead is not None:
            t_next = jnp.minimum(t + 1, n_steps - 1)
            leta = jax.vmap(lambda x: log_lookahead(t_next, x, ys[t_next]))(particles)
            leta = jnp.where(t + 1 < n_steps, leta, 0.0)
            log_weights = log_normalize(log_weights - leta)[0]
        mean = weighted_mean(particles, log_weights)
        return (mean, log_weights) if return_history else (mean,)

    if log_lookahead is None:
        # The filtering weights are the engine's: its cached weights give the means.
        return smc(
            key,
            fk,
            num_particles,
            n_steps,
            resampling=resampling,
            ess_threshold=ess_threshold,
            final_resample=final_resample,
            return_history=return_history,
            compute_means=True,
        )
    res = smc(
        key,
        fk,
        num_particles,
        n_steps,
        resampling=resampling,
        ess_threshold=ess_threshold,
        final_resample=final_resample,
        return_history=return_history,
        summary_fn=summary,
    )
    return res._replace(
        filtering_means=res.summaries[0],
        summaries=None,
        log_weights_history=res.summaries[1] if return_history else None,
    )
