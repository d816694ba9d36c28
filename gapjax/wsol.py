"""Weakly supervised object localization metrics (Choe et al., CVPR 2020).

Score maps are ``[N, H, W]`` in ``[0, 1]`` (min-max normalised per image, as
``gapjax.cam.normalize_maps`` makes them); thresholds ``tau`` run over a grid, by default
``0, 0.01, ..., 0.99``.

Conventions (documented because they decide the numbers):

* Boxes are ``(ymin, xmin, ymax, xmax)`` normalised to ``[0, 1]`` (TFDS ``BBoxFeature``).
  Pixel ``(r, c)`` of an ``H x W`` map covers ``[r/H, (r+1)/H) x [c/W, (c+1)/W)``, so a
  component spanning rows ``r0..r1`` and columns ``c0..c1`` is the box
  ``(r0/H, c0/W, (r1+1)/H, (c1+1)/W)``. IoU is the continuous area ratio (no ``+1``
  pixel convention). Ground-truth boxes with a negative coordinate are padding (the data
  pipeline pads with all ``-1``) and are ignored; an image may have several boxes, and its
  IoU is the best over (estimated box, true box) pairs, as in the original evaluation.
* At threshold ``tau`` the foreground is ``score > tau`` (strict, as the original's
  ``cv2.threshold(THRESH_BINARY)``); its 8-connected components (the regions whose outer
  contours ``cv2.findContours`` traces) give boxes. V1 keeps the largest component (by
  pixel count; ties go to the first in row-major order), V2 (``multi_contour``) keeps all.
  An empty foreground gives no box and IoU 0. Scores are not quantised to 8 bits.
* ``BoxAcc(tau, delta)`` = fraction of images whose IoU at ``tau`` is ``>= delta``;
  ``MaxBoxAcc(delta) = max_tau BoxAcc``; ``MaxBoxAccV2`` = mean of the multi-contour
  MaxBoxAcc over ``delta`` in 0.3, 0.5, 0.7 (each ``delta`` picks its own ``tau``).
* PxAP: pixels of all images pooled; at each ``tau`` a pixel is predicted foreground when
  ``score >= tau``; ``AP = sum_j P(tau_j) (R(tau_j) - R(tau_{j+1}))`` over thresholds in
  descending order starting at ``tau = 1`` (recall 0 above it), the original's
  right-Riemann sum of the precision-recall curve.
* All metrics are fractions in ``[0, 1]`` (the paper prints percentages).

GT-known localization counts IoU >= 0.5 for the true class's map; top-1 localization
also needs the predicted class to be right. Both use one threshold for all images: by
default the one that maximises GT-known localization over the grid (the calibration
Choe et al. recommend, so GT-known localization then equals MaxBoxAcc), or a fixed one
such as the 0.2 of the original CAM paper. A fixed threshold is arbitrary: it favours
whatever object size it happens to fit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.ndimage

#: Default threshold grid ``0, 0.01, ..., 0.99``.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 6)
#: IoU thresholds that MaxBoxAccV2 averages over.
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
#: Map threshold for drawing one box per map (Zhou et al.'s 20 % of the maximum).
DEFAULT_LOC_THRESHOLD = 0.2
# IoU comparisons allow this slack so that an overlap of exactly delta counts despite
# float rounding of the normalised coordinates.
_IOU_SLACK = 1e-9
# Labels connected components within each threshold plane, never across planes.
_PLANE_8_CONNECTED = np.zeros((3, 3, 3), bool)
_PLANE_8_CONNECTED[1] = True


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _score_maps(score_maps: Any, name: str = "score_maps") -> np.ndarray:
    maps = np.asarray(score_maps, np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape [N, H, W] (or [H, W]); got {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError(f"{name} contain NaN or infinite values; normalise them first")
    if maps.size and (maps.min() < -1e-6 or maps.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must lie in [0, 1] (min-max normalised); got range "
            f"[{maps.min():.4g}, {maps.max():.4g}]; use gapjax.cam.normalize_maps"
        )
    return maps


def _gt_boxes(gt_boxes: Any, count: int) -> np.ndarray:
    """``[N, 4]`` or ``[N, M, 4]`` -> ``[N, M, 4]`` float64."""
    boxes = np.asarray(gt_boxes, np.float64)
    if boxes.ndim == 2:
        boxes = boxes[:, None]
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != count:
        raise ValueError(
            f"gt_boxes must have shape [N, 4] or [N, M, 4] with N = {count} score maps, "
            f"as (ymin, xmin, ymax, xmax) in [0, 1]; got {np.shape(gt_boxes)}"
        )
    return boxes


def _thresholds(thresholds: Any) -> np.ndarray:
    grid = np.asarray(thresholds, np.float64).reshape(-1)
    if grid.size == 0 or np.any(np.diff(grid) <= 0):
        raise ValueError(f"thresholds must be a non-empty increasing grid; got {grid}")
    return grid


# --------------------------------------------------------------------------------------
# Boxes and IoU
# --------------------------------------------------------------------------------------


def box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise IoU of ``boxes_a [A, 4]`` and ``boxes_b [B, 4]`` -> ``[A, B]``.

    Boxes are ``(ymin, xmin, ymax, xmax)``; degenerate boxes have area 0 and IoU 0.
    """
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    intersection = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)

    def area(boxes):
        heights = np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
        return heights * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)

    union = area(a)[:, None] + area(b)[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def _components(score_map: np.ndarray, thresholds: np.ndarray):
    """Connected components of ``score_map > tau`` for every ``tau`` in one labelling.

    Returns ``(boxes [n, 4] normalised, plane [n] threshold index, size [n] pixels)``,
    components in label order (by threshold, then row-major first pixel).
    """
    height, width = score_map.shape
    foreground = score_map[None] > thresholds[:, None, None]  # [T, H, W]
    labels, count = scipy.ndimage.label(foreground, structure=_PLANE_8_CONNECTED)
    if count == 0:
        return np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    slices = scipy.ndimage.find_objects(labels)
    extents = np.array(
        [(s[0].start, s[1].start, s[2].start, s[1].stop, s[2].stop) for s in slices], np.float64
    )
    boxes = extents[:, 1:] / np.array([height, width, height, width], np.float64)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return boxes, extents[:, 0].astype(np.int64), sizes


def boxes_from_score_map(
    score_map: Any, threshold: float, multi_contour: bool = False
) -> np.ndarray:
    """Boxes ``[n, 4]`` (normalised ``ymin, xmin, ymax, xmax``) of ``score_map [H, W] > tau``.

    The largest 8-connected component's box (``n <= 1``), or every component's box when
    ``multi_contour``. An empty foreground gives ``n = 0``.
    """
    score_map = np.asarray(score_map, np.float64)
    if score_map.ndim != 2:
        raise ValueError(f"score_map must have shape [H, W]; got {score_map.shape}")
    boxes, _, sizes = _components(score_map, np.array([float(threshold)]))
    if multi_contour or len(boxes) == 0:
        return boxes
    return boxes[np.argmax(sizes)][None]


def iou_curves(
    score_maps: Any, gt_boxes: Any, thresholds: Any = DEFAULT_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU per image and threshold: ``(largest_component [N, T], any_component [N, T])``.

    ``largest_component`` uses only the largest component's box (V1), ``any_component``
    the best box over all components (V2, multi-contour). 0 where the foreground is empty.
    """
    maps = _score_maps(score_maps)
    boxes = _gt_boxes(gt_boxes, len(maps))
    grid = _thresholds(thresholds)
    largest = np.zeros((len(maps), len(grid)))
    best = np.zeros((len(maps), len(grid)))
    for index, (score_map, truth) in enumerate(zip(maps, boxes, strict=True)):
        truth = truth[(truth >= 0).all(axis=1)]
        estimated, plane, sizes = _components(score_map, grid)
        if len(estimated) == 0 or len(truth) == 0:
            continue
        ious = box_iou(estimated, truth).max(axis=1)  # [n]
        np.maximum.at(best[index], plane, ious)
        # The largest component per plane: sort by plane, then size descending, then label.
        order = np.lexsort((np.arange(len(plane)), -sizes, plane))
        planes_present, first = np.unique(plane[order], return_index=True)
        largest[index, planes_present] = ious[order[first]]
    return largest, best


def box_accuracy(ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """``BoxAcc`` per threshold: ``ious [N, T] -> [T]`` fraction with IoU >= iou_threshold."""
    ious = np.asarray(ious, np.float64)
    if ious.shape[0] == 0:
        raise ValueError("box accuracy needs at least one image; got none")
    return (ious >= iou_threshold - _IOU_SLACK).mean(axis=0)


def max_box_acc(
    score_maps: Any,
    gt_boxes: Any,
    iou_threshold: float = 0.5,
    multi_contour: bool = False,
    thresholds: Any = DEFAULT_THRESHOLDS,
) -> float:
    """MaxBoxAcc: the best over thresholds of the fraction of images localized.

    Args:
      score_maps: ``[N, H, W]`` in ``[0, 1]``.
      gt_boxes: ``[N, 4]`` or ``[N, M, 4]`` normalised ``(ymin, xmin, ymax, xmax)``;
        boxes with a negative coordinate are padding.
      iou_threshold: ``delta``, the IoU an estimated box needs.
      multi_contour: V2's box choice (best of all components) instead of the largest one.
      thresholds: the ``tau`` grid (increasing).

    Returns a fraction in ``[0, 1]``.
    """
    largest, best = iou_curves(score_maps, gt_boxes, thresholds)
    return float(box_accuracy(best if multi_contour else largest, iou_threshold).max())


def max_box_acc_v2(
    score_maps: Any,
    gt_boxes: Any,
    iou_thresholds: tuple[float, ...] = V2_IOU_THRESHOLDS,
    thresholds: Any = DEFAULT_THRESHOLDS,
) -> float:
    """MaxBoxAccV2: mean over ``iou_thresholds`` (0.3, 0.5, 0.7) of multi-contour MaxBoxAcc."""
    _, best = iou_curves(score_maps, gt_boxes, thresholds)
    return float(np.mean([box_accuracy(best, delta).max() for delta in iou_thresholds]))


def localized_at(
    largest_ious: np.ndarray, iou_threshold: float = 0.5, threshold_index: int | None = None
) -> np.ndarray:
    """Which images are localized: ``largest_ious [N, T] -> bool [N]``.

    At grid column ``threshold_index``, or (None) at the column with the most images
    localized, the calibrated threshold.
    """
    localized = np.asarray(largest_ious) >= iou_threshold - _IOU_SLACK
    if threshold_index is None:
        threshold_index = int(np.argmax(localized.mean(axis=0)))
    return localized[:, threshold_index]


def gt_known_localization(
    score_maps: Any,
    gt_boxes: Any,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    thresholds: Any = DEFAULT_THRESHOLDS,
) -> float:
    """Fraction of images whose true-class map's largest box has IoU >= ``iou_threshold``.

    ``threshold``: the map threshold, or None for the best one of ``thresholds`` (then the
    value is MaxBoxAcc).
    """
    grid = thresholds if threshold is None else [threshold]
    largest, _ = iou_curves(score_maps, gt_boxes, grid)
    return float(np.mean(localized_at(largest, iou_threshold, None if threshold is None else 0)))


def top1_localization(
    score_maps: Any,
    gt_boxes: Any,
    predictions: Any,
    labels: Any,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    thresholds: Any = DEFAULT_THRESHOLDS,
) -> float:
    """Fraction of images both classified right and localized (IoU >= ``iou_threshold``).

    ``score_maps`` are the true class's maps (equal to the predicted class's wherever the
    prediction is right, the only case that counts). ``predictions``, ``labels``: ``[N]``.
    ``threshold``: the map threshold, or None for the one that localizes the most images
    (the GT-known calibration).
    """
    grid = thresholds if threshold is None else [threshold]
    largest, _ = iou_curves(score_maps, gt_boxes, grid)
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape or len(labels) != len(largest):
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must both have "
            f"shape [N] = [{len(largest)}]"
        )
    localized = localized_at(largest, iou_threshold, None if threshold is None else 0)
    return float(np.mean(localized & (predictions == labels)))


# --------------------------------------------------------------------------------------
# Pixel average precision
# --------------------------------------------------------------------------------------


def _pixel_grid(thresholds: Any) -> np.ndarray:
    """The threshold grid with ``tau = 1`` appended (the top of the PR curve)."""
    grid = _thresholds(thresholds)
    return grid if grid[-1] >= 1.0 else np.append(grid, 1.0)


def pixel_histograms(
    score_maps: Any, masks: Any, thresholds: Any = DEFAULT_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts per threshold bin, for PxAP accumulated over batches.

    Returns ``(foreground [T'], background [T'])``: bin ``j`` counts pixels with
    ``tau_j <= score < tau_{j+1}`` (the last bin is open above) over the grid with
    ``tau = 1`` appended. ``masks [N, H, W]``: foreground where ``> 0.5``.
    """
    maps = _score_maps(score_maps)
    masks = np.asarray(masks)
    if masks.shape != maps.shape:
        raise ValueError(f"masks must have the shape of score_maps {maps.shape}; got {masks.shape}")
    grid = _pixel_grid(thresholds)
    # Scores below the first threshold are never predicted foreground: no bin.
    bins = np.searchsorted(grid, maps.ravel(), side="right") - 1
    foreground = masks.ravel() > 0.5
    keep = bins >= 0
    count = lambda selected: np.bincount(bins[keep & selected], minlength=len(grid))
    return count(foreground), count(~foreground)


def pxap_from_histograms(foreground: np.ndarray, background: np.ndarray) -> float:
    """PxAP from ``pixel_histograms`` counts (summed over batches)."""
    # Counts at or above each threshold, thresholds in descending order.
    true_positive = np.cumsum(np.asarray(foreground, np.float64)[::-1])
    false_positive = np.cumsum(np.asarray(background, np.float64)[::-1])
    positives = true_positive[-1]
    if positives <= 0:
        raise ValueError("PxAP needs at least one foreground pixel in the masks; got none")
    predicted = true_positive + false_positive
    precision = np.where(predicted > 0, true_positive / np.where(predicted > 0, predicted, 1), 0)
    recall_gain = np.diff(np.concatenate([[0.0], true_positive / positives]))
    return float((precision * recall_gain).sum())


def pxap(score_maps: Any, masks: Any, thresholds: Any = DEFAULT_THRESHOLDS) -> float:
    """Pixel average precision of ``score_maps [N, H, W]`` against ``masks [N, H, W]``.

    Area under the pixel precision-recall curve over the threshold grid, all images'
    pixels pooled (see the module docstring for the exact sum). A fraction in ``[0, 1]``.
    """
    return pxap_from_histograms(*pixel_histograms(score_maps, masks, thresholds))


# --------------------------------------------------------------------------------------
# Evaluator used by the training loop
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def localization_map_fn(model: Any, method: str, resize: str = "bilinear") -> Any:
    """The jitted ``fn(variables, images, targets) -> gapjax.cam.CamOutput`` evaluators use
    (maps resized to the input and normalised), one per (model, method, resize): the
    training loop builds a new evaluator at every evaluation, and this spares each one a
    recompilation. ``model`` must be hashable (Linen modules are)."""
    from gapjax import cam

    return cam.make_map_fn(model, method, resize=resize, normalize=True)


class LocalizationEvaluator:
    """Accumulates localization metrics over evaluation batches.

    ``update(variables, batch)`` computes the true class's maps for ``batch["image"]``
    (one jitted forward pass via ``gapjax.cam.compute_maps``, upsampled to the input and
    min-max normalised) and keeps per-image IoU curves and pixel histograms on the host;
    ``result()`` returns ``top1_loc``, ``gt_known_loc``, ``max_box_acc``, ``max_box_acc_v2``
    and, when batches carry ``segmentation`` masks, ``pxap`` (all fractions). Top-1 and
    GT-known localization use ``loc_threshold``, or (None) the calibrated threshold, at
    which GT-known localization equals MaxBoxAcc.

    Batches need ``image [b, H, W, C]``, ``label [b]`` and ``bbox [b, M, 4]``; rows with
    ``weight == 0`` (padding) are skipped. ``variables`` are unreplicated.
    """

    def __init__(
        self,
        model: Any,
        method: str = "auto",
        thresholds: Any = DEFAULT_THRESHOLDS,
        loc_threshold: float | None = None,
        resize: str = "bilinear",
    ):
        from gapjax import cam  # same floor; imported here to keep the metrics numpy-only

        self.method = cam.resolve_method(model, method)
        self.thresholds = _thresholds(thresholds)
        self.loc_threshold = None if loc_threshold is None else float(loc_threshold)
        try:
            self._map_fn = localization_map_fn(model, self.method, resize)
        except TypeError:  # an unhashable model: compile for this evaluator alone
            self._map_fn = cam.make_map_fn(model, self.method, resize=resize, normalize=True)
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated."""
        size = len(self.thresholds)
        self._images = 0
        # Counts per threshold: localized (V1, IoU >= 0.5), localized and classified right,
        # and localized with V2 boxes at each IoU of V2_IOU_THRESHOLDS.
        self._localized = np.zeros(size)
        self._localized_correct = np.zeros(size)
        self._localized_v2 = np.zeros((len(V2_IOU_THRESHOLDS), size))
        # The same two counts at the fixed loc_threshold, when there is one.
        self._fixed = np.zeros(2)
        self._foreground = np.zeros(len(_pixel_grid(self.thresholds)))
        self._background = np.zeros(len(_pixel_grid(self.thresholds)))

    def update(self, variables: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        """Adds one batch (see the class docstring for its keys)."""
        for key in ("image", "label", "bbox"):
            if key not in batch:
                raise ValueError(
                    f"localization evaluation needs batch key {key!r}; the batch has "
                    f"{sorted(batch)} (is config.dataset a dataset with boxes?)"
                )
        labels = np.asarray(batch["label"])
        if labels.ndim != 1:
            raise ValueError(
                f"localization evaluation needs one class label per image, label [b]; got "
                f"shape {labels.shape}"
            )
        output = self._map_fn(variables, batch["image"], labels)
        real = np.asarray(batch.get("weight", np.ones(len(labels)))) > 0
        maps = np.asarray(output.maps, np.float64)[real]
        boxes = np.asarray(batch["bbox"])[real]
        correct = (np.asarray(output.logits).argmax(axis=-1) == labels)[real, None]
        largest, best = iou_curves(maps, boxes, self.thresholds)
        localized = largest >= 0.5 - _IOU_SLACK
        self._images += int(real.sum())
        self._localized += localized.sum(axis=0)
        self._localized_correct += (localized & correct).sum(axis=0)
        for row, delta in enumerate(V2_IOU_THRESHOLDS):
            self._localized_v2[row] += (best >= delta - _IOU_SLACK).sum(axis=0)
        if self.loc_threshold is not None:
            at_fixed, _ = iou_curves(maps, boxes, [self.loc_threshold])
            fixed = at_fixed >= 0.5 - _IOU_SLACK
            self._fixed += [fixed.sum(), (fixed & correct).sum()]
        if "segmentation" in batch:
            foreground, background = pixel_histograms(
                maps, np.asarray(batch["segmentation"])[real], self.thresholds
            )
            self._foreground += foreground
            self._background += background

    def _totals(self) -> dict[str, np.ndarray]:
        """The counts summed over processes (a collective when there are several)."""
        import jax  # the metrics themselves are NumPy; only this collective needs JAX

        parts = {"images": np.array([self._images], np.float64),
                 "localized": self._localized, "localized_correct": self._localized_correct,
                 "localized_v2": self._localized_v2, "fixed": self._fixed,
                 "foreground": self._foreground, "background": self._background}
        if jax.process_count() == 1:
            return parts
        from jax.experimental import multihost_utils

        flat = np.concatenate([np.ravel(value) for value in parts.values()])
        summed = np.asarray(multihost_utils.process_allgather(flat)).sum(axis=0)
        totals, offset = {}, 0
        for key, value in parts.items():
            totals[key] = summed[offset:offset + np.size(value)].reshape(np.shape(value))
            offset += np.size(value)
        return totals

    def calibrated_threshold(self) -> float:
        """The grid threshold at which the most images are localized (V1 boxes, IoU >= 0.5):
        where MaxBoxAcc is attained (this process's images only)."""
        return float(self.thresholds[int(np.argmax(self._localized))])

    def result(self) -> dict[str, float]:
        """The metrics over every image seen since the last ``reset``, on every process.

        With several processes every process must call it (the counts are summed with a
        collective).
        """
        totals = self._totals()
        images = float(totals["images"][0])
        if images == 0:
            raise ValueError("LocalizationEvaluator.result() called before any real image")
        if self.loc_threshold is None:
            calibrated = int(np.argmax(totals["localized"]))
            localized = totals["localized"][calibrated]
            localized_correct = totals["localized_correct"][calibrated]
        else:
            localized, localized_correct = totals["fixed"]
        metrics = {
            "top1_loc": float(localized_correct / images),
            "gt_known_loc": float(localized / images),
            "max_box_acc": float(totals["localized"].max() / images),
            "max_box_acc_v2": float(totals["localized_v2"].max(axis=1).mean() / images),
        }
        if totals["foreground"].sum() > 0:
            metrics["pxap"] = pxap_from_histograms(totals["foreground"], totals["background"])
        return metrics
