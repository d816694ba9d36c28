"""Model zoo. ``MODELS`` maps a config name to a Linen module class (or factory).

``get(name, num_classes=K, **kwargs)`` builds one; every key of ``config.model`` other
than ``name`` is passed through as a keyword argument.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from gapjax.registry import Registry

MODELS: Registry[Any] = Registry("model")


def get(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name`` with constructor keyword arguments."""
    return MODELS.get(name)(**kwargs)


def names() -> list[str]:
    """All registered model names."""
    return MODELS.names()


# Importing the zoo modules registers their models.
from gapjax.models import cnn, gnn, resnet, vgg  # noqa: E402,F401
