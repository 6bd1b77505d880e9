"""Tests for smcjax.resampling: unbiasedness, exact laws, conditional laws, edge cases.

Statistical checks average over R = 4000 vmapped keys (fixed seeds) and compare with
the truth within 4 Monte Carlo standard errors estimated from the replicates (plus a
1/R slack for quantities that are deterministic up to float rounding).

To keep the file fast, almost every test reuses one jitted, vmapped function per
(scheme, M) on N = 8 particles and a batch of R keys and weight vectors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smcjax import resampling as rs

SCHEMES = {
    "multinomial": rs.multinomial,
    "stratified": rs.stratified,
    "systematic": rs.systematic,
    "residual": rs.residual,
}
CONDITIONAL = {
    "multinomial": rs.conditional_multinomial,
    "stratified": rs.conditional_stratified,
    "systematic": rs.conditional_systematic,
}
R = 4000  # replicates for statistical checks (also the batch size of every call)
N = 8  # particles in the shared functions
MS = (8, 13, 5)  # M = N, M > N, M < N
NINF = -np.inf


@functools.cache
def _batched(name: str, m: int):
    fn = SCHEMES[name]
    return jax.jit(jax.vmap(lambda k, lw: fn(k, lw, m)))


@functools.cache
def _batched_cond(name: str, m: int):
    fn = CONDITIONAL[name]
    return jax.jit(jax.vmap(lambda k, lw, p: fn(k, lw, p, m)))


def _keys(seed: int, r: int = R) -> jax.Array:
    return jax.random.split(jax.random.key(seed), r)


def _tile(lw, r: int = R) -> jax.Array:
    lw = jnp.asarray(lw, jnp.float32)
    return jnp.broadcast_to(lw, (r, *lw.shape[-1:])) if lw.ndim == 1 else lw


def _run(name: str, m: int, lw, seed: int) -> np.ndarray:
    anc = _batched(name, m)(_keys(seed), _tile(lw))
    assert anc.dtype == jnp.int32 and anc.shape == (R, m)
    return np.asarray(anc)


def _run_cond(name: str, m: int, lw, pinned, seed: int) -> np.ndarray:
    p = jnp.broadcast_to(jnp.asarray(pinned, jnp.int32), (R,))
    anc = _batched_cond(name, m)(_keys(seed), _tile(lw), p)
    assert anc.dtype == jnp.int32 and anc.shape == (R, m)
    return np.asarray(anc)


def _weights(n: int, seed: int, zeros: int = 1) -> np.ndarray:
    """Dirichlet(0.7) weights in float64 with ``zeros`` exact zeros."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(n, 0.7))
    if zeros:
        w[rng.choice(n, zeros, replace=False)] = 0.0
        w /= w.sum()
    return w


