"""The LLM particle filter on a tiny random Qwen2 with controlled rewards (no hub).

Compilations are the cost here, so every test shares one of a few static configurations.
"""

import itertools
from contextlib import nullcontext

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


def test_token_tables_first_built_inside_jit_are_concrete(lm):
    """The stop/pattern tables cached on ``lm`` must never be tracers.

    Regression: tables first built inside a user's ``jax.jit`` were cached as
    tracers and broke every later program ("compiled for 27 inputs but called
    with 20").
    """
    lm.__dict__.pop("_stop_tables", None)
    lm.__dict__.pop("_pattern_tables", None)

    @jax.jit
    def f(x):
        stop, boxed = _tables(lm)
        return x + stop.transitions.sum() + boxed.transitions.sum()

    f(jnp.int32(0))
    for table in _tables(lm):
        assert not isinstance(table.transitions, jax.core.Tracer)
        assert not isinstance(table.lengths, jax.core.Tracer)
    r = particle_filter(jax.random.key(1), lm, PARITY, QUESTION, 4, **OPTS)
    assert r.tokens_generated > 0


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
        nones = LLMParticles(*([None] * len(LLMParticles._fields)))
        return nones._replace(log_reward=jnp.asarray(lr))

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


# ------------------------------------------- speculation: idle rows start next step

SPEC_OPTS = dict(
    max_steps=3, step_cap=8, max_new_tokens=24, aggregation="last", step_delimiter="e"
)


def test_speculative_tokens_follow_the_lm_and_steps_end_at_the_delimiter(lm):
    """Idle rows speculate; every kept token was sampled from its exact conditional.

    Steps end at ``"e"`` (in ~10 % of the tiny vocabulary), so step lengths vary and
    rows that finish early speculate. After each resampling step: the recorded
    log-probability of EVERY token in the buffer (speculative ones included) equals
    a fresh forward pass over the particle's own tokens; the boundary logits are
    those of the scored prefix; each scored step ends at its first delimiter, EOS or
    the cap; a copy keeps its ancestor's scored steps, and the first copy keeps the
    speculative tokens too.
    """
    kept, _ = _check_steps_exact(lm, PFOptions(**SPEC_OPTS, speculate=True))
    assert kept > 0  # speculation happened and was continued


@pytest.mark.parametrize("speculate", [False, True])
def test_compacted_batch_keeps_every_token_exact(lm, speculate):
    """``compact=True``: the same exactness checks as above, on a shrinking batch.

    The rows still generating are gathered into batches of 4, 2, 1 as the others end
    their step (KV caches, logits, automaton states), and scattered back. Every
    token's recorded log-probability must still equal a fresh forward pass over the
    particle's own tokens, and every step must end at its first delimiter, EOS or the
    cap. Without speculation the batch must actually have shrunk (fewer rows computed
    than passes × N); with it, speculating rows count as generating, so it shrinks only
    as rows go idle, and the speculative tokens must still be continued.
    """
    opts = PFOptions(**SPEC_OPTS, speculate=speculate, compact=True)
    kept, shrunk = _check_steps_exact(lm, opts)
    assert kept > 0 if speculate else shrunk > 0


