r"""The SMC engine: Feynman–Kac models, an ``(init, step)`` kernel and the driver.

A Feynman–Kac model (Del Moral 2004; Chopin & Papaspiliopoulos 2020) is a Markov
chain with kernels :math:`M_0(dx_0)`, :math:`M_t(x_{t-1}, dx_t)` and potentials
:math:`G_0(x_0)`, :math:`G_t(x_{t-1}, x_t)`. It defines the normalising constants

.. math::

    Z_t = \mathbb{E}_{M}\Big[G_0(X_0) \prod_{s=1}^{t} G_s(X_{s-1}, X_s)\Big],

and the (generic) particle filter below estimates them without bias. With ``N``
particles and normalised weights :math:`W_{t-1}^n`, one step is

1. *resample* (only when the ESS falls below ``ess_threshold·N``): draw ancestors
   :math:`A_t^n` from :math:`W_{t-1}`; set :math:`\hat W_{t-1}^n = 1/N`, otherwise
   :math:`A_t^n = n` and :math:`\hat W_{t-1} = W_{t-1}`;
2. *propagate*: :math:`X_t^n \sim M_t(X_{t-1}^{A_t^n}, \cdot)`;
3. *reweight*: :math:`w_t^n = \hat W_{t-1}^n\, G_t(X_{t-1}^{A_t^n}, X_t^n)`,
   :math:`\hat Z_t = \hat Z_{t-1} \sum_n w_t^n` and
   :math:`W_t^n = w_t^n / \sum_m w_t^m`.

Everything happens in log space. Model functions are written for ONE particle; the
engine ``jax.vmap``'s them (once, in :func:`batch_model`), unless the model says it is
already ``vectorized``.

Performance
-----------
A one-particle ``propagate`` receives its own key, split from the step's key, so every
particle costs two Threefry hashes per step (one for the key, one for its bits),
whatever the model. A ``vectorized=True`` model receives ONE key per step and can
draw the noise of all ``N`` particles in one batched call (half a hash per particle
for a scalar normal): on CPU this is the difference between ~50 and ~120 million
particle-steps per second for a 1-D linear-Gaussian bootstrap filter. The filters of
:mod:`smcjax.ssm` are built this way from one-particle NumPyro distributions.

Inside :func:`smc` the weights are exponentiated once per step: after reweighting,
:math:`w^n = \exp(\log W^n - \max_m \log W^m)`, its total and the ESS are cached
next to the state in the scan, and the ESS test, the built-in resamplers (through
internal entry points that take these weights instead of log-weights; the ancestors
are exactly those of the public resampler on ``log_weights``) and the filtering means
all use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from smcjax import resampling as _rs
from smcjax.resampling import Resampler, get_resampler, log_normalize
from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = [
    "BatchedModel",
    "FeynmanKac",
    "SMCInfo",
    "SMCResult",
    "SMCState",
    "batch_model",
    "build_step",
    "gather",
    "init",
    "smc",
    "step",
    "weighted_mean",
]


class FeynmanKac(NamedTuple):
    r"""A Feynman–Kac model given by one-particle functions.

    Attributes
    ----------
    init
        ``init(key) -> x_0``, a draw from :math:`M_0`.
    propagate
        ``propagate(key, t, x_prev) -> x_t``, a draw from :math:`M_t(x_{t-1}, \cdot)`.
    log_potential
        ``log_potential(t, x_prev, x) -> scalar``, :math:`\log G_t(x_{t-1}, x_t)`;
        called with ``x_prev=None`` at ``t = 0``. ``NaN`` is treated as ``-inf``.
    vectorized
        If ``True`` the three functions already act on a batch of particles (leading
        axis ``N``) and receive a single key; the engine then does not vmap them:
        ``init(key, num_particles) -> particles``,
        ``propagate(key, t, particles_prev) -> particles`` and
        ``log_potential(t, particles_prev, particles) -> (N,)`` (``particles_prev`` is
        ``None`` at ``t = 0``). LLM particles use this to batch the language model;
        the state-space filters use it to draw all particles' noise in one call.
    any_batch_size
        For a ``vectorized`` model: ``True`` if its functions accept any number of
        rows, so that :func:`smc` may run up to 15 padding rows beside the
        ``num_particles`` real ones (see the notes of :func:`smc`; always allowed for
        models the engine vmaps). Default ``False``: a vectorized model gets exactly
        ``num_particles`` rows.
    """

    init: Callable[..., ArrayTree]
    propagate: Callable[..., ArrayTree]
    log_potential: Callable[..., Array]
    vectorized: bool = False
    any_batch_size: bool = False


class BatchedModel(NamedTuple):
    """A :class:`FeynmanKac` model lifted to a batch of ``N`` particles."""

    init: Callable[[PRNGKey, int], ArrayTree]
    propagate: Callable[[PRNGKey, Array, ArrayTree], ArrayTree]
    log_potential: Callable[[Array, ArrayTree | None, ArrayTree], Array]


_PAD = 16
_PAD_FROM = 64


def _padded(n: int) -> int:
    r"""The number of rows :func:`smc` runs for ``n`` particles: ``n`` rounded up to 16.

    XLA's CPU fusion kernels (jax 0.10.2) run 3-10x slower on arrays whose length is
    not a multiple of 16 when they are multi-threaded: a bootstrap filter with
    100 001 particles took 780-830 ms against 160 ms for 100 000
    (``benchmarks/results_pf.md``). From 64 particles on, :func:`smc` therefore
    carries up to 15 *padding rows* after the ``n`` real particles: they are
    propagated like the others (as copies of the first ancestors), but they start at
    log-weight ``-inf`` and keep it, so they are never resampled and they contribute
    nothing to the ESS, the means or :math:`\hat Z`; resampling draws
    exactly ``n`` ancestors from the ``n`` real particles. Every output is cut back to
    the ``n`` real particles. The first ``n`` particle keys are those of
    ``jax.random.split(key, n)`` (JAX's partitionable Threefry), so the filter is the
    same ``n``-particle filter (only the float32 grouping of the resampler's prefix
    sums follows the padded length).
    """
    if n < _PAD_FROM or n % _PAD == 0:
        return n
    return -(-n // _PAD) * _PAD


def _head(tree: ArrayTree, n: int) -> ArrayTree:
    """The first ``n`` rows of every leaf."""
    return jax.tree.map(lambda x: x[:n], tree)


def batch_model(model: FeynmanKac) -> BatchedModel:
    """Vmap the one-particle functions of ``model`` over the particle axis.

    This is the one place where smcjax vmaps model code. Each particle gets its own
    key, split from the step's key.
    """
    if not isinstance(model, FeynmanKac):
        raise TypeError(
            f"model must be a smcjax.FeynmanKac, got {type(model).__name__}"
        )
    if model.vectorized:

        def init_v(key, n):
            return model.init(key, n)

        return BatchedModel(init_v, model.propagate, model.log_potential)

    def init_b(key, n):
        return jax.vmap(model.init)(jax.random.split(key, n))

    def propagate_b(key, t, x_prev):
        n = _num_particles(x_prev)
        keys = jax.random.split(key, n)
        return jax.vmap(model.propagate, in_axes=(0, None, 0))(keys, t, x_prev)

    def log_potential_b(t, x_prev, x):
        return jax.vmap(model.log_potential, in_axes=(None, 0, 0))(t, x_prev, x)

    return BatchedModel(init_b, propagate_b, log_potential_b)


class SMCState(NamedTuple):
    r"""State of the particle system after step ``t``.

    Attributes
    ----------
    particles
        Pytree with leading axis ``N``: :math:`X_t^{1:N}`.
    log_weights
        Normalised log-weights :math:`\log W_t^{1:N}` (``logsumexp = 0``).
    log_evidence
        Running :math:`\log \hat Z_t`.
    t
        Index of the last completed step (``int32``).
    """

    particles: ArrayTree
    log_weights: Array
    log_evidence: Array
    t: Array


class SMCInfo(NamedTuple):
    r"""Diagnostics of one step (never needed to continue the run).

    Attributes
    ----------
    ancestors
        :math:`A_t^{1:N}` (identity when no resampling happened), ``int32``.
    resampled
        Whether resampling happened before propagation at this step.
    ess
        Effective sample size of :math:`W_t` after reweighting.
    log_evidence_increment
        :math:`\log(\hat Z_t / \hat Z_{t-1})`.
    """

    ancestors: Array
    resampled: Array
    ess: Array
    log_evidence_increment: Array


class SMCResult(NamedTuple):
    r"""Output of :func:`smc` and of the particle filters.

    Attributes
    ----------
    particles
        Final particles (leading axis ``N``); equally weighted if ``final_resample``.
    log_weights
        Final normalised log-weights ``(N,)``.
    log_evidence
        :math:`\log \hat Z_{T-1}` (scalar).
    ess
        ``(T,)`` ESS after each reweighting.
    resampled
        ``(T,)`` bool, whether resampling preceded step ``t`` (``False`` at ``t=0``).
    ancestors
        ``(T, N)`` ancestor indices (identity where not resampled).
    log_evidence_increments
        ``(T,)``; their cumulative sum is the running log-evidence.
    history
        ``(T, N, ...)`` particles at every step when ``return_history=True``.
    filtering_means
        ``(T, ...)`` weighted means :math:`\sum_n W_t^n X_t^n` when requested.
    summaries
        ``(T, ...)`` output of a user ``summary_fn(t, particles, log_weights)``.
    log_weights_history
        ``(T, N)`` normalised log-weights :math:`\log W_t^{1:N}` at every step when
        ``return_history=True`` (what backward sampling needs).
    final_ancestors
        ``(N,)`` indices into the last step's particles drawn by the final resampling
        when ``final_resample=True`` (genealogy tracing starts from them).
    """

    particles: ArrayTree
    log_weights: Array
    log_evidence: Array
    ess: Array
    resampled: Array
    ancestors: Array
    log_evidence_increments: Array
    history: ArrayTree = None
    filtering_means: ArrayTree = None
    summaries: ArrayTree = None
    log_weights_history: Array | None = None
    final_ancestors: Array | None = None


def _num_particles(particles: ArrayTree) -> int:
    leaves = jax.tree.leaves(particles)
    if not leaves:
        raise ValueError("particles must be a pytree with at least one array leaf")
    return leaves[0].shape[0]


def gather(particles: ArrayTree, indices: Array) -> ArrayTree:
    """Select particles along the leading axis: ``x^{A^n}`` for every leaf."""
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), particles)


def weighted_mean(particles: ArrayTree, log_weights: Array) -> ArrayTree:
    """``Σ_n W^n x^n`` for every floating leaf (integer leaves are cast to float)."""
    w = jnp.exp(log_weights)

    def mean(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(w.dtype)
        return jnp.tensordot(w.astype(x.dtype), x, axes=(0, 0))

    return jax.tree.map(mean, particles)


def _cached_mean(particles: ArrayTree, cache: _WeightsCache) -> ArrayTree:
    """:func:`weighted_mean` from the cached weights: ``Σ_n w^n x^n / Σ_n w^n``."""
    w = cache.w / cache.total

    def mean(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(w.dtype)
        return jnp.tensordot(w.astype(x.dtype), x, axes=(0, 0))

    return jax.tree.map(mean, particles)


def _reweight(log_weights: Array, log_g: Array, log_evidence: Array):
    log_g = jnp.asarray(log_g)
    n = log_weights.shape[0]
    if log_g.shape != (n,):
        raise ValueError(
            f"log_potential must return a scalar per particle; the batched output "
            f"has shape {log_g.shape}, expected ({n},)"
        )
    log_g = jnp.where(jnp.isnan(log_g), -jnp.inf, log_g)
    log_w, incr = log_normalize(log_weights + log_g)
    return log_w, log_evidence + incr, incr


def init(
    key: PRNGKey, model: FeynmanKac, num_particles: int
) -> tuple[SMCState, SMCInfo]:
    r"""Draw :math:`X_0^n \sim M_0` and weight them by :math:`G_0`."""
    bm = batch_model(model)
    state, info, _ = _init(key, bm, _check_num_particles(num_particles))
    return state, info


def _uniform(n: int, n_real: int) -> Array:
    """Log-weights ``-log(n_real)`` on the first ``n_real`` rows, ``-inf`` after."""
    dtype = jnp.result_type(float)
    uniform = jnp.full((n,), -jnp.log(float(n_real)), dtype)
    if n_real == n:
        return uniform
    return jnp.where(jnp.arange(n) < n_real, uniform, -jnp.inf)


def _reweight_rows(log_w: Array, log_g: Array, log_z: Array, n_real: int):
    """:func:`_reweight` on ``n_real`` real rows followed by padding rows.

    Padding rows enter with log-weight ``-inf`` (:func:`_uniform`) and keep it. The
    one case to mend is a step where every real weight is zero: normalisation then
    falls back to uniform weights over *all* rows, whereas the ``n_real``-particle
    filter gives its real particles ``-log(n_real)`` and padding must stay at zero.
    """
    log_w, log_z, incr = _reweight(log_w, log_g, log_z)
    if n_real != log_w.shape[0]:
        log_w = jnp.where(incr == -jnp.inf, _uniform(log_w.shape[0], n_real), log_w)
    return log_w, log_z, incr


def _init(key, bm: BatchedModel, n: int, n_real: int | None = None):
    n_real = n if n_real is None else n_real
    t0 = jnp.zeros((), jnp.int32)
    x0 = bm.init(key, n)
    if _num_particles(x0) != n:
        raise ValueError(
            f"init returned {_num_particles(x0)} particles, expected num_particles={n}"
        )
    log_g = bm.log_potential(t0, None, x0)
    uniform = _uniform(n, n_real)
    zero = jnp.zeros((), uniform.dtype)
    log_w, log_z, incr = _reweight_rows(uniform, log_g, zero, n_real)
    state = SMCState(x0, log_w, log_z, t0)
    cache = _weights_cache(log_w)
    info = SMCInfo(jnp.arange(n, dtype=jnp.int32), jnp.array(False), cache.ess, incr)
    return state, info, cache


def build_step(
    model: FeynmanKac,
    *,
    resampling: str | Resampler = "systematic",
    ess_threshold: float = 0.5,
) -> Callable[[PRNGKey, SMCState], tuple[SMCState, SMCInfo]]:
    """Return the kernel ``step(key, state) -> (state, info)`` for ``model``.

    ``ess_threshold`` is the fraction of ``N`` below which the ESS triggers
    resampling: ``1.0`` resamples at every step, ``0.0`` never.
    """
    bm = batch_model(model)
    resampler = get_resampler(resampling)
    _check_threshold(ess_threshold)

    def step_fn(key: PRNGKey, state: SMCState) -> tuple[SMCState, SMCInfo]:
        cache = _weights_cache(state.log_weights)
        new_state, info, _ = _step(key, state, cache, bm, resampler, ess_threshold)
        return new_state, info

    return step_fn


def step(
    key: PRNGKey,
    state: SMCState,
    model: FeynmanKac,
    *,
    resampling: str | Resampler = "systematic",
    ess_threshold: float = 0.5,
) -> tuple[SMCState, SMCInfo]:
    """One SMC step (resample if needed, propagate, reweight); see the module doc."""
    return build_step(model, resampling=resampling, ess_threshold=ess_threshold)(
        key, state
    )


def _resampling_mode(ess_threshold: Any) -> str:
    """Return ``"always"``/``"never"`` for static thresholds 1 and 0, else adaptive."""
    if isinstance(ess_threshold, int | float) and not isinstance(ess_threshold, bool):
        if ess_threshold >= 1.0:
            return "always"
        if ess_threshold <= 0.0:
            return "never"
    return "adaptive"


class _WeightsCache(NamedTuple):
    """Quantities of the normalised log-weights that every step needs (internal).

    ``w = exp(log W - max log W)`` (what every built-in resampler exponentiates
    first) and the ESS. Computed once per step, after reweighting, and carried
    next to the :class:`SMCState` in :func:`smc`'s scan, so the ESS, the resampler and
    the filtering means share one exponentiation pass.
    """

    w: Array
    total: Array
    ess: Array


def _weights_cache(log_w: Array) -> _WeightsCache:
    w, _ = _rs._weights(log_w, nan_free=True)  # normalised log-weights have no NaN
    total = jnp.sum(w)
    return _WeightsCache(w, total, jnp.square(total) / jnp.sum(jnp.square(w)))


def _step(
    key,
    state: SMCState,
    cache: _WeightsCache,
    bm: BatchedModel,
    resampler,
    ess_threshold,
    n_real: int | None = None,
):
    n = state.log_weights.shape[0]
    n_real = n if n_real is None else n_real
    t = state.t + 1
    k_res, k_prop = jax.random.split(key)
    identity = jnp.arange(n, dtype=jnp.int32)
    uniform = _uniform(n, n_real).astype(state.log_weights.dtype)
    from_weights = _rs._FROM_WEIGHTS.get(resampler)

    def resample():
        # n_real ancestors of the n_real real particles (padding rows have weight 0
        # and are never drawn); padding rows copy the first ancestors.
        if from_weights is not None:  # same result, without re-exponentiating
            a = from_weights(k_res, cache.w, n_real)
        else:
            a = resampler(k_res, state.log_weights, n_real).astype(jnp.int32)
        return a if n_real == n else jnp.concatenate([a, a[: n - n_real]])

    mode = _resampling_mode(ess_threshold)
    if mode == "always":
        resampled = jnp.array(True)
        ancestors = resample()
        log_w = uniform
        x_prev = gather(state.particles, ancestors)
    elif mode == "never":
        resampled = jnp.array(False)
        ancestors, log_w, x_prev = identity, state.log_weights, state.particles
    else:
        # A traced threshold is allowed (e.g. vmapped over thresholds).
        resampled = cache.ess < ess_threshold * n_real
        # One cond for ancestors *and* the gather: without vmap only the taken branch
        # runs, so skipped resampling costs nothing; under vmap it becomes a select.
        ancestors, x_prev = jax.lax.cond(
            resampled,
            lambda: (a := resample(), gather(state.particles, a)),
            lambda: (identity, state.particles),
        )
        log_w = jnp.where(resampled, uniform, state.log_weights)

    x = bm.propagate(k_prop, t, x_prev)
    log_g = bm.log_potential(t, x_prev, x)
    log_w, log_z, incr = _reweight_rows(log_w, log_g, state.log_evidence, n_real)
    new_state = SMCState(x, log_w, log_z, t)
    new_cache = _weights_cache(log_w)
    info = SMCInfo(ancestors, resampled, new_cache.ess, incr)
    return new_state, info, new_cache


def _check_num_particles(num_particles: Any) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int):
        try:
            num_particles = int(num_particles)
        except (TypeError, ValueError):
            raise TypeError(
                f"num_particles must be a Python int, got {num_particles!r}"
            ) from None
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    return num_particles


def _check_threshold(ess_threshold: Any) -> None:
    if isinstance(ess_threshold, int | float) and not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must lie in [0, 1], got {ess_threshold}")


def smc(
    key: PRNGKey,
    model: FeynmanKac,
    num_particles: int,
    num_steps: int,
    *,
    resampling: str | Resampler = "systematic",
    ess_threshold: float = 0.5,
    final_resample: bool = False,
    return_history: bool = False,
    compute_means: bool = False,
    summary_fn: Callable[[Array, ArrayTree, Array], ArrayTree] | None = None,
) -> SMCResult:
    r"""Run the particle filter of a Feynman–Kac model for ``t = 0..num_steps-1``.

    Parameters
    ----------
    key
        PRNG key.
    model
        A :class:`FeynmanKac` model of one-particle functions.
    num_particles
        ``N >= 1`` (static).
    num_steps
        ``T >= 1`` (static); the loop over ``t = 1..T-1`` is a ``lax.scan``.
    resampling
        ``"multinomial" | "stratified" | "systematic" | "residual"`` or a callable with
        the resampler signature (see :mod:`smcjax.resampling`).
    ess_threshold
        Resample before step ``t`` when :math:`\mathrm{ESS}(W_{t-1}) <` this fraction
        of ``N``; ``1.0`` = every step, ``0.0`` = never.
    final_resample
        Resample once more after the last step so ``particles`` are equally weighted
        (``log_weights`` are then uniform).
    return_history
        Keep the particles of every step in ``history`` (``(T, N, ...)``) and their
        normalised log-weights in ``log_weights_history`` (``(T, N)``), e.g. for
        :mod:`smcjax.smoothing`.
    compute_means
        Store the filtering means :math:`\sum_n W_t^n X_t^n` in ``filtering_means``.
    summary_fn
        Optional ``summary_fn(t, particles, log_weights) -> pytree``, stacked over
        ``t`` in ``summaries``.

    Returns
    -------
    SMCResult
        ``log_evidence`` is :math:`\log \hat Z_{T-1}`, an unbiased estimate on the
        natural scale: :math:`\mathbb{E}[\hat Z] = Z`.

    Notes
    -----
    Runs under ``jax.jit`` (with ``model``, ``num_particles``, ``num_steps`` and the
    keyword options static) and under ``jax.vmap`` over keys.

    From 64 particles on, a ``num_particles`` that is not a multiple of 16 is run
    with up to 15 *padding rows* (models the engine vmaps, and vectorized models
    with ``any_batch_size=True``, such as the state-space filters): XLA's CPU fusion
    kernels are 3-10x slower on lengths that are not multiples of 16 (a bootstrap
    filter with 100 001 particles took 4.8x as long as with 100 000). Padding rows
    have weight zero throughout: they are never drawn as ancestors, and add nothing
    to :math:`\hat Z`, the ESS or the means; exactly ``num_particles`` ancestors
    are drawn from the real particles, and every output is cut back to them. The
    particles, ancestors and history are those of the run without padding rows
    (tested); sums over particles agree up to float32 summation order.
    """
    n = _check_num_particles(num_particles)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    bm = batch_model(model)
    resampler = get_resampler(resampling)
    _check_threshold(ess_threshold)
    # Rows actually run: n real particles + padding rows (see _padded). Vectorised
    # models get exactly n unless they accept any batch size (their batch layout,
    # e.g. sharding or per-particle arrays, is the user's).
    rows = _padded(n) if model.any_batch_size or not model.vectorized else n

    def real(tree: ArrayTree) -> ArrayTree:
        return tree if rows == n else _head(tree, n)

    def record(state: SMCState, info: SMCInfo, cache: _WeightsCache):
        out = {"info": info._replace(ancestors=real(info.ancestors))}
        particles, log_w = real(state.particles), real(state.log_weights)
        if return_history:
            out["history"] = particles
            out["log_weights"] = log_w
        if compute_means:
            out["mean"] = _cached_mean(state.particles, cache)
        if summary_fn is not None:
            out["summary"] = summary_fn(state.t, particles, log_w)
        return out

    k0, k_loop, k_final = jax.random.split(key, 3)
    state, info0, cache = _init(k0, bm, rows, n)
    rec0 = record(state, info0, cache)

    # The records of every step are written in place into (T, ...) buffers carried
    # by the scan (row 0 from the initial step), rather than stacked by the scan and
    # concatenated with row 0 afterwards: that would copy the (T, N) ancestors (and
    # any history) once more.
    recs = jax.tree.map(
        lambda a: (
            jnp.zeros((num_steps, *jnp.shape(a)), jnp.result_type(a)).at[0].set(a)
        ),
        rec0,
    )

    def body(carry, k):
        state, cache, recs = carry
        state, info, cache = _step(k, state, cache, bm, resampler, ess_threshold, n)
        recs = jax.tree.map(
            lambda buf, r: jax.lax.dynamic_update_index_in_dim(buf, r, state.t, 0),
            recs,
            record(state, info, cache),
        )
        return (state, cache, recs), None

    if num_steps > 1:
        (state, cache, recs), _ = jax.lax.scan(
            body, (state, cache, recs), jax.random.split(k_loop, num_steps - 1)
        )

    particles, log_w = state.particles, state.log_weights
    final_ancestors = None
    if final_resample:
        from_weights = _rs._FROM_WEIGHTS.get(resampler)
        if from_weights is not None:
            final_ancestors = from_weights(k_final, cache.w, n)
        else:
            final_ancestors = resampler(k_final, log_w, n).astype(jnp.int32)
        particles = gather(particles, final_ancestors)
        log_w = jnp.full((n,), -jnp.log(float(n)), log_w.dtype)
    else:
        particles, log_w = real(particles), real(log_w)
    infos: SMCInfo = recs["info"]
    return SMCResult(
        particles=particles,
        log_weights=log_w,
        log_evidence=state.log_evidence,
        ess=infos.ess,
        resampled=infos.resampled,
        ancestors=infos.ancestors,
        log_evidence_increments=infos.log_evidence_increment,
        history=recs.get("history"),
        filtering_means=recs.get("mean"),
        summaries=recs.get("summary"),
        log_weights_history=recs.get("log_weights"),
        final_ancestors=final_ancestors,
    )
