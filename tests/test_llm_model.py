"""Parity of the Flax decoder with transformers' torch models (float32, tiny models)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from llm_fixtures import load_torch, make_checkpoint, random_ids

import smcjax.llm as llm
from smcjax.llm import ModelConfig
from smcjax.llm import model as model_lib
from smcjax.llm.loading import read_checkpoint
from smcjax.llm.model import init_cache

VARIANTS = {
    "qwen2": dict(family="qwen2"),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True),
    "llama3-rope": dict(family="llama", rope_scaling=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_model")
    return {
        k: make_checkpoint(root / k, seed=i, **kw)
        for i, (k, kw) in enumerate(VARIANTS.items())
    }


def torch_logits(path, ids):
    ref = load_torch(path)
    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant, scan_layers):
    path = checkpoints[variant]
    lm = llm.load(path, scan_layers=scan_layers)
    # 80 positions > original_max_position_embeddings=64, so llama3 scaling matters.
    ids = random_ids(np.random.default_rng(0), (2, 80), lm.config.vocab_size)
    ours = np.asarray(lm.logits(ids))
    ref = torch_logits(path, ids)
    assert ours.shape == ref.shape == (2, 80, lm.config.vocab_size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    if variant == "qwen2-tied":
        assert lm.config.tie_word_embeddings and "lm_head" not in lm.params
    if variant == "llama3-rope":
        assert lm.config.rope_scaling is not None and not lm.config.qkv_bias


def test_rope_scaling_changes_logits(checkpoints):
    """The llama3 scaling is really applied (the parity above would not catch a no-op
    if both sides ignored it)."""
    lm = llm.load(checkpoints["llama3-rope"])
    plain = dataclasses.replace(lm.config, rope_scaling=None)
    _, tensors = read_checkpoint(checkpoints["llama3-rope"])
    other = llm.LanguageModel(*llm.params_from_state_dict(plain, tensors))
    ids = random_ids(np.random.default_rng(0), (1, 80), lm.config.vocab_size)
    assert (
        np.abs(np.asarray(lm.logits(ids)) - np.asarray(other.logits(ids))).max() > 1e-3
    )


def test_config_reads_transformers4_and_5_layouts():
    base = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    scaling = dict(
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    v4 = ModelConfig.from_hf(
        {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}}
    )
    v5 = ModelConfig.from_hf(
        {
            **base,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling},
        }
    )
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.head_dim == 4
    with pytest.raises(ValueError, match=r"unknown architecture.*mistral"):
        ModelConfig.from_hf({**base, "model_type": "mistral"})


@pytest.mark.parametrize(
    ("scan_layers", "block"),
    [(True, None), (False, None), (False, 8)],
    ids=["scan", "unrolled", "blocked-attention"],
)
def test_cached_forward_equals_uncached(checkpoints, scan_layers, block, monkeypatch):
    """Feeding a sequence in chunks through the cache = one uncached forward.

    With ``block=8`` the 32-slot cache is attended block by block (online softmax over
    up to 3 blocks), the path long decode buffers take."""
    if block is not None:
        monkeypatch.setattr(model_lib, "ATTENTION_BLOCK", block)
    lm = llm.load(checkpoints["qwen2"], scan_layers=scan_layers)
    ids = jnp.asarray(
        random_ids(np.random.default_rng(1), (2, 24), lm.config.vocab_size)
    )
    full = np.asarray(lm.logits(ids))

    @jax.jit
    def chunked(model, ids):
        cache = init_cache(model.config, 2, 32)
        outs = []
        for lo, hi in [(0, 10), (10, 11), (11, 24)]:
            pos = jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))
            out, cache = model(ids[:, lo:hi], pos, cache)
            outs.append(out)
        return jnp.concatenate(outs, axis=1)

    np.testing.assert_allclose(np.asarray(chunked(lm, ids)), full, atol=1e-4, rtol=0)


def test_batched_different_lengths_equals_one_by_one(checkpoints):
    """Right-padded prompts of different lengths in one batch = each prompt alone."""
    lm = llm.load(checkpoints["llama3-rope"])
    rng = np.random.default_rng(2)
    lengths = np.array([7, 19, 1, 12])
    ids = random_ids(rng, (4, 19), lm.config.vocab_size)
    state = jax.jit(llm.prefill, static_argnums=3)(lm, ids, lengths, 40)
    for b, n in enumerate(lengths):
        alone = np.asarray(lm.logits(ids[b : b + 1, :n]))[0, -1]
        np.testing.assert_allclose(
            np.asarray(state.logits[b]), alone, atol=1e-4, rtol=0
        )
        assert (np.asarray(state.tokens[b, n:]) == 0).all()
    assert state.cache.k[0].shape[0] == 4  # batch axis first on every cache leaf
