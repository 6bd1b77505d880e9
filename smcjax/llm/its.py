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

Idle rows: a step ends when its longest row ends. With ``speculate=True`` rows that
finished earlier start their next step meanwhile and, after resampling, the first copy
of each particle keeps those tokens (:func:`_step_decode` explains why the law is
unchanged). It is off by default: the number of sequential forward passes per step is
set by the longest fresh row, which speculation cannot shorten, and on the embedded
model it saved no time (``benchmarks/results_llm_pf.md``). With ``compact=True`` the
batch shrinks to the rows still generating (halving down to one row), which makes the
tail of a step cheaper: on the embedded model 1.11x the tokens/s, for about 5x the
compile time, so it is off by default. It helps :func:`particle_filter` only: in
:func:`particle_filter_batch` the questions run its levels in lock-step under ``vmap``
(measured 1.3-1.4x slower), and it warns.

Particle Gibbs (:func:`particle_gibbs`) and parallel tempering
(:func:`parallel_tempering`) run conditional sweeps of the same program: slot 0 replays
a reference trajectory (tokens, KV cache, rewards) and the resampling pins it.

Everything runs as ONE compiled program per (model, reward, options): a
``lax.while_loop`` over steps that stops when every particle is finished, wrapping the
decoding ``lax.while_loop`` over tokens. :func:`particle_filter` runs one question,
:func:`particle_filter_batch` vmaps the same program over many questions.
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smcjax.core import FeynmanKac, SMCState, build_step
from smcjax.core import init as smc_init
from smcjax.llm import decoding
from smcjax.llm.answers import extract_answer, weighted_vote
from smcjax.llm.model import init_cache
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
from smcjax.resampling import get_conditional_resampler, get_resampler
from smcjax.types import Array, ArrayTree, PRNGKey

