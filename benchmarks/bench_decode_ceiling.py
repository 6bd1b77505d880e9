r"""How fast can ANY float32 decoder step be on this CPU? The matmul ceiling.

One decode step of Qwen2.5-0.5B (24 layers, D = 896, I = 4864, 14 query / 2 KV heads
of 64, V = 151936, untied head) for ``M`` rows multiplies an ``(M, D)`` activation by
every weight matrix once: per layer the fused qkv ``(D, 1152)``, ``o`` ``(D, D)``, the
fused gate/up ``(D, 2I)`` and down ``(I, D)``, then the head ``(D, V)``:
:math:`2 M \cdot 494\,\mathrm{M}` flops. This script times exactly these matmuls
(random float32 weights, 24 distinct layers so nothing stays in cache) as one jitted
program, and reports

* the time of the matmuls alone per step and the implied ceiling ``M / time``
  tokens/s (attention, norms, sampling and the loop add to it: see
  ``bench_decode.py`` for the measured whole step);
* the same program compiled by XLA with each CPU dot backend it ships (YNNPACK, the
  default; Eigen; oneDNN; XNNPACK), each in a fresh process with its ``XLA_FLAGS``;
* torch's CPU matmul (what HF transformers runs) on the same shapes, in the same run.

Usage::

    python benchmarks/bench_decode_ceiling.py            # M = 1, 8, 16
    python benchmarks/bench_decode_ceiling.py --quick    # M = 16 only, 2 backends
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

D, INTER, V, LAYERS, QKV = 896, 4864, 151936, 24, 1152
SHAPES = [(D, QKV), (D, D), (D, 2 * INTER), (INTER, D)]
FLOPS_PER_ROW = 2 * (LAYERS * sum(a * b for a, b in SHAPES) + D * V)

BACKENDS = {
    "YNNPACK (XLA default)": "",
    "Eigen": "--xla_cpu_experimental_ynn_fusion_type=",
    "oneDNN": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "XNNPACK": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def _weights(rng: np.random.Generator) -> tuple[list[list[np.ndarray]], np.ndarray]:
    layers = [
        [rng.standard_normal((a, b), dtype=np.float32) * 0.02 for a, b in SHAPES]
        for _ in range(LAYERS)
    ]
    return layers, rng.standard_normal((D, V), dtype=np.float32) * 0.02


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def jax_child(rows: list[int], repeats: int) -> dict[int, float]:
    """Median ms of the step's matmuls, compiled with the current ``XLA_FLAGS``."""
    import jax
    import jax.numpy as jnp

    layers, head = _weights(np.random.default_rng(0))
    ws = [[jnp.asarray(w) for w in lw] for lw in layers]
    head = jnp.asarray(head)

    @jax.jit
    def step(x, ws, wh):
        h = x
        for qkv, o, gu, dn in ws:  # unrolled, as smcjax runs layers on CPU
            a = (h @ qkv)[:, :D] @ o  # the attention's two projections
            g = (h + a) @ gu
            h = h + a + (g[:, :INTER] * g[:, INTER:]) @ dn
        return h @ wh

    out = {}
    for m in rows:
        x = jnp.asarray(np.random.default_rng(1).standard_normal((m, D), np.float32))

        def run(x=x):
            return jax.block_until_ready(step(x, ws, head))

        out[m] = _median_ms(run, repeats)
    return out


def torch_ms(rows: list[int], repeats: int) -> dict[int, float]:
    """Median ms of the same matmuls with torch (HF transformers' CPU kernels)."""
    import torch

    layers, head = _weights(np.random.default_rng(0))
    tl = [[torch.from_numpy(w) for w in lw] for lw in layers]
    th = torch.from_numpy(head)
    out = {}
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, D)

            def run(x=x):
                h = x
                for qkv, o, gu, dn in tl:
                    a = (h @ qkv)[:, :D] @ o
                    g = (h + a) @ gu
                    h = h + a + (g[:, :INTER] * g[:, INTER:]) @ dn
                return h @ th

            out[m] = _median_ms(run, repeats)
    return out


