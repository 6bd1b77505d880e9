"""smcjax: JAX-native sequential Monte Carlo.

The engine (:mod:`smcjax.core`) runs Feynman–Kac models written for one particle; the
rest of the package feeds it: state-space particle filters (:mod:`smcjax.ssm`), tempered
SMC (:mod:`smcjax.tempered`), particle Gibbs (:mod:`smcjax.pgibbs`), parallel tempering
(:mod:`smcjax.pt`), the NumPyro bridge (:mod:`smcjax.numpyro`) and LLM inference-time
scaling (:mod:`smcjax.llm`).
"""

from smcjax import kalman, pgibbs, pt, resampling, smoothing, ssm
from smcjax.core import FeynmanKac, SMCInfo, SMCResult, SMCState, smc
from smcjax.pgibbs import particle_gibbs
from smcjax.pt import parallel_tempering
from smcjax.resampling import ess
from smcjax.ssm import StateSpaceModel, particle_filter

__version__ = "0.1.0"

__all__ = [
    "FeynmanKac",
    "SMCInfo",
    "SMCResult",
    "SMCState",
    "StateSpaceModel",
    "ess",
    "kalman",
    "parallel_tempering",
    "particle_filter",
    "particle_gibbs",
    "pgibbs",
    "pt",
    "resampling",
    "smc",
    "smoothing",
    "ssm",
]
