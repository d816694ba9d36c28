"""``localization``: weakly supervised localization from class maps (``gapjax.wsol``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from gapjax import wsol
from gapjax.evaluators.base import EVALUATORS, Evaluator


@EVALUATORS.register("localization")
@dataclasses.dataclass
class LocalizationEval(Evaluator):
    """Top-1 / GT-known localization, MaxBoxAcc(V2) and PxAP of the true class's maps
    (``method``: a ``gapjax.cam`` method; ``protocol``: ``"gapjax"`` or
    ``"wsolevaluation"``, docs/wsol.md) by ``gapjax.wsol.LocalizationEvaluator`` over
    batches with ``bbox`` or ``segmentation``. The final split is scored at the threshold
    calibrated on the eval split (``eval/loc_threshold``); ``overlay_images`` > 0 writes
    that many maps as ``eval/cam_overlay`` (TensorBoard and ``DIR/images``)."""

    method: str = "auto"
    protocol: str = "gapjax"
    overlay_images: int = 0

    def _meter(self, threshold: float | None = None, overlay_images: int = 0) -> Any:
        return wsol.LocalizationEvaluator(self.run.model, self.method, protocol=self.protocol,
                                          loc_threshold=threshold,
                                          overlay_images=overlay_images)

    def setup(self, run: Any) -> None:
        super().setup(run)
        self._meter()  # an unknown method or protocol fails now, not after training
        self._threshold = self._overlay = None

    def __call__(self, state: Any, step: int, batch: Any = None) -> dict[str, float]:
        metrics = super().__call__(state, step, batch)
        if self._overlay is not None:
            self.run.writer.write_image(step, "eval/cam_overlay", self._overlay)
        return metrics

    def evaluate(self, state: Any, split: str, batch: Any = None, final: bool = False
                 ) -> dict[str, float]:
        meter = self._meter(self._threshold if final else None,
                            0 if final else self.overlay_images)
        variables = state.variables()
        for local in self.run.batches(split):
            meter.update(variables, local)
        metrics = meter.result()
        if not final:
            self._threshold, self._overlay = metrics.get("loc_threshold"), meter.overlay()
        return metrics
