"""Tests for smcjax.resampling: unbiasedness, exact laws, conditional laws, edge cases.

Statistical checks average over R vmapped keys (fixed seeds) and compare with the truth
within 4 Monte Carlo standard errors estimated from the replicates (plus 1/R slack for
quantities that are deterministic up to float rounding).
"""

from __future__ import annotations

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
R = 4000  # replicates for statistical checks


def _weights(n: int, seed: int, zeros: int = 1) -> np.ndarray:
    """Dirichlet(0.7) weights in float64 with ``zeros`` exact zeros."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(n, 0.7))
    if zeros:
        w[rng.choice(n, zeros, replace=False)] = 0.0
        w /= w.sum()
    return w


def _log(w: np.ndarray) -> jax.Array:
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(w), jnp.float32)


def _counts(anc: jax.Array, n: int) -> np.ndarray:
    return np.asarray(jax.vmap(lambda a: jnp.bincount(a, length=n))(anc))


def _assert_mean(samples: np.ndarray, truth: np.ndarray, what: str) -> None:
    samples = np.asarray(samples, np.float64)
    mu = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    tol = 4 * se + 1.0 / samples.shape[0]
    bad = np.abs(mu - truth) > tol
    assert not bad.any(), (
        f"{what}: mean {mu[bad]} vs truth {truth[bad]} (tol {tol[bad]})"
    )


def _keys(seed: int, r: int = R) -> jax.Array:
    return jax.random.split(jax.random.key(seed), r)


# --------------------------------------------------------------------------------------
# Conditional resamplers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
@pytest.mark.parametrize(("n", "m"), [(6, 6), (6, 9), (6, 4)])
def test_conditional_pins_reference(name, n, m):
    fn = CONDITIONAL[name]
    w = _weights(n, 1, zeros=1)
    lw = _log(w)
    keys = _keys(2, 512)
    pinned = jax.random.randint(jax.random.key(3), (512,), 0, min(n, m))
    anc = jax.jit(jax.vmap(lambda k, p: fn(k, lw, p, m)))(keys, pinned)
    assert anc.dtype == jnp.int32 and anc.shape == (512, m)
    a, p = np.asarray(anc), np.asarray(pinned)
    assert (a[np.arange(512), p] == p).all()
    assert ((a >= 0) & (a < n)).all()
    # Non-pinned slots never select a zero-weight particle (the pinned one may be one).
    others = np.ones_like(a, bool)
    others[np.arange(512), p] = False
    assert (w[a[others]] > 0).all()


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
@pytest.mark.parametrize(("n", "m"), [(7, 7), (7, 10), (7, 5)])
def test_conditional_marginal_counts_unbiased(name, n, m):
    """pinned ~ W (restricted to slots < M) => E[counts] = M W (unconditional law)."""
    fn = CONDITIONAL[name]
    w = _weights(n, 4, zeros=1)
    if m < n:  # the reference must fit in a slot: put all mass on indices < M
        w[m:] = 0.0
        w /= w.sum()
    lw = _log(w)
    keys = _keys(5)

    def draw(key):
        k_pin, k_res = jax.random.split(key)
        pinned = jax.random.categorical(k_pin, lw)
        return fn(k_res, lw, pinned, m)

    counts = _counts(jax.jit(jax.vmap(draw))(keys), n)
    _assert_mean(counts, m * w, f"conditional_{name} marginal counts")
    if name == "multinomial":  # exactly Multinomial(M, W): check the variance too
        _assert_var_multinomial(counts, m, w)


def _assert_var_multinomial(counts: np.ndarray, m: int, w: np.ndarray) -> None:
    c = counts.astype(np.float64)
    dev2 = (c - c.mean(0)) ** 2
    _assert_mean(dev2 * len(c) / (len(c) - 1), m * w * (1 - w), "multinomial variance")


def test_conditional_multinomial_law_of_others():
    """Fixed pinned p: the other M-1 slots are i.i.d. Categorical(W)."""
    n, m, p = 6, 8, 2
    w = _weights(n, 6, zeros=1)
    lw = _log(w)
    anc = np.asarray(
        jax.jit(jax.vmap(lambda k: rs.conditional_multinomial(k, lw, p, m)))(_keys(7))
    )
    assert (anc[:, p] == p).all()
    others = np.delete(anc, p, axis=1)
    counts = np.stack([(others == i).sum(1) for i in range(n)], 1)
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
@pytest.mark.parametrize(("n", "m", "p"), [(5, 5, 3), (5, 7, 1)])
def test_conditional_inverse_cdf_law_per_slot(name, n, m, p):
    fn = CONDITIONAL[name]
    w = _weights(n, 8, zeros=0)
    lw = _log(w)
    anc = np.asarray(jax.jit(jax.vmap(lambda k: fn(k, lw, p, m)))(_keys(9)))
    truth = _conditional_slot_law(w, m, p, name == "stratified")
    for q in range(m):
        onehot = (anc[:, q][:, None] == np.arange(n)).astype(np.float64)
        _assert_mean(onehot, truth[q], f"conditional_{name} slot {q}")


def test_conditional_systematic_counts_are_systematic():
    """With pinned ~ W every count is floor or ceil of M W (systematic's support)."""
    n, m = 9, 13
    w = _weights(n, 10, zeros=2)
    lw = _log(w)

    def draw(key):
        k1, k2 = jax.random.split(key)
        return rs.conditional_systematic(k2, lw, jax.random.categorical(k1, lw), m)

    counts = _counts(jax.jit(jax.vmap(draw))(_keys(11, 1000)), n)
    assert (counts >= np.floor(m * w - 1e-5)).all()
    assert (counts <= np.ceil(m * w + 1e-5)).all()


def test_conditional_edge_cases():
    lw = jnp.array([-jnp.inf, 0.0, -jnp.inf, jnp.nan])
    for fn in CONDITIONAL.values():
        a = np.asarray(jax.vmap(lambda k, fn=fn: fn(k, lw, 2))(_keys(12, 64)))
        assert (a[:, 2] == 2).all()
        assert (np.delete(a, 2, axis=1) == 1).all()
        # all-zero weights: uniform fallback, pinned still kept
        b = np.asarray(fn(jax.random.key(0), jnp.full(5, -jnp.inf), 4, 3 + 4))
        assert b[4] == 4 and ((b >= 0) & (b < 5)).all()
        # M = 1
        assert np.asarray(fn(jax.random.key(1), lw, 0, 1)).tolist() == [0]


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
@pytest.mark.parametrize(("n", "m"), [(8, 8), (8, 13), (8, 5), (40, 40)])
def test_counts_unbiased(name, n, m):
    fn = SCHEMES[name]
    w = _weights(n, 20 + n + m, zeros=2)
    lw = _log(w)
    anc = jax.jit(jax.vmap(lambda k: fn(k, lw, m)))(_keys(21))
    assert anc.dtype == jnp.int32 and anc.shape == (R, m)
    a = np.asarray(anc)
    assert ((a >= 0) & (a < n)).all() and (w[a] > 0).all()
    assert (np.diff(a, axis=1) >= 0).all()  # documented: sorted output
    counts = _counts(anc, n)
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


def test_fast_inverse_cdf_matches_searchsorted_reference():
    """The O(N) rank/merge design equals F^{-1}(u) computed with searchsorted."""
    n, m = 300, 257
    w = _weights(n, 30, zeros=20)
    lw = _log(w)
    c = np.cumsum(w)
    keys = _keys(31, 200)
    for name in ("systematic", "stratified"):
        fn = SCHEMES[name]
        got = np.asarray(jax.vmap(lambda k, fn=fn: fn(k, lw, m))(keys))
        shape = () if name == "systematic" else (m,)
        u = np.asarray(jax.vmap(lambda k, s=shape: jax.random.uniform(k, s))(keys))
        pts = (np.arange(m) + (u[:, None] if u.ndim == 1 else u)) / m
        ref = np.minimum(np.searchsorted(c, pts, side="right"), n - 1)
        assert np.mean(got != ref) < 1e-3, name


def test_multinomial_matches_categorical_frequencies_large_n():
    """Guide-table merge on a large, very uneven N: counts unbiased, variance exact."""
    n, m = 3000, 2000
    rng = np.random.default_rng(32)
    w = rng.pareto(1.0, n) + 1e-3
    w[rng.choice(n, 300, replace=False)] = 0.0
    w /= w.sum()
    lw = _log(w)
    counts = _counts(
        jax.jit(jax.vmap(lambda k: rs.multinomial(k, lw, m)))(_keys(33, 1000)), n
    )
    top = np.argsort(w)[-20:]
    _assert_mean(counts[:, top], m * w[top], "multinomial large-N counts")
    _assert_var_multinomial(counts[:, top], m, w[top])
    assert (counts[:, w == 0] == 0).all()


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_edge_cases(name):
    fn = jax.jit(SCHEMES[name], static_argnums=2)
    key = jax.random.key(40)
    ninf = -jnp.inf
    # all -inf but one
    for m in (6, 11, 2):
        a = np.asarray(fn(key, jnp.array([ninf, ninf, 3.0, ninf, ninf, ninf]), m))
        assert (a == 2).all()
    # NaN entries are weight zero
    a = np.asarray(fn(key, jnp.array([jnp.nan, 0.0, jnp.nan, 0.0]), 50))
    assert set(a.tolist()) <= {1, 3}
    # +inf entries share the mass
    a = np.asarray(fn(key, jnp.array([1e30, jnp.inf, 0.0, jnp.inf]), 40))
    assert set(a.tolist()) <= {1, 3} and len(set(a.tolist())) == 2
    # huge and tiny magnitudes
    a = np.asarray(fn(key, jnp.array([-3e38, 3e38, 3e38, -jnp.inf, 1e30]), 40))
    assert set(a.tolist()) <= {1, 2}
    a = np.asarray(fn(key, jnp.array([-1e4, -1e4 - 1e3, ninf, -1e4]), 100))
    assert set(a.tolist()) <= {0, 3}
    # N = 1
    assert np.asarray(fn(key, jnp.array([ninf]), 3)).tolist() == [0, 0, 0]
    assert np.asarray(fn(key, jnp.array([0.5]), 1)).tolist() == [0]
    # integer log-weights are accepted
    assert fn(key, jnp.array([0, 0, 0]), 3).dtype == jnp.int32


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("bad", [-jnp.inf, jnp.nan])
def test_all_zero_weights_fallback_is_uniform(name, bad):
    n, m = 5, 7
    lw = jnp.full(n, bad)
    assert float(rs.ess(lw)) == 0.0
    _, log_sum = rs.log_normalize(lw)
    assert float(log_sum) == -np.inf
    np.testing.assert_allclose(np.asarray(rs.normalize(lw)), np.full(n, 1 / n), 1e-6)
    anc = jax.jit(jax.vmap(lambda k: SCHEMES[name](k, lw, m)))(_keys(41, 2000))
    a = np.asarray(anc)
    assert ((a >= 0) & (a < n)).all()
    _assert_mean(_counts(anc, n), np.full(n, m / n), f"{name} fallback")


def test_float32_normalised_weights_summing_below_one():
    """Weights normalised in float32 whose sum is < 1: the last particle is selectable
    and no index reaches N (the classic searchsorted overflow)."""
    n = 100_003
    w = np.full(n, 1.0 / n, np.float32)
    w[-1] = 0.3
    w = (w / w.sum(dtype=np.float32)).astype(np.float32)
    assert np.cumsum(w, dtype=np.float32)[-1] < 1.0
    lw = jnp.log(jnp.asarray(w))
    keys = _keys(42, 64)
    for name, fn in SCHEMES.items():
        a = np.asarray(jax.jit(jax.vmap(lambda k, fn=fn: fn(k, lw)))(keys))
        assert a.min() >= 0 and a.max() == n - 1, name
        frac = (a == n - 1).mean()
        assert abs(frac - w[-1]) < 0.01, (name, frac)


def test_zero_weights_at_block_boundaries_never_selected():
    """Zeros around every block boundary of the blocked prefix sum, tiny weights."""
    n = 4099
    rng = np.random.default_rng(43)
    w = rng.uniform(size=n) * np.exp(-rng.uniform(0, 60, n))
    idx = np.arange(n)
    w[(idx % 16 == 0) | (idx % 16 == 15) | (idx % 256 < 20)] = 0.0
    lw = _log(w / w.sum())
    keys = _keys(44, 200)
    for name, fn in {**SCHEMES}.items():
        a = np.asarray(jax.jit(jax.vmap(lambda k, fn=fn: fn(k, lw, 5000)))(keys))
        assert (w[a] > 0).all(), name
    for name, fn in CONDITIONAL.items():
        a = np.asarray(jax.jit(jax.vmap(lambda k, fn=fn: fn(k, lw, 1, n)))(keys))
        assert (w[np.delete(a, 1, axis=1)] > 0).all(), name


def test_ess_and_normalize():
    lw = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4])) + 1000.0
    w = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(float(rs.ess(lw)), 1 / np.sum(w**2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rs.normalize(lw)), w, rtol=1e-5)
    _, log_sum = rs.log_normalize(lw)
    np.testing.assert_allclose(float(log_sum), 1000.0, rtol=1e-6)
    assert float(rs.ess(jnp.array([0.0, -jnp.inf, jnp.nan]))) == pytest.approx(1.0)
    assert float(rs.ess(jnp.array([0.0, jnp.inf, jnp.inf]))) == pytest.approx(2.0)


