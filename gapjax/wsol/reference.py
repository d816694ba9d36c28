"""The protocol of Choe et al.'s reference code (github.com/clovaai/wsolevaluation,
``evaluation.py``): ``protocol="wsolevaluation"`` of every metric returns exactly its
numbers, in its units (percentages), so that they can be put next to published tables.

It needs OpenCV (``pip install -e ".[wsol]"``: contours define the boxes) and follows the
reference convention for convention; docs/wsol.md ("The two protocols") tabulates them
against the gapjax protocol: 8-bit maps thresholded relative to their maximum, OpenCV
contour boxes (``RETR_TREE``, V1 by polygon area, ``(0, 0, 0, 0)`` when empty),
pixel-inclusive integer boxes with ``+1`` IoU, ground truth scaled to 224 with truncation,
an unrounded ``np.arange`` grid, ``np.histogram`` PxAP with 255 ignored, and bicubic
resizing plus min-max normalisation of the raw class maps.

Box convention shared by both protocols: the reference's pixel-inclusive box ``x0..x1`` on
a ``W``-pixel axis is ``(x0 / W, (x1 + 1) / W)`` in gapjax's normalised coordinates
(``boxes_from_reference``), and ``boxes_to_reference`` maps it back exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: IoU thresholds that MaxBoxAccV2 averages over.
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
#: Mask value of pixels that count neither as foreground nor as background (PxAP).
IGNORE = 255
#: The side the reference scales ground-truth boxes to (its score maps are 224 x 224).
REFERENCE_RESIZE_LENGTH = 224
#: The reference's threshold step in its training script (``--cam_curve_interval``).
REFERENCE_CAM_CURVE_INTERVAL = 0.001


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


def _per_coordinate(size: Any) -> np.ndarray:
    """``(height, width) [..., 2]`` -> ``(width, height, width, height) [..., 4]``, the
    extent of each coordinate of an ``(x0, y0, x1, y1)`` box."""
    size = np.asarray(size, np.float64)
    return np.stack([size[..., 1], size[..., 0], size[..., 1], size[..., 0]], axis=-1)


#: ``(x0, y0, x1, y1)`` <-> ``(y0, x0, y1, x1)`` (its own inverse).
_SWAP_AXES = [1, 0, 3, 2]
_FAR_EDGES = np.array([0, 0, 1, 1], np.int64)


def boxes_from_reference(boxes: Any, image_size: Any) -> np.ndarray:
    """Reference pixel boxes -> gapjax normalised boxes.

    Args:
      boxes: ``[..., 4]`` integer ``(x0, y0, x1, y1)``, pixel-inclusive (the reference's
        ``localization.txt``), on an image of ``image_size``.
      image_size: ``(height, width)`` in pixels, broadcast against ``boxes[..., 0]``.

    Returns ``[..., 4]`` float64 ``(y0 / H, x0 / W, (y1 + 1) / H, (x1 + 1) / W)``.
    """
    edges = np.asarray(boxes, np.float64) + _FAR_EDGES
    return (edges / _per_coordinate(image_size))[..., _SWAP_AXES]


def boxes_to_reference(boxes: Any, image_size: Any) -> np.ndarray:
    """Inverse of ``boxes_from_reference``: normalised ``[..., 4]`` -> int64 ``(x0, y0, x1,
    y1)`` pixel-inclusive on an image of ``image_size = (height, width)``.

    Exact for boxes made by ``boxes_from_reference`` (also after a float32 round trip):
    coordinates are rounded to the nearest pixel edge.
    """
    edges = np.asarray(boxes, np.float64)[..., _SWAP_AXES] * _per_coordinate(image_size)
    return np.rint(edges).astype(np.int64) - _FAR_EDGES


def reference_resize_boxes(boxes: Any, image_size: Any, new_size: Any) -> np.ndarray:
    """Scales pixel boxes ``[..., 4]`` from ``image_size`` to ``new_size`` (both
    ``(height, width)``) the reference's way: ``int(x * new_w / w)``, truncated."""
    scaled = np.asarray(boxes, np.float64) * _per_coordinate(new_size)
    return np.trunc(scaled / _per_coordinate(image_size)).astype(np.int64)


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


def reference_box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise IoU of integer pixel-inclusive boxes ``[A, 4]``, ``[B, 4]`` -> ``[A, B]``.

    Areas count pixels (``x1 - x0 + 1``), as in the reference: the continuous ``box_iou``
    of the boxes one pixel longer at their far edges (exact: the areas are integers).
    """
    return box_iou(np.asarray(boxes_a, np.int64).reshape(-1, 4) + _FAR_EDGES,
                   np.asarray(boxes_b, np.int64).reshape(-1, 4) + _FAR_EDGES)


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


def reference_truth(gt_boxes: Any, map_shape: tuple[int, int], image_sizes: Any,
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


__all__ = ["IGNORE", "REFERENCE_CAM_CURVE_INTERVAL", "REFERENCE_RESIZE_LENGTH", "V2_IOU_THRESHOLDS",
           "box_iou", "boxes_from_reference", "boxes_to_reference", "reference_accuracy",
           "reference_box_iou", "reference_boxes_by_level", "reference_correct_counts",
           "reference_iou_curves", "reference_normalize", "reference_pixel_histograms",
           "reference_pxap_from_histograms", "reference_resize", "reference_resize_boxes",
           "reference_thresholds"]
