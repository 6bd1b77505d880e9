r"""State-space models written with NumPyro distributions, and their particle filters.

A state-space model is

.. math::

    X_0 \sim p_0, \qquad X_t \mid X_{t-1} \sim p_t(\cdot \mid x_{t-1}), \qquad
    Y_t \mid X_t \sim f_t(\cdot \mid x_t),

given by one-particle functions that return NumPyro distributions. The bootstrap
filter is the Feynman–Kac model :math:`M_t = p_t`, :math:`G_t = f_t(y_t \mid x_t)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["StateSpaceModel"]

Distribution = Any  # numpyro.distributions.Distribution


class StateSpaceModel(NamedTuple):
    """A state-space model given by one-particle NumPyro distributions.

    Attributes
    ----------
    initial
        ``initial() -> Distribution`` of :math:`X_0`.
    transition
        ``transition(t, x_prev) -> Distribution`` of :math:`X_t \\mid X_{t-1}`
        (``t >= 1``).
    emission
        ``emission(t, x) -> Distribution`` of :math:`Y_t \\mid X_t` (``t >= 0``).
    """

    initial: Callable[[], Distribution]
    transition: Callable[[Any, Any], Distribution]
    emission: Callable[[Any, Any], Distribution]
