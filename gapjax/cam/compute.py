"""Maps of a model in one call: ``compute_maps`` / ``make_map_fn`` over the model contract.

Only the classifier contract (docs/ARCHITECTURE.md) is used, with plain ``model.apply``
calls: ``method="forward_features"`` (images -> features ``[B, h, w, C]``),
``"forward_head"`` (features -> logits), ``"head_class_maps"`` / ``"head_contributions"``
(features -> ``[B, h, w, K]``), ``"forward_attention"`` (rollout) and the
``model.map_kinds`` property. The trunk runs forward once; gradient methods add one
backward pass through the head per target class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.cam.methods import (
    CAM_METHODS,
    DEFAULT_CHANNEL_CHUNK,
    WHOLE_MAPS,
    CamMethod,
    ablation_cam_weights,
    attention_rollout,
    eigen_cam_map,
    reduce_terms,
    score_cam_weights,
    weighted_terms,
)
from gapjax.pooling import POOLS

Array = jax.Array

#: The built-in method names: ``auto`` plus the registry, in this order. A fork may add a
#: gradient method with ``gapjax.cam.methods.register_gradient_method(name, terms)``;
#: ``method_names()`` lists it too.
METHODS = ("auto", "cam", "contribution", "grad_cam", "hires_cam", "grad_cam_pp", "xgrad_cam",
           "layer_cam", "eigen_cam", "score_cam", "ablation_cam", "rollout")
assert set(METHODS[1:]) == set(CAM_METHODS.names()), "METHODS and CAM_METHODS disagree"


def method_names() -> tuple[str, ...]:
    """Every name ``compute_maps`` takes now: ``METHODS``, then later registrations."""
    return (*METHODS, *sorted(set(CAM_METHODS.names()) - set(METHODS)))


#: Interpolations accepted by ``resize_maps`` (``jax.image.resize`` names).
RESIZE_METHODS = ("bilinear", "cubic", "nearest")
#: Test-time augmentations of ``aug_smooth``: horizontal flip x brightness factor, the
#: default of pytorch-grad-cam (ttach's HorizontalFlip and Multiply(0.9, 1, 1.1)).
AUGMENTATION_FLIPS = (False, True)
AUGMENTATION_FACTORS = (0.9, 1.0, 1.1)


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


def check_target_range(targets: Any, num_classes: int, name: str = "targets") -> None:
    """Raises one ValueError naming ``name`` and the valid range ``[0, num_classes)`` when a
    concrete class index is out of range. Traced values (inside ``jax.jit``) cannot be read
    and are not checked: there an out-of-range index selects nothing (its one-hot row and
    gathered map are zero for the gradient methods, clamped for the exact ones)."""
    if targets is None:
        return
    try:
        values = np.asarray(targets)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced inside jit: nothing to read
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices; got dtype {values.dtype}")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds class index {bad}, outside the valid range [0, {num_classes}) "
            f"of a {num_classes}-class model"
        )


def _check_model_targets(model: nn.Module, targets: Any) -> None:
    if isinstance(getattr(model, "num_classes", None), int):
        check_target_range(targets, model.num_classes)


def _target_matrix(targets: Array, batch: int) -> tuple[Array, bool]:
    """``targets [B]`` or ``[B, T]`` -> (``[B, T]`` int32, whether the input was ``[B]``)."""
    targets = jnp.asarray(targets)
    if targets.ndim not in (1, 2) or targets.shape[0] != batch:
        raise ValueError(
            f"targets must have shape [batch] = [{batch}] (one class per image) or "
            f"[batch, T] (T classes per image); got {tuple(targets.shape)}"
        )
    single = targets.ndim == 1
    return (targets[:, None] if single else targets).astype(jnp.int32), single


def select_targets(maps: Array, targets: Array) -> Array:
    """Class maps per image: ``maps [B, *S, K]``, ``targets [B]`` -> ``[B, *S]``, or
    ``targets [B, T]`` -> ``[B, T, *S]``. Concrete targets must lie in ``[0, K)``
    (``check_target_range``)."""
    maps = jnp.asarray(maps)
    check_target_range(targets, maps.shape[-1])
    matrix, single = _target_matrix(targets, maps.shape[0])
    moved = jnp.moveaxis(maps, -1, 1)  # [B, K, *S]
    index = matrix.reshape(matrix.shape + (1,) * (maps.ndim - 2))
    chosen = jnp.take_along_axis(moved, index, axis=1, mode="clip")  # [B, T, *S]
    return chosen[:, 0] if single else chosen


# --------------------------------------------------------------------------------------
# Upsampling and normalisation
# --------------------------------------------------------------------------------------


def resize_maps(maps: Array, size: tuple[int, int], method: str = "bilinear") -> Array:
    """Resizes ``maps [..., h, w]`` to ``[..., H, W]`` with ``size = (H, W)`` (float32).

    ``method`` is ``"bilinear"``, ``"cubic"`` or ``"nearest"`` (``jax.image.resize``,
    half-pixel centres, so a non-square map keeps its orientation and alignment).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is not one of {RESIZE_METHODS}")
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim < 3:
        raise ValueError(f"maps must have shape [batch, (T,) h, w]; got {tuple(maps.shape)}")
    height, width = (int(s) for s in size)
    return jax.image.resize(maps, (*maps.shape[:-2], height, width), method=method)


