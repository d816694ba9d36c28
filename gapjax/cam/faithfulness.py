"""Faithfulness of saliency maps: does the model's score follow the pixels a map ranks first?

A map is faithful when the pixels it ranks highest are the ones the model's target score
depends on. Four families of checks, all batched over images and jit-able (the model enters
as ``model_fn(images [N, H, W, C]) -> logits [N, K]``, static under ``jax.jit``):

* **Deletion / insertion** (Petsiuk et al., RISE, BMVC 2018): remove the most salient
  pixels first (replaced by a baseline, zeros by default) and record the target
  probability at ``steps + 1`` evenly spaced fractions of the image; insertion starts from a
  blurred image (Gaussian, kernel 11, sigma 5) and puts the most salient pixels back first.
  The area under the curve (trapezoid over fractions ``0..1``) is the score: **lower is
  better for deletion, higher for insertion**.
* **ROAD** (Rong et al., ICML 2022, "remove and debias"): remove a fraction of the pixels,
  most relevant first (MoRF) or least relevant first (LeRF), and fill them with the *noisy
  linear imputation*: each removed pixel equals the weighted mean of its 8 neighbours
  (weights 1/6 for the 4 direct ones, 1/12 for the diagonals, the image border excluded),
  solved jointly for all removed pixels, plus Gaussian noise (std ``noise``). The imputed
  values carry no information about where pixels were removed, unlike a constant fill. The
  score change ``score(imputed) - score(image)`` is recorded at each percentile
  ``p`` (pixels below the ``p``-th percentile of the map are kept for MoRF, above the
  ``(100-p)``-th of ``1 - map`` for LeRF, as pytorch-grad-cam's ``ROADMostRelevantFirst``
  / ``ROADLeastRelevantFirst``); the combined score ``mean_p(LeRF - MoRF) / 2`` is **higher
  for a more faithful map**. The sparse system is solved matrix-free with Jacobi-
  preconditioned conjugate gradients (symmetric positive definite once any neighbour of a
  removed region is kept), batched with ``vmap``.
* **Average drop / increase in confidence** (Chattopadhyay et al., Grad-CAM++, WACV 2018):
  the image multiplied by the map in ``[0, 1]``; drop ``max(0, Y - O) / Y`` (lower is
  better) and increase ``[O > Y]`` (higher is better), ``Y`` and ``O`` the target
  probabilities of the image and of the masked image.

Scores are the softmax probability of the target class (``score="probability"``) or its
logit (``score="logit"``). Maps are ``[B, H, W]`` at the image size (``gapjax.cam``'s
``compute_maps(..., resize="bilinear", normalize=True)``); pixel ranks break ties by
position (row-major), so a binary map removes its pixels in a fixed order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array], Array]

SCORES = ("probability", "logit")
BASELINES = ("zero", "blur", "mean")
#: ROAD's percentiles, as the paper and pytorch-grad-cam's averagers.
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
#: Neighbour weights of the noisy linear imputation: (row offset, column offset, weight).
NEIGHBOUR_WEIGHTS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
                     (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))
_EXACT = jax.lax.Precision.HIGHEST


def _check(choice: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{choice}={value!r} is not one of {choices}")


def _check_inputs(images: Array, maps: Array, targets: Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape [batch, H, W, C]; got {tuple(images.shape)}")
    if tuple(maps.shape) != tuple(images.shape[:3]):
        raise ValueError(
            f"maps must have shape [batch, H, W] = {tuple(images.shape[:3])} (resized to the "
            f"images); got {tuple(maps.shape)}"
        )
    if tuple(targets.shape) != (images.shape[0],):
        raise ValueError(
            f"targets must have shape [batch] = [{images.shape[0]}]; got {tuple(targets.shape)}"
        )


def target_scores(model_fn: ModelFn, images: Array, targets: Array,
                  score: str = "probability") -> Array:
    """``[N]`` float32 target probabilities (or logits) of ``images [N, H, W, C]``."""
    _check("score", score, SCORES)
    logits = jnp.asarray(model_fn(images), jnp.float32)
    if score == "probability":
        logits = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(logits, targets.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def saliency_ranks(maps: Array) -> Array:
    """``[B, H, W]`` rank of each pixel, 0 for the most salient (ties: row-major order)."""
    flat = jnp.asarray(maps, jnp.float32).reshape(maps.shape[0], -1)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return ranks.reshape(maps.shape).astype(jnp.int32)


def _gaussian_matrix(size: int, kernel: int = 11, sigma: float = 5.0) -> np.ndarray:
    """``[size, size]`` 1-D Gaussian blur with reflected borders (rows sum to 1)."""
    half = kernel // 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    taps /= taps.sum()
    matrix = np.zeros((size, size))
    for offset, tap in zip(range(-half, half + 1), taps):
        for row in range(size):
            col = row + offset
            period = max(2 * size - 2, 1)
            col = col % period if size > 1 else 0
            col = period - col if col >= size else col
            matrix[row, col] += tap
    return matrix.astype(np.float32)


def blur(images: Array, kernel: int = 11, sigma: float = 5.0) -> Array:
    """Separable Gaussian blur of ``images [B, H, W, C]`` (RISE's insertion baseline)."""
    images = jnp.asarray(images, jnp.float32)
    rows = jnp.asarray(_gaussian_matrix(images.shape[1], kernel, sigma))
    cols = jnp.asarray(_gaussian_matrix(images.shape[2], kernel, sigma))
    return jnp.einsum("Hh,Ww,bhwc->bHWc", rows, cols, images, precision=_EXACT)


def _baseline(images: Array, kind: str) -> Array:
    _check("baseline", kind, BASELINES)
    if kind == "zero":
        return jnp.zeros_like(images)
    if kind == "mean":
        return jnp.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)
    return blur(images).astype(images.dtype)


