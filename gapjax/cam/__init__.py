"""Class activation maps: where a classifier looked, from the feature map it pooled.

For a GAP head the class score is a spatial mean, ``logit_k = mean_i (W_k . x_i) + b_k``,
so ``W_k . x_i`` is an exact per-location map whose mean is the logit (CAM). Every pool
that is linear in ``x`` once its position weights are fixed splits the same way into
contributions ``w_i (W_k . x_i)`` that *sum* to the logit (weighted and attention pools,
and GMP with one-hot weights per channel). Heads without such a split (GeM, LSE, a
flatten + dense head) get Grad-CAM, taken with ``jax.vjp`` at the feature layer.

Layout: features ``[B, h, w, C]`` (any number of spatial axes works for the pure maps),
classifier kernel ``[C, K]``, maps ``[B, h, w, K]`` for all classes or ``[B, h, w]`` for one
target class per image. Everything is batched, jit-able and float32.

The one-call helper ``compute_maps(model, variables, images, targets=None, method="auto")``
relies on the models' feature switch (docs/ARCHITECTURE.md): the classifier sows its
pre-pool map as ``intermediates/features``, its head is the submodule ``head`` whose final
Dense is ``classifier``, and weighted / attention heads sow ``pool_weights``. One forward
pass gives logits, features and pool weights; Grad-CAM adds one backward pass through the
head only.

``python -m gapjax.cam --workdir DIR [--split test] [--num 16] [--out cams.png]`` draws
images, heat-map overlays, predicted and true boxes from a trained run's latest checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.pooling import POOLS

Array = jax.Array

#: Map methods. ``auto`` picks the exact one a model's head allows, else Grad-CAM.
METHODS = ("auto", "cam", "contribution", "gmp", "grad_cam")
#: Interpolations accepted by ``resize_maps`` (``jax.image.resize`` names).
RESIZE_METHODS = ("bilinear", "cubic", "nearest")

# Exact products: on accelerators the default matmul precision (bf16 passes) would break
# the 1e-5 additivity that makes these maps trustworthy.
_EXACT = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Pure maps
# --------------------------------------------------------------------------------------


def _check_kernel(features: Array, kernel: Array, bias: Array | None) -> None:
    if features.ndim < 3:
        raise ValueError(
            "features must have shape [batch, *spatial, channels] (e.g. [B, h, w, C]); "
            f"got shape {tuple(features.shape)}"
        )
    if kernel.ndim != 2 or kernel.shape[0] != features.shape[-1]:
        raise ValueError(
            f"kernel must have shape [channels, classes] = [{features.shape[-1]}, K] to "
            f"match features of shape {tuple(features.shape)}; got {tuple(kernel.shape)}"
        )
    if bias is not None and tuple(jnp.shape(bias)) != (kernel.shape[1],):
        raise ValueError(
            f"bias must have shape [classes] = [{kernel.shape[1]}]; got {tuple(jnp.shape(bias))}"
        )


def _project(features: Array, kernel: Array) -> Array:
    """``W_k . x_i`` for every position and class: ``[B, *S, C] x [C, K] -> [B, *S, K]``."""
    return jnp.einsum(
        "...c,ck->...k",
        features.astype(jnp.float32),
        kernel.astype(jnp.float32),
        precision=_EXACT,
    )


def class_activation_map(features: Array, kernel: Array, bias: Array | None = None) -> Array:
    """CAM of a GAP + dense head: ``[B, h, w, C], [C, K] -> [B, h, w, K]`` (float32).

    ``maps[b, i, j, k] = W[:, k] . features[b, i, j]``, so for a head computing
    ``logits = mean_ij(features) @ W + bias``, ``maps.mean((1, 2)) + bias == logits`` up to
    float rounding (any spatial shape, square or not).

    ``bias [K]`` is accepted so the Dense parameters can be passed whole
    (``class_activation_map(f, **params["head"]["classifier"])``); it is checked for shape
    and deliberately not added: a constant shift says nothing about location.
    """
    features, kernel = jnp.asarray(features), jnp.asarray(kernel)
    _check_kernel(features, kernel, bias)
    return _project(features, kernel)


def contribution_map(
    features: Array, weights: Array, kernel: Array, bias: Array | None = None
) -> Array:
    """Per-location contributions of a weighted pool + dense head: ``[B, *S, K]`` (float32).

    Args:
      features: ``[B, *S, C]`` pre-pool features.
      weights: ``[B, *S]`` the pool's position weights, normalised as the pool used them
        (summing to one for weighted and attention pools, ``1/N`` each for GAP).
      kernel: ``[C, K]`` classifier kernel. ``bias`` (``[K]``) is checked, not added.

    Returns ``weights_i * (W_k . x_i)``; summed over positions it equals ``logits - bias``.
    """
    features, kernel, weights = jnp.asarray(features), jnp.asarray(kernel), jnp.asarray(weights)
    _check_kernel(features, kernel, bias)
    if tuple(weights.shape) != tuple(features.shape[:-1]):
        raise ValueError(
            f"weights must have shape [batch, *spatial] = {tuple(features.shape[:-1])} to "
            f"match features; got {tuple(weights.shape)}"
        )
    return weights.astype(jnp.float32)[..., None] * _project(features, kernel)


def gmp_contribution_map(features: Array, kernel: Array, bias: Array | None = None) -> Array:
    """Per-location contributions of a GMP + dense head: ``[B, *S, C] -> [B, *S, K]``.

    GMP is a weighted pool whose weights are one-hot at each channel's arg max, so position
    ``i`` contributes ``sum_c [i = argmax_c] x_ic W_ck`` and the map sums exactly to
    ``logits - bias``. Ties go to the first maximal position in row-major order, the
    same rule as ``gapjax.pooling.gmp``'s gradient. The map is zero away from the arg-max
    positions, so it marks peaks rather than extents.
    """
    features, kernel = jnp.asarray(features), jnp.asarray(kernel)
    _check_kernel(features, kernel, bias)
    batch, channels = features.shape[0], features.shape[-1]
    flat = features.astype(jnp.float32).reshape(batch, -1, channels)
    winner = jnp.argmax(flat, axis=1)  # [B, C]
    is_winner = jnp.arange(flat.shape[1])[None, :, None] == winner[:, None, :]
    peaks_only = jnp.where(is_winner, flat, 0.0).reshape(features.shape)
    return _project(peaks_only, kernel)


def grad_cam_from_gradients(features: Array, gradients: Array, relu: bool = True) -> Array:
    """Grad-CAM from features and the target logit's gradient: ``[B, *S, C] -> [B, *S]``.

    Channel weights are the gradients averaged over positions,
    ``alpha_c = mean_i d logit / d x_ic``, and the map is ``sum_c alpha_c x_ic``, passed
    through a ReLU when ``relu`` (Selvaraju et al.). For a GAP + dense head
    ``alpha_c = W_ck / N``, so the map is the CAM divided by ``N`` (then ReLU'd).
    """
    features = jnp.asarray(features, jnp.float32)
    gradients = jnp.asarray(gradients, jnp.float32)
    if features.shape != gradients.shape:
        raise ValueError(
            f"gradients must have the shape of features {tuple(features.shape)}; "
            f"got {tuple(gradients.shape)}"
        )
    spatial_axes = tuple(range(1, features.ndim - 1))
    alpha = gradients.mean(axis=spatial_axes, keepdims=True)
    maps = (features * alpha).sum(axis=-1)
    return jax.nn.relu(maps) if relu else maps


def grad_cam(
    head_fn: Callable[[Array], Array],
    features: Array,
    targets: Array | None = None,
    relu: bool = True,
) -> tuple[Array, Array]:
    """Grad-CAM for any head: ``head_fn(features [B, *S, C]) -> logits [B, K]``.

    One forward and one backward pass through ``head_fn`` (``jax.vjp``) give every image's
    gradient of its own target logit, because images do not interact in a head at
    inference. ``targets [B]`` (int) picks a class per image; None takes the arg max.

    Returns ``(maps [B, *S], logits [B, K])``.
    """
    features = jnp.asarray(features)
    logits, pullback = jax.vjp(head_fn, features)
    targets = _targets_or_predictions(targets, logits)
    (gradients,) = pullback(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return grad_cam_from_gradients(features, gradients, relu), logits


def select_targets(maps: Array, targets: Array) -> Array:
    """One class per image: ``maps [B, *S, K]``, ``targets [B]`` (int) -> ``[B, *S]``."""
    maps, targets = jnp.asarray(maps), jnp.asarray(targets)
    if targets.shape != (maps.shape[0],):
        raise ValueError(
            f"targets must have shape [batch] = [{maps.shape[0]}] (one class index per "
            f"image); got {tuple(targets.shape)}"
        )
    index = targets.astype(jnp.int32).reshape((-1,) + (1,) * (maps.ndim - 1))
    return jnp.take_along_axis(maps, index, axis=-1)[..., 0]


def _targets_or_predictions(targets: Array | None, logits: Array) -> Array:
    if targets is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    targets = jnp.asarray(targets)
    if targets.shape != (logits.shape[0],):
        raise ValueError(
            f"targets must have shape [batch] = [{logits.shape[0]}] (one class index per "
            f"image); got {tuple(targets.shape)}"
        )
    return targets.astype(jnp.int32)


# --------------------------------------------------------------------------------------
# Upsampling and normalisation
# --------------------------------------------------------------------------------------


def resize_maps(maps: Array, size: tuple[int, int], method: str = "bilinear") -> Array:
    """Resizes ``maps [B, h, w]`` to ``[B, H, W]`` with ``size = (H, W)`` (float32).

    ``method`` is ``"bilinear"``, ``"cubic"`` or ``"nearest"`` (``jax.image.resize``,
    half-pixel centres, so a non-square map keeps its orientation and alignment).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is not one of {RESIZE_METHODS}")
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape [batch, h, w]; got {tuple(maps.shape)}")
    height, width = (int(s) for s in size)
    return jax.image.resize(maps, (maps.shape[0], height, width), method=method)


def normalize_maps(maps: Array) -> Array:
    """Per-image min-max scaling of ``maps [B, *S]`` to ``[0, 1]`` (float32).

    A constant map (nothing to localize) or one with a non-finite value becomes all zeros,
    never NaN, and so does its gradient.
    """
    maps = jnp.asarray(maps, jnp.float32)
    axes = tuple(range(1, maps.ndim))
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

    maps: ``[B, H, W]`` one map per image (input size when resized, in ``[0, 1]`` when
      normalised, else feature size and raw scale).
    logits: ``[B, K]`` from the same forward pass.
    targets: ``[B]`` int32 class each map is for.
    """

    maps: Array
    logits: Array
    targets: Array


def _model_pool(model: nn.Module) -> str | None:
    pool = getattr(model, "pool", None)
    return POOLS.canonical(pool) if isinstance(pool, str) and pool in POOLS else None


def available_methods(model: nn.Module) -> tuple[str, ...]:
    """The concrete map methods ``model``'s head supports (Grad-CAM always)."""
    head, pool = getattr(model, "head", None), _model_pool(model)
    methods = []
    if head == "gap":
        if pool == "gap":
            methods += ["cam", "contribution"]
        elif pool in ("weighted", "attention"):
            methods += ["contribution"]
        elif pool == "gmp":
            methods += ["gmp"]
    return (*methods, "grad_cam")


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    """The concrete method for ``model``: ``auto`` -> exact CAM for a GAP head, contribution
    maps for weighted / attention heads, Grad-CAM for everything else.

    Raises ValueError naming the method and the model's valid choices when a requested
    exact method does not apply to its head.
    """
    if method not in METHODS:
        raise ValueError(f"cam method {method!r} is not one of {METHODS}")
    available = available_methods(model)
    if method == "auto":
        # GMP's exact map marks only arg-max positions, too sparse to localize with.
        return available[0] if available[0] in ("cam", "contribution") else "grad_cam"
    if method not in available:
        raise ValueError(
            f"cam method {method!r} does not apply to a model with head="
            f"{getattr(model, 'head', None)!r} and pool={getattr(model, 'pool', None)!r}; "
            f"choose one of: {', '.join(('auto', *available))}"
        )
    return method


def _find_sown(tree: Any, name: str, under: str | None = None) -> Array | None:
    """The first value sown as ``name`` (inside a module called ``under``, if given)."""
    if not isinstance(tree, Mapping):
        return None
    if under is None and name in tree:
        value = tree[name]
        return value[0] if isinstance(value, tuple | list) else value
    for key, child in tree.items():
        found = _find_sown(child, name, None if key == under else under)
        if found is not None:
            return found
    return None


def _sown_features(intermediates: Any) -> Array:
    features = _find_sown(intermediates, "features")
    if features is None:
        raise ValueError(
            "the model sowed no 'features' in the 'intermediates' collection; CAM needs the "
            "feature switch self.sow('intermediates', 'features', f) (docs/ARCHITECTURE.md)"
        )
    return features


def _classifier_params(variables: Mapping[str, Any]) -> tuple[Array, Array | None]:
    try:
        dense = variables["params"]["head"]["classifier"]
    except KeyError as missing:
        raise ValueError(
            "exact CAM needs the classifier at variables['params']['head']['classifier'] "
            f"(missing key {missing}); use method='grad_cam' for other heads"
        ) from None
    return dense["kernel"], dense.get("bias")


def _forward(model, variables, images, feature_shift=None):
    """``model.apply`` in eval mode with the feature switch on.

    ``feature_shift`` (the features' shape) is added to the input of the submodule named
    ``head`` (the sown features); differentiating with respect to it gives the gradient at
    the feature layer while the trunk runs forward once and is never differentiated.
    """

    def shift_head_input(next_fun, args, kwargs, context):
        if context.module.name != "head" or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        head_input, *rest = args
        if head_input.shape != feature_shift.shape:
            raise ValueError(
                f"the head's input {tuple(head_input.shape)} is not the sown feature map "
                f"{tuple(feature_shift.shape)}; Grad-CAM needs the head to take the features"
            )
        return next_fun(head_input + feature_shift.astype(head_input.dtype), *rest, **kwargs)

    def run():
        return model.apply(variables, images, train=False, mutable=["intermediates"])

    if feature_shift is None:
        logits, state = run()
    else:
        with nn.intercept_methods(shift_head_input):
            logits, state = run()
    return logits.astype(jnp.float32), state["intermediates"]


def compute_maps(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    targets: Array | None = None,
    method: str = "auto",
    resize: str | None = "bilinear",
    normalize: bool = True,
    relu: bool = True,
) -> CamOutput:
    """Maps for ``images [B, H, W, C]``: one forward pass of ``model`` (eval mode).

    Args:
      model, variables: a classifier following the feature switch of docs/ARCHITECTURE.md.
      targets: ``[B]`` class per image; None = each image's predicted class.
      method: ``"auto"`` (exact CAM for GAP heads, contribution maps for weighted /
        attention heads, Grad-CAM otherwise) or one of ``available_methods(model)``.
      resize: interpolation to the input size (``RESIZE_METHODS``) or None to keep the
        feature-map size.
      normalize: per-image min-max to ``[0, 1]`` (constant maps -> zeros).
      relu: Grad-CAM's ReLU (ignored by the exact methods).

    Jit it with the model and the options static, e.g.
    ``jax.jit(functools.partial(compute_maps, model, method="auto"))``.
    """
    method = resolve_method(model, method)
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [batch, H, W, C]; got {tuple(images.shape)}")

    if method == "grad_cam":
        _, shapes = jax.eval_shape(lambda: _forward(model, variables, images))
        feature_shape = _sown_features(shapes).shape
        zero_shift = jnp.zeros(feature_shape, jnp.float32)
        logits, pullback, intermediates = jax.vjp(
            lambda shift: _forward(model, variables, images, shift), zero_shift, has_aux=True
        )
        targets = _targets_or_predictions(targets, logits)
        (gradients,) = pullback(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
        maps = grad_cam_from_gradients(_sown_features(intermediates), gradients, relu)
    else:
        logits, intermediates = _forward(model, variables, images)
        targets = _targets_or_predictions(targets, logits)
        features = _sown_features(intermediates)
        kernel, bias = _classifier_params(variables)
        if method == "cam":
            all_maps = class_activation_map(features, kernel, bias)
        elif method == "gmp":
            all_maps = gmp_contribution_map(features, kernel, bias)
        else:
            weights = _find_sown(intermediates, "pool_weights", under="head")
            if weights is None:  # a GAP head: uniform weights
                weights = jnp.full(features.shape[:-1], 1.0 / np.prod(features.shape[1:-1]))
            all_maps = contribution_map(features, weights, kernel, bias)
        maps = select_targets(all_maps, targets)

    if resize is not None:
        maps = resize_maps(maps, images.shape[1:3], resize)
    if normalize:
        maps = normalize_maps(maps)
    return CamOutput(maps=maps, logits=logits, targets=targets)


def make_map_fn(model: nn.Module, method: str = "auto", **options: Any) -> Callable[..., CamOutput]:
    """A jitted ``fn(variables, images, targets=None) -> CamOutput`` for ``model``.

    ``options`` are ``compute_maps``'s keyword arguments (``resize``, ``normalize``,
    ``relu``). The method is resolved now, so a bad choice fails before any tracing.
    """
    method = resolve_method(model, method)

    @jax.jit
    def map_fn(variables, images, targets=None):
        return compute_maps(model, variables, images, targets, method=method, **options)

    return map_fn


# --------------------------------------------------------------------------------------
# Command-line helpers live in gapjax.cam.cli; re-exported here lazily (no import cycle)
# --------------------------------------------------------------------------------------

_CLI_NAMES = ("load_run", "box_patch", "display_image", "draw_overlays", "main")


def __getattr__(name: str) -> Any:
    if name in _CLI_NAMES:
        from gapjax.cam import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'gapjax.cam' has no attribute {name!r}")