def _check_steps_exact(lm, opts: PFOptions) -> tuple[int, int]:
    """Three filter steps, 3 seeds: token log-probabilities and step ends exact.

    Returns (rows that kept speculative tokens, steps whose batch shrank).
    """
    n = 8
    tok = lm.tokenizer
    ids = np.asarray(format_prompt(tok, QUESTION), np.int32)
    plen = len(ids)
    tables = _tables(lm, "e")
    eos = jnp.asarray(lm.eos_ids, jnp.int32)

    @jax.jit
    def run(key, lm_):
        model = llm_feynman_kac(
            lm_,
            PARITY,
            None,
            jnp.asarray(ids),
            jnp.int32(plen),
            None,
            opts,
            tables,
            eos,
        )
        step = build_step(model, resampling="multinomial", ess_threshold=1.0)
        k0, k1, k2, k3 = jax.random.split(key, 4)
        s0, _ = smc_init(k0, model, n)
        s1, _ = step(k1, s0)
        s2, i2 = step(k2, s1)
        s3, i3 = step(k3, s2)
        return s1.particles, s2.particles, i2.ancestors, s3.particles, i3.ancestors

    trans = np.asarray(tables[0].transitions[0])
    target = int(tables[0].lengths[0])
    eos_set = set(int(e) for e in lm.eos_ids)
    kept = shrunk = 0
    for seed in range(3):
        x1, x2, a2, x3, a3 = run(jax.random.key(20 + seed), lm)
        for x in (x1, x2, x3):
            ds = x.decode
            for i in range(n):
                length = int(ds.lengths[i])
                row = np.asarray(ds.tokens[i, :length])
                fresh = np.asarray(lm.logits(row[None])[0])
                lsm = fresh - np.logaddexp.reduce(fresh, axis=-1, keepdims=True)
                want = lsm[np.arange(plen - 1, length - 1), row[plen:]]
                np.testing.assert_allclose(
                    np.asarray(ds.logprobs[i, plen:length]), want, atol=3e-4
                )
                np.testing.assert_allclose(ds.logits[i], fresh[-1], atol=3e-4)
                bnd = int(x.boundary[i])
                np.testing.assert_allclose(
                    x.boundary_logits[i], fresh[bnd - 1], atol=3e-4
                )
                ends = [plen] + [int(e) for e in x.step_ends[i, : int(x.num_steps[i])]]
                assert ends[-1] == bnd
                for a, b in itertools.pairwise(ends):
                    q, hits = 0, []
                    for j in range(a, b):
                        q = trans[q, row[j]]
                        hits.append(q == target)
                    ended = (
                        hits[-1] or (b - a == opts.step_cap) or row[b - 1] in eos_set
                    )
                    assert ended and not any(hits[:-1]), (a, b, hits)
        for prev, cur, anc in ((x1, x2, a2), (x2, x3, a3)):
            seen = set()
            for i in range(n):
                a = int(anc[i])
                bnd = int(prev.boundary[a])
                np.testing.assert_array_equal(
                    cur.decode.tokens[i, :bnd], prev.decode.tokens[a, :bnd]
                )
                if a not in seen and not bool(prev.finished[a]):
                    seen.add(a)
                    la = int(prev.decode.lengths[a])
                    np.testing.assert_array_equal(
                        cur.decode.tokens[i, :la], prev.decode.tokens[a, :la]
                    )
                    kept += la > bnd
        for x in (x1, x2, x3):
            shrunk += int(x.decode_rows[0]) < int(x.decode_iters[0]) * n
    return kept, shrunk


@pytest.mark.parametrize("option", ["speculate", "compact"])
def test_speculation_and_compaction_leave_the_step_law_unchanged(lm, option):
    """Same law of the second step with and without speculation (or compaction).

    REPS questions × 8 particles; the statistic per question is the mean length of
    the final particles' second step (finished particles count 0): a two-sample z
    test over questions, |z| < 4.5. (That speculative tokens are used at all, and
    that the batch shrinks, is checked by the tests above.)
    """
    opts = dict(SPEC_OPTS, max_steps=2)
    qs = [QUESTION] * REPS
    stats = {}
    for spec in (True, False):
        warns = option == "compact" and spec
        with pytest.warns(RuntimeWarning, match="compact") if warns else nullcontext():
            out = particle_filter_batch(
                jax.random.key(31 if spec else 32),
                lm,
                PARITY,
                qs,
                8,
                **{option: spec},
                **opts,
            )
        per_q = []
        for r in out:
            k = np.asarray([len(s) > 1 for s in r.steps])
            two = np.where(k, r.step_ends[:, 1] - r.step_ends[:, 0], 0)
            per_q.append(two.mean())
        stats[spec] = np.asarray(per_q)
    a, b = stats[True], stats[False]
    z = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert abs(z) < 4.5, (z, a.mean(), b.mean())


# ------------------------------------------------ particle Gibbs, parallel tempering