def _curve(model_fn: ModelFn, images: Array, maps: Array, targets: Array, steps: int,
           start: Array, end: Array, score: str) -> Array:
    """Scores ``[B, steps + 1]`` as the most salient pixels go from ``start`` to ``end``."""
    ranks = saliency_ranks(maps)[..., None]
    pixels = maps.shape[1] * maps.shape[2]
    counts = jnp.round(jnp.arange(steps + 1) * pixels / steps).astype(jnp.int32)

    def at(count: Array) -> Array:
        mixed = jnp.where(ranks < count, end, start)
        return target_scores(model_fn, mixed, targets, score)

    return jnp.moveaxis(jax.lax.map(at, counts), 0, 1)


def area_under_curve(curve: Array) -> Array:
    """Trapezoid area of ``curve [B, S + 1]`` sampled at fractions ``0, 1/S, ..., 1``: ``[B]``."""
    curve = jnp.asarray(curve, jnp.float32)
    return 0.5 * (curve[:, 1:] + curve[:, :-1]).mean(axis=-1)


def deletion_curve(model_fn: ModelFn, images: Array, maps: Array, targets: Array,
                   steps: int = 16, baseline: str = "zero",
                   score: str = "probability") -> Array:
    """Target scores ``[B, steps + 1]`` as the most salient pixels are replaced by the
    ``baseline`` ("zero", "blur" or "mean"), fraction ``k / steps`` at step ``k``."""
    images, maps, targets = jnp.asarray(images), jnp.asarray(maps), jnp.asarray(targets)
    _check_inputs(images, maps, targets)
    return _curve(model_fn, images, maps, targets, steps, images,
                  _baseline(images, baseline), score)


def insertion_curve(model_fn: ModelFn, images: Array, maps: Array, targets: Array,
                    steps: int = 16, baseline: str = "blur",
                    score: str = "probability") -> Array:
    """Target scores ``[B, steps + 1]`` as the most salient pixels of the image are put
    back into the ``baseline`` (a blurred copy by default)."""
    images, maps, targets = jnp.asarray(images), jnp.asarray(maps), jnp.asarray(targets)
    _check_inputs(images, maps, targets)
    return _curve(model_fn, images, maps, targets, steps, _baseline(images, baseline),
                  images, score)


def deletion_auc(model_fn: ModelFn, images: Array, maps: Array, targets: Array,
                 steps: int = 16, baseline: str = "zero", score: str = "probability") -> Array:
    """``[B]`` area under the deletion curve (lower = more faithful)."""
    return area_under_curve(deletion_curve(model_fn, images, maps, targets, steps, baseline,
                                           score))


def insertion_auc(model_fn: ModelFn, images: Array, maps: Array, targets: Array,
                  steps: int = 16, baseline: str = "blur", score: str = "probability") -> Array:
    """``[B]`` area under the insertion curve (higher = more faithful)."""
    return area_under_curve(insertion_curve(model_fn, images, maps, targets, steps, baseline,
                                            score))


