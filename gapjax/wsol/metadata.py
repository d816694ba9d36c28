"""Benchmark metadata in the reference's layout (``metadata/<dataset>/<split>/*.txt``), its
OpenImages masks, and saved score maps scored against them the way the reference's
``evaluation.py`` does (``evaluate_scoremaps``; the command line is ``python -m gapjax.wsol``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from gapjax.wsol.reference import (
    IGNORE,
    REFERENCE_RESIZE_LENGTH,
    V2_IOU_THRESHOLDS,
    _percent,
    reference_accuracy,
    reference_correct_counts,
    reference_iou_curves,
    reference_pixel_histograms,
    reference_pxap_from_histograms,
    reference_resize_boxes,
    reference_thresholds,
)


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
    if not os.path.isdir(scoremap_root):
        raise FileNotFoundError(f"score map folder {scoremap_root!r} does not exist")
    meta = read_metadata(split_dir, kind)
    if not meta.image_ids:
        raise ValueError(f"{split_dir}/image_ids.txt lists no image")
    grid = reference_thresholds(cam_curve_interval)
    size = (REFERENCE_RESIZE_LENGTH, REFERENCE_RESIZE_LENGTH)

    def load(image_id):
        path = os.path.join(scoremap_root, image_id + ".npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no score map {path!r} for image {image_id!r} (one "
                                    "<image_id>.npy per line of image_ids.txt)")
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"score map {path!r} is truncated or corrupt "
                             f"({type(error).__name__}: {error})") from None

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


__all__ = ["SplitMetadata", "evaluate_scoremaps", "nearest_indices", "read_metadata",
           "reference_mask", "resize_nearest"]
