"""Training: ``run(config, workdir) -> TrainResult`` and the pieces it is made of.

``gapjax.train.defaults.base_config()`` holds every config key with its default;
``optim`` builds optimizers and schedules by name, ``state`` the train state, ``steps``
the pure train / eval steps, ``parallel`` the jit-mesh and pmap placements, ``checkpoint``
the Orbax checkpoints, ``metrics`` the metric writers and progress display, and ``loop``
ties them together.
"""

from gapjax.train.defaults import base_config
from gapjax.train.loop import NonFiniteLossError, TrainingError, TrainResult, run

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingError", "base_config", "run"]
