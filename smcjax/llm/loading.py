"""Checkpoint loading: Hugging Face safetensors directories and GGUF files.

The core is :func:`params_from_state_dict`, which turns a mapping of Hugging Face tensor
names to NumPy arrays (HF shapes, e.g. ``(out, in)`` for linear weights) into the
parameter pytree of the NNX model:

1. the abstract model is built with :func:`flax.nnx.eval_shape` (no memory allocated);
2. every checkpoint name is matched against :data:`WEIGHT_TABLE`, a list of
   ``regex -> module path`` rules with a transform (``"T"``: transpose an HF
   ``(out, in)`` weight to the ``(in, out)`` kernel); per-layer tensors
   ``model.layers.{i}.*`` fill slice ``i`` of the stacked parameter (or the
   parameter of layer ``i`` when layers are unrolled), and the q/k/v and gate/up
   projections fill column blocks of the fused ``qkv_proj`` / ``gate_up_proj``
   parameters (:data:`FUSED_PROJECTIONS`), so the fused weights are built once here;
3. every problem — a missing tensor, an unexpected tensor, a wrong shape — is collected
   and reported in ONE :class:`CheckpointError` that names the tensors.

:func:`load` and :func:`load_prm` accept a checkpoint directory (``config.json`` + one
``*.safetensors`` or several shards listed in ``model.safetensors.index.json``), a
``.gguf`` file (read by :func:`smcjax.llm.gguf.read_gguf`), or a known model name
(resolved by :func:`smcjax.llm.hub.resolve`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smcjax.llm.config import ModelConfig
from smcjax.llm.model import CausalLM

__all__ = [
    "FUSED_PROJECTIONS",
    "WEIGHT_TABLE",
    "CheckpointError",
    "SafetensorsFiles",
    "default_dtype",
    "default_scan_layers",
    "params_from_state_dict",
    "read_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every offending tensor."""


#: ``(regex over HF names, module path template, transform)``. ``{1}``/``{2}`` refer to
#: regex groups; a ``layers`` path is stacked over group 1 (the layer index).
WEIGHT_TABLE: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    (r"model\.embed_tokens\.weight", ("model", "embed_tokens", "embedding"), None),
    (r"model\.norm\.weight", ("model", "norm", "weight"), None),
    (r"lm_head\.weight", ("lm_head", "kernel"), "T"),
    (
        r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        ("model", "layers", "{2}", "weight"),
        None,
    ),
    (
        r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight",
        ("model", "layers", "{2}", "{3}", "kernel"),
        "T",
    ),
    (
        r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias",
        ("model", "layers", "{2}", "{3}", "bias"),
        None,
    ),
    # Qwen2ForProcessRewardModel: score = Sequential(Linear, ReLU, Linear).
    (r"score\.(0|2)\.weight", ("score_{1}", "kernel"), "T"),
    (r"score\.(0|2)\.bias", ("score_{1}", "bias"), None),
)

#: Checkpoint entries that carry no parameters (buffers of old transformers versions).
_IGNORED = re.compile(
    r"model\.rotary_emb\.inv_freq|model\.layers\.\d+\.self_attn\.rotary_emb\..*"
)


#: Checkpoint projections stored as column blocks of one fused module parameter:
#: HF projection -> (fused module name, block index). Block widths come from the
#: config (:func:`_fused_blocks`); the order of the blocks is the order here.
FUSED_PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _fused_blocks(cfg: ModelConfig, fused: str) -> list[tuple[str, int, int]]:
    """``(HF projection, column offset, width)`` of every block of a fused module."""
    d = cfg.head_dim
    widths = {
        "qkv_proj": [
            ("q_proj", cfg.num_heads * d),
            ("k_proj", cfg.num_kv_heads * d),
            ("v_proj", cfg.num_kv_heads * d),
        ],
        "gate_up_proj": [
            ("gate_proj", cfg.intermediate_size),
            ("up_proj", cfg.intermediate_size),
        ],
    }[fused]
    offsets = np.cumsum([0] + [w for _, w in widths])
    return [(n, int(o), w) for (n, w), o in zip(widths, offsets, strict=False)]


def _blocks_of(cfg: ModelConfig, path: tuple[Any, ...]) -> list[Any]:
    """Block ids that fill the parameter at ``path``: ``[None]`` when not fused."""
    fused = path[-2] if len(path) >= 2 else None
    if fused in ("qkv_proj", "gate_up_proj"):
        return list(range(len(_fused_blocks(cfg, fused))))
    return [None]