# --------------------------------------------------------------------------------------
# ROAD: noisy linear imputation
# --------------------------------------------------------------------------------------


def _neighbour_sum(values: Array) -> Array:
    """``sum_offsets w * values[shifted]`` with zeros beyond the border: ``[H, W, ...]``."""
    padded = jnp.pad(values, ((1, 1), (1, 1)) + ((0, 0),) * (values.ndim - 2))
    height, width = values.shape[:2]
    total = jnp.zeros_like(values)
    for row, col, weight in NEIGHBOUR_WEIGHTS:  # 8 static offsets, not a loop over pixels
        total = total + weight * padded[1 + row:1 + row + height, 1 + col:1 + col + width]
    return total


def _impute_one(image: Array, removed: Array, max_iterations: int, tolerance: float) -> Array:
    """Linear imputation of one ``image [H, W, C]`` at ``removed [H, W]`` pixels."""
    removed_f = removed.astype(jnp.float32)[..., None]
    kept = 1.0 - removed_f
    degree = _neighbour_sum(jnp.ones((*removed.shape, 1), jnp.float32))  # valid weights

    def system(x: Array) -> Array:
        x = removed_f * x
        return removed_f * (degree * x - _neighbour_sum(x))

    rhs = removed_f * _neighbour_sum(kept * image)

    def preconditioner(x: Array) -> Array:
        return removed_f * x / degree

    solution, _ = jax.scipy.sparse.linalg.cg(
        system, rhs, x0=jnp.zeros_like(image), tol=tolerance, maxiter=max_iterations,
        M=preconditioner)
    return jnp.where(removed[..., None], solution, image)


def noisy_linear_imputation(images: Array, removed: Array, key: Array, noise: float = 0.01,
                            max_iterations: int | None = None,
                            tolerance: float = 1e-6) -> Array:
    """ROAD's imputation: ``images [B, H, W, C]`` with the ``removed [B, H, W]`` (bool)
    pixels replaced by the weighted mean of their 8 neighbours (the linear system of all
    removed pixels at once) plus ``noise * N(0, 1)``. A removed region with no kept
    neighbour gets 0 (+ noise). ``max_iterations`` of conjugate gradients default to
    ``4 * (H + W)``; each solve stops once the residual is ``tolerance`` times the
    right-hand side."""
    images = jnp.asarray(images, jnp.float32)
    removed = jnp.asarray(removed, bool)
    if removed.shape != images.shape[:3]:
        raise ValueError(f"removed must have shape [batch, H, W] = {tuple(images.shape[:3])}; "
                         f"got {tuple(removed.shape)}")
    iterations = max_iterations or 4 * (images.shape[1] + images.shape[2])
    filled = jax.vmap(functools.partial(_impute_one, max_iterations=iterations,
                                        tolerance=tolerance))(images, removed)
    jitter = noise * jax.random.normal(key, images.shape, jnp.float32)
    return jnp.where(removed[..., None], filled + jitter, images)


def _percentile_keep(maps: Array, percentile: Array) -> Array:
    """``maps < percentile(maps)`` per image, NumPy's linear interpolation: ``[B, H, W]``."""
    flat = maps.reshape(maps.shape[0], -1)
    threshold = jnp.percentile(flat, percentile, axis=-1, method="linear")
    return maps < threshold[:, None, None]


class RoadScores(NamedTuple):
    """ROAD per image and percentile (score after imputation minus before).

    morf / lerf: ``[B, P]`` most / least relevant first (MoRF lower and LeRF higher = more
    faithful). combined: ``[B]`` ``mean_p(lerf - morf) / 2`` (higher = more faithful).
    """

    morf: Array
    lerf: Array
    combined: Array


