"""Decode throughput: smcjax (JAX, KV cache, while_loop) vs HF transformers generate.

Both run the SAME weights in float32 on CPU: the embedded Qwen2.5-Coder-0.5B-Instruct
(smcjax loads it with ``smcjax.llm.load("qwen2.5-coder-0.5b-instruct")``, transformers
gets the same dequantised GGUF tensors from :func:`smcjax.llm.gguf.read_gguf`) or, with
``--model random`` (or when the embedded model is not installed), a random model with
its exact configuration. Greedy decoding (or sampling at ``--temperature``) of
``--new-tokens`` tokens (no EOS stop) for 1 / 8 / 16 sequences of a
``--prompt-len``-token prompt.

Reported per batch size: decode tokens/s (new tokens / decode wall time, prefill
excluded for smcjax; HF's ``generate`` time includes its prefill), prefill tokens/s,
first-call compile time and the process peak RSS after the smcjax runs.

Usage::

    python benchmarks/bench_decode.py            # full run
    python benchmarks/bench_decode.py --quick    # 1 and 4 sequences, 32 new tokens
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import smcjax.llm as llm
from smcjax.llm import decoding
from smcjax.llm.language_model import LanguageModel
from smcjax.llm.loading import params_from_state_dict

QWEN25_05B = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    eos_token_id=151645,
)


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named random float32 tensors for a Qwen2 config (std 0.02, norms 1)."""
    rng = np.random.default_rng(seed)
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    sd = {
        "model.embed_tokens.weight": w(v, d),
        "model.norm.weight": np.ones(d, np.float32),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd.update(
            {
                p + "input_layernorm.weight": np.ones(d, np.float32),
                p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                p + "self_attn.q_proj.weight": w(d, d),
                p + "self_attn.q_proj.bias": w(d),
                p + "self_attn.k_proj.weight": w(kv, d),
                p + "self_attn.k_proj.bias": w(kv),
                p + "self_attn.v_proj.weight": w(kv, d),
                p + "self_attn.v_proj.bias": w(kv),
                p + "self_attn.o_proj.weight": w(d, d),
                p + "mlp.gate_proj.weight": w(i, d),
                p + "mlp.up_proj.weight": w(i, d),
                p + "mlp.down_proj.weight": w(d, i),
            }
        )
    return sd


def get_weights(which: str) -> tuple[dict, dict, str]:
    """``(hf_config, tensors, description)``."""
    if which == "embedded":
        try:
            from smcjax.llm.gguf import read_gguf
            from smcjax.llm.hub import resolve

            ckpt = read_gguf(resolve("qwen2.5-coder-0.5b-instruct"))
            return dict(ckpt.config), ckpt.tensors, "embedded Qwen2.5-Coder-0.5B (GGUF)"
        except Exception as e:
            print(
                f"(embedded model unavailable: {type(e).__name__}: {e}; using random)"
            )
    return dict(QWEN25_05B), random_state_dict(QWEN25_05B), "random Qwen2.5-0.5B config"


def bench_smcjax(lm, batches, prompt_len, new_tokens, rng, temperature=0.0):
    @jax.jit
    def prefill(model, tokens):
        return decoding.prefill(model, tokens, None, prompt_len + new_tokens)

    @jax.jit
    def run(model, key, state):
        return decoding.decode(
            model,
            key,
            state,
            max_new_tokens=new_tokens,
            temperature=temperature,
            eos_ids=(),
        )

    rows = {}
    for b in batches:
        tokens = jnp.asarray(rng.integers(100, 20000, (b, prompt_len)), jnp.int32)
        t0 = time.perf_counter()
        state = jax.block_until_ready(prefill(lm, tokens))
        out = jax.block_until_ready(run(lm, jax.random.key(0), state))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = jax.block_until_ready(prefill(lm, tokens))
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(lm, jax.random.key(1), state))
        t_dec = time.perf_counter() - t0
        assert int(out[1].num_new_tokens.min()) == new_tokens
        rows[b] = dict(
            decode=b * new_tokens / t_dec,
            prefill=b * prompt_len / t_pre,
            compile=first - t_pre - t_dec,
            tokens=np.asarray(out[0].tokens[:, prompt_len:]),
        )
        print(
            f"smcjax B={b}: {rows[b]['decode']:.1f} tok/s, "
            f"compile {rows[b]['compile']:.1f}s"
        )
    return rows


