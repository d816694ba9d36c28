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

Protocols. Every metric takes ``protocol``: ``"gapjax"`` (the definitions above, the
default) or ``"wsolevaluation"``, which returns exactly the numbers of the reference code
of Choe et al. (github.com/clovaai/wsolevaluation, ``evaluation.py``), in its units
(percentages), so that they can be put next to published tables. That mode needs OpenCV
(``pip install -e ".[wsol]"``) and follows the reference's conventions:

* the map is quantised to 8 bits, ``q = uint8(255 * score)`` (truncation), and at
  threshold ``tau`` the foreground is ``q > int(tau * max(q))``: the threshold is relative
  to the map's 8-bit maximum, so a map whose maximum is below 1 is thresholded as if
  rescaled, and scores that differ by less than 1/255 tie;
* boxes come from OpenCV's contours of that foreground (``RETR_TREE``: the boundaries of
  holes are contours too, and give boxes in V2); V1 keeps the contour of largest polygon
  area (``cv2.contourArea``: a one-pixel or one-pixel-wide region has area 0); an empty
  foreground gives the box ``(0, 0, 0, 0)`` (one pixel, not "no box");
* boxes are integer, pixel-inclusive ``(x0, y0, x1, y1)`` with ``x1 = x + w`` clipped to
  ``W - 1`` (so a box is one pixel wider than its region unless it touches the right or
  bottom edge), and IoU counts pixels with ``+1`` on every side;
* the ground-truth boxes are the reference's pixel boxes at the original image size,
  scaled to the score map with truncation (``int(x * 224 / W)``);
* the threshold grid is ``np.arange(0, 1, interval)`` (0.001 in the reference's training
  script; its command line uses 0.01), unrounded, and an IoU threshold of ``delta``
  is compared as ``iou >= percent / 100``;
* PxAP bins scores with ``np.histogram`` over the grid extended by 1, 2, 3 and drops
  pixels marked 255 (the ignore region) in the masks;
* the evaluator takes the raw class map, resizes it to the input with OpenCV's bicubic
  interpolation and min-max normalises it (constant or NaN maps become all zeros),
  where the gapjax protocol resizes bilinearly in JAX.

``evaluate_scoremaps`` / ``python -m gapjax.wsol`` score saved ``.npy`` maps against a
benchmark's metadata the way the reference's ``evaluation.py`` does.

Box convention shared by both protocols: the reference's pixel-inclusive box ``x0..x1`` on
a ``W``-pixel axis is ``(x0 / W, (x1 + 1) / W)`` in gapjax's normalised coordinates
(``boxes_from_reference``), and ``boxes_to_reference`` maps it back exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage

#: Default threshold grid ``0, 0.01, ..., 0.99``.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 6)
#: IoU thresholds that MaxBoxAccV2 averages over.
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
#: The metric conventions ``protocol`` selects (see the module docstring).
PROTOCOLS = ("gapjax", "wsolevaluation")
#: Mask value of pixels that count neither as foreground nor as background (PxAP).
IGNORE = 255
#: The side the reference scales ground-truth boxes to (its score maps are 224 x 224).
REFERENCE_RESIZE_LENGTH = 224
#: The reference's threshold step in its training script (``--cam_curve_interval``).
REFERENCE_CAM_CURVE_INTERVAL = 0.001
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
        truth = _reference_truth(boxes, maps.shape[1:], image_sizes, box_size)
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


def box_accuracy(ious: np.ndarray, iou_threshold: float, protocol: str = "gapjax") -> np.ndarray:
    """``BoxAcc`` per threshold: ``ious [N, T] -> [T]`` images with IoU >= iou_threshold.

    A fraction for ``"gapjax"``; the reference's percentage for ``"wsolevaluation"``.
    """
    ious = np.asarray(ious, np.float64)
    if ious.shape[0] == 0:
        raise ValueError("box accuracy needs at least one image; got none")
    if _protocol(protocol) == "wsolevaluation":
        return reference_accuracy(reference_correct_counts(ious, iou_threshold), len(ious))
    return (ious >= iou_threshold - _IOU_SLACK).mean(axis=0)


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
    if _protocol(protocol) == "wsolevaluation":
        localized = np.asarray(largest_ious) >= _percent(iou_threshold) / 100
    else:
        localized = np.asarray(largest_ious) >= iou_threshold - _IOU_SLACK
    if threshold_index is None:
        threshold_index = int(np.argmax(localized.sum(axis=0)))
    return localized[:, threshold_index]


def _share(flags: np.ndarray, protocol: str) -> float:
    if protocol == "wsolevaluation":
        return float(reference_accuracy(np.sum(flags), len(flags)))
    return float(np.mean(flags))


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
    grid = (default_thresholds(protocol) if thresholds is None else thresholds) \
        if threshold is None else [threshold]
    largest, _ = iou_curves(score_maps, gt_boxes, grid, protocol, image_sizes)
    localized = localized_at(largest, iou_threshold, None if threshold is None else 0, protocol)
    return _share(localized, protocol)


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
    grid = (default_thresholds(protocol) if thresholds is None else thresholds) \
        if threshold is None else [threshold]
    largest, _ = iou_curves(score_maps, gt_boxes, grid, protocol, image_sizes)
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape or len(labels) != len(largest):
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must both have "
            f"shape [N] = [{len(largest)}]"
        )
    localized = localized_at(largest, iou_threshold, None if threshold is None else 0, protocol)
    return _share(localized & (predictions == labels), protocol)


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
# Protocols, box conventions and the wsolevaluation-compatible computation
# --------------------------------------------------------------------------------------


