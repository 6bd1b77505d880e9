r"""Inference-time scaling: step-level particle filtering of an LLM with a reward.

Puri et al. (2025, arXiv 2502.01618) read a language model as the transition kernel of
a state-space model whose latent states are partial solutions, and a process reward
model (PRM) as its likelihood; a particle filter over reasoning *steps* then finds good
answers. Here that model is a :class:`~smcjax.FeynmanKac` model run by the shared engine
(:mod:`smcjax.core`).

The Feynman–Kac model
---------------------
A particle :math:`x_t = (y_{1:t}, \text{cache}, \text{reward state}, \text{done})` is a
partial solution of ``t + 1`` steps with its fixed-size token buffer, its KV cache and
its reward bookkeeping (all with the particle axis first, so resampling is the engine's
:func:`~smcjax.core.gather`, KV caches included).

* :math:`M_0`: prefill the prompt ONCE, share it among the ``N`` particles, generate the
  first step; :math:`M_t(x_{t-1}, \cdot)`: generate one more step with the LM
  (temperature 0.8, top-p 1 by default). A step ends at ``"\n\n"``, EOS or ``step_cap``
  tokens. A particle is *finished* after EOS, a step containing ``\boxed``,
  ``max_steps`` steps (40) or ``max_new_tokens`` tokens; finished particles keep their
  text and reward, can be resampled, and never extend.
* Potentials, with :math:`r_t \in (0, 1)` the aggregated reward of the partial solution
  (:mod:`smcjax.llm.rewards`) and :math:`\ell_t = \log\frac{r_t}{1 - r_t}`:

  - ``weights="paper"`` (Algorithm 1): :math:`\log G_t = \ell_t / \tau` and resampling
    at every step, so the resampling probabilities are
    :math:`\mathrm{softmax}(\ell_t / \tau)` (``softmax_temperature`` τ = 1);
  - ``weights="fk"``: a proper Feynman–Kac model, :math:`\log G_t = (\log r_t - \log
    r_{t-1}) / \tau` with :math:`r_{-1} = 1`, so :math:`\prod_s G_s = r_t^{1/\tau}`
    telescopes, resampling is ESS-triggered (``ess_threshold = 0.5``) and
    ``log_evidence`` estimates :math:`\log \mathbb{E}_{p_{LM}}[r_T^{1/\tau}]`;
  - ``weights="entropic"``: as ``"paper"`` with its_hub's ESS-tempered annealing: when
    the ESS of :math:`\mathrm{softmax}(\ell_t)` falls below ``ess_threshold·N`` in the
    first ``early_phase`` of the step budget,
    :math:`\tau_t = \max(1, (1 - t/T) / (\mathrm{ESS}/N))`.

* Final answer: the particle with the highest final reward (``select="argmax"``), or a
  weighted vote of the extracted answers with the final weights (``select="vote"``).

Everything runs as ONE compiled program per (model, reward, options): a
``lax.while_loop`` over steps that stops when every particle is finished, wrapping the
decoding ``lax.while_loop`` over tokens. :func:`particle_filter` runs one question,
:func:`particle_filter_batch` vmaps the same program over many questions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smcjax.core import FeynmanKac, SMCState, build_step
from smcjax.core import init as smc_init
from smcjax.llm import decoding
from smcjax.llm.answers import extract_answer, weighted_vote
from smcjax.llm.rewards import (
    AGGREGATIONS,
    Reward,
    RewardSpec,
    StepInput,
    aggregate,
    get_reward,
    logit,
)
from smcjax.resampling import ess as ess_fn
from smcjax.resampling import get_resampler
from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = [
    "SYSTEM_PROMPT",
    "LLMParticles",
    "PFOptions",
    "ParticleFilterResult",
    "beam_search",
    "best_of_n",
    "format_prompt",
    "greedy",
    "llm_feynman_kac",
    "particle_filter",
    "particle_filter_batch",
    "pattern_table",
    "self_consistency",
    "top_k_resampler",
    "weighted_best_of_n",
]

SYSTEM_PROMPT = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)
WEIGHTS = ("paper", "fk", "entropic")


class PFOptions(NamedTuple):
    """Static options of the LLM particle filter (see :func:`particle_filter`)."""

    max_steps: int = 40
    step_cap: int = 96
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 1.0
    aggregation: str = "model"
    weights: str = "paper"
    softmax_temperature: float = 1.0
    resampling: Any = "multinomial"  # a name or a resampler callable
    ess_threshold: float | None = None  # None: 1.0 for paper/entropic, 0.5 for fk
    early_phase: float = 0.5


class LLMParticles(NamedTuple):
    r"""The particle pytree :math:`x_t` (every leaf has the particle axis first).

    Attributes
    ----------
    decode : DecodeState
        Token buffer, lengths, KV cache, next-token logits, ``done`` flags, log-probs.
    reward_state : pytree
        The reward's own state (e.g. a PRM's KV cache).
    log_scores : Array
        ``(N, max_steps)`` per-step log-scores :math:`\\log s_k` (see rewards).
    step_ends : Array
        ``(N, max_steps)`` buffer position where step ``k`` ends.
    num_steps : Array
        ``(N,)`` steps generated.
    log_reward : Array
        ``(N,)`` aggregated :math:`\\log r_t`.
    finished : Array
        ``(N,)`` EOS, ``\\boxed``, step cap or token budget reached.
    new_tokens : Array
        ``(N,)`` tokens generated at the last step.
    decode_iters : Array
        ``(N,)`` batched forward passes of the last step (same for every particle).
    """

    decode: decoding.DecodeState
    reward_state: ArrayTree
    log_scores: Array
    step_ends: Array
    num_steps: Array
    log_reward: Array
    finished: Array
    new_tokens: Array
    decode_iters: Array


# ------------------------------------------------------------------------- prompts


def format_prompt(
    tokenizer: Any, question: str, system: str = SYSTEM_PROMPT
) -> list[int]:
    """Token ids of the prompt: the chat template with ``system`` when there is one."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ]
        ids = tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = f"{system}\n\nQuestion: {question}\nAnswer: "
    return [int(i) for i in tokenizer(text)["input_ids"]]


