r"""Resampling schemes, conditional resamplers and the effective sample size.

Contract
--------
Every resampler has the signature ``resampler(key, log_weights, num_samples=None)``
and returns ``int32`` ancestor indices :math:`A^{0:M-1}` in :math:`[0, N)`, where ``N``
is the length of ``log_weights`` and ``M = num_samples or N`` (a static Python int).
The offspring counts :math:`N^i = \#\{m : A^m = i\}` are unbiased,

.. math::  \mathbb E[N^i] = M W^i, \qquad
           W^i = \frac{\exp \ell^i}{\sum_j \exp \ell^j},

for the unnormalised log-weights :math:`\ell`. All schemes are the inverse-CDF
transform :math:`A^m = F^{-1}(u^m)`, :math:`F^{-1}(u) = \min\{i : C^i > u\}` with the
cumulative weights :math:`C^i = \sum_{j \le i} W^j`, of points :math:`u^{0:M-1}`:

* ``multinomial``: the order statistics of :math:`M` i.i.d. uniforms;
* ``stratified``: :math:`u^m = (m + U^m)/M` with i.i.d. :math:`U^m \sim U[0, 1)`;
* ``systematic``: :math:`u^m = (m + U)/M` with one :math:`U \sim U[0, 1)`;
* ``residual``: :math:`\lfloor M W^i \rfloor` deterministic copies of particle
  ``i``, the :math:`R = M - \sum_i \lfloor M W^i \rfloor` remaining ancestors
  multinomial on the residual weights :math:`M W^i - \lfloor M W^i \rfloor`.

The outputs are **sorted** (non-decreasing in the slot ``m``). For SMC this is
immaterial: after resampling the particles are exchangeable (every Feynman–Kac estimate
is a symmetric function of the particle system), so only the offspring counts matter,
and the counts of ``multinomial`` are exactly :math:`\mathrm{Multinomial}(M, W)` (the
ancestors are distributed as the order statistics of :math:`M` i.i.d.
:math:`\mathrm{Categorical}(W)` draws). A randomly permuted order costs an
:math:`O(M \log M)` sort, ~100× the resampling itself on CPU; apply
``jax.random.permutation`` yourself if slot identity carries meaning. The one place it
does — conditional SMC, where one slot holds the reference trajectory — has its own
resamplers (below).

Weights
-------
``-inf`` entries have weight zero and are never selected; ``NaN`` entries are treated as
``-inf``; ``+inf`` entries share all the mass equally (the limit of huge finite
log-weights). Finite log-weights of any magnitude are safe (they are shifted by their
maximum before exponentiation). If *every* entry is ``-inf`` or ``NaN`` the weights are
undefined; raising is impossible under ``jit``, so the documented fallback is **uniform
weights** and the flag is :func:`ess` ``== 0`` (equivalently, the log-sum returned by
:func:`log_normalize` is ``-inf``, so a particle filter's log-evidence is ``-inf``).
Whatever the input, the output is a valid index in ``[0, N)`` of a particle with
positive weight (any particle under the all-zero fallback).

Algorithm and speed
-------------------
Everything is :math:`O(N + M)` with static shapes. On CPU, XLA's generic ``jnp.cumsum``
(an associative scan: ~12 ms for :math:`10^6` floats on the 2-core machine this was
written on) and ``jnp.searchsorted`` (a vectorised binary search: ~60 ms for
:math:`10^6` queries, ~3 ms per halving step) are the bottlenecks of the textbook
"``cumsum`` + ``searchsorted``" resampler (BlackJAX's design). smcjax avoids both:

1. *Prefix sums* are blocked (:func:`_blocked_cumsum`): the array is viewed as rows
   of 16 (8 at the finest level of the weights), each row's prefix sums are one
   product with an upper-triangular matrix of ones (a fixed-order dot product,
   vectorised), the row totals are summed the same way recursively, and the global
   prefix is added top-down in one elementwise pass that XLA fuses with the rank
   computation below.
2. Instead of searching for every point :math:`u^m`, the *rank* of every cumulative
   weight, :math:`K^i = \#\{m : u^m < C^i\}`, is computed in :math:`O(1)`:
   :math:`K^i = \lceil M C^i - U \rceil` for systematic;
   :math:`K^i = s + 1[U^s < M C^i - s]`, :math:`s = \lfloor M C^i \rfloor`, for
   stratified (only the stratum containing :math:`C^i` needs a look); for the
   multinomial order statistics, a guide table (Chen & Asau, 1974) over :math:`M` equal
   cells, which the uniforms fill ~Poisson(1) each, then a count of the first 12
   points of the cell in one fused pass (a binary search finishes the rare fuller
   cells).
3. The offspring counts are :math:`N^i = K^i - K^{i-1}` and the ancestors are the merge
   of the two sorted sequences :math:`(C^i)` and :math:`(u^m)`,
   :math:`A^m = \#\{i : K^i \le m\}`: a histogram of the :math:`K^i` (``segment_sum``
   with sorted indices) and one more (exact, integer) prefix sum.

``benchmarks/bench_resampling.py`` compares this with the ``searchsorted`` design, with
``particles`` and with BlackJAX in one process (results in
``benchmarks/results_resampling.md``). Multinomial and stratified resampling are bound
by the random number generator; their uniforms/exponentials are drawn with an unrolled
Threefry (:func:`_fast_key`), bit-identical to ``jax.random`` but ~1.7x faster on CPU.
Random bits for an array whose size is not a multiple of 16 are ~3-10x slower on
XLA's CPU backend (jax 0.10.2: 13.9 ms for :math:`10^6 + 1` exponentials against
1.9 ms for :math:`10^6 + 16`), so internal draws are padded to a multiple of 16. The
same holds for a user's particle count, which :func:`smcjax.smc` therefore pads with
rows of weight zero (see its notes).

Precision. The prefix sums are made *consistent* across the blocks of the tree: each
block's prefixes are clamped to the block's end value at the coarser level, and from
the block's last positive entry on they equal it exactly (see :func:`_blocked_cumsum`).
So, whatever the rounding, the cumulative weights never decrease, a zero weight leaves
them exactly unchanged, and they reach the total exactly at the last positive particle.
The ranks are a non-decreasing function of them, closed at :math:`M` from the total on,
so the ranks never decrease, a zero-weight particle never gets an offspring (also for
``NaN``/``-inf`` log-weights, whose weight is exactly zero), and no index can leave
``[0, N)``. In float32 the cumulative weights carry relative errors of order
:math:`2^{-24}\log_{16} N`; the resulting count biases are :math:`O(2^{-24} M)` per
particle, telescoping (they move mass between neighbouring particles only), far below
Monte Carlo error; for the same reason the systematic :math:`\lfloor M W^i \rfloor` /
:math:`\lceil M W^i \rceil` guarantee holds up to this rounding (at :math:`M = 10^6` in
float32, where :math:`M C^i / C^N` is resolved to 1/16, ~150 of :math:`10^6` particles
with N(0, 1) log-weights get one copy more or fewer per call). With
``jax.experimental.enable_x64()`` and float64 log-weights everything runs in float64.

Conditional resamplers
----------------------
Conditional SMC (particle Gibbs) keeps a reference trajectory in a fixed slot ``p``
(``pinned``) at every time, so its ancestor is pinned, :math:`A^p = p`, and the other
ancestors must be drawn from the *conditional law* of the unconditional scheme given
:math:`A^p = p`,

.. math::  r(a^{-p} \mid a^p = p, W) = r(a \mid W) / \Pr(A^p = p),

for a scheme whose every slot has marginal law :math:`\Pr(A^m = i) = W^i` (Andrieu,
Doucet & Holenstein, 2010; Chopin & Singh, 2015). This makes the CSMC kernel leave the
target invariant. The functions :func:`conditional_multinomial`,
:func:`conditional_stratified` and :func:`conditional_systematic` take
``(key, log_weights, pinned=0, num_samples=None)``.

* *Multinomial*: the slots are i.i.d., so the others are :math:`M - 1` i.i.d.
  :math:`\mathrm{Categorical}(W)` draws (returned sorted around the pinned slot).
* *Systematic / stratified* ("conditional systematic"): the sorted points are made
  slot-exchangeable by a uniform random cyclic rotation :math:`c`,
  :math:`u^m = s_{(m + c) \bmod M}` with :math:`s_j = (j + U_j)/M`, so that every
  slot's point is :math:`U[0,1)`. Given :math:`A^p = p` the point of slot ``p`` is
  uniform on the pinned particle's interval :math:`[C^{p-1}, C^p)`; it fixes its stratum
  :math:`j_0`, its offset :math:`U_{j_0}` (hence :math:`U` for systematic) and
  :math:`c = (j_0 - p) \bmod M`; the other :math:`U_j` stay i.i.d.

**What "marginal" means.** In conditional SMC the reference's ancestor is a draw from
the weights, so the statement is: if ``pinned`` :math:`\sim W` (and ``pinned < M``), the
joint law of ``(pinned, ancestors)`` is that of the unconditional, rotation-randomised
scheme with :math:`A^p = p`; in particular the offspring counts have exactly the law of
the unconditional scheme's counts and :math:`\mathbb E[N^i] = M W^i`. For a *fixed*
``pinned``, the non-pinned slots have the conditional law above (for multinomial:
:math:`M-1` i.i.d. draws, :math:`\mathbb E[N^i] = 1[i = p] + (M-1) W^i`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax

from smcjax.types import Array, ArrayLike, PRNGKey

__all__ = [
    "ConditionalResampler",
    "Resampler",
    "conditional_multinomial",
    "conditional_stratified",
    "conditional_systematic",
    "ess",
    "get_conditional_resampler",
    "get_resampler",
    "log_normalize",
    "multinomial",
    "normalize",
    "residual",
    "stratified",
    "systematic",
]


class Resampler(Protocol):
    """``(key, log_weights, num_samples=None) -> int32 ancestors (M,)``."""

    def __call__(  # noqa: D102
        self, key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None
    ) -> Array: ...


class ConditionalResampler(Protocol):
    """``(key, log_weights, pinned=0, num_samples=None) -> int32 ancestors (M,)``."""

    def __call__(  # noqa: D102
        self,
        key: PRNGKey,
        log_weights: ArrayLike,
        pinned: ArrayLike = 0,
        num_samples: int | None = None,
    ) -> Array: ...


# --------------------------------------------------------------------------------------
# Random numbers: Threefry with the rounds unrolled on CPU (same bits, faster)
# --------------------------------------------------------------------------------------

_THREEFRY = jex_random.threefry_prng_impl
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    r"""Threefry-2x32 with 20 rounds (Salmon et al., 2011), every round unrolled.

    The key schedule is :math:`(k_0, k_1, k_0 \oplus k_1 \oplus \mathtt{0x1BD11BDA})`,
    injected after every 4 rounds together with the injection counter; rotations
    alternate between the two sets of 4 constants. JAX lowers its ``threefry2x32``
    primitive on CPU with the 5 groups of rounds in a rolled loop, so every group is a
    separate pass over memory; written out, XLA fuses the whole hash into the kernel
    that consumes the bits (~1.7x faster normals on the CPU this was written on).
    """
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _unrolled_random_bits(key_data: Array, bit_width: int, shape) -> Array:
    """JAX's (partitionable) Threefry random bits, computed by :func:`_threefry2x32`.

    32-bit words of a shape with fewer than ``2**32`` entries are, as in JAX,
    ``b0 ^ b1`` of the hash of the counter pair ``(0, flat index)``; anything else is
    delegated to JAX's implementation. Bit-for-bit equal to ``jax.random.bits`` with
    a Threefry key (tested).
    """
    size = int(np.prod(shape))
    if (
        bit_width != 32
        or size >= 2**32
        or key_data.shape != (2,)
        or not jax.config.jax_threefry_partitionable
    ):
        return _THREEFRY.random_bits(key_data, bit_width, shape)
    lo = lax.iota(np.uint32, size).reshape(shape)
    b0, b1 = _threefry2x32(key_data[0], key_data[1], jnp.zeros_like(lo), lo)
    return b0 ^ b1


_UNROLLED_THREEFRY = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=_THREEFRY.seed,
    split=_THREEFRY.split,
    random_bits=_unrolled_random_bits,
    fold_in=_THREEFRY.fold_in,
    name="smcjax_threefry2x32_unrolled",
    tag="fry_u",
)


def _fast_key(key: PRNGKey) -> PRNGKey:
    """The same Threefry key, drawing its bits with the unrolled hash.

    Draws from the returned key are bit-for-bit those of ``key``. Keys of any other
    implementation (e.g. ``"rbg"``) and batches of keys are returned unchanged.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != (2,) or key.dtype != jnp.uint32:
            return key
        key = jax.random.wrap_key_data(key)  # legacy uint32 key: default impl
    if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=_UNROLLED_THREEFRY)


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def _clean(log_weights: ArrayLike) -> Array:
    """Validate (trace-time errors naming the argument); upcast to >= float32.

    ``NaN`` entries are left in place; :func:`_weights` gives them weight zero.
    """
    lw = jnp.asarray(log_weights)
    if lw.ndim != 1:
        raise ValueError(
            f"log_weights must be a 1-d array of shape (N,), got shape {lw.shape}"
        )
    if lw.shape[0] < 1:
        raise ValueError("log_weights must contain at least one particle (N >= 1)")
    if not jnp.issubdtype(lw.dtype, jnp.floating) or lw.dtype.itemsize < 4:
        lw = lw.astype(jnp.float32)  # integers, float16 and bfloat16
    return lw