def _protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not a WSOL protocol; choose one of: "
                         f"{', '.join(PROTOCOLS)}")
    return protocol


def _cv2() -> Any:
    """OpenCV, which only ``protocol="wsolevaluation"`` needs (its contours define the boxes)."""
    try:
        import cv2
    except ImportError:
        raise ImportError(
            'protocol="wsolevaluation" needs OpenCV for the reference\'s contour boxes; '
            'install the extra: pip install -e ".[wsol]"'
        ) from None
    return cv2


def reference_thresholds(interval: float = REFERENCE_CAM_CURVE_INTERVAL) -> np.ndarray:
    """The reference's score-map threshold grid ``np.arange(0, 1, interval)``, unrounded.

    The exact floats matter: the reference truncates ``tau * max(q)`` to an integer, and
    e.g. ``0.29 * 100`` is ``28.999999999999996``.
    """
    if not 0 < interval < 1:
        raise ValueError(f"interval={interval!r} must lie in (0, 1)")
    return np.arange(0, 1, interval)


def default_thresholds(protocol: str = "gapjax") -> np.ndarray:
    """The threshold grid a metric uses when given none: ``DEFAULT_THRESHOLDS`` for
    ``"gapjax"``, ``reference_thresholds()`` (step 0.001) for ``"wsolevaluation"``."""
    if _protocol(protocol) == "gapjax":
        return DEFAULT_THRESHOLDS
    return reference_thresholds()


def boxes_from_reference(boxes: Any, image_size: Any) -> np.ndarray:
    """Reference pixel boxes -> gapjax normalised boxes.

    Args:
      boxes: ``[..., 4]`` integer ``(x0, y0, x1, y1)``, pixel-inclusive (the reference's
        ``localization.txt``), on an image of ``image_size``.
      image_size: ``(height, width)`` in pixels, broadcast against ``boxes[..., 0]``.

    Returns ``[..., 4]`` float64 ``(y0 / H, x0 / W, (y1 + 1) / H, (x1 + 1) / W)``.
    """
    boxes = np.asarray(boxes, np.float64)
    size = np.asarray(image_size, np.float64)
    height, width = size[..., 0], size[..., 1]
    return np.stack([boxes[..., 1] / height, boxes[..., 0] / width,
                     (boxes[..., 3] + 1) / height, (boxes[..., 2] + 1) / width], axis=-1)


def boxes_to_reference(boxes: Any, image_size: Any) -> np.ndarray:
    """Inverse of ``boxes_from_reference``: normalised ``[..., 4]`` -> int64 ``(x0, y0, x1,
    y1)`` pixel-inclusive on an image of ``image_size = (height, width)``.

    Exact for boxes made by ``boxes_from_reference`` (also after a float32 round trip):
    coordinates are rounded to the nearest pixel edge.
    """
    boxes = np.asarray(boxes, np.float64)
    size = np.asarray(image_size, np.float64)
    height, width = size[..., 0], size[..., 1]
    edges = np.stack([boxes[..., 1] * width, boxes[..., 0] * height,
                      boxes[..., 3] * width, boxes[..., 2] * height], axis=-1)
    pixels = np.rint(edges).astype(np.int64)
    return pixels - np.array([0, 0, 1, 1], np.int64)


def reference_resize_boxes(boxes: Any, image_size: Any, new_size: Any) -> np.ndarray:
    """Scales pixel boxes ``[..., 4]`` from ``image_size`` to ``new_size`` (both
    ``(height, width)``) the reference's way: ``int(x * new_w / w)``, truncated."""
    boxes = np.asarray(boxes, np.float64)
    old = np.asarray(image_size, np.float64)
    new = np.asarray(new_size, np.float64)
    scale_from = np.stack([old[..., 1], old[..., 0], old[..., 1], old[..., 0]], axis=-1)
    scale_to = np.stack([new[..., 1], new[..., 0], new[..., 1], new[..., 0]], axis=-1)
    return np.trunc(boxes * scale_to / scale_from).astype(np.int64)