# ----------------------------------------------------------------------- the model


def _boxed_in_window(
    table: decoding.StopTable, tokens, start, end, width: int
) -> Array:
    """Whether ``tokens[b, start_b:end_b]`` contains the string of ``table`` (row 0)."""
    j = jnp.arange(width)
    idx = jnp.clip(start[:, None] + j[None, :], 0, tokens.shape[1] - 1)
    toks = jnp.take_along_axis(tokens, idx, axis=1)
    valid = (start[:, None] + j[None, :]) < end[:, None]
    trans, target = table.transitions[0], table.lengths[0]

    def body(carry, inp):
        q, hit = carry
        tok, ok = inp
        q_new = trans[q, tok]
        hit = hit | (ok & (q_new == target))
        return (jnp.where(ok, q_new, q), hit), None

    n = tokens.shape[0]
    init = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))
    (_, hit), _ = jax.lax.scan(body, init, (toks.T, valid.T))
    return hit


def llm_feynman_kac(
    lm: Any,
    reward: Reward,
    reward_params: ArrayTree,
    prompt: Array,
    prompt_len: Array,
    prepared: ArrayTree,
    opts: PFOptions,
    tables: tuple[decoding.StopTable, decoding.StopTable],
    eos_ids: Array,
) -> FeynmanKac:
    r"""Build the LLM particle filter as a vectorized :class:`~smcjax.FeynmanKac`.

    Parameters
    ----------
    lm : LanguageModel
        The policy (a pytree; traced when called under ``jit``).
    reward, reward_params
        A :class:`~smcjax.llm.rewards.Reward` and its device parameters.
    prompt, prompt_len
        ``(P,)`` int32 prompt ids (right-padded) and its length.
    prepared
        ``reward.prepare(question)``.
    opts : PFOptions
    tables
        Automata for ``"\\n\\n"`` (ends a step) and ``"\\boxed"`` (ends a particle).
    eos_ids
        End-of-sequence ids.
    """
    p = prompt.shape[0]
    buf = p + opts.max_new_tokens + reward.extra_slots
    limit = prompt_len + opts.max_new_tokens  # no solution token beyond this slot
    spec = RewardSpec(
        opts.aggregation, opts.step_cap, opts.max_new_tokens, opts.max_steps
    )
    step_table, boxed_table = tables
    t_max = opts.max_steps

    def extend(key, t, x: LLMParticles) -> LLMParticles:
        ds = x.decode._replace(done=x.decode.done | x.finished)
        n = ds.lengths.shape[0]
        active = ~x.finished
        max_new = jnp.clip(jnp.minimum(opts.step_cap, limit - ds.lengths), 0)
        ds, info = decoding.decode(
            lm,
            key,
            ds,
            max_new_tokens=max_new,
            temperature=opts.temperature,
            top_p=opts.top_p,
            stop=step_table,
            eos_ids=eos_ids,
        )
        start, end = info.start_lengths, ds.lengths
        boxed = _boxed_in_window(boxed_table, ds.tokens, start, end, opts.step_cap)
        num_steps = x.num_steps + active.astype(jnp.int32)
        finished = (
            x.finished
            | ds.done
            | (active & boxed)
            | (num_steps >= t_max)
            | (end >= limit)
        )
        inp = StepInput(
            tokens=ds.tokens,
            start=start,
            end=end,
            logprobs=ds.logprobs,
            active=active,
            prompt_len=ds.prompt_lengths,
            lm=lm,
            cache=ds.cache,
            t=jnp.asarray(t, jnp.int32),
        )
        r_state, score = reward.step(reward_params, x.reward_state, inp, spec)
        log_s = jnp.log(jnp.clip(score.astype(jnp.float32), 1e-30, 1.0))
        rows = jnp.arange(n)
        col = jnp.clip(num_steps - 1, 0, t_max - 1)
        log_scores = x.log_scores.at[rows, col].set(
            jnp.where(active, log_s, x.log_scores[rows, col])
        )
        step_ends = x.step_ends.at[rows, col].set(
            jnp.where(active, end, x.step_ends[rows, col])
        )
        log_reward = jnp.where(
            active, aggregate(log_scores, num_steps, opts.aggregation), x.log_reward
        )
        return LLMParticles(
            decode=ds._replace(done=finished),
            reward_state=r_state,
            log_scores=log_scores,
            step_ends=step_ends,
            num_steps=num_steps,
            log_reward=log_reward,
            finished=finished,
            new_tokens=info.num_new_tokens,
            decode_iters=jnp.broadcast_to(info.num_steps, (n,)),
        )

    def init(key, n):
        ds = decoding.prefill(lm, prompt[None], prompt_len[None], buf)
        ds = decoding.broadcast_state(ds, n)
        r_state = reward.init(reward_params, prepared, n, spec)
        x = LLMParticles(
            decode=ds,
            reward_state=r_state,
            log_scores=jnp.zeros((n, t_max), jnp.float32),
            step_ends=jnp.broadcast_to(ds.prompt_lengths[:, None], (n, t_max)),
            num_steps=jnp.zeros((n,), jnp.int32),
            log_reward=jnp.full((n,), jnp.log(0.5), jnp.float32),
            finished=jnp.zeros((n,), bool),
            new_tokens=jnp.zeros((n,), jnp.int32),
            decode_iters=jnp.zeros((n,), jnp.int32),
        )
        return x  # the prompt alone: t = 0 carries no step and uniform weights

    def propagate(key, t, x_prev):
        return extend(key, t, x_prev)

    def log_potential(t, x_prev, x: LLMParticles):
        ell = logit(x.log_reward)
        if opts.weights == "fk":
            prev = 0.0 if x_prev is None else x_prev.log_reward
            return (x.log_reward - prev) / opts.softmax_temperature
        if opts.weights == "entropic":
            n = ell.shape[0]
            ratio = ess_fn(ell) / n
            progress = jnp.asarray(t, jnp.float32) / t_max
            thr = 0.5 if opts.ess_threshold is None else opts.ess_threshold
            tau = jnp.where(
                (ratio < thr) & (progress < opts.early_phase) & (ratio > 0),
                jnp.maximum(1.0, (1.0 - progress) / jnp.maximum(ratio, 1e-12)),
                1.0,
            )
            return ell / (opts.softmax_temperature * tau)
        return ell / opts.softmax_temperature

    return FeynmanKac(init, propagate, log_potential, vectorized=True)