def default_scan_layers() -> bool:
    """Scan stacked layers on accelerators; unroll them on CPU (see ModelConfig)."""
    return jax.default_backend() != "cpu"


def default_dtype() -> Any:
    """float32 on CPU, bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _path_to_name(
    path: tuple[Any, ...],
    layer: int | None = None,
    block: int | None = None,
    cfg: ModelConfig | None = None,
) -> str:
    """HF name of a module path (block ``block`` of a fused one; missing tensors)."""
    parts = list(path)
    leaf = parts.pop()
    if block is not None and cfg is not None:
        parts[-1] = _fused_blocks(cfg, parts[-1])[block][0]
    hf_leaf = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    if parts and parts[0].startswith("score_"):
        parts = ["score", parts[0].split("_", 1)[1]]
    if layer is not None:
        parts.insert(2, str(layer))
    return ".".join([*(str(q) for q in parts), hf_leaf])


def _match(name: str) -> tuple[tuple[str, ...], int | None, str | None] | None:
    for pattern, template, transform in WEIGHT_TABLE:
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        path = tuple(
            re.sub(r"\{(\d)\}", lambda g, m=m: m.group(int(g.group(1))), p)
            for p in template
        )
        layer = int(m.group(1)) if "layers" in template else None
        return path, layer, transform
    return None


def params_from_state_dict(
    config: ModelConfig | Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    module: Any = CausalLM,
    dtype: Any = None,
    scan_layers: bool | None = None,
) -> tuple[Any, nnx.State, ModelConfig]:
    """Build the NNX parameters of ``module`` from Hugging Face-named tensors.

    Parameters
    ----------
    config : ModelConfig or Mapping
        The model configuration, or an HF ``config.json``-style dict.
    tensors : Mapping[str, np.ndarray]
        HF names -> arrays with HF shapes (linear weights ``(out, in)``). Read lazily:
        each tensor is accessed once.
    module : type, default :class:`~smcjax.llm.model.CausalLM`
        NNX module class to fill (``CausalLM`` or the PRM module).
    dtype : dtype, optional
        Parameter dtype; :func:`default_dtype` when None.
    scan_layers : bool, optional
        Override ``config.scan_layers`` (stacked + scan, or unrolled per-layer).

    Returns
    -------
    graphdef, params, config

    Raises
    ------
    CheckpointError
        Listing every missing tensor, unexpected tensor and wrong shape at once.
    """
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
    if scan_layers is not None:
        cfg = dataclasses.replace(cfg, scan_layers=bool(scan_layers))
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: module(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    expected = {path: var for path, var in nnx.to_flat_state(abs_state)}
    buffers: dict[tuple[Any, ...], np.ndarray] = {}
    # (layer or -1, block or None) pairs already provided, per parameter.
    filled: dict[tuple[Any, ...], set[tuple[int, Any]]] = {p: set() for p in expected}
    unexpected: list[str] = []
    wrong_shape: list[str] = []

    np_dtype = np.dtype(jnp.dtype(dtype))
    for name in tensors:
        if _IGNORED.fullmatch(name):
            continue
        hit = _match(name)
        block = None
        if hit is not None and hit[0][-2] in FUSED_PROJECTIONS:
            fused, block = FUSED_PROJECTIONS[hit[0][-2]]
            hit = ((*hit[0][:-2], fused, hit[0][-1]), hit[1], hit[2])
        if hit is not None and hit[1] is not None and not cfg.scan_layers:
            # Unrolled layout: one parameter per layer, ("model", "layers", i, ...).
            hit = ((*hit[0][:2], hit[1], *hit[0][2:]), None, hit[2])
        if hit is None or hit[0] not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store the head anyway
            unexpected.append(name)
            continue
        path, layer, transform = hit
        shape = tuple(expected[path].get_value().shape)
        stacked = layer is not None
        want = shape[1:] if stacked else shape
        if stacked and not 0 <= layer < shape[0]:
            unexpected.append(f"{name} (model has {shape[0]} layers)")
            continue
        if block is not None:  # one column block of the fused parameter
            _, offset, width = _fused_blocks(cfg, path[-2])[block]
            want = (*want[:-1], width)
        arr = np.asarray(tensors[name])
        if transform == "T":
            arr = arr.T
        key = (layer if stacked else -1, block)
        if tuple(arr.shape) != want:
            hf_shape = tuple(arr.shape[::-1]) if transform == "T" else tuple(arr.shape)
            hf_want = want[::-1] if transform == "T" else want
            wrong_shape.append(
                f"{name}: checkpoint shape {hf_shape}, model expects {hf_want}"
            )
            filled[path].add(key)  # reported once, not as missing
            continue
        if stacked or block is not None:
            if path not in buffers:
                buffers[path] = np.empty(shape, np_dtype)
            dest = buffers[path][layer] if stacked else buffers[path]
            if block is None:
                dest[...] = arr
            else:
                dest[..., offset : offset + width] = arr
        else:
            buffers[path] = arr.astype(np_dtype, copy=False)
        filled[path].add(key)

    missing: list[str] = []
    for path, var in expected.items():
        stacked = path[:2] == ("model", "layers") and isinstance(path[2], str)
        layers = range(var.get_value().shape[0]) if stacked else [-1]
        missing += [
            _path_to_name(path, i if stacked else None, blk, cfg)
            for i in layers
            for blk in _blocks_of(cfg, path)
            if (i, blk) not in filled[path]
        ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}"
        )
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {module.__name__} "
            f"({cfg.model_type}, {cfg.num_layers} layers):\n  " + "\n  ".join(problems)
        )

    # Pop each host buffer as soon as it is on the device: peak host memory is one
    # copy of the weights plus one parameter, not two copies.
    flat = [
        (path, type(var)(jnp.asarray(buffers.pop(path), dtype=dtype)))
        for path, var in expected.items()
    ]
    return graphdef, nnx.from_flat_state(flat), cfg


# ----------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _st_dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(_ST_DTYPES[code])
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {code!r}") from None


class SafetensorsFiles(Mapping[str, np.ndarray]):
    """Lazy, memory-mapped view of one or several ``.safetensors`` files.

    The format is an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets"}}`` and the raw bytes; arrays are
    ``np.memmap`` views, converted to float32 only when read (bfloat16 included).
    """

    def __init__(self, files: list[Path]):
        self._index: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"checkpoint shard not found: {f}")
            with open(f, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"truncated safetensors file: {f}")
                n = int.from_bytes(raw, "little")
                try:
                    header = json.loads(fh.read(n))
                except json.JSONDecodeError as e:
                    raise CheckpointError(
                        f"corrupt safetensors header in {f}: {e}"
                    ) from None
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if 8 + n + meta["data_offsets"][1] > size:
                    raise CheckpointError(f"truncated safetensors file: {f} ({name})")
                self._index[name] = (f, meta, 8 + n)

    def __getitem__(self, name: str) -> np.ndarray:
        path, meta, base = self._index[name]
        dt = _st_dtype(meta["dtype"])
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end == start:
            return np.zeros(shape, dt)
        arr = np.memmap(path, dtype=dt, mode="r", offset=base + start, shape=shape)
        if dt.itemsize == 2 and dt != np.float16:  # bfloat16 -> float32
            return np.asarray(arr, np.float32)
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Any], SafetensorsFiles]:
    """Read ``config.json`` and the (possibly sharded) safetensors of a directory.

    Raises
    ------
    FileNotFoundError
        Naming ``config.json``, the index, a shard, or the directory.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {cfg_path}")
    config = json.loads(cfg_path.read_text())
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [d / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights found in {d}")
    return config, SafetensorsFiles(files)


def _load_tokenizer(directory: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def resolve_source(
    source: str | Path,
) -> tuple[dict[str, Any], Mapping[str, np.ndarray], Any]:
    """Read ``(hf_config, tensors, tokenizer)`` from a directory, a .gguf or a name."""
    p = Path(source)
    if p.is_dir():
        config, tensors = read_checkpoint(p)
        return config, tensors, _load_tokenizer(p)
    if p.suffix == ".gguf" or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        from smcjax.llm.gguf import read_gguf

        ckpt = read_gguf(p)
        return dict(ckpt.config), ckpt.tensors, ckpt.tokenizer
    try:
        from smcjax.llm.hub import resolve
    except ImportError:
        resolve = None
    if resolve is not None and "/" not in str(source) and "\\" not in str(source):
        return resolve_source(resolve(str(source)))
    raise FileNotFoundError(
        f"checkpoint not found: {source!s} is neither a directory, a .gguf file, "
        "nor a known model name"
    )