def test_conditional_sweep_replays_the_reference_in_slot_0(lm):
    """Slot 0 reproduces the reference exactly; forks of it continue correctly.

    A first sweep's final particles give a reference (drawn from the final weights);
    a conditional sweep must keep it in slot 0 (ancestor 0 at every step) with the
    same tokens, step ends, steps and reward, and every particle's buffers must be
    those of a fresh forward pass over its own tokens (forks included).
    """
    from smcjax.llm.its import _sweep, _take_reference

    n = 8
    ids = np.asarray(format_prompt(lm.tokenizer, QUESTION), np.int32)
    plen = len(ids)
    opts = PFOptions(**SPEC_OPTS, speculate=True)
    tables = _tables(lm, "e")
    eos = tuple(int(e) for e in lm.eos_ids)

    @jax.jit
    def run(key, lm_):
        kw = dict(reward=PARITY, num_particles=n, opts=opts, tables=tables, eos_ids=eos)
        args = (lm_, None, jnp.asarray(ids), jnp.int32(plen), None)
        k1, k2, k3 = jax.random.split(key, 3)
        _, st1 = _sweep(k1, *args, **kw)
        ref = _take_reference(k2, lm_, st1, opts)
        tr2, st2 = _sweep(k3, *args, reference=ref, **kw)
        return ref, tr2, st2.particles

    forked = 0
    for seed in range(2):
        ref, tr, x = run(jax.random.key(40 + seed), lm)
        k = int(ref.num_steps)
        length = int(ref.step_ends[k - 1])
        assert int(x.num_steps[0]) == k
        np.testing.assert_array_equal(x.step_ends[0, :k], ref.step_ends[:k])
        np.testing.assert_array_equal(x.decode.tokens[0, :length], ref.tokens[:length])
        assert int(x.decode.lengths[0]) == length
        np.testing.assert_allclose(x.log_reward[0], ref.log_reward, atol=1e-6)
        t_run = int(tr.num_iterations)
        anc = np.asarray(tr.ancestors[1:t_run])
        assert (anc[:, 0] == 0).all()
        forked += int((anc[:, 1:] == 0).sum())
        for i in range(n):
            li = int(x.decode.lengths[i])
            row = np.asarray(x.decode.tokens[i, :li])
            fresh = np.asarray(lm.logits(row[None])[0])
            lsm = fresh - np.logaddexp.reduce(fresh, axis=-1, keepdims=True)
            want = lsm[np.arange(plen - 1, li - 1), row[plen:]]
            np.testing.assert_allclose(
                np.asarray(x.decode.logprobs[i, plen:li]), want, atol=3e-4
            )
            np.testing.assert_allclose(x.decode.logits[i], fresh[-1], atol=3e-4)
        # the reference's step logits are those of its prefixes
        row = np.asarray(ref.tokens[:length])
        fresh = np.asarray(lm.logits(row[None])[0])
        for j in range(k):
            e = int(ref.step_ends[j])
            np.testing.assert_allclose(ref.step_logits[j], fresh[e - 1], atol=3e-4)
    assert forked > 0  # resampling forked the reference at least once


def test_swap_references_metropolis_ratio_and_permutation():
    """Eq. 4 on hand-made references: the probabilities and the swapped order."""
    from smcjax.llm.its import Reference, _swap_references

    m = 4
    log_r = jnp.log(jnp.asarray([0.9, 0.2, 0.6, 0.3], jnp.float32))
    taus = jnp.asarray([8.0, 4.0, 2.0, 1.0])
    refs = Reference(
        tokens=jnp.arange(m)[:, None] * jnp.ones((1, 3), jnp.int32),
        logprobs=jnp.zeros((m, 3)),
        proposal_logprobs=jnp.zeros((m, 3)),
        cache=(),
        step_ends=jnp.zeros((m, 2), jnp.int32),
        num_steps=jnp.arange(m),
        step_logits=jnp.zeros((m, 2, 5)),
        log_reward=log_r,
        active=jnp.ones((m,), bool),
    )
    ell = np.log(np.exp(log_r) / (1 - np.exp(log_r)))
    want = np.minimum(
        1.0, np.exp((ell[1:] - ell[:-1]) * (1 / taus[:-1] - 1 / taus[1:]))
    )
    swaps = np.zeros(m - 1)
    reps = 4000
    for parity in (0, 1):
        swap = jax.jit(
            jax.vmap(lambda k, p=parity: _swap_references(k, refs, taus, p, "paper"))
        )
        out, prob = swap(jax.random.split(jax.random.key(parity), reps))
        tried = np.arange(m - 1) % 2 == parity
        prob = np.asarray(prob)
        np.testing.assert_allclose(
            prob[:, tried], want[None, tried].repeat(reps, 0), rtol=1e-5
        )
        assert np.isnan(prob[:, ~tried]).all()
        order = np.asarray(out.num_steps)  # (reps, m): where each reference went
        np.testing.assert_array_equal(
            np.sort(order, axis=1), np.arange(m)[None].repeat(reps, 0)
        )
        np.testing.assert_array_equal(np.asarray(out.tokens[:, :, 0]), order)
        for k in np.flatnonzero(tried):
            swapped = order[:, k] == k + 1
            np.testing.assert_array_equal(order[swapped, k + 1], k)
            np.testing.assert_array_equal(order[~swapped, k], k)
            np.testing.assert_array_equal(order[~swapped, k + 1], k + 1)
            swaps[k] += swapped.sum()
    rate = swaps / reps
    se = np.sqrt(want * (1 - want) / reps) + 1e-9
    assert (np.abs(rate - want) < 4.5 * se + 1e-3).all(), (rate, want)


