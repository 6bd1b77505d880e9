"""GGUF reading: tiny GGUF files written here with ``gguf.GGUFWriter``.

Oracles:

* the float tensors the file was made from, within the error bound of each format
  (F16 rounding, BF16 rounding, Q8_0 ``≤ 0.57·max|x|/127`` and Q5_0 ``≤ 1.01·max|x|/16``
  per 32-value block; see the bounds' derivations next to them);
* ``gguf.quants.dequantize`` of the very same bytes (exact), incl. K-quants made from
  random valid blocks (the gguf package has no Q4_K / Q6_K quantiser);
* ``gguf.GGUFReader`` for the header (our reader is a faster re-implementation);
* transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``), which
  un-permutes llama Q/K independently of us;
* end to end: ``smcjax.llm.load(gguf)`` logits = transformers' torch model.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from smcjax.llm.gguf import GGUFError, read_gguf, read_gguf_header  # noqa: E402

H, I, NH, NKV, L = 64, 256, 4, 2, 2  # noqa: E741
HD = H // NH

# ------------------------------------------------------------------ tiny tokenizer


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable unicode map (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


MERGES = ["Ġ t", "h e", "Ġt he", "Ċ Ċ", "Ġ =", "1 2"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vocab() -> tuple[list[str], list[int]]:
    tokens = [*_byte_alphabet(), "Ġt", "he", "Ġthe", "ĊĊ", "Ġ=", "12", *SPECIAL]
    types = [1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL)  # 3 = CONTROL
    return tokens, types


V = len(_vocab()[0])  # 256 bytes + 6 merges + 3 special = 265
EOS = V - 1  # <|im_end|>
ENDOFTEXT = V - 3

# ------------------------------------------------------------- writing the files


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, rows (2, d/2) -> (d/2, 2) (HF -> GGUF)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_k_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Random but valid Q4_K / Q6_K bytes (finite float16 super-block scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin at bytes 0:2, 2:4
        raw[..., 0:2] = np.array([2e-3], np.float16).view(np.uint8)
        raw[..., 2:4] = np.array([1e-3], np.float16).view(np.uint8)
    elif qtype == Q.Q6_K:  # d at bytes 208:210
        raw[..., 208:210] = np.array([3e-4], np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


# Storage type of each HF tensor (layer-indexed); everything else is F32.
PLAN = {
    "model.embed_tokens.weight": Q.Q8_0,
    "lm_head.weight": Q.Q5_0,
    "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
    "model.layers.0.self_attn.k_proj.weight": Q.Q5_0,
    "model.layers.0.self_attn.v_proj.weight": Q.F16,
    "model.layers.0.self_attn.o_proj.weight": Q.BF16,
    "model.layers.0.mlp.gate_proj.weight": Q.Q5_0,
    "model.layers.0.mlp.up_proj.weight": Q.Q8_0,
    "model.layers.0.mlp.down_proj.weight": Q.Q6_K,
    "model.layers.1.self_attn.q_proj.weight": Q.F16,
    "model.layers.1.self_attn.k_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.v_proj.weight": Q.Q5_0,
    "model.layers.1.self_attn.o_proj.weight": Q.F32,
    "model.layers.1.mlp.gate_proj.weight": Q.BF16,
    "model.layers.1.mlp.up_proj.weight": Q.Q4_0,
    "model.layers.1.mlp.down_proj.weight": Q.Q4_K,
}

GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    glob = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in glob:
        return glob[hf]
    _, _, i, *mid, leaf = hf.split(".")
    return f"blk.{i}.{GGUF_NAMES['.'.join(mid)]}.{leaf}"


def source_tensors(
    arch: str, seed: int = 0, tied: bool = False
) -> dict[str, np.ndarray]:
    """Random HF-layout float32 tensors of a tiny decoder."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, H))}
    if not tied:
        t["lm_head.weight"] = rng.normal(0, 0.2, (V, H))
    t["model.norm.weight"] = 1 + 0.1 * rng.normal(size=H)
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=H)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=H)
        t[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.2, (NH * HD, H))
        t[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.2, (NKV * HD, H))
        t[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.2, (NKV * HD, H))
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (H, NH * HD))
        t[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.2, (I, H))
        t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.2, (I, H))
        if arch == "qwen2":
            t[p + "self_attn.q_proj.bias"] = rng.normal(0, 0.1, NH * HD)
            t[p + "self_attn.k_proj.bias"] = rng.normal(0, 0.1, NKV * HD)
            t[p + "self_attn.v_proj.bias"] = rng.normal(0, 0.1, NKV * HD)
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_gguf(
    path: pathlib.Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    *,
    tokenizer: bool = True,
    plan: dict | None = None,
    extra=None,
) -> dict[str, np.ndarray]:
    """Write ``tensors`` (HF names/layout) as a GGUF; return the stored raw arrays."""
    plan = PLAN if plan is None else plan
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    if arch == "llama":
        w.add_rope_dimension_count(HD)
    if tokenizer:
        tokens, types = _vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(ENDOFTEXT)
        w.add_eos_token_id(EOS)
        w.add_pad_token_id(ENDOFTEXT)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    if extra is not None:
        extra(w)
    stored = {}
    for hf, x in tensors.items():
        qt = plan.get(hf, Q.F32)
        if arch == "llama" and ".q_proj." in hf:
            x = llama_permute(x, NH)
        elif arch == "llama" and ".k_proj." in hf:
            x = llama_permute(x, NKV)
        if qt in (Q.Q4_K, Q.Q6_K):  # the random blocks x was dequantised from
            raw = _K_BYTES[id(x)]
        elif qt == Q.F32:
            raw = x
        elif qt == Q.F16:
            raw = x.astype(np.float16)
        else:
            raw = quantize(x, qt)
        stored[hf] = raw
        w.add_tensor(gguf_name(hf), raw, raw_dtype=None if qt in (Q.F32, Q.F16) else qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


_K_BYTES: dict[int, np.ndarray] = {}


def make_source(arch: str, seed: int = 0, tied: bool = False):
    """Source tensors; the K-quant ones ARE the dequantisation of random valid blocks
    (whose bytes are kept for the writer)."""
    rng = np.random.default_rng(seed + 1000)
    t = source_tensors(arch, seed, tied)
    for i, qt in ((0, Q.Q6_K), (1, Q.Q4_K)):
        raw = random_k_blocks(rng, qt, H, I)
        x = dequantize(raw, qt)
        name = f"model.layers.{i}.mlp.down_proj.weight"
        t[name] = x
        _K_BYTES[id(x)] = raw
    return t


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    src = make_source("qwen2", seed=0)
    stored = write_gguf(d / "tiny.gguf", "qwen2", src)
    return d / "tiny.gguf", src, stored


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    src = make_source("llama", seed=1)
    stored = write_gguf(d / "tiny.gguf", "llama", src)
    return d / "tiny.gguf", src, stored


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCJAX_CACHE", str(tmp_path / "cache"))


# -------------------------------------------------------------------------- tests


def _block_max(x: np.ndarray, block: int = 32) -> np.ndarray:
    b = np.abs(x).reshape(*x.shape[:-1], -1, block).max(-1, keepdims=True)
    return np.broadcast_to(b, (*b.shape[:-1], block)).reshape(x.shape)


def check_against_source(ck, src, stored, arch):
    assert set(ck.tensors) == set(src)
    for name, x in src.items():
        got = ck.tensors[name]
        assert got.dtype == np.float32 and got.shape == x.shape, name
        qt = PLAN.get(name, Q.F32)
        # exact: the gguf package's dequantisation of the stored bytes
        ref = dequantize(stored[name], qt) if qt != Q.F16 else stored[name]
        ref = np.asarray(ref, np.float32).reshape(x.shape)
        if arch == "llama" and ".q_proj." in name:
            ref = ref.reshape(NH, HD // 2, 2, H).swapaxes(1, 2).reshape(x.shape)
        elif arch == "llama" and ".k_proj." in name:
            ref = ref.reshape(NKV, HD // 2, 2, H).swapaxes(1, 2).reshape(x.shape)
        np.testing.assert_array_equal(got, ref, err_msg=name)
        # within each format's error bound of the original floats
        err = np.abs(got - x)
        if qt == Q.F32 or qt in (Q.Q4_K, Q.Q6_K):
            np.testing.assert_array_equal(got, x, err_msg=name)
        elif qt == Q.F16:
            np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
        elif qt == Q.BF16:  # 7 stored mantissa bits, round to nearest: rel. <= 2^-8
            assert np.all(err <= np.abs(x) * 2.0**-8), name
        elif qt == Q.Q8_0:
            # q = round(x/d), d = m/127 (m = block max |x|) stored as float16
            # (rel. error 2^-11): |x - d16 q| <= d/2 + 127·d·2^-11 < 0.57·d
            assert np.all(err <= 0.57 * _block_max(x) / 127 + 1e-7), name
        elif qt == Q.Q5_0:
            # d = -m_signed/16; the opposite extreme clips from 32 to 31 (error d),
            # plus float16 rounding of d times |q - 16| <= 16: error <= 1.01·m/16
            assert np.all(err <= 1.01 * _block_max(x) / 16 + 1e-7), name
        elif qt == Q.Q4_0:  # d = -m/8, same clipping argument: <= 1.01·m/8
            assert np.all(err <= 1.01 * _block_max(x) / 8 + 1e-7), name
        else:  # pragma: no cover
            raise AssertionError(qt)


def test_qwen2_tensors_equal_dequantised_source(qwen_file):
    path, src, stored = qwen_file
    ck = read_gguf(path, tokenizer=False)
    check_against_source(ck, src, stored, "qwen2")
    assert ck.quantization["model.layers.1.mlp.down_proj.weight"] == "Q4_K"
    assert ck.quantization["model.layers.0.mlp.down_proj.weight"] == "Q6_K"
    # eager reading gives a plain dict with the same arrays
    eager = read_gguf(path, tokenizer=False, lazy=False)
    assert isinstance(eager.tensors, dict)
    for k in src:
        np.testing.assert_array_equal(eager.tensors[k], ck.tensors[k])


def test_llama_qk_unpermuted(llama_file):
    path, src, stored = llama_file
    ck = read_gguf(path, tokenizer=False)
    check_against_source(ck, src, stored, "llama")
    # q_proj of layer 1 is F16 and k_proj of layer 0 is Q5_0: row permutation commutes
    # with row-wise storage, so un-permuting recovers the HF rows exactly
    q = src["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        ck.tensors["model.layers.1.self_attn.q_proj.weight"],
        q.astype(np.float16).astype(np.float32),
    )
    k = src["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(
        ck.tensors["model.layers.0.self_attn.k_proj.weight"],
        dequantize(quantize(k, Q.Q5_0), Q.Q5_0),
    )
    assert ck.config["model_type"] == "llama"
    assert ck.config["attention_bias"] is False


def test_config_and_header(qwen_file):
    path, _, _ = qwen_file
    ck = read_gguf(path, tokenizer=False)
    c = ck.config
    assert c["model_type"] == "qwen2" and c["architectures"] == ["Qwen2ForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (
        H,
        I,
        L,
    )
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (NH, NKV)
    assert (c["vocab_size"], c["head_dim"]) == (V, HD)
    assert c["rope_theta"] == 1e6 and c["rope_scaling"] is None
    assert c["rms_norm_eps"] == pytest.approx(1e-6, rel=1e-6)
    assert c["tie_word_embeddings"] is False
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (
        ENDOFTEXT,
        EOS,
        ENDOFTEXT,
    )
    # our header parser agrees with gguf.GGUFReader on every field and tensor
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = header.metadata[key]
        theirs = field.contents()
        if isinstance(ours, np.ndarray):
            np.testing.assert_array_equal(ours, np.asarray(theirs), err_msg=key)
        else:
            assert ours == theirs, key
    assert set(header.metadata) == {
        k for k in reader.fields if not k.startswith("GGUF.")
    }
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.shape == tuple(int(s) for s in reversed(t.shape)), t.name
        assert info.ggml_type == t.tensor_type and info.nbytes == t.n_bytes, t.name
        assert info.offset == t.data_offset, t.name


def test_tied_embeddings(tmp_path):
    src = make_source("qwen2", seed=3, tied=True)
    write_gguf(tmp_path / "tied.gguf", "qwen2", src, tokenizer=False)
    ck = read_gguf(tmp_path / "tied.gguf")
    assert ck.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ck.tensors
    assert ck.tokenizer is None and "no tokenizer metadata" in ck.tokenizer_error


def test_tokenizer_from_metadata_and_cache(qwen_file):
    path, _, _ = qwen_file
    ck = read_gguf(path)
    tok = ck.tokenizer
    assert tok is not None, ck.tokenizer_error
    tokens, _ = _vocab()
    ids = tok("the the\n\n12", add_special_tokens=False)["input_ids"]
    # the qwen2 pre-tokenizer splits digits one by one, so the merge "1 2" never fires
    assert [tokens[i] for i in ids] == ["t", "he", "Ġthe", "ĊĊ", "1", "2"]
    assert tok.decode(ids) == "the the\n\n12"
    assert tok.eos_token_id == EOS and tok.convert_tokens_to_ids("<|im_end|>") == EOS
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "the"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    # the second read loads the saved tokenizer from the cache: same behaviour
    cached = list((pathlib.Path(os.environ["SMCJAX_CACHE"]) / "tokenizers").iterdir())
    assert len(cached) == 1
    tok2 = read_gguf(path).tokenizer
    for text in ["the the\n\n12", "<|im_start|>x = 12<|im_end|>", "héllo wörld"]:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template


def test_float32_cache_roundtrip(qwen_file):
    path, src, _ = qwen_file
    direct = read_gguf(path, tokenizer=False, float32_cache=False)
    cached = read_gguf(path, tokenizer=False, float32_cache=True)
    files = list((pathlib.Path(os.environ["SMCJAX_CACHE"]) / "float32").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    again = read_gguf(path, tokenizer=False, float32_cache=True)  # reads the cache
    for name in src:
        np.testing.assert_array_equal(cached.tensors[name], direct.tensors[name])
        np.testing.assert_array_equal(again.tensors[name], direct.tensors[name])
    # a new version of the file (new mtime) replaces the old entry instead of adding one
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    read_gguf(path, tokenizer=False, float32_cache=True)
    now = list((pathlib.Path(os.environ["SMCJAX_CACHE"]) / "float32").iterdir())
    assert len(now) == 1 and now[0] != files[0]


def test_float32_cache_unwritable_falls_back(qwen_file, monkeypatch):
    import smcjax.llm.gguf as g

    path, src, _ = qwen_file

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(g, "_write_safetensors", fail)
    with pytest.warns(UserWarning, match="could not write the float32 cache"):
        ck = read_gguf(path, tokenizer=False, float32_cache=True)
    direct = read_gguf(path, tokenizer=False, float32_cache=False)
    for name in src:
        np.testing.assert_array_equal(ck.tensors[name], direct.tensors[name])


def test_llama3_rope_scaling_recovered(tmp_path):
    # head_dim 16, theta 1e4: wavelengths 2π·10^(i/2) = 6.3, 20, 63, 199, 628, ...;
    # with L0 = 700 and (low, high) = (1, 8) two of them (199, 628) are interpolated
    theta, lo, hi, f, l0 = 10000.0, 1.0, 8.0, 8.0, 700
    inv = theta ** (-np.arange(0, HD, 2) / HD)
    wavelen = 2 * math.pi / inv
    smooth = (l0 / wavelen - lo) / (hi - lo)
    factors = np.where(
        wavelen < l0 / hi,
        1.0,
        np.where(wavelen > l0 / lo, f, 1 / ((1 - smooth) / f + smooth)),
    ).astype(np.float32)
    assert ((factors > 1) & (factors < f)).sum() == 2  # the fit is exercised

    def extra(w):
        w.add_rope_scaling_orig_ctx_len(l0)
        w.add_tensor("rope_freqs.weight", factors)

    src = make_source("llama", seed=4)
    write_gguf(tmp_path / "l3.gguf", "llama", src, tokenizer=False, extra=extra)
    ck = read_gguf(tmp_path / "l3.gguf")
    rs = ck.config["rope_scaling"]
    assert rs["rope_type"] == "llama3"
    assert rs["factor"] == pytest.approx(f)
    assert rs["low_freq_factor"] == pytest.approx(lo, abs=1e-3)
    assert rs["high_freq_factor"] == pytest.approx(hi, abs=1e-3)
    assert rs["original_max_position_embeddings"] == l0
    assert "rope_freqs.weight" not in ck.tensors
    # the decoder's own frequency code reproduces the file's frequencies
    from smcjax.llm.config import ModelConfig, rope_inverse_frequencies

    mine = rope_inverse_frequencies(ModelConfig.from_hf(ck.config))
    np.testing.assert_allclose(mine, (inv / factors).astype(np.float32), rtol=1e-5)

    # frequencies that follow no Llama-3 law are refused, naming the file
    def bad(w):
        w.add_tensor("rope_freqs.weight", np.linspace(1, 3, HD // 2, dtype=np.float32))

    write_gguf(tmp_path / "odd.gguf", "llama", src, tokenizer=False, extra=bad)
    with pytest.raises(GGUFError, match=r"odd\.gguf: rope_freqs"):
        read_gguf(tmp_path / "odd.gguf")


# ------------------------------------------------------------------------- errors


def test_truncated_file_named(qwen_file, tmp_path):
    path, _, _ = qwen_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])  # loses the end of the last tensor
    with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated.*tensor '"):
        read_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:300])  # inside the metadata
    with pytest.raises(GGUFError, match=r"head\.gguf.*header is truncated"):
        read_gguf(head)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match=r"bad\.gguf: not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        read_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"gpt2\.gguf: unknown architecture.*'gpt2'"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_unsupported_type_and_unexpected_tensor(tmp_path):
    src = make_source("qwen2", seed=5)
    del src["model.layers.1.mlp.down_proj.weight"]

    def extra(w):
        # Q8_K has no dequantiser in the gguf package; an unknown tensor name too
        raw = np.zeros((H, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8)
        w.add_tensor("blk.1.ffn_down.weight", raw, raw_dtype=Q.Q8_K)
        w.add_tensor("blk.0.mystery.weight", np.zeros(8, np.float32))

    write_gguf(tmp_path / "odd.gguf", "qwen2", src, tokenizer=False, extra=extra)
    with pytest.raises(GGUFError) as info:
        read_gguf(tmp_path / "odd.gguf")
    msg = str(info.value)
    assert "odd.gguf" in msg and "cannot load 2 tensor(s)" in msg
    assert "'blk.1.ffn_down.weight' has type Q8_K" in msg
    assert "'blk.0.mystery.weight'" in msg


# ------------------------------------------------------- transformers as the oracle


def transformers_gguf_model(path: pathlib.Path):
    """transformers' torch model of a GGUF, float32.

    ``from_pretrained(dir, gguf_file=...)`` needs the ``accelerate`` package; without it
    this does what ``from_pretrained`` does for qwen2/llama: the config from the GGUF
    metadata, then ``load_gguf_checkpoint`` (transformers' dequantisation, renaming and
    llama Q/K un-permutation) into the model.
    """
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(
        str(path.parent), gguf_file=path.name
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(
        str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= allowed, missing
    model.tie_weights()
    return model.eval()


def _transformers_state(path: pathlib.Path):
    model = transformers_gguf_model(path)
    return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["qwen_file", "llama_file"])
def test_transformers_gguf_loader_agrees(which, request):
    path, _, _ = request.getfixturevalue(which)
    ck = read_gguf(path, tokenizer=False)
    _, theirs = _transformers_state(path)
    theirs = {k: v for k, v in theirs.items() if "rotary_emb" not in k}
    assert set(theirs) == set(ck.tensors)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ck.tensors[name], value, err_msg=name)


@pytest.mark.parametrize("which", ["qwen_file", "llama_file"])
def test_load_logits_match_transformers(which, request):
    """End to end: smcjax.llm.load(gguf) == transformers' torch model of the GGUF."""
    llm = pytest.importorskip("smcjax.llm")
    torch = pytest.importorskip("torch")
    path, _, _ = request.getfixturevalue(which)
    model, _ = _transformers_state(path)
    lm = llm.load(path)
    ids = np.random.default_rng(0).integers(0, V, size=(2, 11)).astype(np.int32)
    ours = np.asarray(lm.logits(ids))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    if which == "qwen_file":
        assert lm.tokenizer is not None


def test_config_json_serialisable(qwen_file):
    path, _, _ = qwen_file
    json.dumps(read_gguf(path, tokenizer=False).config)


def test_load_reports_missing_tensor_by_hf_name(tmp_path):
    """A GGUF lacking a tensor fails in smcjax.llm.load with the HF name listed."""
    llm = pytest.importorskip("smcjax.llm")
    src = make_source("qwen2", seed=6)
    del src["model.layers.1.self_attn.k_proj.bias"]
    write_gguf(tmp_path / "holey.gguf", "qwen2", src, tokenizer=False)
    with pytest.raises(
        llm.CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        llm.load(tmp_path / "holey.gguf")