def normalize_maps(maps: Array, map_ndim: int | None = None) -> Array:
    """Per-map min-max scaling of ``maps [*lead, *S]`` to ``[0, 1]`` (float32).

    Each of the last ``map_ndim`` axes' maps is scaled on its own (default: all axes but
    the first, i.e. one map per image of ``[B, *S]``).

    A constant map (nothing to localize) or one with a non-finite value becomes all zeros,
    never NaN, and so does its gradient.
    """
    maps = jnp.asarray(maps, jnp.float32)
    axes = tuple(range(1 if map_ndim is None else maps.ndim - map_ndim, maps.ndim))
    finite = jnp.isfinite(maps).all(axis=axes, keepdims=True)
    safe = jnp.where(finite, maps, 0.0)
    low = safe.min(axis=axes, keepdims=True)
    spread = safe.max(axis=axes, keepdims=True) - low
    usable = finite & (spread > 0)
    # Dividing by a stand-in 1 where the map is unusable keeps the unused branch finite,
    # which keeps gradients through jnp.where free of NaN.
    scaled = (safe - low) / jnp.where(usable, spread, 1.0)
    return jnp.where(usable, jnp.clip(scaled, 0.0, 1.0), 0.0)


# --------------------------------------------------------------------------------------
# Models: one call from images to maps
# --------------------------------------------------------------------------------------


class CamOutput(NamedTuple):
    """What ``compute_maps`` returns (a pytree, so it passes through ``jax.jit``).

    maps: ``[B, H, W]`` one map per image, or ``[B, T, H, W]`` for ``targets [B, T]``
      (input size when resized, in ``[0, 1]`` when normalised, else feature size and raw
      scale).
    logits: ``[B, K]`` of the (unaugmented) images.
    targets: ``[B]`` or ``[B, T]`` int32 classes the maps are for.
    """

    maps: Array
    logits: Array
    targets: Array


def _map_kinds(model: nn.Module) -> tuple[str, ...]:
    kinds = getattr(model, "map_kinds", None)
    if kinds is None or not hasattr(model, "forward_features"):
        raise ValueError(
            f"gapjax.cam needs a classifier that follows the model contract "
            f"(forward_features, forward_head, head_class_maps, head_contributions, "
            f"map_kinds; docs/ARCHITECTURE.md); {type(model).__name__} does not"
        )
    return tuple(kinds)


def available_methods(model: nn.Module) -> tuple[str, ...]:
    """The concrete methods ``model`` supports: its exact map kinds, every general one, and
    ``rollout`` where the model exposes ``forward_attention``."""
    kinds, attends = _map_kinds(model), hasattr(model, "forward_attention")
    return tuple(name for name in method_names()[1:]
                 if CAM_METHODS.get(name).exact_kind in (None, *kinds)
                 and (CAM_METHODS.get(name).needs != "attention" or attends))


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    """The concrete method for ``model``: ``auto`` -> exact CAM for a uniform (GAP) pool,
    contribution maps where the head has them (weighted, attention, a ViT's MAP head),
    except per-channel weights (GMP's exact map marks only arg-max positions, too sparse to
    localize with), Grad-CAM otherwise.

    Raises ValueError naming the method and the valid choices when ``method`` is unknown or
    is an exact kind the model's head does not support.
    """
    if method not in method_names():
        raise ValueError(f"cam method {method!r} is not one of {method_names()}")
    available = available_methods(model)
    if method == "auto":
        if "cam" in available:
            return "cam"
        # Exact contributions unless they come from per-channel one-hot weights (GMP's
        # arg-max peaks, too sparse to localize with).
        pool = getattr(model, "pool", None)
        channel = pool in POOLS and POOLS.get(pool).weighting == "channel"
        if "contribution" in available and not channel:
            return "contribution"
        return "grad_cam"
    if method not in available:
        raise ValueError(
            f"cam method {method!r} does not apply to {type(model).__name__} with pool="
            f"{getattr(model, 'pool', None)!r} (map_kinds={_map_kinds(model)}); "
            f"choose one of: {', '.join(('auto', *available))}"
        )
    return method


