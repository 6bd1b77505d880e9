"""smcjax: JAX-native sequential Monte Carlo.

The engine (:mod:`smcjax.core`) runs Feynman–Kac models written for one particle; the
rest of the package feeds it: state-space particle filters (:mod:`smcjax.ssm`), tempered
SMC (:mod:`smcjax.tempered`), particle Gibbs (:mod:`smcjax.pgibbs`), parallel tempering
(:mod:`smcjax.pt`), the NumPyro bridge (:mod:`smcjax.numpyro`) and LLM inference-time
scaling (:mod:`smcjax.llm`).
"""

from smcjax import resampling
from smcjax.core import FeynmanKac, SMCInfo, SMCResult, SMCState, smc
from smcjax.resampling import ess

__version__ = "0.1.0"

__all__ = [
    "FeynmanKac",
    "SMCInfo",
    "SMCResult",
    "SMCState",
    "ess",
    "resampling",
    "smc",
]