def road(model_fn: ModelFn, images: Array, maps: Array, targets: Array, key: Array,
         percentiles: tuple[int, ...] = ROAD_PERCENTILES, noise: float = 0.01,
         score: str = "probability", max_iterations: int | None = None) -> RoadScores:
    """ROAD scores of ``maps [B, H, W]`` for ``images [B, H, W, C]`` and ``targets [B]``.

    At each percentile ``p`` MoRF keeps the pixels whose map value is below the map's
    ``p``-th percentile and imputes the rest; LeRF does the same with ``1 - map``. One
    batched imputation and model call per percentile (``lax.map``); ``key`` seeds the
    imputation noise.
    """
    images, maps, targets = jnp.asarray(images), jnp.asarray(maps, jnp.float32), \
        jnp.asarray(targets)
    _check_inputs(images, maps, targets)
    before = target_scores(model_fn, images, targets, score)
    batch = images.shape[0]

    def at(args: tuple[Array, Array]) -> Array:
        percentile, step_key = args
        removed = jnp.concatenate([~_percentile_keep(maps, percentile),
                                   ~_percentile_keep(1.0 - maps, percentile)])
        imputed = noisy_linear_imputation(jnp.concatenate([images, images]), removed,
                                          step_key, noise, max_iterations)
        after = target_scores(model_fn, imputed, jnp.concatenate([targets, targets]), score)
        return after.reshape(2, batch) - before[None]

    levels = jnp.asarray(percentiles, jnp.float32)
    changes = jax.lax.map(at, (levels, jax.random.split(key, len(percentiles))))  # [P, 2, B]
    morf, lerf = changes[:, 0].T, changes[:, 1].T
    return RoadScores(morf=morf, lerf=lerf, combined=(lerf - morf).mean(axis=-1) / 2)


# --------------------------------------------------------------------------------------
# Average drop / increase in confidence
# --------------------------------------------------------------------------------------


class ConfidenceChange(NamedTuple):
    """Per image: drop ``max(0, Y - O) / Y`` and increase ``O > Y`` (``[B]`` each)."""

    drop: Array
    increase: Array


def confidence_change(model_fn: ModelFn, images: Array, maps: Array, targets: Array,
                      score: str = "probability") -> ConfidenceChange:
    """Grad-CAM++'s drop / increase in confidence when ``images`` are multiplied by their
    ``maps`` in ``[0, 1]``; ``Y == 0`` gives drop 0. Averages over images (times 100) are
    the "Average Drop %" and "% Increase in Confidence" of the paper."""
    images, maps, targets = jnp.asarray(images), jnp.asarray(maps, jnp.float32), \
        jnp.asarray(targets)
    _check_inputs(images, maps, targets)
    both = jnp.concatenate([images, images * maps[..., None].astype(images.dtype)])
    scores = target_scores(model_fn, both, jnp.concatenate([targets, targets]), score)
    plain, masked = scores[: images.shape[0]], scores[images.shape[0]:]
    positive = plain > 0
    drop = jnp.where(positive, jax.nn.relu(plain - masked) / jnp.where(positive, plain, 1.0),
                     0.0)
    return ConfidenceChange(drop=drop, increase=(masked > plain).astype(jnp.float32))


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------

#: Keys of ``evaluate``'s result and whether higher is better.
METRICS = {"deletion": False, "insertion": True, "road_morf": False, "road_lerf": True,
           "road": True, "average_drop": False, "increase": True}


@functools.partial(jax.jit, static_argnames=("model_fn", "steps", "percentiles", "score"))
def evaluate(model_fn: Callable[..., Array], images: Array, maps: Array, targets: Array,
             key: Array, steps: int = 16, percentiles: tuple[int, ...] = ROAD_PERCENTILES,
             score: str = "probability", variables: Any = None) -> dict[str, Array]:
    """Every metric per image (``[B]`` each, keys ``METRICS``), one compiled call.

    ``model_fn`` is static (hashable): pass the same function object to reuse the
    compilation. With ``variables`` it is called as ``model_fn(variables, images)`` and the
    variables stay arguments of the compiled call (not constants baked into it), e.g.
    ``evaluate(apply_fn, ..., variables=variables)`` with
    ``apply_fn = functools.partial(model.apply, train=False)``. ``road_morf`` /
    ``road_lerf`` are averaged over the percentiles.
    """
    if variables is not None:
        bound = model_fn

        def model_fn(images: Array) -> Array:
            return bound(variables, images)

    road_scores = road(model_fn, images, maps, targets, key, percentiles, score=score)
    change = confidence_change(model_fn, images, maps, targets, score)
    return {
        "deletion": deletion_auc(model_fn, images, maps, targets, steps, score=score),
        "insertion": insertion_auc(model_fn, images, maps, targets, steps, score=score),
        "road_morf": road_scores.morf.mean(axis=-1),
        "road_lerf": road_scores.lerf.mean(axis=-1),
        "road": road_scores.combined,
        "average_drop": change.drop,
        "increase": change.increase,
    }