def _max(lw: Array) -> Array:
    """``max ℓ`` ignoring NaN entries (``-inf`` if all are NaN or ``-inf``).

    The plain maximum is one fast reduction; only if it is NaN (some entry is NaN)
    is the masked maximum computed, in a ``lax.cond``.
    """
    m = jnp.max(lw)
    return lax.cond(
        jnp.isnan(m),
        lambda: jnp.max(jnp.where(jnp.isnan(lw), -jnp.inf, lw)),
        lambda: m,
    )


def _weights(lw: Array, nan_free: bool = False) -> tuple[Array, Array]:
    """Unnormalised weights in ``[0, 1]`` and ``max ℓ`` (``NaN`` entries = ``-inf``).

    ``exp(ℓ - max ℓ)``, so the largest weight is exactly 1 and the total lies in
    ``[1, N]``; if some ``ℓ = +inf``, the indicator of those entries (they share the
    mass); if every weight is zero, all ones (the uniform fallback). ``nan_free``
    skips the NaN check of the maximum (the caller guarantees there is no NaN).
    """
    m = jnp.max(lw) if nan_free else _max(lw)
    w = jnp.exp(lw - jnp.where(jnp.isfinite(m), m, 0.0))
    w = jnp.where(jnp.isnan(lw), 0.0, w)
    w = jnp.where(m == jnp.inf, (lw == jnp.inf).astype(lw.dtype), w)
    return jnp.where(m == -jnp.inf, jnp.ones_like(w), w), m


