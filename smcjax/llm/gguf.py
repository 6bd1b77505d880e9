"""Read GGUF checkpoints (llama.cpp's format) into Hugging Face names and shapes.

A GGUF file is a little-endian header — magic ``b"GGUF"``, version, tensor count,
key/value metadata, tensor descriptors ``(name, dims, ggml type, offset)`` — followed
by the tensor data, aligned to ``general.alignment`` (32) bytes. Weights are stored
block-quantised: for a block of ``B`` consecutive values ``x_j`` of one row,

* ``Q8_0`` (``B = 32``): ``x_j ≈ d · q_j``, ``q_j ∈ [-127, 127]``, ``d`` a float16
  scale, so ``|x_j − x̂_j| ≤ d / 2 = max|x| / 254``;
* ``Q5_0`` (``B = 32``): ``x_j ≈ d · (q_j − 16)``, ``q_j ∈ [0, 31]``,
  ``d = −m / 16`` with ``m`` the signed extreme, error ``≤ |d| / 2`` in the block;
* ``Q4_K`` / ``Q6_K`` (``B = 256`` super-blocks of 8 × 32 / 16 × 16 sub-blocks with
  their own quantised scales and minima): ``x_j ≈ d·s_b·q_j − m·m_b``.

:func:`read_gguf` dequantises every tensor to float32 with the ``gguf`` package
(:func:`gguf.quants.dequantize`, the same code llama.cpp's Python tools and the
transformers GGUF loader use), renames it to the Hugging Face convention
(``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``), and builds an
HF-style ``config`` dictionary and (optionally) a transformers tokenizer from the
metadata.

Two layout details matter for exact parity:

* numpy shapes are the reverse of GGUF ``dims``: a GGUF ``[in, out]`` matrix is an
  ``(out, in)`` array, the ``nn.Linear`` layout transformers uses — no transpose needed;
* llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` of **llama**
  models from the HF "rotate half" RoPE layout to its interleaved layout: inside each
  head of width ``d`` it stores row ``j`` of the first half and row ``j`` of the second
  half next to each other, ``(h, 2, d/2) → (h, d/2, 2)``. :func:`read_gguf` inverts it,
  ``(h, d/2, 2) → (h, 2, d/2)``. Qwen2 GGUFs are written with the HF layout (llama.cpp
  applies NEOX-style rotary for them) and are left alone.

Llama-3 GGUFs carry RoPE frequency scaling as a tensor ``rope_freqs.weight`` of per
frequency divisors ``f_i`` (llama.cpp divides ``ω_i`` by ``f_i``) instead of the HF
``rope_scaling`` parameters; they are recovered by solving the Llama-3 interpolation
law (see :func:`_llama3_rope_scaling`) and verified to reproduce every ``f_i``.

Reading is lazy: the header is parsed with a small pure-Python reader (the ``gguf``
package's :class:`gguf.GGUFReader` builds a numpy view for each of the ~300 000
tokenizer strings, which takes ~10 s on a Qwen vocabulary), the data section is
memory-mapped, and a tensor is dequantised only when it is looked up in
:attr:`GGUFCheckpoint.tensors`, so a loader can move weights to the device one at a
time. Derived artefacts (the transformers tokenizer, ~20 s to build from GGUF
metadata, and optionally the float32 tensors) are cached on disk, keyed by the
file's path, size and modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import pathlib
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GGUFCheckpoint",
    "GGUFError",
    "GGUFHeader",
    "GGUFTensorInfo",
    "LazyTensors",
    "read_gguf",
    "read_gguf_header",
]

#: ``general.architecture`` values :func:`read_gguf` maps to Hugging Face names.
SUPPORTED_ARCHITECTURES = ("qwen2", "llama")

_HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

_MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (little-endian); 8 = string, 9 = array.
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_SCALAR_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9

# GGUF tensor-name stems (after ``blk.N.``) -> Hugging Face module paths.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that carry configuration, not weights.
_CONFIG_TENSORS = ("rope_freqs.weight",)


class GGUFError(ValueError):
    """A GGUF file is unreadable, truncated, or uses something smcjax cannot load."""


class GGUFTensorInfo(NamedTuple):
    """One tensor descriptor of a GGUF file.

    Attributes
    ----------
    name : str
        GGUF tensor name (``blk.0.attn_q.weight``).
    shape : tuple of int
        numpy shape (the reverse of the GGUF ``dims``), e.g. ``(out, in)``.
    ggml_type : int
        :class:`gguf.GGMLQuantizationType` value.
    offset : int
        Absolute byte offset of the data in the file.
    nbytes : int
        Size of the stored (quantised) data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


