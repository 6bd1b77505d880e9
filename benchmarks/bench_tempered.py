"""Adaptive tempered SMC: smcjax vs BlackJAX 1.7.1 ``adaptive_tempered_smc``.

Same target, same N, same move (random-walk Metropolis with a Gaussian proposal),
same number of MCMC steps per tempering step, same target ESS (0.5), systematic
resampling, float32, CPU. Both samplers are jitted end to end (the BlackJAX step
driven by our own ``lax.while_loop`` until λ = 1); compile time is measured apart.

Targets
-------
* ``mixture``: a d-dimensional (default d = 10) two-component Gaussian mixture
  likelihood (weights 0.3/0.7, modes ~9.5 apart, sd 0.6) under a N(0, 3² I) prior,
  with closed-form evidence Z = Σ_j c_j N(m_j; 0, (9 + s_j²) I).
* ``logreg``: Bayesian logistic regression, d = 10 coefficients, n = 200 points,
  N(0, 1) prior; reference log Z = mean of 8 smcjax runs with N = 20 000 (HMC).

BlackJAX variants
-----------------
* ``blackjax (tuned)``: ``inner_kernel_tuning`` with the SAME proposal as smcjax,
  L = 2.38/√d · chol(Σ̂) recomputed from the particles at every step.
* ``blackjax (fixed)``: plain ``adaptive_tempered_smc`` with a fixed isotropic
  proposal (σ = 0.1 · prior sd · 2.38/√d), what a user gets without tuning.

Run: ``python benchmarks/bench_tempered.py`` (``--quick`` for a small version).
Prints a markdown table: wall time per run (median and minimum of round-robin
repeats, after compilation), compile time, RMSE and bias of log Ẑ over independent
replicates, mean number of tempering steps, and the BlackJAX/smcjax time ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import smcjax
from smcjax.tempered import tempered_smc


def mixture_target(d: int):
    # equal widths and |m_1| = |m_2|: the modes keep their relative mass along the
    # tempering path, so the log-Z error measures the sampler, not mode starvation
    prior_sd, comp_sd = 3.0, np.array([0.6, 0.6])
    means = np.stack([np.full(d, -1.5), np.full(d, 1.5)])
    means[1, :2] = [0.0, np.sqrt(4.5)]  # break the mirror symmetry, same norm
    c = np.array([0.3, 0.7])

    def log_prior(x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(x, 0.0, prior_sd))

    m_j = jnp.asarray(means, jnp.float32)
    s_j = jnp.asarray(comp_sd, jnp.float32)

    def log_lik(x):
        comp = jnp.sum(jax.scipy.stats.norm.logpdf(x, m_j, s_j[:, None]), axis=-1)
        return jax.scipy.special.logsumexp(comp + jnp.log(jnp.asarray(c)))

    log_z = np.log(
        sum(
            c[j]
            * np.exp(
                stats.multivariate_normal(
                    np.zeros(d), (prior_sd**2 + comp_sd[j] ** 2) * np.eye(d)
                ).logpdf(means[j])
            )
            for j in range(2)
        )
    )

    def sample_prior(key, n):
        return prior_sd * jax.random.normal(key, (n, d))

    return log_prior, log_lik, sample_prior, float(log_z), prior_sd


def logreg_target(d: int, quick: bool):
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)

    def log_prior(b):
        return jnp.sum(jax.scipy.stats.norm.logpdf(b))

    def log_lik(b):
        z = xj @ b
        return jnp.sum(yj * z - jnp.logaddexp(0.0, z))

    def sample_prior(key, n_):
        return jax.random.normal(key, (n_, d))

    n_ref, r_ref = (5000, 4) if quick else (20000, 8)
    ref = jax.jit(
        jax.vmap(
            lambda k: (
                tempered_smc(
                    k,
                    log_prior,
                    log_lik,
                    sample_prior(jax.random.fold_in(k, 1), n_ref),
                    kernel="hmc",
                    num_mcmc_steps=5,
                    target_ess=0.7,
                ).log_evidence
            )
        )
    )(jax.random.split(jax.random.key(999), r_ref))
    ref = np.asarray(ref, np.float64)
    return log_prior, log_lik, sample_prior, float(ref.mean()), 1.0, ref


def build_smcjax(log_prior, log_lik, sample_prior, n, steps):
    def run(key):
        k0, k1 = jax.random.split(key)
        res = tempered_smc(
            k1,
            log_prior,
            log_lik,
            sample_prior(k0, n),
            kernel="rwm",
            num_mcmc_steps=steps,
            target_ess=0.5,
        )
        return res.log_evidence, res.num_steps

    return run


def build_blackjax(log_prior, log_lik, sample_prior, n, steps, d, tuned, prior_sd):
    import blackjax
    from blackjax.smc import resampling
    from blackjax.smc.inner_kernel_tuning import as_top_level_api as ikt

    rw = blackjax.additive_step_random_walk.build_kernel()

    def step_fn(key, state, logdensity_fn, sigma):
        return rw(key, state, logdensity_fn, blackjax.mcmc.random_walk.normal(sigma))

    init_fn = blackjax.additive_step_random_walk.init
    scale = 2.38 / np.sqrt(d)

    def tuned_sigma(particles):
        cov = jnp.cov(particles, rowvar=False) + 1e-6 * jnp.eye(d)
        return scale * jnp.linalg.cholesky(cov)

    if tuned:

        def update(key, state, info):
            return {"sigma": tuned_sigma(state.particles)[None]}

        smc = ikt(
            blackjax.adaptive_tempered_smc,
            log_prior,
            log_lik,
            step_fn,
            init_fn,
            resampling.systematic,
            update,
            {"sigma": (prior_sd * scale * jnp.eye(d))[None]},
            num_mcmc_steps=steps,
            target_ess=0.5,
        )

        def lam(s):
            return s.sampler_state.tempering_param

    else:
        smc = blackjax.adaptive_tempered_smc(
            log_prior,
            log_lik,
            step_fn,
            init_fn,
            {"sigma": (0.1 * prior_sd * scale * jnp.eye(d))[None]},
            resampling.systematic,
            0.5,
            num_mcmc_steps=steps,
        )

        def lam(s):
            return s.tempering_param

    def run(key):
        k0, k1 = jax.random.split(key)
        state = smc.init(sample_prior(k0, n))

        def cond(c):
            return lam(c[1]) < 1.0

        def body(c):
            k, s, log_z, i = c
            k, sub = jax.random.split(k)
            s, info = smc.step(sub, s)
            return k, s, log_z + info.log_likelihood_increment, i + 1

        _, _, log_z, i = jax.lax.while_loop(
            cond, body, (k1, state, jnp.zeros(()), jnp.int32(0))
        )
        return log_z, i

    return run


def measure(runs: dict, reps: int, num_timed: int, seed: int):
    """Compile each sampler, time them round-robin, then run R replicates each.

    Round-robin timing (A, B, C, A, B, C, ...) spreads any change in machine load
    evenly over the samplers; we report the median and the minimum wall time.
    """
    key = jax.random.key(seed)
    compiled, compile_s = {}, {}
    for label, run in runs.items():
        t0 = time.perf_counter()
        compiled[label] = jax.jit(run).lower(key).compile()
        compile_s[label] = time.perf_counter() - t0
        jax.block_until_ready(compiled[label](key))  # warm up
    times = {label: [] for label in runs}
    for i in range(num_timed):
        k = jax.random.fold_in(key, i)
        for label, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(k))
            times[label].append(time.perf_counter() - t0)
    out = {}
    for label, run in runs.items():
        log_z, steps = jax.jit(jax.vmap(run))(
            jax.random.split(jax.random.key(seed + 1), reps)
        )
        out[label] = (
            compile_s[label],
            statistics.median(times[label]),
            min(times[label]),
            np.asarray(log_z, np.float64),
            np.asarray(steps),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--target", choices=["mixture", "logreg", "both"], default="both"
    )
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--particles", type=int, default=None)
    parser.add_argument("--mcmc-steps", type=int, default=10)
    args = parser.parse_args()
    n = args.particles or (500 if args.quick else 2000)
    reps = 8 if args.quick else 32
    num_timed = 5 if args.quick else 15
    d = args.dim
    targets = ["mixture", "logreg"] if args.target == "both" else [args.target]

    print(
        f"# tempered SMC benchmark: d={d}, N={n}, RWM x {args.mcmc_steps} steps, "
        f"target ESS 0.5, {reps} replicates; jax {jax.__version__}, "
        f"smcjax {smcjax.__version__}, {jax.devices()[0].platform}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    for name in targets:
        if name == "mixture":
            lp, ll, sp, log_z, prior_sd = mixture_target(d)
            ref_note = "closed form"
        else:
            lp, ll, sp, log_z, prior_sd, ref = logreg_target(d, args.quick)
            ref_note = (
                f"reference {len(ref)} x N=20000 HMC runs, "
                f"se {ref.std(ddof=1) / np.sqrt(len(ref)):.4f}"
            )
        runs = {
            "smcjax": build_smcjax(lp, ll, sp, n, args.mcmc_steps),
            "blackjax (tuned)": build_blackjax(
                lp, ll, sp, n, args.mcmc_steps, d, True, prior_sd
            ),
            "blackjax (fixed)": build_blackjax(
                lp, ll, sp, n, args.mcmc_steps, d, False, prior_sd
            ),
        }
        print(f"## {name} (log Z = {log_z:.4f}, {ref_note})\n")
        print(
            "| sampler | wall time / run, median (s) | min (s) | compile (s) | "
            "RMSE log Z | bias log Z | sd log Z | tempering steps |"
        )
        print("|---|---|---|---|---|---|---|---|")
        results = measure(runs, reps, num_timed, seed=1)
        for label, (c, t, t_min, z, steps) in results.items():
            err = z - log_z
            print(
                f"| {label} | {t:.3f} | {t_min:.3f} | {c:.1f} | "
                f"{np.sqrt(np.mean(err**2)):.3f} | {err.mean():+.3f} | "
                f"{z.std(ddof=1):.3f} | {steps.mean():.1f} |"
            )

        def rmse(label):
            return np.sqrt(np.mean((results[label][3] - log_z) ** 2))

        t_ours, tmin_ours = results["smcjax"][1:3]
        for label in ("blackjax (tuned)", "blackjax (fixed)"):
            t_bj, tmin_bj = results[label][1:3]
            print(
                f"\nspeed-up vs {label}: **{t_bj / t_ours:.2f}x** (median), "
                f"{tmin_bj / tmin_ours:.2f}x (min); log-Z RMSE "
                f"{rmse('smcjax'):.3f} vs {rmse(label):.3f}"
            )
        print()


if __name__ == "__main__":
    main()