# -------------------------------------------------------------------- the driver


class _Trace(NamedTuple):
    """Device output of one run (per question)."""

    tokens: Array
    lengths: Array
    prompt_length: Array
    step_ends: Array
    num_steps: Array
    finished: Array
    log_scores: Array
    log_rewards: Array
    log_weights: Array
    log_evidence: Array
    ess: Array
    resampled: Array
    ancestors: Array
    weight_history: Array
    tokens_per_step: Array
    decode_iters: Array
    num_iterations: Array
    eos_finished: Array


def _run(
    key: PRNGKey,
    lm: Any,
    reward_params: ArrayTree,
    prompt: Array,
    prompt_len: Array,
    prepared: ArrayTree,
    *,
    reward: Reward,
    num_particles: int,
    opts: PFOptions,
    tables,
    eos_ids: tuple[int, ...],
) -> _Trace:
    n, t_max = num_particles, opts.max_steps + 1  # t = 0 is the shared prompt
    eos = jnp.asarray(eos_ids, jnp.int32)
    model = llm_feynman_kac(
        lm, reward, reward_params, prompt, prompt_len, prepared, opts, tables, eos
    )
    thr = opts.ess_threshold
    if opts.weights == "entropic":
        thr = 1.0  # its_hub resamples every step; ess_threshold triggers the annealing
    elif thr is None:
        thr = 0.5 if opts.weights == "fk" else 1.0
    step = build_step(
        model, resampling=get_resampler(opts.resampling), ess_threshold=thr
    )
    k0, k_loop = jax.random.split(key)
    state, info0 = smc_init(k0, model, n)

    def record(buf, t, state: SMCState, info, x: LLMParticles):
        return {
            "ess": buf["ess"].at[t].set(info.ess),
            "resampled": buf["resampled"].at[t].set(info.resampled),
            "ancestors": buf["ancestors"].at[t].set(info.ancestors),
            "weights": buf["weights"].at[t].set(state.log_weights),
            "tokens": buf["tokens"].at[t].set(jnp.sum(x.new_tokens)),
            "iters": buf["iters"].at[t].set(x.decode_iters[0]),
        }

    buf0 = {
        "ess": jnp.zeros((t_max,), jnp.float32),
        "resampled": jnp.zeros((t_max,), bool),
        "ancestors": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (t_max, n)),
        "weights": jnp.full((t_max, n), -jnp.inf, jnp.float32),
        "tokens": jnp.zeros((t_max,), jnp.int32),
        "iters": jnp.zeros((t_max,), jnp.int32),
    }
    buf0 = record(buf0, 0, state, info0, state.particles)

    def cond(c):
        st, _, t = c
        return (t < t_max) & ~jnp.all(st.particles.finished)

    def body(c):
        st, buf, t = c
        st, info = step(jax.random.fold_in(k_loop, t), st)
        return st, record(buf, t, st, info, st.particles), t + 1

    state, buf, t_end = jax.lax.while_loop(
        cond, body, (state, buf0, jnp.ones((), jnp.int32))
    )
    x: LLMParticles = state.particles
    ds = x.decode
    last = jnp.take_along_axis(ds.tokens, jnp.maximum(ds.lengths - 1, 0)[:, None], 1)[
        :, 0
    ]
    return _Trace(
        tokens=ds.tokens,
        lengths=ds.lengths,
        prompt_length=prompt_len,
        step_ends=x.step_ends,
        num_steps=x.num_steps,
        finished=x.finished,
        log_scores=x.log_scores,
        log_rewards=x.log_reward,
        log_weights=state.log_weights,
        log_evidence=state.log_evidence,
        ess=buf["ess"],
        resampled=buf["resampled"],
        ancestors=buf["ancestors"],
        weight_history=buf["weights"],
        tokens_per_step=buf["tokens"],
        decode_iters=buf["iters"],
        num_iterations=t_end,
        eos_finished=jnp.any(last[:, None] == eos[None, :], axis=-1),
    )