def _log(w: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(w).astype(np.float32)


def _counts(anc: np.ndarray, n: int = N) -> np.ndarray:
    return (anc[:, :, None] == np.arange(n)).sum(1)


def _assert_mean(samples: np.ndarray, truth: np.ndarray, what: str) -> None:
    samples = np.asarray(samples, np.float64)
    mu = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    tol = 4 * se + 1.0 / samples.shape[0]
    bad = np.abs(mu - truth) > tol
    assert not bad.any(), (
        f"{what}: mean {mu[bad]} vs truth {truth[bad]} (tol {tol[bad]})"
    )


def _assert_var_multinomial(counts: np.ndarray, m: int, w: np.ndarray) -> None:
    c = counts.astype(np.float64)
    dev2 = (c - c.mean(0)) ** 2 * len(c) / (len(c) - 1)
    _assert_mean(dev2, m * w * (1 - w), "multinomial variance")


# --------------------------------------------------------------------------------------
# Conditional resamplers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
@pytest.mark.parametrize("m", MS)
def test_conditional_pins_reference(name, m):
    w = _weights(N, 1, zeros=2)
    pinned = np.random.default_rng(3).integers(0, min(N, m), R)
    a = _run_cond(name, m, _log(w), pinned, 2)
    assert (a[np.arange(R), pinned] == pinned).all()
    assert ((a >= 0) & (a < N)).all()
    # Non-pinned slots never select a zero-weight particle (the pinned one may be one).
    others = np.ones_like(a, bool)
    others[np.arange(R), pinned] = False
    assert (w[a[others]] > 0).all()


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
@pytest.mark.parametrize("m", MS)
def test_conditional_marginal_counts_unbiased(name, m):
    """pinned ~ W (and < M) => the counts have the unconditional law: E = M W."""
    w = _weights(N, 4, zeros=1)
    if m < N:  # the reference must fit in a slot: put all the mass on indices < M
        w[m:] = 0.0
        w /= w.sum()
    pinned = np.random.default_rng(5).choice(N, R, p=w)
    counts = _counts(_run_cond(name, m, _log(w), pinned, 6))
    _assert_mean(counts, m * w, f"conditional_{name} marginal counts")
    if name == "multinomial":  # exactly Multinomial(M, W)
        _assert_var_multinomial(counts, m, w)
    if name == "systematic":  # systematic's support: floor or ceil of M W
        assert (counts >= np.floor(m * w - 1e-5)).all()
        assert (counts <= np.ceil(m * w + 1e-5)).all()


def test_conditional_multinomial_law_of_others():
    """Fixed pinned p: the other M-1 slots are i.i.d. Categorical(W)."""
    m, p = 13, 2
    w = _weights(N, 6, zeros=1)
    a = _run_cond("multinomial", m, _log(w), p, 7)
    assert (a[:, p] == p).all()
    counts = _counts(np.delete(a, p, axis=1))
    _assert_mean(counts, (m - 1) * w, "conditional multinomial others")
    _assert_var_multinomial(counts, m - 1, w)


def _conditional_slot_law(w: np.ndarray, m: int, p: int, strat: bool) -> np.ndarray:
    """Exact P(A^q = i | A^p = p) by integrating over the pinned point (float64)."""
    n = w.size
    y = m * np.concatenate([[0.0], np.cumsum(w)])  # scaled CDF, y[i+1] = M C^i
    y[-1] = m
    grid = y[p] + (np.arange(20000) + 0.5) / 20000 * (y[p + 1] - y[p])
    j0 = np.floor(grid).astype(int)
    law = np.zeros((m, n))
    for q in range(m):
        j = (j0 + q - p) % m  # stratum seen by slot q
        if strat:  # U_j uniform: the law is the overlap of I_i with stratum j
            lo = np.clip(y[None, :-1], j[:, None], j[:, None] + 1)
            hi = np.clip(y[None, 1:], j[:, None], j[:, None] + 1)
            law[q] = (hi - lo).mean(0)
        else:
            pt = j + (grid - j0)
            idx = np.searchsorted(y[1:], pt, side="right")
            law[q] = np.bincount(np.minimum(idx, n - 1), minlength=n) / grid.size
    law[p] = np.eye(n)[p]
    return law


@pytest.mark.parametrize("name", ["systematic", "stratified"])
@pytest.mark.parametrize(("m", "p"), [(8, 5), (13, 1)])
def test_conditional_inverse_cdf_law_per_slot(name, m, p):
    """Every slot's conditional law given A^p = p matches the exact integral."""
    w = _weights(N, 8, zeros=0)
    a = _run_cond(name, m, _log(w), p, 9)
    truth = _conditional_slot_law(w, m, p, name == "stratified")
    for q in range(m):
        onehot = (a[:, q][:, None] == np.arange(N)).astype(np.float64)
        _assert_mean(onehot, truth[q], f"conditional_{name} slot {q}")


def test_conditional_edge_cases():
    one = np.array([NINF, 0.0, NINF, np.nan, NINF, NINF, NINF, NINF], np.float32)
    for name, fn in CONDITIONAL.items():
        a = _run_cond(name, 13, one, 2, 12)
        assert (a[:, 2] == 2).all() and (np.delete(a, 2, axis=1) == 1).all()
        # all-zero weights: uniform fallback, pinned still kept
        b = _run_cond(name, 13, np.full(N, NINF, np.float32), 4, 13)
        assert (b[:, 4] == 4).all() and ((b >= 0) & (b < N)).all()
        # M = 1
        assert np.asarray(fn(jax.random.key(1), jnp.asarray(one), 0, 1)).tolist() == [0]


def test_conditional_bad_pinned_and_registry():
    lw = jnp.zeros(4)
    with pytest.raises(ValueError, match="pinned"):
        rs.conditional_systematic(jax.random.key(0), lw, 4)
    with pytest.raises(ValueError, match="pinned"):
        rs.conditional_multinomial(jax.random.key(0), lw, 3, 2)
    with pytest.raises(ValueError, match="pinned"):
        rs.conditional_multinomial(jax.random.key(0), lw, jnp.zeros(2, jnp.int32))
    assert rs.get_conditional_resampler("systematic") is rs.conditional_systematic
    assert (
        rs.get_conditional_resampler("conditional_multinomial")
        is rs.conditional_multinomial
    )
    f = lambda k, lw, p=0, m=None: lw
    assert rs.get_conditional_resampler(f) is f
    with pytest.raises(ValueError, match="resampling"):
        rs.get_conditional_resampler("residual")


# --------------------------------------------------------------------------------------
# Standard resamplers: unbiasedness and exact laws
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("m", MS)
def test_counts_unbiased(name, m):
    w = _weights(N, 20 + m, zeros=2)
    a = _run(name, m, _log(w), 21)
    assert ((a >= 0) & (a < N)).all() and (w[a] > 0).all()
    assert (np.diff(a, axis=1) >= 0).all()  # documented: sorted output
    counts = _counts(a)
    _assert_mean(counts, m * w, f"{name} counts")
    lo, hi = np.floor(m * w - 1e-5), np.ceil(m * w + 1e-5)
    if name == "systematic":
        assert ((counts >= lo) & (counts <= hi)).all()
    if name == "residual":
        assert (counts >= lo).all()
    if name == "stratified":
        assert ((counts >= lo - 1) & (counts <= hi + 1)).all()
    if name == "multinomial":
        _assert_var_multinomial(counts, m, w)


@pytest.mark.parametrize("name", ["systematic", "stratified"])
def test_fast_inverse_cdf_matches_searchsorted_reference(name):
    """The O(N) rank/merge design equals F^{-1}(u) computed with searchsorted."""
    m = 13
    w = _weights(N, 30, zeros=2)
    keys = _keys(31)
    got = _run(name, m, _log(w), 31)
    shape = () if name == "systematic" else (m,)
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, shape))(keys))
    pts = (np.arange(m) + (u[:, None] if u.ndim == 1 else u)) / m
    ref = np.minimum(np.searchsorted(np.cumsum(w), pts, side="right"), N - 1)
    assert np.mean(got != ref) < 1e-3


