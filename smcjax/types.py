"""Type aliases shared across smcjax.

The convention is "ArrayLike in, Array out": public functions accept anything that
``jnp.asarray`` accepts and return :class:`jax.Array`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax
from jax.typing import ArrayLike

__all__ = ["Array", "ArrayLike", "ArrayTree", "PRNGKey", "Scalar"]

Array: TypeAlias = jax.Array
#: A pytree whose leaves are arrays (a particle, a batch of particles, a state).
ArrayTree: TypeAlias = Any
#: A JAX random key, either a new-style typed key or a legacy ``uint32[2]`` key.
PRNGKey: TypeAlias = jax.Array
#: A 0-d array or Python number.
Scalar: TypeAlias = ArrayLike