_COMPILED: dict[Any, Any] = {}
_BUCKET = 128  # prompts are right-padded to a multiple of this: few compilations


def _executable(
    reward: Reward, n: int, opts: PFOptions, lm: Any, tables, batched, args
):
    """AOT-compiled run for these static options and argument shapes (cached).

    Returns ``(executable, seconds spent compiling now)``.
    """
    shapes = tuple(
        (np.shape(a), str(np.result_type(a))) for a in jax.tree.leaves(args[3:])
    )
    key = (
        reward.name,
        id(reward.step),
        n,
        opts,
        lm.config,
        tuple(lm.eos_ids),
        id(tables[0]),
        batched,
        shapes,
    )
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit[0], 0.0
    eos_ids = tuple(int(i) for i in lm.eos_ids)

    def run(k, lm_, params, prompt, plen, prepared):
        return _run(
            k,
            lm_,
            params,
            prompt,
            plen,
            prepared,
            reward=reward,
            num_particles=n,
            opts=opts,
            tables=tables,
            eos_ids=eos_ids,
        )

    if batched:
        run = jax.vmap(run, in_axes=(0, None, None, 0, 0, 0))
    t0 = time.perf_counter()
    exe = jax.jit(run).lower(*args).compile()
    _COMPILED[key] = (exe, reward, tables)  # keep the ids in the key alive
    return exe, time.perf_counter() - t0