def test_cumsum_blocked():
    rng = np.random.default_rng(45)
    for n in (1, 5, 64, 65, 1000, 100_003):
        x = rng.uniform(size=n).astype(np.float32)
        got = np.asarray(rs._cumsum(jnp.asarray(x)))
        np.testing.assert_allclose(got, np.cumsum(x, dtype=np.float64), rtol=2e-6)
        k = rng.integers(0, 3, n)
        assert (np.asarray(rs._int_cumsum(jnp.asarray(k), 3 * n)) == np.cumsum(k)).all()


def test_x64_inputs():
    from jax.experimental import enable_x64

    with enable_x64():
        lw = jnp.log(jnp.asarray(_weights(9, 46, zeros=1), jnp.float64))
        for fn in SCHEMES.values():
            a = fn(jax.random.key(0), lw, 12)
            assert a.dtype == jnp.int32 and a.shape == (12,)
        a = rs.conditional_systematic(jax.random.key(0), lw, 3)
        assert a.dtype == jnp.int32 and int(a[3]) == 3


# --------------------------------------------------------------------------------------
# API: jit/vmap, determinism, errors, registry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_jit_vmap_determinism(name):
    fn = SCHEMES[name]
    lw = _log(_weights(10, 50))
    keys = _keys(51, 8)
    batched = jax.jit(jax.vmap(lambda k: fn(k, lw, 12)))(keys)
    looped = jnp.stack([fn(k, lw, 12) for k in keys])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(looped))
    np.testing.assert_array_equal(
        np.asarray(fn(keys[0], lw)), np.asarray(fn(keys[0], lw))
    )
    # legacy uint32 keys work too
    assert fn(jax.random.PRNGKey(0), lw).shape == (10,)
    # vmap over weights as well
    lws = jnp.stack([lw, lw[::-1]])
    assert jax.vmap(fn, in_axes=(None, 0))(keys[0], lws).shape == (2, 10)


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
# Property tests (fixed shapes so that each function compiles once)
# --------------------------------------------------------------------------------------

