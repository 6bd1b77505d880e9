"""Process reward model: torch parity, input format, incremental scoring."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from llm_fixtures import load_torch, make_checkpoint, random_ids

import smcjax.llm as llm
from smcjax.llm import prm as prm_lib

QUESTION = "What is 7 times 8?"
STEPS = [
    "Step 1: Compute 7 times 8.",
    "We have a = 2 and b = 3, hence a * b = 6.",
    "Therefore, the final answer is \\boxed{56}.",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prm") / "prm", prm=True, seed=3)


@pytest.fixture(scope="module")
def prm(ckpt):
    return llm.load_prm(ckpt)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_scores_match_torch_reference(ckpt, scan_layers):
    model = llm.load_prm(ckpt, scan_layers=scan_layers)
    ids = random_ids(np.random.default_rng(0), (2, 40), model.config.vocab_size)
    ref = load_torch(ckpt, prm=True)
    with torch.no_grad():
        want = torch.softmax(ref(torch.as_tensor(ids, dtype=torch.long)), -1)[..., 1]
    got = np.asarray(model.scores(ids))
    assert got.shape == (2, 40)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    # not trivially constant
    assert got.std() > 1e-3


def test_input_format_and_step_rewards(prm):
    tok = prm.tokenizer
    assert prm.step_token_id == tok.convert_tokens_to_ids("<extra_0>")
    ids = prm.build_input(QUESTION, STEPS)
    text = tok.apply_chat_template(
        [
            {"role": "system", "content": prm_lib.PRM_SYSTEM_PROMPT},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"},
        ],
        tokenize=False,
    )
    assert "\\boxed{}" in prm_lib.PRM_SYSTEM_PROMPT
    np.testing.assert_array_equal(ids, tok.encode(text, add_special_tokens=False))
    rewards = prm.step_rewards(QUESTION, STEPS)
    assert rewards.shape == (3,)
    scores = np.asarray(prm.scores(ids[None]))[0]
    np.testing.assert_allclose(rewards, scores[ids == prm.step_token_id])
    assert ((rewards > 0) & (rewards < 1)).all()


def test_incremental_scoring_equals_full(prm):
    """Prefix once (shared by 2 particles), then one step at a time per particle."""
    tok = prm.tokenizer
    prefix = prm_lib.prm_prefix_ids(tok, QUESTION)
    sols = [STEPS, [STEPS[1], STEPS[0], "The answer is 6."]]
    state = prm_lib.prm_prefill(prm, np.asarray(prefix), None, 160, num_copies=2)
    extend = jax.jit(prm_lib.prm_extend)
    inc = [[], []]
    for k in range(3):
        rows = [prm_lib.prm_step_ids(tok, sols[b][k]) for b in range(2)]
        width = max(len(r) for r in rows) + 3  # extra right padding on purpose
        new = np.zeros((2, width), np.int32)
        for b, r in enumerate(rows):
            new[b, : len(r)] = r
        state, probs = extend(prm, state, new, np.array([len(r) for r in rows]))
        for b in range(2):
            inc[b].append(float(state.last_score[b]))
            assert float(probs[b, len(rows[b]) - 1]) == pytest.approx(inc[b][-1])
    for b in range(2):
        full = prm.step_rewards(QUESTION, sols[b])
        np.testing.assert_allclose(inc[b], full, atol=1e-5)
        assert int(state.lengths[b]) == len(prm.build_input(QUESTION, sols[b])) - len(
            tok.encode("<|im_end|>\n", add_special_tokens=False)
        )


def test_load_prm_rejects_a_causal_lm(tmp_path):
    path = make_checkpoint(tmp_path / "lm", family="qwen2")
    with pytest.raises(ValueError, match="not a process reward model"):
        llm.load_prm(path)