@pytest.mark.parametrize("name", ["systematic", "stratified"])
def test_inverse_cdf_exact_at_large_n(name):
    """At N = M = 20011 (every level of the blocked prefix tree in use) the ancestors
    are F^{-1}(u^m) of float64 prefix sums, up to float32 rounding of the weights."""
    n = _BIG
    rng = np.random.default_rng(34)
    lw = (3.0 * rng.standard_normal(n)).astype(np.float32)
    lw[rng.choice(n, n // 10, replace=False)] = NINF
    keys = _keys(35, 8)
    got = np.asarray(_batched_big(name)(keys, _tile(lw, 8)))
    shape = () if name == "systematic" else (n,)
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(rs._fast_key(k), shape))(keys))
    w = np.exp(lw.astype(np.float64) - lw.max())
    cdf = np.cumsum(w)
    pts = (np.arange(n) + (u[:, None] if u.ndim == 1 else u)) / n * cdf[-1]
    ref = np.minimum(np.searchsorted(cdf, pts, side="right"), n - 1)
    assert np.isfinite(lw[got]).all()
    # float32 weights and prefix sums move a point across a boundary only when it
    # lies within ~1e-6 (relative) of it: a handful of slots per call
    assert np.mean(got != ref) < 1e-3, np.mean(got != ref)
    counts = np.apply_along_axis(np.bincount, 1, got, minlength=n)
    mw = n * w / cdf[-1]
    if name == "systematic":
        off = (counts < np.floor(mw - 1e-3)) | (counts > np.ceil(mw + 1e-3))
        assert off.sum() <= 8, off.sum()


def test_multinomial_large_uneven_n():
    """Guide-table merge on a large, very uneven N: counts unbiased, variance exact."""
    n, m = 2000, 1500
    rng = np.random.default_rng(32)
    w = rng.pareto(1.0, n) + 1e-3
    w[rng.choice(n, 300, replace=False)] = 0.0
    w /= w.sum()
    draw = jax.jit(jax.vmap(lambda k, lw: rs.multinomial(k, lw, m)))
    a = np.asarray(draw(_keys(33, 1000), _tile(_log(w), 1000)))
    assert (w[a] > 0).all()
    top = np.argsort(w)[-20:]
    counts = (a[:, :, None] == top).sum(1)
    _assert_mean(counts, m * w[top], "multinomial large-N counts")
    _assert_var_multinomial(counts, m, w[top])