ONE_STEP = dict(
    max_steps=1, step_cap=4, max_new_tokens=4, aggregation="last", weights="fk"
)


def test_particle_gibbs_and_tempering_target_the_reward_tilted_lm(lm):
    """References are distributed as π(x) ∝ p_LM(x) r(x) (fk weights, τ = 1).

    One step whose reward is 0.8 for an even token sum, 0.2 otherwise: π(even) =
    0.8 p / (0.8 p + 0.2 (1 - p)) with p = P_LM(even), estimated from the fresh
    particles of first sweeps. The even fraction of the references of sweeps 2..K
    (particle Gibbs; and the target chain of parallel tempering) must match π(even):
    replicate runs are independent, so the z score uses their spread, |z| < 4.5.
    """
    from smcjax.llm.its import parallel_tempering, particle_gibbs

    reps, k_sweeps = 24, 5
    fresh, pg_even, pt_even, acc = [], [], [], []
    for r in range(reps):
        g = particle_gibbs(
            jax.random.key(100 + r), lm, PARITY, QUESTION, 4, k_sweeps, **ONE_STEP
        )
        pg_even.append(np.mean(np.isclose(g.reference_log_rewards[1:, 0], np.log(HI))))
        t = parallel_tempering(
            jax.random.key(500 + r),
            lm,
            PARITY,
            QUESTION,
            4,
            k_sweeps,
            temperatures=(3.0, 1.0),
            **ONE_STEP,
        )
        pt_even.append(np.mean(np.isclose(t.reference_log_rewards[1:, -1], np.log(HI))))
        acc.append(np.nanmean(t.swap_acceptance))
        # unweighted LM draws: a plain filter without resampling
        b = particle_filter(
            jax.random.key(900 + r),
            lm,
            PARITY,
            QUESTION,
            8,
            ess_threshold=0.0,
            **ONE_STEP,
        )
        fresh.append(np.mean(np.isclose(b.rewards, HI)))
    fresh = np.asarray(fresh)
    p = fresh.mean()
    assert 0.1 < p < 0.9
    pi = HI * p / (HI * p + LO * (1 - p))
    # delta method for the se of pi(p_hat)
    dpi = HI * LO / (HI * p + LO * (1 - p)) ** 2
    se_pi = dpi * fresh.std(ddof=1) / np.sqrt(reps)
    for name, x in (("pg", np.asarray(pg_even)), ("pt", np.asarray(pt_even))):
        z = (x.mean() - pi) / np.sqrt(x.var(ddof=1) / reps + se_pi**2)
        assert abs(z) < 4.5, (name, z, x.mean(), pi)
    assert 0.0 < np.mean(acc) <= 1.0
    # the result describes the last sweep of the target chain, and budgets add up
    assert t.result.log_weights.shape == (4,)
    assert t.tokens_per_sweep.shape == (k_sweeps, 2)
    assert t.tokens_generated == int(t.tokens_per_sweep.sum())
    assert t.answer == t.result.answer and t.texts == t.result.texts


def test_gibbs_bad_arguments(lm):
    from smcjax.llm.its import parallel_tempering, particle_gibbs

    with pytest.raises(ValueError, match="num_particles"):
        particle_gibbs(jax.random.key(0), lm, PARITY, QUESTION, 1)
    with pytest.raises(ValueError, match="num_iterations"):
        particle_gibbs(jax.random.key(0), lm, PARITY, QUESTION, 4, 0)
    with pytest.raises(ValueError, match="decreasing"):
        parallel_tempering(
            jax.random.key(0), lm, PARITY, QUESTION, 4, temperatures=(1.0, 2.0)
        )
    with pytest.raises(ValueError, match="conditional"):
        particle_gibbs(
            jax.random.key(0), lm, PARITY, QUESTION, 4, resampling=lambda k, w, m: w
        )