def _raw_maps(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    targets: Array | None,
    spec: CamMethod,
    relu: bool,
    eigen_smooth: bool,
    channel_chunk: int,
    on_chunk: Callable[[int, int], None] | None,
) -> tuple[Array, Array, Array]:
    """``(maps [B, T, h, w], logits [B, K], targets [B, T])`` at feature resolution."""
    features = model.apply(variables, images, train=False, method="forward_features")

    def head_fn(x: Array) -> Array:
        return model.apply(variables, x, train=False, method="forward_head")

    if spec.needs == "gradients":
        logits, pullback = jax.vjp(head_fn, features)
    else:
        logits = head_fn(features)
    logits = jnp.asarray(logits, jnp.float32)
    if targets is None:
        targets = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
    spatial_ndim = features.ndim - 2

    if spec.needs == "exact":
        entry = {"cam": "head_class_maps", "contribution": "head_contributions"}[spec.exact_kind]
        maps = select_targets(model.apply(variables, features, method=entry), targets)
    elif spec.needs in ("features", "attention"):  # class-agnostic
        if spec.needs == "features":
            agnostic = eigen_cam_map(features)
        else:
            attentions, readout = model.apply(variables, images, method="forward_attention")
            agnostic = attention_rollout(attentions, readout, features.shape[1:-1])
        maps = jnp.broadcast_to(agnostic[:, None], (targets.shape[0], targets.shape[1],
                                                    *agnostic.shape[1:]))
    else:
        if spec.needs == "gradients":
            cotangents = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
            (gradients,) = jax.vmap(pullback, in_axes=1, out_axes=1)(cotangents)
            terms = spec.terms(features, gradients)
        elif spec.needs == "head":
            terms = weighted_terms(
                features, ablation_cam_weights(features, targets, head_fn, channel_chunk, on_chunk))
        else:  # "model"

            def model_fn(x: Array) -> Array:
                return model.apply(variables, x, train=False)

            terms = weighted_terms(features, score_cam_weights(
                features, images, targets, model_fn, channel_chunk, on_chunk))
        maps = reduce_terms(terms, spatial_ndim, eigen_smooth)
    if spec.rectified and relu:
        maps = jax.nn.relu(maps)
    return maps, logits, targets


def _finish(maps: Array, size: tuple[int, int], resize: str | None, normalize: bool) -> Array:
    if resize is not None:
        maps = resize_maps(maps, size, resize)
    if normalize:
        maps = normalize_maps(maps, map_ndim=2)
    return maps