def log_normalize(log_weights: ArrayLike) -> tuple[Array, Array]:
    r"""Normalise log-weights.

    Parameters
    ----------
    log_weights
        ``(N,)`` unnormalised log-weights :math:`\ell` (``-inf`` allowed).

    Returns
    -------
    log_W, log_sum
        :math:`\log W^i = \ell^i - \log \sum_j e^{\ell^j}` and
        :math:`\log \sum_j e^{\ell^j}`. When every weight is zero ``log_W`` is uniform,
        :math:`-\log N`, and ``log_sum`` is ``-inf`` (the degenerate-weights flag).
        ``+inf`` entries share the mass equally and ``log_sum`` is ``+inf``.
    """
    lw = _clean(log_weights)
    w, m = _weights(lw)
    log_total = jnp.log(jnp.sum(w))
    finite = jnp.isfinite(m)
    # Log domain where possible: tiny weights keep their log-weight (no underflow).
    keep = finite & ~jnp.isnan(lw)
    log_w = jnp.where(keep, lw - jnp.where(finite, m, 0.0), jnp.log(w)) - log_total
    log_sum = jnp.where(finite, m + log_total, m)
    return log_w, log_sum


def normalize(log_weights: ArrayLike) -> Array:
    """Normalised weights ``W = softmax(ℓ)`` (uniform if every weight is zero)."""
    return jnp.exp(log_normalize(log_weights)[0])


