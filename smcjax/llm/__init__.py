"""Language models for inference-time scaling: Flax ports, loading and decoding.

* :func:`load` -> :class:`LanguageModel` (Qwen2 / Llama causal LMs, from a Hugging Face
  directory, a ``.gguf`` file or a known name), with ``.logits`` and ``.generate``;
* :func:`load_prm` -> :class:`ProcessRewardModel` (Qwen2.5-Math-PRM style), with
  ``.scores`` and incremental per-step scoring;
* :mod:`smcjax.llm.decoding`: the functional, jit-friendly ``prefill`` / ``decode`` API
  on a :class:`DecodeState` whose leaves have the batch (particle) axis first.
"""

# answers, rewards, its: inference-time scaling (particle filter and baselines)
from smcjax.llm import answers, decoding, rewards
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
from smcjax.llm.its import (
    GibbsResult,
    ParticleFilterResult,
    beam_search,
    best_of_n,
    greedy,
    parallel_tempering,
    particle_filter,
    particle_filter_batch,
    particle_gibbs,
    self_consistency,
    weighted_best_of_n,
)
from smcjax.llm.language_model import GenerateOutput, LanguageModel, load
from smcjax.llm.loading import CheckpointError, params_from_state_dict
from smcjax.llm.model import KVCache, Transformer, forward, init_cache
from smcjax.llm.prm import (
    PRMState,
    ProcessRewardModel,
    build_prm_input,
    load_prm,
    prm_extend,
    prm_prefill,
    step_rewards,
)

__all__ = [
    "CheckpointError",
    "DecodeInfo",
    "DecodeState",
    "GenerateOutput",
    "GibbsResult",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "PRMState",
    "ParticleFilterResult",
    "ProcessRewardModel",
    "StopTable",
    "Transformer",
    "answers",
    "beam_search",
    "best_of_n",
    "broadcast_state",
    "build_prm_input",
    "decode",
    "decoding",
    "forward",
    "greedy",
    "init_cache",
    "load",
    "load_prm",
    "parallel_tempering",
    "params_from_state_dict",
    "particle_filter",
    "particle_filter_batch",
    "particle_gibbs",
    "prefill",
    "prefill_shared",
    "prm_extend",
    "prm_prefill",
    "rewards",
    "self_consistency",
    "step_rewards",
    "stop_table",
    "stop_table_from_ids",
    "weighted_best_of_n",
]
