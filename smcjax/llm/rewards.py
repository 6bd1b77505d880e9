r"""Rewards for step-level particle filtering: one interface, on device where possible.

A reward scores a partial solution :math:`x_{1:t}` (the reasoning steps so far) with a
number :math:`r_t \in (0, 1)`, read as "the probability that the solution is on track".
The particle filter of :mod:`smcjax.llm.its` turns it into a weight through the logit
:math:`\log\frac{r}{1-r}` (Puri et al. 2025, Algorithm 1).

Aggregation
-----------
Rewards produce one score per step. How per-step scores :math:`s_1..s_t` become the
reward :math:`r_t` of the partial solution is the *aggregation* (a static string):

=========  =====================================================================
``model``  the reward's own score of the whole partial solution, read at step t
           (for a PRM: the steps fed as ONE step, the score at its end)
``last``   :math:`r_t = s_t`, the score of the newest step (with its context)
``min``    :math:`r_t = \min_{k \le t} s_k`
``prod``   :math:`r_t = \prod_{k \le t} s_k` (computed in log space)
=========  =====================================================================

A reward is told the aggregation at ``init``/``step`` time, so a PRM computes either
the whole-solution score ("model") or the per-step score (the others), not both.

The interface
-------------
:class:`Reward` is a pytree-friendly bundle: ``params`` (arrays, e.g. a PRM's weights;
passed to ``jax.jit`` as an argument, never baked in as constants) and static functions

* ``prepare(question) -> pytree`` — host side, once per question (tokenise prompts);
* ``init(params, prepared, num_particles, spec) -> state`` — device side;
* ``step(params, state, inp: StepInput, spec) -> (state, scores (N,))`` — device side.

Rewards
-------
* :func:`self_certainty` — :math:`s = \exp(\text{mean token log-probability})` of the
  policy's own sampled tokens (no second model);
* :func:`llm_judge` — :math:`s = P(\text{Yes}) / (P(\text{Yes}) + P(\text{No}))` after a
  question "is the last step correct?", from the policy itself (re-using its KV cache:
  only the ~20 question tokens are run) or any model with the same vocabulary;
* :func:`prm_reward` — a Qwen2.5-Math-PRM-style model scoring incrementally with its own
  KV cache (each step's tokens are run once);
* :func:`arithmetic_verifier` — every ``a op b = c`` claim checked exactly
  (:mod:`smcjax.llm.arithmetic`), host-side via :func:`jax.pure_callback`.

Why a ``pure_callback`` for the verifier: the check needs the tokenizer's ``decode`` and
exact rational arithmetic on text, which have no device form; the callback keeps the
whole filter one compiled program (a loop over steps, vmappable over questions) instead
of a Python loop with a host round trip that would also block ``vmap``. It moves only
the step's token ids (``N × S`` int32) to the host once per step, negligible next to
the decoding of that step. Scores: :math:`s = (c + 1) / (n + 2)` for ``c`` correct
claims out of ``n`` (the posterior mean of a Beta(1, 1) "claim is right" rate),
``1/2`` when a step makes no claim; "model" aggregation uses the cumulative counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smcjax.types import Array, ArrayTree

__all__ = [
    "AGGREGATIONS",
    "Reward",
    "RewardSpec",
    "StepInput",
    "aggregate",
    "arithmetic_verifier",
    "get_reward",
    "llm_judge",
    "logit",
    "prm_reward",
    "self_certainty",
    "step_window",
]

AGGREGATIONS = ("model", "last", "min", "prod")
_EPS = 1e-7  # scores are clipped to [eps, 1 - eps] before the logit (as its_hub does)


class StepInput(NamedTuple):
    """What a reward sees after every particle generated one more step.

    All leaves have the particle axis first.

    Attributes
    ----------
    tokens : Array
        ``(N, S)`` int32 policy token buffer (prompt, then the solution).
    start, end : Array
        ``(N,)`` the new step occupies buffer slots ``start <= j < end``.
    logprobs : Array
        ``(N, S)`` log-probabilities of the sampled tokens under the policy.
    active : Array
        ``(N,)`` bool, whether the particle generated a step now (finished particles
        do not extend; their score must stay what it was).
    prompt_len : Array
        ``(N,)`` int32 length of the prompt (first solution slot).
    lm : Any
        The policy (a :class:`~smcjax.llm.model.Transformer` pytree).
    cache : Any
        The policy's KV cache after the step (for the judge).
    t : Array
        Step index (``0`` for the first step).
    """

    tokens: Array
    start: Array
    end: Array
    logprobs: Array
    active: Array
    prompt_len: Array
    lm: Any
    cache: Any
    t: Array


class RewardSpec(NamedTuple):
    """Static sizes a reward may need to allocate its state."""

    aggregation: str
    step_cap: int  # maximum tokens of one step
    max_new_tokens: int  # maximum solution tokens
    max_steps: int


class Reward(NamedTuple):
    """A reward: device ``params`` plus static ``prepare``/``init``/``step`` functions.

    Attributes
    ----------
    name : str
    params : pytree
        Arrays the reward computes with (model weights), or ``None``.
    prepare : callable
        ``prepare(question: str) -> pytree`` of fixed-shape arrays (host side).
    init : callable
        ``init(params, prepared, num_particles, spec) -> state``.
    step : callable
        ``step(params, state, inp, spec) -> (state, scores)``, ``scores`` ``(N,)`` in
        ``(0, 1)``. Rows with ``inp.active == False`` (finished particles) must keep
        their state unchanged; their score may be anything (the filter keeps the old
        one).
    extra_slots : int
        Policy cache slots the reward writes past the solution (the judge's question).
    """

    name: str
    params: ArrayTree
    prepare: Callable[[str], ArrayTree]
    init: Callable[..., ArrayTree]
    step: Callable[..., tuple[ArrayTree, Array]]
    extra_slots: int = 0


# ----------------------------------------------------------------- aggregation / logit


def aggregate(log_scores: Array, num_steps: Array, aggregation: str) -> Array:
    r"""Log-reward :math:`\log r_t` of partial solutions from per-step log-scores.

    Parameters
    ----------
    log_scores : Array
        ``(..., T)`` :math:`\log s_k`; entries ``k >= num_steps`` are ignored.
    num_steps : Array
        ``(...)`` number of steps taken, ``t``.
    aggregation : str
        One of :data:`AGGREGATIONS` (see the module docstring). For ``"model"`` the
        entries are the reward's whole-solution scores, so it reads like ``"last"``.

    Returns
    -------
    Array
        ``(...)`` :math:`\log r_t`; ``log(1/2)`` (a neutral reward) when ``t = 0``.
    """
    _check_aggregation(aggregation)
    log_scores = jnp.asarray(log_scores)
    num_steps = jnp.asarray(num_steps)
    k = jnp.arange(log_scores.shape[-1])
    valid = k < num_steps[..., None]
    neutral = jnp.full(num_steps.shape, jnp.log(0.5), log_scores.dtype)
    if aggregation in ("model", "last"):
        idx = jnp.clip(num_steps - 1, 0, log_scores.shape[-1] - 1)
        out = jnp.take_along_axis(log_scores, idx[..., None], axis=-1)[..., 0]
    elif aggregation == "min":
        out = jnp.min(jnp.where(valid, log_scores, jnp.inf), axis=-1)
    else:  # prod
        out = jnp.sum(jnp.where(valid, log_scores, 0.0), axis=-1)
    return jnp.where(num_steps > 0, out, neutral)


def logit(log_r: Array) -> Array:
    r"""Return :math:`\log\frac{r}{1-r}` from :math:`\log r`.

    :math:`r` is clipped to ``[1e-7, 1 - 1e-7]``; the log input keeps products of many
    small scores stable.
    """
    log_r = jnp.clip(log_r, jnp.log(_EPS), jnp.log1p(-_EPS))
    return log_r - jnp.log(-jnp.expm1(log_r))


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation={aggregation!r}; expected one of {AGGREGATIONS}"
        )


def step_window(
    tokens: Array, start: Array, end: Array, width: int
) -> tuple[Array, Array]:
    """Tokens of each row's new step, left-aligned: ``(N, width)`` ids and validity."""
    j = jnp.arange(width)
    idx = start[:, None] + j[None, :]
    valid = idx < end[:, None]
    idx = jnp.clip(idx, 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(tokens, idx, axis=1), valid


# ---------------------------------------------------------------------- self-certainty


def self_certainty() -> Reward:
    r"""Self-certainty: :math:`s = \exp(\frac1{|y|}\sum_{j} \log p(y_j \mid y_{<j}))`.

    The geometric-mean probability the policy gave to its own sampled tokens: of the
    new step (``last``/``min``/``prod``) or of the whole solution so far (``model``).
    Needs no second model and no extra forward pass.
    """

    def prepare(question: str) -> ArrayTree:
        return None

    def init(params, prepared, num_particles: int, spec: RewardSpec):
        return None

    def step(params, state, inp: StepInput, spec: RewardSpec):
        s = inp.tokens.shape[1]
        j = jnp.arange(s)[None, :]
        lo = (
            inp.prompt_len[:, None]
            if spec.aggregation == "model"
            else inp.start[:, None]
        )
        mask = (j >= lo) & (j < inp.end[:, None])
        n = jnp.maximum(jnp.sum(mask, axis=1), 1)
        mean_lp = jnp.sum(jnp.where(mask, inp.logprobs, 0.0), axis=1) / n
        return state, jnp.exp(jnp.minimum(mean_lp, 0.0))

    return Reward("self-certainty", None, prepare, init, step)


# ------------------------------------------------------------------ tokenizer helpers


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (transformers or tokenizers)."""
    try:
        out = tokenizer(text, add_special_tokens=False)["input_ids"]
    except TypeError:  # a bare tokenizers.Tokenizer
        out = tokenizer.encode(text, add_special_tokens=False)
    if hasattr(out, "ids"):
        out = out.ids
    return [int(i) for i in out]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids)


def _first_token(tokenizer: Any, text: str) -> int:
    """First token of ``text`` (the whole word for Qwen-size vocabularies)."""
    return _encode(tokenizer, text)[0]


def _token_id(tokenizer: Any, text: str) -> int | None:
    ids = _encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


# ------------------------------------------------------------------ arithmetic verifier


def arithmetic_verifier(tokenizer: Any) -> Reward:
    r"""Exact arithmetic checking of every ``a op b = c`` claim (host callback).

    Score of a step with ``c`` correct claims out of ``n``: :math:`(c + 1)/(n + 2)`;
    with ``"model"`` aggregation the counts are cumulative over the solution. See the
    module docstring for why this runs as a :func:`jax.pure_callback`.
    """
    from smcjax.llm.arithmetic import check_arithmetic

    def host_check(tokens, start, end, active):
        tokens, start, end, active = map(np.asarray, (tokens, start, end, active))
        lead = start.shape
        tokens = tokens.reshape(-1, tokens.shape[-1])
        start, end, active = start.ravel(), end.ravel(), active.ravel()
        out = np.zeros((start.shape[0], 2), np.int32)
        for i in range(start.shape[0]):
            if active[i] and end[i] > start[i]:
                text = _decode(tokenizer, tokens[i, start[i] : end[i]].tolist())
                out[i] = check_arithmetic(text)
        return out.reshape(*lead, 2)

    def prepare(question: str) -> ArrayTree:
        return None

    def init(params, prepared, num_particles: int, spec: RewardSpec):
        return jnp.zeros((num_particles, 2), jnp.int32)  # cumulative (correct, claims)

    def step(params, state, inp: StepInput, spec: RewardSpec):
        shape = jax.ShapeDtypeStruct((*inp.start.shape, 2), jnp.int32)
        counts = jax.pure_callback(
            host_check,
            shape,
            inp.tokens,
            inp.start,
            inp.end,
            inp.active,
            vmap_method="broadcast_all",
        )
        state = state + jnp.where(inp.active[:, None], counts, 0)
        c = state if spec.aggregation == "model" else counts
        score = (c[:, 0] + 1.0) / (c[:, 1] + 2.0)
        return state, score

    return Reward("arithmetic", None, prepare, init, step)


# --------------------------------------------------------------------------- LLM judge

_JUDGE_CHAT = (
    "<|im_end|>\n<|im_start|>user\nIs the last step of the solution above correct? "
    "Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n"
)
_JUDGE_PLAIN = "\nQuestion: is the last step above correct? Answer Yes or No.\nAnswer:"


def llm_judge(
    tokenizer: Any,
    *,
    model: Any = None,
    chat: bool | None = None,
    suffix: str | None = None,
) -> Reward:
    r"""Build the LLM judge: :math:`s = P(\text{Yes}) / (P(\text{Yes}) + P(\text{No}))`.

    After each step, a question ``suffix`` ("is the last step correct? Answer Yes or
    No") follows the partial solution, and the judge's next-token probabilities of
    "Yes"/" Yes" and "No"/" No" are compared (their first tokens, for small
    vocabularies that split the words). The judged text is always the whole partial
    solution, so all aggregations read these per-step judgements.

    * ``model=None`` (default): the policy judges itself *on top of its own KV cache*:
      only the suffix's tokens are computed, and the cache they were written to is not
      kept, so the solution continues unchanged.
    * ``model=`` another loaded LM with the same vocabulary: it keeps its own KV cache
      per particle (the prompt prefilled once); each step's tokens and the suffix go
      through it in ONE forward pass, the step's tokens are kept, the suffix's slots
      are overwritten by the next step.

    Parameters
    ----------
    tokenizer
        The policy's tokenizer (the judge must share its vocabulary).
    model
        The judge, or ``None`` for the policy.
    chat
        Use a chat-template turn (``<|im_end|>`` … ``<|im_start|>assistant``); default:
        when the tokenizer knows ``<|im_start|>``.
    suffix
        Override the question text.
    """
    if chat is None:
        chat = _token_id(tokenizer, "<|im_start|>") is not None
    if suffix is None:
        suffix = _JUDGE_CHAT if chat else _JUDGE_PLAIN
    suffix_ids = np.asarray(_encode(tokenizer, suffix), np.int32)
    yes_set = {_first_token(tokenizer, w) for w in ("Yes", " Yes")}
    no_set = {_first_token(tokenizer, w) for w in ("No", " No")}
    yes, no = sorted(yes_set - no_set), sorted(no_set - yes_set)  # drop a shared " "
    if not yes or not no:
        raise ValueError("llm_judge: 'Yes' and 'No' start with the same token")
    yes_ids, no_ids = np.asarray(yes, np.int32), np.asarray(no, np.int32)
    j_len = int(suffix_ids.shape[0])

    def p_yes(logits):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lyes = jax.nn.logsumexp(lp[:, yes_ids], axis=-1)
        lno = jax.nn.logsumexp(lp[:, no_ids], axis=-1)
        return jax.nn.sigmoid(lyes - lno)

    if model is None:

        def prepare(question: str) -> ArrayTree:
            return None

        def init(params, prepared, num_particles: int, spec: RewardSpec):
            return None

        def step(params, state, inp: StepInput, spec: RewardSpec):
            n = inp.end.shape[0]
            toks = jnp.broadcast_to(jnp.asarray(suffix_ids), (n, j_len))
            pos = inp.end[:, None] + jnp.arange(j_len)[None, :]
            h, _ = inp.lm.hidden(toks, pos, inp.cache)  # only the last position's
            return state, p_yes(inp.lm.head(h[:, -1, :]))  # logits are needed

        return Reward("judge", None, prepare, init, step, extra_slots=j_len)

    from smcjax.llm.model import forward, init_cache

    def prepare_m(question: str) -> ArrayTree:
        from smcjax.llm.its import format_prompt

        ids = np.asarray(format_prompt(tokenizer, question), np.int32)
        return {"ids": ids, "length": np.int32(len(ids))}

    def init_m(params, prepared, num_particles: int, spec: RewardSpec):
        ids, plen = prepared["ids"], prepared["length"]
        p = ids.shape[0]
        size = p + spec.max_new_tokens + j_len
        cache = init_cache(params.config, 1, size, _dtype(params))
        _, cache = forward(params, ids[None], jnp.arange(p)[None], cache)
        cache = jax.tree.map(lambda x: jnp.repeat(x, num_particles, axis=0), cache)
        return cache, jnp.full((num_particles,), plen, jnp.int32)

    def step_m(params, state, inp: StepInput, spec: RewardSpec):
        cache, length = state
        size = _cache_slots(cache)
        w = spec.step_cap
        toks, valid = step_window(inp.tokens, inp.start, inp.end, w + j_len)
        n_tok = jnp.sum(valid[:, :w], axis=1)
        j = jnp.arange(w + j_len)[None, :]
        rel = j - n_tok[:, None]  # position inside the suffix
        sfx = jnp.asarray(suffix_ids)[jnp.clip(rel, 0, j_len - 1)]
        toks = jnp.where(rel >= 0, sfx, toks)
        keep = (rel < j_len) & inp.active[:, None]
        pos = jnp.where(keep, length[:, None] + j, size)
        h, cache = params.hidden(toks, pos, cache)
        last = jnp.take_along_axis(h, (n_tok + j_len - 1)[:, None, None], axis=1)
        length = length + jnp.where(inp.active, n_tok, 0)
        return (cache, length), p_yes(params.head(last[:, 0, :]))

    return Reward("judge-model", model, prepare_m, init_m, step_m)


# ---------------------------------------------------------------------- PRM (Flax port)

PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def prm_reward(prm: Any, tokenizer: Any | None = None) -> Reward:
    r"""Build a Qwen2.5-Math-PRM-style process reward, scored incrementally.

    The PRM reads (DESIGN) the system prompt ``PRM_SYSTEM``, the question, and the
    assistant's steps each ending with the step tag ``<extra_0>``; its score of a step
    is P(class 1) at that tag. The reward keeps the PRM's own KV cache per particle:

    * ``last``/``min``/``prod``: the new step's tokens (a trailing blank-line token
      dropped) and ``<extra_0>`` are appended and kept; the score is read at the tag;
    * ``model``: the steps are appended as they are (the whole solution is ONE step)
      and ``<extra_0>`` is run after them but not kept (the next step overwrites its
      slot), so each step's tokens still go through the PRM once.

    The PRM must share the policy's vocabulary (true for Qwen2.5 policies and PRMs).

    Parameters
    ----------
    prm
        A :class:`~smcjax.llm.prm.ProcessRewardModel` (``prm(tokens, positions, cache)``
        gives per-position probabilities of "correct").
    tokenizer
        Its tokenizer (defaults to ``prm.tokenizer``).
    """
    from smcjax.llm.model import init_cache

    tok = tokenizer if tokenizer is not None else prm.tokenizer
    tag = _token_id(tok, "<extra_0>")
    if tag is None:
        raise ValueError("prm_reward: the tokenizer has no '<extra_0>' step tag token")
    blank = [i for i in {_token_id(tok, "\n\n"), _token_id(tok, "\n")} if i is not None]
    blank_ids = np.asarray(blank or [-1], np.int32)
    cfg = prm.config

    def prepare(question: str) -> ArrayTree:
        text = (
            f"<|im_start|>system\n{PRM_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            f"{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = np.asarray(_encode(tok, text), np.int32)
        return {"ids": ids, "length": np.int32(len(ids))}

    def init(params, prepared, num_particles: int, spec: RewardSpec):
        ids, plen = prepared["ids"], prepared["length"]
        p = ids.shape[0]  # padded length; slots >= plen are overwritten before use
        size = p + spec.max_new_tokens + spec.max_steps + 1
        cache = init_cache(cfg, 1, size, _dtype(params))
        _, cache = _prm_probs(params, ids[None], jnp.arange(p)[None], cache)
        cache = jax.tree.map(lambda x: jnp.repeat(x, num_particles, axis=0), cache)
        return cache, jnp.full((num_particles,), plen, jnp.int32)

    def step(params, state, inp: StepInput, spec: RewardSpec):
        cache, length = state
        size = _cache_slots(cache)
        w = spec.step_cap
        toks, valid = step_window(inp.tokens, inp.start, inp.end, w + 1)
        n_tok = jnp.minimum(jnp.sum(valid, axis=1), w)  # a step has <= step_cap tokens
        if spec.aggregation != "model":
            last = jnp.take_along_axis(toks, jnp.maximum(n_tok - 1, 0)[:, None], 1)[
                :, 0
            ]
            drop = (n_tok > 1) & jnp.isin(last, jnp.asarray(blank_ids))
            n_tok = n_tok - drop.astype(n_tok.dtype)
        j = jnp.arange(w + 1)[None, :]
        toks = jnp.where(j == n_tok[:, None], tag, toks)
        keep = (j <= n_tok[:, None]) & inp.active[:, None]
        pos = jnp.where(keep, length[:, None] + j, size)  # slot >= size: not written
        probs, cache = _prm_probs(params, toks, pos, cache)
        score = jnp.take_along_axis(probs, n_tok[:, None], axis=1)[:, 0]
        adv = n_tok + (0 if spec.aggregation == "model" else 1)
        length = length + jnp.where(inp.active, adv, 0)
        return (cache, length), score

    return Reward("prm", prm, prepare, init, step)


def _cache_slots(cache: Any) -> int:
    """Number of slots ``S`` of a KV cache (stacked or per-layer layout: axis -2)."""
    return jax.tree.leaves(cache)[0].shape[-2]


def _dtype(params: Any) -> Any:
    try:
        return params.dtype
    except AttributeError:
        return jnp.float32


def _prm_probs(prm: Any, tokens: Array, positions: Array, cache: Any):
    """``(P(correct) (B, T), cache)`` from a PRM forward with a cache."""
    out, cache = prm(tokens, positions, cache)
    out = jnp.asarray(out)
    if out.ndim == 3:  # class logits (B, T, 2)
        out = jax.nn.softmax(out.astype(jnp.float32), axis=-1)[..., 1]
    return out, cache


# ------------------------------------------------------------------------------ lookup


def get_reward(reward: str | Reward, lm: Any = None, *, prm: Any = None) -> Reward:
    """Return a :class:`Reward` by name, built for the policy ``lm`` (or pass it on).

    Names: ``"self-certainty"``, ``"judge"``, ``"arithmetic"``, ``"prm"`` (needs
    ``prm``).
    """
    if isinstance(reward, Reward):
        return reward
    name = str(reward).lower().replace("_", "-")
    # one Reward per (name, tokenizer, prm): compiled filters are cached per reward
    key = (name, id(getattr(lm, "tokenizer", None)), id(prm))
    hit = _REWARDS.get(key)
    if hit is not None:
        return hit[0]
    out = _make_reward(name, reward, lm, prm)
    _REWARDS[key] = (out, lm, prm)  # keep the keyed objects alive
    return out


_REWARDS: dict[Any, Any] = {}


def _make_reward(name: str, reward: Any, lm: Any, prm: Any) -> Reward:
    if name in ("self-certainty", "certainty", "confidence"):
        return self_certainty()
    if name in ("judge", "llm-judge"):
        return llm_judge(lm.tokenizer)
    if name in ("arithmetic", "verifier", "arithmetic-verifier"):
        return arithmetic_verifier(lm.tokenizer)
    if name == "prm":
        if prm is None:
            raise ValueError("reward='prm' needs a loaded PRM: pass prm=load_prm(...)")
        return prm_reward(prm)
    raise ValueError(
        f"unknown reward={reward!r}; expected 'self-certainty', 'judge', 'arithmetic', "
        "'prm' or a smcjax.llm.rewards.Reward"
    )
