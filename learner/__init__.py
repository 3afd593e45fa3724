"""The SITN model and its online learner (PyTorch). ``serving/`` must not import this package."""

from learner.config import SITNConfig
from learner.learner import SITNLearner

__all__ = ["SITNConfig", "SITNLearner"]
