"""Training: ``run(config, workdir) -> TrainResult`` (``loop``) and the pieces it is made of:
``defaults`` (every config key), ``optim``, ``state``, ``steps``, ``parallel``,
``checkpoint``, ``metrics``, ``workdir``.

Re-exported on first use: ``steps``, ``state`` and ``optim`` need only jax, flax and optax,
so an accelerator machine without TFDS or grain can still import them.
"""

import importlib

_EXPORTS = {"base_config": "defaults", "NonFiniteLossError": "loop", "TrainResult": "loop",
            "TrainingError": "loop", "run": "loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gapjax.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gapjax.train' has no attribute {name!r}")
