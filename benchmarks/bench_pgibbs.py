"""Particle Gibbs: smcjax (PGAS, CSMC-BS) vs `particles` 0.4 ParticleGibbs (backward).

Model (both libraries): x_0 ~ N(0, 1), x_t = 0.9 x_{t-1} + N(0, 1),
y_t = x_t + N(0, 1), T = 100 simulated observations, fixed parameters. Each sampler
runs `iters` sweeps with N particles; we report the effective sample size of x_0
(arviz bulk ESS) divided by the wall time of the run (compilation excluded for JAX,
reported separately), and the error of the posterior mean of x_0 against the Kalman
smoother in units of its MCSE.

    python benchmarks/bench_pgibbs.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import ClassVar

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from smcjax.pgibbs import particle_gibbs
from smcjax.ssm import StateSpaceModel

A, Q, R, P0 = 0.9, 1.0, 1.0, 1.0


def simulate(seed: int, length: int):
    rng = np.random.default_rng(seed)
    x = np.empty(length)
    x[0] = rng.normal(0, np.sqrt(P0))
    for t in range(1, length):
        x[t] = A * x[t - 1] + rng.normal(0, np.sqrt(Q))
    return x + rng.normal(0, np.sqrt(R), length)


def rts_x0(y):
    """Smoothing mean and variance of x_0 (scalar Kalman filter + RTS)."""
    length = len(y)
    mf, pf = np.empty(length), np.empty(length)
    m, p = 0.0, P0
    for t in range(length):
        if t > 0:
            m, p = A * m, A * A * p + Q
        k = p / (p + R)
        m, p = m + k * (y[t] - m), (1 - k) * p
        mf[t], pf[t] = m, p
    ms, ps = mf[-1], pf[-1]
    for t in range(length - 2, -1, -1):
        pp = A * A * pf[t] + Q
        g = pf[t] * A / pp
        ms, ps = mf[t] + g * (ms - A * mf[t]), pf[t] + g * g * (ps - pp)
    return ms, ps


def ess(chains: np.ndarray) -> float:
    """Bulk ESS of (chains, draws)."""
    return float(
        az.ess(az.convert_to_dataset(chains[None] if chains.ndim == 1 else chains))[
            "x"
        ].values
    )


def run_smcjax(y, n, iters, chains, **kw):
    yj = jnp.asarray(y, jnp.float32)
    nc = None if chains == 1 else chains
    f = jax.jit(lambda k: particle_gibbs(k, model(), yj, n, iters, num_chains=nc, **kw))
    t0 = time.perf_counter()
    f.lower(jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    f(jax.random.key(1)).trajectories.block_until_ready()  # warm
    t0 = time.perf_counter()
    out = f(jax.random.key(2))
    x0 = np.asarray(out.trajectories.block_until_ready())[..., 0]
    return x0.reshape(chains, iters), time.perf_counter() - t0, compile_s


def model():
    return StateSpaceModel(
        initial=lambda: dist.Normal(0.0, np.sqrt(P0)),
        transition=lambda t, x: dist.Normal(A * x, np.sqrt(Q)),
        emission=lambda t, x: dist.Normal(x, np.sqrt(R)),
    )


def run_particles(y, n, iters, backward=True):
    import particles
    import particles.distributions as pdists
    import particles.mcmc as pmcmc
    import particles.state_space_models as pssm

    class LG(pssm.StateSpaceModel):
        default_params: ClassVar[dict] = {"rho": A}

        def PX0(self):
            return pdists.Normal(loc=0.0, scale=np.sqrt(P0))

        def PX(self, t, xp):
            return pdists.Normal(loc=self.rho * xp, scale=np.sqrt(Q))

        def PY(self, t, xp, x):
            return pdists.Normal(loc=x, scale=np.sqrt(R))

    class FixedThetaPG(pmcmc.ParticleGibbs):
        def update_theta(self, theta, x):
            return theta.copy()

    prior = pdists.StructDist({"rho": pdists.Normal(loc=A, scale=1.0)})
    theta0 = np.array([(A,)], dtype=[("rho", float)])[0]
    np.random.seed(0)  # noqa: NPY002 (particles draws from the global RNG)
    pg = FixedThetaPG(
        niter=iters,
        ssm_cls=LG,
        prior=prior,
        data=list(y),
        theta0=theta0,
        Nx=n,
        backward_step=backward,
        store_x=True,
    )
    del particles
    t0 = time.perf_counter()
    pg.run()
    elapsed = time.perf_counter() - t0
    return np.asarray(pg.chain.x)[:, 0][None], elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    T = 100
    n = 10
    iters = 300 if args.quick else 2000
    many = 16
    y = simulate(0, T)
    m0, v0 = rts_x0(y)
    burn = iters // 10

    rows = []

    def record(name, x0, secs, compile_s=None):
        x0 = x0[:, burn:]
        e = ess(x0)
        mcse = np.sqrt(v0 / max(e, 1.0))
        rows.append(
            (
                name,
                x0.shape[0],
                x0.size,
                secs,
                compile_s,
                e,
                e / secs,
                (x0.mean() - m0) / mcse,
            )
        )

    x0, s, c = run_smcjax(y, n, iters, 1, ancestor_sampling=True)
    record("smcjax PGAS", x0, s, c)
    x0, s, c = run_smcjax(
        y, n, iters, 1, ancestor_sampling=False, backward_sampling=True
    )
    record("smcjax CSMC + backward sampling", x0, s, c)
    x0, s, c = run_smcjax(y, n, iters, many, ancestor_sampling=True)
    record(f"smcjax PGAS, {many} chains (vmap)", x0, s, c)
    x0, s = run_particles(y, n, iters, backward=True)
    record("particles 0.4 ParticleGibbs (backward_step)", x0, s)

    load = os.getloadavg()[0]
    print(
        f"\nParticle Gibbs on a linear-Gaussian model, T={T}, N={n}, {iters} sweeps "
        f"per chain (burn-in {burn}); load average {load:.1f} on {os.cpu_count()} "
        f"cores\n"
    )
    print(
        "| sampler | chains | draws | run (s) | compile (s) | ESS(x_0) | ESS/s | "
        "(mean−truth)/MCSE |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, ch, dr, secs, comp, e, eps, z in rows:
        comp_s = "—" if comp is None else f"{comp:.1f}"
        print(
            f"| {name} | {ch} | {dr} | {secs:.2f} | {comp_s} | {e:.0f} | {eps:.0f} | "
            f"{z:+.2f} |"
        )
    ref = rows[3][6]
    print(
        f"\nESS/s ratio vs particles: PGAS {rows[0][6] / ref:.1f}×, CSMC-BS "
        f"{rows[1][6] / ref:.1f}×, PGAS {many} chains {rows[2][6] / ref:.1f}×"
    )


if __name__ == "__main__":
    main()
