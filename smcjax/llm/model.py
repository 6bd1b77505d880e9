r"""Flax NNX decoder for the Qwen2 and Llama families, with an explicit KV cache.

One implementation, driven by :class:`~smcjax.llm.config.ModelConfig`, covers Qwen2
(q/k/v biases) and Llama (no biases, optional Llama-3 RoPE scaling). Each layer is the
pre-norm block

.. math::

    h &\leftarrow h + W_o\,\mathrm{Attn}\big(\mathrm{RoPE}(W_q \tilde h + b_q),
        \mathrm{RoPE}(W_k \tilde h + b_k), W_v \tilde h + b_v\big),
        \qquad \tilde h = \mathrm{RMSNorm}(h), \\
    h &\leftarrow h + W_{down}\big(\mathrm{SiLU}(W_{gate} \bar h) \odot
        W_{up} \bar h\big), \qquad \bar h = \mathrm{RMSNorm}(h),

with grouped-query attention (``H`` query heads share ``K`` key/value heads) and a final
RMSNorm followed by the LM head (tied to the embedding or not).

Layers are created stacked (every parameter has a leading ``num_layers`` axis) and run
with :func:`jax.lax.scan`, so compile time does not grow with depth (or, with
``ModelConfig.scan_layers=False``, the CPU default, as separate per-layer modules in an
unrolled loop). The projections are stored fused for fewer, larger dots: ``qkv_proj``
holds ``[W_q | W_k | W_v]`` and ``gate_up_proj`` holds ``[W_gate | W_up]`` as column
blocks (assembled once by the loader from the checkpoint's separate matrices), and an
untied LM head is a ``(D, V)`` kernel.

Functional use
--------------
:class:`Transformer` pairs the static NNX ``graphdef`` with the parameter pytree; it is
itself a pytree (parameters are leaves, graphdef and config are static), so it can be
passed to :func:`jax.jit` as an ordinary argument::

    logits, cache = transformer(tokens, positions, cache)

``tokens`` and ``positions`` are ``(B, T)`` int32. ``cache`` is a :class:`KVCache` whose
leaves have the batch axis first (``(B, K, S, head_dim)`` per layer); the new keys and
values are written at ``positions`` (rows whose position is ``>= S`` are dropped, which
is how inactive rows are masked out), and each query at position ``p`` attends to the
cache slots ``j <= p`` of its own row. Sequences of different lengths therefore share a
batch with *right* padding: row ``b`` keeps its tokens at buffer slots ``0..n_b-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smcjax.llm.config import ModelConfig, rope_inverse_frequencies
from smcjax.types import Array, ArrayLike

__all__ = [
    "Backbone",
    "CausalLM",
    "KVCache",
    "Transformer",
    "forward",
    "init_cache",
    "init_transformer",
]


class KVCache(NamedTuple):
    """Keys and values of every layer, batch axis first.

    Attributes
    ----------
    k, v : Array or tuple of Array
        With stacked (scanned) layers, one array ``(B, num_layers, K, S, head_dim)``;
        with unrolled layers, a tuple of ``num_layers`` arrays ``(B, K, S, head_dim)``
        (separate buffers, so no layer slice is ever copied). Slot ``j`` of row ``b``
        holds the rotated key (and the value) of the token at position ``j``.
    """

    k: Any
    v: Any


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32
) -> KVCache:
    """Zero cache of ``batch_size`` rows and ``max_len`` slots, laid out per config."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    if config.scan_layers:
        shape = (batch_size, config.num_layers, *shape[1:])
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    n = config.num_layers
    return KVCache(
        tuple(jnp.zeros(shape, dtype) for _ in range(n)),
        tuple(jnp.zeros(shape, dtype) for _ in range(n)),
    )


# --------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    r""":math:`w \odot x / \sqrt{\overline{x^2} + ε}`, computed in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


