"""``gradflow``: gradient-flow diagnostics of the training batch (``train/grad_<key>``).

Every ``every`` steps (``config.gradflow_every``), ``gapjax.gradflow.training_diagnostics``
of the state after the step on the first ``max_examples`` rows of the batch it trained
on: gradient coverage, entropy and Gini of each label over positions, conflicts and
collisions between labels. Needs a task with a spatial feature map and a per-label split
of its loss (classification, multilabel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from gapjax import gradflow
from gapjax.evaluators.base import EVALUATORS, Evaluator


@EVALUATORS.register("gradflow")
@dataclasses.dataclass
class GradientFlowEval(Evaluator):
    """``train/grad_<key>`` for every key of ``training_diagnostics``; nothing under
    ``--eval_only`` (there is no training batch)."""

    max_examples: int = gradflow.DEFAULT_MAX_EXAMPLES

    prefix: ClassVar[str] = "train/grad_"
    at_end: ClassVar[bool] = False

    def evaluate(self, state: Any, split: str, batch: Any = None, final: bool = False
                 ) -> dict[str, float]:
        if batch is None:
            return {}
        return gradflow.training_diagnostics(self.run.model, state.variables(), batch,
                                             self.run.task, self.max_examples)