_N_PROP = 13
_JITTED = {
    (name, m): jax.jit(lambda k, lw, fn=fn, m=m: fn(k, lw, m))
    for name, fn in SCHEMES.items()
    for m in (4, 13, 21)
}
_JITTED_COND = {
    name: jax.jit(lambda k, lw, p, fn=fn: fn(k, lw, p, 9))
    for name, fn in CONDITIONAL.items()
}

_entry = st.one_of(
    st.floats(-1e38, 1e38, width=32),
    st.floats(-50, 5, width=32),
    st.sampled_from([-np.inf, np.inf, np.nan, -3e38, 3e38]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(_entry, min_size=_N_PROP, max_size=_N_PROP),
    seed=st.integers(0, 2**31 - 1),
    pinned=st.integers(0, 8),
)
def test_property_valid_indices(values, seed, pinned):
    lw = np.asarray(values, np.float32)
    clean = np.where(np.isnan(lw), -np.inf, lw)
    if np.isposinf(clean).any():
        support = np.isposinf(clean)
    elif np.isfinite(clean).any():
        # positive weight in float32 after the max shift
        with np.errstate(over="ignore", invalid="ignore"):
            support = np.exp((clean - clean.max()).astype(np.float32)) > 0
    else:
        support = np.ones(_N_PROP, bool)
    key = jax.random.key(seed)
    for (_, m), fn in _JITTED.items():
        a = np.asarray(fn(key, jnp.asarray(lw)))
        assert a.shape == (m,) and a.dtype == np.int32
        assert support[a].all()
    for fn in _JITTED_COND.values():
        a = np.asarray(fn(key, jnp.asarray(lw), pinned))
        assert a[pinned] == pinned and ((a >= 0) & (a < _N_PROP)).all()
        assert support[np.delete(a, pinned)].all()
