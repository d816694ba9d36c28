"""Weakly supervised object localization metrics (Choe et al., CVPR 2020).

Score maps are ``[N, H, W]`` in ``[0, 1]`` (min-max normalised per image, as
``gapjax.cam.normalize_maps`` makes them); thresholds ``tau`` run over a grid, by default
``0, 0.01, ..., 0.99``. The conventions decide the numbers; docs/wsol.md tabulates them
(column ``"gapjax"``) next to the reference's:

* boxes are normalised ``(ymin, xmin, ymax, xmax)``; pixel ``(r, c)`` covers
  ``[r/H, (r+1)/H) x [c/W, (c+1)/W)``; IoU is the continuous area ratio; true boxes with a
  negative coordinate are padding, and an image's IoU is the best over (estimated, true)
  pairs;
* the foreground at ``tau`` is ``score > tau``; its 8-connected components give boxes: V1
  the largest (by pixel count; ties to the first in row-major order), V2
  (``multi_contour``) all; an empty foreground gives no box and IoU 0;
* ``BoxAcc(tau, delta)`` is the share of images with IoU ``>= delta``, ``MaxBoxAcc(delta)
  = max_tau BoxAcc``, ``MaxBoxAccV2`` the mean of multi-contour MaxBoxAcc over ``delta`` in
  0.3, 0.5, 0.7; PxAP pools all pixels (foreground when ``score >= tau``) and sums
  ``P(tau_j) (R(tau_j) - R(tau_{j+1}))`` from ``tau = 1`` down (right Riemann); all are
  fractions in ``[0, 1]``.

GT-known localization counts IoU >= 0.5 for the true class's map; top-1 localization
also needs the predicted class to be right. Both use one threshold for all images: by
default the one that maximises GT-known localization over the grid (Choe et al.'s
calibration, so GT-known localization equals MaxBoxAcc), or a fixed one (the 0.2 of the
CAM paper favours whatever object size it happens to fit).

``protocol="wsolevaluation"`` returns the numbers of Choe et al.'s reference code exactly,
in its units (percentages; ``gapjax.wsol.reference``, which needs OpenCV).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage

from gapjax.wsol.reference import (
    IGNORE,
    V2_IOU_THRESHOLDS,
    _percent,
    box_iou,
    boxes_from_reference,
    reference_accuracy,
    reference_boxes_by_level,
    reference_iou_curves,
    reference_pixel_histograms,
    reference_pxap_from_histograms,
    reference_thresholds,
    reference_truth,
)

#: Default threshold grid ``0, 0.01, ..., 0.99``.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 6)
#: The metric conventions ``protocol`` selects (see the module docstring).
PROTOCOLS = ("gapjax", "wsolevaluation")
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
    score_map: Any, threshold: float, multi_contour: bool = False, protocol: str = "gapjax"
) -> np.ndarray:
    """Boxes ``[n, 4]`` (normalised ``ymin, xmin, ymax, xmax``) of ``score_map [H, W] > tau``.

    ``"gapjax"``: the largest 8-connected component's box (``n <= 1``), or every
    component's box when ``multi_contour``; an empty foreground gives ``n = 0``.
    ``"wsolevaluation"``: the reference's contour boxes at ``tau`` (8-bit, relative to the
    map's maximum; one ``(0, 0, 0, 0)`` box when empty), converted with
    ``boxes_from_reference`` on the map's grid (the reference's ``x1`` is already one pixel
    past a region that does not touch the far edge).
    """
    score_map = np.asarray(score_map, np.float64)
    if score_map.ndim != 2:
        raise ValueError(f"score_map must have shape [H, W]; got {score_map.shape}")
    if _protocol(protocol) == "wsolevaluation":
        largest, every, _ = reference_boxes_by_level(score_map, [float(threshold)])
        pixels = (every if multi_contour else largest)[0]
        return boxes_from_reference(pixels, score_map.shape)
    boxes, _, sizes = _components(score_map, np.array([float(threshold)]))
    if multi_contour or len(boxes) == 0:
        return boxes
    return boxes[np.argmax(sizes)][None]


def iou_curves(
    score_maps: Any,
    gt_boxes: Any,
    thresholds: Any = None,
    protocol: str = "gapjax",
    image_sizes: Any = None,
    box_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU per image and threshold: ``(largest_component [N, T], any_component [N, T])``.

    ``largest_component`` uses only the largest component's box (V1), ``any_component``
    the best box over all components (V2, multi-contour). 0 where the foreground is empty
    (``"gapjax"``). ``"wsolevaluation"``: the reference's contour boxes and pixel IoU
    (``reference_iou_curves``); ``image_sizes [N, 2]`` are the images' original ``(height,
    width)`` when the boxes are to be scaled as the reference does, to ``box_size`` (default
    224 x 224, the reference's fixed size, whatever the maps' size); without
    ``image_sizes`` the maps are the images. ``thresholds`` None: the protocol's default.
    """
    if thresholds is None:
        thresholds = default_thresholds(protocol)
    maps = _score_maps(score_maps)
    boxes = _gt_boxes(gt_boxes, len(maps))
    grid = _thresholds(thresholds)
    if _protocol(protocol) == "wsolevaluation":
        truth = reference_truth(boxes, maps.shape[1:], image_sizes, box_size)
        return reference_iou_curves(np.asarray(score_maps, np.float64).reshape(maps.shape),
                                    truth, grid)
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


