"""The localization evaluator the training loop runs: maps of every evaluation batch, scored
with ``gapjax.wsol.metrics`` under either protocol, counts summed over processes."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from gapjax import cam
from gapjax.wsol.metrics import (
    _pixel_grid,
    _protocol,
    _thresholds,
    boxes_from_score_map,
    default_thresholds,
    iou_curves,
    localized,
    pixel_histograms,
    pxap_from_histograms,
    share,
)
from gapjax.wsol.overlay import overlay_grid
from gapjax.wsol.reference import (
    V2_IOU_THRESHOLDS,
    _cv2,
    _percent,
    reference_normalize,
    reference_resize,
)


@functools.lru_cache(maxsize=8)
def localization_map_fn(
    model: Any, method: str, resize: str | None = "bilinear", normalize: bool = True
) -> Any:
    """The jitted ``fn(variables, images, targets) -> gapjax.cam.CamOutput`` evaluators use
    (by default maps resized to the input and normalised; ``resize=None, normalize=False``
    gives the raw feature-size maps), one per (model, method, resize, normalize): the
    training loop builds a new evaluator at every evaluation, and this spares each one a
    recompilation. ``model`` must be hashable (Linen modules are)."""
    return cam.make_map_fn(model, method, resize=resize, normalize=normalize)


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
        bins = size + 2 if self.protocol == "wsolevaluation" else len(_pixel_grid(self.thresholds))
        # Sums over batches (and processes): images (real ones, those with boxes); per
        # threshold the images localized (V1, IoU >= 0.5), localized and classified right,
        # and localized with V2 boxes at each IoU of V2_IOU_THRESHOLDS; the first two at the
        # fixed loc_threshold; PxAP's pixel histograms.
        self._counts = {
            "images": np.zeros(2), "localized": np.zeros(size),
            "localized_correct": np.zeros(size),
            "localized_v2": np.zeros((len(V2_IOU_THRESHOLDS), size)), "fixed": np.zeros(2),
            "foreground": np.zeros(bins), "background": np.zeros(bins)}
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
        protocol, counts = self.protocol, self._counts
        counts["images"][0] += real.sum()
        if "segmentation" in batch:
            foreground, background = pixel_histograms(
                maps, np.asarray(batch["segmentation"])[real], self.thresholds, protocol
            )
            counts["foreground"] += foreground
            counts["background"] += background
        boxes = np.asarray(batch["bbox"])[real] if "bbox" in batch else None
        self._keep_for_overlay(np.asarray(batch["image"])[real], maps, boxes)
        if boxes is None:
            return
        sizes = np.asarray(batch["image_size"])[real] if "image_size" in batch else None
        correct = (logits.argmax(axis=-1) == labels)[real, None]
        box_size = tuple(np.shape(batch["image"])[1:3])  # the reference's 224 x 224 input
        largest, best = iou_curves(maps, boxes, self.thresholds, protocol, sizes, box_size)
        hits = localized(largest, 0.5, protocol)
        counts["images"][1] += len(maps)
        counts["localized"] += hits.sum(axis=0)
        counts["localized_correct"] += (hits & correct).sum(axis=0)
        for row, delta in enumerate(V2_IOU_THRESHOLDS):
            counts["localized_v2"][row] += localized(best, delta, protocol).sum(axis=0)
        if self.loc_threshold is not None:
            at_fixed, _ = iou_curves(maps, boxes, [self.loc_threshold], protocol, sizes,
                                     box_size)
            fixed = localized(at_fixed, 0.5, protocol)
            counts["fixed"] += [fixed.sum(), (fixed & correct).sum()]

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
            threshold = self.calibrated_threshold() if self._counts["images"][1] else None
        predicted = None if threshold is None else [
            boxes_from_score_map(score_map, threshold, protocol=self.protocol)
            for score_map in parts["maps"]]
        return overlay_grid(parts["image"], parts["maps"], parts["bbox"], columns, predicted)

    def _totals(self) -> dict[str, np.ndarray]:
        """The counts summed over processes (a collective when there are several)."""
        if jax.process_count() == 1:
            return self._counts
        gathered = multihost_utils.process_allgather(self._counts)  # each [processes, ...]
        return {key: np.asarray(value).sum(axis=0) for key, value in gathered.items()}

    def calibrated_threshold(self) -> float:
        """The grid threshold at which the most images are localized (V1 boxes, IoU >= 0.5):
        where MaxBoxAcc is attained (this process's images only; the first such one)."""
        return float(self.thresholds[int(np.argmax(self._counts["localized"]))])

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
            found = totals["localized"][calibrated]
            found_correct = totals["localized_correct"][calibrated]
            threshold = float(self.thresholds[calibrated])
        else:
            found, found_correct = totals["fixed"]
            threshold = self.loc_threshold
        in_unit = functools.partial(share, images=int(images), protocol=self.protocol)
        per_iou = [in_unit(row).max() for row in totals["localized_v2"]]
        metrics |= {
            "top1_loc": float(in_unit(found_correct)),
            "gt_known_loc": float(in_unit(found)),
            "max_box_acc": float(in_unit(totals["localized"]).max()),
            "max_box_acc_v2": float(np.average(per_iou)),
            "loc_threshold": threshold,
        }
        if self.protocol == "wsolevaluation":
            for delta, value in zip(V2_IOU_THRESHOLDS, per_iou):
                metrics[f"max_box_acc_v2_iou{_percent(delta)}"] = float(value)
        return metrics


__all__ = ["LocalizationEvaluator", "localization_map_fn"]