def compute_maps(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    targets: Array | None = None,
    method: str = "auto",
    resize: str | None = "bilinear",
    normalize: bool = True,
    relu: bool = True,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    channel_chunk: int = DEFAULT_CHANNEL_CHUNK,
    on_chunk: Callable[[int, int], None] | None = None,
) -> CamOutput:
    """Maps of ``model`` (eval mode) for ``images [B, H, W, C]``.

    Args:
      model, variables: a classifier following the model contract.
      targets: ``[B]`` class per image, ``[B, T]`` several classes per image, or None for
        each image's predicted class. Concrete indices are checked against ``[0, K)``.
      method: ``"auto"`` (see ``resolve_method``) or a ``METHODS`` name.
      resize: interpolation to the input size (``RESIZE_METHODS``) or None to keep the
        feature-map size.
      normalize: per-map min-max to ``[0, 1]`` (constant maps -> zeros, never NaN).
      relu: the ReLU every non-exact method ends with (as pytorch-grad-cam); ``False``
        keeps the signed map. The exact ``cam`` / ``contribution`` maps are never rectified.
      aug_smooth: test-time augmentation smoothing: the maps of the horizontally flipped and
        brightness-scaled (0.9, 1, 1.1) images, flipped back and averaged (each normalised
        first when ``normalize``), all six in one batched call. The targets are the
        unaugmented images' (predicted when None).
      eigen_smooth: replace the channel sum of the channel terms by their first principal
        component (not for ``cam`` / ``contribution`` / ``rollout``, whose maps come whole).
      channel_chunk: channels per batched model call in Score-CAM / Ablation-CAM.
      on_chunk: for Score-CAM / Ablation-CAM, called on the host with ``(index, n_chunks)``
        as each batched call finishes (progress on long maps); None: no callback.

    Returns ``CamOutput(maps, logits, targets)``. Jit it with the model and options static,
    e.g. ``make_map_fn(model, "grad_cam_pp")``: each method compiles once per shape.
    """
    method = resolve_method(model, method)
    spec = CAM_METHODS.get(method)
    if eigen_smooth and spec.needs in WHOLE_MAPS:
        raise ValueError(
            f"eigen_smooth applies to methods with channel terms, not {method!r}; choose one of "
            f"{tuple(n for n in method_names()[1:] if CAM_METHODS.get(n).needs not in WHOLE_MAPS)}")
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [batch, H, W, C]; got {tuple(images.shape)}")
    batch, size = images.shape[0], images.shape[1:3]
    single = True
    if targets is not None:
        matrix, single = _target_matrix(targets, batch)
        _check_model_targets(model, targets)
    else:
        matrix = None
    run = functools.partial(_raw_maps, model, variables, spec=spec, relu=relu,
                            eigen_smooth=eigen_smooth, channel_chunk=channel_chunk,
                            on_chunk=on_chunk)

    if not aug_smooth:
        maps, logits, matrix = run(images, matrix)
        maps = _finish(maps, size, resize, normalize)
    else:
        flips, factors = AUGMENTATION_FLIPS, AUGMENTATION_FACTORS
        if matrix is None:
            plain = model.apply(variables, images, train=False)
            matrix = jnp.argmax(plain, axis=-1)[:, None].astype(jnp.int32)
        augmented = jnp.concatenate([
            (jnp.flip(images, axis=2) if flip else images) * jnp.asarray(factor, images.dtype)
            for flip in flips for factor in factors])
        count = len(flips) * len(factors)
        maps, logits, _ = run(augmented, jnp.tile(matrix, (count, 1)))
        maps = maps.reshape(count, batch, *maps.shape[1:])
        logits = logits.reshape(count, batch, -1)[flips.index(False) * len(factors)
                                                  + factors.index(1.0)]
        maps = _finish(maps.reshape(count * batch, *maps.shape[2:]), size, resize, normalize)
        maps = maps.reshape(count, batch, *maps.shape[1:])
        flipped = np.repeat(np.asarray(flips), len(factors))
        maps = jnp.where(flipped.reshape(count, *(1,) * (maps.ndim - 1)),
                         jnp.flip(maps, axis=-1), maps).mean(axis=0)
        if normalize:
            maps = normalize_maps(maps, map_ndim=2)
    if single:
        maps, matrix = maps[:, 0], matrix[:, 0]
    return CamOutput(maps=maps, logits=logits, targets=matrix)


def make_map_fn(model: nn.Module, method: str = "auto", **options: Any) -> Callable[..., CamOutput]:
    """A jitted ``fn(variables, images, targets=None) -> CamOutput`` for ``model``.

    ``options`` are ``compute_maps``'s keyword arguments (``resize``, ``normalize``,
    ``relu``, ``aug_smooth``, ``eigen_smooth``, ``channel_chunk``, ``on_chunk``). The method
    is resolved now, so a bad choice fails before any tracing. Concrete out-of-range targets are
    rejected before the jitted call (inside it they cannot be read).
    """
    method = resolve_method(model, method)

    @jax.jit
    def map_fn(variables, images, targets=None):
        return compute_maps(model, variables, images, targets, method=method, **options)

    def checked(variables, images, targets=None):
        _check_model_targets(model, targets)
        return map_fn(variables, images, targets)

    checked.jitted = map_fn  # the compiled function, e.g. for its cache size
    return checked
