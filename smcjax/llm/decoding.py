r"""Functional, jit-friendly batched decoding with a KV cache.

This module is the interface between the language models and the SMC engine: a batch
of sequences (particles) is a :class:`DecodeState` whose every leaf has the batch axis
FIRST, so resampling is ``jax.tree.map(lambda x: x[ancestors], state)``.

API
---
``state = prefill(model, prompt_tokens, prompt_lengths, max_len)``
    Runs the prompts (right-padded ``(B, P)`` int32 with their lengths ``(B,)``) through
    the model once, filling a KV cache of ``max_len`` slots per row, and keeps the
    next-token logits. ``prefill_shared(model, prompt, num_copies, max_len)`` prefills
    ONE prompt and broadcasts it to ``num_copies`` rows (prompt sharing; see also
    :func:`broadcast_state`).

``state, info = decode(model, key, state, *, max_new_tokens, temperature=1.0,
top_p=1.0, stop=None, eos_ids=())``
    Continues every row that is not ``done`` from its current length until it emits a
    stop sequence, an EOS id (then ``done=True``), ``max_new_tokens`` new tokens in this
    call, or fills its buffer (then ``done=True``). Rows that are done, or that stopped
    earlier in this call, do not change. A ``lax.while_loop`` with fixed shapes; call it
    repeatedly (one reasoning step per call) and gather the state between calls.
    ``info.stop_reason`` says why each row stopped in this call (:data:`NOT_RUN`,
    :data:`STOP_SEQUENCE`, :data:`EOS`, :data:`MAX_NEW_TOKENS`, :data:`BUFFER_FULL`).

``stop = stop_table(tokenizer, ["\n\n"])`` / ``stop_table_from_ids([[...]], vocab)``
    Precomputes, on the host, a token-level automaton for stop strings, so that stops
    are detected on token ids inside the loop without decoding text. For a stop string
    ``s`` and a matched prefix length ``q``, ``transitions[q, v]`` is the length of the
    longest prefix of ``s`` that is a suffix of ``s[:q] + text(v)``, or ``len(s)`` when
    ``s`` occurs in it. Thus ``"\n\n"`` is found whether the tokenizer emits it as one
    token, as two ``"\n"`` tokens, or inside ``".\n\n"`` or ``".\n" + "\n"``.
    Matching starts afresh at every :func:`decode` call.

Conventions
-----------
* Row ``b`` holds its tokens at buffer slots ``0..lengths[b]-1`` (right padding);
  slots ``>= lengths[b]`` are 0 in ``tokens``, and unused (not attended) in the cache.
* ``state.logits[b]`` are the raw next-token logits after ``tokens[b, :lengths[b]]``.
* ``state.logprobs[b, j]`` is the log-probability of generated token ``j`` under the
  RAW model, :math:`\log p(x_j \mid x_{<j})` (temperature 1, no top-p) — what SMC
  weights and self-certainty need. ``state.proposal_logprobs[b, j]`` is its
  log-probability under the distribution it was actually sampled from
  (temperature / top-p), i.e. the proposal :math:`q`. Greedy decoding
  (``temperature=0``) records 0 there. Prompt slots hold 0 in both.
* Sampling: temperature ``τ`` gives :math:`q \propto p^{1/τ}`; ``top_p < 1``
  restricts :math:`q` to the smallest set of most likely tokens whose mass reaches
  ``top_p`` (nucleus); ``τ = 0`` is greedy.

Performance notes
-----------------
* Jit the caller and donate the state (``jax.jit(..., donate_argnums=...)``) so the
  cache is updated in place; inside the loop the cache is never copied.
* Choose ``max_len`` as a multiple of 256 (and >= 512) for long buffers: decode then
  attends only to the cache blocks that hold tokens (see ``model._blocked_attention``)
  instead of all ``max_len`` slots.
* ``top_p=1`` (static) skips the sort over the vocabulary; a draw costs one uniform
  per row and a scan of block sums (:func:`_inverse_cdf`), and a Python
  ``temperature <= 0`` compiles the greedy path only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smcjax.llm.model import KVCache, Transformer, init_cache
from smcjax.types import Array, ArrayLike, PRNGKey

__all__ = [
    "BUFFER_FULL",
    "EOS",
    "MAX_NEW_TOKENS",
    "NOT_RUN",
    "STOP_SEQUENCE",
    "DecodeInfo",
    "DecodeState",
    "StopTable",
    "broadcast_state",
    "decode",
    "prefill",
    "prefill_shared",
    "sample_tokens",
    "stop_table",
    "stop_table_from_ids",
    "token_texts",
]

#: ``DecodeInfo.stop_reason`` codes.
NOT_RUN, STOP_SEQUENCE, EOS, MAX_NEW_TOKENS, BUFFER_FULL = 0, 1, 2, 3, 4


class DecodeState(NamedTuple):
    """A batch of sequences being decoded; every leaf has the batch axis first.

    Attributes
    ----------
    tokens : Array
        ``(B, S)`` int32, prompt then generated tokens, 0 after ``lengths``.
    lengths : Array
        ``(B,)`` int32, number of valid tokens.
    prompt_lengths : Array
        ``(B,)`` int32, length of the prompt part.
    cache : KVCache
        Keys and values of the valid tokens, batch axis first on every leaf:
        ``num_layers`` arrays ``(B, K, S, d)`` (unrolled layers) or one
        ``(B, num_layers, K, S, d)`` array (scanned layers).
    logits : Array
        ``(B, V)`` float32 raw next-token logits.
    done : Array
        ``(B,)`` bool; the row emitted EOS or filled its buffer and never extends again.
    logprobs : Array
        ``(B, S)`` float32 raw-model log-probability of each generated token.
    proposal_logprobs : Array
        ``(B, S)`` float32 log-probability under the sampling distribution.
    """

    tokens: Array
    lengths: Array
    prompt_lengths: Array
    cache: KVCache
    logits: Array
    done: Array
    logprobs: Array
    proposal_logprobs: Array


class DecodeInfo(NamedTuple):
    """Per-row summary of one :func:`decode` call.

    Attributes
    ----------
    start_lengths : Array
        ``(B,)`` lengths on entry; the new tokens are ``tokens[b, start:lengths[b]]``.
    num_new_tokens : Array
        ``(B,)`` int32.
    stop_reason : Array
        ``(B,)`` int32: :data:`NOT_RUN` (done on entry), :data:`STOP_SEQUENCE`,
        :data:`EOS`, :data:`MAX_NEW_TOKENS`, :data:`BUFFER_FULL`.
    logprob : Array
        ``(B,)`` sum of the raw-model log-probabilities of the new tokens.
    proposal_logprob : Array
        ``(B,)`` sum of their sampling-distribution log-probabilities.
    num_steps : Array
        Scalar, iterations of the loop (batched forward passes).
    """

    start_lengths: Array
    num_new_tokens: Array
    stop_reason: Array
    logprob: Array
    proposal_logprob: Array
    num_steps: Array


class StopTable(NamedTuple):
    """Token-level automata for stop sequences (see the module docstring).

    Attributes
    ----------
    transitions : Array
        ``(n, Q, V)`` int32: new matched length of stop ``i`` after a token, from
        matched length ``q < Q``; ``Q`` is the longest stop length.
    lengths : Array
        ``(n,)`` int32: stop ``i`` is matched when its state reaches ``lengths[i]``.
    """

    transitions: Array
    lengths: Array


# ------------------------------------------------------------------ stop sequences


def _kmp_step(stop: Sequence[Any], q: int, piece: Sequence[Any]) -> int:
    """Automaton step over a whole token ``piece`` (a string or a tuple of symbols)."""
    m = len(stop)
    seq = list(stop[:q]) + list(piece)
    # Full occurrence anywhere in seq → matched.
    for i in range(len(seq) - m + 1):
        if seq[i : i + m] == list(stop):
            return m
    for k in range(min(m - 1, len(seq)), 0, -1):
        if seq[len(seq) - k :] == list(stop[:k]):
            return k
    return 0


def _build_table(
    stops: Sequence[Sequence[Any]], pieces: Sequence[Sequence[Any]]
) -> StopTable:
    if not stops:
        raise ValueError("stop: at least one stop sequence is required")
    if any(len(s) == 0 for s in stops):
        raise ValueError("stop: empty stop sequence")
    q_max = max(len(s) for s in stops)
    vocab = len(pieces)
    table = np.zeros((len(stops), q_max, vocab), np.int32)
    for i, s in enumerate(stops):
        symbols = set(s)
        for v, piece in enumerate(pieces):
            if not symbols.intersection(piece):
                continue  # a token sharing no symbol with s resets the match to 0
            for q in range(len(s)):
                table[i, q, v] = _kmp_step(s, q, piece)
    return StopTable(
        jnp.asarray(table), jnp.asarray([len(s) for s in stops], jnp.int32)
    )


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Decode every token id ``0..vocab_size-1`` alone ("" beyond the tokenizer)."""
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode(
        [[i] for i in range(n)],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    return list(texts) + [""] * (vocab_size - n)


def stop_table(
    tokenizer: Any, stops: Sequence[str], vocab_size: int | None = None
) -> StopTable:
    r"""Stop automaton for text stop strings, from the tokenizer's token texts.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    stops : sequence of str
        E.g. ``["\n\n"]``.
    vocab_size : int, optional
        The model's vocabulary size (may exceed ``len(tokenizer)``).
    """
    if isinstance(stops, str):
        stops = [stops]
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    return _build_table(list(stops), token_texts(tokenizer, vocab_size))


def stop_table_from_ids(stops: Sequence[Sequence[int]], vocab_size: int) -> StopTable:
    """Stop automaton for token-id sequences (each token one symbol)."""
    stops = [tuple(int(t) for t in s) for s in stops]
    return _build_table(stops, [(v,) for v in range(vocab_size)])


# ------------------------------------------------------------------------ sampling


#: Block width of the two-level inverse-CDF sampler (:func:`_inverse_cdf`).
SAMPLER_BLOCK = 128


def _inverse_cdf(key: PRNGKey, weights: Array) -> Array:
    r"""One draw per row from unnormalised weights ``(B, V)`` with ONE uniform per row.

    Exact two-level inverse-CDF sampling: with the vocabulary cut into blocks of
    :data:`SAMPLER_BLOCK` entries (the last one zero-padded), block sums
    :math:`s_k` and their running totals :math:`c_k = \sum_{l \le k} s_l`, a uniform
    :math:`u \sim U[0, c_{last})` selects the first block with :math:`c_k > u`, and
    :math:`r = u - c_{k-1}` selects inside that block the first entry whose running
    total exceeds ``r``. Only the block sums and one block per row are scanned (no
    cumulative sum over the whole vocabulary, no sort, no Gumbel variate per entry).
    Both searches use strict ``>``, so an entry of weight 0 is never returned (``r`` is
    clamped below the block's own total to absorb the rounding difference between a
    reduction and a cumulative sum).
    """
    b, v = weights.shape
    c = SAMPLER_BLOCK
    nb = -(-v // c)
    if nb * c != v:
        weights = jnp.pad(weights, ((0, 0), (0, nb * c - v)))
    blocks = weights.reshape(b, nb, c)
    csum = jnp.cumsum(blocks.sum(axis=-1), axis=-1)  # (B, nb)
    total = csum[:, -1]
    u = jax.random.uniform(key, (b,), jnp.float32) * total
    u = jnp.minimum(u, jnp.nextafter(total, 0.0))
    k = jnp.minimum(jnp.sum(csum <= u[:, None], axis=-1), nb - 1)
    before = jnp.where(k > 0, jnp.take_along_axis(csum, (k - 1)[:, None], 1)[:, 0], 0.0)
    inner = jnp.cumsum(jnp.take_along_axis(blocks, k[:, None, None], 1)[:, 0], axis=-1)
    r = jnp.minimum(jnp.maximum(u - before, 0.0), jnp.nextafter(inner[:, -1], 0.0))
    j = jnp.minimum(jnp.sum(inner <= r[:, None], axis=-1), c - 1)
    # (A row of zero weights, e.g. NaN logits, is clamped into the vocabulary.)
    return jnp.minimum(k * c + j, v - 1).astype(jnp.int32)


def sample_tokens(
    key: PRNGKey, logits: Array, temperature: ArrayLike = 1.0, top_p: float = 1.0
) -> tuple[Array, Array, Array]:
    r"""Sample one token per row from ``softmax(logits / τ)`` with nucleus ``top_p``.

    With :math:`m = \max_v \ell_v`, the raw log-probability of token ``x`` is
    :math:`\log p(x) = (\ell_x - m) - \log \sum_v e^{\ell_v - m}` and the proposal
    weights are :math:`w_v = e^{(\ell_v - m)/τ}` (0 outside the nucleus), so
    :math:`\log q(x) = \log w_x - \log \sum_v w_v`. Only these two log-normalisers
    and the chosen entries are computed (no full ``log_softmax``); the draw is
    :func:`_inverse_cdf` on ``w`` (one uniform per row).

    Parameters
    ----------
    key : PRNGKey
    logits : Array
        ``(B, V)`` raw logits.
    temperature : ArrayLike
        ``τ > 0`` samples from :math:`q \propto p^{1/τ}`; ``τ <= 0`` is greedy. May be
        traced; a Python number ``<= 0`` skips the sampler at trace time.
    top_p : float
        Static nucleus mass; ``1.0`` disables it (and its sort over the vocabulary).

    Returns
    -------
    tokens : Array
        ``(B,)`` int32.
    logprob : Array
        ``(B,)`` raw-model :math:`\log p(x)`.
    proposal_logprob : Array
        ``(B,)`` :math:`\log q(x)` (0 when greedy).
    """
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.astype(jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    centred = logits - m
    log_z = jnp.log(jnp.sum(jnp.exp(centred), axis=-1))
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def chosen(tok: Array) -> Array:  # centred logit of the chosen token
        return jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - m[:, 0]

    static_t = isinstance(temperature, int | float) and not isinstance(
        temperature, bool
    )
    if static_t and temperature <= 0:  # greedy, known at trace time
        return greedy_tok, chosen(greedy_tok) - log_z, jnp.zeros_like(log_z)

    unit = static_t and temperature == 1.0
    temperature = jnp.asarray(temperature, jnp.float32)
    greedy = temperature <= 0
    tau = jnp.where(greedy, 1.0, temperature)
    scaled = centred if unit else centred / tau  # maximum entry 0
    if top_p < 1.0:
        srt = jnp.sort(scaled, axis=-1)[:, ::-1]
        prob = jax.nn.softmax(srt, axis=-1)
        # Keep the most likely tokens until the mass *before* them reaches top_p.
        keep = (jnp.cumsum(prob, axis=-1) - prob) < top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    w = jnp.exp(scaled)
    log_zq = jnp.log(jnp.sum(w, axis=-1))
    tokens = jnp.where(greedy, greedy_tok, _inverse_cdf(key, w))
    x = chosen(tokens)
    lp = x - log_z
    lq = jnp.where(greedy, 0.0, (x if unit else x / tau) - log_zq)
    return tokens, lp, lq


# ------------------------------------------------------------------------- prefill


def prefill(
    model: Transformer,
    prompt_tokens: ArrayLike,
    prompt_lengths: ArrayLike | None,
    max_len: int,
    *,
    cache_dtype: Any = None,
) -> DecodeState:
    """Run right-padded prompts through the model and start a :class:`DecodeState`.

    Parameters
    ----------
    model : Transformer
        A causal LM (e.g. a :class:`~smcjax.llm.LanguageModel`).
    prompt_tokens : ArrayLike
        ``(B, P)`` int32, row ``b`` valid in ``[0, prompt_lengths[b])``.
    prompt_lengths : ArrayLike or None
        ``(B,)`` int32 in ``[1, P]``; None means every row has length ``P``.
    max_len : int
        Static buffer size ``S >= P`` (prompt + everything that will be generated).
    cache_dtype : dtype, optional
        Defaults to the parameter dtype.
    """
    tokens = jnp.asarray(prompt_tokens)
    if tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be (B, P), got shape {tokens.shape}")
    tokens = tokens.astype(jnp.int32)
    b, p = tokens.shape
    if p > max_len:
        raise ValueError(f"max_len={max_len} is smaller than the prompt length {p}")
    lengths = (
        jnp.full((b,), p, jnp.int32)
        if prompt_lengths is None
        else jnp.asarray(prompt_lengths, jnp.int32)
    )
    if lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape ({b},), got {lengths.shape}")
    slots = jnp.arange(p, dtype=jnp.int32)
    tokens = jnp.where(slots[None] < lengths[:, None], tokens, 0)
    cache = init_cache(model.config, b, max_len, cache_dtype or model.dtype)
    positions = jnp.broadcast_to(slots, (b, p))
    h, cache = model.hidden(tokens, positions, cache, kv_len=p)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = model.head(last)
    buf = jnp.zeros((b, max_len), jnp.int32).at[:, :p].set(tokens)
    zeros = jnp.zeros((b, max_len), jnp.float32)
    return DecodeState(
        tokens=buf,
        lengths=lengths,
        prompt_lengths=lengths,
        cache=cache,
        logits=logits,
        done=jnp.zeros((b,), bool),
        logprobs=zeros,
        proposal_logprobs=zeros,
    )


def broadcast_state(state: DecodeState, num_copies: int) -> DecodeState:
    """Repeat every row ``num_copies`` times (row ``b`` -> rows ``b*n .. b*n+n-1``)."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_copies, axis=0), state)


def prefill_shared(
    model: Transformer, prompt: ArrayLike, num_copies: int, max_len: int, **kw: Any
) -> DecodeState:
    """Prefill ONE prompt ``(P,)`` once and share it among ``num_copies`` rows."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be 1-D (P,), got shape {prompt.shape}")
    return broadcast_state(
        prefill(model, prompt[None], None, max_len, **kw), num_copies
    )


# -------------------------------------------------------------------------- decode


def decode(
    model: Transformer,
    key: PRNGKey,
    state: DecodeState,
    *,
    max_new_tokens: ArrayLike,
    temperature: ArrayLike = 1.0,
    top_p: float = 1.0,
    stop: StopTable | None = None,
    eos_ids: ArrayLike = (),
) -> tuple[DecodeState, DecodeInfo]:
    """Extend every active row until a stop sequence, EOS, the cap or a full buffer.

    Each loop iteration samples one token per active row from ``state.logits``, writes
    it at slot ``lengths[b]``, runs the model on it (one batched forward with the cache)
    and stores the new next-token logits. Inactive rows are masked: their cache writes
    are dropped and their state is left untouched.

    Parameters
    ----------
    model : Transformer
    key : PRNGKey
    state : DecodeState
    max_new_tokens : ArrayLike
        Cap on new tokens per row in THIS call (may be traced).
    temperature : ArrayLike
        Sampling temperature, 0 for greedy (may be traced).
    top_p : float
        Static nucleus mass.
    stop : StopTable, optional
        Stop sequences; a row that completes one stops (not done).
    eos_ids : ArrayLike
        Token ids that end a sequence (the row becomes done).

    Returns
    -------
    state : DecodeState
    info : DecodeInfo
    """
    b, s = state.tokens.shape
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    max_new = jnp.asarray(max_new_tokens, jnp.int32)
    rows = jnp.arange(b)
    if stop is None:
        n_stop = 0
        stop_lengths = jnp.zeros((0,), jnp.int32)
    else:
        n_stop = stop.transitions.shape[0]
        stop_lengths = stop.lengths
        if stop.transitions.shape[-1] != state.logits.shape[-1]:
            raise ValueError(
                f"stop table vocabulary {stop.transitions.shape[-1]} != model "
                f"vocabulary {state.logits.shape[-1]}"
            )

    start = state.lengths
    active0 = ~state.done & (state.lengths < s) & (max_new > 0)

    class Carry(NamedTuple):
        st: DecodeState
        key: Array
        active: Array
        reason: Array
        matcher: Array
        n_new: Array
        lp: Array
        lq: Array
        it: Array

    def cond(c: Carry) -> Array:
        return jnp.any(c.active)

    def body(c: Carry) -> Carry:
        st, active = c.st, c.active
        key, sub = jax.random.split(c.key)
        tok, lp, lq = sample_tokens(sub, st.logits, temperature, top_p)
        write = jnp.where(active, st.lengths, s)  # out of range -> dropped
        tokens = st.tokens.at[rows, write].set(tok, mode="drop")
        logprobs = st.logprobs.at[rows, write].set(lp, mode="drop")
        proposal = st.proposal_logprobs.at[rows, write].set(lq, mode="drop")
        lengths = st.lengths + active
        n_new = c.n_new + active
        is_eos = active & jnp.any(tok[:, None] == eos[None, :], axis=-1)
        if n_stop:
            matcher = stop.transitions[
                jnp.arange(n_stop)[None, :], c.matcher, tok[:, None]
            ]
            matched = active & jnp.any(matcher == stop_lengths[None, :], axis=-1)
        else:
            matcher, matched = c.matcher, jnp.zeros_like(active)
        full = active & (lengths >= s)
        capped = active & (n_new >= max_new)
        reason = jnp.where(
            is_eos,
            EOS,
            jnp.where(
                matched,
                STOP_SEQUENCE,
                jnp.where(
                    full, BUFFER_FULL, jnp.where(capped, MAX_NEW_TOKENS, c.reason)
                ),
            ),
        )
        logits, cache = model(tok[:, None], write[:, None], st.cache)
        st = DecodeState(
            tokens=tokens,
            lengths=lengths,
            prompt_lengths=st.prompt_lengths,
            cache=cache,
            logits=jnp.where(active[:, None], logits[:, 0], st.logits),
            done=st.done | is_eos | full,
            logprobs=logprobs,
            proposal_logprobs=proposal,
        )
        return Carry(
            st=st,
            key=key,
            active=active & ~(is_eos | matched | full | capped),
            reason=reason,
            matcher=matcher,
            n_new=n_new,
            lp=c.lp + jnp.where(active, lp, 0.0),
            lq=c.lq + jnp.where(active, lq, 0.0),
            it=c.it + 1,
        )

    zero_f = jnp.zeros((b,), jnp.float32)
    init = Carry(
        st=state,
        key=key,
        active=active0,
        reason=jnp.zeros((b,), jnp.int32),
        matcher=jnp.zeros((b, n_stop), jnp.int32),
        n_new=jnp.zeros((b,), jnp.int32),
        lp=zero_f,
        lq=zero_f,
        it=jnp.zeros((), jnp.int32),
    )
    out = jax.lax.while_loop(cond, body, init)
    info = DecodeInfo(
        start_lengths=start,
        num_new_tokens=out.n_new,
        stop_reason=out.reason,
        logprob=out.lp,
        proposal_logprob=out.lq,
        num_steps=out.it,
    )
    return out.st, info