# ------------------------------------------------------------------------ results


class ParticleFilterResult(NamedTuple):
    r"""Result of :func:`particle_filter` (host-side, NumPy and Python objects).

    Attributes
    ----------
    answer : str or None
        Final answer of the selected particle (or the weighted vote).
    selected : int
        Index of the selected particle.
    texts : list of str
        Every particle's solution text.
    steps : list of list of str
        Every particle's steps.
    answers : list of str or None
        The answer extracted from each particle.
    log_weights : np.ndarray
        ``(N,)`` final normalised log-weights.
    rewards : np.ndarray
        ``(N,)`` final aggregated rewards :math:`r`.
    step_scores : list of np.ndarray
        Per-particle per-step scores :math:`s_k` (the ancestry's, carried along).
    log_evidence : float
        :math:`\\log\\hat Z` (meaningful with ``weights="fk"``).
    ess, resampled : np.ndarray
        ``(T,)`` per filter step (T = steps actually run).
    ancestors : np.ndarray
        ``(T, N)`` genealogy (``ancestors[t, n]`` is the parent at ``t-1`` of particle
        ``n`` at ``t``).
    weight_history : np.ndarray
        ``(T, N)`` normalised log-weights after each step.
    tokens_generated : int
        Total tokens generated over all particles (the compute budget).
    tokens_per_step : np.ndarray
        ``(T,)``.
    decode_iters : np.ndarray
        ``(T,)`` batched forward passes per step (≥ the longest step).
    finished : np.ndarray
        ``(N,)`` bool.
    wall_time : float
        Seconds (compilation included on a first call, see ``compile_time``).
    compile_time : float
        Seconds spent tracing/compiling on this call (0 when cached).
    tokens, lengths : np.ndarray
        ``(N, S)`` token buffers (prompt first) and their lengths.
    step_ends : np.ndarray
        ``(N, max_steps)`` buffer position where each particle's step ``k`` ends.
    """

    answer: str | None
    selected: int
    texts: list[str]
    steps: list[list[str]]
    answers: list[str | None]
    log_weights: np.ndarray
    rewards: np.ndarray
    step_scores: list[np.ndarray]
    log_evidence: float
    ess: np.ndarray
    resampled: np.ndarray
    ancestors: np.ndarray
    weight_history: np.ndarray
    tokens_generated: int
    tokens_per_step: np.ndarray
    decode_iters: np.ndarray
    finished: np.ndarray
    wall_time: float
    compile_time: float
    tokens: np.ndarray
    lengths: np.ndarray
    step_ends: np.ndarray

    @property
    def text(self) -> str:
        """The selected particle's solution."""
        return self.texts[self.selected]