def bench_hf(hf_config, tensors, batches, prompt_len, new_tokens, rng, temperature=0.0):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = transformers.Qwen2Config(
        **{k: v for k, v in hf_config.items() if k != "architectures"}
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    sd = {
        k: torch.from_numpy(np.ascontiguousarray(np.asarray(v, np.float32)))
        for k, v in tensors.items()
    }
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=False, assign=True)  # share, no copy
    model.tie_weights()
    model.eval()
    rows = {}
    for b in batches:
        ids = torch.as_tensor(
            rng.integers(100, 20000, (b, prompt_len)), dtype=torch.long
        )
        kw = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=temperature > 0,
            pad_token_id=0,
        )
        if temperature > 0:  # plain temperature sampling, as smcjax does
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        with torch.no_grad():
            model.generate(
                ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0
            )
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            t = time.perf_counter() - t0
        rows[b] = dict(decode=b * new_tokens / t, tokens=out[:, prompt_len:].numpy())
        print(f"HF     B={b}: {rows[b]['decode']:.1f} tok/s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=["embedded", "random"], default="embedded")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--scan-layers", action="store_true", help="stacked layers + lax.scan"
    )
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default)"
    )
    args = ap.parse_args()
    batches = args.batches or ([1, 4] if args.quick else [1, 8, 16])
    new_tokens = args.new_tokens or (32 if args.quick else 128)

    t0 = time.perf_counter()
    lm = None
    if args.model == "embedded":
        try:
            lm = llm.load("qwen2.5-coder-0.5b-instruct", scan_layers=args.scan_layers)
            desc = "embedded Qwen2.5-Coder-0.5B (GGUF)"
        except Exception as e:
            print(f"(embedded model unavailable: {type(e).__name__}: {e})")
    if lm is None:
        hf_config, tensors, desc = get_weights("random")
        graphdef, params, cfg = params_from_state_dict(
            hf_config, tensors, dtype=jnp.float32, scan_layers=args.scan_layers
        )
        lm = LanguageModel(graphdef, params, cfg)
        del params
    print(f"{desc}: loaded in {time.perf_counter() - t0:.1f}s; {lm}")
    ours = bench_smcjax(
        lm,
        batches,
        args.prompt_len,
        new_tokens,
        np.random.default_rng(0),
        args.temperature,
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    del lm  # free the JAX weights before building the torch model
    jax.clear_caches()
    theirs = {}
    if not args.no_hf:
        if desc.startswith("embedded"):
            hf_config, tensors, _ = get_weights("embedded")
        theirs = bench_hf(
            hf_config,
            tensors,
            batches,
            args.prompt_len,
            new_tokens,
            np.random.default_rng(0),
            args.temperature,
        )

    load = os.getloadavg()
    layout = "scan" if args.scan_layers else "unrolled"
    greedy = args.temperature <= 0
    mode = "greedy" if greedy else f"temperature {args.temperature:g}"
    print(
        f"\n### Decode, {desc}, float32 CPU, layers {layout}, "
        f"prompt {args.prompt_len}, "
        f"{new_tokens} new tokens ({mode}); load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
    )
    print(
        "| seqs | smcjax tok/s | HF generate tok/s | ratio | greedy tokens equal "
        "| smcjax prefill tok/s | first-call compile s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        o = ours[b]
        h = theirs.get(b)
        ratio = f"{o['decode'] / h['decode']:.2f}x" if h else "-"
        same = f"{np.mean(o['tokens'] == h['tokens']):.0%}" if h and greedy else "-"
        hf_rate = f"{h['decode']:.1f}" if h else "-"
        print(
            f"| {b} | {o['decode']:.1f} | {hf_rate} | {ratio} | {same} "
            f"| {o['prefill']:.0f} | {o['compile']:.1f} |"
        )
    print(f"\nPeak RSS after the smcjax runs (weights + caches + XLA): {rss:.2f} GiB")


if __name__ == "__main__":
    main()
