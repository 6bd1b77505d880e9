"""Checkpoint loading: sharded/bf16 safetensors, state dicts, and clear errors."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from llm_fixtures import load_torch, make_checkpoint, random_ids
from safetensors.numpy import load_file, save_file

import smcjax.llm as llm
from smcjax.llm.loading import CheckpointError, read_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load") / "qwen2", family="qwen2")


@pytest.fixture(scope="module")
def ids(ckpt):
    return random_ids(np.random.default_rng(0), (1, 12), 300)


@pytest.fixture(scope="module")
def reference(ckpt, ids):
    return np.asarray(llm.load(ckpt).logits(ids))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint(ckpt, ids, reference, tmp_path):
    model = load_torch(ckpt)
    out = tmp_path / "sharded"
    model.save_pretrained(str(out), max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1
    lm = llm.load(out)
    np.testing.assert_allclose(np.asarray(lm.logits(ids)), reference, atol=1e-6)
    # the missing shard is named
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (out / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        llm.load(out)


def test_state_dict_input_and_bfloat16_file(ckpt, ids, reference, tmp_path):
    """The loader core takes any HF-named mapping (as the GGUF reader produces)."""
    config, tensors = read_checkpoint(ckpt)
    plain = {k: np.array(v) for k, v in tensors.items()}
    lm = llm.LanguageModel(*llm.params_from_state_dict(config, plain))
    np.testing.assert_allclose(np.asarray(lm.logits(ids)), reference, atol=1e-6)
    # bfloat16 safetensors are read (memory-mapped) and widened to float32
    import ml_dtypes

    out = _copy(ckpt, tmp_path / "bf16")
    save_file(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in plain.items()},
        str(out / "model.safetensors"),
    )
    lm16 = llm.load(out)
    w = lm16.params["model"]["embed_tokens"]["embedding"][...]
    assert w.dtype == jnp.float32
    want = (
        plain["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    )
    np.testing.assert_array_equal(np.asarray(w), want)
    # and a bfloat16 parameter dtype can be requested
    lm_b = llm.load(ckpt, dtype=jnp.bfloat16)
    logits = np.asarray(lm_b.logits(ids))
    assert logits.dtype == np.float32
    assert np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()


def test_every_mismatch_reported_at_once(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path / "broken")
    sd = load_file(str(out / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
    sd["model.layers.7.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    sd["vision_tower.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        llm.load(out)
    msg = str(err.value)
    for name in (
        "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.k_proj.weight: checkpoint shape (5, 64), "
        "model expects (32, 64)",
        "model.layers.7.mlp.up_proj.weight",
        "vision_tower.weight",
    ):
        assert name in msg, (name, msg)
    assert "missing tensors (2)" in msg and "unexpected tensors (2)" in msg


def test_unknown_architecture_and_missing_files(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path / "gpt2")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown architecture.*gpt2"):
        llm.load(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json"):
        llm.load(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg | {"model_type": "qwen2"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        llm.load(empty)
    with pytest.raises(FileNotFoundError, match=r"nowhere.gguf"):
        llm.load(tmp_path / "nowhere.gguf")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        llm.load(tmp_path / "no-such-dir" / "model")
    # a truncated safetensors file is named
    trunc = _copy(ckpt, tmp_path / "trunc")
    st = trunc / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        llm.load(trunc)


def test_torch_reference_agrees_with_loaded_model(ckpt, ids, reference):
    import torch

    with torch.no_grad():
        want = load_torch(ckpt)(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(reference, want, atol=1e-4)
