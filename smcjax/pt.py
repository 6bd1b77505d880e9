r"""Parallel tempering (replica exchange) with non-reversible swaps and schedule tuning.

Parallel tempering runs ``K + 1`` chains on the tempered targets

.. math::

    \pi_{\beta}(x) \propto p_0(x)\, L(x)^{\beta}, \qquad
    0 \le \beta_0 < \beta_1 < \dots < \beta_K = 1,

so that :math:`\pi_{\beta_K}` is the posterior and :math:`\pi_{\beta_0}` (the prior
when :math:`\beta_0 = 0`) is easy to explore. One *scan* is

1. **local exploration**: every chain makes ``num_mcmc_steps`` moves of a
   :math:`\pi_{\beta_k}`-invariant kernel (:mod:`smcjax.mcmc` RWM/MALA/HMC, a user
   ``(init, step)`` pair, or a :class:`TemperedKernel` such as conditional SMC);
2. **communication**: adjacent chains ``(k, k+1)`` of one parity propose to swap
   their states, accepted with probability

   .. math::

       \alpha_k = \min\{1, \exp[(\beta_{k+1} - \beta_k)
           (\ell(x_k) - \ell(x_{k+1}))]\}, \qquad \ell = \log L.

The parity is the scan index mod 2 for **DEO** (deterministic even-odd,
non-reversible; Okabe et al. 2001, Syed et al. 2022) or a fair coin for **SEO**
(stochastic even-odd, reversible). Under DEO a replica that was just swapped upwards
keeps moving up, so the *index process* travels ballistically instead of diffusively;
the round-trip rate (prior → posterior → prior) tends to
:math:`1/(2 + 2\Lambda)` as ``K`` grows, where

.. math::

    \Lambda = \int_0^1 \lambda(\beta)\, d\beta, \qquad
    \lambda(\beta) = \tfrac12\, \mathbb{E}_{\pi_\beta \otimes \pi_\beta}
        |\ell(X) - \ell(X')|,

is the *global communication barrier*, whereas SEO's rate decays like
:math:`1/K`. The rejection rates :math:`r_k = 1 - \mathbb{E}\alpha_k` estimate it,
:math:`\hat\Lambda = \sum_k r_k`, and the **schedule adaptation** of Syed,
Bouchard-Côté, Deligiannidis & Doucet (2022) places the :math:`\beta_k` so that every
:math:`r_k` equals :math:`\hat\Lambda / K`: with the cumulative barrier
:math:`\hat\Lambda(\beta)` interpolated through :math:`(\beta_k, \sum_{j<k} r_j)`, set
:math:`\beta_k' = \hat\Lambda^{-1}(k\hat\Lambda / K)`. It runs in rounds of doubling
length before sampling; the per-chain step sizes are tuned at the same time
(Robbins–Monro on :math:`\log h` towards the kernel's target acceptance rate) and
carried over to the new schedule by interpolation in :math:`\beta`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from smcjax import mcmc
from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = [
    "PTInfo",
    "PTResult",
    "PTState",
    "TemperedKernel",
    "build_kernel",
    "init",
    "parallel_tempering",
    "swap_step",
    "update_schedule",
]

_TARGET_ACCEPTANCE = {"rwm": 0.234, "mala": 0.574, "hmc": 0.65}


class TemperedKernel(NamedTuple):
    r"""A per-chain kernel that sees the inverse temperature directly.

    ``step(key, position, beta) -> (position, acceptance_rate)`` must leave
    :math:`\pi_\beta \propto p_0 L^\beta` invariant. Use it for kernels that are not
    driven by a log-density, e.g. a conditional SMC sweep on a tempered state-space
    model (:func:`smcjax.pgibbs.tempered_csmc_kernel`). ``acceptance_rate`` may be
    ``NaN`` when it has no meaning.
    """

    step: Callable[[PRNGKey, ArrayTree, Array], tuple[ArrayTree, Array]]


class PTState(NamedTuple):
    r"""State of the replica-exchange sampler.

    Attributes
    ----------
    positions
        Pytree with leading axis ``K + 1``: the state of the chain at :math:`\beta_k`.
    log_prior, log_likelihood
        ``(K + 1,)`` :math:`\log p_0` and :math:`\ell = \log L` at ``positions``.
    inverse_temperatures
        ``(K + 1,)`` increasing, ending at ``1``.
    params
        Per-chain kernel parameters (leading axis ``K + 1``), e.g. step sizes.
    replicas
        ``(K + 1,)`` int32: which replica (label ``0..K``) sits at chain ``k``.
    last_end
        ``(K + 1,)`` int32 per replica: ``0`` if it last touched the bottom chain,
        ``1`` if the top one since, ``-1`` if neither yet.
    scan
        Number of scans done (``int32``); its parity drives DEO.
    """

    positions: ArrayTree
    log_prior: Array
    log_likelihood: Array
    inverse_temperatures: Array
    params: ArrayTree
    replicas: Array
    last_end: Array
    scan: Array


class PTInfo(NamedTuple):
    r"""Diagnostics of one scan.

    Attributes
    ----------
    swap_probability
        ``(K,)`` :math:`\alpha_k` of the proposed swaps (computed for every pair).
    attempted
        ``(K,)`` bool, the pairs that proposed a swap this scan.
    accepted
        ``(K,)`` bool, the swaps that happened.
    acceptance_rate
        ``(K + 1,)`` mean acceptance rate of the local moves.
    round_trips
        Number of replicas that completed a round trip (bottom → top → bottom).
    """

    swap_probability: Array
    attempted: Array
    accepted: Array
    acceptance_rate: Array
    round_trips: Array


class PTResult(NamedTuple):
    r"""Output of :func:`parallel_tempering` (statistics of the sampling phase).

    Attributes
    ----------
    samples
        ``(num_steps, ...)`` the state of the :math:`\beta = 1` chain after each scan.
    swap_rate
        ``(K,)`` mean swap acceptance probability of each adjacent pair.
    inverse_temperatures
        ``(K + 1,)`` the final (adapted) schedule.
    round_trips
        Total number of round trips.
    round_trip_rate
        Round trips per scan.
    global_barrier
        :math:`\hat\Lambda = \sum_k (1 - \text{swap\_rate}_k)`.
    acceptance_rate
        ``(K + 1,)`` mean acceptance rate of the local moves per chain.
    log_likelihood
        ``(num_steps,)`` :math:`\ell` of the :math:`\beta = 1` samples.
    replicas
        ``(num_steps, K + 1)`` the index process: replica at each chain.
    params
        Final per-chain kernel parameters.
    state
        Final :class:`PTState` (to continue the run).
    """

    samples: ArrayTree
    swap_rate: Array
    inverse_temperatures: Array
    round_trips: Array
    round_trip_rate: Array
    global_barrier: Array
    acceptance_rate: Array
    log_likelihood: Array
    replicas: Array
    params: ArrayTree
    state: PTState


# ----------------------------------------------------------------------------------
# helpers


def _num_chains(tree: ArrayTree, name: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError(
            f"{name} must be a pytree whose leaves have a leading chain axis"
        )
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"the leaves of {name} disagree on the chain axis: {sizes}")
    return sizes.pop()


def _nan_to_neg_inf(x: Array) -> Array:
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


def _tempered(lp: Array, ll: Array, beta: Array) -> Array:
    # beta = 0 must give the prior even where ll = -inf (0 * -inf = nan)
    return lp + jnp.where(beta > 0, beta * ll, 0.0)


def _resolve_kernel(kernel):
    if isinstance(kernel, TemperedKernel):
        return kernel
    return mcmc.get_kernel(kernel)


def _swap_permutation(accepted: Array) -> Array:
    """Chain permutation of accepted swaps ``(k, k+1)`` (non-overlapping pairs)."""
    n = accepted.shape[0] + 1
    idx = jnp.arange(n)
    left = jnp.concatenate([accepted, jnp.zeros((1,), bool)])  # k swaps with k+1
    right = jnp.concatenate([jnp.zeros((1,), bool), accepted])  # k swaps with k-1
    return jnp.where(left, idx + 1, jnp.where(right, idx - 1, idx))


def update_schedule(inverse_temperatures: Array, rejection_rates: Array) -> Array:
    r"""Equalise the rejection rates (Syed et al. 2022, Algorithm 4).

    Interpolates the cumulative barrier :math:`\hat\Lambda(\beta_k) = \sum_{j<k}
    r_j` piecewise-linearly and returns :math:`\beta'_k =
    \hat\Lambda^{-1}(k \hat\Lambda / K)`, keeping both end points. If every rate is
    zero the schedule is returned unchanged.

    Parameters
    ----------
    inverse_temperatures
        ``(K + 1,)`` increasing.
    rejection_rates
        ``(K,)`` estimated :math:`r_k = 1 - \mathbb{E}\alpha_k`.
    """
    betas = jnp.asarray(inverse_temperatures)
    r = jnp.clip(jnp.asarray(rejection_rates, betas.dtype), 0.0, 1.0)
    k = r.shape[0]
    if k == 0:
        return betas
    # a tiny floor keeps the cumulative barrier strictly increasing
    r = jnp.where(jnp.isfinite(r), r, 0.0) + 1e-6
    cum = jnp.concatenate([jnp.zeros((1,), r.dtype), jnp.cumsum(r)])
    levels = jnp.linspace(0.0, 1.0, k + 1, dtype=r.dtype) * cum[-1]
    new = jnp.interp(levels, cum, betas)
    new = new.at[0].set(betas[0]).at[-1].set(betas[-1])
    return new


# ----------------------------------------------------------------------------------
# kernel


def init(
    positions: ArrayTree,
    log_prior: Callable[[ArrayTree], Array],
    log_likelihood: Callable[[ArrayTree], Array],
    inverse_temperatures: Array,
    params: ArrayTree = None,
) -> PTState:
    """Build a :class:`PTState`; ``positions`` has a leading axis ``K + 1``."""
    betas = jnp.asarray(inverse_temperatures)
    n = betas.shape[0]
    if _num_chains(positions, "positions") != n:
        raise ValueError(
            f"positions have {_num_chains(positions, 'positions')} chains but there "
            f"are {n} inverse temperatures"
        )
    lp = _nan_to_neg_inf(jax.vmap(log_prior)(positions))
    ll = _nan_to_neg_inf(jax.vmap(log_likelihood)(positions))
    if lp.shape != (n,) or ll.shape != (n,):
        raise ValueError(
            "log_prior and log_likelihood must return a scalar for one position"
        )
    replicas = jnp.arange(n, dtype=jnp.int32)
    last_end = jnp.full((n,), -1, jnp.int32).at[0].set(0)
    return PTState(
        positions, lp, ll, betas, params, replicas, last_end, jnp.zeros((), jnp.int32)
    )


def _local_moves(key, state: PTState, log_prior, log_likelihood, kernel, n_steps):
    """``num_mcmc_steps`` moves of every chain at its own temperature (vmapped)."""
    n = state.inverse_temperatures.shape[0]
    keys = jax.random.split(key, n)

    if isinstance(kernel, TemperedKernel):

        def chain(k, x, beta):
            def body(x, kk):
                x, acc = kernel.step(kk, x, beta)
                return x, jnp.asarray(acc, jnp.float32)

            x, accs = jax.lax.scan(body, x, jax.random.split(k, n_steps))
            return x, jnp.mean(accs)

        x, acc = jax.vmap(chain)(keys, state.positions, state.inverse_temperatures)
        lp = _nan_to_neg_inf(jax.vmap(log_prior)(x))
        ll = _nan_to_neg_inf(jax.vmap(log_likelihood)(x))
        return x, lp, ll, acc

    def chain(k, x, lp, ll, beta, params):
        if kernel.supports_aux:

            def logdensity(z):
                a = _nan_to_neg_inf(jnp.asarray(log_prior(z)))
                b = _nan_to_neg_inf(jnp.asarray(log_likelihood(z)))
                return _tempered(a, b, beta), (a, b)

            if kernel.needs_grad:
                st = kernel.init(x, logdensity)
            else:  # no evaluation needed: rebuild the state from the cached values
                st = mcmc.MCMCState(x, _tempered(lp, ll, beta), None, (lp, ll))
        else:

            def logdensity(z):
                return _tempered(
                    _nan_to_neg_inf(jnp.asarray(log_prior(z))),
                    _nan_to_neg_inf(jnp.asarray(log_likelihood(z))),
                    beta,
                )

            st = kernel.init(x, logdensity)
        st, infos = mcmc.apply_kernel(k, st, kernel.step, logdensity, params, n_steps)
        acc = jnp.mean(jnp.asarray(infos.acceptance_rate, jnp.float32))
        if kernel.supports_aux:
            lp_new, ll_new = st.aux
        else:
            lp_new = _nan_to_neg_inf(jnp.asarray(log_prior(st.position)))
            ll_new = _nan_to_neg_inf(jnp.asarray(log_likelihood(st.position)))
        return st.position, lp_new, ll_new, acc

    return jax.vmap(chain)(
        keys,
        state.positions,
        state.log_prior,
        state.log_likelihood,
        state.inverse_temperatures,
        state.params,
    )


def swap_step(
    key: PRNGKey, state: PTState, swap: str = "deo"
) -> tuple[PTState, PTInfo]:
    r"""Communication step: propose swaps between adjacent chains of one parity.

    ``swap="deo"`` uses parity ``scan mod 2`` (non-reversible), ``"seo"`` a fair
    coin (reversible). Also updates the round-trip bookkeeping of the replicas and
    increments ``state.scan``. ``acceptance_rate`` in the returned info is ``NaN``.
    """
    if swap not in ("deo", "seo"):
        raise ValueError(f"swap must be 'deo' or 'seo', got {swap!r}")
    betas = state.inverse_temperatures
    n = betas.shape[0]
    ll = state.log_likelihood
    k_par, k_acc = jax.random.split(key)
    pairs = jnp.arange(n - 1)
    if swap == "deo":
        parity = state.scan % 2
    else:
        parity = jax.random.bernoulli(k_par).astype(jnp.int32)
    attempted = (pairs % 2) == parity
    log_alpha = (betas[1:] - betas[:-1]) * (ll[:-1] - ll[1:])
    # both at -inf: the swap changes nothing, accept; one at -inf handled by sign
    log_alpha = jnp.where(jnp.isnan(log_alpha), 0.0, log_alpha)
    alpha = jnp.exp(jnp.minimum(log_alpha, 0.0))
    u = jax.random.uniform(k_acc, (n - 1,))
    accepted = attempted & (u < alpha)
    perm = _swap_permutation(accepted)
    take = lambda a: jnp.take(a, perm, axis=0)
    positions = jax.tree.map(take, state.positions)
    replicas = take(state.replicas)

    # round trips: a replica at the bottom that has touched the top since its last
    # visit to the bottom completes one
    last_end = state.last_end
    top, bottom = replicas[n - 1], replicas[0]
    if n > 1:
        last_end = last_end.at[top].set(jnp.where(last_end[top] == 0, 1, last_end[top]))
        completed = last_end[bottom] == 1
        last_end = last_end.at[bottom].set(0)
    else:
        completed = jnp.array(False)
    new = state._replace(
        positions=positions,
        log_prior=take(state.log_prior),
        log_likelihood=take(ll),
        replicas=replicas,
        last_end=last_end,
        scan=state.scan + 1,
    )
    info = PTInfo(
        alpha,
        attempted,
        accepted,
        jnp.full((n,), jnp.nan, jnp.float32),
        completed.astype(jnp.int32),
    )
    return new, info


def build_kernel(
    log_prior: Callable[[ArrayTree], Array],
    log_likelihood: Callable[[ArrayTree], Array],
    kernel: str | mcmc.Kernel | tuple | TemperedKernel = "rwm",
    *,
    swap: str = "deo",
    num_mcmc_steps: int = 1,
) -> Callable[[PRNGKey, PTState], tuple[PTState, PTInfo]]:
    """Return one PT scan ``step(key, state) -> (state, info)`` (moves, then swaps)."""
    kern = _resolve_kernel(kernel)
    if swap not in ("deo", "seo"):
        raise ValueError(f"swap must be 'deo' or 'seo', got {swap!r}")
    if (
        isinstance(num_mcmc_steps, bool)
        or not isinstance(num_mcmc_steps, int)
        or num_mcmc_steps < 1
    ):
        raise ValueError(
            f"num_mcmc_steps must be a Python int >= 1, got {num_mcmc_steps}"
        )

    def step_fn(key: PRNGKey, state: PTState) -> tuple[PTState, PTInfo]:
        k_move, k_swap = jax.random.split(key)
        x, lp, ll, acc = _local_moves(
            k_move, state, log_prior, log_likelihood, kern, num_mcmc_steps
        )
        state = state._replace(positions=x, log_prior=lp, log_likelihood=ll)
        state, info = swap_step(k_swap, state, swap)
        return state, info._replace(acceptance_rate=acc)

    return step_fn


# ----------------------------------------------------------------------------------
# driver


def _check_schedule(betas) -> None:
    try:
        b = jnp.asarray(betas)
        ok = bool(
            b.ndim == 1
            and b.shape[0] >= 1
            and jnp.all(jnp.isfinite(b))
            and jnp.all(jnp.diff(b) > 0)
            and b[0] >= 0
            and jnp.abs(b[-1] - 1.0) < 1e-6
        )
    except jax.errors.ConcretizationTypeError:
        return  # traced schedule: cannot check at trace time
    if not ok:
        raise ValueError(
            "inverse_temperatures must be a 1-d, strictly increasing array in [0, 1] "
            f"ending at 1; got {betas}"
        )


def _round_lengths(total: int, min_length: int = 32) -> list[int]:
    """Doubling round lengths ``b, 2b, 4b, ...`` whose sum is at most ``total``."""
    if total <= 0:
        return []
    rounds = max(1, min(10, int(math.log2(total / min_length + 1))))
    base = max(1, total // (2**rounds - 1))
    return [base * 2**r for r in range(rounds)]


def parallel_tempering(
    key: PRNGKey,
    log_prior: Callable[[ArrayTree], Array],
    log_likelihood: Callable[[ArrayTree], Array],
    initial_positions: ArrayTree,
    num_steps: int,
    *,
    inverse_temperatures: Array | None = None,
    num_chains: int | None = None,
    kernel: str | mcmc.Kernel | tuple | TemperedKernel = "rwm",
    swap: str = "deo",
    adapt_schedule: bool = True,
    adapt_step_size: bool = True,
    num_adapt_steps: int | None = None,
    num_mcmc_steps: int = 1,
    kernel_params: Any = None,
    target_acceptance: float | None = None,
) -> PTResult:
    r"""Parallel tempering on :math:`\pi_\beta \propto p_0 L^\beta` (see module doc).

    Parameters
    ----------
    key
        PRNG key.
    log_prior, log_likelihood
        One-position functions :math:`\log p_0(x)` and :math:`\ell(x) = \log L(x)`.
    initial_positions
        Pytree whose leaves have a leading chain axis of length ``K + 1`` (or ``1``,
        copied to every chain); chain ``k`` starts at ``initial_positions[k]``.
    num_steps
        Scans of the sampling phase (static); ``samples`` has this leading length.
    inverse_temperatures
        Initial schedule ``(K + 1,)``, strictly increasing in ``[0, 1]`` and ending at
        ``1``; default ``linspace(0, 1, num_chains)`` (``[1.]`` for one chain).
    num_chains
        ``K + 1`` when ``inverse_temperatures`` is not given (default: the leading
        axis of ``initial_positions``).
    kernel
        ``"rwm" | "mala" | "hmc"``, a :class:`smcjax.mcmc.Kernel`, an ``(init, step)``
        pair of the :mod:`smcjax.mcmc` protocol, or a :class:`TemperedKernel`.
    swap
        ``"deo"`` (deterministic even-odd, non-reversible) or ``"seo"`` (stochastic
        even-odd, reversible).
    adapt_schedule
        Tune the schedule during the adaptation phase (Syed et al. 2022).
    adapt_step_size
        Tune each chain's step size towards ``target_acceptance`` during adaptation.
    num_adapt_steps
        Scans of the adaptation phase (default ``num_steps`` if any adaptation is on,
        else ``0``), run as rounds of doubling length; they are not part of the output
        statistics.
    num_mcmc_steps
        Local moves per chain per scan.
    kernel_params
        Shared kernel parameters (default ``kernel.default_params(d)``); copied to
        every chain, then tuned per chain.
    target_acceptance
        Target of the step-size tuning (default 0.234 / 0.574 / 0.65 for
        RWM / MALA / HMC; for other kernels step sizes are tuned only if given).

    Returns
    -------
    PTResult
        ``samples`` ``(num_steps, ...)`` at :math:`\beta = 1`, ``swap_rate`` ``(K,)``,
        final ``inverse_temperatures``, round trips and :math:`\hat\Lambda`.

    Notes
    -----
    Runs under ``jax.jit`` (functions, integers and string options static) and under
    ``jax.vmap`` over keys.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if swap not in ("deo", "seo"):
        raise ValueError(f"swap must be 'deo' or 'seo', got {swap!r}")
    kern = _resolve_kernel(kernel)
    n_init = _num_chains(initial_positions, "initial_positions")
    if inverse_temperatures is not None:
        _check_schedule(inverse_temperatures)
        betas = jnp.asarray(inverse_temperatures, jnp.float32)
        n = betas.shape[0]
        if num_chains is not None and num_chains != n:
            raise ValueError(
                f"num_chains={num_chains} disagrees with {n} inverse_temperatures"
            )
    else:
        n = n_init if num_chains is None else num_chains
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_chains must be a Python int >= 1, got {n!r}")
        betas = (
            jnp.ones((1,), jnp.float32)
            if n == 1
            else jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)
        )
    if n_init not in (1, n):
        raise ValueError(
            f"initial_positions has a leading axis of {n_init}; expected {n} (one per "
            f"chain) or 1"
        )
    positions = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x)[1:])), initial_positions
    )

    # per-chain kernel parameters and their tuning target
    if isinstance(kern, TemperedKernel):
        params = jnp.zeros((n,))
        target = None
    else:
        if kernel_params is None and kern.default_params is not None:
            d = ravel_pytree(jax.tree.map(lambda x: x[0], positions))[0].shape[0]
            kernel_params = kern.default_params(d)
        params = jax.tree.map(
            lambda p: jnp.broadcast_to(jnp.asarray(p), (n, *jnp.shape(p))),
            kernel_params,
        )
        target = target_acceptance
        if target is None and isinstance(kernel, str):
            target = _TARGET_ACCEPTANCE[kernel]
    tune_h = (
        adapt_step_size and target is not None and isinstance(params, mcmc.KernelParams)
    )
    if num_adapt_steps is None:
        num_adapt_steps = num_steps if (adapt_schedule or tune_h) else 0
    step_fn = build_kernel(
        log_prior, log_likelihood, kern, swap=swap, num_mcmc_steps=num_mcmc_steps
    )
    state = init(positions, log_prior, log_likelihood, betas, params)

    k_adapt, k_sample = jax.random.split(key)
    lengths = _round_lengths(num_adapt_steps)
    if lengths:
        state = _adapt(
            k_adapt,
            state,
            step_fn,
            lengths,
            tune_schedule=adapt_schedule and n > 1,
            tune_h=tune_h,
            target=target,
        )

    # sampling phase: restart the round-trip count
    def body(st, k):
        st, info = step_fn(k, st)
        top = jax.tree.map(lambda x: x[-1], st.positions)
        return st, (top, st.log_likelihood[-1], st.replicas, info)

    state, (samples, ll_top, replicas, infos) = jax.lax.scan(
        body, state, jax.random.split(k_sample, num_steps)
    )
    att = infos.attempted.astype(jnp.float32)
    swap_rate = jnp.sum(infos.swap_probability * att, axis=0) / jnp.maximum(
        jnp.sum(att, axis=0), 1.0
    )
    round_trips = jnp.sum(infos.round_trips)
    return PTResult(
        samples=samples,
        swap_rate=swap_rate,
        inverse_temperatures=state.inverse_temperatures,
        round_trips=round_trips,
        round_trip_rate=round_trips / num_steps,
        global_barrier=jnp.sum(1.0 - swap_rate),
        acceptance_rate=jnp.mean(infos.acceptance_rate, axis=0),
        log_likelihood=ll_top,
        replicas=replicas,
        params=state.params,
        state=state,
    )


