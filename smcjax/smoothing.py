r"""Particle smoothing: genealogy tracing and forward-filtering backward-sampling.

Both start from a filter run with ``return_history=True`` (see :func:`smcjax.smc` and
:func:`smcjax.particle_filter`), which stores the particles :math:`X_t^{1:N}`, their
normalised log-weights :math:`\log W_t^{1:N}` and the ancestors :math:`A_t^{1:N}`.

*Genealogy tracing* (:func:`genealogy`): draw :math:`B_{T-1} \sim W_{T-1}` and follow
the ancestors back, :math:`B_{t-1} = A_t^{B_t}`; the trajectory
:math:`(X_0^{B_0}, \dots, X_{T-1}^{B_{T-1}})` is a draw from the particle approximation
of the smoothing distribution :math:`p(x_{0:T-1} \mid y_{0:T-1})`. It is cheap
(:math:`O(T)` per trajectory) but suffers from path degeneracy: for ``t`` far from
``T`` all trajectories share few ancestors.

*Backward sampling* (:func:`backward_sampling`, FFBS; Godsill, Doucet & West 2004)
needs the transition density :math:`p_{t+1}(x_{t+1} \mid x_t)`: draw
:math:`B_{T-1} \sim W_{T-1}`, then for :math:`t = T-2, \dots, 0`

.. math::

    \mathbb P(B_t = n \mid B_{t+1}) \propto
    W_t^n \, p_{t+1}\big(X_{t+1}^{B_{t+1}} \mid X_t^n\big),

at a cost of :math:`O(N)` per trajectory and step; trajectories are far less
degenerate. Both functions return trajectories with shape ``(M, T, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from smcjax.core import SMCResult
from smcjax.ssm import StateSpaceModel
from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = ["backward_sampling", "genealogy", "trace_genealogy", "trajectories"]

#: ``log_transition_density(t, x_prev, x) -> scalar``: :math:`\log p_t(x \mid x_{t-1})`.
LogTransitionDensity = Callable[[Any, Any, Any], Array]


def trace_genealogy(ancestors: Array, final_indices: Array) -> Array:
    r"""Follow ancestors back from ``final_indices``.

    Parameters
    ----------
    ancestors
        ``(T, N)`` int, :math:`A_t^n` = index at ``t-1`` of the parent of particle
        ``n`` at ``t`` (row 0 is ignored).
    final_indices
        ``(M,)`` int, :math:`B_{T-1}^{1:M}`.

    Returns
    -------
    Array
        ``(T, M)`` int32 lineages, :math:`B_{t-1} = A_t^{B_t}`.
    """
    ancestors = jnp.asarray(ancestors, jnp.int32)
    b_last = jnp.asarray(final_indices, jnp.int32)
    if ancestors.ndim != 2 or b_last.ndim != 1:
        raise ValueError(
            f"ancestors must be (T, N) and final_indices (M,), got "
            f"{ancestors.shape} and {b_last.shape}"
        )

    def body(b, a_t):
        prev = a_t[b]
        return prev, prev

    # Scan over A_{T-1}, ..., A_1, producing B_{T-2}, ..., B_0.
    _, bs = jax.lax.scan(body, b_last, ancestors[1:][::-1])
    return jnp.concatenate([bs[::-1], b_last[None]], axis=0)


def trajectories(history: ArrayTree, lineages: Array) -> ArrayTree:
    """Gather ``history[t, lineages[t, m]]`` into trajectories ``(M, T, ...)``."""

    def take(h):
        path = jax.vmap(lambda h_t, b_t: jnp.take(h_t, b_t, axis=0))(h, lineages)
        return jnp.swapaxes(path, 0, 1)

    return jax.tree.map(take, history)


def _check_history(result: SMCResult) -> None:
    if not isinstance(result, SMCResult):
        raise TypeError(f"result must be an SMCResult, got {type(result).__name__}")
    if result.history is None or result.log_weights_history is None:
        raise ValueError(
            "result has no history: run the filter with return_history=True"
        )


def genealogy(key: PRNGKey, result: SMCResult, num_samples: int) -> ArrayTree:
    r"""Sample ``num_samples`` trajectories by tracing the genealogy of a filter run.

    The final indices are drawn i.i.d. from :math:`W_{T-1}` (the weights *before* any
    final resampling), then :func:`trace_genealogy` follows the stored ancestors.

    Returns
    -------
    ArrayTree
        Trajectories with leading axes ``(num_samples, T)``.
    """
    _check_history(result)
    final = jax.random.categorical(
        key, result.log_weights_history[-1], shape=(int(num_samples),)
    )
    lineages = trace_genealogy(result.ancestors, final)
    return trajectories(result.history, lineages)


def _log_density_fn(model: StateSpaceModel | LogTransitionDensity) -> Callable:
    if isinstance(model, StateSpaceModel):
        return lambda t, x_prev, x: model.transition(t, x_prev).log_prob(x)
    if callable(model):
        return model
    raise TypeError(
        "model must be a StateSpaceModel or a callable "
        f"log_transition_density(t, x_prev, x), got {type(model).__name__}"
    )


def backward_sampling(
    key: PRNGKey,
    model: StateSpaceModel | LogTransitionDensity,
    result: SMCResult,
    num_samples: int,
) -> ArrayTree:
    r"""Forward-filtering backward-sampling (FFBS) from a filter run.

    Parameters
    ----------
    key
        PRNG key.
    model
        A :class:`~smcjax.ssm.StateSpaceModel` (its ``transition(t, x_prev).log_prob``
        is used) or a one-particle ``log_transition_density(t, x_prev, x)``.
    result
        Output of a filter run with ``return_history=True`` whose
        ``log_weights_history`` are the filtering weights :math:`W_t`
        (:func:`smcjax.particle_filter` ensures this also for the auxiliary filter).
    num_samples
        Number ``M`` of trajectories (static).

    Returns
    -------
    ArrayTree
        Trajectories with leading axes ``(M, T)``; cost :math:`O(M N T)`.
    """
    _check_history(result)
    log_p = _log_density_fn(model)
    m = int(num_samples)
    history, log_w = result.history, result.log_weights_history
    n_steps = log_w.shape[0]
    k_last, k_loop = jax.random.split(key)
    b_last = jax.random.categorical(k_last, log_w[-1], shape=(m,))

    def body(b_next, inp):
        t, k = inp  # sample B_t given B_{t+1}
        x_t = jax.tree.map(lambda h: h[t], history)
        x_next = jax.tree.map(lambda h: jnp.take(h[t + 1], b_next, axis=0), history)

        def logits_one(x_nb):
            lp = jax.vmap(lambda xp: log_p(t + 1, xp, x_nb))(x_t)
            lp = jnp.where(jnp.isnan(lp), -jnp.inf, lp)
            return log_w[t] + lp

        logits = jax.vmap(logits_one)(x_next)  # (M, N)
        b = jax.random.categorical(k, logits, axis=-1).astype(jnp.int32)
        return b, b

    if n_steps > 1:
        ts = jnp.arange(n_steps - 2, -1, -1, dtype=jnp.int32)
        keys = jax.random.split(k_loop, n_steps - 1)
        _, bs = jax.lax.scan(body, b_last.astype(jnp.int32), (ts, keys))
        lineages = jnp.concatenate([bs[::-1], b_last[None].astype(jnp.int32)], axis=0)
    else:
        lineages = b_last[None].astype(jnp.int32)
    return trajectories(history, lineages)
