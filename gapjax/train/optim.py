"""Optimizers and learning-rate schedules by name (``config.optimizer``).

``make_optimizer(config.optimizer, total_steps)`` returns an ``optax.GradientTransformation``:
optional global-norm clipping, then the named optimizer driven by the named schedule,
with weight decay on kernels only (biases and normalisation scales are excluded by their
rank), and ``head_lr_multiplier`` (default 1) scaling the learning rate of the new layers
of a fine-tuning run: the parameters under the model's ``head`` (``head_modules``), which
``config.init_from`` re-initialises when the class count differs. Forks add entries with
``@OPTIMIZERS.register("mine")`` or ``@SCHEDULES.register("mine")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import traverse_util

from gapjax.registry import Registry

OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
SCHEDULES: Registry[Callable[..., optax.Schedule]] = Registry("schedule")


def _get(options: Any, key: str, default: Any) -> Any:
    return options.get(key, default) if hasattr(options, "get") else getattr(options, key, default)


# --------------------------------------------------------------------------------------
# Schedules: (options, total_steps) -> step -> learning rate, all with a linear warmup.
# --------------------------------------------------------------------------------------


def _with_warmup(peak: float, warmup_steps: int, after: optax.Schedule) -> optax.Schedule:
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


@SCHEDULES.register("cosine")
def cosine_schedule(options: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine decay to zero at ``total_steps``."""
    peak, warmup = float(options.learning_rate), int(_get(options, "warmup_steps", 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))


@SCHEDULES.register("step")
def step_schedule(options: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup, then the rate times ``step_factor`` at each of ``step_boundaries``
    (fractions of ``total_steps``)."""
    peak, warmup = float(options.learning_rate), int(_get(options, "warmup_steps", 0))
    factor = float(_get(options, "step_factor", 0.1))
    boundaries = {
        max(int(fraction * total_steps) - warmup, 1): factor
        for fraction in _get(options, "step_boundaries", (0.5, 0.75))
    }
    return _with_warmup(peak, warmup, optax.piecewise_constant_schedule(peak, boundaries))


@SCHEDULES.register("constant")
def constant_schedule(options: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup, then a constant ``learning_rate``."""
    del total_steps
    peak, warmup = float(options.learning_rate), int(_get(options, "warmup_steps", 0))
    return _with_warmup(peak, warmup, optax.constant_schedule(peak))


def make_schedule(options: Any, total_steps: int) -> optax.Schedule:
    """The schedule named by ``options.schedule`` (error lists the choices)."""
    return SCHEDULES.get(_get(options, "schedule", "constant"))(options, total_steps)


# --------------------------------------------------------------------------------------
# Optimizers: (options, schedule, weight_decay) -> GradientTransformation.
# --------------------------------------------------------------------------------------


@OPTIMIZERS.register("sgd")
def sgd(options: Any, schedule: optax.Schedule, weight_decay: float
        ) -> optax.GradientTransformation:
    """SGD with (optionally Nesterov) momentum; ``momentum=0`` is plain SGD.

    Weight decay is the classic L2 form: added to the gradient before momentum, so it is
    scaled by the schedule like the gradient.
    """
    momentum = float(_get(options, "momentum", 0.0))
    parts = []
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None,
                           nesterov=bool(_get(options, "nesterov", False))))
    return optax.chain(*parts)


@OPTIMIZERS.register("adamw")
def adamw(options: Any, schedule: optax.Schedule, weight_decay: float
          ) -> optax.GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter), scaled by the schedule."""
    return optax.adamw(schedule, b1=float(_get(options, "b1", 0.9)),
                       b2=float(_get(options, "b2", 0.999)),
                       weight_decay=weight_decay, mask=weight_decay_mask)


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: kernels (rank >= 2).

    Biases, BatchNorm/LayerNorm scales and the scalar exponents of GeM/LSE pools are
    rank <= 1; decaying them only fights normalisation, so they are excluded.
    """
    return jax.tree.map(lambda leaf: getattr(leaf, "ndim", 0) >= 2, params)


def new_layer_mask(params: Any, modules: tuple[str, ...] = ("head",)) -> Any:
    """True for the parameters of the new layers of a fine-tuning run: those whose path
    starts with one of ``modules`` (module paths such as ``"head"`` or
    ``"head/classifier"``), e.g. ``params["head"]["classifier"]["kernel"]``."""
    prefixes = [tuple(module.split("/")) for module in modules]
    return traverse_util.path_aware_map(
        lambda path, _: any(path[:len(prefix)] == prefix for prefix in prefixes), params)


def make_optimizer(options: Any, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip`` > 0), then the named optimizer with its schedule
    and weight decay on kernels only, then (``head_lr_multiplier`` != 1) the head's
    learning-rate multiplier (``head_modules``, default ``("head",)``)."""
    build = OPTIMIZERS.get(_get(options, "name", "sgd"))
    schedule = make_schedule(options, total_steps)
    weight_decay = float(_get(options, "weight_decay", 0.0) or 0.0)
    optimizer = build(options, schedule, weight_decay)
    multiplier = float(_get(options, "head_lr_multiplier", 1.0) or 1.0)
    if multiplier <= 0:
        raise ValueError(f"config.optimizer.head_lr_multiplier={multiplier!r} must be positive")
    if multiplier != 1.0:
        modules = tuple(_get(options, "head_modules", ("head",)) or ("head",))
        # Every optimizer's update is -learning_rate * direction (weight decay included),
        # so scaling the head's updates is a learning rate `multiplier` times larger.
        optimizer = optax.chain(optimizer, optax.masked(
            optax.scale(multiplier), lambda tree: new_layer_mask(tree, modules)))
    clip = float(_get(options, "grad_clip", 0.0) or 0.0)
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), optimizer)
    return optimizer
