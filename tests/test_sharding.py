"""Particles sharded over 8 (virtual) devices.

The checks run in a subprocess because the number of host devices is fixed when JAX
starts (``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import smcjax
    from smcjax.kalman import LinearGaussianSSM, log_likelihood
    from smcjax.sharding import sharded_smc

    assert len(jax.devices()) == 8, jax.devices()
    rho, sx, sy, T = 0.9, 1.0, 0.5, 30
    ys = jnp.sin(jnp.arange(T) / 3.0)
    s0 = sx / np.sqrt(1 - rho**2)

    def init(k):
        return jax.random.normal(k) * s0

    def prop(k, t, x):
        return rho * x + sx * jax.random.normal(k)

    def logg(t, xp, x):
        return jax.scipy.stats.norm.logpdf(ys[t], x, sy)

    model = smcjax.FeynmanKac(init, prop, logg)
    key = jax.random.key(3)
    out = {}
    # 1. No resampling: same random numbers, so the runs agree up to reduction order.
    ref = jax.jit(lambda k: smcjax.smc(k, model, 1024, T, ess_threshold=0.0))(key)
    sh = sharded_smc(key, model, 1024, T, ess_threshold=0.0)
    out["never"] = dict(
        dz=float(abs(ref.log_evidence - sh.log_evidence)),
        dx=float(jnp.max(jnp.abs(ref.particles - sh.particles))),
        ndev=len(sh.particles.sharding.device_set),
    )
    # 2. Resampling at every step: first resampling nearly identical; later steps may
    #    diverge (one flipped ancestor shifts a whole systematic comb), so compare the
    #    estimator's distribution with the Kalman evidence instead.
    ref = jax.jit(lambda k: smcjax.smc(k, model, 1024, T, ess_threshold=1.0))(key)
    sh = sharded_smc(key, model, 1024, T, ess_threshold=1.0)
    out["first_mismatch"] = float(jnp.mean(ref.ancestors[1] != sh.ancestors[1]))
    out["ndev_always"] = len(sh.particles.sharding.device_set)
    params = LinearGaussianSSM(
        initial_mean=jnp.zeros(1), initial_covariance=jnp.eye(1) * s0**2,
        transition_matrix=jnp.eye(1) * rho, transition_covariance=jnp.eye(1) * sx**2,
        emission_matrix=jnp.eye(1), emission_covariance=jnp.eye(1) * sy**2,
    )
    log_z = float(log_likelihood(params, ys[:, None]))
    ratios = [
        float(jnp.exp(sharded_smc(jax.random.key(100 + i), model, 256, T,
                                  ess_threshold=0.5).log_evidence - log_z))
        for i in range(32)
    ]
    out["ratios"] = ratios
    try:
        sharded_smc(key, model, 1001, T)
    except ValueError as e:
        out["error"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_smc_over_8_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out["never"]["ndev"] == 8 and out["ndev_always"] == 8
    # float32 rounding only: |log Z| ~ 35 summed over 30 steps of 1024-term sums.
    assert out["never"]["dz"] < 1e-3
    assert out["never"]["dx"] < 1e-4
    # The first resampling sees weights equal up to rounding: ancestors may differ only
    # where a comb point falls within rounding of a cumulative-weight boundary.
    assert out["first_mismatch"] < 0.01
    # Unbiasedness of the sharded estimator: E[Ẑ/Z] = 1 within 4 standard errors.
    r = out["ratios"]
    mean = sum(r) / len(r)
    se = (sum((x - mean) ** 2 for x in r) / (len(r) - 1) / len(r)) ** 0.5
    assert abs(mean - 1.0) < 4 * se + 1e-3, (mean, se)
    assert "num_particles=1001" in out["error"] and "(8)" in out["error"]