def _decode_text(tokenizer: Any, ids: np.ndarray) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def _to_result(tr: _Trace, tokenizer: Any, select: str, wall: float, comp: float):
    tr = jax.tree.map(np.asarray, tr)
    n = tr.lengths.shape[0]
    t_run = int(tr.num_iterations)
    p0 = int(tr.prompt_length)
    texts, steps, scores = [], [], []
    for i in range(n):
        k = int(tr.num_steps[i])
        ends = [p0] + [int(e) for e in tr.step_ends[i, :k]]
        parts = [
            _decode_text(tokenizer, tr.tokens[i, ends[j] : ends[j + 1]])
            for j in range(k)
        ]
        steps.append([s.strip("\n") for s in parts])
        texts.append("".join(parts))
        scores.append(np.exp(tr.log_scores[i, :k]))
    answers = [extract_answer(t) for t in texts]
    log_r = tr.log_rewards
    if select in ("vote", "majority"):
        w = np.exp(tr.log_weights - np.max(tr.log_weights))
        answer = weighted_vote(answers, list(w) if select == "vote" else None)
        cands = [i for i in range(n) if answers[i] is not None and answers[i] == answer]
        selected = (
            max(cands, key=lambda i: log_r[i]) if cands else int(np.argmax(log_r))
        )
    else:
        selected = int(np.argmax(log_r))
        answer = answers[selected]
    return ParticleFilterResult(
        answer=answer,
        selected=selected,
        texts=texts,
        steps=steps,
        answers=answers,
        log_weights=tr.log_weights,
        rewards=np.exp(log_r),
        step_scores=scores,
        log_evidence=float(tr.log_evidence),
        ess=tr.ess[:t_run],
        resampled=tr.resampled[:t_run],
        ancestors=tr.ancestors[:t_run],
        weight_history=tr.weight_history[:t_run],
        tokens_generated=int(tr.tokens_per_step[:t_run].sum()),
        tokens_per_step=tr.tokens_per_step[:t_run],
        decode_iters=tr.decode_iters[:t_run],
        finished=tr.finished,
        wall_time=wall,
        compile_time=comp,
        tokens=tr.tokens,
        lengths=tr.lengths,
        step_ends=tr.step_ends,
    )


