"""Language models for inference-time scaling: Flax ports, loading and decoding.

* :func:`load` -> :class:`LanguageModel` (Qwen2 / Llama causal LMs, from a Hugging Face
  directory, a ``.gguf`` file or a known name), with ``.logits`` and ``.generate``;
* :func:`load_prm` -> :class:`ProcessRewardModel` (Qwen2.5-Math-PRM style), with
  ``.scores`` and incremental per-step scoring;
* :mod:`smcjax.llm.decoding`: the functional, jit-friendly ``prefill`` / ``decode`` API
  on a :class:`DecodeState` whose leaves have the batch (particle) axis first.
"""

from smcjax.llm import decoding
from smcjax.llm.config import ModelConfig
from smcjax.llm.decoding import (
    DecodeInfo,
    DecodeState,
    StopTable,
    broadcast_state,
    decode,
    prefill,
    prefill_shared,
    stop_table,
    stop_table_from_ids,
)
from smcjax.llm.language_model import GenerateOutput, LanguageModel, load
from smcjax.llm.loading import CheckpointError, params_from_state_dict
from smcjax.llm.model import KVCache, Transformer, forward, init_cache

__all__ = [
    "CheckpointError",
    "DecodeInfo",
    "DecodeState",
    "GenerateOutput",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "StopTable",
    "Transformer",
    "broadcast_state",
    "decode",
    "decoding",
    "forward",
    "init_cache",
    "load",
    "params_from_state_dict",
    "prefill",
    "prefill_shared",
    "stop_table",
    "stop_table_from_ids",
]
