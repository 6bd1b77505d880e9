"""Decoder configuration shared by the Qwen2 and Llama families.

One frozen dataclass, :class:`ModelConfig`, describes every decoder smcjax can run. It
is built from a Hugging Face ``config.json`` dictionary with
:meth:`ModelConfig.from_hf`,
which understands both the transformers 4 layout (``rope_theta`` / ``rope_scaling`` at
the top level) and the transformers 5 layout (``rope_parameters``).

The two families differ only in flags:

========================  ==========  ===========================
field                     qwen2       llama
========================  ==========  ===========================
``qkv_bias``              True        ``attention_bias`` (False)
``o_bias``                False       ``attention_bias`` (False)
``mlp_bias``              False       ``mlp_bias`` (False)
``rope_scaling``          None        ``{"rope_type": "llama3", ...}`` for Llama 3
========================  ==========  ===========================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "rope_inverse_frequencies"]

#: ``model_type`` values of ``config.json`` this decoder implements.
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int | np.integer):
        return (int(value),)
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    r"""Hyper-parameters of a pre-norm decoder-only transformer (Qwen2 / Llama).

    Attributes
    ----------
    model_type : str
        ``"qwen2"`` or ``"llama"``.
    vocab_size, hidden_size, intermediate_size, num_layers : int
        Sizes ``V``, ``D``, ``I`` and the number of decoder layers.
    num_heads, num_kv_heads, head_dim : int
        Query heads ``H``, key/value heads ``K`` (grouped-query attention,
        ``H % K == 0``) and the per-head width ``d`` (``D / H`` unless the checkpoint
        says otherwise).
    rms_norm_eps : float
        ε of :math:`\mathrm{RMSNorm}(x) = w \odot x / \sqrt{\overline{x^2} + ε}`.
    rope_theta : float
        Base θ of the rotary embedding, ``inv_freq_i = θ^{-2i/d}``.
    rope_scaling : tuple of (key, value) pairs or None
        Llama-3 style frequency scaling (``rope_type="llama3"``), stored hashable.
    tie_word_embeddings : bool
        Whether the LM head reuses the token embedding matrix.
    qkv_bias, o_bias, mlp_bias : bool
        Which projections carry a bias.
    max_position_embeddings : int
        Context length the checkpoint was trained for (informational).
    bos_token_id : int or None
    eos_token_ids : tuple of int
        Every id that ends a sequence.
    scan_layers : bool
        Layout of the decoder layers: stacked parameters run by :func:`jax.lax.scan`
        (compile time independent of depth), or separate per-layer buffers in an
        unrolled loop (about 2x faster decoding on CPU, where XLA copies every
        dynamically sliced layer of a scan; compile time grows with depth).
    architecture : str
        First entry of ``architectures`` in ``config.json`` (e.g.
        ``"Qwen2ForCausalLM"``,
        ``"Qwen2ForProcessRewardModel"``).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = ""
    scan_layers: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown architecture: model_type={self.model_type!r}; smcjax.llm "
                f"supports {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """The Llama-3 rope scaling parameters as a dict, or None."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @classmethod
    def from_hf(
        cls, hf: Mapping[str, Any], *, scan_layers: bool | None = None
    ) -> ModelConfig:
        """Build a config from a Hugging Face ``config.json`` dictionary.

        Parameters
        ----------
        hf : Mapping
            The parsed ``config.json`` (or the GGUF reader's HF-style config dict).
        scan_layers : bool, optional
            Layer layout; by default scanned on accelerators, unrolled on CPU.

        Raises
        ------
        ValueError
            If ``model_type`` is missing or not one of :data:`SUPPORTED_MODEL_TYPES`,
            or if a required size is missing.
        """
        model_type = hf.get("model_type")
        archs = list(hf.get("architectures") or [])
        if model_type is None and archs:
            low = archs[0].lower()
            model_type = "qwen2" if low.startswith("qwen2") else None
            model_type = "llama" if low.startswith("llama") else model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown architecture: model_type={model_type!r} "
                f"(architectures={archs}); smcjax.llm supports {SUPPORTED_MODEL_TYPES}"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ValueError(f"config is missing required keys {missing}")

        # transformers 5 keeps theta and scaling together in `rope_parameters`;
        # transformers 4 has `rope_theta` and `rope_scaling` at the top level.
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {**legacy, **rope}
        scaling.pop("rope_theta", None)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in (None, "default"):
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = tuple(
                sorted(
                    (k, scaling[k])
                    for k in (
                        "factor",
                        "low_freq_factor",
                        "high_freq_factor",
                        "original_max_position_embeddings",
                    )
                )
            )
        else:
            raise ValueError(
                f"unsupported rope scaling type {rope_type!r}; "
                "supported: default, llama3"
            )

        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_ids(hf.get("eos_token_id")),
            architecture=archs[0] if archs else "",
            scan_layers=(
                jax.default_backend() != "cpu" if scan_layers is None else scan_layers
            ),
        )


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies ``inv_freq`` of shape ``(head_dim // 2,)``, float32.

    Default RoPE: :math:`ω_i = θ^{-2i/d}`. Llama-3 scaling keeps high frequencies
    (wavelength :math:`λ_i = 2π/ω_i` below ``L0 / high_freq_factor``), divides low
    frequencies (``λ_i > L0 / low_freq_factor``) by ``factor`` and interpolates
    linearly in between, with ``L0 = original_max_position_embeddings``.
    """
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = config.rope_scaling_dict
    if s is not None:
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(
            wavelen < old_len / high,
            inv,
            np.where(wavelen > old_len / low, inv / factor, mid),
        )
    return inv.astype(np.float32)
