"""Resampling schemes and the effective sample size.

Every resampler has the signature ``resampler(key, log_weights, num_samples=None)`` and
returns ``int32`` ancestor indices ``A^{1:M}`` in ``[0, N)`` such that the offspring
counts ``N^i = #{m : A^m = i}`` are unbiased, ``E[N^i] = M W^i``, where

.. math::  W^i = \\frac{\\exp(\\ell^i)}{\\sum_j \\exp(\\ell^j)}

are the normalised weights of the unnormalised log-weights ``ℓ``. ``-inf`` entries are
particles of weight zero and are never selected; ``NaN`` entries are treated as ``-inf``.
If *every* entry is ``-inf`` or ``NaN`` the weights are undefined: the resamplers then
fall back to uniform weights (documented flag: :func:`ess` returns ``0`` and the SMC
driver reports a log-evidence of ``-inf``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from smcjax.types import Array, ArrayLike, PRNGKey

__all__ = [
    "Resampler",
    "ess",
    "get_resampler",
    "log_normalize",
    "multinomial",
    "normalize",
    "residual",
    "stratified",
    "systematic",
]

Resampler = Callable[[PRNGKey, ArrayLike, int | None], Array]


def _clean(log_weights: ArrayLike) -> Array:
    lw = jnp.asarray(log_weights)
    if lw.ndim != 1:
        raise ValueError(
            f"log_weights must be a 1-d array of shape (N,), got shape {lw.shape}"
        )
    if lw.shape[0] < 1:
        raise ValueError("log_weights must contain at least one particle")
    if not jnp.issubdtype(lw.dtype, jnp.floating):
        lw = lw.astype(jnp.float32)
    return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


def log_normalize(log_weights: ArrayLike) -> tuple[Array, Array]:
    """Normalise log-weights.

    Returns ``(log W, log Σ exp ℓ)``. When all weights are zero the normalised
    log-weights are uniform, ``-log N``, and the log-sum is ``-inf``.
    """
    lw = _clean(log_weights)
    n = lw.shape[0]
    m = jnp.max(lw)
    finite = jnp.isfinite(m)
    shift = jnp.where(finite, m, 0.0)
    s = jnp.sum(jnp.exp(lw - shift))
    log_sum = jnp.where(finite, shift + jnp.log(s), -jnp.inf)
    log_w = jnp.where(finite, lw - log_sum, -jnp.log(float(n)))
    return log_w, log_sum


def normalize(log_weights: ArrayLike) -> Array:
    """Normalised weights ``W = softmax(ℓ)`` (uniform if every weight is zero)."""
    return jnp.exp(log_normalize(log_weights)[0])


def ess(log_weights: ArrayLike) -> Array:
    """Effective sample size ``1 / Σ_i (W^i)^2`` of unnormalised log-weights.

    Returns a value in ``[1, N]``, or ``0`` when every weight is zero (all ``-inf``).
    """
    lw = _clean(log_weights)
    m = jnp.max(lw)
    finite = jnp.isfinite(m)
    shift = jnp.where(finite, m, 0.0)
    w = jnp.exp(lw - shift)
    out = jnp.square(jnp.sum(w)) / jnp.sum(jnp.square(w))
    return jnp.where(finite, out, 0.0)


def _num(log_weights: Array, num_samples: int | None) -> int:
    m = log_weights.shape[0] if num_samples is None else int(num_samples)
    if m < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return m


def _inverse_cdf(sorted_uniforms: Array, weights: Array) -> Array:
    """Indices ``i`` with ``C_{i-1} <= u < C_i`` for sorted ``u`` in ``[0, C_N)``."""
    cdf = jnp.cumsum(weights)
    u = sorted_uniforms * cdf[-1]
    idx = jnp.searchsorted(cdf, u, side="right")
    last_positive = weights.shape[0] - 1 - jnp.argmax(weights[::-1] > 0)
    return jnp.minimum(idx, last_positive).astype(jnp.int32)


def multinomial(key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None) -> Array:
    """Multinomial resampling: ``A^m ~ Categorical(W)`` i.i.d."""
    lw = _clean(log_weights)
    m = _num(lw, num_samples)
    w = normalize(lw)
    u = jnp.sort(jax.random.uniform(key, (m,)))
    idx = _inverse_cdf(u, w)
    # i.i.d. draws: randomise the order of the sorted uniforms' indices.
    return jax.random.permutation(jax.random.fold_in(key, 1), idx)


def stratified(key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None) -> Array:
    """Stratified resampling: ``u^m = (m + U^m) / M`` with independent ``U^m``."""
    lw = _clean(log_weights)
    m = _num(lw, num_samples)
    u = (jnp.arange(m) + jax.random.uniform(key, (m,))) / m
    return _inverse_cdf(u, normalize(lw))


def systematic(key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None) -> Array:
    """Systematic resampling: ``u^m = (m + U) / M`` with a single ``U``."""
    lw = _clean(log_weights)
    m = _num(lw, num_samples)
    u = (jnp.arange(m) + jax.random.uniform(key, ())) / m
    return _inverse_cdf(u, normalize(lw))


def residual(key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None) -> Array:
    """Residual resampling: ``⌊M W^i⌋`` deterministic copies, the rest multinomial."""
    lw = _clean(log_weights)
    n = lw.shape[0]
    m = _num(lw, num_samples)
    w = normalize(lw)
    counts = jnp.floor(m * w).astype(jnp.int32)
    # guard against float round-up beyond M
    counts = jnp.where(jnp.cumsum(counts) <= m, counts, 0)
    n_det = jnp.sum(counts)
    det = jnp.repeat(jnp.arange(n, dtype=jnp.int32), counts, total_repeat_length=m)
    resid = jnp.clip(m * w - counts, 0.0)
    resid = jnp.where(jnp.sum(resid) > 0, resid, w)
    extra = multinomial(key, jnp.log(resid), m)
    return jnp.where(jnp.arange(m) < n_det, det, extra).astype(jnp.int32)


_RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(resampling: str | Resampler) -> Resampler:
    """Look up a resampler by name, or pass a callable through."""
    if callable(resampling):
        return resampling
    try:
        return _RESAMPLERS[resampling]
    except KeyError:
        raise ValueError(
            f"unknown resampling={resampling!r}; expected one of "
            f"{sorted(_RESAMPLERS)} or a callable (key, log_weights, num_samples)"
        ) from None
