"""``gradflow``: gradient-flow diagnostics of the training batch (``train/grad_<key>``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from gapjax import gradflow
from gapjax.evaluators.base import EVALUATORS, Evaluator


@EVALUATORS.register("gradflow")
@dataclasses.dataclass
class GradientFlowEval(Evaluator):
    """``gapjax.gradflow.training_diagnostics`` of the state after the step on the first
    ``max_examples`` rows of the batch it trained on (coverage, entropy, Gini, conflicts,
    collisions), as ``train/grad_<key>``; nothing under ``--eval_only`` (no batch)."""

    max_examples: int = gradflow.DEFAULT_MAX_EXAMPLES

    prefix: ClassVar[str] = "train/grad_"
    at_end: ClassVar[bool] = False

    def evaluate(self, state: Any, split: str, batch: Any = None, final: bool = False
                 ) -> dict[str, float]:
        if batch is None:
            return {}
        return gradflow.training_diagnostics(self.run.model, state.variables(), batch,
                                             self.run.task, self.max_examples)
