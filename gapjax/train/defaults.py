"""Every training config key with its default. Configs and experiments start from here.

``base_config()`` returns an unlocked ``ml_collections.ConfigDict``; a config file fills
in ``dataset.name``, ``model.name``, the step counts and the optimizer, and may add keys
of its own (``dataset.task`` for graphs, ...). Every key of ``config.model`` other than
``name`` is passed to ``gapjax.models.get`` as a keyword, so ``config.model`` holds only
keys its model takes. Every model takes ``model.pool`` (the head's pool; a graph model's
readout) and ``model.pool_kwargs`` (the pool's options, ``--config.model.pool_kwargs.p=4``);
image configs add ``model.head``. ``imports`` and ``evals``: see docs/training.md.
"""

from __future__ import annotations

import ast
import re

import ml_collections

PARALLEL_MODES = ("jit", "pmap")
DTYPES = ("float32", "bfloat16")
PROGRESS_MODES = ("auto", "bar", "lines", "none")


def base_config() -> ml_collections.ConfigDict:
    """The shared defaults (global batch 128, SGD + cosine, jit over all devices)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 128  # global: split over processes, then over devices
    config.total_steps = 1000
    config.eval_every = 500
    config.checkpoint_every = 500
    config.log_every = 50
    config.keep_checkpoints = 3
    config.parallel = "jit"
    config.dtype = "float32"
    config.progress = "auto"
    config.gradflow_every = 0
    config.imports = ()  # a fork's modules (names or .py paths), recorded resolved
    # name -> dict(type=<EVALUATORS name>, every=..., ...); eval_every, eval.* and
    # gradflow_every add the default entries (gapjax.evaluators.base.specs).
    config.evals = ml_collections.ConfigDict()
    # Fine-tuning: a weight file (.safetensors / .pth in config.model.name's torch naming)
    # or a gapjax workdir to start from; "" starts from scratch (gapjax.train.init_from).
    config.init_from = ""

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = ""
    # A typed None, so that --config.dataset.data_dir=/path can override it.
    config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset.augment = True

    config.model = ml_collections.ConfigDict()
    config.model.name = ""
    config.model.pool = "gap"
    config.model.pool_kwargs = ml_collections.ConfigDict()

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 0
    config.optimizer.weight_decay = 5e-4
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.grad_clip = 0.0  # global-norm clip; 0 disables it
    config.optimizer.label_smoothing = 0.0
    # "step" schedule: multiply the rate by step_factor at these fractions of total_steps.
    config.optimizer.step_boundaries = (0.5, 0.75)
    config.optimizer.step_factor = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    # The new layers of a fine-tuning run (top-level modules; the head, which init_from
    # re-initialises when the class count differs): head_lr_multiplier scales their
    # learning rate (1 = one rate for all), and init_from lets those the file lacks start
    # fresh.
    config.optimizer.head_modules = ("head",)
    config.optimizer.head_lr_multiplier = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.localization = False
    config.eval.cam_method = "auto"
    # Localization metrics as gapjax defines them, or exactly as clovaai/wsolevaluation
    # computes them ("wsolevaluation"; docs/wsol.md).
    config.eval.wsol_protocol = "gapjax"
    # Images in the CAM overlay grid written at each evaluation (TensorBoard + PNG); 0: none.
    config.eval.overlay_images = 0
    # A split evaluated once at the end with the threshold calibrated on the eval split.
    config.eval.final_split = ml_collections.config_dict.placeholder(str)
    return config


def set_epochs(
    config: ml_collections.ConfigDict, train_examples: int, epochs: int, *,
    eval_every: int = 5, checkpoint_every: int = 5, warmup: int = 5,
) -> int:
    """Sets ``total_steps``, the eval / checkpoint cadence and the warmup from epochs of
    ``train_examples`` at ``config.batch_size``; returns the steps per epoch."""
    steps_per_epoch = train_examples // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.eval_every = eval_every * steps_per_epoch
    config.checkpoint_every = checkpoint_every * steps_per_epoch
    config.optimizer.warmup_steps = warmup * steps_per_epoch
    return steps_per_epoch


#: ``--config.<key>=<value>`` flags whose key the config file need not have set: the
#: options of a model's ``*_kwargs`` dicts (the pool or module checks their names) and the
#: entries of ``config.evals``. ml_collections only overrides keys that exist.
OPEN_OVERRIDE = re.compile(r"--config\.((?:model\.\w+_kwargs|evals\.\w+)\.[\w.]+)=(.*)", re.S)


def split_open_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Takes the open overrides out of ``argv``: returns the remaining arguments and
    ``{"model.pool_kwargs.p": "5", ...}`` (raw strings, for ``apply_open_overrides``)."""
    matches = [OPEN_OVERRIDE.fullmatch(argument) for argument in argv]
    return ([argument for argument, match in zip(argv, matches) if not match],
            {match[1]: match[2] for match in matches if match})


def apply_open_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Sets the open-section overrides on ``config``, creating the sections they name;
    values are Python literals (``5``, ``2.5``, ``True``, ``(1, 2)``) or else strings."""
    for path, raw in overrides.items():
        *sections, key = path.split(".")
        node = config
        with config.unlocked():
            for section in sections:
                if node.get(section) is None:
                    node[section] = ml_collections.ConfigDict()
                node = node[section]
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            try:
                node[key] = value
            except TypeError as error:  # another type than the config file's value
                raise ValueError(f"--config.{path}={raw}: {error}") from None
