"""Parallel tempering round trips per second: DEO (non-reversible) vs SEO (reversible).

Target: prior N(0, 3^2), likelihood 0.25 N(-4, 0.2^2) + 0.75 N(4, 0.2^2) (posterior
mode weights 0.25 / 0.75). Each configuration runs `seeds` independent replicas
(vmapped) with the same budget: `adapt` scans of schedule / step-size adaptation,
then `steps` sampling scans, RWM local moves (1 per scan). Reported: round trips
per scan and per second of the sampling phase (compilation excluded), the
estimated barrier Λ, DEO's theoretical rate 1/(2 + 2 Σ r/(1−r)) and the β=1 mode
fraction.

    python benchmarks/bench_pt.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from smcjax.pt import parallel_tempering


def log_prior(x):
    return norm.logpdf(x, 0.0, 3.0)


def log_likelihood(x):
    return jnp.logaddexp(
        jnp.log(0.25) + norm.logpdf(x, -4.0, 0.2),
        jnp.log(0.75) + norm.logpdf(x, 4.0, 0.2),
    )


def run(swap, chains, steps, adapt, seeds):
    f = jax.jit(
        jax.vmap(
            lambda k: parallel_tempering(
                k,
                log_prior,
                log_likelihood,
                jnp.zeros((chains,)),
                steps,
                swap=swap,
                num_adapt_steps=adapt,
            )
        )
    )
    keys = jax.random.split(jax.random.key(0), seeds)
    f(keys).samples.block_until_ready()  # compile + warm
    t0 = time.perf_counter()
    out = f(jax.random.split(jax.random.key(1), seeds))
    out.samples.block_until_ready()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, adapt, seeds = (1000, 500, 2) if args.quick else (5000, 2000, 4)
    chain_counts = (12, 24) if args.quick else (12, 24, 48)
    rows = []
    for chains in chain_counts:
        for swap in ("deo", "seo"):
            out, secs = run(swap, chains, steps, adapt, seeds)
            rt = np.asarray(out.round_trips, float)
            r = 1.0 - np.asarray(out.swap_rate)
            tau = 1.0 / (2.0 + 2.0 * np.sum(r / np.maximum(1.0 - r, 1e-9), axis=1))
            frac = float(np.mean(np.asarray(out.samples) > 0))
            rows.append(
                (
                    chains,
                    swap,
                    rt.mean(),
                    rt.std(ddof=1) / np.sqrt(seeds),
                    rt.mean() / steps,
                    rt.sum() / secs,
                    float(np.mean(np.asarray(out.global_barrier))),
                    float(np.mean(tau)),
                    frac,
                    secs,
                )
            )
    load = os.getloadavg()[0]
    print(
        f"\nParallel tempering on the bimodal target: {seeds} replicas × ({adapt} "
        f"adaptation + {steps} sampling scans), RWM; load average {load:.1f} on "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| chains | swaps | round trips / replica (± se) | per scan | per second "
        "(all replicas) | Λ̂ | DEO theory per scan | β=1 fraction x>0 | run (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for ch, sw, m, se, per_scan, per_s, lam, tau, frac, secs in rows:
        print(
            f"| {ch} | {sw.upper()} | {m:.0f} ± {se:.0f} | {per_scan:.4f} | "
            f"{per_s:.0f} | {lam:.2f} | {tau:.4f} | {frac:.3f} | {secs:.2f} |"
        )
    print()
    for i in range(0, len(rows), 2):
        deo, seo = rows[i], rows[i + 1]
        print(
            f"{deo[0]} chains: DEO/SEO round trips per scan "
            f"{deo[4] / max(seo[4], 1e-12):.1f}×, per second "
            f"{deo[5] / max(seo[5], 1e-12):.1f}×"
        )


if __name__ == "__main__":
    main()
