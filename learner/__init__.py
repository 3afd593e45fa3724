"""The SITN model and its online learner (PyTorch). ``serving/`` must not import this package.

``core``: the model and one step of learning (``SITNLearner``, checkpoint files); ``online``: the streaming
loop around it (trainer, Ray actor, publishing, gate, drift); ``offline``: offline evaluation and ``sitn
train``'s warm start. ``online`` and ``offline`` import ``core``, never each other; ``core`` imports neither.
"""

from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner

__all__ = ["SITNConfig", "SITNLearner"]
