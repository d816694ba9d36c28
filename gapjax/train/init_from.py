"""Fine-tuning: start a run from pretrained weights (``config.init_from``).

``config.init_from`` is either

* a weight file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) in the torch naming of
  ``config.model.name`` (torchvision / timm files, or one written by
  ``gapjax.pretrained.save``), read through ``gapjax.pretrained``; or
* a gapjax workdir: the parameters and BatchNorm statistics of its latest checkpoint.

Everything outside the head must match the model exactly (names and shapes; a mismatch
names the tensor and both shapes), except the new layers a recipe declares in
``config.optimizer.head_modules`` (WSOL's ``conv6_1`` on VGG-16): those the file lacks keep
their fresh initialisation too. The head is loaded when it fits; when only the
classifier differs (another class count) the classifier keeps the run's fresh
initialisation, and when the head itself differs (another pool or head type) the whole
head does; one line says which. ``config.optimizer.head_lr_multiplier`` then gives the
head its own learning rate (``gapjax.train.optim``).

The weights are applied once, to a fresh run's initial state: a run that resumes from its
own checkpoint never reads ``init_from`` again, so resuming stays exact. The optimizer
state is initialised for the loaded parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util

from gapjax import pretrained
from gapjax.train.checkpoint import load_run
from gapjax.train.state import TrainState

logger = logging.getLogger(__name__)


def initial_leaves(init_from: str | Path, model_name: str, model: Any,
                   fresh: Mapping[str, Any], new_modules: tuple[str, ...] = ()
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The leaves ``{"params/..": array, "batch_stats/..": array}`` to start from.

    Args:
      init_from: a weight file or a gapjax workdir.
      model_name: the ``gapjax.models`` name whose torch naming the file uses.
      model: the model being trained; ``fresh``: its freshly initialised leaves, by path.
      new_modules: top-level modules the run adds to the published network (the
        optimizer's ``head_modules``); those a weight file lacks keep their fresh value.

    Returns ``(loaded leaves, leaves that keep their fresh value)``.
    """
    path = Path(init_from).expanduser()
    layout = None
    if path.is_dir():
        run = load_run(path)
        state, layout = pretrained.gapjax_state_dict(run.variables), pretrained.GAPJAX_NAMING
        source = f"config.init_from={str(init_from)!r} (step {run.step})"
    elif path.is_file():
        state, source = pretrained.read_state_dict(path), str(path)
    else:
        raise FileNotFoundError(f"config.init_from={str(init_from)!r}: no such weight file "
                                "or gapjax workdir")
    shapes = {key: tuple(leaf.shape) for key, leaf in fresh.items()}
    loaded, kept, _ = pretrained.load_leaves(model_name, model, state, skip_head="auto",
                                             source=source, shapes=shapes,
                                             new_modules=new_modules, layout=layout)
    return loaded, kept


def initialize(state: TrainState, model: Any, tx: optax.GradientTransformation,
               config: Any) -> TrainState:
    """``state`` (a fresh run's initial state) with parameters and BatchNorm statistics from
    ``config.init_from`` and a fresh optimizer state for them; every array keeps the
    placement (sharding) of the one it replaces."""
    fresh = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats},
                                       sep="/")
    new_modules = tuple(config.optimizer.get("head_modules", None) or ())
    loaded, kept = initial_leaves(config.init_from, config.model.name, model, fresh,
                                  new_modules)
    if kept:
        modules = sorted({"/".join(p.split("/")[1:-1]) for p in kept if p.startswith("params/")})
        logger.warning("init_from %s: %s freshly initialised (not in the file, or the file's "
                       "head does not fit), %d tensors loaded", config.init_from,
                       ", ".join(modules), len(loaded))
    else:
        logger.info("init_from %s: %d tensors loaded", config.init_from, len(loaded))

    def replace(collection: str, tree: Any) -> Any:
        if not tree:
            return tree
        flat = traverse_util.flatten_dict(tree, sep="/")
        for path, old in flat.items():
            new = loaded.get(f"{collection}/{path}")
            if new is not None:
                flat[path] = jax.device_put(np.asarray(new, old.dtype), old.sharding)
        return type(tree)(traverse_util.unflatten_dict(flat, sep="/"))

    params = replace("params", state.params)
    batch_stats = replace("batch_stats", state.batch_stats)
    opt_state = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                             tx.init(params), state.opt_state)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


__all__ = ["initial_leaves", "initialize"]