def profile_real(rows: list[int], new_tokens: int = 32) -> dict[int, tuple]:
    """Profile smcjax's real decode loop on the embedded model (if installed).

    Returns, per row count, ``(step ms, matmul ms, non-matmul ms)`` from an XLA
    profiler trace: the YNNPACK fusions are the weight matmuls (and the two tiny
    attention products); everything else is attention softmax, norms, RoPE, cache
    writes, sampling and the loop.
    """
    import glob
    import gzip
    import tempfile

    import jax
    import jax.numpy as jnp

    import smcjax.llm as llm
    from smcjax.llm import decoding

    try:
        lm = llm.load("qwen2.5-coder-0.5b-instruct")
    except Exception as e:  # the demo extra is not installed
        print(
            f"embedded model unavailable ({e}); skipping the profile", file=sys.stderr
        )
        return {}
    out = {}
    for m in rows:
        toks = np.random.default_rng(0).integers(100, 5000, (m, 32)).astype(np.int32)
        st = jax.jit(lambda lm, t: decoding.prefill(lm, t, None, 32 + 128))(
            lm, jnp.asarray(toks)
        )

        def dec(lm, s, k):
            s, _ = decoding.decode(lm, k, s, max_new_tokens=new_tokens, temperature=1.0)
            return s.tokens

        dec = jax.jit(dec)
        jax.block_until_ready(dec(lm, st, jax.random.key(0)))
        t0 = time.perf_counter()
        jax.block_until_ready(dec(lm, st, jax.random.key(0)))
        step = (time.perf_counter() - t0) / new_tokens * 1e3
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                jax.block_until_ready(dec(lm, st, jax.random.key(0)))
            path = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]
            events = json.load(gzip.open(path))
        events = events["traceEvents"] if isinstance(events, dict) else events
        ops = [e for e in events if e.get("ph") == "X" and "fusion" in e["name"]]
        ops += [e for e in events if e.get("ph") == "X" and e["name"] in ("copy",)]
        dots = sum(e["dur"] for e in ops if e["name"].startswith("ynn_fusion"))
        rest = sum(e["dur"] for e in ops if not e["name"].startswith("ynn_fusion"))
        out[m] = (step, dots / 1e3 / new_tokens, rest / 1e3 / new_tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    rows = [16] if a.quick else [1, 8, 16]
    if a.child:
        print(json.dumps(jax_child(json.loads(a.child), a.repeats)))
        return
    backends = dict(list(BACKENDS.items())[:2]) if a.quick else BACKENDS
    results: dict[str, dict[int, float]] = {}
    for name, flags in backends.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, __file__, "--child", json.dumps(rows)]
        cmd += ["--repeats", str(a.repeats)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        line = res.stdout.strip().splitlines()[-1]
        results[name] = {int(k): v for k, v in json.loads(line).items()}
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    results["torch (HF's kernels)"] = torch_ms(rows, a.repeats)
    real = profile_real([m for m in rows if m >= 8])  # M = 1 dots are not YNN
    print(
        f"\nmatmuls of one Qwen2.5-0.5B decode step, float32, "
        f"{FLOPS_PER_ROW / 1e9:.3f} GFLOP per row\n"
    )
    print("| kernels | rows | ms / step | GFLOP/s | ceiling tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name, res in results.items():
        for m in rows:
            ms = res[m]
            gf = FLOPS_PER_ROW * m / ms / 1e6
            print(f"| {name} | {m} | {ms:.1f} | {gf:.0f} | {m / ms * 1e3:.1f} |")
    if real:
        print("\nsmcjax decode loop on the embedded model (XLA profiler, 32 tokens)\n")
        print("| rows | step ms | matmul ms | other ms | matmul share | tok/s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for m, (step, dots, rest) in real.items():
            print(
                f"| {m} | {step:.1f} | {dots:.1f} | {rest:.1f} | "
                f"{dots / (dots + rest):.0%} | {m / step * 1e3:.1f} |"
            )


if __name__ == "__main__":
    main()
