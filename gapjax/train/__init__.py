"""Training: ``run(config, workdir)`` (``loop``) and its pieces (``defaults``, ``optim``,
``state``, ``steps``, ``parallel``, ``checkpoint``, ``metrics``, ``workdir``). Names are
re-exported on first use, so ``steps``, ``state`` and ``optim`` import without TFDS or grain.
"""

import importlib

_EXPORTS = {"base_config": "defaults", "NonFiniteLossError": "loop", "TrainResult": "loop",
            "TrainingError": "loop", "run": "loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gapjax.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gapjax.train' has no attribute {name!r}")
