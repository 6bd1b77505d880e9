"""Decoding: greedy parity with transformers, log-probs, samplers, stops, gathers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from llm_fixtures import load_torch, make_checkpoint, random_ids

import smcjax.llm as llm
from smcjax.llm import decoding as dec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llm_dec") / "qwen2", family="qwen2")


@pytest.fixture(scope="module")
def lm(ckpt):
    return llm.load(ckpt)


@jax.jit
def _greedy(model, state, max_new, stop=None, eos=()):
    return dec.decode(
        model,
        jax.random.key(0),
        state,
        max_new_tokens=max_new,
        temperature=0.0,
        stop=stop,
        eos_ids=eos,
    )


_prefill = jax.jit(dec.prefill, static_argnums=3)


def test_greedy_decode_matches_transformers_generate(ckpt, lm):
    ref = load_torch(ckpt)
    ref.generation_config.eos_token_id = None
    lengths = np.array([6, 11, 2])
    ids = random_ids(np.random.default_rng(0), (3, 11), lm.config.vocab_size)
    state, info = _greedy(lm, _prefill(lm, ids, lengths, 40), 24)
    np.testing.assert_array_equal(info.stop_reason, dec.MAX_NEW_TOKENS)
    np.testing.assert_array_equal(info.num_new_tokens, 24)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            out = ref.generate(
                torch.as_tensor(ids[b : b + 1, :n], dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=0,
            )
        np.testing.assert_array_equal(
            np.asarray(state.tokens[b, : n + 24]), out[0].numpy()
        )
        assert int(state.lengths[b]) == n + 24


def test_logprobs_are_raw_model_and_proposal(lm):
    """logprobs = log p under the model; proposal_logprobs = log q at temperature."""
    ids = random_ids(np.random.default_rng(1), (2, 5), lm.config.vocab_size)
    tau = 0.7
    state = dec.prefill(lm, ids, None, 20)
    state, info = jax.jit(
        lambda m, k, s: dec.decode(m, k, s, max_new_tokens=10, temperature=tau)
    )(lm, jax.random.key(3), state)
    toks = np.asarray(state.tokens[:, :15])
    logits = np.asarray(lm.logits(toks)).astype(np.float64)[:, 4:14]
    nxt = toks[:, 5:15]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    logq = logits / tau - np.logaddexp.reduce(logits / tau, axis=-1, keepdims=True)
    want_p = np.take_along_axis(logp, nxt[..., None], -1)[..., 0]
    want_q = np.take_along_axis(logq, nxt[..., None], -1)[..., 0]
    np.testing.assert_allclose(state.logprobs[:, 5:15], want_p, atol=2e-4)
    np.testing.assert_allclose(state.proposal_logprobs[:, 5:15], want_q, atol=2e-4)
    np.testing.assert_allclose(info.logprob, want_p.sum(-1), atol=1e-3)
    assert (np.asarray(state.logprobs[:, :5]) == 0).all()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampler_frequencies_match_the_target(top_p):
    """Empirical frequencies of 20000 draws within 5 binomial standard errors of q."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    tau, n = 0.8, 20000
    keys = jax.random.split(jax.random.key(0), n)
    toks, lp, lq = jax.vmap(lambda k: dec.sample_tokens(k, logits, tau, top_p))(keys)
    q = np.exp(np.asarray(logits[0], np.float64) / tau)
    q /= q.sum()
    if top_p < 1:
        order = np.argsort(-q)
        keep = np.cumsum(q[order]) - q[order] < top_p
        mask = np.zeros_like(q, bool)
        mask[order[keep]] = True
        q = np.where(mask, q, 0)
        q /= q.sum()
    freq = np.bincount(np.asarray(toks[:, 0]), minlength=6) / n
    se = np.sqrt(q * (1 - q) / n)
    assert (np.abs(freq - q) <= 5 * se + 1e-12).all(), (freq, q)
    got_q = np.exp(np.asarray(lq[:, 0]))
    np.testing.assert_allclose(got_q, q[np.asarray(toks[:, 0])], rtol=1e-4)
    p = np.exp(np.asarray(logits[0], np.float64))
    p /= p.sum()
    np.testing.assert_allclose(
        np.exp(np.asarray(lp[:, 0])), p[np.asarray(toks[:, 0])], rtol=1e-4
    )


