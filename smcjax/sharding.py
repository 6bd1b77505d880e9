r"""Particles sharded over many devices.

The particle axis is embarrassingly parallel except for resampling, which needs the
cumulative sum of the weights over *all* particles. smcjax lets XLA's SPMD partitioner
(GSPMD) handle both: every particle-indexed array is constrained to be split along its
leading axis over a 1-d device mesh, and the unchanged engine is compiled once for the
whole mesh. Propagation and weighting then run locally on each device; the weight
normalisation, the ESS and the resampler's prefix sum become cross-device reductions,
and the ancestor gather moves only the particles that change device.

The same code runs on 8 TPU cores, several GPUs, or (for testing) on
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` virtual CPU devices. Random
numbers do not depend on the sharding (JAX's partitionable Threefry), so a sharded run
reproduces the single-device run with the same key up to floating-point reduction
order.

Example
-------
>>> import jax
>>> from smcjax.sharding import sharded_smc
>>> result = sharded_smc(key, model, 8 * 4096, 100)  # doctest: +SKIP
>>> result.particles.sharding  # doctest: +SKIP
NamedSharding(mesh=Mesh('particles': 8), spec=PartitionSpec('particles',))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from smcjax.core import FeynmanKac, SMCResult, batch_model, smc
from smcjax.types import ArrayTree, PRNGKey

__all__ = ["constrain_particles", "particle_mesh", "shard_model", "sharded_smc"]

AXIS = "particles"


def particle_mesh(devices: Sequence[Any] | None = None, axis_name: str = AXIS) -> Mesh:
    """A 1-d :class:`jax.sharding.Mesh` over ``devices`` (default: all devices)."""
    devs = np.asarray(jax.devices() if devices is None else list(devices))
    if devs.size < 1:
        raise ValueError("devices must contain at least one device")
    return Mesh(devs.reshape(-1), (axis_name,))


def constrain_particles(tree: ArrayTree, mesh: Mesh) -> ArrayTree:
    """Constrain every leaf of a particle pytree to be split along its leading axis."""
    axis = mesh.axis_names[0]

    def constrain(x):
        spec = PartitionSpec(axis, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, tree)


def shard_model(model: FeynmanKac, mesh: Mesh) -> FeynmanKac:
    """Wrap ``model`` so its particles and log-potentials live split over ``mesh``.

    Returns a ``vectorized`` :class:`~smcjax.core.FeynmanKac` that runs the batched
    functions of ``model`` (vmapped once, as the engine would) and pins the sharding
    of their inputs and outputs along the particle axis.
    """
    bm = batch_model(model)

    def init(key, n):
        return constrain_particles(bm.init(key, n), mesh)

    def propagate(key, t, x_prev):
        x_prev = constrain_particles(x_prev, mesh)
        return constrain_particles(bm.propagate(key, t, x_prev), mesh)

    def log_potential(t, x_prev, x):
        return constrain_particles(bm.log_potential(t, x_prev, x), mesh)

    return FeynmanKac(init, propagate, log_potential, vectorized=True)


def sharded_smc(
    key: PRNGKey,
    model: FeynmanKac,
    num_particles: int,
    num_steps: int,
    *,
    devices: Sequence[Any] | None = None,
    **smc_kwargs: Any,
) -> SMCResult:
    r"""Run :func:`smcjax.smc` with the particles split over ``devices``.

    This driver jits the run (the sharding is a property of the compiled program).

    Parameters
    ----------
    key, model, num_particles, num_steps
        As in :func:`smcjax.smc`; ``num_particles`` must be a multiple of the number
        of devices.
    devices
        Devices of the 1-d mesh (default: ``jax.devices()``).
    **smc_kwargs
        Any keyword of :func:`smcjax.smc` (``resampling``, ``ess_threshold``, ...).

    Returns
    -------
    SMCResult
        As :func:`smcjax.smc`; ``particles`` and ``log_weights`` stay sharded.
    """
    mesh = particle_mesh(devices)
    n_dev = mesh.devices.size
    if not isinstance(num_particles, int) or num_particles % n_dev:
        raise ValueError(
            f"num_particles={num_particles!r} must be a multiple of the number of "
            f"devices ({n_dev})"
        )
    kw = tuple(sorted(smc_kwargs.items()))
    return _sharded_run(key, model, num_particles, num_steps, mesh, kw)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _sharded_run(key, model, num_particles, num_steps, mesh, kw):
    # One compiled program per (model, N, T, mesh, options): repeated calls with new
    # keys reuse it.
    res = smc(key, shard_model(model, mesh), num_particles, num_steps, **dict(kw))
    return res._replace(
        particles=constrain_particles(res.particles, mesh),
        log_weights=constrain_particles(res.log_weights, mesh),
    )
