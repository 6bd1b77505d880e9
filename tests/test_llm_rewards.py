"""Rewards: aggregations, self-certainty, arithmetic verifier, LLM judge."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smcjax.llm.arithmetic import check_arithmetic, find_claims
from smcjax.llm.rewards import (
    RewardSpec,
    StepInput,
    aggregate,
    arithmetic_verifier,
    get_reward,
    llm_judge,
    logit,
    self_certainty,
)

# ----------------------------------------------------------------- aggregations

SCORES = np.array(
    [
        [0.9, 0.5, 0.8, 0.7],  # 3 steps taken (last entry ignored)
        [0.2, 0.99, 0.1, 0.3],  # 4 steps
        [0.6, 0.1, 0.1, 0.1],  # 1 step
    ],
    np.float32,
)
STEPS = np.array([3, 4, 1])


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("last", [0.8, 0.3, 0.6]),
        ("model", [0.8, 0.3, 0.6]),
        ("min", [0.5, 0.1, 0.6]),
        ("prod", [0.9 * 0.5 * 0.8, 0.2 * 0.99 * 0.1 * 0.3, 0.6]),
    ],
)
def test_aggregate_hand_made(aggregation, expected):
    out = jax.jit(aggregate, static_argnums=2)(np.log(SCORES), STEPS, aggregation)
    np.testing.assert_allclose(np.exp(out), expected, rtol=1e-6)


def test_aggregate_no_step_is_neutral_and_bad_name():
    out = aggregate(np.log(SCORES), np.array([0, 0, 0]), "prod")
    np.testing.assert_allclose(np.exp(out), 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(np.log(SCORES), STEPS, "mean")


def test_prod_is_stable_in_log_space():
    # 40 steps of score 0.01: r = 1e-80 underflows float32, its log does not
    ls = np.full((1, 40), np.log(0.01), np.float32)
    out = aggregate(ls, np.array([40]), "prod")
    np.testing.assert_allclose(out, 40 * np.log(0.01), rtol=1e-5)
    # the logit is clipped at r = 1e-7 (as its_hub clips)
    np.testing.assert_allclose(logit(out), math.log(1e-7 / (1 - 1e-7)), rtol=1e-4)


def test_logit_matches_formula():
    r = np.array([0.1, 0.5, 0.9, 0.999], np.float32)
    np.testing.assert_allclose(
        logit(np.log(r)), np.log(r / (1 - r)), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("aggregation", ["model", "last", "min", "prod"])
def test_incremental_weights_telescope(aggregation):
    # log G_t = log r_t - log r_{t-1}, r_{-1} = 1: the running sum is log r_t
    ls = np.log(SCORES[1:2])
    logs = [aggregate(ls, np.array([t]), aggregation)[0] for t in range(1, 5)]
    incr = np.diff(np.concatenate([[0.0], np.asarray(logs)]))
    np.testing.assert_allclose(np.cumsum(incr), logs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.sum(incr), logs[-1], rtol=1e-6)


# ----------------------------------------------------------------- self-certainty


def _inp(tokens, start, end, logprobs=None, prompt_len=None, active=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    n, s = tokens.shape
    return StepInput(
        tokens=tokens,
        start=jnp.asarray(start, jnp.int32),
        end=jnp.asarray(end, jnp.int32),
        logprobs=jnp.zeros((n, s)) if logprobs is None else jnp.asarray(logprobs),
        active=jnp.ones((n,), bool) if active is None else jnp.asarray(active),
        prompt_len=jnp.full((n,), 0 if prompt_len is None else prompt_len, jnp.int32),
        lm=None,
        cache=None,
        t=jnp.int32(1),
    )


def test_self_certainty_is_geometric_mean_probability():
    rng = np.random.default_rng(0)
    lp = -rng.exponential(1.0, size=(3, 12)).astype(np.float32)
    start, end = np.array([4, 6, 2]), np.array([8, 12, 3])
    rw = self_certainty()
    for agg, lo in (("last", start), ("model", np.full(3, 2))):
        spec = RewardSpec(agg, 8, 10, 5)
        _, s = rw.step(None, None, _inp(np.zeros((3, 12)), start, end, lp, 2), spec)
        want = [np.exp(lp[i, lo[i] : end[i]].mean()) for i in range(3)]
        np.testing.assert_allclose(s, want, rtol=1e-5)


# ----------------------------------------------------------------- arithmetic

CLAIMS = [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.", (1, 1)),
    ("She makes 9 * 2 = $18 every day.", (1, 1)),
    ("So 3 + 4 = 8.", (0, 1)),
    ("(3 + 4) * 2 = 14, 10 / 3 = 3.33 and 10/3 = 3.4", (2, 3)),
    ("Total: $1,200 × 0.25 = $300.", (1, 1)),
    (r"$5 \times 4 = 20$ and 6 x 7 = 42", (2, 2)),
    ("x = 5, a = 2 + 3 = 5, 2^3 = 8", (1, 1)),
    ("1,000 + 2,000 = 3,000 and -3 + 5 = 2", (2, 2)),
    ("no arithmetic here", (0, 0)),
    ("divide 5 / 0 = 1", (0, 0)),
]


@pytest.mark.parametrize(("text", "counts"), CLAIMS)
def test_check_arithmetic_table(text, counts):
    assert check_arithmetic(text) == counts


def test_find_claims_reports_expression():
    (c,) = find_claims("So 3 + 4 = 8.")
    assert c.expression == "3 + 4" and c.stated == "8" and not c.correct


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from llm_fixtures import make_checkpoint

    from smcjax.llm import load

    path = make_checkpoint(tmp_path_factory.mktemp("tiny_rw"), seed=1)
    return load(path)


def test_arithmetic_reward_via_pure_callback_jit_and_vmap(tiny):
    tok = tiny.tokenizer
    texts = ["So 3 + 4 = 8.\n\n", "We get 12 + 30 = 42.\n\n", "Let x be 5.\n\n"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    s = max(map(len, ids)) + 3
    buf = np.zeros((3, s), np.int32)
    for i, r in enumerate(ids):
        buf[i, 3 : 3 + len(r)] = r
    start, end = np.full(3, 3), np.array([3 + len(r) for r in ids])
    rw = arithmetic_verifier(tok)
    spec = RewardSpec("last", 32, 64, 4)
    state = rw.init(None, None, 3, spec)

    @jax.jit
    def f(state, tokens):
        return rw.step(None, state, _inp(tokens, start, end), spec)

    state, s1 = f(state, buf)
    np.testing.assert_allclose(s1, [1 / 3, 2 / 3, 1 / 2], rtol=1e-6)
    np.testing.assert_array_equal(state, [[0, 1], [1, 1], [0, 0]])
    # vmapped over a batch of questions: same per row
    _, s2 = jax.vmap(f)(jnp.stack([state, state]), jnp.stack([buf, buf]))
    np.testing.assert_allclose(s2, np.stack([s1, s1]), rtol=1e-6)
    # "model" aggregation reads the cumulative counts: (0+1+0 correct + 1)/(2 + 2)
    spec_m = spec._replace(aggregation="model")
    st, _ = rw.step(None, rw.init(None, None, 3, spec_m), _inp(buf, start, end), spec_m)
    _, sm = rw.step(None, st, _inp(buf, start, end), spec_m)
    np.testing.assert_allclose(sm, [1 / 4, 3 / 4, 1 / 2], rtol=1e-6)


def test_judge_matches_from_scratch_forward(tiny):
    tok = tiny.tokenizer
    rw = llm_judge(tok)
    from smcjax.llm.decoding import prefill

    prompt = np.asarray(
        tok("Question: 7 times 8?\n\n56", add_special_tokens=False)["input_ids"]
    )
    p = len(prompt)
    state = prefill(tiny, prompt[None], None, p + rw.extra_slots)
    inp = _inp(state.tokens, [p - 2], [p])._replace(
        lm=tiny, cache=state.cache, prompt_len=jnp.asarray([p])
    )
    spec = RewardSpec("last", 8, 8, 4)
    _, s = jax.jit(lambda i: rw.step(None, None, i, spec))(inp)
    suffix = tok(rw_suffix(tok), add_special_tokens=False)["input_ids"]
    full = np.concatenate([prompt, suffix])[None]
    lp = jax.nn.log_softmax(tiny.logits(full)[0, -1])
    yes = {
        tok("Yes", add_special_tokens=False)["input_ids"][0],
        tok(" Yes", add_special_tokens=False)["input_ids"][0],
    }
    no = {
        tok("No", add_special_tokens=False)["input_ids"][0],
        tok(" No", add_special_tokens=False)["input_ids"][0],
    }
    yes, no = np.array(sorted(yes - no)), np.array(sorted(no - yes))
    want = jax.nn.sigmoid(jax.nn.logsumexp(lp[yes]) - jax.nn.logsumexp(lp[no]))
    np.testing.assert_allclose(s[0], want, rtol=1e-4)


def rw_suffix(tok):
    from smcjax.llm import rewards

    return rewards._JUDGE_CHAT  # the tiny tokenizer knows <|im_start|>


def test_get_reward_names_and_errors(tiny):
    assert get_reward("self-certainty", tiny) is get_reward("self_certainty", tiny)
    assert get_reward("arithmetic", tiny).name == "arithmetic"
    assert get_reward("judge", tiny).extra_slots > 0
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("oracle", tiny)
    with pytest.raises(ValueError, match="load_prm"):
        get_reward("prm", tiny)


# ----------------------------------------------------------------- PRM (Flax port)


@pytest.mark.parametrize("aggregation", ["last", "model"])
def test_prm_incremental_scores_match_torch_on_the_full_input(tmp_path, aggregation):
    """Scoring step by step with the PRM's own KV cache = one torch pass over the
    whole formatted input (steps tagged with <extra_0>), at every tag."""
    import torch
    from llm_fixtures import load_torch, make_checkpoint

    import smcjax.llm as llm
    from smcjax.llm.rewards import prm_reward

    path = make_checkpoint(tmp_path / "prm", prm=True, seed=2)
    prm = llm.load_prm(path)
    tok = prm.tokenizer
    rw = prm_reward(prm)
    steps = [
        "Step 1: 12 + 30 = 42.\n\n",
        "Step 2: Divide by 6 to get 7.\n\n",
        "So 7.\n\n",
    ]
    step_ids = [tok(s, add_special_tokens=False)["input_ids"] for s in steps]
    prepared = rw.prepare("What is 42 / 6?")
    spec = RewardSpec(aggregation, 32, 96, 4)
    plen = 5
    buf = np.zeros((1, plen + sum(map(len, step_ids))), np.int32)
    state = rw.init(prm, prepared, 1, spec)
    pos, got = plen, []
    for ids in step_ids:
        buf[0, pos : pos + len(ids)] = ids
        inp = _inp(buf, [pos], [pos + len(ids)])
        state, s = rw.step(prm, state, inp, spec)
        got.append(float(s[0]))
        pos += len(ids)
    tag = tok("<extra_0>", add_special_tokens=False)["input_ids"][0]
    blank = set(tok("\n\n", add_special_tokens=False)["input_ids"])
    ref = load_torch(path, prm=True)
    prefix = list(prepared["ids"][: int(prepared["length"])])
    want, seq = [], list(prefix)
    for ids in step_ids:
        if aggregation == "model":
            seq = seq + list(ids)
            full = [*seq, tag]
        else:
            body = list(ids[:-1]) if len(ids) > 1 and ids[-1] in blank else list(ids)
            seq = [*seq, *body, tag]
            full = seq
        with torch.no_grad():
            logits = ref(torch.tensor([full]))[0, -1]
        want.append(float(torch.softmax(logits, -1)[1]))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_judge_with_its_own_cache_equals_the_policy_judging_itself(tiny):
    """A separate judge model (here: the policy again, with its own KV cache, steps
    appended incrementally) scores exactly like the judge on the policy's cache."""
    from smcjax.llm.its import particle_filter

    opts = dict(max_steps=3, step_cap=4, max_new_tokens=12, aggregation="min")
    own = llm_judge(tiny.tokenizer, model=tiny)
    q = "What is 7 times 8?"
    a = particle_filter(jax.random.key(3), tiny, "judge", q, 3, **opts)
    b = particle_filter(jax.random.key(3), tiny, own, q, 3, **opts)
    assert a.texts == b.texts  # same key, same draws while the weights agree
    for sa, sb in zip(a.step_scores, b.step_scores, strict=True):
        np.testing.assert_allclose(sa, sb, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(a.rewards, [s.min() for s in a.step_scores], rtol=1e-5)
