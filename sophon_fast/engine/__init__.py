"""The SOPHON algorithm on flat parameters.

- :mod:`~sophon_fast.engine.flat`: FlatParams, one buffer for parameters, one for statistics;
- :mod:`~sophon_fast.engine.functional`: stateless forward over views of those buffers;
- :mod:`~sophon_fast.engine.optimizers`: flat functional inner optimizers (the adversaries);
- :mod:`~sophon_fast.engine.inner`: one fine-tuning simulation and its meta-gradient (order 1/2);
- :mod:`~sophon_fast.engine.sampling`: data materialisation and every random draw;
- :mod:`~sophon_fast.engine.outer`: the outer loop shared by both engines;
- :mod:`~sophon_fast.engine.checkpoint`: atomic safetensors + JSON checkpoints.
"""

from sophon_fast.engine.flat import FlatLayout, FlatParams
from sophon_fast.engine.functional import FunctionalModel
from sophon_fast.engine.inner import FastEngine, FlatSimulation, simulate_flat
from sophon_fast.engine.optimizers import INNER_OPTIMIZERS, Adversary, resolve_adversary

__all__ = [
    "INNER_OPTIMIZERS",
    "Adversary",
    "FastEngine",
    "FlatLayout",
    "FlatParams",
    "FlatSimulation",
    "FunctionalModel",
    "resolve_adversary",
    "simulate_flat",
]
