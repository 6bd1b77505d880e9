r"""Per-particle MCMC moves: random-walk Metropolis, MALA and HMC.

The protocol
------------
A move is an ``(init, step)`` pair acting on **one** particle; the SMC samplers
``jax.vmap`` it over the particle axis (parameters are shared by all particles):

``init(position, logdensity_fn) -> state``
    ``position`` is any pytree; ``state`` is a pytree with a ``.position`` field (for
    the built-in moves an :class:`MCMCState`; BlackJAX states qualify).
``step(key, state, logdensity_fn, params) -> (state, info)``
    One Markov transition leaving :math:`\pi \propto \exp(\text{logdensity\_fn})`
    invariant. ``state.position`` is the new position; ``info.acceptance_rate`` is the
    Metropolis–Hastings acceptance probability :math:`\min(1, \alpha)`.

Any pair with this shape plugs into :func:`smcjax.tempered_smc`, wrapped in a
:class:`Kernel` (or passed as a plain 2-tuple). For instance a BlackJAX kernel::

    import blackjax
    from smcjax import mcmc

    def bj_step(key, state, logdensity_fn, params):
        step = blackjax.mala.build_kernel()
        return step(key, state, logdensity_fn, params.step_size)

    ours = mcmc.mala()  # borrow its step-size tuning (BlackJAX ignores the scale)
    kernel = mcmc.Kernel(blackjax.mala.init, bj_step, ours.default_params, ours.tune)

For the built-in moves ``logdensity_fn`` may also return a pair ``(value, aux)``; the
auxiliary output of the current position is carried in ``MCMCState.aux``. The
tempered sampler uses this to keep :math:`(\log p_0(x), \log L(x))` without
evaluating them again.

Preconditioning and tuning
--------------------------
All three moves use a preconditioner :math:`\Sigma = L L^\top` (``params.scale`` holds
``L``, lower triangular ``(d, d)``, or its diagonal ``(d,)``) and a step size ``h``
(:class:`KernelParams`), on the flattened position :math:`x \in \mathbb R^d`:

* RWM: :math:`x' = x + h L z`, :math:`z \sim N(0, I)`; accept w.p.
  :math:`\min\{1, \pi(x')/\pi(x)\}`.
* MALA: :math:`x' = x + \tfrac{h^2}{2} \Sigma \nabla \log \pi(x) + h L z`, with the
  Hastings correction of the reverse proposal.
* HMC: mass matrix :math:`M = \Sigma^{-1}`; in the whitened momentum
  :math:`u = L^\top p \sim N(0, I)` the leapfrog map is
  :math:`u \leftarrow u + \tfrac{h}{2} L^\top \nabla \log\pi(x)`,
  :math:`x \leftarrow x + h L u`, and the energy is :math:`-\log\pi(x) + |u|^2/2`.

Between SMC steps :meth:`Kernel.tune` sets :math:`\Sigma` to the (weighted) empirical
covariance of the particle cloud and moves :math:`\log h` towards the target acceptance
rate, :math:`\log h \leftarrow \log h + \gamma\,(\bar a - a^\star)`. With
:math:`\Sigma = \hat\Sigma` the initial RWM step is the classical
:math:`2.38/\sqrt d` (Roberts, Gelman & Gilks 1997).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = [
    "Kernel",
    "KernelParams",
    "MCMCInfo",
    "MCMCState",
    "apply_kernel",
    "apply_kernel_batched",
    "get_kernel",
    "hmc",
    "mala",
    "rwm",
    "tune_params",
    "weighted_covariance",
]

LogDensity = Callable[[ArrayTree], Any]


class MCMCState(NamedTuple):
    r"""State of a built-in move at one particle.

    Attributes
    ----------
    position
        The particle (any pytree).
    logdensity
        :math:`\log \pi(x)` (scalar).
    logdensity_grad
        :math:`\nabla \log \pi(x)`, same structure as ``position``
        (``None`` for RWM).
    aux
        Auxiliary output of ``logdensity_fn`` at ``position`` when it returns a pair
        ``(value, aux)``; ``None`` otherwise.
    """

    position: ArrayTree
    logdensity: Array
    logdensity_grad: ArrayTree = None
    aux: ArrayTree = None


class MCMCInfo(NamedTuple):
    r"""Diagnostics of one move.

    Attributes
    ----------
    acceptance_rate
        :math:`\min(1, \alpha)`, the Metropolis–Hastings acceptance probability
        (``0`` when the proposal's log-density is ``NaN``).
    is_accepted
        Whether the proposal was accepted.
    """

    acceptance_rate: Array
    is_accepted: Array


class KernelParams(NamedTuple):
    r"""Parameters shared by all particles.

    Attributes
    ----------
    step_size
        Scalar step size ``h``.
    scale
        ``L`` with :math:`\Sigma = L L^\top`: lower-triangular ``(d, d)`` or a
        diagonal ``(d,)``.
    """

    step_size: Array
    scale: Array


class Kernel(NamedTuple):
    """A move: the ``(init, step)`` pair plus optional tuning.

    Attributes
    ----------
    init
        ``init(position, logdensity_fn) -> state``.
    step
        ``step(key, state, logdensity_fn, params) -> (state, info)``; ``info`` must have
        an ``acceptance_rate`` field.
    default_params
        ``default_params(d) -> params`` for a flattened dimension ``d`` (``None``: the
        kernel takes ``params=None``).
    tune
        ``tune(params, flat_particles, log_weights, acceptance_rate) -> params``
        applied between SMC steps (``None``: parameters stay fixed).
    supports_aux
        ``True`` when ``logdensity_fn`` may return ``(value, aux)`` (built-in moves).
    needs_grad
        ``True`` when ``init`` computes a gradient (MALA, HMC).
    """

    init: Callable[..., Any]
    step: Callable[..., tuple[Any, Any]]
    default_params: Callable[[int], Any] | None = None
    tune: Callable[..., Any] | None = None
    supports_aux: bool = False
    needs_grad: bool = False


# ---------------------------------------------------------------------------- helpers


def _has_aux(logdensity_fn: LogDensity, position: ArrayTree) -> bool:
    out = jax.eval_shape(logdensity_fn, position)
    return isinstance(out, tuple)


def _evaluate(logdensity_fn: LogDensity, position: ArrayTree, grad: bool):
    """Return ``(value, grad_or_None, aux_or_None)`` with NaN mapped to ``-inf``."""
    has_aux = _has_aux(logdensity_fn, position)
    if grad:
        if has_aux:
            (value, aux), g = jax.value_and_grad(logdensity_fn, has_aux=True)(position)
        else:
            value, g = jax.value_and_grad(logdensity_fn)(position)
            aux = None
    else:
        out = logdensity_fn(position)
        value, aux = out if has_aux else (out, None)
        g = None
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(
            f"logdensity_fn must return a scalar for one particle, got shape "
            f"{value.shape}"
        )
    value = jnp.where(jnp.isnan(value), -jnp.inf, value)
    return value, g, aux


def _mul(scale: Array, z: Array) -> Array:
    """``L z`` for a full or diagonal ``L``."""
    return scale * z if scale.ndim == 1 else scale @ z


def _mul_t(scale: Array, g: Array) -> Array:
    """``Lᵀ g`` for a full or diagonal ``L``."""
    return scale * g if scale.ndim == 1 else scale.T @ g


def _check_params(params: Any, d: int, name: str) -> KernelParams:
    if not isinstance(params, KernelParams):
        raise TypeError(
            f"params must be smcjax.mcmc.KernelParams for the {name} move, "
            f"got {type(params).__name__}"
        )
    scale = jnp.asarray(params.scale)
    if scale.shape not in ((d,), (d, d)):
        raise ValueError(
            f"params.scale must have shape ({d},) or ({d}, {d}) for a position with "
            f"{d} coordinates, got {scale.shape}"
        )
    return KernelParams(jnp.asarray(params.step_size), scale)


def _draw(key: PRNGKey, d: int, dtype, extra: int) -> tuple[Array, Array]:
    r"""One Gaussian draw :math:`z \in \mathbb R^{d + e}` per transition.

    Returns ``(z[:d], log_u)`` where ``log_u = log Φ(z[d:])`` are the logs of ``e``
    independent U(0, 1) variables (:math:`\Phi(Z) \sim U(0,1)` exactly). One call
    of the generator instead of a key split and two draws: cheaper on CPU, where
    the counter-based generator dominates the cost of a random-walk move.
    """
    z = jax.random.normal(key, (d + extra,), dtype)
    return z[:d], jax.scipy.special.log_ndtr(z[d:])


def _mh_select(log_u, log_alpha, new_state, state):
    log_alpha = jnp.where(jnp.isnan(log_alpha), -jnp.inf, log_alpha)
    accept_prob = jnp.exp(jnp.minimum(log_alpha, 0.0))
    accepted = log_u < log_alpha
    out = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), new_state, state)
    return out, MCMCInfo(accept_prob, accepted)


def _init_fn(grad: bool):
    def init(position: ArrayTree, logdensity_fn: LogDensity) -> MCMCState:
        value, g, aux = _evaluate(logdensity_fn, position, grad)
        return MCMCState(position, value, g, aux)

    return init


# ------------------------------------------------------------------------ the moves


def rwm_step(
    key: PRNGKey, state: MCMCState, logdensity_fn: LogDensity, params: KernelParams
) -> tuple[MCMCState, MCMCInfo]:
    r"""One random-walk Metropolis step :math:`x' = x + h L z`."""
    x, unravel = ravel_pytree(state.position)
    p = _check_params(params, x.shape[0], "rwm")
    z, log_u = _draw(key, x.shape[0], x.dtype, 1)
    x_new = unravel(x + p.step_size * _mul(p.scale, z))
    value, _, aux = _evaluate(logdensity_fn, x_new, grad=False)
    new = MCMCState(x_new, value, None, aux)
    return _mh_select(log_u[0], value - state.logdensity, new, state)


def mala_step(
    key: PRNGKey, state: MCMCState, logdensity_fn: LogDensity, params: KernelParams
) -> tuple[MCMCState, MCMCInfo]:
    r"""One preconditioned MALA step.

    With :math:`\Sigma = LL^\top`, propose
    :math:`x' = x + \tfrac{h^2}{2}\Sigma\nabla\log\pi(x) + h L z`. The Hastings ratio
    uses :math:`\log q(x' \mid x) = -|z|^2/2` and
    :math:`\log q(x \mid x') = -|z + \tfrac h2 L^\top(\nabla\log\pi(x)
    + \nabla\log\pi(x'))|^2/2` (same constants).
    """
    x, unravel = ravel_pytree(state.position)
    g, _ = ravel_pytree(state.logdensity_grad)
    p = _check_params(params, x.shape[0], "mala")
    h = p.step_size
    z, log_u = _draw(key, x.shape[0], x.dtype, 1)
    x_new = x + 0.5 * h**2 * _mul(p.scale, _mul_t(p.scale, g)) + h * _mul(p.scale, z)
    value, g_new_tree, aux = _evaluate(logdensity_fn, unravel(x_new), grad=True)
    g_new, _ = ravel_pytree(g_new_tree)
    back = z + 0.5 * h * _mul_t(p.scale, g + g_new)
    log_alpha = value - state.logdensity - 0.5 * jnp.sum(back**2) + 0.5 * jnp.sum(z**2)
    new = MCMCState(unravel(x_new), value, g_new_tree, aux)
    return _mh_select(log_u[0], log_alpha, new, state)


def _hmc_step_fn(num_integration_steps: int, jitter: float):
    def hmc_step(
        key: PRNGKey, state: MCMCState, logdensity_fn: LogDensity, params: KernelParams
    ) -> tuple[MCMCState, MCMCInfo]:
        x0, unravel = ravel_pytree(state.position)
        g0, _ = ravel_pytree(state.logdensity_grad)
        p = _check_params(params, x0.shape[0], "hmc")
        u0, log_u = _draw(key, x0.shape[0], x0.dtype, 2)
        # step-size jitter (independent of the state, so reversibility holds) breaks
        # the near-periodic trajectories of a well-preconditioned Gaussian target
        h = p.step_size * (1.0 + jitter * (2.0 * jnp.exp(log_u[1]) - 1.0))

        def leapfrog(carry, _):
            x, u, g, _v, _aux = carry
            u = u + 0.5 * h * _mul_t(p.scale, g)
            x = x + h * _mul(p.scale, u)
            v, g_tree, aux = _evaluate(logdensity_fn, unravel(x), grad=True)
            g = ravel_pytree(g_tree)[0]
            u = u + 0.5 * h * _mul_t(p.scale, g)
            return (x, u, g, v, aux), None

        carry0 = (x0, u0, g0, state.logdensity, state.aux)
        (x, u, g, v, aux), _ = jax.lax.scan(
            leapfrog, carry0, None, length=num_integration_steps
        )
        log_alpha = v - state.logdensity - 0.5 * jnp.sum(u**2) + 0.5 * jnp.sum(u0**2)
        new = MCMCState(unravel(x), v, unravel(g), aux)
        return _mh_select(log_u[0], log_alpha, new, state)

    return hmc_step


# ------------------------------------------------------------------------- tuning


def weighted_covariance(flat_particles: Array, log_weights: Array | None = None):
    r"""Weighted mean and covariance :math:`\sum_n W^n (x^n-\bar x)(x^n-\bar x)^\top`.

    ``flat_particles`` is ``(N, d)``; ``log_weights`` unnormalised (``None``: equal).
    Particles of weight zero (``-inf``) or with non-finite coordinates are ignored.
    """
    x = jnp.asarray(flat_particles)
    n = x.shape[0]
    if log_weights is None:
        log_weights = jnp.zeros((n,), x.dtype)
    finite = jnp.all(jnp.isfinite(x), axis=1)
    lw = jnp.where(finite & ~jnp.isnan(log_weights), log_weights, -jnp.inf)
    w = jax.nn.softmax(jnp.where(jnp.any(jnp.isfinite(lw)), lw, 0.0))
    x = jnp.where(finite[:, None], x, 0.0)
    mean = w @ x
    xc = x - mean
    cov = (xc * w[:, None]).T @ xc
    return mean, cov


def _factor(cov: Array, diagonal: bool, jitter: float) -> Array:
    d = cov.shape[0]
    var = jnp.diag(cov)
    floor = jitter * jnp.maximum(jnp.mean(var), 1e-12) + 1e-10
    if diagonal:
        return jnp.sqrt(var + floor)
    chol = jnp.linalg.cholesky(cov + floor * jnp.eye(d, dtype=cov.dtype))
    diag_chol = jnp.diag(jnp.sqrt(var + floor))
    return jnp.where(jnp.all(jnp.isfinite(chol)), chol, diag_chol)


def tune_params(
    params: KernelParams,
    flat_particles: Array,
    log_weights: Array | None,
    acceptance_rate: Array | None,
    *,
    target_acceptance: float,
    adapt_rate: float = 1.0,
    diagonal: bool = False,
    jitter: float = 1e-6,
) -> KernelParams:
    r"""Tune shared move parameters from the particle cloud.

    Sets :math:`L` from :math:`\hat\Sigma` (:func:`weighted_covariance`, with a small
    ridge) and, when ``acceptance_rate`` is given and finite, updates
    :math:`\log h \leftarrow \log h + \gamma(\bar a - a^\star)` (``adapt_rate`` =
    :math:`\gamma`, ``target_acceptance`` = :math:`a^\star`), clipped to a factor
    of at most ``e`` per call.
    """
    _, cov = weighted_covariance(flat_particles, log_weights)
    scale = _factor(cov, diagonal, jitter)
    h = jnp.asarray(params.step_size, flat_particles.dtype)
    if acceptance_rate is not None:
        acc = jnp.asarray(acceptance_rate)
        move = jnp.clip(adapt_rate * (acc - target_acceptance), -1.0, 1.0)
        h = jnp.where(jnp.isfinite(acc), h * jnp.exp(move), h)
    return KernelParams(h, scale.astype(flat_particles.dtype))


def _builder(
    step, grad: bool, h0: Callable[[int], float], target: float, diagonal: bool
) -> Kernel:
    def default_params(d: int) -> KernelParams:
        scale = jnp.ones((d,)) if diagonal else jnp.eye(d)
        return KernelParams(jnp.asarray(h0(d), jnp.float32), scale)

    def tune(params, flat_particles, log_weights, acceptance_rate):
        return tune_params(
            params,
            flat_particles,
            log_weights,
            acceptance_rate,
            target_acceptance=target,
            diagonal=diagonal,
        )

    return Kernel(_init_fn(grad), step, default_params, tune, True, grad)


def rwm(*, target_acceptance: float = 0.234, diagonal: bool = False) -> Kernel:
    r"""Random-walk Metropolis, :math:`h_0 = 2.38/\sqrt d`, target acceptance 0.234."""
    return _builder(
        rwm_step, False, lambda d: 2.38 / d**0.5, target_acceptance, diagonal
    )


def mala(*, target_acceptance: float = 0.574, diagonal: bool = False) -> Kernel:
    r"""Preconditioned MALA, :math:`h_0 = 1.65\,d^{-1/6}`, target acceptance 0.574."""
    return _builder(
        mala_step, True, lambda d: 1.65 / d ** (1 / 6), target_acceptance, diagonal
    )


def hmc(
    *,
    num_integration_steps: int = 10,
    target_acceptance: float = 0.65,
    diagonal: bool = False,
    jitter: float = 0.3,
) -> Kernel:
    r"""Preconditioned HMC with ``num_integration_steps`` leapfrog steps.

    The initial step size is :math:`h_0 = 1.0\,d^{-1/4}` per leapfrog step (in the
    whitened coordinates of :math:`\hat\Sigma`), tuned towards acceptance 0.65. Each
    transition draws its step size uniformly in :math:`h\,[1 - j, 1 + j]`
    (``jitter`` :math:`= j`) so that trajectories do not resonate with the target.
    """
    if (
        isinstance(num_integration_steps, bool)
        or not isinstance(num_integration_steps, int)
        or num_integration_steps < 1
    ):
        raise ValueError(
            f"num_integration_steps must be a Python int >= 1, got "
            f"{num_integration_steps!r}"
        )
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must lie in [0, 1), got {jitter!r}")
    return _builder(
        _hmc_step_fn(num_integration_steps, jitter),
        True,
        lambda d: 1.0 / d**0.25,
        target_acceptance,
        diagonal,
    )


_KERNELS: dict[str, Callable[[], Kernel]] = {"rwm": rwm, "mala": mala, "hmc": hmc}


def get_kernel(kernel: str | Kernel | tuple) -> Kernel:
    """Resolve ``"rwm" | "mala" | "hmc"``, a :class:`Kernel`, or an ``(init, step)``."""
    if isinstance(kernel, Kernel):
        return kernel
    if isinstance(kernel, str):
        try:
            return _KERNELS[kernel]()
        except KeyError:
            raise ValueError(
                f"unknown kernel={kernel!r}; expected one of {sorted(_KERNELS)}, a "
                f"smcjax.mcmc.Kernel or an (init, step) pair"
            ) from None
    if isinstance(kernel, tuple) and len(kernel) == 2 and all(map(callable, kernel)):
        return Kernel(*kernel)
    raise TypeError(
        f"kernel must be a name, a smcjax.mcmc.Kernel or an (init, step) pair, got "
        f"{type(kernel).__name__}"
    )


def apply_kernel(
    key: PRNGKey,
    state: Any,
    step: Callable[..., tuple[Any, Any]],
    logdensity_fn: LogDensity,
    params: Any,
    num_steps: int,
    *,
    keep_states: bool = False,
) -> tuple[Any, Any]:
    """Apply ``step`` ``num_steps`` times with :func:`jax.lax.scan`.

    Returns ``(final_state, infos)`` with infos stacked along a leading axis of length
    ``num_steps``; with ``keep_states=True`` returns ``(states, infos)`` where
    ``states`` stacks the initial state and every subsequent one (``num_steps + 1``).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a Python int >= 0, got {num_steps!r}")

    def body(s, k):
        s, info = step(k, s, logdensity_fn, params)
        return s, ((s, info) if keep_states else info)

    final, out = jax.lax.scan(body, state, jax.random.split(key, num_steps))
    if not keep_states:
        return final, out
    states, infos = out
    states = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), state, states)
    return states, infos


