"""Particle counts that are not multiples of 16: smcjax with and without padding rows.

XLA's CPU fusion kernels (jax 0.10.2) are 3-10x slower, when multi-threaded, on
arrays whose length is not a multiple of 16. ``smcjax.smc`` therefore runs such a
particle count with up to 15 padding rows of weight zero (``smcjax.core._padded``).
This script times the bootstrap filter of ``bench_pf.py`` (1-D linear Gaussian,
T = 200, resampling every step, jitted for its log-evidence) at N = 1000, 1001, 1024
and 1e5, 1e5 + 1, 1e5 + 16, with padding (the default) and without (the engine's
threshold raised), and ``particles`` 0.4 at the same N, all in one process.

Usage: ``python benchmarks/bench_odd_n.py [--reps 5]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import smcjax
from smcjax import core

try:  # run as a script from the repository root or from benchmarks/
    from benchmarks.bench_pf import MODEL, simulate, time_particles
except ImportError:  # pragma: no cover
    from bench_pf import MODEL, simulate, time_particles


def _time_smcjax(ys, n: int, reps: int, pad: bool) -> float:
    """Best-of-``reps`` milliseconds of one jitted filter run (compile excluded)."""
    keep = core._PAD_FROM
    if not pad:
        core._PAD_FROM = 10**12
    try:
        fn = jax.jit(
            lambda k: (
                smcjax.particle_filter(k, MODEL, ys, n, ess_threshold=1.0).log_evidence
            )
        )
        fn(jax.random.key(0)).block_until_ready()
    finally:
        core._PAD_FROM = keep
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(jax.random.key(i + 1)).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default="1000,1001,1024,100000,100001,100016")
    args = ap.parse_args()
    ys = jnp.asarray(simulate())
    print(
        f"# Odd particle counts: bootstrap PF, T = {ys.shape[0]}, resampling every "
        f"step\n\njax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; load average "
        f"{os.getloadavg()[0]:.1f}; best of {args.reps} runs (ms; particles: best of "
        f"{max(2, args.reps // 2)})\n"
    )
    print(
        "| N | rows run | smcjax, padding rows (default) | smcjax, no padding "
        "| no padding / padding | particles 0.4 | particles / smcjax |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        padded = _time_smcjax(ys, n, args.reps, pad=True)
        plain = _time_smcjax(ys, n, args.reps, pad=False)
        try:
            pt = 1e3 * time_particles(np.asarray(ys), n, max(2, args.reps // 2))[0]
        except ImportError:  # pragma: no cover
            pt = None
        print(
            f"| {n} | {core._padded(n)} | {padded:.1f} | {plain:.1f} | "
            f"{plain / padded:.2f}× | "
            f"{'—' if pt is None else f'{pt:.1f}'} | "
            f"{'—' if pt is None else f'{pt / padded:.2f}×'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