def localized(ious: Any, iou_threshold: float, protocol: str = "gapjax") -> np.ndarray:
    """Which entries of ``ious`` reach ``iou_threshold``: ``iou >= delta`` (with
    ``_IOU_SLACK``), or the reference's ``iou >= percent / 100``."""
    if _protocol(protocol) == "wsolevaluation":
        return np.asarray(ious) >= _percent(iou_threshold) / 100
    return np.asarray(ious) >= iou_threshold - _IOU_SLACK


def share(counts: Any, images: int, protocol: str = "gapjax") -> np.ndarray:
    """Counts of localized images -> the protocol's unit: a fraction (``"gapjax"``) or
    the reference's percentage ``count * 100. / images`` (``"wsolevaluation"``)."""
    if _protocol(protocol) == "wsolevaluation":
        return reference_accuracy(counts, images)
    if images <= 0:
        raise ValueError("box accuracy needs at least one image; got none")
    return np.asarray(counts, np.float64) / images


def box_accuracy(ious: np.ndarray, iou_threshold: float, protocol: str = "gapjax") -> np.ndarray:
    """``BoxAcc`` per threshold: ``ious [N, T] -> [T]`` images with IoU >= iou_threshold.

    A fraction for ``"gapjax"``; the reference's percentage for ``"wsolevaluation"``.
    """
    ious = np.asarray(ious, np.float64)
    return share(localized(ious, iou_threshold, protocol).sum(axis=0), len(ious), protocol)


def max_box_acc(
    score_maps: Any,
    gt_boxes: Any,
    iou_threshold: float = 0.5,
    multi_contour: bool = False,
    thresholds: Any = None,
    protocol: str = "gapjax",
    image_sizes: Any = None,
) -> float:
    """MaxBoxAcc: the best over thresholds of the share of images localized.

    Args:
      score_maps: ``[N, H, W]`` in ``[0, 1]``.
      gt_boxes: ``[N, 4]`` or ``[N, M, 4]`` normalised ``(ymin, xmin, ymax, xmax)``;
        boxes with a negative coordinate are padding.
      iou_threshold: ``delta``, the IoU an estimated box needs.
      multi_contour: V2's box choice (best of all components) instead of the largest one.
      thresholds: the ``tau`` grid (increasing); None for the protocol's default.
      protocol: ``"gapjax"`` (a fraction in ``[0, 1]``) or ``"wsolevaluation"`` (the
        reference code's percentage, exactly).
      image_sizes: ``[N, 2]`` original ``(height, width)`` (``"wsolevaluation"`` only; see
        ``iou_curves``).
    """
    largest, best = iou_curves(score_maps, gt_boxes, thresholds, protocol, image_sizes)
    return float(box_accuracy(best if multi_contour else largest, iou_threshold,
                              protocol).max())


