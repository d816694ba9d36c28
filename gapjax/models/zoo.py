"""The model registry: ``MODELS`` maps a config name to a Linen module class (or factory).

``get(name, num_classes=K, **kwargs)`` builds one; every key of ``config.model`` other
than ``name`` is passed through as a keyword argument (``from_config``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gapjax.layers import build_module
from gapjax.registry import Registry

MODELS: Registry[Any] = Registry("model")


def get(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name`` with constructor keyword arguments."""
    return MODELS.get(name)(**kwargs)


def from_config(config: Any, num_classes: int, axis_name: str | None = None) -> nn.Module:
    """The model a training config describes: ``get(config.model.name,
    num_classes=num_classes, dtype=config.dtype, axis_name=axis_name, **other model keys)``.

    ``config.model`` holds only keys the model takes (an unknown one is an error naming
    the valid options); nested dicts arrive as plain dicts (frozen by ``build_module``).
    """
    kwargs = {key: value.to_dict() if hasattr(value, "to_dict") else value
              for key, value in config.model.items() if key != "name"}
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return get(config.model.name, num_classes=num_classes, dtype=dtype, axis_name=axis_name,
               **kwargs)


def register_preset(name: str, module_class: type[nn.Module], preset: dict[str, Any],
                    doc: str) -> None:
    """Registers ``name`` as ``module_class`` with ``preset`` attributes; keyword arguments
    (the ``config.model`` keys) add to or override the preset and are checked against the
    class's attributes, so a typo names the valid options."""
    def build(**kwargs: Any) -> nn.Module:
        return build_module(module_class, name, {**preset, **kwargs})

    build.__name__ = name
    build.__doc__ = doc
    MODELS.add(name, build)


def names() -> list[str]:
    """All registered model names."""
    return MODELS.names()


__all__ = ["MODELS", "from_config", "get", "names", "register_preset"]