@pytest.mark.parametrize("traced_tau", [False, True], ids=["static", "traced"])
def test_two_level_sampler_over_many_blocks(traced_tau):
    """A 1000-entry vocabulary (8 blocks of 128, the last one padded), every 7th entry
    at probability 0: per-token frequencies of 20000 independent rows within 5
    binomial standard errors of q, zero-probability entries never drawn, and the
    returned log p / log q equal to the float64 values of the drawn tokens."""
    rng = np.random.default_rng(0)
    v, n, tau = 1000, 20000, 1.3
    row = rng.normal(0.0, 1.5, v)
    row[::7] = -np.inf
    logits = jnp.broadcast_to(jnp.asarray(row, jnp.float32), (n, v))
    t = jnp.float32(tau) if traced_tau else tau
    toks, lp, lq = jax.jit(dec.sample_tokens)(jax.random.key(2), logits, t)
    toks = np.asarray(toks)
    p = np.exp(row - np.logaddexp.reduce(row))
    q = np.exp(row / tau - np.logaddexp.reduce(row / tau))
    assert (q[toks] > 0).all()
    freq = np.bincount(toks, minlength=v) / n
    se = np.sqrt(q * (1 - q) / n)
    assert (np.abs(freq - q) <= 5 * se + 1e-12).all()
    np.testing.assert_allclose(np.asarray(lp), np.log(p[toks]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lq), np.log(q[toks]), atol=2e-5)
    greedy = dec.sample_tokens(jax.random.key(2), logits[:2], 0.0)
    np.testing.assert_array_equal(greedy[0], np.argmax(row))
    np.testing.assert_allclose(greedy[1], np.log(p.max()), atol=2e-5)
    np.testing.assert_array_equal(greedy[2], 0.0)


def test_stop_automaton_on_token_texts():
    texts = ["a", "\n", "\n\n", ".\n\n", ".\n", "b\n\nc", "\n\n\n", "x\n"]
    table = dec._build_table(["\n\n"], texts)
    t = np.asarray(table.transitions[0])  # (2, V)
    # from "nothing matched": tokens containing "\n\n" complete the stop
    assert list(t[0]) == [0, 1, 2, 2, 1, 2, 2, 1]
    # after a trailing "\n": any token starting with "\n" completes it
    assert list(t[1]) == [0, 2, 2, 2, 1, 2, 2, 1]
    ids = dec.stop_table_from_ids([[5, 6], [7]], 9)
    tr = np.asarray(ids.transitions)
    assert tr.shape == (2, 2, 9) and list(ids.lengths) == [2, 1]
    assert (
        tr[0, 0, 5] == 1 and tr[0, 1, 6] == 2 and tr[0, 1, 5] == 1 and tr[0, 1, 4] == 0
    )
    assert tr[1, 0, 7] == 1


def test_stop_table_from_tokenizer_finds_double_newline(lm):
    tok = lm.tokenizer
    table = lm.stop_table("\n\n")
    tr = np.asarray(table.transitions[0])
    nl = tok.encode("\n", add_special_tokens=False)
    assert len(nl) == 1
    nn = tok.encode("\n\n", add_special_tokens=False)
    assert tr[1, nl[0]] == 2 and tr[0, nl[0]] == 1
    assert tr[0, nn[-1]] == 2  # "\n\n" is a single token of the tiny vocabulary
    assert len(nn) == 1