def _linear(din: int, dout: int, bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """RoPE in the "rotate half" layout: ``x cos + [-x2, x1] sin``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rot * sin).astype(x.dtype)


def _attention(
    q: Array, keys: Array, values: Array, q_pos: Array, key_pos: Array
) -> Array:
    """Masked softmax attention ``(B, K, Q, d)``; query ``i`` sees keys ``<= q_pos``."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.einsum(
        "bkqd,bksd->bkqs", q, keys.astype(q.dtype), preferred_element_type=jnp.float32
    )
    mask = (key_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # (B, 1, Q, S)
    scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkqs,bksd->bkqd", probs, values)


#: Cache-slot block of :func:`_blocked_attention`; buffers of at least
#: ``2 * ATTENTION_BLOCK`` slots whose size is a multiple of it attend block by block.
ATTENTION_BLOCK = 256


def _attention_block(num_slots: int) -> int | None:
    if num_slots >= 2 * ATTENTION_BLOCK and num_slots % ATTENTION_BLOCK == 0:
        return ATTENTION_BLOCK
    return None


def _cache_block(cache: Array, layer: Array | None, start: Array, size: int) -> Array:
    """Slots ``[start, start + size)`` of one layer's cache, ``(B, K, size, d)``.

    ``cache`` is ``(B, K, S, d)`` (``layer`` None) or the stacked ``(B, L, K, S, d)``;
    the block is sliced straight out of the stacked array, so a layer's whole buffer
    is never copied (with ``S`` slots that copy alone cost as much as the attention
    on a long buffer).
    """
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(cache, start, size, axis=2)
    b, _, kh, _, d = cache.shape
    zero = jnp.zeros((), jnp.int32)
    idx = (
        zero,
        jnp.asarray(layer, jnp.int32),
        zero,
        jnp.asarray(start, jnp.int32),
        zero,
    )
    return jax.lax.dynamic_slice(cache, idx, (b, 1, kh, size, d))[:, 0]


def _blocked_attention(
    q: Array,
    keys: Array,
    values: Array,
    q_pos: Array,
    block: int,
    layer: Array | None = None,
) -> Array:
    r"""Attention over only the cache blocks that hold valid keys (online softmax).

    With a large buffer ``S``, reading every slot at every decode step costs as much
    as reading the weights. Here a ``while_loop`` visits blocks ``0..n-1`` with
    ``n = max_b(position_b) // block + 1`` (rows whose position is outside the buffer
    are inactive and ignored) and accumulates, per query, the running maximum ``m``,
    normaliser :math:`\ell = \sum_j e^{s_j - m}` and numerator
    :math:`a = \sum_j e^{s_j - m} v_j`; the output is :math:`a / \ell`.

    ``keys``/``values`` are one layer's ``(B, K, S, d)`` cache, or the stacked
    ``(B, L, K, S, d)`` cache together with the (traced) ``layer`` index.
    """
    b, kh, nq, d = q.shape
    s = keys.shape[-2]
    scale = 1.0 / np.sqrt(d)
    valid = q_pos < s
    n_blocks = jnp.max(jnp.where(valid, q_pos, 0)) // block + 1
    neg = jnp.finfo(jnp.float32).min

    def body(carry):
        i, m, den, acc = carry
        kb = _cache_block(keys, layer, i * block, block)
        vb = _cache_block(values, layer, i * block, block)
        sc = (
            jnp.einsum(
                "bkqd,bksd->bkqs",
                q,
                kb.astype(q.dtype),
                preferred_element_type=jnp.float32,
            )
            * scale
        )
        kpos = i * block + jnp.arange(block, dtype=q_pos.dtype)
        mask = (kpos[None, None, :] <= q_pos[:, :, None])[:, None]  # (B, 1, Q, blk)
        sc = jnp.where(mask, sc, neg)
        m_new = jnp.maximum(m, sc.max(axis=-1))
        p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        den = den * corr + p.sum(axis=-1)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(vb.dtype), vb)
        acc = acc * corr[..., None] + pv.astype(jnp.float32)
        return i + 1, m_new, den, acc

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((b, kh, nq), neg, jnp.float32),
        jnp.zeros((b, kh, nq), jnp.float32),
        jnp.zeros((b, kh, nq, d), jnp.float32),
    )
    _, _, den, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    return (acc / jnp.maximum(den, 1e-30)[..., None]).astype(values.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings and a KV cache.

    The query, key and value projections are ONE fused linear map ``qkv_proj``
    (kernel ``(D, (H + 2K) d)``: the columns of ``W_q``, then ``W_k``, then ``W_v``),
    built once at load time from the checkpoint's three matrices, so a decode step
    runs one dot instead of three (two of them very thin).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, h, k = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.qkv_proj = _linear(
            cfg.hidden_size, (h + 2 * k) * d, cfg.qkv_bias, dtype, rngs
        )
        self.o_proj = _linear(h * d, cfg.hidden_size, cfg.o_bias, dtype, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, d

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        positions: Array,
        cache: tuple[Array, Array] | None,
        layer: Array | None,
        kv_len: int | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Attention output and the updated ``(keys, values)`` cache of this layer.

        ``cache`` is ``(B, K, S, d)`` per layer, or the stacked ``(B, L, K, S, d)``
        arrays together with the (traced) ``layer`` index.
        """
        b, t, _ = x.shape
        h, kh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        q = _rotate(qkv[..., : h * d].reshape(b, t, h, d), cos, sin)
        k = qkv[..., h * d : (h + kh) * d].reshape(b, t, kh, d)
        k = _rotate(k, cos, sin).transpose(0, 2, 1, 3)
        v = qkv[..., (h + kh) * d :].reshape(b, t, kh, d).transpose(0, 2, 1, 3)
        if cache is not None:
            ck, cv = cache
            rows = jnp.arange(b)[:, None, None]
            heads = jnp.arange(kh)[None, :, None]
            pos = positions[:, None, :]
            # Scatter the new keys/values at (row, [layer,] head, position); rows whose
            # position is outside the buffer (inactive rows) are dropped.
            if layer is None:
                ck = ck.at[rows, heads, pos].set(k.astype(ck.dtype), mode="drop")
                cv = cv.at[rows, heads, pos].set(v.astype(cv.dtype), mode="drop")
            else:
                ck = ck.at[rows, layer, heads, pos].set(k.astype(ck.dtype), mode="drop")
                cv = cv.at[rows, layer, heads, pos].set(v.astype(cv.dtype), mode="drop")
            cache = (ck, cv)
        g = h // kh
        # (B, T, K, G, d) -> (B, K, T*G, d): batch dims (B, K) lead, no cache transpose.
        q = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, d)
        q_pos = jnp.repeat(positions, g, axis=1)  # (B, T*G), query order (t, g)
        if cache is None:
            out = _attention(q, k, v, q_pos, positions)
        else:
            ck, cv = cache
            block = _attention_block(ck.shape[-2])
            if block is None or kv_len is not None:
                # Slots [0, n) only, sliced from the (stacked) buffer in one copy.
                n = ck.shape[-2] if kv_len is None else kv_len
                keys, values = (
                    _cache_block(ck, layer, 0, n),
                    _cache_block(cv, layer, 0, n),
                )
                key_pos = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n))
                out = _attention(q, keys, values, q_pos, key_pos)
            else:
                out = _blocked_attention(q, ck, cv, q_pos, block, layer)
        out = out.reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)
        return self.o_proj(out.astype(x.dtype)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward block ``down(silu(gate(x)) * up(x))``.

    ``gate`` and ``up`` are one fused linear map ``gate_up_proj`` (kernel
    ``(D, 2I)``: the columns of ``W_gate`` then ``W_up``), built once at load time.
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        dm, di = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = _linear(dm, 2 * di, cfg.mlp_bias, dtype, rngs)
        self.down_proj = _linear(di, dm, cfg.mlp_bias, dtype, rngs)
        self.intermediate_size = di

    def __call__(self, x: Array) -> Array:
        gu = self.gate_up_proj(x)
        di = self.intermediate_size
        return self.down_proj(jax.nn.silu(gu[..., :di]) * gu[..., di:])


class DecoderLayer(nnx.Module):
    """Pre-norm attention block followed by a pre-norm SwiGLU block."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype
        )
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype
        )
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, positions, cache, layer, kv_len):
        a, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, positions, cache, layer, kv_len
        )
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Backbone(nnx.Module):
    """Token embedding, stacked decoder layers and the final norm (HF ``model.*``)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_layers(r: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, dtype=dtype, rngs=r)

            self.layers = make_layers(rngs)
        else:
            self.layers = nnx.List(
                [
                    DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                    for _ in range(cfg.num_layers)
                ]
            )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype)

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: KVCache | None = None,
        *,
        kv_len: int | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Return the final hidden states ``(B, T, D)`` and the updated cache."""
        x = self.embed_tokens(tokens)
        inv_freq = rope_inverse_frequencies(self.config)  # static numpy constant
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # (B, T, 1, d)
        cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
        if not self.config.scan_layers:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = layer(x, cos, sin, positions, kv, None, kv_len)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            return self.norm(x), None if cache is None else KVCache(
                tuple(ks), tuple(vs)
            )

        layer_def, layer_params = nnx.split(self.layers)

        def body(carry, xs):
            h, kv = carry
            params, i = xs
            h, kv = nnx.merge(layer_def, params)(h, cos, sin, positions, kv, i, kv_len)
            return (h, kv), None

        idx = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        kv0 = None if cache is None else (cache.k, cache.v)
        (x, kv), _ = jax.lax.scan(body, (x, kv0), (layer_params, idx))
        cache = None if kv is None else KVCache(*kv)
        return self.norm(x), cache