def reference_box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise IoU of integer pixel-inclusive boxes ``[A, 4]``, ``[B, 4]`` -> ``[A, B]``.

    Areas count pixels (``x1 - x0 + 1``); a non-positive union gives 0, as in the reference.
    """
    a = np.asarray(boxes_a, np.int64).reshape(-1, 4)[:, None]
    b = np.asarray(boxes_b, np.int64).reshape(-1, 4)[None]
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    intersection = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)


def reference_normalize(score_map: Any) -> np.ndarray:
    """The reference's per-map min-max normalisation in float64: a map with a NaN or a
    constant map becomes all zeros, otherwise ``(m - min) / max(m - min)``."""
    score_map = np.array(score_map, np.float64)
    if np.isnan(score_map).any() or score_map.min() == score_map.max():
        return np.zeros_like(score_map)
    shifted = score_map - score_map.min()
    return shifted / shifted.max()


def reference_resize(score_map: Any, size: tuple[int, int]) -> np.ndarray:
    """A raw class map ``[h, w]`` resized to ``size = (height, width)`` with OpenCV's bicubic
    interpolation in float64, as the reference does before normalising.

    (The reference passes the size as ``(height, width)`` where OpenCV expects ``(width,
    height)``; its inputs are square, where the two agree. Here the orientation is kept.)
    """
    cv2 = _cv2()
    height, width = (int(v) for v in size)
    return cv2.resize(np.asarray(score_map, np.float64), (width, height),
                      interpolation=cv2.INTER_CUBIC)


def _reference_map(score_map: Any) -> np.ndarray:
    """A score map the reference accepts: float64 ``[H, W]`` in ``[0, 1]``, no NaN."""
    score_map = np.asarray(score_map, np.float64)
    if score_map.ndim != 2:
        raise ValueError(f"score_map must have shape [H, W]; got {score_map.shape}")
    if np.isnan(score_map).any():
        raise ValueError("score maps contain NaN; normalise them first "
                         "(gapjax.wsol.reference_normalize)")
    if score_map.size and (score_map.min() < 0 or score_map.max() > 1):
        raise ValueError(
            f"score maps must lie in [0, 1] for protocol='wsolevaluation' (no tolerance, "
            f"as in the reference); got [{score_map.min():.6g}, {score_map.max():.6g}]")
    return score_map


def reference_boxes_by_level(score_map: Any, thresholds: Any) -> tuple[list, list, np.ndarray]:
    """Contour boxes of one map at every threshold, computed once per distinct 8-bit level.

    Args:
      score_map: ``[H, W]`` in ``[0, 1]``.
      thresholds: the grid ``tau [T]``.

    Returns ``(largest, every, level_of)``: for each distinct 8-bit level ``l`` (in
    increasing order), ``largest[l]`` is the ``[1, 4]`` box of the contour of largest area
    and ``every[l]`` the ``[n, 4]`` boxes of all contours (``(0, 0, 0, 0)`` when there is
    none), int64 ``(x0, y0, x1, y1)``; ``level_of [T]`` maps each threshold to its level.
    """
    cv2 = _cv2()
    score_map = _reference_map(score_map)
    height, width = score_map.shape
    quantised = (score_map * 255).astype(np.uint8)
    top = float(quantised.max()) if quantised.size else 0.0
    levels = (np.asarray(thresholds, np.float64) * top).astype(np.int64)
    distinct, level_of = np.unique(levels, return_inverse=True)
    largest, every = [], []
    for level in distinct:
        foreground = np.where(quantised > level, np.uint8(255), np.uint8(0))
        contours = cv2.findContours(foreground, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if len(contours) == 0:
            empty = np.zeros((1, 4), np.int64)
            largest.append(empty)
            every.append(empty)
            continue
        rects = np.array([cv2.boundingRect(contour) for contour in contours], np.int64)
        boxes = np.stack([rects[:, 0], rects[:, 1],
                          np.minimum(rects[:, 0] + rects[:, 2], width - 1),
                          np.minimum(rects[:, 1] + rects[:, 3], height - 1)], axis=1)
        areas = np.array([cv2.contourArea(contour) for contour in contours])
        largest.append(boxes[int(np.argmax(areas))][None])  # first of equal areas
        every.append(boxes)
    return largest, every, level_of.reshape(-1)


def reference_iou_curves(
    score_maps: Any, truth_boxes: Any, thresholds: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's best IoU per image and threshold, ``(largest [N, T], every [N, T])``.

    Args:
      score_maps: ``[N, H, W]`` in ``[0, 1]`` (float64 or exactly representable).
      truth_boxes: per image an int array ``[M, 4]`` of pixel-inclusive ``(x0, y0, x1, y1)``
        boxes on the score map's grid (a list, or ``[N, M, 4]``; rows with a negative
        coordinate are padding).
      thresholds: the grid ``tau [T]``.
    """
    grid = np.asarray(thresholds, np.float64).reshape(-1)
    count = len(score_maps)
    largest = np.zeros((count, len(grid)))
    every = np.zeros((count, len(grid)))
    for index in range(count):
        truth = np.asarray(truth_boxes[index], np.int64).reshape(-1, 4)
        truth = truth[(truth >= 0).all(axis=1)]
        if len(truth) == 0:
            raise ValueError(f"image {index} has no ground-truth box; the reference needs one")
        level_largest, level_every, level_of = reference_boxes_by_level(score_maps[index], grid)
        best_largest = np.array([reference_box_iou(b, truth).max() for b in level_largest])
        best_every = np.array([reference_box_iou(b, truth).max() for b in level_every])
        largest[index] = best_largest[level_of]
        every[index] = best_every[level_of]
    return largest, every


def _percent(iou_threshold: float) -> int:
    """An IoU threshold as the reference's integer percentage (0.5 -> 50)."""
    percent = round(float(iou_threshold) * 100)
    if not 0 <= percent <= 100 or abs(percent - float(iou_threshold) * 100) > 1e-6:
        raise ValueError(f"iou_threshold={iou_threshold!r} must be a whole percentage in "
                         "[0, 1] for protocol='wsolevaluation' (e.g. 0.3, 0.5, 0.7)")
    return percent


