r"""Exact inference for linear-Gaussian state-space models: Kalman filter, RTS smoother.

The model (time-invariant, or time-varying when a parameter carries a leading time
axis of length ``T``) is

.. math::

    X_0 &\sim \mathcal N(m_0, P_0), \\
    X_t &= F_t X_{t-1} + b_t + \varepsilon_t, \quad
        \varepsilon_t \sim \mathcal N(0, Q_t), \qquad t = 1, \dots, T-1, \\
    Y_t &= H_t X_t + c_t + \eta_t, \quad \eta_t \sim \mathcal N(0, R_t),
        \qquad t = 0, \dots, T-1.

It is the exact oracle of the particle filters (:mod:`smcjax.ssm`) and a user feature
in its own right. Everything runs on ``lax.scan`` and works under ``jax.jit`` /
``jax.vmap``; run it inside ``jax.experimental.enable_x64()`` with float64 inputs for a
high-precision reference.

The *filter* computes, with the predicted moments :math:`m_{t|t-1} = F_t m_{t-1} + b_t`,
:math:`P_{t|t-1} = F_t P_{t-1} F_t^\top + Q_t` (and :math:`m_{0|-1} = m_0`,
:math:`P_{0|-1} = P_0`),

.. math::

    S_t &= H_t P_{t|t-1} H_t^\top + R_t, \qquad
    K_t = P_{t|t-1} H_t^\top S_t^{-1}, \qquad
    v_t = y_t - H_t m_{t|t-1} - c_t, \\
    m_t &= m_{t|t-1} + K_t v_t, \qquad
    P_t = (I - K_t H_t) P_{t|t-1} (I - K_t H_t)^\top + K_t R_t K_t^\top
    \quad \text{(Joseph form)}, \\
    \log p(y_{0:T-1}) &= \sum_t \log \mathcal N(v_t; 0, S_t).

The *Rauch–Tung–Striebel smoother* runs backwards from
:math:`(m_{T-1|T-1}, P_{T-1|T-1})`:

.. math::

    J_t = P_t F_{t+1}^\top P_{t+1|t}^{-1}, \quad
    m_{t|T} = m_t + J_t (m_{t+1|T} - m_{t+1|t}), \quad
    P_{t|T} = P_t + J_t (P_{t+1|T} - P_{t+1|t}) J_t^\top .
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from smcjax.types import Array, ArrayLike

__all__ = [
    "KalmanFilterResult",
    "KalmanSmootherResult",
    "LinearGaussianSSM",
    "kalman_filter",
    "log_likelihood",
    "rts_smoother",
    "to_state_space_model",
]


class LinearGaussianSSM(NamedTuple):
    r"""Parameters of a linear-Gaussian state-space model (see the module doc).

    Each of ``transition_matrix`` ``F`` (d, d), ``transition_covariance`` ``Q`` (d, d),
    ``emission_matrix`` ``H`` (p, d), ``emission_covariance`` ``R`` (p, p) and the
    offsets ``b`` (d,), ``c`` (p,) may instead carry a leading time axis of length
    ``T`` (entry ``t`` is used at time ``t``; entry 0 of ``F``, ``Q``, ``b`` is
    unused). Offsets default to zero.
    """

    initial_mean: ArrayLike
    initial_covariance: ArrayLike
    transition_matrix: ArrayLike
    transition_covariance: ArrayLike
    emission_matrix: ArrayLike
    emission_covariance: ArrayLike
    transition_offset: ArrayLike | None = None
    emission_offset: ArrayLike | None = None


class KalmanFilterResult(NamedTuple):
    r"""Output of :func:`kalman_filter`.

    Attributes
    ----------
    log_likelihood
        :math:`\log p(y_{0:T-1})` (scalar).
    filtered_means, filtered_covariances
        ``(T, d)``, ``(T, d, d)``: moments of :math:`p(x_t \mid y_{0:t})`.
    predicted_means, predicted_covariances
        ``(T, d)``, ``(T, d, d)``: moments of :math:`p(x_t \mid y_{0:t-1})`.
    """

    log_likelihood: Array
    filtered_means: Array
    filtered_covariances: Array
    predicted_means: Array
    predicted_covariances: Array


class KalmanSmootherResult(NamedTuple):
    r"""Output of :func:`rts_smoother`: the filter's fields plus smoothed moments.

    Attributes
    ----------
    smoothed_means, smoothed_covariances
        ``(T, d)``, ``(T, d, d)``: moments of :math:`p(x_t \mid y_{0:T-1})`.
    """

    log_likelihood: Array
    filtered_means: Array
    filtered_covariances: Array
    predicted_means: Array
    predicted_covariances: Array
    smoothed_means: Array
    smoothed_covariances: Array


class _Params(NamedTuple):
    m0: Array
    p0: Array
    f: Array
    q: Array
    h: Array
    r: Array
    b: Array
    c: Array
    f_tv: bool
    q_tv: bool
    h_tv: bool
    r_tv: bool
    b_tv: bool
    c_tv: bool


def _prepare(
    params: LinearGaussianSSM, observations: ArrayLike
) -> tuple[_Params, Array]:
    if not isinstance(params, LinearGaussianSSM):
        raise TypeError(
            f"params must be a smcjax.kalman.LinearGaussianSSM, got "
            f"{type(params).__name__}"
        )
    ys = jnp.asarray(observations)
    m0 = jnp.asarray(params.initial_mean)
    dtype = jnp.result_type(m0, ys, float)
    ys, m0 = ys.astype(dtype), m0.astype(dtype)
    if m0.ndim != 1:
        raise ValueError(f"initial_mean must have shape (d,), got {m0.shape}")
    d = m0.shape[0]
    if ys.ndim == 1:
        ys = ys[:, None]
    if ys.ndim != 2 or ys.shape[0] < 1:
        raise ValueError(
            f"observations must have shape (T, p) or (T,) with T >= 1, got {ys.shape}"
        )
    n_steps, p = ys.shape

    def arr(name, value, shape):
        a = jnp.asarray(value, dtype)
        if a.shape == shape:
            return a, False
        if a.shape == (n_steps, *shape):
            return a, True
        raise ValueError(
            f"{name} must have shape {shape} or {(n_steps, *shape)} (T = "
            f"len(observations) = {n_steps}), got {a.shape}"
        )

    p0, _ = arr("initial_covariance", params.initial_covariance, (d, d))
    f, f_tv = arr("transition_matrix", params.transition_matrix, (d, d))
    q, q_tv = arr("transition_covariance", params.transition_covariance, (d, d))
    h, h_tv = arr("emission_matrix", params.emission_matrix, (p, d))
    r, r_tv = arr("emission_covariance", params.emission_covariance, (p, p))
    b, b_tv = arr(
        "transition_offset",
        jnp.zeros(d) if params.transition_offset is None else params.transition_offset,
        (d,),
    )
    c, c_tv = arr(
        "emission_offset",
        jnp.zeros(p) if params.emission_offset is None else params.emission_offset,
        (p,),
    )
    return _Params(m0, p0, f, q, h, r, b, c, f_tv, q_tv, h_tv, r_tv, b_tv, c_tv), ys


def _at(a: Array, tv: bool, t: Array) -> Array:
    return a[t] if tv else a


def _symmetrize(p: Array) -> Array:
    return 0.5 * (p + p.T)


def _update(m_pred, p_pred, y, h, r, c):
    """Condition N(m_pred, p_pred) on y = h x + c + N(0, r).

    Returns the posterior mean and covariance and log N(v; 0, S).
    """
    s = _symmetrize(h @ p_pred @ h.T + r)
    chol = jnp.linalg.cholesky(s)
    v = y - h @ m_pred - c
    # K = P H^T S^{-1}, via two triangular solves.
    k = jsl.cho_solve((chol, True), h @ p_pred).T
    m = m_pred + k @ v
    i_kh = jnp.eye(m_pred.shape[0], dtype=m_pred.dtype) - k @ h
    p = _symmetrize(i_kh @ p_pred @ i_kh.T + k @ r @ k.T)
    z = jsl.solve_triangular(chol, v, lower=True)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
    ll = -0.5 * (z @ z + log_det + v.shape[0] * jnp.log(2.0 * jnp.pi))
    return m, p, ll


def _filter(prm: _Params, ys: Array) -> KalmanFilterResult:
    t_idx = jnp.arange(ys.shape[0])

    def body(carry, inp):
        m_prev, p_prev, ll = carry
        t, y = inp
        f, q, b = (
            _at(prm.f, prm.f_tv, t),
            _at(prm.q, prm.q_tv, t),
            _at(prm.b, prm.b_tv, t),
        )
        m_pred = jnp.where(t == 0, prm.m0, f @ m_prev + b)
        p_pred = jnp.where(t == 0, prm.p0, _symmetrize(f @ p_prev @ f.T + q))
        h, r, c = (
            _at(prm.h, prm.h_tv, t),
            _at(prm.r, prm.r_tv, t),
            _at(prm.c, prm.c_tv, t),
        )
        m, p, ll_t = _update(m_pred, p_pred, y, h, r, c)
        return (m, p, ll + ll_t), (m, p, m_pred, p_pred)

    init = (prm.m0, prm.p0, jnp.zeros((), prm.m0.dtype))
    (_, _, ll), (ms, ps, mps, pps) = jax.lax.scan(body, init, (t_idx, ys))
    return KalmanFilterResult(ll, ms, ps, mps, pps)


def kalman_filter(
    params: LinearGaussianSSM, observations: ArrayLike
) -> KalmanFilterResult:
    """Run the Kalman filter (see the module doc for the recursions).

    Parameters
    ----------
    params
        A :class:`LinearGaussianSSM`.
    observations
        ``(T, p)`` (or ``(T,)`` when ``p = 1``).

    Returns
    -------
    KalmanFilterResult
        Log-likelihood, filtered and predicted moments.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from smcjax import kalman
    >>> params = kalman.LinearGaussianSSM(
    ...     jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), jnp.eye(1), jnp.eye(1),
    ...     0.25 * jnp.eye(1))
    >>> out = kalman.kalman_filter(params, jnp.array([0.3, -0.1, 0.5]))
    >>> out.filtered_means.shape
    (3, 1)
    """
    prm, ys = _prepare(params, observations)
    return _filter(prm, ys)


def log_likelihood(params: LinearGaussianSSM, observations: ArrayLike) -> Array:
    r"""Exact :math:`\log p(y_{0:T-1})` of a linear-Gaussian model."""
    return kalman_filter(params, observations).log_likelihood


def rts_smoother(
    params: LinearGaussianSSM, observations: ArrayLike
) -> KalmanSmootherResult:
    r"""Run the Kalman filter forwards, then the Rauch–Tung–Striebel smoother backwards.

    Returns
    -------
    KalmanSmootherResult
        The filter's output plus the smoothed moments of
        :math:`p(x_t \mid y_{0:T-1})`.
    """
    prm, ys = _prepare(params, observations)
    filt = _filter(prm, ys)
    n_steps = ys.shape[0]

    def body(carry, t):
        m_next_s, p_next_s = carry
        m, p = filt.filtered_means[t], filt.filtered_covariances[t]
        m_pred = filt.predicted_means[t + 1]
        p_pred = filt.predicted_covariances[t + 1]
        f = _at(prm.f, prm.f_tv, t + 1)
        # J = P F^T P_pred^{-1}  (P_pred symmetric positive definite)
        chol = jnp.linalg.cholesky(p_pred)
        gain = jsl.cho_solve((chol, True), f @ p).T
        m_s = m + gain @ (m_next_s - m_pred)
        p_s = _symmetrize(p + gain @ (p_next_s - p_pred) @ gain.T)
        return (m_s, p_s), (m_s, p_s)

    last = (filt.filtered_means[-1], filt.filtered_covariances[-1])
    if n_steps > 1:
        _, (ms, ps) = jax.lax.scan(body, last, jnp.arange(n_steps - 2, -1, -1))
        ms = jnp.concatenate([ms[::-1], last[0][None]], axis=0)
        ps = jnp.concatenate([ps[::-1], last[1][None]], axis=0)
    else:
        ms, ps = last[0][None], last[1][None]
    return KalmanSmootherResult(*filt, ms, ps)


def to_state_space_model(params: LinearGaussianSSM):
    """Return the same model as a :class:`~smcjax.ssm.StateSpaceModel` (NumPyro).

    Observations must then be passed with shape ``(T, p)``. Used to run particle
    filters against the exact answer.
    """
    import numpyro.distributions as dist

    from smcjax.ssm import StateSpaceModel

    m0 = jnp.asarray(params.initial_mean)
    d = m0.shape[0]
    f = jnp.asarray(params.transition_matrix)
    q = jnp.asarray(params.transition_covariance)
    h = jnp.asarray(params.emission_matrix)
    r = jnp.asarray(params.emission_covariance)
    p = h.shape[-2]
    b = jnp.zeros(d) if params.transition_offset is None else params.transition_offset
    c = jnp.zeros(p) if params.emission_offset is None else params.emission_offset
    b, c = jnp.asarray(b), jnp.asarray(c)
    # Cholesky factors once, outside the per-particle functions.
    chol_p0 = jnp.linalg.cholesky(jnp.asarray(params.initial_covariance))
    chol_q = jnp.linalg.cholesky(q)
    chol_r = jnp.linalg.cholesky(r)

    def pick(a, base_ndim, t):
        return a[t] if a.ndim > base_ndim else a

    def initial():
        return dist.MultivariateNormal(m0, scale_tril=chol_p0)

    def transition(t, x_prev):
        loc = pick(f, 2, t) @ x_prev + pick(b, 1, t)
        return dist.MultivariateNormal(loc, scale_tril=pick(chol_q, 2, t))

    def emission(t, x):
        loc = pick(h, 2, t) @ x + pick(c, 1, t)
        return dist.MultivariateNormal(loc, scale_tril=pick(chol_r, 2, t))

    return StateSpaceModel(initial, transition, emission)