@pytest.mark.parametrize("scan", [0, 1, 3])
def test_guide_table_scan_and_binary_search_agree(monkeypatch, scan):
    """Multinomial/residual ranks: the unrolled cell scan + binary-search fallback.

    ``K(c) = #{j : p_j < c / C}`` is checked against ``np.searchsorted`` on the same
    float32 points and query values, with the default scan length (the fallback
    almost never runs) and with short scans (0: binary search only; 1, 3: the fallback
    runs in many cells), which must give identical ancestors.
    """
    n = m = 20011
    lw = jnp.asarray(np.random.default_rng(7).normal(size=n) * 3.0, jnp.float32)
    w, _ = rs._weights(rs._clean(lw))
    cdf, total = rs._blocked_cumsum(w, True)
    key = jax.random.key(5)
    points = rs._sorted_uniforms(key, m, m, jnp.float32)
    g = points.shape[0]
    x = np.asarray((cdf * (g / total)) / g)
    expected = np.searchsorted(np.asarray(points), x, side="left")
    default = [jax.jit(f)(key, lw) for f in (rs.multinomial, rs.residual)]
    got = jax.jit(lambda c, t, p: rs._sorted_rank_fn(t, p)(c))(cdf, total, points)
    np.testing.assert_array_equal(np.asarray(got), expected)
    monkeypatch.setattr(rs, "_CELL_SCAN", scan)
    got = jax.jit(lambda c, t, p: rs._sorted_rank_fn(t, p)(c))(cdf, total, points)
    np.testing.assert_array_equal(np.asarray(got), expected)
    for f, a in zip((rs.multinomial, rs.residual), default, strict=True):
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(key, lw)), np.asarray(a))


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------