def reference_correct_counts(ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Images localized per threshold, ``ious [N, T] -> [T]`` counts, the reference's way:
    ``iou >= percent / 100``."""
    return (np.asarray(ious) >= _percent(iou_threshold) / 100).sum(axis=0)


def reference_accuracy(counts: np.ndarray, images: int) -> np.ndarray:
    """Counts -> the reference's percentages ``count * 100. / images``."""
    if images <= 0:
        raise ValueError("box accuracy needs at least one image; got none")
    return np.asarray(counts, np.float64) * 100.0 / float(images)


def reference_pixel_histograms(
    score_maps: Any, masks: Any, thresholds: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's PxAP score histograms ``(foreground [T+2], background [T+2])``.

    Bins are those of ``np.histogram`` over the edges ``thresholds + [1, 2, 3]`` (left-closed,
    the last closed). ``masks [N, H, W]``: 1 (or True) foreground, 0 background, 255
    ignored (any other value counts nowhere, as in the reference).
    """
    grid = np.asarray(thresholds, np.float64).reshape(-1)
    edges = np.append(grid, [1.0, 2.0, 3.0])
    maps = np.asarray(score_maps, np.float64)
    masks = np.asarray(masks)
    if masks.shape != maps.shape:
        raise ValueError(f"masks must have the shape of score_maps {maps.shape}; "
                         f"got {masks.shape}")
    for score_map in maps.reshape(-1, *maps.shape[-2:]):
        _reference_map(score_map)
    masks = masks.astype(np.int64) if masks.dtype == bool else masks
    scores = maps.ravel()
    bins = np.searchsorted(edges, scores, side="right") - 1
    bins = np.where(scores == edges[-1], len(edges) - 2, bins)  # the last bin is closed
    inside = (bins >= 0) & (bins < len(edges) - 1)

    def histogram(selected):
        return np.bincount(bins[selected & inside], minlength=len(edges) - 1).astype(np.float64)

    flat = masks.ravel()
    return histogram(flat == 1), histogram(flat == 0)


def reference_pxap_from_histograms(foreground: Any, background: Any) -> float:
    """The reference's PxAP (a percentage) from ``reference_pixel_histograms`` counts."""
    foreground = np.asarray(foreground, np.float64)
    background = np.asarray(background, np.float64)
    true_positive = foreground[::-1].cumsum()
    false_negative = foreground.sum() - true_positive
    false_positive = background[::-1].cumsum()
    if ((true_positive + false_negative) <= 0).all():
        raise ValueError("PxAP needs at least one foreground pixel in the masks; got none")
    predicted = true_positive + false_positive
    if (predicted <= 0).all():
        raise ValueError("PxAP needs at least one pixel above a threshold; got none")
    nonzero = predicted != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = true_positive / predicted
        recall = true_positive / (true_positive + false_negative)
    area = (precision[1:] * np.diff(recall))[nonzero[1:]].sum()
    return float(area * 100)


def _reference_truth(gt_boxes: Any, map_shape: tuple[int, int], image_sizes: Any,
                     box_size: tuple[int, int] | None = None) -> list:
    """gapjax normalised ``[N, M, 4]`` boxes -> the reference's int pixel boxes.

    With ``image_sizes [N, 2]`` (each image's original ``(height, width)``) a box goes back
    to the original pixels (``boxes_to_reference``) and is scaled with the reference's
    truncation to ``box_size`` (default ``REFERENCE_RESIZE_LENGTH`` squared, as the
    reference does for any map); without, the map is taken to be the original image.
    """
    if box_size is None:
        box_size = (REFERENCE_RESIZE_LENGTH, REFERENCE_RESIZE_LENGTH)
    truth = []
    for index, boxes in enumerate(np.asarray(gt_boxes, np.float64)):
        real = boxes[(boxes >= 0).all(axis=1)]
        if image_sizes is None:
            truth.append(boxes_to_reference(real, map_shape))
        else:
            original = np.asarray(image_sizes[index], np.float64)
            pixels = boxes_to_reference(real, original)
            truth.append(reference_resize_boxes(pixels, original, box_size))
    return truth


# --------------------------------------------------------------------------------------
# Evaluator used by the training loop
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def localization_map_fn(
    model: Any, method: str, resize: str | None = "bilinear", normalize: bool = True
) -> Any:
    """The jitted ``fn(variables, images, targets) -> gapjax.cam.CamOutput`` evaluators use
    (by default maps resized to the input and normalised; ``resize=None, normalize=False``
    gives the raw feature-size maps), one per (model, method, resize, normalize): the
    training loop builds a new evaluator at every evaluation, and this spares each one a
    recompilation. ``model`` must be hashable (Linen modules are)."""
    from gapjax import cam

    return cam.make_map_fn(model, method, resize=resize, normalize=normalize)


def overlay_grid(images: Any, maps: Any, boxes: Any = None, columns: int = 4,
                 predicted: Any = None) -> np.ndarray:
    """A picture of where a network looks: ``uint8 [rows * H, columns * W, 3]``.

    Each tile is an image (per-image min-max scaled to grey or colour) blended with its
    score map in a blue-to-red colour scale, ground-truth boxes (normalised ``[M, 4]`` per
    image, padding rows ignored) drawn in green and estimated boxes in white.

    Args:
      images: ``[N, H, W, C]`` (any range; C of 1 or 3).
      maps: ``[N, H, W]`` in ``[0, 1]``.
      boxes: optional ``[N, M, 4]`` normalised ``(ymin, xmin, ymax, xmax)``.
      predicted: optional estimated boxes, a list of ``[n, 4]`` normalised per image.
    """
    images = np.asarray(images, np.float64)
    maps = np.clip(np.nan_to_num(np.asarray(maps, np.float64)), 0.0, 1.0)
    if images.ndim != 4 or maps.shape != images.shape[:3]:
        raise ValueError(f"images [N, H, W, C] and maps [N, H, W] must agree; got "
                         f"{images.shape} and {maps.shape}")
    count, height, width = maps.shape
    low = images.min(axis=(1, 2, 3), keepdims=True)
    spread = images.max(axis=(1, 2, 3), keepdims=True) - low
    shown = (images - low) / np.where(spread > 0, spread, 1.0)
    if shown.shape[-1] != 3:
        shown = np.repeat(shown[..., :1], 3, axis=-1)
    heat = np.stack([maps, 1.0 - np.abs(2.0 * maps - 1.0), 1.0 - maps], axis=-1)
    tiles = 0.5 * shown + 0.5 * heat
    for drawn, colour in ((predicted, (1.0, 1.0, 1.0)), (boxes, (0.0, 1.0, 0.0))):
        if drawn is None:
            continue
        for tile, image_boxes in zip(tiles, drawn):
            image_boxes = np.asarray(image_boxes, np.float64).reshape(-1, 4)
            for box in image_boxes[(image_boxes >= 0).all(axis=1)]:
                top = min(height - 1, int(box[0] * height))
                left = min(width - 1, int(box[1] * width))
                bottom = min(height - 1, max(top, int(np.ceil(box[2] * height)) - 1))
                right = min(width - 1, max(left, int(np.ceil(box[3] * width)) - 1))
                tile[top:bottom + 1, [left, right]] = colour
                tile[[top, bottom], left:right + 1] = colour
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    grid = np.ones((rows * height, columns * width, 3))
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = tile
    return (grid * 255).round().astype(np.uint8)


class LocalizationEvaluator:
    """Accumulates localization metrics over evaluation batches.

    ``update(variables, batch)`` computes the true class's maps for ``batch["image"]``
    (one jitted forward pass via ``gapjax.cam.compute_maps``) and keeps per-threshold counts
    and pixel histograms on the host; ``result()`` returns ``top1_loc``, ``gt_known_loc``,
    ``max_box_acc``, ``max_box_acc_v2``, ``loc_threshold`` (the map threshold top-1 and
    GT-known localization used) and, when batches carry ``segmentation`` masks, ``pxap``.
    Top-1 and GT-known localization use ``loc_threshold``, or (None) the calibrated
    threshold, at which GT-known localization equals MaxBoxAcc.

    ``protocol="gapjax"``: maps upsampled to the input in JAX (``resize``) and min-max
    normalised; metrics are fractions. ``protocol="wsolevaluation"``: the reference's
    pipeline: the raw map resized to the input with OpenCV's bicubic interpolation, then
    ``reference_normalize``; its boxes, IoU and histograms; metrics are its percentages,
    and ``max_box_acc_v2_iou{30,50,70}`` are added (its ``localization_IOU_*``). Boxes are
    scaled to the input from each image's original size when batches carry
    ``image_size [b, 2]`` (original ``(height, width)``), as the reference scales its boxes
    to 224 x 224.

    Batches need ``image [b, H, W, C]``, ``label [b]`` and ``bbox [b, M, 4]``; rows with
    ``weight == 0`` (padding) are skipped. ``segmentation [b, H, W]``: 1 foreground,
    0 background, 255 ignored; a dataset with masks and no boxes (OpenImages) gets
    ``pxap`` alone. ``variables`` are unreplicated. The first ``overlay_images``
    real images and their maps are kept for ``overlay()``.
    """

    def __init__(
        self,
        model: Any,
        method: str = "auto",
        thresholds: Any = None,
        loc_threshold: float | None = None,
        resize: str = "bilinear",
        protocol: str = "gapjax",
        overlay_images: int = 0,
    ):
        from gapjax import cam  # same floor; imported here to keep the metrics numpy-only

        self.protocol = _protocol(protocol)
        if self.protocol == "wsolevaluation":
            _cv2()  # fail now, not at the first batch
        self.method = cam.resolve_method(model, method)
        self.thresholds = _thresholds(default_thresholds(protocol) if thresholds is None
                                      else thresholds)
        self.loc_threshold = None if loc_threshold is None else float(loc_threshold)
        self.overlay_images = int(overlay_images)
        compat = self.protocol == "wsolevaluation"
        options = (model, self.method, None if compat else resize, not compat)
        try:
            self._map_fn = localization_map_fn(*options)
        except TypeError:  # an unhashable model: compile for this evaluator alone
            self._map_fn = cam.make_map_fn(model, self.method, resize=options[2],
                                           normalize=options[3])
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated."""
        size = len(self.thresholds)
        self._images = 0
        self._box_images = 0
        # Counts per threshold: localized (V1, IoU >= 0.5), localized and classified right,
        # and localized with V2 boxes at each IoU of V2_IOU_THRESHOLDS.
        self._localized = np.zeros(size)
        self._localized_correct = np.zeros(size)
        self._localized_v2 = np.zeros((len(V2_IOU_THRESHOLDS), size))
        # The same two counts at the fixed loc_threshold, when there is one.
        self._fixed = np.zeros(2)
        bins = (len(self.thresholds) + 2 if self.protocol == "wsolevaluation"
                else len(_pixel_grid(self.thresholds)))
        self._foreground = np.zeros(bins)
        self._background = np.zeros(bins)
        self._shown: dict[str, list[np.ndarray]] = {"image": [], "maps": [], "bbox": []}

    def _maps(self, variables: Mapping[str, Any], images: Any, labels: np.ndarray):
        """``(maps [b, H, W] float64, logits [b, K])`` as the protocol prescribes."""
        output = self._map_fn(variables, images, labels)
        maps = np.asarray(output.maps, np.float64)
        if self.protocol == "wsolevaluation":
            size = np.shape(images)[1:3]
            maps = np.stack([reference_normalize(reference_resize(raw, size)) for raw in maps])
        return maps, np.asarray(output.logits)

    def update(self, variables: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        """Adds one batch (see the class docstring for its keys)."""
        for key in ("image", "label", "bbox"):
            if key not in batch and not (key == "bbox" and "segmentation" in batch):
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
        all_maps, logits = self._maps(variables, batch["image"], labels)
        real = np.asarray(batch.get("weight", np.ones(len(labels)))) > 0
        maps = all_maps[real]
        protocol = self.protocol
        self._images += int(real.sum())
        if "segmentation" in batch:
            foreground, background = pixel_histograms(
                maps, np.asarray(batch["segmentation"])[real], self.thresholds, protocol
            )
            self._foreground += foreground
            self._background += background
        boxes = np.asarray(batch["bbox"])[real] if "bbox" in batch else None
        self._keep_for_overlay(np.asarray(batch["image"])[real], maps, boxes)
        if boxes is None:
            return
        sizes = np.asarray(batch["image_size"])[real] if "image_size" in batch else None
        correct = (logits.argmax(axis=-1) == labels)[real, None]
        box_size = tuple(np.shape(batch["image"])[1:3])  # the reference's 224 x 224 input
        largest, best = iou_curves(maps, boxes, self.thresholds, protocol, sizes, box_size)
        cutoff = 0.5 if protocol == "wsolevaluation" else 0.5 - _IOU_SLACK  # 50 / 100 == 0.5
        localized = largest >= cutoff
        self._box_images += len(maps)
        self._localized += localized.sum(axis=0)
        self._localized_correct += (localized & correct).sum(axis=0)
        for row, delta in enumerate(V2_IOU_THRESHOLDS):
            if protocol == "wsolevaluation":
                self._localized_v2[row] += reference_correct_counts(best, delta)
            else:
                self._localized_v2[row] += (best >= delta - _IOU_SLACK).sum(axis=0)
        if self.loc_threshold is not None:
            at_fixed, _ = iou_curves(maps, boxes, [self.loc_threshold], protocol, sizes,
                                     box_size)
            fixed = at_fixed >= cutoff
            self._fixed += [fixed.sum(), (fixed & correct).sum()]

    def _keep_for_overlay(self, images: np.ndarray, maps: np.ndarray, boxes: Any) -> None:
        missing = self.overlay_images - sum(len(part) for part in self._shown["image"])
        if missing > 0 and len(images):
            self._shown["image"].append(images[:missing])
            self._shown["maps"].append(maps[:missing])
            self._shown["bbox"].append(np.full((len(maps[:missing]), 1, 4), -1.0)
                                       if boxes is None else boxes[:missing])

    def overlay(self, columns: int = 4) -> np.ndarray | None:
        """``overlay_grid`` of the kept images with their estimated boxes (V1, at the
        fixed or calibrated threshold, the protocol's boxes); None when none were kept."""
        if not self._shown["image"] or not sum(len(p) for p in self._shown["image"]):
            return None
        width = max(part.shape[1] for part in self._shown["bbox"])
        padded = [np.concatenate([part, np.full((len(part), width - part.shape[1], 4), -1.0)],
                                 axis=1) for part in self._shown["bbox"]]
        parts = {key: np.concatenate(value) for key, value in self._shown.items()
                 if key != "bbox"}
        parts["bbox"] = np.concatenate(padded)
        threshold = self.loc_threshold
        if threshold is None:
            threshold = self.calibrated_threshold() if self._box_images else None
        predicted = None if threshold is None else [
            boxes_from_score_map(score_map, threshold, protocol=self.protocol)
            for score_map in parts["maps"]]
        return overlay_grid(parts["image"], parts["maps"], parts["bbox"], columns, predicted)

    def _totals(self) -> dict[str, np.ndarray]:
        """The counts summed over processes (a collective when there are several)."""
        import jax  # the metrics themselves are NumPy; only this collective needs JAX

        parts = {"images": np.array([self._images, self._box_images], np.float64),
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
        where MaxBoxAcc is attained (this process's images only; the first such one)."""
        return float(self.thresholds[int(np.argmax(self._localized))])

    def result(self) -> dict[str, float]:
        """The metrics over every image seen since the last ``reset``, on every process.

        With several processes every process must call it (the counts are summed with a
        collective).
        """
        totals = self._totals()
        if float(totals["images"][0]) == 0:
            raise ValueError("LocalizationEvaluator.result() called before any real image")
        metrics = {}
        if totals["foreground"].sum() > 0:
            metrics["pxap"] = pxap_from_histograms(totals["foreground"], totals["background"],
                                                   self.protocol)
        images = float(totals["images"][1])
        if images == 0:  # masks only (OpenImages): PxAP is the metric
            return metrics
        if self.loc_threshold is None:
            calibrated = int(np.argmax(totals["localized"]))
            localized = totals["localized"][calibrated]
            localized_correct = totals["localized_correct"][calibrated]
            threshold = float(self.thresholds[calibrated])
        else:
            localized, localized_correct = totals["fixed"]
            threshold = self.loc_threshold
        if self.protocol == "wsolevaluation":
            share = lambda counts: reference_accuracy(counts, int(images))
        else:
            share = lambda counts: np.asarray(counts, np.float64) / images
        per_iou = [share(row).max() for row in totals["localized_v2"]]
        metrics |= {
            "top1_loc": float(share(localized_correct)),
            "gt_known_loc": float(share(localized)),
            "max_box_acc": float(share(totals["localized"]).max()),
            "max_box_acc_v2": float(np.average(per_iou)),
            "loc_threshold": threshold,
        }
        if self.protocol == "wsolevaluation":
            for delta, value in zip(V2_IOU_THRESHOLDS, per_iou):
                metrics[f"max_box_acc_v2_iou{_percent(delta)}"] = float(value)
        return metrics


# --------------------------------------------------------------------------------------
# Saved score maps against a benchmark's metadata (the reference's evaluation.py)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitMetadata:
    """One split's annotations, in the order of ``image_ids.txt``.

    Attributes:
      image_ids: paths relative to the image root.
      labels: class per image.
      sizes: original ``(width, height)`` per image, or None (OpenImages has no file).
      boxes: pixel-inclusive ``(x0, y0, x1, y1)`` boxes per image, or None.
      masks: ``(mask paths, ignore path)`` per image, or None.
    """

    image_ids: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...] | None
    boxes: tuple[tuple[tuple[int, int, int, int], ...], ...] | None
    masks: tuple[tuple[tuple[str, ...], str], ...] | None


def _lines(path: str) -> list[list[str]]:
    with open(path) as handle:
        return [line.rstrip("\n").split(",") for line in handle if line.strip()]


def read_metadata(split_dir: str | os.PathLike, kind: str = "boxes") -> SplitMetadata:
    """Reads ``split_dir/{image_ids,class_labels,image_sizes,localization}.txt``.

    ``kind``: ``"boxes"`` (localization lines ``id,x0,y0,x1,y1``), ``"masks"`` (``id,mask,
    ignore``; later lines of an image add masks and leave the ignore path empty) or
    ``"none"`` (no localization file is read).
    """
    split_dir = os.fspath(split_dir)
    ids_path = os.path.join(split_dir, "image_ids.txt")
    if not os.path.exists(ids_path):
        raise FileNotFoundError(
            f"no image_ids.txt in {split_dir!r}; config.dataset.metadata_root must be the "
            "benchmark's metadata folder holding train/, val/ and test/ (the layout of "
            "clovaai/wsolevaluation's metadata/<dataset>)")
    image_ids = tuple(row[0] for row in _lines(ids_path))
    label_of = {row[0]: int(row[1]) for row in _lines(os.path.join(split_dir,
                                                                     "class_labels.txt"))}
    missing = [image_id for image_id in image_ids if image_id not in label_of]
    if missing:
        raise ValueError(f"{split_dir}/class_labels.txt has no label for {missing[0]!r}")
    sizes_path = os.path.join(split_dir, "image_sizes.txt")
    sizes = None
    if os.path.exists(sizes_path):
        size_of = {row[0]: (int(row[1]), int(row[2])) for row in _lines(sizes_path)}
        sizes = tuple(size_of[image_id] for image_id in image_ids)
    boxes = masks = None
    localization = os.path.join(split_dir, "localization.txt")
    if kind == "boxes" and os.path.exists(localization):
        box_of: dict[str, list[tuple[int, int, int, int]]] = {}
        for row in _lines(localization):
            x0, y0, x1, y1 = (int(value) for value in row[1:5])
            box_of.setdefault(row[0], []).append((x0, y0, x1, y1))
        boxes = tuple(tuple(box_of.get(image_id, ())) for image_id in image_ids)
    elif kind == "masks" and os.path.exists(localization):
        mask_of: dict[str, list[str]] = {}
        ignore_of: dict[str, str] = {}
        for image_id, mask, ignore in _lines(localization):
            mask_of.setdefault(image_id, []).append(mask)
            if image_id not in ignore_of:
                ignore_of[image_id] = ignore
        masks = tuple((tuple(mask_of.get(i, ())), ignore_of.get(i, "")) for i in image_ids)
    elif kind not in ("boxes", "masks", "none"):
        raise ValueError(f"kind={kind!r} is not one of: boxes, masks, none")
    return SplitMetadata(image_ids, tuple(label_of[i] for i in image_ids), sizes, boxes, masks)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST`` source index of each of ``target`` pixels:
    ``floor(i * (1 / (target / source)))``, clipped to the last pixel."""
    inverse = 1.0 / (target / source)
    return np.minimum(np.floor(np.arange(target) * inverse).astype(np.int64), source - 1)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """``array [h, w]`` resized like ``cv2.resize(..., INTER_NEAREST)`` without OpenCV."""
    rows = nearest_indices(array.shape[0], height)
    columns = nearest_indices(array.shape[1], width)
    return array[rows[:, None], columns[None, :]]


def reference_mask(mask_root: str, mask_paths: Sequence[str], ignore_path: str,
                   size: int) -> np.ndarray:
    """The reference's OpenImages ground truth at ``size x size``: uint8, 1 where any
    instance mask is > 0.5 after the nearest resize, 255 on the ignore region minus the
    foreground, 0 elsewhere."""
    from PIL import Image

    def load(path):
        with Image.open(os.path.join(mask_root, path)) as image:
            gray = np.asarray(image.convert("L"), np.float32)
        return resize_nearest(gray, size, size) > 0.5

    foreground = np.zeros((size, size), bool)
    for path in mask_paths:
        foreground |= load(path)
    ignore = load(ignore_path) & ~foreground if ignore_path else np.zeros_like(foreground)
    return foreground.astype(np.uint8) + np.uint8(IGNORE) * ignore.astype(np.uint8)


def evaluate_scoremaps(
    scoremap_root: str,
    split_dir: str,
    kind: str = "boxes",
    mask_root: str | None = None,
    cam_curve_interval: float = 0.01,
    multi_contour: bool = True,
    multi_iou: bool = True,
    iou_thresholds: tuple[float, ...] = V2_IOU_THRESHOLDS,
) -> dict[str, float]:
    """Scores saved maps exactly as the reference's ``evaluation.py`` does.

    Args:
      scoremap_root: folder of ``<image_id>.npy`` maps (``[H, W]`` in ``[0, 1]``; the
        reference's naming: ``c/x.jpg`` -> ``c/x.jpg.npy``).
      split_dir: the split's metadata folder (``metadata/CUB/test``), read with
        ``read_metadata``.
      kind: ``"boxes"`` (CUB, ILSVRC: MaxBoxAcc) or ``"masks"`` (OpenImages: PxAP).
      mask_root: the folder mask paths are relative to (``dataset/OpenImages``).
      cam_curve_interval: the threshold step (its command line's default 0.01).
      multi_contour / multi_iou: MaxBoxAccV2's two switches (both on: MaxBoxAccV2).
      iou_thresholds: the IoU list (30, 50, 70 %).

    Returns ``{"localization": ..., "max_box_acc_iou30": ...}`` (percentages): the
    reference's ``localization`` is the mean over ``iou_thresholds`` when ``multi_iou``,
    else the value at IoU 0.5; for masks, ``{"localization": PxAP, "pxap": PxAP}``.
    """
    meta = read_metadata(split_dir, kind)
    grid = reference_thresholds(cam_curve_interval)
    size = (REFERENCE_RESIZE_LENGTH, REFERENCE_RESIZE_LENGTH)

    def load(image_id):
        return np.load(os.path.join(scoremap_root, image_id + ".npy"))

    if kind == "masks":
        if meta.masks is None or mask_root is None:
            raise ValueError("mask evaluation needs localization.txt mask lines and mask_root")
        foreground = background = 0.0
        for image_id, (paths, ignore) in zip(meta.image_ids, meta.masks):
            mask = reference_mask(mask_root, paths, ignore, REFERENCE_RESIZE_LENGTH)
            counts = reference_pixel_histograms(load(image_id)[None], mask[None], grid)
            foreground, background = foreground + counts[0], background + counts[1]
        value = reference_pxap_from_histograms(foreground, background)
        return {"localization": value, "pxap": value}
    if meta.boxes is None or meta.sizes is None:
        raise ValueError(f"{split_dir} needs localization.txt boxes and image_sizes.txt")
    counts = np.zeros((len(iou_thresholds), len(grid)))
    for image_id, boxes, (width, height) in zip(meta.image_ids, meta.boxes, meta.sizes):
        truth = reference_resize_boxes(np.asarray(boxes), (height, width), size)
        largest, every = reference_iou_curves([load(image_id)], [truth], grid)
        ious = every if multi_contour else largest
        for row, delta in enumerate(iou_thresholds):
            counts[row] += reference_correct_counts(ious, delta)
    per_iou = [reference_accuracy(row, len(meta.image_ids)).max() for row in counts]
    metrics = {f"max_box_acc_iou{_percent(d)}": float(v) for d, v in zip(iou_thresholds, per_iou)}
    if multi_iou:
        metrics["localization"] = float(np.average(per_iou))
    else:
        metrics["localization"] = float(per_iou[[_percent(d) for d in iou_thresholds].index(50)])
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """``python -m gapjax.wsol --scoremap_root DIR --metadata_root metadata --dataset_name CUB
    --split test``: the reference's evaluation command line, computed by gapjax."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--scoremap_root", required=True)
    parser.add_argument("--metadata_root", default="metadata/")
    parser.add_argument("--mask_root", default="dataset/",
                        help="the folder holding OpenImages/ (as the reference's)")
    parser.add_argument("--dataset_name", required=True, choices=("CUB", "ILSVRC", "OpenImages"))
    parser.add_argument("--split", required=True, choices=("train", "val", "test"))
    parser.add_argument("--cam_curve_interval", type=float, default=0.01)
    parser.add_argument("--box_v1_metric", action="store_true",
                        help="MaxBoxAcc (largest contour, IoU 50) instead of MaxBoxAccV2")
    args = parser.parse_args(argv)
    masks = args.dataset_name == "OpenImages"
    result = evaluate_scoremaps(
        args.scoremap_root, os.path.join(args.metadata_root, args.dataset_name, args.split),
        "masks" if masks else "boxes", os.path.join(args.mask_root, "OpenImages"),
        args.cam_curve_interval, not args.box_v1_metric, not args.box_v1_metric)
    for key, value in result.items():
        print(f"{key}: {value!r}")
    return result


if __name__ == "__main__":
    main()
