r"""Conditional SMC and particle Gibbs, with ancestor and backward sampling.

Particle Gibbs (Andrieu, Doucet & Holenstein 2010) samples a smoothing distribution

.. math::

    \pi(x_{0:T-1}) \propto M_0(x_0)\, G_0(x_0)
        \prod_{t=1}^{T-1} M_t(x_{t-1}, x_t)\, G_t(x_{t-1}, x_t)

of a Feynman–Kac model (for a state-space model with the bootstrap choice
:math:`M_t = p_t`, :math:`G_t = f_t(y_t \mid x_t)`, this is :math:`p(x_{0:T-1} \mid
y_{0:T-1})`) by iterating a Markov kernel on trajectories: the *conditional SMC*
(CSMC) sweep. Given a reference trajectory :math:`x^\star_{0:T-1}`, a particle filter
with ``N`` particles is run in which the particle in the *pinned* slot ``p`` is forced
to equal :math:`x^\star_t` at every step:

1. :math:`X_0^n \sim M_0` for :math:`n \ne p`, :math:`X_0^p = x_0^\star`;
   :math:`w_0^n = G_0(X_0^n)`.
2. For :math:`t \ge 1`: ancestors :math:`A_t^{-p}` come from a *conditional*
   resampler (:func:`smcjax.resampling.conditional_multinomial`), which leaves
   :math:`A_t^p = p`; with **ancestor sampling** (Lindsten, Jordan & Schön 2014) the
   reference's ancestor is instead redrawn,

   .. math::

       \mathbb{P}(A_t^p = n) \propto W_{t-1}^n\, M_t(X_{t-1}^n, x_t^\star)\,
           G_t(X_{t-1}^n, x_t^\star);

   then :math:`X_t^n \sim M_t(X_{t-1}^{A_t^n}, \cdot)` for :math:`n \ne p`,
   :math:`X_t^p = x_t^\star`, and :math:`w_t^n = G_t(X_{t-1}^{A_t^n}, X_t^n)`.
3. The new trajectory is drawn from the particle system: pick :math:`B_{T-1} = k`
   with probability :math:`W_{T-1}^k`, then either follow the genealogy,
   :math:`B_{t-1} = A_t^{B_t}`, or, with **backward sampling** (Whiteley 2010;
   Godsill, Doucet & West 2004),

   .. math::

       \mathbb{P}(B_t = n) \propto W_t^n\, M_{t+1}(X_t^n, X_{t+1}^{B_{t+1}})\,
           G_{t+1}(X_t^n, X_{t+1}^{B_{t+1}}).

Both variants leave :math:`\pi` invariant for any ``N >= 2``. Plain CSMC mixes poorly
at early times when ``N`` is small compared with ``T`` (path degeneracy: the genealogy
coalesces on the reference); ancestor sampling and backward sampling repair this and
need the transition *density* :math:`\log M_t(x_{t-1}, x_t)` (``log_transition``).

The kernel works for any :class:`~smcjax.core.FeynmanKac` model, including
``vectorized`` ones (LLM particles): the reference is just "the particle in slot
``pinned``", overwritten after every propagation, and resampling the rest is the same
gather as in :mod:`smcjax.core`.

:func:`particle_gibbs` iterates the kernel on a :class:`~smcjax.ssm.StateSpaceModel`,
optionally alternating with a user update of model parameters
(:math:`\theta \mid x_{0:T-1}, y_{0:T-1}`, e.g. a conjugate draw or an MCMC move).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from smcjax.core import FeynmanKac, batch_model, gather
from smcjax.pt import TemperedKernel
from smcjax.resampling import ess, get_conditional_resampler, log_normalize
from smcjax.ssm import StateSpaceModel
from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = [
    "CSMCInfo",
    "CSMCState",
    "ParticleGibbsResult",
    "build_kernel",
    "conditional_smc",
    "from_state_space",
    "init",
    "particle_gibbs",
    "sample_trajectory",
    "state_space_log_densities",
    "tempered_csmc_kernel",
]

LogTransition = Callable[[Array, ArrayTree, ArrayTree], Array]
ConditionalResampler = Callable[..., Array]


class CSMCState(NamedTuple):
    r"""State of the conditional SMC kernel: the reference trajectory.

    Attributes
    ----------
    trajectory
        Pytree whose leaves have a leading time axis ``T``: :math:`x^\star_{0:T-1}`.
    """

    trajectory: ArrayTree


class CSMCInfo(NamedTuple):
    r"""Diagnostics of one conditional SMC sweep.

    Attributes
    ----------
    log_evidence
        :math:`\log \hat Z_{T-1}` of the conditional particle filter.
    ess
        ``(T,)`` effective sample size of :math:`W_t` after each reweighting.
    updated
        ``(T,)`` bool: whether the new trajectory's state at ``t`` differs from the
        reference's (the per-time *update rate* is its mean over iterations).
    particles
        Final particles :math:`X_{T-1}^{1:N}` (leading axis ``N``; the reference's
        in slot ``pinned``), e.g. to pick an answer by final reward.
    log_weights
        ``(N,)`` their normalised log-weights :math:`\log W_{T-1}^{1:N}`.
    """

    log_evidence: Array
    ess: Array
    updated: Array
    particles: ArrayTree = None
    log_weights: Array = None


class ParticleGibbsResult(NamedTuple):
    """Output of :func:`particle_gibbs`.

    Attributes
    ----------
    trajectories
        ``(num_iterations, T, ...)`` the trajectory after every sweep (with a leading
        ``num_chains`` axis when ``num_chains`` is given).
    params
        Parameters after every iteration, ``(num_iterations, ...)``, or ``None``.
    log_evidence
        ``(num_iterations,)`` log-evidence estimates of the conditional sweeps.
    update_rate
        ``(T,)`` fraction of iterations in which :math:`x_t` changed.
    ess
        ``(num_iterations, T)`` ESS of the conditional sweeps.
    """

    trajectories: ArrayTree
    params: ArrayTree
    log_evidence: Array
    update_rate: Array
    ess: Array


# ----------------------------------------------------------------------------------
# helpers


def _index(tree: ArrayTree, i) -> ArrayTree:
    return jax.tree.map(lambda x: x[i], tree)


def _set_slot(particles: ArrayTree, slot: int, value: ArrayTree) -> ArrayTree:
    return jax.tree.map(
        lambda x, v: x.at[slot].set(jnp.asarray(v, x.dtype)), particles, value
    )


def _broadcast(value: ArrayTree, n: int) -> ArrayTree:
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *jnp.shape(v))), value)


def _categorical(key: PRNGKey, log_weights: Array) -> Array:
    """One draw from normalised ``log_weights``; NaN/-inf safe (uniform if all -inf)."""
    return jax.random.categorical(key, log_normalize(log_weights)[0]).astype(jnp.int32)


def _length(tree: ArrayTree, name: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf")
    lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"every leaf of {name} must have the same leading time axis; got "
            f"shapes {[jnp.shape(x) for x in leaves]}"
        )
    return lengths.pop()


def _differs(new: ArrayTree, old: ArrayTree) -> Array:
    """``(T,)`` bool: whether the time slices of two trajectories differ."""
    flags = [
        jnp.any(jnp.reshape(a != b, (a.shape[0], -1)), axis=1)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
    ]
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


# ----------------------------------------------------------------------------------
# models


def from_state_space(
    model: StateSpaceModel, observations: ArrayTree
) -> tuple[FeynmanKac, LogTransition]:
    r"""Build the bootstrap Feynman–Kac model of a state-space model.

    Returns ``(fk, log_transition)`` with :math:`M_0 = p_0`, :math:`M_t = p_t(\cdot
    \mid x_{t-1})`, :math:`\log G_t(x_{t-1}, x_t) = \log f_t(y_t \mid x_t)` and
    ``log_transition(t, x_prev, x)`` :math:`= \log p_t(x_t \mid x_{t-1})`. The
    potential does not depend on :math:`x_{t-1}`, so use
    ``potential_uses_prev=False`` with it.
    """
    if not isinstance(model, StateSpaceModel):
        raise TypeError(
            f"model must be a smcjax.StateSpaceModel, got {type(model).__name__}"
        )
    y = observations

    def init_fn(key):
        return model.initial().sample(key)

    def propagate_fn(key, t, x_prev):
        return model.transition(t, x_prev).sample(key)

    def log_potential_fn(t, x_prev, x):
        del x_prev
        return jnp.sum(model.emission(t, x).log_prob(_index(y, t)))

    def log_transition_fn(t, x_prev, x):
        return jnp.sum(model.transition(t, x_prev).log_prob(x))

    return FeynmanKac(init_fn, propagate_fn, log_potential_fn), log_transition_fn


def state_space_log_densities(
    model: StateSpaceModel, observations: ArrayTree
) -> tuple[Callable[[ArrayTree], Array], Callable[[ArrayTree], Array]]:
    r"""``(log_prior, log_likelihood)`` of a whole trajectory :math:`x_{0:T-1}`.

    :math:`\log p(x_{0:T-1}) = \log p_0(x_0) + \sum_{t \ge 1} \log p_t(x_t \mid
    x_{t-1})` and :math:`\ell(x_{0:T-1}) = \sum_t \log f_t(y_t \mid x_t)`; the
    smoothing distribution is proportional to their product. With
    :func:`tempered_csmc_kernel` they make the inputs of
    :func:`smcjax.parallel_tempering` over trajectories.
    """
    if not isinstance(model, StateSpaceModel):
        raise TypeError(
            f"model must be a smcjax.StateSpaceModel, got {type(model).__name__}"
        )
    y = observations
    T = _length(y, "observations")
    ts = jnp.arange(T, dtype=jnp.int32)

    def log_prior(traj):
        lp0 = jnp.sum(model.initial().log_prob(_index(traj, 0)))
        prev = jax.tree.map(lambda a: a[:-1], traj)
        nxt = jax.tree.map(lambda a: a[1:], traj)
        lpt = jax.vmap(lambda t, a, b: jnp.sum(model.transition(t, a).log_prob(b)))(
            ts[1:], prev, nxt
        )
        return lp0 + jnp.sum(lpt)

    def log_likelihood(traj):
        return jnp.sum(
            jax.vmap(lambda t, x, yt: jnp.sum(model.emission(t, x).log_prob(yt)))(
                ts, traj, y
            )
        )

    return log_prior, log_likelihood


def tempered_csmc_kernel(
    model: StateSpaceModel,
    observations: ArrayTree,
    num_particles: int,
    *,
    ancestor_sampling: bool = True,
    backward_sampling: bool = False,
    resampling: str | ConditionalResampler = "multinomial",
) -> TemperedKernel:
    r"""Build a conditional SMC kernel for :func:`smcjax.parallel_tempering`.

    It targets :math:`\pi_\beta \propto p(x_{0:T-1})\, p(y_{0:T-1} \mid
    x_{0:T-1})^\beta`, the smoothing distribution of the Feynman–Kac model with
    potentials :math:`f_t(y_t \mid x_t)^\beta`, so one CSMC sweep on it is a
    :math:`\pi_\beta`-invariant move. Returns a
    :class:`smcjax.pt.TemperedKernel` (its acceptance rate is the fraction of time
    steps whose state changed). Pair it with :func:`state_space_log_densities`.
    """
    fk, log_transition = from_state_space(model, observations)
    _check_options(
        fk, num_particles, log_transition, ancestor_sampling, backward_sampling, 0
    )

    def step(key, trajectory, beta):
        def log_potential(t, x_prev, x):
            lg = fk.log_potential(t, x_prev, x)
            return jnp.where(beta > 0, beta * lg, 0.0)

        tempered = fk._replace(log_potential=log_potential)
        new, info = conditional_smc(
            key,
            tempered,
            trajectory,
            num_particles,
            log_transition=log_transition,
            ancestor_sampling=ancestor_sampling,
            backward_sampling=backward_sampling,
            resampling=resampling,
            potential_uses_prev=False,
        )
        return new, jnp.mean(info.updated.astype(jnp.float32))

    return TemperedKernel(step)


def _batched_log_transition(model: FeynmanKac, log_transition):
    if log_transition is None:
        return None
    if model.vectorized:
        return log_transition
    return jax.vmap(log_transition, in_axes=(None, 0, 0))


# ----------------------------------------------------------------------------------
# the sweep


def _sweep(
    key: PRNGKey,
    model: FeynmanKac,
    reference: ArrayTree | None,
    num_particles: int,
    num_steps: int,
    *,
    log_transition: LogTransition | None,
    ancestor_sampling: bool,
    backward_sampling: bool,
    resampling,
    pinned: int,
    potential_uses_prev: bool,
):
    """Run one (conditional if ``reference`` is given) SMC sweep; draw a trajectory."""
    n, T = num_particles, num_steps
    bm = batch_model(model)
    log_trans_b = _batched_log_transition(model, log_transition)
    conditional = reference is not None
    cond_resampler = get_conditional_resampler(resampling)
    log_n = jnp.log(float(n))

    def clean(lg, name):
        lg = jnp.asarray(lg)
        if lg.shape != (n,):
            raise ValueError(
                f"{name} must return a scalar per particle; the batched output has "
                f"shape {lg.shape}, expected ({n},)"
            )
        return jnp.where(jnp.isnan(lg), -jnp.inf, lg)

    def backward_log_weights(t, x_prev, x_next):
        """``log M_t(x_prev^n, x_next) + log G_t(x_prev^n, x_next)`` for every n."""
        xb = _broadcast(x_next, n)
        lw = clean(log_trans_b(t, x_prev, xb), "log_transition")
        if potential_uses_prev:
            lw = lw + clean(bm.log_potential(t, x_prev, xb), "log_potential")
        return lw

    k0, k_loop, k_final, k_back = jax.random.split(key, 4)
    t0 = jnp.zeros((), jnp.int32)
    x0 = bm.init(k0, n)
    if conditional:
        x0 = _set_slot(x0, pinned, _index(reference, 0))
    lg0 = clean(bm.log_potential(t0, None, x0), "log_potential")
    log_w0, log_z0 = log_normalize(lg0)
    log_z0 = log_z0 - log_n

    def body(carry, inp):
        x_prev, log_w_prev, log_z = carry
        t, k, x_ref = inp
        k_res, k_as, k_prop = jax.random.split(k, 3)
        if conditional and ancestor_sampling:
            # draw the reference's ancestor b, then the others given A^b = b, and
            # rotate the slots so that slot `pinned` holds b (exact for schemes that
            # are invariant under cyclic rotations of the slots).
            lb = log_w_prev + backward_log_weights(t, x_prev, x_ref)
            b = _categorical(k_as, lb)
            a = cond_resampler(k_res, log_w_prev, b, n).astype(jnp.int32)
            a = jnp.roll(a, pinned - b)
        elif conditional:
            a = cond_resampler(k_res, log_w_prev, pinned, n).astype(jnp.int32)
        else:
            a = jax.random.categorical(k_res, log_w_prev, shape=(n,)).astype(jnp.int32)
        xp = gather(x_prev, a)
        x = bm.propagate(k_prop, t, xp)
        if conditional:
            x = _set_slot(x, pinned, x_ref)
        lg = clean(bm.log_potential(t, xp, x), "log_potential")
        log_w, incr = log_normalize(lg)
        log_z = log_z + incr - log_n
        return (x, log_w, log_z), (x, a, log_w)

    ts = jnp.arange(1, T, dtype=jnp.int32)
    keys = jax.random.split(k_loop, T - 1)
    refs = (
        jax.tree.map(lambda r: r[1:], reference)
        if conditional
        else jnp.zeros((T - 1,), jnp.int32)
    )
    (_, log_w_last, log_z), (xs, ancestors, log_ws) = jax.lax.scan(
        body, (x0, log_w0, log_z0), (ts, keys, refs)
    )
    history = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), x0, xs)
    log_w_hist = jnp.concatenate([log_w0[None], log_ws])

    b_last = _categorical(k_final, log_w_last)
    if backward_sampling:
        if log_trans_b is None:
            raise ValueError("backward_sampling=True needs log_transition")

        def back(carry, inp):
            x_next = carry
            t, k, x_t, log_w_t = inp
            lb = log_w_t + backward_log_weights(t + 1, x_t, x_next)
            b = _categorical(k, lb)
            x_b = _index(x_t, b)
            return x_b, x_b

        x_last = _index(_index(history, T - 1), b_last)
        _, xs_back = jax.lax.scan(
            back,
            x_last,
            (
                jnp.arange(T - 1, dtype=jnp.int32),
                jax.random.split(k_back, T - 1),
                jax.tree.map(lambda h: h[:-1], history),
                log_w_hist[:-1],
            ),
            reverse=True,
        )
        trajectory = jax.tree.map(
            lambda a, b: jnp.concatenate([a, b[None]]), xs_back, x_last
        )
    else:

        def trace(b, a_t):
            b_prev = a_t[b]
            return b_prev, b_prev

        _, bs = jax.lax.scan(trace, b_last, ancestors, reverse=True)
        idx = jnp.concatenate([bs, b_last[None]])
        trajectory = jax.tree.map(lambda h: h[jnp.arange(T), idx], history)

    ess_t = jax.vmap(ess)(log_w_hist)
    if conditional:
        updated = _differs(trajectory, reference)
    else:
        updated = jnp.ones((T,), bool)
    x_last = jax.tree.map(lambda h: h[-1], history)
    return trajectory, CSMCInfo(log_z, ess_t, updated, x_last, log_w_last)


def _check_options(
    model, num_particles, log_transition, ancestor_sampling, backward_sampling, pinned
):
    if not isinstance(model, FeynmanKac):
        raise TypeError(
            f"model must be a smcjax.FeynmanKac, got {type(model).__name__}"
        )
    if isinstance(num_particles, bool) or not isinstance(num_particles, int):
        raise TypeError(f"num_particles must be a Python int, got {num_particles!r}")
    if num_particles < 2:
        raise ValueError(
            f"num_particles must be >= 2 for conditional SMC, got {num_particles}"
        )
    if (ancestor_sampling or backward_sampling) and log_transition is None:
        raise ValueError(
            "ancestor_sampling / backward_sampling need log_transition(t, x_prev, x) "
            "= log M_t(x | x_prev); pass it, or set both options to False"
        )
    if not 0 <= pinned < num_particles:
        raise ValueError(f"pinned must lie in [0, num_particles), got {pinned}")


def conditional_smc(
    key: PRNGKey,
    model: FeynmanKac,
    reference: ArrayTree,
    num_particles: int,
    *,
    log_transition: LogTransition | None = None,
    ancestor_sampling: bool = True,
    backward_sampling: bool = False,
    resampling: str | ConditionalResampler = "multinomial",
    pinned: int = 0,
    potential_uses_prev: bool = True,
) -> tuple[ArrayTree, CSMCInfo]:
    r"""Run one conditional SMC sweep: a draw from the kernel :math:`P(x^\star, \cdot)`.

    Parameters
    ----------
    key
        PRNG key.
    model
        :class:`~smcjax.core.FeynmanKac` model (one-particle or ``vectorized``).
    reference
        Reference trajectory :math:`x^\star_{0:T-1}`: a pytree whose leaves have a
        leading time axis ``T`` followed by one particle's shape.
    num_particles
        ``N >= 2`` (static), the reference included.
    log_transition
        ``log_transition(t, x_prev, x)`` :math:`= \log M_t(x \mid x_{t-1})` for one
        particle (batched like the model when it is ``vectorized``); needed for
        ancestor and backward sampling.
    ancestor_sampling
        Redraw the reference's ancestor at every step (PGAS).
    backward_sampling
        Draw the output trajectory by backward sampling instead of the genealogy.
    resampling
        Conditional resampler for the non-reference particles: ``"multinomial"``
        (:func:`smcjax.resampling.conditional_multinomial`), ``"systematic"``,
        ``"stratified"``, or a callable ``(key, log_weights, pinned, num_samples)``
        that returns ancestors with ``ancestors[pinned] == pinned`` (``pinned`` may
        be traced). With ancestor sampling the reference's ancestor ``b`` is drawn
        first, the resampler is called with ``pinned=b`` and the slots are rotated
        cyclically so that slot ``pinned`` holds ``b``; this is exact for schemes
        whose law is invariant under cyclic rotations of the slots (the three
        built-in ones).
    pinned
        The slot holding the reference (static).
    potential_uses_prev
        Whether :math:`G_t` depends on :math:`x_{t-1}`; if not (bootstrap filters)
        it cancels from the ancestor/backward weights and is not evaluated there.

    Returns
    -------
    trajectory, info
        The new trajectory (same structure as ``reference``) and a :class:`CSMCInfo`.
    """
    _check_options(
        model,
        num_particles,
        log_transition,
        ancestor_sampling,
        backward_sampling,
        pinned,
    )
    T = _length(reference, "reference")
    return _sweep(
        key,
        model,
        reference,
        num_particles,
        T,
        log_transition=log_transition,
        ancestor_sampling=ancestor_sampling,
        backward_sampling=backward_sampling,
        resampling=resampling,
        pinned=pinned,
        potential_uses_prev=potential_uses_prev,
    )


def sample_trajectory(
    key: PRNGKey,
    model: FeynmanKac,
    num_particles: int,
    num_steps: int,
    *,
    log_transition: LogTransition | None = None,
    backward_sampling: bool = False,
    potential_uses_prev: bool = True,
) -> tuple[ArrayTree, CSMCInfo]:
    """Draw one trajectory from an (unconditional) particle filter sweep.

    Multinomial resampling at every step, then the genealogy (or backward sampling)
    of a particle drawn from the final weights: the usual way to start particle
    Gibbs, and the first sweep of the LLM particle Gibbs.
    """
    _check_options(model, num_particles, log_transition, False, backward_sampling, 0)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    return _sweep(
        key,
        model,
        None,
        num_particles,
        num_steps,
        log_transition=log_transition,
        ancestor_sampling=False,
        backward_sampling=backward_sampling,
        resampling="multinomial",
        pinned=0,
        potential_uses_prev=potential_uses_prev,
    )


def init(trajectory: ArrayTree) -> CSMCState:
    """Wrap a reference trajectory into a :class:`CSMCState`."""
    return CSMCState(jax.tree.map(jnp.asarray, trajectory))


def build_kernel(
    model: FeynmanKac,
    num_particles: int,
    *,
    log_transition: LogTransition | None = None,
    ancestor_sampling: bool = True,
    backward_sampling: bool = False,
    resampling: str | ConditionalResampler = "multinomial",
    pinned: int = 0,
    potential_uses_prev: bool = True,
) -> Callable[[PRNGKey, CSMCState], tuple[CSMCState, CSMCInfo]]:
    """Return the conditional SMC kernel ``step(key, state) -> (state, info)``.

    The options are those of :func:`conditional_smc`; ``init`` builds the state from
    a reference trajectory. The kernel leaves the smoothing distribution of ``model``
    invariant.
    """
    _check_options(
        model,
        num_particles,
        log_transition,
        ancestor_sampling,
        backward_sampling,
        pinned,
    )

    def step_fn(key: PRNGKey, state: CSMCState) -> tuple[CSMCState, CSMCInfo]:
        trajectory, info = conditional_smc(
            key,
            model,
            state.trajectory,
            num_particles,
            log_transition=log_transition,
            ancestor_sampling=ancestor_sampling,
            backward_sampling=backward_sampling,
            resampling=resampling,
            pinned=pinned,
            potential_uses_prev=potential_uses_prev,
        )
        return CSMCState(trajectory), info

    return step_fn


# ----------------------------------------------------------------------------------
# particle Gibbs driver


def _as_feynman_kac(model: Any, observations: ArrayTree, log_transition):
    """``(fk, log_transition, potential_uses_prev)`` from a model object."""
    if isinstance(model, StateSpaceModel):
        fk, lt = from_state_space(model, observations)
        return fk, lt, False
    if isinstance(model, FeynmanKac):
        return model, log_transition, True
    raise TypeError(
        "model must be a smcjax.StateSpaceModel or smcjax.FeynmanKac (or, with "
        f"params, a function params -> model); got {type(model).__name__}"
    )


def particle_gibbs(
    key: PRNGKey,
    model: StateSpaceModel | FeynmanKac | Callable[[ArrayTree], Any],
    observations: ArrayTree,
    num_particles: int,
    num_iterations: int,
    *,
    ancestor_sampling: bool = True,
    backward_sampling: bool = False,
    init_trajectory: ArrayTree | None = None,
    params: ArrayTree | None = None,
    param_update: Callable[..., ArrayTree] | None = None,
    num_chains: int | None = None,
    num_steps: int | None = None,
    log_transition: LogTransition | None = None,
    resampling: str | ConditionalResampler = "multinomial",
) -> ParticleGibbsResult:
    r"""Particle Gibbs: iterate the conditional SMC kernel (``lax.scan``).

    Parameters
    ----------
    key
        PRNG key.
    model
        A :class:`~smcjax.ssm.StateSpaceModel` (bootstrap proposal), or a
        :class:`~smcjax.core.FeynmanKac` model (then pass ``log_transition`` for
        ancestor/backward sampling and ``num_steps`` if ``observations`` is
        ``None``), or — when ``params`` is given — a function ``params -> model``.
    observations
        :math:`y_{0:T-1}`, a pytree with a leading time axis ``T``.
    num_particles
        ``N >= 2`` particles per sweep, the reference included.
    num_iterations
        Number of sweeps (static).
    ancestor_sampling, backward_sampling
        See :func:`conditional_smc`. Without either, small ``N`` mixes badly at early
        times (path degeneracy).
    init_trajectory
        Starting reference ``(T, ...)``; if ``None`` it is drawn from an
        unconditional particle filter sweep.
    params
        Initial model parameters :math:`\theta`. When given, every iteration is
        ``x ~ CSMC(x | θ)`` then ``θ ~ param_update(key, θ, x, observations)``.
    param_update
        ``param_update(key, params, trajectory, observations) -> params``, a draw
        that leaves :math:`p(\theta \mid x_{0:T-1}, y_{0:T-1})` invariant (conjugate
        update or an MCMC move); required with ``params``.
    num_chains
        Run that many independent chains (``jax.vmap``); ``init_trajectory`` may
        then carry a leading chain axis ``(num_chains, T, ...)`` (else it is shared),
        ``params`` is shared. All outputs gain a leading chain axis.
    num_steps
        ``T`` when ``observations`` is ``None`` (FeynmanKac models).
    log_transition
        :math:`\log M_t(x \mid x_{t-1})` for a ``FeynmanKac`` model.
    resampling
        Conditional resampler (see :func:`conditional_smc`).

    Returns
    -------
    ParticleGibbsResult
        ``trajectories`` ``(num_iterations, T, ...)``.

    Notes
    -----
    Runs under ``jax.jit`` (``model`` and the integer/bool options static) and under
    ``jax.vmap`` over keys.
    """
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
        raise TypeError(f"num_iterations must be a Python int, got {num_iterations!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if (params is None) != (param_update is None):
        raise ValueError("params and param_update must be given together")
    if params is None:
        model_fn = lambda _: model
    else:
        if not callable(model) or isinstance(model, StateSpaceModel | FeynmanKac):
            raise TypeError(
                "with params, model must be a function params -> StateSpaceModel "
                "(or FeynmanKac)"
            )
        model_fn = model

    if observations is None:
        if num_steps is None:
            raise ValueError("pass observations, or num_steps for a FeynmanKac model")
        T = num_steps
    else:
        T = _length(observations, "observations")
        if num_steps is not None and num_steps != T:
            raise ValueError(
                f"num_steps={num_steps} disagrees with the {T} observations"
            )
        _check_finite(observations, "observations")

    # validate the model once (at trace time) with the initial parameters
    fk0, lt0, _ = _as_feynman_kac(model_fn(params), observations, log_transition)
    _check_options(fk0, num_particles, lt0, ancestor_sampling, backward_sampling, 0)

    def one_chain(key, trajectory, theta):
        k_init, k_loop = jax.random.split(key)
        if trajectory is None:
            fk, lt, uses_prev = _as_feynman_kac(
                model_fn(theta), observations, log_transition
            )
            trajectory, _ = _sweep(
                k_init,
                fk,
                None,
                num_particles,
                T,
                log_transition=lt,
                ancestor_sampling=False,
                backward_sampling=False,
                resampling=resampling,
                pinned=0,
                potential_uses_prev=uses_prev,
            )
        elif _length(trajectory, "init_trajectory") != T:
            raise ValueError(
                f"init_trajectory has {_length(trajectory, 'init_trajectory')} time "
                f"steps, expected T={T}"
            )

        def body(carry, k):
            x_ref, theta = carry
            k_x, k_theta = jax.random.split(k)
            fk, lt, uses_prev = _as_feynman_kac(
                model_fn(theta), observations, log_transition
            )
            x_new, info = _sweep(
                k_x,
                fk,
                x_ref,
                num_particles,
                T,
                log_transition=lt,
                ancestor_sampling=ancestor_sampling,
                backward_sampling=backward_sampling,
                resampling=resampling,
                pinned=0,
                potential_uses_prev=uses_prev,
            )
            if param_update is not None:
                theta = param_update(k_theta, theta, x_new, observations)
            # keep the small diagnostics only (not the final particle systems)
            return (x_new, theta), (x_new, theta, info._replace(particles=None))

        _, (trajs, thetas, infos) = jax.lax.scan(
            body, (trajectory, theta), jax.random.split(k_loop, num_iterations)
        )
        return ParticleGibbsResult(
            trajectories=trajs,
            params=thetas if params is not None else None,
            log_evidence=infos.log_evidence,
            update_rate=jnp.mean(infos.updated.astype(jnp.float32), axis=0),
            ess=infos.ess,
        )

    if num_chains is None:
        return one_chain(key, init_trajectory, params)
    if (
        isinstance(num_chains, bool)
        or not isinstance(num_chains, int)
        or num_chains < 1
    ):
        raise ValueError(f"num_chains must be a Python int >= 1, got {num_chains!r}")
    keys = jax.random.split(key, num_chains)
    traj_axis = _trajectory_axis(init_trajectory, T, num_chains)
    return jax.vmap(one_chain, in_axes=(0, traj_axis, None))(
        keys, init_trajectory, params
    )


def _trajectory_axis(tree, T: int, num_chains: int) -> int | None:
    """``0`` if every leaf of ``tree`` is ``(num_chains, T, ...)``, else ``None``."""
    if tree is None:
        return None
    leaves = jax.tree.leaves(tree)
    per_chain = all(
        jnp.ndim(x) >= 2 and jnp.shape(x)[:2] == (num_chains, T) for x in leaves
    )
    return 0 if per_chain else None


def _check_finite(tree: ArrayTree, name: str) -> None:
    for leaf in jax.tree.leaves(tree):
        try:
            arr = jnp.asarray(leaf)
            ok = not jnp.issubdtype(arr.dtype, jnp.inexact) or bool(
                jnp.all(jnp.isfinite(arr))
            )
        except jax.errors.ConcretizationTypeError:
            ok = True  # traced: cannot check at trace time
        if not ok:
            raise ValueError(f"{name} must be finite (found NaN or inf)")
