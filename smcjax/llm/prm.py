r"""Process reward model (Qwen2.5-Math-PRM style), with incremental per-step scoring.

``Qwen2ForProcessRewardModel`` is the Qwen2 backbone followed by a token-level
two-class head

.. math::

    \ell_t = W_2\,\mathrm{ReLU}(W_0 h_t + b_0) + b_2 \in \mathbb{R}^2, \qquad
    r_t = \mathrm{softmax}(\ell_t)_1 ,

(checkpoint keys ``model.*``, ``score.0.*``, ``score.2.*``). The reward of step ``k``
is :math:`r_t` read at the position ``t`` of the ``k``-th step tag ``<extra_0>``. The
input is the chat-formatted conversation

    system: "Please reason step by step, and put your final answer within \boxed{}."
    user: <question>
    assistant: step_1 <extra_0> step_2 <extra_0> ... step_k <extra_0>

Because attention is causal, the reward of step ``k`` depends only on the tokens up to
its tag, so a particle's PRM state can be a KV cache that grows by one step at a time:
:func:`prm_prefill` runs the shared prefix (system + question + assistant header) once,
:func:`prm_extend` appends the tokens of a new step (ending with ``<extra_0>``) and
returns the reward at every new position — the new step costs only its new tokens. The
:class:`PRMState` has the batch axis first on every leaf, so it is resampled with the
same ``tree.map`` gather as the policy's :class:`~smcjax.llm.decoding.DecodeState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smcjax.llm.config import ModelConfig
from smcjax.llm.decoding import broadcast_state
from smcjax.llm.loading import (
    default_scan_layers,
    params_from_state_dict,
    resolve_source,
)
from smcjax.llm.model import Backbone, KVCache, Transformer, _linear, init_cache
from smcjax.types import Array, ArrayLike

__all__ = [
    "DEFAULT_STEP_TOKEN_ID",
    "PRM_SYSTEM_PROMPT",
    "PRMState",
    "ProcessRewardModel",
    "RewardModule",
    "build_prm_input",
    "load_prm",
    "prm_extend",
    "prm_prefill",
    "prm_prefix_ids",
    "prm_step_ids",
    "step_rewards",
]

PRM_SYSTEM_PROMPT = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)
STEP_TAG = "<extra_0>"
#: Id of ``<extra_0>`` in the Qwen2 vocabulary (used when no tokenizer says otherwise).
DEFAULT_STEP_TOKEN_ID = 151651
_SPLIT = "\x00SMCJAX_SPLIT\x00"


class RewardModule(nnx.Module):
    """NNX ``Qwen2ForProcessRewardModel``: backbone + ``score`` MLP (2 classes)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs)
        self.score_0 = _linear(cfg.hidden_size, cfg.hidden_size, True, dtype, rngs)
        self.score_2 = _linear(cfg.hidden_size, 2, True, dtype, rngs)

    def head(self, h: Array) -> Array:
        """Float32 class logits ``(..., 2)`` from final hidden states."""
        return self.score_2(jax.nn.relu(self.score_0(h))).astype(jnp.float32)

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: KVCache | None = None,
        *,
        kv_len: int | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Class logits ``(B, T, 2)`` and the updated cache."""
        h, cache = self.model(tokens, positions, cache, kv_len=kv_len)
        return self.head(h), cache


# ------------------------------------------------------------------ input building


def _step_token_id(tokenizer: Any) -> int:
    if tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids(STEP_TAG)
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
            return int(tid)
    return DEFAULT_STEP_TOKEN_ID


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _template_parts(
    tokenizer: Any, question: str, system_prompt: str
) -> tuple[str, str]:
    """Chat-formatted text before and after the assistant content."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
        {"role": "assistant", "content": _SPLIT},
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )
    else:
        text = f"{system_prompt}\n\n{question}\n\n{_SPLIT}"
    before, after = text.split(_SPLIT)
    return before, after


