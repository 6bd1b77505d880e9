"""The LLM particle filter on a tiny random Qwen2 with controlled rewards (no hub).

Compilations are the cost here, so every test shares one of a few static configurations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smcjax.core import build_step
from smcjax.core import init as smc_init
from smcjax.llm.its import (
    PFOptions,
    _tables,
    format_prompt,
    llm_feynman_kac,
    particle_filter,
    particle_filter_batch,
)
from smcjax.llm.rewards import Reward, step_window

HI, LO = 0.8, 0.2
QUESTION = "What is 7 times 8?"
OPTS = dict(max_steps=2, step_cap=4, max_new_tokens=8, aggregation="last")


def parity_reward() -> Reward:
    """Favours steps whose token ids have an even sum: s = 0.8, else s = 0.2.

    (A token-class reward: with a random tiny model a single token is too rare or too
    common to split the particles; the parity of the sum splits them about evenly.)
    """

    def step(params, state, inp, spec):
        toks, valid = step_window(inp.tokens, inp.start, inp.end, spec.step_cap)
        total = jnp.sum(jnp.where(valid, toks, 0), axis=1)
        return state, jnp.where(total % 2 == 0, HI, LO)

    return Reward("parity", None, lambda q: None, lambda p, pr, n, spec: None, step)


PARITY = parity_reward()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from llm_fixtures import make_checkpoint

    from smcjax.llm import load

    return load(make_checkpoint(tmp_path_factory.mktemp("tiny_pf"), seed=3))


@pytest.fixture(scope="module")
def single(lm):
    return particle_filter(jax.random.key(7), lm, PARITY, QUESTION, 8, **OPTS)


# ----------------------------------------------------------------- basic run


def test_caps_end_every_run_and_result_fields(lm, single):
    r = single
    plen = len(format_prompt(lm.tokenizer, QUESTION))
    assert r.finished.all()
    assert len(r.texts) == 8 and len(r.answers) == 8
    assert r.log_weights.shape == (8,)
    np.testing.assert_allclose(np.exp(r.log_weights).sum(), 1.0, rtol=1e-5)
    for i in range(8):
        k = len(r.steps[i])
        assert 1 <= k <= OPTS["max_steps"]
        ends = np.concatenate([[plen], r.step_ends[i, :k]])
        assert (np.diff(ends) <= OPTS["step_cap"]).all() and (np.diff(ends) >= 1).all()
        assert r.lengths[i] <= plen + OPTS["max_new_tokens"]
    # budget: the tokens generated are the tokens in the buffers' solution parts
    assert r.tokens_generated == int(r.tokens_per_step.sum()) > 0
    assert r.ancestors.shape[1] == 8 and r.ess.shape == r.resampled.shape
    assert r.answer == r.answers[r.selected]
    assert r.selected == int(np.argmax(r.rewards))
    assert r.wall_time > 0


def test_same_key_same_texts(lm, single):
    again = particle_filter(jax.random.key(7), lm, PARITY, QUESTION, 8, **OPTS)
    assert again.texts == single.texts
    assert again.compile_time == 0.0  # the compiled program is reused
    other = particle_filter(jax.random.key(8), lm, PARITY, QUESTION, 8, **OPTS)
    assert other.texts != single.texts


def test_bad_options_raise(lm):
    with pytest.raises(ValueError, match="aggregation"):
        particle_filter(jax.random.key(0), lm, PARITY, QUESTION, 4, aggregation="avg")
    with pytest.raises(ValueError, match="weights"):
        particle_filter(jax.random.key(0), lm, PARITY, QUESTION, 4, weights="smc")
    with pytest.raises(ValueError, match="resampling"):
        particle_filter(jax.random.key(0), lm, PARITY, QUESTION, 4, resampling="x")
    with pytest.raises(TypeError, match="unknown option"):
        particle_filter(jax.random.key(0), lm, PARITY, QUESTION, 4, beam=3)
    with pytest.raises(ValueError, match="num_particles"):
        particle_filter(jax.random.key(0), lm, PARITY, QUESTION, 0)


# ------------------------------------------------- resampling follows the weights

REPS = 48


def _first_step_even(r, plen):
    """Whether each final particle's first step (its step-1 ancestor's) is 'even'."""
    return np.array(
        [
            r.tokens[i, plen : r.step_ends[i, 0]].sum() % 2 == 0
            for i in range(len(r.texts))
        ]
    )


@pytest.mark.parametrize(
    "resampling", ["multinomial", "stratified", "systematic", "residual"]
)
def test_resampling_concentrates_at_the_rate_the_weights_imply(lm, resampling):
    """Offspring of 'even' step-1 particles: E[count] = N·Σ_{even} W_1 (unbiased).

    W_1 = softmax(logit(s)) with s = 0.8 / 0.2, so each weight is checked exactly; the
    counts are compared to N·p over REPS replicates with the multinomial variance
    N·p(1-p), an upper bound for the other schemes: |z| < 4.5.
    """
    n = 8
    out = particle_filter_batch(
        jax.random.key(11),
        lm,
        PARITY,
        [QUESTION] * REPS,
        n,
        resampling=resampling,
        **OPTS,
    )
    plen = len(format_prompt(lm.tokenizer, QUESTION))
    ell_hi, ell_lo = np.log(HI / (1 - HI)), np.log(LO / (1 - LO))
    dev, var, checked = 0.0, 0.0, 0
    for r in out:
        assert r.ancestors.shape[0] == 3  # prompt, step 1, step 2
        lw1, anc2 = r.weight_history[1], r.ancestors[2]
        # every final particle carries its step-1 ancestor's first token
        even_anc = _first_step_even(r, plen)
        want = np.where(even_anc, ell_hi, ell_lo)
        got_logits = lw1[anc2]
        # logit differences between any two ancestors equal logit(s_i) - logit(s_j)
        np.testing.assert_allclose(
            got_logits[:, None] - got_logits[None, :],
            want[:, None] - want[None, :],
            atol=1e-4,
        )
        # weight of the "even" group among the step-1 particles (the larger logit)
        if np.ptp(lw1) > 1e-3:
            np.testing.assert_allclose(np.ptp(lw1), ell_hi - ell_lo, atol=1e-4)
            p = float(np.exp(lw1[lw1 > lw1.min() + 1e-3]).sum())
        else:  # one group only: every descendant tells which
            assert even_anc.all() or not even_anc.any()
            p = float(even_anc.all())
        count = int(even_anc.sum())
        dev += count - n * p
        var += n * p * (1 - p)
        checked += 0 < p < 1
    assert checked > REPS // 2
    z = dev / np.sqrt(var)
    assert abs(z) < 4.5, z


def test_vmap_over_questions_equals_one_at_a_time(lm):
    qs = [QUESTION] * REPS
    qs[1] = "Let x be 3. Then x + 30 = ?"
    batch = particle_filter_batch(jax.random.key(5), lm, PARITY, qs, 8, **OPTS)
    keys = jax.random.split(jax.random.key(5), REPS)
    for q in (0, 1):
        one = particle_filter(keys[q], lm, PARITY, qs[q], 8, **OPTS)
        assert one.texts == batch[q].texts
        np.testing.assert_allclose(one.log_weights, batch[q].log_weights, atol=1e-5)
        np.testing.assert_array_equal(one.ancestors, batch[q].ancestors)


# ------------------------------------------------------- proper Feynman–Kac option


def test_fk_weights_telescope_to_the_final_reward(lm):
    """weights='fk' without resampling: W_T ∝ r_T and Ẑ = mean(r_T) exactly."""
    r = particle_filter(
        jax.random.key(2),
        lm,
        PARITY,
        QUESTION,
        8,
        weights="fk",
        ess_threshold=0.0,
        max_steps=2,
        step_cap=4,
        max_new_tokens=8,
        aggregation="prod",
    )
    assert not r.resampled.any()
    log_r = np.log(r.rewards)
    want = log_r - np.log(np.exp(log_r).sum())
    np.testing.assert_allclose(r.log_weights, want, atol=1e-5)
    np.testing.assert_allclose(r.log_evidence, np.log(np.mean(r.rewards)), atol=1e-5)
    # prod aggregation: r = Π s_k over each particle's own steps
    for i in range(8):
        np.testing.assert_allclose(r.rewards[i], np.prod(r.step_scores[i]), rtol=1e-5)


# ------------------------------------- KV caches move with particles; finished stay


def test_resampled_kv_cache_continues_like_a_fresh_run_and_finished_stay(lm):
    """After resampling, every particle's cache gives the logits of its own tokens.

    Many EOS ids make particles finish at different steps; a finished particle's
    tokens, length and reward are copied unchanged through later steps.
    """
    n = 8
    tok = lm.tokenizer
    ids = np.asarray(format_prompt(tok, QUESTION), np.int32)
    opts = PFOptions(max_steps=3, step_cap=4, max_new_tokens=12, aggregation="last")
    eos = jnp.arange(5, lm.config.vocab_size, 9, dtype=jnp.int32)  # ~11% of tokens

    @jax.jit
    def run(key, lm_):
        model = llm_feynman_kac(
            lm_,
            PARITY,
            None,
            jnp.asarray(ids),
            jnp.int32(len(ids)),
            None,
            opts,
            _tables(lm),
            eos,
        )
        step = build_step(model, resampling="multinomial", ess_threshold=1.0)
        k0, k1, k2, k3 = jax.random.split(key, 4)
        s0, _ = smc_init(k0, model, n)
        s1, _ = step(k1, s0)
        s2, i2 = step(k2, s1)
        s3, i3 = step(k3, s2)
        return s1.particles, s2.particles, i2.ancestors, s3.particles, i3.ancestors

    x1, x2, a2, x3, a3 = run(jax.random.key(4), lm)
    assert not np.array_equal(
        np.asarray(a2), np.arange(n)
    )  # resampling moved particles
    for x in (x2, x3):
        ds = x.decode
        for i in range(n):
            length = int(ds.lengths[i])
            fresh = lm.logits(np.asarray(ds.tokens[i, :length])[None])[0, -1]
            np.testing.assert_allclose(ds.logits[i], fresh, rtol=2e-4, atol=2e-4)
    saw_finished = 0
    for prev, cur, anc in ((x1, x2, a2), (x2, x3, a3)):
        for i in range(n):
            a = int(anc[i])
            la = int(prev.decode.lengths[a])
            # the history of the ancestor is the prefix of the child
            np.testing.assert_array_equal(
                cur.decode.tokens[i, :la], prev.decode.tokens[a, :la]
            )
            if bool(prev.finished[a]):
                saw_finished += 1
                assert int(cur.decode.lengths[i]) == la
                assert bool(cur.finished[i])
                np.testing.assert_array_equal(
                    cur.decode.tokens[i], prev.decode.tokens[a]
                )
                assert float(cur.log_reward[i]) == float(prev.log_reward[a])
                assert int(cur.num_steps[i]) == int(prev.num_steps[a])
    assert saw_finished > 0


def test_beam_search_keeps_the_top_particles(lm):
    from smcjax.llm.its import beam_search

    r = beam_search(jax.random.key(9), lm, PARITY, QUESTION, 8, beam_width=4, **OPTS)
    t = 2  # ancestors of step 2 are the 2 best step-1 particles, 4 copies each
    top = np.argsort(-r.weight_history[t - 1], kind="stable")[:2]
    np.testing.assert_array_equal(np.sort(r.ancestors[t]), np.sort(np.repeat(top, 4)))
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(jax.random.key(9), lm, PARITY, QUESTION, 8, beam_width=16)


# ------------------------------------------------------- potentials (no LLM needed)


def _potential(weights, log_r, t, log_r_prev=None, **kw):
    from smcjax.llm.its import LLMParticles

    opts = PFOptions(weights=weights, max_steps=10, **kw)
    model = llm_feynman_kac(
        None,
        PARITY,
        None,
        jnp.zeros(4, jnp.int32),
        jnp.int32(4),
        None,
        opts,
        (None, None),
        jnp.zeros((0,), jnp.int32),
    )

    def x(lr):
        return LLMParticles(
            None, None, None, None, None, jnp.asarray(lr), None, None, None
        )

    prev = None if log_r_prev is None else x(log_r_prev)
    return np.asarray(model.log_potential(t, prev, x(log_r)))


def test_paper_fk_and_entropic_potentials():
    r = np.array([0.999, 0.01, 0.02, 0.05, 0.01, 0.03], np.float32)
    ell = np.log(r / (1 - r))
    lr = np.log(r)
    # paper: logit / softmax temperature
    np.testing.assert_allclose(_potential("paper", lr, 1), ell, rtol=1e-4)
    np.testing.assert_allclose(
        _potential("paper", lr, 1, softmax_temperature=2.0), ell / 2, rtol=1e-4
    )
    # fk: log r_t - log r_{t-1}, and log r_0 at the first step
    prev = np.log(np.full(6, 0.5, np.float32))
    np.testing.assert_allclose(_potential("fk", lr, 2, prev), lr - prev, atol=1e-6)
    np.testing.assert_allclose(_potential("fk", lr, 1), lr, atol=1e-6)
    # entropic: ESS/N of softmax(ell) is tiny here -> tempered early, not late
    w = np.exp(ell - ell.max())
    ratio = w.sum() ** 2 / (w**2).sum() / 6
    assert ratio < 0.5
    tau = max(1.0, (1 - 1 / 10) / ratio)
    np.testing.assert_allclose(_potential("entropic", lr, 1), ell / tau, rtol=1e-4)
    np.testing.assert_allclose(_potential("entropic", lr, 6), ell, rtol=1e-4)
    flat = np.log(np.full(6, 0.4, np.float32))  # ESS = N: never tempered
    np.testing.assert_allclose(
        _potential("entropic", flat, 1), np.log(0.4 / 0.6), rtol=1e-4
    )
