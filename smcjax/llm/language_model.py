"""User-facing causal language model: :class:`LanguageModel` and :func:`load`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smcjax.llm import decoding
from smcjax.llm.config import ModelConfig
from smcjax.llm.loading import (
    default_scan_layers,
    params_from_state_dict,
    resolve_source,
)
from smcjax.llm.model import CausalLM, Transformer, init_transformer
from smcjax.types import Array, ArrayLike, PRNGKey

__all__ = ["GenerateOutput", "LanguageModel", "load"]


class GenerateOutput(NamedTuple):
    """Result of :meth:`LanguageModel.generate`.

    Attributes
    ----------
    tokens : np.ndarray
        ``(B, max_new_tokens)`` int32 generated ids, padded with the pad id (or 0).
    texts : list of str
        Decoded generations (stop strings included, EOS not).
    logprobs : np.ndarray
        ``(B, max_new_tokens)`` float32 raw-model log-probabilities (0 after
        ``lengths``).
    lengths : np.ndarray
        ``(B,)`` number of generated tokens.
    stop_reason : np.ndarray
        ``(B,)`` codes of :mod:`smcjax.llm.decoding`.
    """

    tokens: np.ndarray
    texts: list[str]
    logprobs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray


@jax.jit
def _logits(model: Transformer, ids: Array) -> Array:
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model(ids, pos)[0]


def _generate_impl(
    model, key, tokens, lengths, max_new, temperature, stop, eos, *, max_len, top_p
):
    state = decoding.prefill(model, tokens, lengths, max_len)
    return decoding.decode(
        model,
        key,
        state,
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        eos_ids=eos,
    )


_generate = jax.jit(_generate_impl, static_argnames=("max_len", "top_p"))


@jax.tree_util.register_pytree_node_class
class LanguageModel(Transformer):
    """A causal LM (Qwen2 / Llama) with its tokenizer.

    A pytree (parameters are leaves; graphdef, config and tokenizer are static), so it
    can be passed straight to jitted functions such as
    :func:`smcjax.llm.decoding.decode`.

    Attributes
    ----------
    config : ModelConfig
    tokenizer : transformers tokenizer or None
    graphdef, params
        The split NNX :class:`~smcjax.llm.model.CausalLM`.
    """

    tokenizer: Any

    def __init__(
        self, graphdef: Any, params: Any, config: ModelConfig, tokenizer: Any = None
    ):
        super().__init__(graphdef, params, config, tokenizer=tokenizer)

    @classmethod
    def random(
        cls,
        config: ModelConfig,
        *,
        seed: int = 0,
        dtype: Any = jnp.float32,
        tokenizer: Any = None,
    ) -> LanguageModel:
        """Randomly initialised model (tests, benchmarks)."""
        t = init_transformer(config, seed=seed, dtype=dtype)
        return cls(t.graphdef, t.params, config, tokenizer)

    # ------------------------------------------------------------------ inference

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids from the config and the tokenizer."""
        ids = set(self.config.eos_token_ids)
        tok = self.tokenizer
        if tok is not None and getattr(tok, "eos_token_id", None) is not None:
            ids.add(int(tok.eos_token_id))
        return tuple(sorted(ids))

    def logits(self, input_ids: ArrayLike) -> Array:
        """Logits ``(B, L, V)`` float32 of ``(B, L)`` int32 ids (no padding)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {ids.shape}")
        return _logits(self, ids)

    def encode(
        self, prompts: Sequence[str], *, apply_chat_template: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``(B, P)`` ids and ``(B,)`` lengths of text prompts."""
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer; pass token ids instead of text"
            )
        tok = self.tokenizer
        rows = []
        for p in prompts:
            if apply_chat_template:
                ids = tok.apply_chat_template(
                    [{"role": "user", "content": p}],
                    add_generation_prompt=True,
                    tokenize=True,
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tok(p, add_special_tokens=True)["input_ids"]
            rows.append(list(ids))
        lengths = np.array([len(r) for r in rows], np.int32)
        out = np.zeros((len(rows), max(lengths)), np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out, lengths

    def stop_table(self, stop: str | Sequence[str]) -> decoding.StopTable:
        """Build (once, then cache) the stop table of ``stop`` for this tokenizer."""
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        cache = self.__dict__.setdefault("_stop_tables", {})
        if stops not in cache:
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            # Concrete arrays even when first asked for inside a jit trace: a tracer
            # cached here would leak into every later program.
            with jax.ensure_compile_time_eval():
                cache[stops] = decoding.stop_table(
                    self.tokenizer, stops, self.config.vocab_size
                )
        return cache[stops]

    def generate(
        self,
        key: PRNGKey,
        prompts: Sequence[str] | ArrayLike,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        apply_chat_template: bool = False,
    ) -> GenerateOutput:
        r"""Sample continuations of a batch of prompts with a KV cache.

        Parameters
        ----------
        key : PRNGKey
        prompts : list of str or ArrayLike
            Text prompts (tokenized, chat template applied when
            ``apply_chat_template``), or a ``(B, P)`` int32 array of ids (no padding).
        max_new_tokens : int
        temperature : float
            0 is greedy.
        top_p : float
        stop : str or list of str, optional
            Stop strings (e.g. ``"\n\n"``); each sequence stops at EOS or at one.
        apply_chat_template : bool

        Returns
        -------
        GenerateOutput
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if (
            isinstance(prompts, (list, tuple))
            and prompts
            and isinstance(prompts[0], str)
        ):
            tokens, lengths = self.encode(
                prompts, apply_chat_template=apply_chat_template
            )
        else:
            tokens = np.asarray(prompts, np.int32)
            if tokens.ndim == 1:
                tokens = tokens[None]
            lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
        table = None if stop is None else self.stop_table(stop)
        max_len = int(tokens.shape[1] + max_new_tokens)
        state, info = _generate(
            self,
            key,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            max_new_tokens,
            temperature,
            table,
            jnp.asarray(self.eos_ids, jnp.int32),
            max_len=max_len,
            top_p=float(top_p),
        )
        buf = np.asarray(state.tokens)
        lps = np.asarray(state.logprobs)
        start = np.asarray(info.start_lengths)
        n_new = np.asarray(info.num_new_tokens)
        reason = np.asarray(info.stop_reason)
        pad = 0
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            pad = int(self.tokenizer.pad_token_id)
        out = np.full((buf.shape[0], max_new_tokens), pad, np.int32)
        out_lp = np.zeros((buf.shape[0], max_new_tokens), np.float32)
        texts = []
        for i in range(buf.shape[0]):
            gen = buf[i, start[i] : start[i] + n_new[i]]
            out[i, : n_new[i]] = gen
            out_lp[i, : n_new[i]] = lps[i, start[i] : start[i] + n_new[i]]
            if self.tokenizer is not None:
                body = gen[:-1] if reason[i] == decoding.EOS else gen
                texts.append(
                    self.tokenizer.decode(body.tolist(), skip_special_tokens=False)
                )
            else:
                texts.append("")
        return GenerateOutput(out, texts, out_lp, n_new, reason)


def load(
    source: str | Path, *, dtype: Any = None, scan_layers: bool | None = None
) -> LanguageModel:
    """Load a causal LM from an HF directory, a ``.gguf`` file or a known name.

    Parameters
    ----------
    source : str or Path
        A directory with ``config.json`` and ``*.safetensors`` (sharded or not), a
        ``.gguf`` file, or a known name such as ``"qwen2.5-coder-0.5b-instruct"``.
    dtype : dtype, optional
        Parameter dtype: float32 on CPU, bfloat16 on accelerators by default.
    scan_layers : bool, optional
        Stacked layers run by ``lax.scan`` (compile time independent of depth) or
        unrolled per-layer buffers (faster on CPU); default: unrolled on CPU only.

    Raises
    ------
    FileNotFoundError
        Naming the missing directory, config, shard or file.
    ValueError
        Unknown architecture.
    smcjax.llm.loading.CheckpointError
        Listing every missing / unexpected / wrongly shaped tensor.
    """
    hf_config, tensors, tokenizer = resolve_source(source)
    if scan_layers is None:
        scan_layers = default_scan_layers()
    graphdef, params, cfg = params_from_state_dict(
        hf_config, tensors, module=CausalLM, dtype=dtype, scan_layers=scan_layers
    )
    return LanguageModel(graphdef, params, cfg, tokenizer)