def prm_prefix_ids(
    tokenizer: Any, question: str, *, system_prompt: str = PRM_SYSTEM_PROMPT
) -> list[int]:
    """Token ids of the conversation up to the start of the assistant's steps."""
    return _encode(tokenizer, _template_parts(tokenizer, question, system_prompt)[0])


def prm_step_ids(tokenizer: Any, step: str) -> list[int]:
    """Token ids of one step followed by the step tag ``<extra_0>``.

    The tag is a special token, so it splits the text: tokenizing a whole solution and
    tokenizing it step by step give the same ids.
    """
    return [*_encode(tokenizer, step.strip()), _step_token_id(tokenizer)]


def build_prm_input(
    tokenizer: Any,
    question: str,
    steps: Sequence[str],
    *,
    system_prompt: str = PRM_SYSTEM_PROMPT,
) -> np.ndarray:
    """Token ids ``(L,)`` int32 of the PRM input for a question and its steps.

    ``system``, ``user: question``, ``assistant: step_1<extra_0>...step_k<extra_0>``, in
    the tokenizer's chat template (Qwen2.5-Math-PRM's format), then the template's tail.
    """
    before, after = _template_parts(tokenizer, question, system_prompt)
    ids = _encode(tokenizer, before)
    for s in steps:
        ids += prm_step_ids(tokenizer, s)
    ids += _encode(tokenizer, after)
    return np.asarray(ids, np.int32)


def step_rewards(
    input_ids: ArrayLike, scores: ArrayLike, step_token_id: int = DEFAULT_STEP_TOKEN_ID
) -> list[np.ndarray]:
    """Per-step rewards: ``scores`` read at the ``<extra_0>`` positions of each row."""
    ids = np.atleast_2d(np.asarray(input_ids))
    sc = np.atleast_2d(np.asarray(scores))
    return [sc[b][ids[b] == step_token_id] for b in range(ids.shape[0])]


# --------------------------------------------------------------- incremental scoring


class PRMState(NamedTuple):
    """Incremental PRM scoring state; batch axis first on every leaf.

    Attributes
    ----------
    lengths : Array
        ``(B,)`` int32 number of tokens already in the cache.
    cache : KVCache
        Keys/values of those tokens.
    last_score : Array
        ``(B,)`` float32 reward at the last token added (the last step's tag).
    """

    lengths: Array
    cache: KVCache
    last_score: Array


def _probs(logits: Array) -> Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