__all__ = [
    "SYSTEM_PROMPT",
    "GibbsResult",
    "LLMParticles",
    "PFOptions",
    "ParticleFilterResult",
    "beam_search",
    "best_of_n",
    "format_prompt",
    "greedy",
    "llm_feynman_kac",
    "parallel_tempering",
    "particle_filter",
    "particle_filter_batch",
    "particle_gibbs",
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
    speculate: bool = False
    step_delimiter: str = "\n\n"
    compact: bool = False


class Speculation(NamedTuple):
    """Tokens a particle generated past its last scored step, while others caught up.

    Attributes
    ----------
    matcher : Array
        ``(N, n_stop)`` step-delimiter automaton state after those tokens.
    num_tokens : Array
        ``(N,)`` how many (``decode.lengths - boundary``).
    complete : Array
        ``(N,)`` bool: they already form a whole step (ended by the delimiter, EOS or
        a cap), so the next step is ready without decoding.
    reason : Array
        ``(N,)`` why that step ended (a :mod:`~smcjax.llm.decoding` stop reason).
    """

    matcher: Array
    num_tokens: Array
    complete: Array
    reason: Array


class Reference(NamedTuple):
    r"""A particle Gibbs reference trajectory, replayed in slot 0 of a sweep.

    Attributes
    ----------
    tokens, logprobs, proposal_logprobs : Array
        ``(S,)`` its token buffer and per-token log-probabilities.
    cache : KVCache
        Its KV cache (batch axis of size 1), valid below its final length.
    step_ends : Array
        ``(T,)`` buffer position where each of its steps ends.
    num_steps : Array
        ``()`` its number of steps.
    step_logits : Array
        ``(T, V)`` next-token logits at each step end (what a fork continues from).
    log_reward : Array
        ``()`` its final aggregated :math:`\log r` (for the swap ratio).
    active : Array
        ``()`` bool; ``False`` in a first sweep, which has no reference yet.
    """

    tokens: Array
    logprobs: Array
    proposal_logprobs: Array
    cache: Any
    step_ends: Array
    num_steps: Array
    step_logits: Array
    log_reward: Array
    active: Array


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
    decode_rows : Array
        ``(N,)`` rows computed over those passes (same for every particle).
    boundary : Array
        ``(N,)`` end of the last scored step (the committed length); with speculation
        ``decode.lengths`` may run past it.
    boundary_logits : Array
        ``(N, V)`` next-token logits at ``boundary`` (restored when a copy drops the
        speculative tokens of its ancestor).
    spec : Speculation
        State of the tokens generated past ``boundary`` (see :func:`_step_decode`).
    origin : Array
        ``(N,)`` row index before resampling (``arange(N)`` after every step); after the
        engine's gather, the first row holding each origin keeps its speculation.
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
    decode_rows: Array
    boundary: Array
    boundary_logits: Array
    spec: Speculation
    origin: Array


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


def _step_decode(
    lm: Any,
    key: PRNGKey,
    ds: decoding.DecodeState,
    spec: Speculation,
    boundary: Array,
    boundary_logits: Array,
    active: Array,
    *,
    limit: Array,
    step_cap: int,
    temperature: float,
    top_p: float,
    stop: decoding.StopTable,
    eos_ids: Array,
    speculate: bool,
    compact: bool = False,
) -> tuple[decoding.DecodeState, Array, Array, Array, Array, Speculation, Array, Array]:
    r"""Generate one reasoning step for every active particle, speculating when idle.

    A step ends at the delimiter (``stop``), an EOS id, ``step_cap`` tokens or the slot
    ``limit``. The batched forward pass runs until the *last* active row ends its
    step; with ``speculate`` a row that ended its step meanwhile does not idle: it goes
    on sampling its *next* step (until that one ends too) instead of burning its row
    of the batch on masked work. Those tokens are kept past ``boundary`` and, after
    the engine resamples, continued by the first copy of the particle (see
    :func:`llm_feynman_kac`); the other copies drop them.

    Why this leaves the filter exact: the speculative tokens of particle :math:`i` are
    drawn from :math:`p_{LM}(\cdot \mid x^i_{0:t})` with randomness independent of
    the step-:math:`t` weights (the reward scores tokens up to the boundary only) and
    of the other particles' tokens; pausing the sampler at a time set by *other*
    rows and resuming later does not change the law of an autoregressive sample. So
    one copy of each resampled ancestor may use them as its step :math:`t + 1`, and
    the remaining copies draw theirs afresh: given the resampled prefixes, the next
    steps are independent draws from the LM, as in the plain algorithm.

    With ``compact`` the batch shrinks as rows finish: once at most :math:`\lceil
    B/2 \rceil` rows still generate, they are gathered (tokens, KV cache, logits,
    automaton states) into a batch of that size, which runs until at most a quarter
    generate, and so on down to one row; each level is scattered back into its parent
    batch when it ends. A forward pass over :math:`b < B` rows costs less than one
    over :math:`B` (on this CPU 8 rows cost ~0.67× of 16), so the tail of a step,
    where one or two long rows run alone, gets cheaper. Every row's tokens are drawn
    from its own next-token distribution whatever batch it sits in, so the law of the
    step is unchanged; the random draws (and so the texts for a given key) differ
    from the uncompacted run. One LM body is compiled per level
    (:math:`1 + \lceil\log_2 B\rceil` of them). With ``speculate`` the rows that
    speculate count as generating, so the batch only shrinks as rows go idle.

    Returns
    -------
    ds : DecodeState
        ``lengths`` includes the speculative tokens.
    end : Array
        ``(N,)`` end of the step just completed (``boundary`` for inactive rows).
    reason : Array
        ``(N,)`` its stop reason (``NOT_RUN`` for inactive rows).
    boundary_logits : Array
        ``(N, V)`` next-token logits at ``end``.
    iters : Array
        Number of batched forward passes.
    spec : Speculation
        The speculative tokens' state after this call.
    spec_tokens : Array
        ``(N,)`` speculative tokens generated in this call.
    row_passes : Array
        Rows computed, summed over the forward passes (``iters · N`` without
        ``compact``): the decoding work.
    """
    b = ds.tokens.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    n_stop = stop.transitions.shape[0]
    not_run = jnp.int32(decoding.NOT_RUN)
    # phase 0: inside the step to score; 1: speculating the next one; 2: idle.
    ready = active & spec.complete  # the step to score is already there
    ends_particle = (spec.reason == decoding.EOS) | (ds.lengths >= limit)
    phase0 = jnp.where(
        ~active,
        2,
        jnp.where(ready, jnp.where(ends_particle | (not speculate), 2, 1), 0),
    ).astype(jnp.int32)

    class Carry(NamedTuple):
        ds: decoding.DecodeState
        key: Array
        phase: Array
        end: Array
        reason: Array
        blogits: Array
        matcher: Array
        seg: Array  # tokens in the current segment (step or speculation)
        sreason: Array
        spec_tokens: Array
        it: Array
        work: Array

    fresh_seg = ready  # rows whose step is ready start a new (speculative) segment
    init = Carry(
        ds=ds,
        key=key,
        phase=phase0,
        end=jnp.where(ready, ds.lengths, boundary),
        reason=jnp.where(ready, spec.reason, not_run),
        blogits=jnp.where(ready[:, None], ds.logits, boundary_logits),
        matcher=jnp.where(fresh_seg[:, None], 0, spec.matcher),
        seg=jnp.where(fresh_seg, 0, spec.num_tokens),
        sreason=jnp.full((b,), not_run),
        spec_tokens=jnp.zeros((b,), jnp.int32),
        it=jnp.zeros((), jnp.int32),
        work=jnp.zeros((), jnp.int32),
    )

    def body(c: Carry) -> Carry:
        st = c.ds
        nb, s = st.tokens.shape
        rows = jnp.arange(nb)
        gen = c.phase < 2
        key, sub = jax.random.split(c.key)
        tok, lp, lq = decoding.sample_tokens(sub, st.logits, temperature, top_p)
        write = jnp.where(gen, st.lengths, s)  # out of range -> dropped
        tokens = st.tokens.at[rows, write].set(tok, mode="drop")
        logprobs = st.logprobs.at[rows, write].set(lp, mode="drop")
        proposal = st.proposal_logprobs.at[rows, write].set(lq, mode="drop")
        lengths = st.lengths + gen
        seg = c.seg + gen
        is_eos = gen & jnp.any(tok[:, None] == eos[None, :], axis=-1)
        matcher = stop.transitions[jnp.arange(n_stop)[None, :], c.matcher, tok[:, None]]
        matched = gen & jnp.any(matcher == stop.lengths[None, :], axis=-1)
        capped = gen & ((seg >= step_cap) | (lengths >= limit))
        why = jnp.where(
            is_eos,
            decoding.EOS,
            jnp.where(matched, decoding.STOP_SEQUENCE, decoding.MAX_NEW_TOKENS),
        ).astype(jnp.int32)
        ended = is_eos | matched | capped
        logits, cache = lm(tok[:, None], write[:, None], st.cache)
        logits = jnp.where(gen[:, None], logits[:, 0], st.logits)
        fin0 = (c.phase == 0) & ended  # the step to score ends here
        fin1 = (c.phase == 1) & ended  # the speculative step ends here
        goes_on = speculate & ~is_eos & (lengths < limit)
        phase = jnp.where(
            fin0, jnp.where(goes_on, 1, 2), jnp.where(fin1, 2, c.phase)
        ).astype(jnp.int32)
        st = st._replace(
            tokens=tokens,
            lengths=lengths,
            cache=cache,
            logits=logits,
            logprobs=logprobs,
            proposal_logprobs=proposal,
        )
        return Carry(
            ds=st,
            key=key,
            phase=phase,
            end=jnp.where(fin0, lengths, c.end),
            reason=jnp.where(fin0, why, c.reason),
            blogits=jnp.where(fin0[:, None], logits, c.blogits),
            matcher=jnp.where(fin0[:, None], 0, matcher),
            seg=jnp.where(fin0, 0, seg),
            sreason=jnp.where(fin1, why, c.sreason),
            spec_tokens=c.spec_tokens + (gen & (c.phase == 1)),
            it=c.it + 1,
            work=c.work + nb,
        )

    def loop(c: Carry, floor: int) -> Carry:
        """Decode while a row is inside its step and more than ``floor`` generate."""

        def cond(c: Carry) -> Array:
            go = jnp.any(c.phase == 0)
            return go & (jnp.sum(c.phase < 2) > floor) if floor else go

        return jax.lax.while_loop(cond, body, c)

    shared = ("key", "it", "work")  # the fields without a batch axis

    def run(c: Carry, size: int) -> Carry:
        if not compact or size <= 1:
            return loop(c, 0)
        half = (size + 1) // 2
        c = loop(c, half)

        def shrink(c: Carry) -> Carry:
            # the rows that still generate first (at most ``half`` of them)
            idx = jnp.argsort(c.phase >= 2, stable=True)[:half]
            take = {
                f: jax.tree.map(lambda a: a[idx], getattr(c, f))
                for f in Carry._fields
                if f not in shared
            }
            sub = run(c._replace(**take), half)
            put = {
                f: jax.tree.map(
                    lambda a, v: a.at[idx].set(v, unique_indices=True),
                    getattr(c, f),
                    getattr(sub, f),
                )
                for f in Carry._fields
                if f not in shared
            }
            return c._replace(**put, **{f: getattr(sub, f) for f in shared})

        return jax.lax.cond(jnp.any(c.phase == 0), shrink, lambda c: c, c)

    out = run(init, b)
    new_spec = Speculation(
        matcher=out.matcher,
        num_tokens=out.ds.lengths - out.end,
        complete=out.sreason != not_run,
        reason=out.sreason,
    )
    return (
        out.ds,
        out.end,
        out.reason,
        out.blogits,
        out.it,
        new_spec,
        out.spec_tokens,
        out.work,
    )


def _replay_reference(
    ref: Reference,
    ds: decoding.DecodeState,
    end: Array,
    blogits: Array,
    spec: Speculation,
    num_steps: Array,
    active: Array,
):
    """Overwrite slot 0 with the reference's next step (when ``ref.active``).

    Only row 0 is touched (``.at[0].set``), so the cost is one row of the cache.
    Returns the updated ``(ds, end, blogits, spec, is_ref)``; ``is_ref`` is the
    ``(N,)`` mask of the replayed row.
    """
    n = end.shape[0]
    on = ref.active & active[0]
    k = jnp.clip(num_steps[0], 0, ref.step_ends.shape[0] - 1)  # 0-based step index
    e0 = ref.step_ends[k]
    lg = ref.step_logits[k]

    def put(a, v):
        return a.at[0].set(jnp.where(on, v.astype(a.dtype), a[0]))

    cache = jax.tree.map(lambda c, r: put(c, r[0]), ds.cache, ref.cache)
    ds = ds._replace(
        tokens=put(ds.tokens, ref.tokens),
        logprobs=put(ds.logprobs, ref.logprobs),
        proposal_logprobs=put(ds.proposal_logprobs, ref.proposal_logprobs),
        cache=cache,
        lengths=put(ds.lengths, e0),
        logits=put(ds.logits, lg),
    )
    spec = jax.tree.map(lambda a: put(a, jnp.zeros_like(a[0])), spec)
    is_ref = (jnp.arange(n) == 0) & on
    return ds, put(end, e0), put(blogits, lg), spec, is_ref


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
    *,
    reference: Reference | None = None,
    softmax_temperature: Array | None = None,
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
    reference : Reference, optional
        Conditional SMC (particle Gibbs): when ``reference.active``, slot 0 replays the
        reference trajectory step by step instead of sampling (pair it with a
        conditional resampler that pins slot 0). Other slots may fork from it.
    softmax_temperature : Array, optional
        A traced τ overriding ``opts.softmax_temperature`` (one per tempered chain).
    """
    p = prompt.shape[0]
    tau = (
        opts.softmax_temperature if softmax_temperature is None else softmax_temperature
    )
    buf = p + opts.max_new_tokens + reward.extra_slots
    limit = prompt_len + opts.max_new_tokens  # no solution token beyond this slot
    spec_r = RewardSpec(
        opts.aggregation, opts.step_cap, opts.max_new_tokens, opts.max_steps
    )
    step_table, boxed_table = tables
    t_max = opts.max_steps

    def extend(key, t, x: LLMParticles) -> LLMParticles:
        n = x.finished.shape[0]
        rows = jnp.arange(n)
        active = ~x.finished
        # After resampling, the first row holding each ancestor continues its
        # speculative tokens; the other copies go back to the scored boundary.
        first = jnp.full((n,), n, jnp.int32).at[x.origin].min(rows)
        keep = (first[x.origin] == rows) & active
        ds = x.decode._replace(
            lengths=jnp.where(keep, x.decode.lengths, x.boundary),
            logits=jnp.where(keep[:, None], x.decode.logits, x.boundary_logits),
        )
        spec = Speculation(
            matcher=jnp.where(keep[:, None], x.spec.matcher, 0),
            num_tokens=jnp.where(keep, x.spec.num_tokens, 0),
            complete=keep & x.spec.complete,
            reason=jnp.where(keep, x.spec.reason, decoding.NOT_RUN),
        )
        ds, end, why, blogits, iters, spec, _, work = _step_decode(
            lm,
            key,
            ds,
            spec,
            x.boundary,
            x.boundary_logits,
            active,
            limit=limit,
            step_cap=opts.step_cap,
            temperature=opts.temperature,
            top_p=opts.top_p,
            stop=step_table,
            eos_ids=eos_ids,
            speculate=opts.speculate,
            compact=opts.compact,
        )
        start = x.boundary
        num_steps = x.num_steps + active.astype(jnp.int32)
        is_ref = jnp.zeros((n,), bool)
        if reference is not None:
            ds, end, blogits, spec, is_ref = _replay_reference(
                reference, ds, end, blogits, spec, x.num_steps, active
            )
        boxed = _boxed_in_window(boxed_table, ds.tokens, start, end, opts.step_cap)
        finished = (
            x.finished
            | (active & (why == decoding.EOS))
            | (active & boxed)
            | (num_steps >= t_max)
            | (end >= limit)
        )
        if reference is not None:  # the reference ends where it ended
            finished = jnp.where(
                is_ref, x.finished | (num_steps >= reference.num_steps), finished
            )
        # a finished particle's text ends at its last step: drop its speculation
        ds = ds._replace(
            lengths=jnp.where(finished, end, ds.lengths),
            logits=jnp.where(finished[:, None], blogits, ds.logits),
            done=ds.done | finished,
        )
        spec = jax.tree.map(
            lambda a: jnp.where(
                finished.reshape((n,) + (1,) * (a.ndim - 1)), jnp.zeros_like(a), a
            ),
            spec,
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
        r_state, score = reward.step(reward_params, x.reward_state, inp, spec_r)
        log_s = jnp.log(jnp.clip(score.astype(jnp.float32), 1e-30, 1.0))
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
            decode=ds,
            reward_state=r_state,
            log_scores=log_scores,
            step_ends=step_ends,
            num_steps=num_steps,
            log_reward=log_reward,
            finished=finished,
            new_tokens=jnp.where(active & ~is_ref, end - start, 0),
            decode_iters=jnp.broadcast_to(iters, (n,)),
            decode_rows=jnp.broadcast_to(work, (n,)),
            boundary=end,
            boundary_logits=blogits,
            spec=spec,
            origin=rows,
        )

    def init(key, n):
        ds = decoding.prefill(lm, prompt[None], prompt_len[None], buf)
        ds = decoding.broadcast_state(ds, n)
        r_state = reward.init(reward_params, prepared, n, spec_r)
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
            decode_rows=jnp.zeros((n,), jnp.int32),
            boundary=ds.lengths,
            boundary_logits=ds.logits,
            spec=Speculation(
                matcher=jnp.zeros((n, step_table.transitions.shape[0]), jnp.int32),
                num_tokens=jnp.zeros((n,), jnp.int32),
                complete=jnp.zeros((n,), bool),
                reason=jnp.zeros((n,), jnp.int32),
            ),
            origin=jnp.arange(n, dtype=jnp.int32),
        )
        return x  # the prompt alone: t = 0 carries no step and uniform weights

    def propagate(key, t, x_prev):
        return extend(key, t, x_prev)

    def log_potential(t, x_prev, x: LLMParticles):
        ell = logit(x.log_reward)
        if opts.weights == "fk":
            prev = 0.0 if x_prev is None else x_prev.log_reward
            return (x.log_reward - prev) / tau
        if opts.weights == "entropic":
            n = ell.shape[0]
            ratio = ess_fn(ell) / n
            progress = jnp.asarray(t, jnp.float32) / t_max
            thr = 0.5 if opts.ess_threshold is None else opts.ess_threshold
            anneal = jnp.where(
                (ratio < thr) & (progress < opts.early_phase) & (ratio > 0),
                jnp.maximum(1.0, (1.0 - progress) / jnp.maximum(ratio, 1e-12)),
                1.0,
            )
            return ell / (tau * anneal)
        return ell / tau

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
    decode_rows: Array
    num_iterations: Array
    eos_finished: Array


def _run(*args: Any, **kwargs: Any) -> _Trace:
    """One particle-filter run (see :func:`_sweep`); the device trace only."""
    return _sweep(*args, **kwargs)[0]


def _sweep(
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
    reference: Reference | None = None,
    softmax_temperature: Array | None = None,
) -> tuple[_Trace, SMCState]:
    """One run of the filter (a conditional one with ``reference``): trace, state."""
    n, t_max = num_particles, opts.max_steps + 1  # t = 0 is the shared prompt
    eos = jnp.asarray(eos_ids, jnp.int32)
    model = llm_feynman_kac(
        lm,
        reward,
        reward_params,
        prompt,
        prompt_len,
        prepared,
        opts,
        tables,
        eos,
        reference=reference,
        softmax_temperature=softmax_temperature,
    )
    thr = opts.ess_threshold
    if opts.weights == "entropic":
        thr = 1.0  # its_hub resamples every step; ess_threshold triggers the annealing
    elif thr is None:
        thr = 0.5 if opts.weights == "fk" else 1.0
    resampler = get_resampler(opts.resampling)
    if reference is not None:
        conditional = get_conditional_resampler(opts.resampling)
        plain = resampler

        def resampler(k, lw, m=None):  # slot 0 (the reference) keeps itself
            return jnp.where(
                reference.active, conditional(k, lw, 0, m), plain(k, lw, m)
            )

    step = build_step(model, resampling=resampler, ess_threshold=thr)
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
            "rows": buf["rows"].at[t].set(x.decode_rows[0]),
        }

    buf0 = {
        "ess": jnp.zeros((t_max,), jnp.float32),
        "resampled": jnp.zeros((t_max,), bool),
        "ancestors": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (t_max, n)),
        "weights": jnp.full((t_max, n), -jnp.inf, jnp.float32),
        "tokens": jnp.zeros((t_max,), jnp.int32),
        "iters": jnp.zeros((t_max,), jnp.int32),
        "rows": jnp.zeros((t_max,), jnp.int32),
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
    trace = _Trace(
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
        decode_rows=buf["rows"],
        num_iterations=t_end,
        eos_finished=jnp.any(last[:, None] == eos[None, :], axis=-1),
    )
    return trace, state


_COMPILED: dict[Any, Any] = {}
_BUCKET = 128  # prompts are right-padded to a multiple of this: few compilations


def _executable(
    reward: Reward, n: int, opts: PFOptions, lm: Any, tables, batched, args
):
    """AOT-compiled run for these static options and argument shapes (cached).

    Returns ``(executable, seconds spent compiling now)``.
    """
    # Every argument's tree structure and leaf shapes/dtypes are in the key: two models
    # (or reward parameter trees) with equal configs may still differ in structure.
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple(
        (np.shape(a), str(a.dtype if hasattr(a, "dtype") else np.result_type(a)))
        for a in leaves
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
        treedef,
        shapes,
    )
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit[0], 0.0
    eos_ids = tuple(int(i) for i in lm.eos_ids)

    common = dict(
        reward=reward, num_particles=n, opts=opts, tables=tables, eos_ids=eos_ids
    )
    if isinstance(batched, tuple):  # ("gibbs", temperatures, iterations)
        _, taus, iters = batched
        fn = functools.partial(
            _gibbs, temperatures=taus, num_iterations=iters, **common
        )
    else:
        fn = functools.partial(_run, **common)

    run = fn
    if batched is True:  # many questions, one program
        run = jax.vmap(fn, in_axes=(0, None, None, 0, 0, 0))
    t0 = time.perf_counter()
    exe = jax.jit(run).lower(*args).compile()
    _COMPILED[key] = (exe, reward, tables)  # keep the ids in the key alive
    return exe, time.perf_counter() - t0


# ------------------------------------------------- particle Gibbs, parallel tempering


class _GibbsStats(NamedTuple):
    reference_log_rewards: Array  # (K, M) after each sweep (and swap)
    swap_acceptance: Array  # (K, M - 1) Metropolis probabilities, NaN if not tried
    tokens: Array  # (K, M) tokens generated per sweep and chain


def _final_log_target(log_reward: Array, weights: str) -> Array:
    """``ℓ(x)``: the final log-weight at τ = 1 (``logit r``; ``log r`` for fk)."""
    return log_reward if weights == "fk" else logit(log_reward)


def _take_reference(
    key: PRNGKey, lm: Any, state: SMCState, opts: PFOptions
) -> Reference:
    r"""Draw the next reference :math:`j \sim \mathrm{softmax}(\log w_T)`."""
    x: LLMParticles = state.particles
    ds = x.decode
    j = jax.random.categorical(key, state.log_weights)
    s = ds.tokens.shape[1]
    toks = ds.tokens[j]
    cache = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, j, 1, 0), ds.cache)
    # logits at each step end, for forks of the reference: one cache-free pass
    h, _ = lm.hidden(toks[None], jnp.arange(s, dtype=jnp.int32)[None])
    idx = jnp.clip(x.step_ends[j] - 1, 0, s - 1)
    step_logits = lm.head(h[0, idx]).astype(jnp.float32)
    return Reference(
        tokens=toks,
        logprobs=ds.logprobs[j],
        proposal_logprobs=ds.proposal_logprobs[j],
        cache=cache,
        step_ends=x.step_ends[j],
        num_steps=x.num_steps[j],
        step_logits=step_logits,
        log_reward=x.log_reward[j],
        active=jnp.ones((), bool),
    )


def _swap_references(
    key: PRNGKey, refs: Reference, taus: Array, parity: Array, weights: str
) -> tuple[Reference, Array]:
    r"""Replica exchange of the references of adjacent chains (Puri et al., Eq. 4).

    Chain :math:`k` targets :math:`\pi_k(x) \propto p_{LM}(x)\, e^{\ell(x)/T_k}`;
    swapping the references of chains :math:`k, k+1` is accepted with probability
    :math:`\min\{1, \exp[(\ell_{k+1} - \ell_k)(1/T_k - 1/T_{k+1})]\}`. Pairs
    :math:`(k, k+1)` with :math:`k \equiv` ``parity`` (mod 2) are tried together
    (they are disjoint); alternating the parity between sweeps gives the
    deterministic even/odd scheme.
    """
    m = taus.shape[0]
    ell = _final_log_target(refs.log_reward, weights)
    k = jnp.arange(m - 1)
    log_a = (ell[1:] - ell[:-1]) * (1.0 / taus[:-1] - 1.0 / taus[1:])
    prob = jnp.exp(jnp.minimum(log_a, 0.0))
    tried = (k % 2) == parity
    accept = tried & (jax.random.uniform(key, (m - 1,)) < prob)
    idx = jnp.arange(m)
    lo = jnp.concatenate([accept, jnp.zeros((1,), bool)])  # k swaps with k + 1
    hi = jnp.concatenate([jnp.zeros((1,), bool), accept])  # k swaps with k - 1
    perm = jnp.where(lo, idx + 1, jnp.where(hi, idx - 1, idx))
    refs = jax.tree.map(lambda a: a[perm], refs)
    return refs, jnp.where(tried, prob, jnp.nan)


def _gibbs(
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
    temperatures: tuple[float, ...],
    num_iterations: int,
) -> tuple[_Trace, _GibbsStats]:
    """Particle Gibbs sweeps of ``M = len(temperatures)`` chains, swaps between them.

    Returns the traces of every chain's last sweep (chain axis first) and the
    per-sweep statistics.
    """
    m = len(temperatures)
    taus = jnp.asarray(temperatures, jnp.float32)

    def sweep(k, ref, tau):
        return _sweep(
            k,
            lm,
            reward_params,
            prompt,
            prompt_len,
            prepared,
            reward=reward,
            num_particles=num_particles,
            opts=opts,
            tables=tables,
            eos_ids=eos_ids,
            reference=ref,
            softmax_temperature=tau,
        )

    chains = jax.vmap(sweep)
    take = jax.vmap(lambda k, st: _take_reference(k, lm, st, opts))
    # an inactive reference with the right shapes: the first sweep is a plain filter
    buf = prompt.shape[0] + opts.max_new_tokens + reward.extra_slots
    one_cache = init_cache(lm.config, 1, buf, lm.dtype)
    ref0 = Reference(
        tokens=jnp.zeros((m, buf), jnp.int32),
        logprobs=jnp.zeros((m, buf), jnp.float32),
        proposal_logprobs=jnp.zeros((m, buf), jnp.float32),
        cache=jax.tree.map(lambda c: jnp.zeros((m, *c.shape), c.dtype), one_cache),
        step_ends=jnp.zeros((m, opts.max_steps), jnp.int32),
        num_steps=jnp.zeros((m,), jnp.int32),
        step_logits=jnp.zeros((m, opts.max_steps, lm.config.vocab_size), jnp.float32),
        log_reward=jnp.zeros((m,), jnp.float32),
        active=jnp.zeros((m,), bool),
    )

    def body(refs, inp):
        i, k = inp
        k_sweep, k_take, k_swap = jax.random.split(k, 3)
        tr, st = chains(jax.random.split(k_sweep, m), refs, taus)
        refs = take(jax.random.split(k_take, m), st)
        if m > 1:
            refs, acc = _swap_references(k_swap, refs, taus, i % 2, opts.weights)
        else:
            acc = jnp.zeros((0,), jnp.float32)
        tokens = jnp.sum(tr.tokens_per_step, axis=-1)
        return refs, (tr, _GibbsStats(refs.log_reward, acc, tokens))

    keys = jax.random.split(key, num_iterations)
    steps = jnp.arange(num_iterations)

    def scan_body(r, inp):
        r, (_, stats) = body(r, inp)
        return r, stats

    refs, early = jax.lax.scan(scan_body, ref0, (steps[:-1], keys[:-1]))
    # the last sweep's traces are the output (the scan carries only the references)
    _, (tr, last) = body(refs, (steps[-1], keys[-1]))
    stats = jax.tree.map(
        lambda e, x: jnp.concatenate([e, x[None]], axis=0), early, last
    )
    return tr, stats


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
    decode_rows : np.ndarray
        ``(T,)`` rows computed over those passes (``decode_iters · N`` unless
        ``compact=True`` shrank the batch).
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
    decode_rows: np.ndarray
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
        decode_rows=tr.decode_rows[:t_run],
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


def _tables(lm: Any, delimiter: str = "\n\n"):
    return lm.stop_table(delimiter), pattern_table(lm, "\\boxed")


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
    # Concrete arrays even when first asked for inside a jit trace: a tracer cached
    # on ``lm`` would leak into every later program.
    with jax.ensure_compile_time_eval():
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


def _question_args(key: PRNGKey, lm: Any, rw: Reward, question: str) -> tuple:
    """Arguments of one question's compiled run: prompt padded to a bucket, etc."""
    if lm.tokenizer is None:
        raise ValueError("lm must have a tokenizer to take a text question")
    ids = np.asarray(format_prompt(lm.tokenizer, question), np.int32)
    prompt = _pad([ids], multiple=_BUCKET)[0]
    prepared = jax.tree.map(lambda a: _pad_leaf([a]), rw.prepare(question))
    prepared = jax.tree.map(lambda a: a[0], prepared)
    return (key, lm, rw.params, prompt, np.int32(len(ids)), prepared)


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
        ``speculate`` (False; True lets rows that ended their step start the next
        one while the batch waits, see :func:`_step_decode`), ``compact`` (False;
        True shrinks the batch to the rows still generating as a step's rows end,
        see :func:`_step_decode`), ``step_delimiter``
        (``"\n\n"``), ``select`` (``"argmax"``, ``"vote"`` weighted by the final
        weights, or ``"majority"``).

    Returns
    -------
    ParticleFilterResult
    """
    n = _check_n(num_particles)
    rw = get_reward(reward, lm)
    opts, select = _options(**options)
    tok = lm.tokenizer
    args = _question_args(key, lm, rw, question)
    t0 = time.perf_counter()
    exe, comp = _executable(
        rw, n, opts, lm, _tables(lm, opts.step_delimiter), False, args
    )
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

    ``compact=True`` is allowed but slows a batch of several questions down (a
    warning says so): under ``vmap`` every question runs every compaction level in
    lock-step with the others, and the levels' ``lax.cond`` becomes a select. On
    the embedded model, 2 questions × 8 particles took 1.3–1.4× longer per question
    with it (``benchmarks/RESULTS.md``). Use it with :func:`particle_filter`.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of strings, not one string")
    n = _check_n(num_particles)
    rw = get_reward(reward, lm)
    opts, select = _options(**options)
    if opts.compact and len(questions) > 1:
        warnings.warn(
            "compact=True slows particle_filter_batch down: under vmap every question "
            "runs every compaction level in lock-step (measured 1.3-1.4x slower per "
            "question on the embedded model); use it with particle_filter",
            RuntimeWarning,
            stacklevel=2,
        )
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
    exe, comp = _executable(
        rw, n, opts, lm, _tables(lm, opts.step_delimiter), True, args
    )
    tr = jax.block_until_ready(exe(*args))
    wall = time.perf_counter() - t0
    out = []
    for q in range(len(questions)):
        tq = jax.tree.map(lambda a, q=q: a[q], tr)
        out.append(_to_result(tq, tok, select, wall, comp))
    return out


class GibbsResult(NamedTuple):
    r"""Result of :func:`particle_gibbs` / :func:`parallel_tempering`.

    ``result`` describes the last sweep of the target chain (τ = the option
    ``softmax_temperature``, the coldest), with the same fields as
    :func:`particle_filter`'s result; ``answer``, ``texts``, ``log_weights`` and the
    other :class:`ParticleFilterResult` fields are forwarded to it, except
    ``tokens_generated`` and ``wall_time``, which cover every sweep of every chain.

    Attributes
    ----------
    result : ParticleFilterResult
    tokens_generated : int
        Fresh tokens over all sweeps and chains (the replayed references excluded).
    wall_time, compile_time : float
    temperatures : np.ndarray
        ``(M,)`` the chains' softmax temperatures, hottest first.
    reference_log_rewards : np.ndarray
        ``(K, M)`` :math:`\log r` of each chain's reference after each sweep.
    swap_acceptance : np.ndarray
        ``(K, M-1)`` Metropolis acceptance probability of each attempted swap of
        adjacent chains (NaN where the pair was not tried that sweep).
    tokens_per_sweep : np.ndarray
        ``(K, M)``.
    """

    result: ParticleFilterResult
    tokens_generated: int
    wall_time: float
    compile_time: float
    temperatures: np.ndarray
    reference_log_rewards: np.ndarray
    swap_acceptance: np.ndarray
    tokens_per_sweep: np.ndarray

    def __getattr__(self, name: str) -> Any:
        if name in ParticleFilterResult._fields or name == "text":
            return getattr(self.result, name)
        raise AttributeError(name)


def _gibbs_call(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    num_iterations: int,
    temperatures: tuple[float, ...],
    options: dict[str, Any],
) -> GibbsResult:
    n = _check_n(num_particles)
    if n < 2:
        raise ValueError(
            f"num_particles must be >= 2 for particle Gibbs (slot 0 holds the "
            f"reference), got {n}"
        )
    if (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, int | np.integer)
        or num_iterations < 1
    ):
        raise ValueError(
            f"num_iterations must be a positive int, got {num_iterations!r}"
        )
    rw = get_reward(reward, lm)
    opts, select = _options(**options)
    if callable(opts.resampling):
        raise ValueError(
            "particle Gibbs needs a resampling name with a conditional version "
            "('multinomial', 'systematic' or 'stratified'), not a callable"
        )
    get_conditional_resampler(opts.resampling)
    tok = lm.tokenizer
    args = _question_args(key, lm, rw, question)
    kind = ("gibbs", tuple(float(t) for t in temperatures), int(num_iterations))
    t0 = time.perf_counter()
    exe, comp = _executable(
        rw, n, opts, lm, _tables(lm, opts.step_delimiter), kind, args
    )
    tr, stats = jax.block_until_ready(exe(*args))
    wall = time.perf_counter() - t0
    target = jax.tree.map(lambda a: a[-1], tr)  # the coldest chain
    res = _to_result(target, tok, select, wall, comp)
    stats = jax.tree.map(np.asarray, stats)
    return GibbsResult(
        result=res,
        tokens_generated=int(stats.tokens.sum()),
        wall_time=wall,
        compile_time=comp,
        temperatures=np.asarray(temperatures, np.float32),
        reference_log_rewards=stats.reference_log_rewards,
        swap_acceptance=stats.swap_acceptance,
        tokens_per_sweep=stats.tokens,
    )


def particle_gibbs(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    num_iterations: int = 4,
    **options: Any,
) -> GibbsResult:
    r"""Particle Gibbs over reasoning steps (Puri et al. 2025, Algorithm 2).

    Sweep 1 is :func:`particle_filter`. After each sweep a reference trajectory
    :math:`x^\star` is drawn from the final weights,
    :math:`\Pr(x^\star = x^j) = \mathrm{softmax}(\log w_T)_j`; the next sweep is a
    conditional particle filter: slot 0 replays :math:`x^\star` step by step (its
    tokens, KV cache and rewards), the other ``N - 1`` particles are fresh, and the
    resampling is conditional (slot 0 keeps itself; the others may fork from it).
    With ``weights="fk"`` this is the particle Gibbs kernel of Andrieu, Doucet &
    Holenstein (2010), which leaves :math:`\pi(x) \propto p_{LM}(x)\,
    r(x)^{1/\tau}` invariant; with the paper's weights it is the paper's heuristic.

    Parameters
    ----------
    key, lm, reward, question, num_particles
        As :func:`particle_filter` (``num_particles >= 2``).
    num_iterations : int
        Sweeps ``K`` (4). The budget is about ``K`` particle filters (the reference's
        replayed tokens are not counted).
    **options
        As :func:`particle_filter`; ``resampling`` must have a conditional version
        (``"multinomial"``, ``"systematic"``, ``"stratified"``).

    Returns
    -------
    GibbsResult
        The last sweep's particles (answer: the highest final reward, or ``select``).
    """
    tau = float(options.get("softmax_temperature", 1.0))
    return _gibbs_call(
        key, lm, reward, question, num_particles, num_iterations, (tau,), options
    )


def parallel_tempering(
    key: PRNGKey,
    lm: Any,
    reward: str | Reward,
    question: str,
    num_particles: int,
    num_iterations: int = 4,
    *,
    num_chains: int = 4,
    max_temperature: float = 4.0,
    temperatures: Sequence[float] | None = None,
    **options: Any,
) -> GibbsResult:
    r"""Parallel tempering of particle Gibbs chains (Puri et al. 2025, Algorithm 3).

    ``M`` particle Gibbs chains (:func:`particle_gibbs`) run side by side in one
    vmapped program, chain :math:`k` with softmax temperature :math:`T_k`
    (resampling probabilities :math:`\mathrm{softmax}(\ell / T_k)`, hottest first,
    the last one the target :math:`T_M` = ``softmax_temperature``). After each sweep
    adjacent chains propose to swap their references, accepted with probability
    :math:`\min\{1, \exp[(\ell_{k+1} - \ell_k)(1/T_k - 1/T_{k+1})]\}` (Eq. 4), with
    :math:`\ell` the final log-weight at :math:`T = 1` (:math:`\mathrm{logit}\, r`;
    :math:`\log r` for ``weights="fk"``); even and odd pairs alternate between
    sweeps.

    Parameters
    ----------
    key, lm, reward, question, num_particles, num_iterations
        As :func:`particle_gibbs`.
    num_chains : int
        ``M`` (4); ignored when ``temperatures`` is given.
    max_temperature : float
        :math:`T_1`; the default ladder is geometric from it down to
        ``softmax_temperature``.
    temperatures : sequence of float, optional
        The ladder :math:`T_1 > \dots > T_M` itself.
    **options
        As :func:`particle_filter`.

    Returns
    -------
    GibbsResult
        The target chain's last sweep, with swap statistics. Budget: about
        ``M · K`` particle filters.
    """
    tau = float(options.get("softmax_temperature", 1.0))
    if temperatures is None:
        if not isinstance(num_chains, int | np.integer) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
        if not max_temperature >= tau:
            raise ValueError(
                f"max_temperature must be >= softmax_temperature ({tau}), got "
                f"{max_temperature}"
            )
        m = int(num_chains)
        temps = tuple(
            float(tau * (max_temperature / tau) ** ((m - 1 - k) / max(m - 1, 1)))
            for k in range(m)
        )
        if m == 1:
            temps = (tau,)
    else:
        temps = tuple(float(t) for t in temperatures)
        if not temps or any(not t > 0 for t in temps):
            raise ValueError(f"temperatures must be positive, got {temperatures!r}")
        if any(a <= b for a, b in itertools.pairwise(temps)):
            raise ValueError(
                f"temperatures must be strictly decreasing (hottest first), got {temps}"
            )
    return _gibbs_call(
        key, lm, reward, question, num_particles, num_iterations, temps, options
    )


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