def max_box_acc_v2(
    score_maps: Any,
    gt_boxes: Any,
    iou_thresholds: tuple[float, ...] = V2_IOU_THRESHOLDS,
    thresholds: Any = None,
    protocol: str = "gapjax",
    image_sizes: Any = None,
) -> float:
    """MaxBoxAccV2: mean over ``iou_thresholds`` (0.3, 0.5, 0.7) of multi-contour MaxBoxAcc
    (see ``max_box_acc`` for the arguments and units)."""
    _, best = iou_curves(score_maps, gt_boxes, thresholds, protocol, image_sizes)
    per_iou = [box_accuracy(best, delta, protocol).max() for delta in iou_thresholds]
    return float(np.average(per_iou))


def localized_at(
    largest_ious: np.ndarray,
    iou_threshold: float = 0.5,
    threshold_index: int | None = None,
    protocol: str = "gapjax",
) -> np.ndarray:
    """Which images are localized: ``largest_ious [N, T] -> bool [N]``.

    At grid column ``threshold_index``, or (None) at the column with the most images
    localized, the calibrated threshold (the first such column).
    """
    hits = localized(largest_ious, iou_threshold, protocol)
    if threshold_index is None:
        threshold_index = int(np.argmax(hits.sum(axis=0)))
    return hits[:, threshold_index]


def _localized_images(score_maps, gt_boxes, threshold, iou_threshold, thresholds, protocol,
                      image_sizes) -> np.ndarray:
    """Per image whether it is localized at ``threshold``, or (None) at the grid's
    calibrated threshold: bool ``[N]``."""
    if threshold is not None:
        thresholds = [threshold]
    elif thresholds is None:
        thresholds = default_thresholds(protocol)
    largest, _ = iou_curves(score_maps, gt_boxes, thresholds, protocol, image_sizes)
    return localized_at(largest, iou_threshold, None if threshold is None else 0, protocol)


def gt_known_localization(
    score_maps: Any,
    gt_boxes: Any,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    thresholds: Any = None,
    protocol: str = "gapjax",
    image_sizes: Any = None,
) -> float:
    """Share of images whose true-class map's largest box has IoU >= ``iou_threshold``.

    ``threshold``: the map threshold, or None for the best one of ``thresholds`` (then the
    value is MaxBoxAcc). Units and ``protocol`` as in ``max_box_acc``.
    """
    hits = _localized_images(score_maps, gt_boxes, threshold, iou_threshold, thresholds,
                             protocol, image_sizes)
    return float(share(hits.sum(), len(hits), protocol))


def top1_localization(
    score_maps: Any,
    gt_boxes: Any,
    predictions: Any,
    labels: Any,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    thresholds: Any = None,
    protocol: str = "gapjax",
    image_sizes: Any = None,
) -> float:
    """Share of images both classified right and localized (IoU >= ``iou_threshold``).

    ``score_maps`` are the true class's maps (equal to the predicted class's wherever the
    prediction is right, the only case that counts). ``predictions``, ``labels``: ``[N]``.
    ``threshold``: the map threshold, or None for the one that localizes the most images
    (the GT-known calibration). Units and ``protocol`` as in ``max_box_acc``.
    """
    hits = _localized_images(score_maps, gt_boxes, threshold, iou_threshold, thresholds,
                             protocol, image_sizes)
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape or len(labels) != len(hits):
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must both have "
            f"shape [N] = [{len(hits)}]"
        )
    return float(share((hits & (predictions == labels)).sum(), len(hits), protocol))