def test_stop_sequences_and_repeated_calls(lm):
    """Stop at the first occurrence of a 2-token sequence; the next call continues the
    same greedy trajectory; done/stopped rows do not change."""
    ids = random_ids(np.random.default_rng(4), (2, 6), lm.config.vocab_size)
    start = _prefill(lm, ids, np.array([6, 4]), 48)
    free, _ = _greedy(lm, start, 30)
    gen = np.asarray(free.tokens[0, 6:36])
    # the first occurrence of the pair (gen[3], gen[4]) ends at index i
    pair = (int(gen[3]), int(gen[4]))
    i = next(j for j in range(1, 30) if (gen[j - 1], gen[j]) == pair)
    stop = dec.stop_table_from_ids([pair], lm.config.vocab_size)
    s1, info = _greedy(lm, start, 30, stop)
    assert int(info.stop_reason[0]) == dec.STOP_SEQUENCE
    assert int(info.num_new_tokens[0]) == i + 1 and int(s1.lengths[0]) == 6 + i + 1
    assert not bool(s1.done[0])
    # continue (row 1 may or may not stop again); row 0 follows the free trajectory
    s2, _ = _greedy(lm, s1, 30 - (i + 1))
    np.testing.assert_array_equal(
        np.asarray(s2.tokens[0, :36]), np.asarray(free.tokens[0, :36])
    )
    np.testing.assert_allclose(s2.logits[0], free.logits[0], atol=1e-4)
    # EOS: make the 3rd generated token of row 0 an EOS id
    eos = jnp.asarray([int(gen[2])], jnp.int32)
    s3, info3 = _greedy(lm, start, 30, None, eos)
    k = int(np.argmax(gen == gen[2]))
    assert int(info3.stop_reason[0]) == dec.EOS and bool(s3.done[0])
    assert int(s3.lengths[0]) == 6 + k + 1
    # a done row never changes
    s4, info4 = _greedy(lm, s3, 5)
    assert (
        int(info4.stop_reason[0]) == dec.NOT_RUN and int(info4.num_new_tokens[0]) == 0
    )
    for a, b in zip(jax.tree.leaves(s3), jax.tree.leaves(s4), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])


def test_buffer_full_marks_done(lm):
    ids = random_ids(np.random.default_rng(5), (2, 4), lm.config.vocab_size)
    state, info = _greedy(lm, _prefill(lm, ids, np.array([4, 2]), 9), 100)
    np.testing.assert_array_equal(info.stop_reason, dec.BUFFER_FULL)
    np.testing.assert_array_equal(state.lengths, 9)
    assert bool(state.done.all())


def test_gather_between_calls_and_prompt_sharing(lm):
    """Resampling is a tree.map gather; shared prefill = prefill of repeated prompts."""
    prompt = random_ids(np.random.default_rng(6), (5,), lm.config.vocab_size)
    shared = dec.prefill_shared(lm, prompt, 3, 32)
    rep = dec.prefill(lm, np.tile(prompt, (3, 1)), None, 32)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(rep), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    step = jax.jit(
        lambda m, k, s: dec.decode(m, k, s, max_new_tokens=4, temperature=1.0)
    )
    s1, _ = step(lm, jax.random.key(1), shared)
    assert len({tuple(r) for r in np.asarray(s1.tokens[:, 5:9])}) > 1
    idx = jnp.asarray([2, 2, 0])
    g = jax.tree.map(lambda x: x[idx], s1)
    s2, _ = _greedy(lm, g, 5)
    np.testing.assert_array_equal(s2.tokens[0], s2.tokens[1])
    alone, _ = _greedy(lm, jax.tree.map(lambda x: x[2:3], s1), 5)
    np.testing.assert_array_equal(s2.tokens[0], alone.tokens[0])


def test_generate_text_with_chat_template_and_stop(lm):
    out = lm.generate(
        jax.random.key(0),
        ["What is 7 times 8?", "Solve 2y - 4 = 10."],
        max_new_tokens=12,
        temperature=0.9,
        stop="\n\n",
        apply_chat_template=True,
    )
    assert out.tokens.shape == (2, 12) and out.logprobs.shape == (2, 12)
    for i in range(2):
        n = int(out.lengths[i])
        assert 1 <= n <= 12
        assert (out.logprobs[i, :n] <= 0).all() and (out.logprobs[i, n:] == 0).all()
        if out.stop_reason[i] == dec.STOP_SEQUENCE:
            assert "\n\n" in out.texts[i] and "\n\n" not in lm.tokenizer.decode(
                out.tokens[i, : n - 1]
            )
        else:
            assert "\n\n" not in out.texts[i]


def test_decode_under_vmap_over_keys(lm):
    """Public drivers run under vmap over keys: each lane = its own decode call."""
    ids = random_ids(np.random.default_rng(7), (2, 4), lm.config.vocab_size)
    state = dec.prefill(lm, ids, np.array([4, 3]), 16)

    def run(key):
        return dec.decode(lm, key, state, max_new_tokens=5, temperature=1.0)[0].tokens

    keys = jax.random.split(jax.random.key(11), 3)
    batched = np.asarray(jax.jit(jax.vmap(run))(keys))
    for i in range(3):
        np.testing.assert_array_equal(batched[i], np.asarray(jax.jit(run)(keys[i])))