def apply_kernel_batched(
    key: PRNGKey,
    states: Any,
    step: Callable[..., tuple[Any, Any]],
    logdensity_fn: LogDensity,
    params: Any,
    num_steps: int,
    *,
    keep_states: bool = False,
) -> tuple[Any, Any]:
    """Move a population of particles: ``num_steps`` of ``vmap(step)`` in a scan.

    ``states`` has a leading particle axis ``N``; ``params`` are shared. Equivalent to
    ``vmap(apply_kernel)`` but the scan is outside the vmap, which compiles faster and
    vectorises better on CPU. Returns ``(final_states, infos)`` with infos of shape
    ``(num_steps, N, ...)``; with ``keep_states=True`` returns ``(states, infos)``
    where ``states`` is ``(num_steps + 1, N, ...)`` (initial state first).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a Python int >= 0, got {num_steps!r}")
    n = jax.tree.leaves(states)[0].shape[0]
    vstep = jax.vmap(step, in_axes=(0, 0, None, None))

    def body(s, keys):
        s, info = vstep(keys, s, logdensity_fn, params)
        return s, ((s, info) if keep_states else info)

    keys = jax.random.split(key, (num_steps, n))
    final, out = jax.lax.scan(body, states, keys)
    if not keep_states:
        return final, out
    all_states, infos = out
    all_states = jax.tree.map(
        lambda a, b: jnp.concatenate([a[None], b]), states, all_states
    )
    return all_states, infos