def ess(log_weights: ArrayLike) -> Array:
    r"""Effective sample size :math:`1 / \sum_i (W^i)^2` of unnormalised log-weights.

    Returns a value in ``[1, N]``, or ``0`` when every weight is zero (all ``-inf`` or
    ``NaN``): the degenerate-weights flag.
    """
    lw = _clean(log_weights)
    w, m = _weights(lw)
    out = jnp.square(jnp.sum(w)) / jnp.sum(jnp.square(w))
    return jnp.where(m == -jnp.inf, jnp.zeros_like(out), out)


# --------------------------------------------------------------------------------------
# Fast building blocks
# --------------------------------------------------------------------------------------

_BLOCK = 16
# First level of the *consistent* prefix tree (the weights): rows of 8. Its input is an
# elementwise fusion (e.g. ``exp``) that XLA's CPU loop emitter fuses with the reshape
# and emits with the row as the unrolled innermost loop; with rows of 16 (or 32) the
# transcendental ops of such a row are vectorised poorly (``exp`` of a ``(N/16, 16)``
# result was ~3x slower than of ``(N/8, 8)`` or ``(N,)`` on the CPU this was written
# on: 1.3 of the ~4 ms of systematic resampling at N = 1e6).
_FIRST_BLOCK = 8
_SMALL = 64
_CELL_SCAN = 12
_EXACT_F32_INT = 2**24

RankFn = Callable[[Array], Array]


def _dot_tri(x: Array, n: int) -> Array:
    """``x @ triu(ones(n, n))``: prefix sums along the last axis of length ``n``."""
    tri = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.dot(x, tri, precision=lax.Precision.HIGHEST)