def vocab_projection(h: Array, w: Array) -> Array:
    """Float32 ``h @ w.T`` for a ``(V, D)`` matrix ``w`` (the tied embedding).

    Computed as ``w @ h.T`` then transposed (``w`` row-major, as stored for the
    embedding lookup; a transposed copy would double the largest matrix).
    """
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    out = jnp.einsum(
        "vd,nd->vn", w, h2.astype(w.dtype), preferred_element_type=jnp.float32
    )
    return out.T.reshape(*lead, w.shape[0]).astype(jnp.float32)


class LMHead(nnx.Module):
    """Untied output projection with a ``(D, V)`` kernel.

    The checkpoint's ``(V, D)`` ``lm_head.weight`` is transposed at load time: for the
    few rows of a decode step, XLA's CPU dot computes ``h @ kernel`` with a row-major
    ``(D, V)`` kernel about 1.3-1.5x faster than ``h @ W.T`` or ``(W @ h.T).T`` with
    the ``(V, D)`` weight (Qwen2.5-0.5B head, 1 to 16 rows).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(
            init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype)
        )

    def __call__(self, h: Array) -> Array:
        """Float32 logits ``(..., V)`` of hidden states ``(..., D)``."""
        w = self.kernel[...]
        return jnp.einsum(
            "...d,dv->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32
        ).astype(jnp.float32)


class CausalLM(nnx.Module):
    """Decoder with an LM head (HF ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings else LMHead(cfg, dtype=dtype, rngs=rngs)
        )

    def head(self, h: Array) -> Array:
        """Float32 logits from final hidden states ``(..., D) -> (..., V)``."""
        if self.lm_head is None:
            return vocab_projection(h, self.model.embed_tokens.embedding[...])
        return self.lm_head(h)

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: KVCache | None = None,
        *,
        kv_len: int | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Logits ``(B, T, V)`` float32 and the updated cache."""
        h, cache = self.model(tokens, positions, cache, kv_len=kv_len)
        return self.head(h), cache


# ------------------------------------------------------------------ functional form


@jax.tree_util.register_pytree_node_class
class Transformer:
    """A split NNX module: static ``graphdef`` + parameter pytree ``params``.

    Parameters are pytree leaves and the graphdef and config are static, so instances
    pass through :func:`jax.jit`, :func:`jax.vmap` and :func:`jax.lax.scan` like any
    pytree (``params`` are traced, not baked into the program as constants).

    Attributes
    ----------
    graphdef : nnx.GraphDef
        Structure of the module (:class:`CausalLM` or a reward model).
    params : nnx.State
        Its parameters.
    config : ModelConfig
    """

    def __init__(self, graphdef: Any, params: Any, config: ModelConfig, **static: Any):
        self.graphdef = graphdef
        self.params = params
        self.config = config
        self._static = static
        for k, v in static.items():
            setattr(self, k, v)

    def module(self) -> nnx.Module:
        """Merge back into an NNX module (inside jit, this is free)."""
        return nnx.merge(self.graphdef, self.params)

    def __call__(
        self,
        tokens: ArrayLike,
        positions: ArrayLike,
        cache: KVCache | None = None,
        *,
        kv_len: int | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Run the module: ``(outputs, cache) = module(tokens, positions, cache)``."""
        return self.module()(
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            cache,
            kv_len=kv_len,
        )

    def hidden(
        self,
        tokens: ArrayLike,
        positions: ArrayLike,
        cache: KVCache | None = None,
        *,
        kv_len: int | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Final-norm hidden states ``(B, T, D)`` of the backbone and the cache."""
        return self.module().model(
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            cache,
            kv_len=kv_len,
        )

    def head(self, h: Array) -> Array:
        """Apply the module's output head to hidden states."""
        return self.module().head(h)

    @property
    def dtype(self) -> Any:
        """Dtype of the parameters (of the embedding matrix)."""
        return self.params["model"]["embed_tokens"]["embedding"][...].dtype

    def tree_flatten(self):  # noqa: D102
        aux = (self.graphdef, self.config, tuple(sorted(self._static.items())))
        return (self.params,), aux

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: D102
        obj = object.__new__(cls)
        obj.graphdef, obj.config, static = aux
        (obj.params,) = children
        obj._static = dict(static)
        for k, v in obj._static.items():
            setattr(obj, k, v)
        return obj

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return f"{type(self).__name__}({self.config.model_type}, {n / 1e6:.1f}M params)"


def forward(
    transformer: Transformer,
    tokens: ArrayLike,
    positions: ArrayLike,
    cache: KVCache | None = None,
    *,
    kv_len: int | None = None,
) -> tuple[Array, KVCache | None]:
    """``(logits, cache) = forward(transformer, tokens, positions, cache)``.

    Parameters
    ----------
    transformer : Transformer
        Split model (a :class:`~smcjax.llm.LanguageModel` is one).
    tokens, positions : ArrayLike
        ``(B, T)`` int32 token ids and their absolute positions.
    cache : KVCache, optional
        Keys/values, batch axis first. Without a cache, attention is causal
        over the ``T`` given tokens (by position). With a cache, the new keys/values are
        written at ``positions`` and each query attends to slots ``j <= position``.
    kv_len : int, optional
        Static bound on the attended cache slots (``S`` by default); a prefill whose
        positions are all ``< T`` uses ``kv_len=T``.

    Returns
    -------
    logits : Array
        ``(B, T, V)`` float32.
    cache : KVCache or None
    """
    return transformer(tokens, positions, cache, kv_len=kv_len)


def init_transformer(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    module: Callable[..., nnx.Module] = CausalLM,
    cls: type[Transformer] = Transformer,
    **static: Any,
) -> Transformer:
    """Randomly initialised model (for tests and benchmarks), already split."""
    m = module(config, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(m)
    return cls(graphdef, params, config, **static)
