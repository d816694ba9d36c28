"""Training: ``run(config, workdir) -> TrainResult`` and the pieces it is made of.

``gapjax.train.defaults.base_config()`` holds every config key with its default;
``optim`` builds optimizers and schedules by name, ``state`` the train state, ``steps``
the pure train / eval steps, ``parallel`` the jit-mesh and pmap placements, ``checkpoint``
the Orbax checkpoints, ``metrics`` the metric writers and progress display, and ``loop``
ties them together.
"""


from __future__ import annotations

import importlib
from typing import Any

# Exported lazily: ``steps``, ``state`` and ``optim`` need only jax, flax and optax, so
# an accelerator machine without TFDS, grain or ml_collections can still import them.
_EXPORTS = {
    "base_config": "gapjax.train.defaults",
    "NonFiniteLossError": "gapjax.train.loop",
    "TrainResult": "gapjax.train.loop",
    "TrainingError": "gapjax.train.loop",
    "run": "gapjax.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gapjax.train' has no attribute {name!r}")