def _adapt(key, state: PTState, step_fn, lengths, *, tune_schedule, tune_h, target):
    r"""Adaptation rounds of the given lengths, as one ``lax.scan`` over all scans.

    Within a round the step sizes follow Robbins–Monro with gain
    :math:`(j + 1)^{-0.6}` (``j`` = scan within the round); at the end of a round
    the schedule is updated from the round's mean swap probabilities
    (:func:`update_schedule`) and the step sizes are interpolated to the new
    :math:`\beta`'s.
    """
    pos = np.concatenate([np.arange(m) for m in lengths])
    ends = np.concatenate([np.arange(m) == m - 1 for m in lengths])
    n_pairs = state.inverse_temperatures.shape[0] - 1
    zeros = jnp.zeros((n_pairs,), jnp.float32)

    def body(carry, inp):
        st, sum_alpha, n_att = carry
        k, j, end = inp
        st, info = step_fn(k, st)
        att = info.attempted.astype(jnp.float32)
        sum_alpha = sum_alpha + info.swap_probability * att
        n_att = n_att + att
        if tune_h:
            gain = (j + 1.0) ** -0.6
            move = jnp.clip(gain * (info.acceptance_rate - target), -1.0, 1.0)
            h = st.params.step_size * jnp.exp(move)
            st = st._replace(params=st.params._replace(step_size=h))
        if tune_schedule:
            old = st.inverse_temperatures
            new = update_schedule(old, 1.0 - sum_alpha / jnp.maximum(n_att, 1.0))
            # keep the schedule if some pair was never attempted (too short a round)
            new = jnp.where(end & jnp.all(n_att > 0), new, old)
            st = st._replace(inverse_temperatures=new)
            if tune_h:
                log_h = jnp.interp(new, old, jnp.log(st.params.step_size))
                st = st._replace(params=st.params._replace(step_size=jnp.exp(log_h)))
            sum_alpha = jnp.where(end, 0.0, sum_alpha)
            n_att = jnp.where(end, 0.0, n_att)
        return (st, sum_alpha, n_att), None

    (state, _, _), _ = jax.lax.scan(
        body,
        (state, zeros, zeros),
        (
            jax.random.split(key, len(pos)),
            jnp.asarray(pos, jnp.float32),
            jnp.asarray(ends),
        ),
    )
    return state