# --------------------------------------------------------------------------------------
# Pixel average precision
# --------------------------------------------------------------------------------------


def _pixel_grid(thresholds: Any) -> np.ndarray:
    """The threshold grid with ``tau = 1`` appended (the top of the PR curve)."""
    grid = _thresholds(thresholds)
    return grid if grid[-1] >= 1.0 else np.append(grid, 1.0)


def pixel_histograms(
    score_maps: Any, masks: Any, thresholds: Any = None, protocol: str = "gapjax"
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts per threshold bin, for PxAP accumulated over batches.

    ``"gapjax"``: ``(foreground [T'], background [T'])``, bin ``j`` counts pixels with
    ``tau_j <= score < tau_{j+1}`` (the last bin is open above) over the grid with
    ``tau = 1`` appended. ``masks [N, H, W]``: foreground where ``> 0.5``, except pixels
    equal to ``IGNORE`` (255), which count nowhere. ``"wsolevaluation"``: the reference's
    histograms (``reference_pixel_histograms``).
    """
    if thresholds is None:
        thresholds = default_thresholds(protocol)
    maps = _score_maps(score_maps)
    masks = np.asarray(masks)
    if masks.shape != maps.shape:
        raise ValueError(f"masks must have the shape of score_maps {maps.shape}; got {masks.shape}")
    if _protocol(protocol) == "wsolevaluation":
        return reference_pixel_histograms(np.asarray(score_maps, np.float64).reshape(maps.shape),
                                          masks, _thresholds(thresholds))
    grid = _pixel_grid(thresholds)
    # Scores below the first threshold are never predicted foreground: no bin.
    bins = np.searchsorted(grid, maps.ravel(), side="right") - 1
    flat = masks.ravel()
    foreground = (flat > 0.5) & (flat != IGNORE)
    keep = (bins >= 0) & (flat != IGNORE)
    count = lambda selected: np.bincount(bins[keep & selected], minlength=len(grid))
    return count(foreground), count(~foreground)


def pxap_from_histograms(
    foreground: np.ndarray, background: np.ndarray, protocol: str = "gapjax"
) -> float:
    """PxAP from ``pixel_histograms`` counts (summed over batches): a fraction
    (``"gapjax"``) or the reference's percentage (``"wsolevaluation"``)."""
    if _protocol(protocol) == "wsolevaluation":
        return reference_pxap_from_histograms(foreground, background)
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


def pxap(score_maps: Any, masks: Any, thresholds: Any = None, protocol: str = "gapjax") -> float:
    """Pixel average precision of ``score_maps [N, H, W]`` against ``masks [N, H, W]``.

    Area under the pixel precision-recall curve over the threshold grid, all images'
    pixels pooled (see the module docstring for the exact sum). A fraction in ``[0, 1]``
    (``"gapjax"``) or the reference's percentage (``"wsolevaluation"``).
    """
    return pxap_from_histograms(*pixel_histograms(score_maps, masks, thresholds, protocol),
                                protocol)


# --------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------


def _protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not a WSOL protocol; choose one of: "
                         f"{', '.join(PROTOCOLS)}")
    return protocol


def default_thresholds(protocol: str = "gapjax") -> np.ndarray:
    """The threshold grid a metric uses when given none: ``DEFAULT_THRESHOLDS`` for
    ``"gapjax"``, ``reference_thresholds()`` (step 0.001) for ``"wsolevaluation"``."""
    if _protocol(protocol) == "gapjax":
        return DEFAULT_THRESHOLDS
    return reference_thresholds()


__all__ = ["DEFAULT_LOC_THRESHOLD", "DEFAULT_THRESHOLDS", "PROTOCOLS", "box_accuracy",
           "boxes_from_score_map", "default_thresholds", "gt_known_localization", "iou_curves",
           "localized", "localized_at", "max_box_acc", "max_box_acc_v2", "pixel_histograms",
           "pxap", "pxap_from_histograms", "share", "top1_localization"]
