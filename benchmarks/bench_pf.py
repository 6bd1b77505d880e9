"""Bootstrap particle filter: smcjax vs `particles` 0.4 in the same process.

Model: 1-D linear Gaussian, X_0 ~ N(0, σx²/(1-ρ²)), X_t = ρ X_{t-1} + σx U_t,
Y_t = X_t + σy V_t with ρ = 0.9, σx = 1, σy = 0.5; T = 200 observations simulated
once; systematic resampling at EVERY step (smcjax ``ess_threshold=1.0``, particles
``ESSrmin=1.0``).

Rows:
  * ``smcjax.particle_filter`` (the public API; NumPyro distributions; noise drawn
    in one batched call per step) with the default Threefry key, jitted for its
    ``log_evidence`` (the headline ratio);
  * the same with ``jax.random.key(seed, impl="rbg")``;
  * the same jitted for the whole ``SMCResult`` ((T, N) ancestors, ESS, means);
  * ``smcjax.smc`` on a one-particle FeynmanKac model written with raw ``jax.random``
    (one key per particle, split+vmap: the generic engine path);
  * ``particles.SMC`` with ``Bootstrap(LinearGauss)``;
  * two diagnostic rows (not filters) splitting smcjax's time: the same engine with
    the identity in place of the resampler ("engine w/o resampling"), and T calls of
    ``smcjax.resampling.systematic`` alone.

Throughput is particle-steps per second (N·T / wall time of one run, best of
``--reps``); compile time (lower + compile) is reported separately. Each log-evidence
is printed next to the exact Kalman value as a sanity check.

Usage: ``python benchmarks/bench_pf.py [--quick] [--out benchmarks/results_pf.md]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import smcjax
from smcjax import kalman

RHO, SX, SY, T = 0.9, 1.0, 0.5, 200
SIG0 = SX / np.sqrt(1 - RHO**2)


def simulate(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty(T)
    x[0] = SIG0 * rng.normal()
    for t in range(1, T):
        x[t] = RHO * x[t - 1] + SX * rng.normal()
    return x + SY * rng.normal(size=T)


MODEL = smcjax.StateSpaceModel(
    initial=lambda: dist.Normal(0.0, SIG0),
    transition=lambda t, x: dist.Normal(RHO * x, SX),
    emission=lambda t, x: dist.Normal(x, SY),
)


def one_particle_fk(ys):
    """The same bootstrap filter as a generic one-particle Feynman–Kac model."""
    return smcjax.FeynmanKac(
        init=lambda key: SIG0 * jax.random.normal(key),
        propagate=lambda key, t, x: RHO * x + SX * jax.random.normal(key),
        log_potential=lambda t, xp, x: (
            -0.5 * ((ys[t] - x) / SY) ** 2 - jnp.log(SY * jnp.sqrt(2 * jnp.pi))
        ),
    )


def identity(key, log_weights, num_samples=None):
    """Not a resampler: keeps every particle (used only to time the engine)."""
    return jnp.arange(log_weights.shape[0], dtype=jnp.int32)


def time_jax(fn, key, reps):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(key).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(key))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(key))
        times.append(time.perf_counter() - t0)
    log_z = out.log_evidence if isinstance(out, smcjax.SMCResult) else out
    return min(times), compile_s, float(log_z)


def time_particles(y, n, reps):
    import particles
    from particles import kalman as pkalman
    from particles import state_space_models as pssm

    ssm = pkalman.LinearGauss(rho=RHO, sigmaX=SX, sigmaY=SY)
    times, log_z = [], np.nan
    for _ in range(reps):
        pf = particles.SMC(
            fk=pssm.Bootstrap(ssm=ssm, data=y),
            N=n,
            resampling="systematic",
            ESSrmin=1.0,
        )
        t0 = time.perf_counter()
        pf.run()
        times.append(time.perf_counter() - t0)
        log_z = pf.logLt
    return min(times), log_z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N up to 1e5, two repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args()
    sizes = (
        [1_000, 10_000, 100_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    )
    reps = args.reps or (2 if args.quick else 3)

    y = simulate()
    ys = jnp.asarray(y, jnp.float32)
    exact = float(
        kalman.log_likelihood(
            kalman.LinearGaussianSSM(
                jnp.zeros(1),
                jnp.full((1, 1), SIG0**2),
                jnp.full((1, 1), RHO),
                jnp.full((1, 1), SX**2),
                jnp.ones((1, 1)),
                jnp.full((1, 1), SY**2),
            ),
            ys,
        )
    )
    fk = one_particle_fk(ys)

    rows = []
    for n in sizes:

        def pf(key, n=n):
            return smcjax.particle_filter(
                key, MODEL, ys, n, ess_threshold=1.0
            ).log_evidence

        def pf_full(key, n=n):
            return smcjax.particle_filter(key, MODEL, ys, n, ess_threshold=1.0)

        def generic(key, n=n):
            return smcjax.smc(key, fk, n, T, ess_threshold=1.0).log_evidence

        def no_resampling(key, n=n):
            fk_pf = smcjax.ssm.bootstrap(MODEL, ys)
            return smcjax.smc(key, fk_pf, n, T, ess_threshold=1.0, resampling=identity)

        def resampling_only(key, n=n):
            lw = jax.random.normal(key, (n,))

            def body(c, k):
                # the carry makes every call depend on the previous one
                return c + smcjax.resampling.systematic(k, lw + 1e-9 * c[0]), None

            init = jnp.zeros(n, jnp.int32)
            out = jax.lax.scan(body, init, jax.random.split(key, T))[0]
            return out[0].astype(jnp.float32)

        variants = [
            ("smcjax.particle_filter (threefry)", pf, jax.random.key(0)),
            ("smcjax.particle_filter (rbg key)", pf, jax.random.key(0, impl="rbg")),
            ("smcjax.particle_filter, whole SMCResult", pf_full, jax.random.key(0)),
            (
                "smcjax.smc one-particle FK (per-particle keys)",
                generic,
                jax.random.key(0),
            ),
            ("diagnostic: engine w/o resampling", no_resampling, jax.random.key(0)),
            (
                "diagnostic: systematic resampling only",
                resampling_only,
                jax.random.key(0),
            ),
        ]
        res = {}
        for name, fn, key in variants:
            if "rbg" in name and n > 100_000:
                continue  # RngBitGenerator is slow on CPU; documented at 1e5
            run_s, comp_s, log_z = time_jax(fn, key, reps)
            res[name] = (run_s, comp_s, log_z)
            print(
                f"N={n:>8} {name:48s} {run_s * 1e3:9.1f} ms  compile {comp_s:5.2f} s"
                f"  {n * T / run_s / 1e6:7.1f} M/s  logZ {log_z:.2f}",
                flush=True,
            )
        p_run, p_logz = time_particles(y, n, 1 if n >= 1_000_000 else reps)
        res["particles 0.4"] = (p_run, float("nan"), p_logz)
        print(
            f"N={n:>8} {'particles 0.4':48s} {p_run * 1e3:9.1f} ms"
            f"  {n * T / p_run / 1e6:7.1f} M/s  logZ {p_logz:.2f}",
            flush=True,
        )
        rows.append((n, res))

    load = os.getloadavg()
    lines = [
        f"Bootstrap PF, 1-D linear Gaussian (ρ=0.9, σx=1, σy=0.5), T={T}, systematic "
        "resampling every step. Throughput = particle-steps / s (N·T / best wall time "
        f"of {reps} run(s) after warm-up); compile time separate. Exact log Z (Kalman) "
        f"= {exact:.3f}.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}; load average during the run {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f}.",
        "",
        "| N | implementation | run (ms) | M particle-steps/s | compile (s) | log Ẑ "
        "| × particles |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, res in rows:
        p_run = res["particles 0.4"][0]
        for name, (run_s, comp_s, log_z) in res.items():
            comp = "–" if np.isnan(comp_s) else f"{comp_s:.2f}"
            lz = "–" if name.startswith("diagnostic") else f"{log_z:.2f}"
            lines.append(
                f"| {n:.0e} | {name} | {run_s * 1e3:.1f} | {n * T / run_s / 1e6:.1f} | "
                f"{comp} | {lz} | {p_run / run_s:.2f} |"
            )
    n_ref = 100_000 if any(n == 100_000 for n, _ in rows) else rows[-1][0]
    res = dict(rows)[n_ref]
    ratio = res["particles 0.4"][0] / res["smcjax.particle_filter (threefry)"][0]
    lines += [
        "",
        f"**Ratio at N={n_ref:.0e}: smcjax.particle_filter is {ratio:.2f}× "
        "particles 0.4** (goal ≥ 3×).",
    ]
    md = "\n".join(lines)
    print()
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