def prm_prefill(
    prm: Transformer,
    prefix_tokens: ArrayLike,
    prefix_lengths: ArrayLike | None,
    max_len: int,
    *,
    num_copies: int = 1,
) -> PRMState:
    """Run right-padded prefixes ``(B, P)`` through the PRM into a fresh cache.

    With ``num_copies > 1`` every row is repeated (prompt sharing among particles).
    """
    tokens = jnp.asarray(prefix_tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    b, p = tokens.shape
    if p > max_len:
        raise ValueError(f"max_len={max_len} is smaller than the prefix length {p}")
    lengths = (
        jnp.full((b,), p, jnp.int32)
        if prefix_lengths is None
        else jnp.asarray(prefix_lengths, jnp.int32)
    )
    cache = init_cache(prm.config, b, max_len, prm.dtype)
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = prm(tokens, pos, cache, kv_len=p)
    last = jnp.take_along_axis(_probs(logits), (lengths - 1)[:, None], axis=1)[:, 0]
    state = PRMState(lengths=lengths, cache=cache, last_score=last)
    return broadcast_state(state, num_copies) if num_copies > 1 else state


def prm_extend(
    prm: Transformer, state: PRMState, tokens: ArrayLike, lengths: ArrayLike
) -> tuple[PRMState, Array]:
    """Append right-padded new tokens ``(B, T)`` (``lengths`` valid per row, may be 0).

    Returns the new state and the reward :math:`r_t` at every new position ``(B, T)``
    (meaningless beyond ``lengths``). ``state.last_score`` becomes the reward at each
    row's last new token (unchanged for rows with no new token). Costs a forward pass
    over the ``T`` new tokens only.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    n_new = jnp.asarray(lengths, jnp.int32)
    t = tokens.shape[1]
    s = jax.tree.leaves(state.cache)[0].shape[-2]
    offs = jnp.arange(t, dtype=jnp.int32)
    pos = state.lengths[:, None] + offs[None, :]
    # Padding positions write nowhere (dropped) so the cache stays exact.
    write = jnp.where(offs[None, :] < n_new[:, None], pos, s)
    logits, cache = prm(tokens, write, state.cache)
    probs = _probs(logits)
    last = jnp.take_along_axis(probs, jnp.maximum(n_new - 1, 0)[:, None], axis=1)[:, 0]
    new = PRMState(
        lengths=state.lengths + n_new,
        cache=cache,
        last_score=jnp.where(n_new > 0, last, state.last_score),
    )
    return new, probs


# ------------------------------------------------------------------------ the model


@jax.jit
def _scores(prm: Transformer, ids: Array) -> Array:
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return _probs(prm(ids, pos)[0])


@jax.tree_util.register_pytree_node_class
class ProcessRewardModel(Transformer):
    """A Qwen2.5-Math-PRM-style process reward model with its tokenizer.

    A pytree like :class:`~smcjax.llm.LanguageModel` (parameters are leaves).

    Attributes
    ----------
    config : ModelConfig
    tokenizer : transformers tokenizer or None
    step_token_id : int
        Id of ``<extra_0>``.
    """

    tokenizer: Any
    step_token_id: int

    def __init__(
        self, graphdef: Any, params: Any, config: ModelConfig, tokenizer: Any = None
    ):
        super().__init__(
            graphdef,
            params,
            config,
            tokenizer=tokenizer,
            step_token_id=_step_token_id(tokenizer),
        )

    def scores(self, input_ids: ArrayLike) -> Array:
        """P(step correct) = softmax over the 2 classes, class 1, ``(B, L)`` float32."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {ids.shape}")
        return _scores(self, ids)

    def build_input(
        self,
        question: str,
        steps: Sequence[str],
        *,
        system_prompt: str = PRM_SYSTEM_PROMPT,
    ) -> np.ndarray:
        """PRM input ids ``(L,)`` (see :func:`build_prm_input`)."""
        if self.tokenizer is None:
            raise ValueError("this PRM has no tokenizer")
        return build_prm_input(
            self.tokenizer, question, steps, system_prompt=system_prompt
        )

    def step_rewards(self, question: str, steps: Sequence[str]) -> np.ndarray:
        """Reward of every step of one solution, ``(len(steps),)``."""
        ids = self.build_input(question, steps)
        sc = self.scores(ids[None])
        return step_rewards(ids[None], sc, self.step_token_id)[0]


def load_prm(
    source: str | Path, *, dtype: Any = None, scan_layers: bool | None = None
) -> ProcessRewardModel:
    """Load a ``Qwen2ForProcessRewardModel`` checkpoint (HF directory, .gguf or name).

    Raises
    ------
    FileNotFoundError
        Naming the missing file.
    ValueError
        If the checkpoint is not a Qwen2 process reward model.
    smcjax.llm.loading.CheckpointError
        Listing every missing / unexpected / wrongly shaped tensor.
    """
    hf_config, tensors, tokenizer = resolve_source(source)
    archs = list(hf_config.get("architectures") or [])
    if archs and "ProcessRewardModel" not in archs[0]:
        raise ValueError(
            f"{source}: architectures={archs} is not a process reward model "
            "(expected Qwen2ForProcessRewardModel)"
        )
    if scan_layers is None:
        scan_layers = default_scan_layers()
    graphdef, params, cfg = params_from_state_dict(
        hf_config, tensors, module=RewardModule, dtype=dtype, scan_layers=scan_layers
    )
    return ProcessRewardModel(graphdef, params, cfg, tokenizer)
