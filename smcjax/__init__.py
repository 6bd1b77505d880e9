"""smcjax: JAX-native sequential Monte Carlo.

The engine (:mod:`smcjax.core`) runs Feynman–Kac models written for one particle; the
rest of the package feeds it: state-space particle filters (:mod:`smcjax.ssm`), tempered
SMC (:mod:`smcjax.tempered`), particle Gibbs (:mod:`smcjax.pgibbs`), parallel tempering
(:mod:`smcjax.pt`), the NumPyro bridge (:mod:`smcjax.numpyro`) and LLM inference-time
scaling (:mod:`smcjax.llm`).
"""

from smcjax import (
    kalman,
    mcmc,
    numpyro,
    pgibbs,
    pmmh,
    pt,
    resampling,
    sharding,
    smoothing,
    ssm,
    tempered,
)
from smcjax.core import FeynmanKac, SMCInfo, SMCResult, SMCState, smc
from smcjax.pgibbs import particle_gibbs
from smcjax.pt import parallel_tempering
from smcjax.resampling import ess, get_conditional_resampler, get_resampler
from smcjax.ssm import StateSpaceModel, particle_filter
from smcjax.tempered import tempered_smc

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``smcjax.llm`` pulls in transformers and the tokenizers: import it on first use.
    if name == "llm":
        import importlib

        return importlib.import_module("smcjax.llm")
    raise AttributeError(f"module 'smcjax' has no attribute {name!r}")


__all__ = [
    "FeynmanKac",
    "SMCInfo",
    "SMCResult",
    "SMCState",
    "StateSpaceModel",
    "ess",
    "get_conditional_resampler",
    "get_resampler",
    "kalman",
    "llm",
    "mcmc",
    "numpyro",
    "parallel_tempering",
    "particle_filter",
    "particle_gibbs",
    "pgibbs",
    "pmmh",
    "pt",
    "resampling",
    "sharding",
    "smc",
    "smoothing",
    "ssm",
    "tempered",
    "tempered_smc",
]