_EDGE_ROWS = np.array(
    [
        [NINF, NINF, 3.0, NINF, NINF, NINF, NINF, NINF],  # all -inf but one
        [np.nan, 0.0, np.nan, 0.0, NINF, np.nan, NINF, NINF],  # NaN = weight zero
        [1e30, np.inf, 0.0, np.inf, NINF, np.nan, -1e30, 3e38],  # +inf share the mass
        [-3e38, 3e38, 3e38, NINF, 1e30, -1e30, np.nan, 0.0],  # huge magnitudes
        [-1e4, -1.1e4, NINF, -1e4, -1e4 - 200, np.nan, -2e4, NINF],  # tiny weights
        [NINF] * 7 + [-5.0],  # only the last particle
    ],
    np.float32,
)
_EDGE_SUPPORT = [{2}, {1, 3}, {1, 3}, {1, 2}, {0, 3}, {7}]


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("m", [13, 5])
def test_edge_cases(name, m):
    rows = np.resize(_EDGE_ROWS, (R, N))
    a = _run(name, m, rows, 40)
    for i, support in enumerate(_EDGE_SUPPORT):
        seen = set(np.unique(a[i :: len(_EDGE_ROWS)]).tolist())
        assert seen <= support, (i, seen)
        if len(support) == 2:
            assert seen == support, (i, seen)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_single_particle_and_integer_input(name):
    fn = jax.jit(SCHEMES[name], static_argnums=2)
    key = jax.random.key(41)
    assert np.asarray(fn(key, jnp.array([NINF]), 3)).tolist() == [0, 0, 0]
    assert np.asarray(fn(key, jnp.array([0.5]), 3)).tolist() == [0, 0, 0]
    a = SCHEMES[name](key, jnp.zeros(N, jnp.int32), N)
    assert a.dtype == jnp.int32 and a.shape == (N,)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_all_zero_weights_fallback_is_uniform(name):
    rows = np.resize(
        np.array([[NINF] * N, [np.nan] * N, [np.nan, NINF] * (N // 2)], np.float32),
        (R, N),
    )
    a = _run(name, 13, rows, 42)
    assert ((a >= 0) & (a < N)).all()
    _assert_mean(_counts(a), np.full(N, 13 / N), f"{name} fallback")
    for row in rows[:3]:
        assert float(rs.ess(row)) == 0.0
        assert float(rs.log_normalize(row)[1]) == -np.inf
        np.testing.assert_allclose(np.asarray(rs.normalize(row)), 1 / N, rtol=1e-6)


_BIG = 20011


@functools.cache
def _batched_big(name: str):
    fn = SCHEMES.get(name)
    if fn is not None:
        return jax.jit(jax.vmap(lambda k, lw: fn(k, lw)))
    fn = CONDITIONAL[name.removeprefix("conditional_")]
    return jax.jit(jax.vmap(lambda k, lw: fn(k, lw, 1)))


def test_float32_normalised_weights_summing_below_one():
    """Weights normalised in float32 whose sum is < 1: the last particle is selectable
    and no index reaches N (the classic searchsorted overflow)."""
    w = np.full(_BIG, 1.0, np.float32)
    w[-1] = 0.3 / 0.7 * (_BIG - 1)  # 30% of the mass
    w = (w / w.sum() * (1 - 1e-3)).astype(np.float32)  # sums to 0.999
    assert np.cumsum(w, dtype=np.float32)[-1] < 1.0
    lws = _tile(np.log(w), 16)
    for name in SCHEMES:
        a = np.asarray(_batched_big(name)(_keys(43, 16), lws))
        assert a.min() >= 0 and a.max() == _BIG - 1, name
        frac = (a == _BIG - 1).mean()
        assert abs(frac - 0.3) < 0.01, (name, frac)


def test_zero_weights_at_block_boundaries_never_selected():
    """Zeros around every block boundary of the blocked prefix sum, tiny weights."""
    rng = np.random.default_rng(44)
    idx = np.arange(_BIG)
    lws = []
    # Rows of the consistent prefix tree: _FIRST_BLOCK particles, then _BLOCK rows.
    row1 = rs._FIRST_BLOCK
    row2, row3 = row1 * rs._BLOCK, row1 * rs._BLOCK**2
    for _ in range(16):
        w = rng.uniform(size=_BIG) * np.exp(-rng.uniform(0, 80, _BIG))
        w[
            (idx % row1 == 0)
            | (idx % row1 == row1 - 1)
            | (idx % row2 < row2 // 8)
            | (idx % row3 < row3 // 12)
        ] = 0
        w[1] = 1e-3  # the pinned particle of the conditional resamplers
        lws.append(_log(w))
    lws = np.stack(lws)
    zero = np.isneginf(lws)
    for name in [*SCHEMES, "conditional_systematic", "conditional_multinomial"]:
        a = np.asarray(_batched_big(name)(_keys(45, 16), jnp.asarray(lws)))
        assert not np.take_along_axis(zero, a, axis=1).any(), name


def test_ess_and_normalize():
    w = np.array([0.1, 0.2, 0.3, 0.4])
    lw = jnp.log(jnp.asarray(w)) + 1000.0
    np.testing.assert_allclose(float(rs.ess(lw)), 1 / np.sum(w**2), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(rs.normalize(lw)), w, rtol=1e-4)
    np.testing.assert_allclose(float(rs.log_normalize(lw)[1]), 1000.0, rtol=1e-6)
    assert float(rs.ess(jnp.array([0.0, -jnp.inf, jnp.nan]))) == pytest.approx(1.0)
    assert float(rs.ess(jnp.array([0.0, jnp.inf, jnp.inf]))) == pytest.approx(2.0)
    log_w, log_sum = rs.log_normalize(jnp.array([0.0, jnp.inf, jnp.nan, jnp.inf]))
    assert float(log_sum) == np.inf
    np.testing.assert_allclose(np.exp(np.asarray(log_w)), [0, 0.5, 0, 0.5])
    # low-precision inputs are upcast before the prefix sums
    a = rs.systematic(jax.random.key(0), jnp.zeros(N, jnp.bfloat16))
    assert a.dtype == jnp.int32 and (np.sort(np.asarray(a)) == np.arange(N)).all()


def test_blocked_prefix_sums():
    rng = np.random.default_rng(46)
    for n in (5, 65, 1000, 100_003):
        x = rng.uniform(size=n).astype(np.float32)
        x[rng.integers(0, n, n // 4)] = 0.0
        got = np.asarray(jax.jit(rs._cumsum)(jnp.asarray(x)))
        np.testing.assert_allclose(got, np.cumsum(x, dtype=np.float64), rtol=2e-6)
        # monotone up to rounding at block boundaries (ranks are made consistent anyway)
        assert (np.diff(got) >= -1e-6 * got[1:]).all()
        k = rng.integers(0, 3, n)
        got_k = jax.jit(rs._int_cumsum, static_argnums=1)(jnp.asarray(k), 3 * n)
        assert (np.asarray(got_k) == np.cumsum(k)).all()


def test_x64_inputs():
    with jax.enable_x64(True):  # local, never the global flag
        lw = jnp.log(jnp.asarray(_weights(N, 47, zeros=1), jnp.float64))
        for fn in (rs.systematic, rs.multinomial):
            a = jax.jit(fn, static_argnums=2)(jax.random.key(0), lw, 12)
            assert a.dtype == jnp.int32 and a.shape == (12,)
        a = jax.jit(rs.conditional_systematic)(jax.random.key(0), lw, 3)
        assert a.dtype == jnp.int32 and int(a[3]) == 3


# --------------------------------------------------------------------------------------
# API: jit/vmap, determinism, errors, registry
# --------------------------------------------------------------------------------------


def test_jit_vmap_determinism():
    lw = _log(_weights(N, 50))
    for name in SCHEMES:
        a1, a2 = _run(name, 13, lw, 51), _run(name, 13, lw, 51)
        np.testing.assert_array_equal(a1, a2)
        assert (a1 != _run(name, 13, lw, 52)).any()
    a1 = _run("systematic", 13, lw, 51)
    keys = _keys(51)
    single = jax.jit(rs.systematic, static_argnums=2)
    for i in (0, 7):
        np.testing.assert_array_equal(
            np.asarray(single(keys[i], jnp.asarray(lw), 13)), a1[i]
        )
    # legacy uint32 keys work too
    assert rs.systematic(jax.random.PRNGKey(0), lw).shape == (N,)


def test_bad_input_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="log_weights"):
        rs.systematic(key, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="log_weights"):
        rs.multinomial(key, jnp.zeros((0,)))
    with pytest.raises(ValueError, match="num_samples"):
        rs.stratified(key, jnp.zeros(3), 0)
    with pytest.raises(TypeError, match="num_samples"):
        rs.residual(key, jnp.zeros(3), 2.5)
    with pytest.raises(ValueError, match="resampling"):
        rs.get_resampler("bogus")
    assert rs.get_resampler("systematic") is rs.systematic
    assert rs.get_resampler(rs.multinomial) is rs.multinomial


# --------------------------------------------------------------------------------------
# Property test (fixed shapes: reuses the compiled functions above)
# --------------------------------------------------------------------------------------

_entry = st.one_of(
    st.floats(width=32),  # any float32, including +-inf, NaN and huge magnitudes
    st.floats(-50, 5, width=32),
    st.sampled_from([-np.inf, np.inf, np.nan, -3e38, 3e38]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.lists(_entry, min_size=N, max_size=N), min_size=1, max_size=R // 100
    ),
    seed=st.integers(0, 2**31 - 1),
    pinned=st.integers(0, N - 1),
)
def test_property_valid_indices(rows, seed, pinned):
    lw = np.resize(np.asarray(rows, np.float32), (R, N))
    clean = np.where(np.isnan(lw), -np.inf, lw)
    with np.errstate(over="ignore", invalid="ignore"):
        mx = clean.max(1, keepdims=True)
        support = np.where(
            np.isposinf(mx),
            np.isposinf(clean),
            np.where(np.isneginf(mx), True, np.exp(clean - mx) > 0),
        )
    for name in SCHEMES:
        a = _run(name, 13, lw, seed % 1000)
        assert np.take_along_axis(support, a, axis=1).all(), name
    for name in CONDITIONAL:
        a = _run_cond(name, 13, lw, pinned, seed % 1000)
        assert (a[:, pinned] == pinned).all() and ((a >= 0) & (a < N)).all()
        others = np.delete(np.take_along_axis(support, a, axis=1), pinned, axis=1)
        assert others.all(), name


# --------------------------------------------------------------------------------------
# Unrolled Threefry (internal): the same bits as JAX's, for every draw we use it for
# --------------------------------------------------------------------------------------


def test_unrolled_threefry_key_draws_bit_identical():
    draws = (jax.random.normal, jax.random.uniform, jax.random.exponential)
    for key in (jax.random.key(3), jax.random.PRNGKey(4)):
        for shape in [(), (5,), (4, 7), (20011,)]:
            for draw in draws:
                ref = np.asarray(draw(key, shape))
                got = np.asarray(jax.jit(lambda k: draw(rs._fast_key(k), shape))(key))
                np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    # under vmap over keys too
    keys = jax.random.split(jax.random.key(5), 4)
    ref = jax.vmap(lambda k: jax.random.normal(k, (9,)))(keys)
    got = jax.vmap(lambda k: jax.random.normal(rs._fast_key(k), (9,)))(keys)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # other implementations and batches of keys pass through unchanged
    rbg = jax.random.key(0, impl="rbg")
    assert rs._fast_key(rbg) is rbg and rs._fast_key(keys) is keys