def _materialise(x: Array) -> Array:
    """Identity on a ``(rows, _BLOCK)`` float array, computed so XLA stores it.

    XLA fuses cheap elementwise producers into their consumers and *recomputes* them
    per consumer element; through the broadcasts between levels of the prefix tree
    that recomputes the whole coarse-level chain for every particle (~10x slower on
    CPU). ``optimization_barrier`` is stripped before fusion on CPU, so the values go
    through a product with the identity matrix (exact). Only the small coarse levels
    go through it.
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.dot(x, eye, precision=lax.Precision.HIGHEST)


def _shifted(c: Array, rows: int) -> Array:
    """``concatenate([0], c[:rows - 1])`` as a ``(rows, 1)`` array XLA stores.

    The row offsets :math:`L_r = H_{r-1}` of the consistent prefix sums. A
    ``concatenate`` fused into the big elementwise pass of the finest level makes that
    pass ~1.3x slower on CPU (it is evaluated per element, unvectorised), so the
    shifted coarse level is materialised first (:func:`_materialise`: ``O(N / 16)``
    work) when its length allows it; the values are the same bits either way.
    """
    shifted = jnp.concatenate([jnp.zeros((1,), c.dtype), c[:-1]])
    if c.shape[0] % _BLOCK == 0:
        shifted = _materialise(shifted.reshape(-1, _BLOCK)).reshape(-1)
    return shifted[:rows, None]


def _blocked_cumsum(x: Array, consistent: bool) -> tuple[Array, Array]:
    r"""Inclusive prefix sums of a non-negative 1-d float array, and their total.

    The array is viewed as rows of ``_BLOCK`` entries (``_FIRST_BLOCK`` at the finest
    level of a consistent tree); each row's prefix sums are one product with an
    upper-triangular matrix of ones (a fixed-order dot product, so within a row they
    are non-decreasing and adding a zero changes nothing). The row
    totals form the next level, recursively down to at most ``_SMALL`` entries, and
    the global prefix sums are assembled top-down: the prefix of row ``r`` is its
    within-row prefix plus :math:`L_r`, the inclusive prefix of the previous row at the
    coarser level.

    Without ``consistent`` the input must be integer-valued with a total below
    ``2**24`` (float32), so that every partial sum is exact (:func:`_int_cumsum`).
    With ``consistent`` every level is also *clamped and closed*: the prefixes of row
    ``r`` are clipped to :math:`[L_r, H_r]` (:math:`H_r` its own inclusive prefix at the
    coarser level), and from the row's last entry that moves the prefix on they are
    set to exactly :math:`H_r`; the top level is closed at its total the same way. By
    induction over the levels, whatever the floating-point rounding:

    * the prefix sums :math:`C^i` are non-decreasing;
    * :math:`C^i = C^{i-1}` exactly when :math:`x^i = 0` (inside a row, adding a zero
      changes nothing; at a row start, :math:`C^i = L_r` is exactly the previous row's
      closed end; a row of zeros has :math:`L_r = H_r`);
    * :math:`C^i` equals the returned total exactly from the last positive entry on.

    The clamps move each prefix by at most the rounding error of the levels above it
    (relative :math:`O(2^{-24} \log_{16} N)` in float32). Cost: one pass over ``x``
    (the finest triangular product) plus a final elementwise pass, which XLA fuses
    into whatever consumes the prefix sums (e.g. the ranks), and ``O(N / 16)`` work
    for the coarse levels.
    """
    n = x.shape[0]
    levels: list[Array] = []  # within-row prefix sums, fine -> coarse
    cur = x
    while cur.shape[0] > _SMALL:
        block = _FIRST_BLOCK if consistent and not levels else _BLOCK
        rows = -(-cur.shape[0] // block)
        pad = rows * block - cur.shape[0]
        xb = (jnp.pad(cur, (0, pad)) if pad else cur).reshape(rows, block)
        within = _dot_tri(xb, block)
        levels.append(within)
        cur = within[:, -1]
    c = _dot_tri(cur, cur.shape[0])
    total = c[-1]
    if consistent:
        c = jnp.where(c >= total, total, c)
    for i, within in enumerate(reversed(levels)):
        rows = within.shape[0]
        hi = c[:rows, None]
        if consistent:
            lo = _shifted(c, rows)
        else:
            # Exact for the integer-valued sums of _int_cumsum, and without a
            # concatenate, which slows down (unvectorises) any XLA fusion it joins,
            # e.g. the gather of the particles by the ancestors.
            lo = hi - within[:, -1:]
        c2 = within + lo
        if consistent:
            # (within >= 0, so c2 >= lo already: only the upper clamp is needed)
            c2 = jnp.where((c2 > hi) | (within >= within[:, -1:]), hi, c2)
        c = (c2 if i == len(levels) - 1 else _materialise(c2)).reshape(-1)
    return c[:n], total


def _cumsum(x: Array) -> Array:
    """Consistent inclusive prefix sums of a non-negative 1-d float array."""
    return _blocked_cumsum(x, True)[0]


def _int_cumsum(counts: Array, bound: int) -> Array:
    """Exact inclusive prefix sum of non-negative integers whose total is <= bound.

    Integer-valued float32 sums are exact (in any order) below ``2**24``, so the
    blocked matmul prefix sum applies (float inputs are taken as they are);
    otherwise ``jnp.cumsum`` in int32.
    """
    if bound < _EXACT_F32_INT:
        return _blocked_cumsum(counts.astype(jnp.float32), False)[0].astype(jnp.int32)
    return jnp.cumsum(counts.astype(jnp.int32))


def _ranks(cdf: Array, total: Array, rank_fn: RankFn, k_total: ArrayLike) -> Array:
    r"""Inclusive ranks :math:`K^i = K(C^i)`, closed at ``k_total``.

    ``rank_fn`` must be non-decreasing with :math:`K(0) = 0`. On consistent prefix
    sums (:func:`_blocked_cumsum`) the ranks are non-decreasing, a zero-weight particle
    has :math:`K^i = K^{i-1}` (zero offspring) and the last positive particle has
    :math:`K^i` = ``k_total``.
    """
    k = jnp.clip(rank_fn(cdf), 0, k_total)
    return jnp.where(cdf >= total, k_total, k).astype(jnp.int32)


def _merge(ranks: Array, num_samples: int) -> Array:
    r"""Merge step: :math:`A^m = \#\{i : K^i \le m\}` from consistent ranks.

    ``ranks`` (N,) are non-decreasing with last entry ``M``, so every ancestor is in
    ``[0, N)`` and particle ``i`` gets :math:`K^i - K^{i-1}` slots: a histogram of the
    ranks (a scatter-add; ranks equal to ``M`` fall outside and are dropped) and its
    exact prefix sum.
    """
    n = ranks.shape[0]
    exact = n < _EXACT_F32_INT
    ones = jnp.ones((n,), jnp.float32 if exact else jnp.int32)
    hist = jax.ops.segment_sum(ones, ranks, num_samples, indices_are_sorted=True)
    anc = _int_cumsum(hist, n)
    return jnp.minimum(anc, n - 1).astype(jnp.int32)


def _systematic_rank_fn(total: Array, u: Array, m: int) -> RankFn:
    r""":math:`K(c) = \#\{j < M : j + U < M c / C^N\} = \lceil M c / C^N - U \rceil`."""
    scale = m / total
    return lambda c: jnp.ceil(c * scale - u).astype(jnp.int32)


def _stratified_rank_fn(total: Array, u: Array, m: int) -> RankFn:
    r""":math:`K(c) = s + 1[U_s < y - s]`, :math:`s = \lfloor y \rfloor`.

    Here :math:`y = M c / C^N`; all strata below ``s`` lie below ``y``, so only
    stratum ``s`` needs a look.
    """
    scale = m / total

    def rank(c: Array) -> Array:
        y = c * scale
        s = jnp.clip(jnp.floor(y), 0, m).astype(jnp.int32)
        below = u[jnp.minimum(s, m - 1)] < y - s
        return jnp.where(s < m, s + below.astype(jnp.int32), m)

    return rank


def _sorted_uniforms(key: PRNGKey, count: ArrayLike, total: int, dtype) -> Array:
    r"""Order statistics of ``count`` uniforms, padded to ``total`` with ``2.0``.

    Exponential spacings: with :math:`E_0, \dots, E_{R}` i.i.d. Exp(1) and
    :math:`S_j = \sum_{l \le j} E_l`, :math:`(S_0, \dots, S_{R-1}) / S_R` are the order
    statistics of :math:`R` i.i.d. :math:`U[0,1)`. ``count`` may be traced
    (``0 <= count <= total``).
    """
    # Drawn for a multiple of 16 entries: XLA's CPU kernel for the random bits of an
    # odd-sized array is ~10x slower (13.9 vs 1.9 ms for 10^6 + 1 exponentials here).
    # The extra draws are i.i.d. like the others and prefix sums only look back, so
    # the law is unchanged (with JAX's partitionable Threefry, entry j's draw is even
    # the same bits; the prefix tree's float32 grouping follows the padded length).
    padded = -(-(total + 1) // _BLOCK) * _BLOCK
    e = jax.random.exponential(_fast_key(key), (padded,), dtype)
    s = _cumsum(e)
    j = jnp.arange(total)
    points = jnp.where(j < count, s[:total] / s[count], 2.0).astype(dtype)
    if total % _BLOCK == 0:
        points = _materialise(points.reshape(-1, _BLOCK)).reshape(-1)
    return points


def _sorted_rank_fn(total: Array, points: Array) -> RankFn:
    r""":math:`K(c) = \#\{j : p_j < c / C^N\}` for sorted ``points`` (>= 1 ignored).

    A guide table (Chen & Asau, 1974) over ``G = len(points)`` equal cells, which
    uniform order statistics fill ~Poisson(1) each; inside the cell of ``c / C^N`` its
    first ``_CELL_SCAN`` points are compared in one fused pass, and a binary search
    finishes the rare fuller cells. Multinomial at N = M = 10^6: 28 ms against 46 ms
    for a binary search of every cell (``benchmarks/results_resampling.md``).
    """
    g = points.shape[0]
    cell_p = jnp.clip(jnp.floor(points * g), 0, g).astype(jnp.int32)
    # (the points are sorted — consistent prefix sums, padding last — but the
    # histogram does not rely on it: not flagged as sorted)
    hist = jax.ops.segment_sum(jnp.ones((g,), jnp.int32), cell_p, g + 1)
    ends = _int_cumsum(hist, g)
    starts = ends - hist
    scale = g / total

    def rank(c: Array) -> Array:
        y = c * scale
        cell = jnp.clip(jnp.floor(y), 0, g).astype(jnp.int32)
        x = y / g
        start, end = starts[cell], ends[cell]
        # The first _CELL_SCAN points of the cell, counted in one pass (their gathers
        # are independent, so XLA fuses them without recomputation).
        k = start
        for offset in range(_CELL_SCAN):
            idx = start + offset
            below = (idx < end) & (points[jnp.minimum(idx, g - 1)] < x)
            k = k + below.astype(jnp.int32)
        # A cell holding more points, all scanned ones below x, is finished by a
        # binary search over its rest; with ~Poisson(1) points per cell that loop
        # almost never runs (P(> 12 points) ~ 6e-11 per cell).
        # Invariant: points[< lo] < x <= points[>= hi].

        def step(state):
            lo, hi = state
            mid = (lo + hi) // 2
            below = points[jnp.clip(mid, 0, g - 1)] < x
            active = lo < hi
            return (
                jnp.where(active & below, mid + 1, lo),
                jnp.where(active & ~below, mid, hi),
            )

        rest = (k == start + _CELL_SCAN) & (end > k)
        state = (k, jnp.where(rest, end, k))
        lo, _ = lax.while_loop(lambda st: jnp.any(st[0] < st[1]), step, state)
        return lo

    return rank


def _num(n: int, num_samples: int | None) -> int:
    if num_samples is None:
        return n
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise TypeError(
            f"num_samples must be a static Python int (or None), got {num_samples!r}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return int(num_samples)


# --------------------------------------------------------------------------------------
# Standard resamplers
# --------------------------------------------------------------------------------------


def _systematic_from_weights(key: PRNGKey, w: Array, m: int) -> Array:
    """Systematic resampling from non-negative weights ``w`` with a positive total.

    The internal fast path of :func:`systematic` (also used by the SMC engine, which
    has the weights at hand): no validation, no exponentiation.
    """
    cdf, total = _blocked_cumsum(w, True)
    u = jax.random.uniform(key, (), w.dtype)
    return _merge(_ranks(cdf, total, _systematic_rank_fn(total, u, m), m), m)


def systematic(
    key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None
) -> Array:
    r"""Systematic resampling: :math:`u^m = (m + U)/M`, one :math:`U \sim U[0,1)`.

    Parameters
    ----------
    key
        PRNG key.
    log_weights
        ``(N,)`` unnormalised log-weights (``-inf``/``NaN`` = weight zero).
    num_samples
        Static number of ancestors ``M`` (default ``N``).

    Returns
    -------
    ancestors
        ``(M,)`` ``int32``, sorted; particle ``i`` gets :math:`\lfloor M W^i \rfloor` or
        :math:`\lceil M W^i \rceil` copies (up to float32 rounding at large ``M``:
        see the module notes on precision).
    """
    lw = _clean(log_weights)
    m = _num(lw.shape[0], num_samples)
    w, _ = _weights(lw)
    return _systematic_from_weights(key, w, m)


def stratified(
    key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None
) -> Array:
    r"""Stratified resampling: :math:`u^m = (m + U^m)/M`, :math:`U^m \sim U[0,1)` i.i.d.

    Same parameters and output as :func:`systematic`.
    """
    lw = _clean(log_weights)
    m = _num(lw.shape[0], num_samples)
    w, _ = _weights(lw)
    return _stratified_from_weights(key, w, m)


def _stratified_from_weights(key: PRNGKey, w: Array, m: int) -> Array:
    cdf, total = _blocked_cumsum(w, True)
    u = jax.random.uniform(_fast_key(key), (m,), w.dtype)
    return _merge(_ranks(cdf, total, _stratified_rank_fn(total, u, m), m), m)


def _multinomial_sorted(key: PRNGKey, w: Array, m: int) -> Array:
    cdf, total = _blocked_cumsum(w, True)
    points = _sorted_uniforms(key, m, m, w.dtype)
    return _merge(_ranks(cdf, total, _sorted_rank_fn(total, points), m), m)


def multinomial(
    key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None
) -> Array:
    r"""Multinomial resampling: ``M`` i.i.d. :math:`\mathrm{Categorical}(W)` draws.

    The draws are returned sorted: ``ancestors`` is distributed as the order statistics
    of ``M`` i.i.d. categorical draws, so the offspring counts are exactly
    :math:`\mathrm{Multinomial}(M, W)` (see the module notes on order). Same parameters
    as :func:`systematic`.
    """
    lw = _clean(log_weights)
    m = _num(lw.shape[0], num_samples)
    w, _ = _weights(lw)
    return _multinomial_sorted(key, w, m)


def residual(
    key: PRNGKey, log_weights: ArrayLike, num_samples: int | None = None
) -> Array:
    r"""Residual resampling.

    Particle ``i`` gets :math:`\lfloor M W^i \rfloor` copies; the remaining
    :math:`R = M - \sum_i \lfloor M W^i \rfloor` ancestors are multinomial with
    probabilities proportional to :math:`M W^i - \lfloor M W^i \rfloor`. Same parameters
    as :func:`systematic`; output sorted.
    """
    lw = _clean(log_weights)
    m = _num(lw.shape[0], num_samples)
    w, _ = _weights(lw)
    return _residual_from_weights(key, w, m)


def _residual_from_weights(key: PRNGKey, w: Array, m: int) -> Array:
    n = w.shape[0]
    mw = w * (m / jnp.sum(w))
    det = jnp.floor(mw)
    res = mw - det
    det_ranks = _int_cumsum(det.astype(jnp.int32), m + n)
    cap = min(n, m)
    r = jnp.clip(m - det_ranks[-1], 0, cap)
    # Rounding can leave R > 0 with no residual mass: then draw the R from W itself.
    res = jnp.where(jnp.any(res > 0), res, w)
    cdf, total = _blocked_cumsum(res, True)
    points = _sorted_uniforms(key, r, cap, w.dtype)
    # If every residual is zero (R = 0) the rank function only sees the 2.0 padding.
    ranks = det_ranks + _ranks(cdf, total, _sorted_rank_fn(total, points), r)
    return _merge(jnp.minimum(ranks, m), m)


# --------------------------------------------------------------------------------------
# Conditional resamplers
# --------------------------------------------------------------------------------------


def _pinned(pinned: ArrayLike, n: int, m: int) -> Array:
    bound = min(n, m)
    if isinstance(pinned, int | np.integer) and not isinstance(pinned, bool):
        if not 0 <= pinned < bound:
            raise ValueError(
                f"pinned must be in [0, min(N, num_samples)) = [0, {bound}), "
                f"got {pinned}"
            )
    p = jnp.asarray(pinned)
    if p.ndim != 0 or not jnp.issubdtype(p.dtype, jnp.integer):
        raise ValueError(f"pinned must be an integer scalar, got {pinned!r}")
    # Traced values cannot be checked; they are clipped into range.
    return jnp.clip(p, 0, bound - 1).astype(jnp.int32)


def conditional_multinomial(
    key: PRNGKey,
    log_weights: ArrayLike,
    pinned: ArrayLike = 0,
    num_samples: int | None = None,
) -> Array:
    r"""Conditional multinomial resampling for conditional SMC.

    Returns ancestors with ``ancestors[pinned] == pinned``; the other ``M - 1`` slots
    are i.i.d. :math:`\mathrm{Categorical}(W)` draws (the conditional law of
    multinomial resampling given :math:`A^p = p`), sorted around the pinned slot.

    Parameters
    ----------
    key
        PRNG key.
    log_weights
        ``(N,)`` unnormalised log-weights.
    pinned
        Integer scalar (may be traced) in ``[0, min(N, M))``: the slot of the
        reference particle, which is also its ancestor. Traced values are clipped.
    num_samples
        Static ``M`` (default ``N``).

    Returns
    -------
    ancestors
        ``(M,)`` ``int32``. If ``pinned`` :math:`\sim W`, the counts are exactly
        :math:`\mathrm{Multinomial}(M, W)`.
    """
    lw = _clean(log_weights)
    n = lw.shape[0]
    m = _num(n, num_samples)
    p = _pinned(pinned, n, m)
    slots = jnp.arange(m, dtype=jnp.int32)
    if m == 1:
        return jnp.broadcast_to(p, (1,)).astype(jnp.int32)
    w, _ = _weights(lw)
    others = _multinomial_sorted(key, w, m - 1)
    shifted = others[jnp.clip(slots - 1, 0, m - 2)]
    body = jnp.where(slots < p, others[jnp.minimum(slots, m - 2)], shifted)
    return jnp.where(slots == p, p, body).astype(jnp.int32)


def _conditional_inverse_cdf(
    key: PRNGKey,
    log_weights: ArrayLike,
    pinned: ArrayLike,
    num_samples: int | None,
    stratified_points: bool,
) -> Array:
    lw = _clean(log_weights)
    n = lw.shape[0]
    m = _num(n, num_samples)
    p = _pinned(pinned, n, m)
    w, _ = _weights(lw)
    k_point, k_u = jax.random.split(key)
    cdf, total = _blocked_cumsum(w, True)
    scale = m / total
    # The pinned slot's point, uniform on the pinned particle's interval (scaled by M).
    y_hi = cdf[p] * scale
    y_lo = jnp.where(p > 0, cdf[jnp.maximum(p - 1, 0)] * scale, 0.0)
    v = jax.random.uniform(k_point, (), w.dtype)
    point = jnp.clip(y_lo + v * (y_hi - y_lo), 0.0, jnp.nextafter(float(m), 0.0))
    j0 = jnp.clip(jnp.floor(point), 0, m - 1).astype(jnp.int32)
    u0 = jnp.clip(point - j0, 0.0, 1.0).astype(w.dtype)
    if stratified_points:
        u = jax.random.uniform(k_u, (m,), w.dtype).at[j0].set(u0)
        rank_fn = _stratified_rank_fn(total, u, m)
    else:
        rank_fn = _systematic_rank_fn(total, u0, m)
    sorted_anc = _merge(_ranks(cdf, total, rank_fn, m), m)
    # Rotate so that slot p holds the point of stratum j0: A^q = S[(j0 + q - p) mod M].
    slots = jnp.arange(m, dtype=jnp.int32)
    anc = sorted_anc[jnp.mod(j0 + slots - p, m)]
    return jnp.where(slots == p, p, anc).astype(jnp.int32)


def conditional_systematic(
    key: PRNGKey,
    log_weights: ArrayLike,
    pinned: ArrayLike = 0,
    num_samples: int | None = None,
) -> Array:
    r"""Conditional systematic resampling (Chopin & Singh, 2015) for conditional SMC.

    The unconditional scheme is systematic resampling with a uniform random cyclic
    rotation of the slots, under which every slot's point is :math:`U[0,1)`. Given that
    slot ``p`` = ``pinned`` selects particle ``p``, its point is uniform on
    :math:`[C^{p-1}, C^p)`; this fixes :math:`U` and the rotation, and the others are
    :math:`A^q = F^{-1}\big((u^p + (q - p)/M) \bmod 1\big)`.

    Parameters and return value as :func:`conditional_multinomial`. If
    ``pinned`` :math:`\sim W`, the offspring counts have exactly the law of
    :func:`systematic`'s counts.
    """
    return _conditional_inverse_cdf(key, log_weights, pinned, num_samples, False)


def conditional_stratified(
    key: PRNGKey,
    log_weights: ArrayLike,
    pinned: ArrayLike = 0,
    num_samples: int | None = None,
) -> Array:
    r"""Conditional stratified resampling for conditional SMC.

    As :func:`conditional_systematic`, with independent offsets :math:`U_j` in the
    strata: given the pinned slot's point (uniform on :math:`[C^{p-1}, C^p)`), its
    stratum's offset and the rotation are fixed and the other offsets stay i.i.d.
    If ``pinned`` :math:`\sim W`, the counts have exactly the law of
    :func:`stratified`'s counts.
    """
    return _conditional_inverse_cdf(key, log_weights, pinned, num_samples, True)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}

# Internal fast paths from non-negative weights with a positive total (no validation,
# no exponentiation): ``resampler(key, lw, m) == _FROM_WEIGHTS[resampler](key,
# _weights(lw)[0], m)`` for float32/float64 ``lw``. The SMC engine uses them with the
# weights it has already exponentiated.
_FROM_WEIGHTS: dict[Callable, Callable[[PRNGKey, Array, int], Array]] = {
    multinomial: _multinomial_sorted,
    stratified: _stratified_from_weights,
    systematic: _systematic_from_weights,
    residual: _residual_from_weights,
}

_CONDITIONAL_RESAMPLERS: dict[str, ConditionalResampler] = {
    "multinomial": conditional_multinomial,
    "stratified": conditional_stratified,
    "systematic": conditional_systematic,
}


def get_resampler(resampling: str | Resampler) -> Resampler:
    """Look up a resampler by name, or pass a callable through.

    Raises
    ------
    ValueError
        If ``resampling`` is an unknown name (the message lists the known ones).
    """
    if callable(resampling):
        return resampling
    try:
        return _RESAMPLERS[resampling]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown resampling={resampling!r}; expected one of "
            f"{sorted(_RESAMPLERS)} or a callable (key, log_weights, num_samples)"
        ) from None


def get_conditional_resampler(
    resampling: str | ConditionalResampler,
) -> ConditionalResampler:
    """Look up a conditional resampler by name, or pass a callable through.

    Names: ``"multinomial"``, ``"systematic"``, ``"stratified"`` (a ``"conditional_"``
    prefix is accepted).

    Raises
    ------
    ValueError
        If ``resampling`` is an unknown name (the message lists the known ones).
    """
    if callable(resampling):
        return resampling
    name = resampling
    if isinstance(name, str) and name.startswith("conditional_"):
        name = name[len("conditional_") :]
    try:
        return _CONDITIONAL_RESAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown conditional resampling={resampling!r}; expected one of "
            f"{sorted(_CONDITIONAL_RESAMPLERS)} or a callable "
            "(key, log_weights, pinned, num_samples)"
        ) from None