class GGUFHeader(NamedTuple):
    """Metadata and tensor descriptors of a GGUF file (see :func:`read_gguf_header`)."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data_offset: int
    file_size: int


class GGUFCheckpoint(NamedTuple):
    """A GGUF checkpoint in Hugging Face form.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    config : dict
        HF ``config.json``-style dictionary (``model_type``, ``hidden_size``, ...,
        ``rope_theta``, ``rope_scaling``, ``tie_word_embeddings``, ``eos_token_id``).
    tensors : Mapping[str, numpy.ndarray]
        HF tensor name -> float32 array in HF shape. Lazy unless ``lazy=False``: each
        lookup dequantises (or reads from the float32 cache) afresh, so look each name
        up once and drop the array when it is on the device.
    tokenizer : transformers.PreTrainedTokenizerBase or None
        Built from the GGUF metadata, or None (see ``tokenizer_error``).
    tokenizer_error : str or None
        Why ``tokenizer`` is None.
    metadata : dict
        The GGUF key/value metadata (string arrays such as the vocabulary included).
    quantization : dict
        HF tensor name -> GGML type name (``"Q4_K"``, ``"F32"``, ...).
    """

    path: pathlib.Path
    config: dict[str, Any]
    tensors: Mapping[str, np.ndarray]
    tokenizer: Any
    tokenizer_error: str | None
    metadata: dict[str, Any]
    quantization: dict[str, str]


# --------------------------------------------------------------------------- header


class _Cursor:
    """Sequential little-endian reader over a buffer that reports truncation."""

    def __init__(self, buf: Any, path: pathlib.Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: GGUF header is truncated or corrupt (reading {what} at "
                f"byte {self.pos} needs {n} bytes; the file has {self.size})"
            )

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = "<" + _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar(4, what)
            count = self.scalar(10, what)
            if etype in _SCALAR_NUMPY:
                dtype = np.dtype(_SCALAR_NUMPY[etype]).newbyteorder("<")
                n = count * dtype.itemsize
                self._need(n, what)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += n
                return arr.astype(dtype.newbyteorder("="))
            if etype == _STRING:
                return [self.string(what) for _ in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY, what) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} in {what}")


def _open_buffer(path: pathlib.Path) -> tuple[Any, int]:
    size = path.stat().st_size
    if size == 0:
        raise GGUFError(f"{path}: empty file, not a GGUF checkpoint")
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), size


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the metadata and tensor descriptors of a GGUF file (no tensor data).

    Parameters
    ----------
    path : str or path-like
        A ``.gguf`` file, version 2 or 3, little-endian.

    Returns
    -------
    header : NamedTuple
        ``version``, ``metadata`` (dict), ``tensors`` (name -> :class:`GGUFTensorInfo`),
        ``data_offset`` and ``file_size``.

    Raises
    ------
    GGUFError
        Bad magic, unsupported version, truncated header, or tensor data reaching past
        the end of the file (a truncated download); the message names the file and,
        for the data, the first tensor that does not fit.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    buf, size = _open_buffer(path)
    try:
        cur = _Cursor(buf, path)
        cur._need(4, "the magic")
        if bytes(buf[:4]) != _MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        cur.pos = 4
        version = cur.scalar(4, "the version")
        if version & 0xFFFF == 0:
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2, 3)")
        n_tensors = cur.scalar(10, "the tensor count")
        n_kv = cur.scalar(10, "the metadata count")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar(4, f"the type of {key!r}")
            metadata[key] = cur.value(vtype, f"metadata {key!r}")
        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            ndim = cur.scalar(4, f"tensor {name!r}")
            dims = [cur.scalar(10, f"tensor {name!r}") for _ in range(ndim)]
            gtype = cur.scalar(4, f"tensor {name!r}")
            offset = cur.scalar(10, f"tensor {name!r}")
            raw_infos.append((name, tuple(reversed(dims)), gtype, offset))
        alignment = int(metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: invalid general.alignment {alignment}")
        data_offset = -(-cur.pos // alignment) * alignment
    finally:
        buf.close()

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, gtype, offset in raw_infos:
        nbytes = _stored_nbytes(path, name, shape, gtype)
        start = data_offset + offset
        if start + nbytes > size:
            raise GGUFError(
                f"{path}: file is truncated: tensor {name!r} needs bytes "
                f"[{start}, {start + nbytes}) but the file has {size} bytes"
            )
        tensors[name] = GGUFTensorInfo(name, shape, gtype, start, nbytes)
    return GGUFHeader(version, metadata, tensors, data_offset, size)


def _ggml_type(gtype: int) -> Any:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(gtype)
    except ValueError:
        return None


def _stored_nbytes(
    path: pathlib.Path, name: str, shape: tuple[int, ...], gtype: int
) -> int:
    from gguf import GGML_QUANT_SIZES

    qtype = _ggml_type(gtype)
    if qtype is None or qtype not in GGML_QUANT_SIZES:
        raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type id {gtype}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    last = shape[-1] if shape else 1
    if last % block:
        raise GGUFError(
            f"{path}: tensor {name!r} ({qtype.name}) has rows of {last} values, "
            f"not a multiple of the block size {block}"
        )
    return int(np.prod(shape[:-1], dtype=np.int64)) * (last // block) * type_size


_SUPPORT: dict[int, bool] = {}


def _dequantizable(gtype: int) -> bool:
    """Whether the installed ``gguf`` package can dequantise this type (probed once)."""
    if gtype not in _SUPPORT:
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        qtype = _ggml_type(gtype)
        try:
            block, type_size = GGML_QUANT_SIZES[qtype]
            out = dequantize(np.zeros((1, type_size), np.uint8), qtype)
            _SUPPORT[gtype] = out.shape == (1, block) and out.dtype.kind == "f"
        except (NotImplementedError, KeyError, ValueError, TypeError):
            _SUPPORT[gtype] = False
    return _SUPPORT[gtype]


# ------------------------------------------------------------------ tensor mapping


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        stem = _LAYER_NAMES.get(parts[2])
        if stem is not None and parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{stem}.{parts[3]}"
    return None


def _unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head ``(d/2, 2) → (2, d/2)``.

    ``w`` has shape ``(num_heads · d, ...)`` (a weight ``(out, in)`` or a bias).
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise GGUFError(
            f"cannot un-permute a rotary projection with {rows} rows over "
            f"{num_heads} heads (rows must be a multiple of 2·heads)"
        )
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(path: pathlib.Path, info: GGUFTensorInfo) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    qtype = _ggml_type(info.ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = info.shape or (1,)
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    raw = np.memmap(
        path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,)
    )
    try:
        out = dequantize(raw.reshape(byte_shape), qtype)
    except Exception as err:  # gguf raises bare exceptions on malformed blocks
        raise GGUFError(
            f"{path}: could not dequantise tensor {info.name!r} ({qtype.name}, "
            f"shape {info.shape}): {err}"
        ) from err
    if np.may_share_memory(out, raw):  # F32 is returned as a view of the file
        out = np.array(out, dtype=np.float32)
    out = np.asarray(out, dtype=np.float32).reshape(info.shape)
    del raw
    if not np.all(np.isfinite(out)):
        raise GGUFError(
            f"{path}: tensor {info.name!r} ({qtype.name}) dequantises to non-finite "
            "values; the file is corrupt"
        )
    return out


class LazyTensors(Mapping[str, np.ndarray]):
    """Read-only mapping ``HF name -> float32 array`` that loads on each lookup.

    Attributes
    ----------
    shapes : dict[str, tuple[int, ...]]
        HF shape of every tensor, available without loading anything.
    """

    def __init__(
        self,
        loaders: dict[str, Callable[[], np.ndarray]],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self._loaders = loaders
        self.shapes = shapes

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"LazyTensors({len(self)} tensors)"

    def materialize(self) -> dict[str, np.ndarray]:
        """Load every tensor into a plain dict."""
        return {name: self[name] for name in self}


# ------------------------------------------------------------------------- config


def _meta(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _build_config(
    path: pathlib.Path,
    header: GGUFHeader,
    rope_freqs: np.ndarray | None,
) -> dict[str, Any]:
    meta = header.metadata
    arch = _meta(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unknown architecture general.architecture={arch!r}; "
            f"smcjax reads {SUPPORTED_ARCHITECTURES}"
        )

    def need(key: str) -> Any:
        value = _meta(meta, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: missing metadata {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_meta(meta, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(
        _meta(meta, f"{arch}.attention.key_length")
        or _meta(meta, f"{arch}.rope.dimension_count")
        or hidden // heads
    )
    embd = header.tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(embd.shape[0])
    theta = float(_meta(meta, f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(_meta(meta, f"{arch}.context_length", 32768)),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in header.tensors

    rope_scaling = _rope_scaling(path, meta, arch, theta, head_dim, rope_freqs)
    config["rope_scaling"] = rope_scaling
    config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": theta,
        **(rope_scaling or {}),
    }

    bos = _meta(meta, "tokenizer.ggml.bos_token_id")
    eos = [
        int(v)
        for k in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (v := _meta(meta, f"tokenizer.ggml.{k}")) is not None
    ]
    eos = list(dict.fromkeys(eos))
    pad = _meta(meta, "tokenizer.ggml.padding_token_id")
    config["bos_token_id"] = None if bos is None else int(bos)
    config["eos_token_id"] = (eos[0] if len(eos) == 1 else eos) if eos else None
    config["pad_token_id"] = None if pad is None else int(pad)
    name = _meta(meta, "general.name")
    if name:
        config["_name_or_path"] = str(name)
    return config


def _rope_scaling(
    path: pathlib.Path,
    meta: dict[str, Any],
    arch: str,
    theta: float,
    head_dim: int,
    rope_freqs: np.ndarray | None,
) -> dict[str, Any] | None:
    kind = _meta(meta, f"{arch}.rope.scaling.type")
    if rope_freqs is not None:
        original = _meta(meta, f"{arch}.rope.scaling.original_context_length")
        return _llama3_rope_scaling(path, rope_freqs, theta, head_dim, original)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {
            "rope_type": "linear",
            "factor": float(meta[f"{arch}.rope.scaling.factor"]),
        }
    raise GGUFError(
        f"{path}: unsupported RoPE scaling {arch}.rope.scaling.type={kind!r}"
    )


def _llama3_rope_scaling(
    path: pathlib.Path,
    rope_freqs: np.ndarray,
    theta: float,
    head_dim: int,
    original: int | None,
) -> dict[str, Any] | None:
    r"""Recover HF ``rope_scaling`` (``rope_type="llama3"``) from ``rope_freqs``.

    llama.cpp stores divisors ``f_i`` with ``ω'_i = ω_i / f_i``. The Llama-3 law is, for
    wavelength :math:`λ_i = 2π/ω_i` and ``L0 = original_max_position_embeddings``:
    ``f_i = 1`` if :math:`λ_i < L0/h`, ``f_i = F`` (the factor) if :math:`λ_i > L0/l`,
    and otherwise :math:`1/f_i = (1 - s_i)/F + s_i` with
    :math:`s_i = (L0/λ_i - l)/(h - l)`. So ``F = max f``, and the medium frequencies
    give :math:`s_i` linear in :math:`1/λ_i` with slope ``L0/(h - l)`` and intercept
    ``−l/(h − l)``; with ``L0`` from the metadata (default 8192) this fixes ``l`` and
    ``h``. The result is checked to reproduce every ``f_i`` to 1e-4 relative.
    """
    f = np.asarray(rope_freqs, np.float64).ravel()
    if f.shape[0] != head_dim // 2:
        raise GGUFError(
            f"{path}: rope_freqs.weight has {f.shape[0]} entries, expected "
            f"head_dim/2 = {head_dim // 2}"
        )
    if np.allclose(f, 1.0):
        return None
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    factor = float(f.max())
    l0 = float(original or 8192)
    medium = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if medium.sum() >= 2:
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], s, 1)
        width = l0 / slope
        low = -intercept * width
        high = low + width
    elif medium.sum() == 1:
        s = (1 / f[medium][0] - 1 / factor) / (1 - 1 / factor)
        low = 1.0
        high = low + (l0 / wavelen[medium][0] - low) / s
    else:
        low, high = 1.0, 4.0
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(np.round(low, 4)),
        "high_freq_factor": float(np.round(high, 4)),
        "original_max_position_embeddings": round(l0),
    }
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = (l0 / wavelen - low) / (high - low)
    expect = np.where(
        wavelen < l0 / high,
        1.0,
        np.where(wavelen > l0 / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if not np.allclose(expect, f, rtol=1e-4, atol=0):
        raise GGUFError(
            f"{path}: rope_freqs.weight does not follow the Llama-3 RoPE scaling law; "
            "smcjax cannot express it as HF rope_scaling"
        )
    return params


# -------------------------------------------------------------------------- caches


def _file_key(path: pathlib.Path) -> str:
    """Cache key of a file: ``<hash of real path>-<hash of size and mtime>``.

    The first half names the file, the second its version, so an entry made from an
    older version of the same file can be found and removed (:func:`_drop_stale`).
    """
    st = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    what = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{where}-{what}"


def _drop_stale(directory: pathlib.Path, key: str) -> None:
    """Remove cache entries of older versions of the file whose key is ``key``."""
    import shutil

    where = key.split("-", 1)[0]
    for entry in directory.glob(f"{where}-*"):
        if not entry.name.startswith(key):
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _cache_root() -> pathlib.Path:
    from smcjax.llm.hub import cache_dir

    return cache_dir()


def _load_tokenizer(
    path: pathlib.Path, metadata: dict[str, Any], use_cache: bool
) -> tuple[Any, str | None]:
    if "tokenizer.ggml.model" not in metadata:
        return None, f"{path} has no tokenizer metadata (tokenizer.ggml.*)"
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        return None, f"transformers is not installed ({err}); pip install 'smcjax[llm]'"
    cached = None
    if use_cache:
        key = f"{_file_key(path)}-tf{transformers.__version__}"
        cached = _cache_root() / "tokenizers" / key
        if (cached / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(cached)), None
            except Exception:  # a stale or partial cache entry: rebuild it
                pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        return None, (
            f"transformers could not build a tokenizer from {path}: "
            f"{type(err).__name__}: {err}"
        )
    if cached is not None:
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
            tok.save_pretrained(str(tmp))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
            _drop_stale(cached.parent, cached.name)
            try:
                os.replace(tmp, cached)
            except OSError:  # another process won the race
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return tok, None


def _write_safetensors(
    target: pathlib.Path, names: list[str], shapes: dict[str, tuple[int, ...]], get: Any
) -> None:
    """Stream float32 tensors into a safetensors file, one tensor in memory at a time.

    Format: little-endian u64 header length, JSON header ``{name: {dtype, shape,
    data_offsets}}`` padded with spaces to 8 bytes, then the raw data.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        n = int(np.prod(shapes[name], dtype=np.int64)) * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name in names:
                arr = np.ascontiguousarray(get(name), dtype="<f4")
                fh.write(memoryview(arr).cast("B"))
        from smcjax.llm.hub import _public_mode

        _public_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _safetensors_loader(file: pathlib.Path, name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as fh:
            return fh.get_tensor(name)

    return load


# ---------------------------------------------------------------------------- main


def read_gguf(
    path: str | os.PathLike[str],
    *,
    lazy: bool = True,
    tokenizer: bool = True,
    cache: bool = True,
    float32_cache: bool | None = None,
) -> GGUFCheckpoint:
    """Read a Qwen2 or Llama GGUF checkpoint into Hugging Face names, shapes and config.

    Parameters
    ----------
    path : str or path-like
        The ``.gguf`` file.
    lazy : bool, default True
        Return :attr:`GGUFCheckpoint.tensors` as a :class:`LazyTensors` mapping that
        dequantises a tensor on each lookup (peak memory: one float32 tensor), rather
        than a dict of all float32 tensors (4 bytes per parameter at once).
    tokenizer : bool, default True
        Build a transformers tokenizer from the GGUF metadata.
    cache : bool, default True
        Cache the built tokenizer under :func:`smcjax.llm.hub.cache_dir` (building it
        from GGUF metadata takes ~20 s for a 150k vocabulary; reloading it ~1.5 s).
    float32_cache : bool or None, default None
        Keep a float32 ``.safetensors`` copy of the dequantised tensors in the cache and
        read from it on later calls. ``None`` enables it for files managed by the
        smcjax cache (the known models of :mod:`smcjax.llm.hub`) only.

    Returns
    -------
    GGUFCheckpoint
        ``config``, ``tensors`` (float32, HF names: ``model.embed_tokens.weight``
        ``(V, D)``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}``,
        ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
        ``model.layers.{i}.{input,post_attention}_layernorm.weight``,
        ``model.norm.weight``, and ``lm_head.weight`` when the head is untied),
        ``tokenizer``, ``tokenizer_error``, ``metadata``, ``quantization``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    GGUFError
        Truncated or corrupt file, unknown architecture, a tensor type the ``gguf``
        package cannot dequantise, or an unexpected tensor name (all unexpected
        names and unsupported types are listed in one message).
    """
    path = pathlib.Path(path)
    header = read_gguf_header(path)
    arch = _meta(header.metadata, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unknown architecture general.architecture={arch!r}; "
            f"smcjax reads {SUPPORTED_ARCHITECTURES}"
        )

    from gguf import GGMLQuantizationType

    problems: list[str] = []
    mapping: dict[str, GGUFTensorInfo] = {}
    for name, info in header.tensors.items():
        if name in _CONFIG_TENSORS:
            continue
        hf = _hf_name(name)
        if hf is None:
            problems.append(f"unexpected tensor {name!r}")
            continue
        if not _dequantizable(info.ggml_type):
            qname = GGMLQuantizationType(info.ggml_type).name
            problems.append(
                f"tensor {name!r} has type {qname}, which the installed gguf "
                "package cannot dequantise"
            )
            continue
        mapping[hf] = info
    if problems:
        raise GGUFError(
            f"{path}: cannot load {len(problems)} tensor(s): " + "; ".join(problems)
        )

    rope_freqs = None
    if "rope_freqs.weight" in header.tensors:
        rope_freqs = _dequantize(path, header.tensors["rope_freqs.weight"])
    config = _build_config(path, header, rope_freqs)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def loader(hf: str, info: GGUFTensorInfo) -> Callable[[], np.ndarray]:
        permute = None
        if arch == "llama" and ".self_attn.q_proj." in hf:
            permute = heads
        elif arch == "llama" and ".self_attn.k_proj." in hf:
            permute = kv_heads

        def load() -> np.ndarray:
            w = _dequantize(path, info)
            if permute is not None:
                try:
                    w = np.ascontiguousarray(_unpermute_rotary(w, permute))
                except GGUFError as err:
                    raise GGUFError(f"{path}: tensor {info.name!r}: {err}") from None
            return w

        return load

    loaders = {hf: loader(hf, info) for hf, info in mapping.items()}
    shapes = {hf: info.shape for hf, info in mapping.items()}
    quantization = {
        hf: GGMLQuantizationType(info.ggml_type).name for hf, info in mapping.items()
    }

    if float32_cache is None:
        float32_cache = cache and _is_under(path, _cache_root())
    if float32_cache:
        st_file = _cache_root() / "float32" / f"{_file_key(path)}.safetensors"
        ready = _safetensors_complete(st_file, shapes)
        if not ready:
            _drop_stale(st_file.parent, st_file.stem)
            try:
                _write_safetensors(
                    st_file, list(loaders), shapes, lambda n: loaders[n]()
                )
                ready = True
            except OSError as err:  # read-only or full cache: dequantise instead
                import warnings

                warnings.warn(
                    f"could not write the float32 cache {st_file}: {err}", stacklevel=2
                )
        if ready:
            loaders = {hf: _safetensors_loader(st_file, hf) for hf in loaders}

    tensors: Mapping[str, np.ndarray] = LazyTensors(loaders, shapes)
    if not lazy:
        tensors = tensors.materialize()

    tok, tok_error = (None, "tokenizer=False was passed")
    if tokenizer:
        tok, tok_error = _load_tokenizer(path, header.metadata, cache)
    return GGUFCheckpoint(
        path=path,
        config=config,
        tensors=tensors,
        tokenizer=tok,
        tokenizer_error=tok_error,
        metadata=header.metadata,
        quantization=quantization,
    )


def _is_under(path: pathlib.Path, root: pathlib.Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _safetensors_complete(
    file: pathlib.Path, shapes: dict[str, tuple[int, ...]]
) -> bool:
    """Whether ``file`` is a finished float32 cache holding exactly ``shapes``."""
    if not file.is_file():
        return False
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return False
    header.pop("__metadata__", None)
    if set(header) != set(shapes):
        return False
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    return (
        all(
            tuple(header[k]["shape"]) == tuple(s) and header[k]["dtype"] == "F32"
            for k, s in shapes.items()
        )
        and file.stat().st_size == 8 + n + end
    )