def _options(**options: Any) -> tuple[PFOptions, str]:
    select = options.pop("select", "argmax")
    if select not in ("argmax", "vote", "majority"):
        raise ValueError(
            f"select must be 'argmax', 'vote' or 'majority', got {select!r}"
        )
    unknown = set(options) - set(PFOptions._fields)
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; expected {list(PFOptions._fields)} "
            "or select"
        )
    opts = PFOptions(**options)
    if opts.aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation={opts.aggregation!r}; expected one of {AGGREGATIONS}"
        )
    if opts.weights not in WEIGHTS:
        raise ValueError(f"unknown weights={opts.weights!r}; expected one of {WEIGHTS}")
    for name in ("max_steps", "step_cap", "max_new_tokens"):
        v = getattr(opts, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not opts.softmax_temperature > 0:
        raise ValueError(
            f"softmax_temperature must be > 0, got {opts.softmax_temperature}"
        )
    get_resampler(opts.resampling)  # raises on an unknown name
    return opts, select


def _tables(lm: Any):
    return lm.stop_table("\n\n"), pattern_table(lm, "\\boxed")


def pattern_table(lm: Any, pattern: str) -> decoding.StopTable:
    r"""Token-level substring automaton for ``pattern`` (cached on ``lm``).

    Same table as :func:`smcjax.llm.decoding.stop_table` (``transitions[0, q, v]`` = the
    matched prefix length after token ``v`` from state ``q``, ``len(pattern)`` on a full
    match), built faster: every prefix of the pattern starts with its first character,
    so a token without that character can only *continue* a partial match, which is a
    string comparison; only the few tokens holding that character (``\`` for
    ``oxed``) go through the general automaton step.
    """
    cache = lm.__dict__.setdefault("_pattern_tables", {})
    if pattern in cache:
        return cache[pattern]
    m = len(pattern)
    texts = decoding.token_texts(lm.tokenizer, lm.config.vocab_size)
    table = np.zeros((1, m, len(texts)), np.int32)
    for v, t in enumerate(texts):
        if not t:
            continue
        if pattern[0] in t:
            for q in range(m):
                table[0, q, v] = decoding._kmp_step(pattern, q, t)
            continue
        for q in range(1, m):
            rest = pattern[q:]
            if rest.startswith(t):
                table[0, q, v] = q + len(t)
            elif t.startswith(rest):
                table[0, q, v] = m
    out = decoding.StopTable(jnp.asarray(table), jnp.asarray([m], jnp.int32))
    cache[pattern] = out
    return out


def _pad(rows: Sequence[np.ndarray], fill: int = 0, multiple: int = 1) -> np.ndarray:
    m = max(len(r) for r in rows)
    m = -(-m // multiple) * multiple
    out = np.full((len(rows), m), fill, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def particle_filter(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    **options: Any,
) -> ParticleFilterResult:
    r"""Step-level particle filtering of ``lm`` guided by ``reward`` (Puri et al. 2025).

    Parameters
    ----------
    key : PRNGKey
    lm : LanguageModel
        The policy, with a tokenizer (e.g. ``smcjax.llm.load(...)``).
    reward : str or Reward
        ``"self-certainty"``, ``"judge"``, ``"arithmetic"``, or a
        :class:`~smcjax.llm.rewards.Reward` (e.g. ``prm_reward(load_prm(src))``).
    question : str
    num_particles : int
        ``N``.
    **options
        ``max_steps`` (40), ``step_cap`` (96 tokens per step), ``max_new_tokens`` (512
        per particle), ``temperature`` (0.8), ``top_p`` (1.0), ``aggregation``
        (``"model"``, ``"last"``, ``"min"``, ``"prod"``), ``weights`` (``"paper"``,
        ``"fk"``, ``"entropic"``), ``softmax_temperature`` (1.0), ``resampling``
        (``"multinomial"`` or any smcjax resampler), ``ess_threshold`` (resample when
        the ESS falls below this fraction of N: 1.0 — every step — for paper, 0.5 for
        fk; for entropic, resampling is every step and this is the ESS ratio below
        which the weights are tempered, default 0.5), ``early_phase`` (0.5),
        ``select`` (``"argmax"``, ``"vote"`` weighted by the final weights, or
        ``"majority"``).

    Returns
    -------
    ParticleFilterResult
    """
    n = _check_n(num_particles)
    rw = get_reward(reward, lm)
    opts, select = _options(**options)
    tok = lm.tokenizer
    if tok is None:
        raise ValueError("lm must have a tokenizer to take a text question")
    ids = np.asarray(format_prompt(tok, question), np.int32)
    prompt = _pad([ids], multiple=_BUCKET)[0]
    prepared = jax.tree.map(lambda a: _pad_leaf([a]), rw.prepare(question))
    prepared = jax.tree.map(lambda a: a[0], prepared)
    args = (key, lm, rw.params, prompt, np.int32(len(ids)), prepared)
    t0 = time.perf_counter()
    exe, comp = _executable(rw, n, opts, lm, _tables(lm), False, args)
    tr = jax.block_until_ready(exe(*args))
    wall = time.perf_counter() - t0
    return _to_result(tr, tok, select, wall, comp)


def particle_filter_batch(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    questions: Sequence[str],
    num_particles: int,
    **options: Any,
) -> list[ParticleFilterResult]:
    """:func:`particle_filter` for many questions in ONE vmapped program.

    Question ``q`` uses ``jax.random.split(key, len(questions))[q]``, or ``key[q]``
    when ``key`` is an array of one key per question (shape ``(len(questions),)``,
    so that a question's randomness need not depend on the batch it lands in); with
    the same keys, each result equals a separate :func:`particle_filter` run up to
    float round-off (prompts are right-padded to a common length). ``wall_time`` of
    each result is the batch's total.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of strings, not one string")
    n = _check_n(num_particles)
    rw = get_reward(reward, lm)
    opts, select = _options(**options)
    tok = lm.tokenizer
    prompts = [np.asarray(format_prompt(tok, q), np.int32) for q in questions]
    plens = np.asarray([len(p) for p in prompts], np.int32)
    prompt = _pad(prompts, multiple=_BUCKET)
    prepared_list = [rw.prepare(q) for q in questions]
    prepared = jax.tree.map(lambda *xs: _pad_leaf(xs), *prepared_list)
    if jnp.ndim(key) == 0 or (
        not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
        and jnp.ndim(key) == 1
    ):
        keys = jax.random.split(key, len(questions))
    else:
        keys = key
        if keys.shape[0] != len(questions):
            raise ValueError(
                f"key holds {keys.shape[0]} keys but there are {len(questions)} "
                "questions; pass one key or one key per question"
            )
    args = (keys, lm, rw.params, prompt, plens, prepared)
    t0 = time.perf_counter()
    exe, comp = _executable(rw, n, opts, lm, _tables(lm), True, args)
    tr = jax.block_until_ready(exe(*args))
    wall = time.perf_counter() - t0
    out = []
    for q in range(len(questions)):
        tq = jax.tree.map(lambda a, q=q: a[q], tr)
        out.append(_to_result(tq, tok, select, wall, comp))
    return out


def _pad_leaf(xs: Sequence[Any]) -> np.ndarray:
    """Stack per-question arrays; 1-d token arrays are right-padded to a bucket."""
    arrs = [np.asarray(x) for x in xs]
    if arrs[0].ndim == 1 and np.issubdtype(arrs[0].dtype, np.integer):
        return _pad(arrs, multiple=_BUCKET)
    return np.stack(arrs)


def _check_n(num_particles: Any) -> int:
    if isinstance(num_particles, bool) or not isinstance(
        num_particles, int | np.integer
    ):
        raise TypeError(f"num_particles must be an int, got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    return int(num_particles)


# ---------------------------------------------------------------------- baselines


def best_of_n(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    **options: Any,
) -> ParticleFilterResult:
    r"""Best-of-N: ``N`` independent solutions, the one with the highest final reward.

    The same program as :func:`particle_filter` with ``weights="fk"`` and no
    resampling (``ess_threshold=0``): the samples are independent draws from the LM, and
    the final weights are :math:`W^n \propto r_T^n` (the reward of each full solution;
    with ``aggregation="model"`` the reward model acts as an outcome reward model).
    """
    opts = {**options, "weights": "fk", "ess_threshold": 0.0, "select": "argmax"}
    return particle_filter(key, lm, reward, question, num_particles, **opts)


def weighted_best_of_n(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    **options: Any,
) -> ParticleFilterResult:
    """Weighted best-of-N: ``N`` independent solutions, answers voted with r_T."""
    opts = {**options, "weights": "fk", "ess_threshold": 0.0, "select": "vote"}
    return particle_filter(key, lm, reward, question, num_particles, **opts)


def self_consistency(
    key: PRNGKey,
    lm: Any,
    question: str,
    num_particles: int,
    reward: str | Reward = "self-certainty",
    **options: Any,
) -> ParticleFilterResult:
    """Self-consistency (Wang et al. 2023): majority vote over ``N`` answers.

    ``reward`` is only recorded (the default, self-certainty, costs nothing).
    """
    opts = {**options, "weights": "fk", "ess_threshold": 0.0, "select": "majority"}
    return particle_filter(key, lm, reward, question, num_particles, **opts)


def greedy(
    key: PRNGKey, lm: Any, question: str, **options: Any
) -> ParticleFilterResult:
    """One greedy solution (temperature 0), with the same step bookkeeping and caps.

    Splitting a greedy decode into steps does not change its tokens, so this is plain
    greedy decoding up to the step and token caps; ``key`` is unused by the sampler.
    """
    opts = {**options, "temperature": 0.0, "ess_threshold": 0.0, "weights": "fk"}
    return particle_filter(key, lm, "self-certainty", question, 1, **opts)


_TOP_K: dict[int, Any] = {}


def top_k_resampler(beam_width: int):
    """Return beam search's deterministic "resampler".

    It keeps the ``N / beam_width`` particles of highest weight and copies each
    ``beam_width`` times (ties broken by index).
    """
    if beam_width not in _TOP_K:

        def resample(key, log_weights, num_samples=None):
            n = log_weights.shape[0]
            m = n if num_samples is None else num_samples
            keep = max(m // beam_width, 1)
            top = jnp.argsort(-jnp.nan_to_num(log_weights, nan=-jnp.inf))[:keep]
            idx = jnp.repeat(top, beam_width, total_repeat_length=keep * beam_width)
            idx = (
                jnp.concatenate([idx, top[: m - idx.shape[0]]])
                if m > idx.shape[0]
                else idx
            )
            return idx[:m].astype(jnp.int32)

        _TOP_K[beam_width] = resample
    return _TOP_K[beam_width]


def beam_search(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    beam_width: int = 4,
    **options: Any,
) -> ParticleFilterResult:
    """Step-level beam search guided by the reward (as in its_hub / Snell et al. 2024).

    ``N`` partial solutions; after every step the ``N / beam_width`` with the highest
    reward are kept and each is extended by ``beam_width`` sampled next steps. This is
    :func:`particle_filter` with a deterministic top-k "resampler"
    (:func:`top_k_resampler`) in place of random resampling.
    """
    if not isinstance(beam_width, int) or not 1 <= beam_width <= num_particles:
        raise ValueError(
            f"beam_width must be an int in [1, num_particles], got {beam_width!r}"
        )
    opts = {
        **options,
        "resampling": top_k_resampler(beam_width),
        "weights": "paper",
        "ess_threshold": 1.0,
        "select": options.get("select", "argmax"),
    }
    return particle_filter(key, lm, reward, question, num_particles, **opts)
