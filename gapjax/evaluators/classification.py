"""``classification``: the loss, accuracy and task metrics of a split (``eval/*``).

``eval_step`` is pure; the evaluator compiles it with the run's placement (jit over the
mesh or pmap), so every sum covers the global batch; padding rows (weight 0) never count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gapjax.evaluators.base import EVALUATORS, Evaluator, Run
from gapjax.tasks import Task


def zero_eval_sums(task: Task) -> dict[str, jax.Array]:
    """Fresh evaluation sums: one per ``task.metric_names`` and ``weight`` (float32)."""
    return {key: jnp.zeros((), jnp.float32) for key in (*task.metric_names, "weight")}


def eval_step(variables: dict[str, Any], batch: dict[str, Any], sums: dict[str, jax.Array],
              *, model: Any, task: Task, axis_name: str | None = None
              ) -> tuple[dict[str, jax.Array], jax.Array]:
    """Adds ``sum_i w_i m_i`` of each per-example metric ``m`` of the task (the loss
    without label smoothing, accuracy, ...) and ``sum_i w_i`` (``weight``) to ``sums``
    (``zero_eval_sums(task)``), over every device; also returns the logits ``[b, K]``
    float32 (for ``task.summarize``)."""
    weight = batch["weight"].astype(jnp.float32)
    logits = model.apply(variables, task.model_inputs(batch), train=False)
    values = {**task.example_metrics(logits, batch["label"]), "weight": 1.0}
    added = {key: (values[key] * weight).sum() for key in sums}
    if axis_name is not None:
        added = jax.lax.psum(added, axis_name)
    return {key: sums[key] + added[key] for key in sums}, logits.astype(jnp.float32)


@EVALUATORS.register("classification")
@dataclasses.dataclass
class ClassificationEval(Evaluator):
    """The weighted mean over the split of each ``task.metric_names`` (``loss``,
    ``accuracy``, ...), plus ``task.summarize`` of every example's logits when the task
    keeps them (``map``, ``ap_<k>``)."""

    def setup(self, run: Run) -> None:
        super().setup(run)
        self._step = run.parallel.compile(
            functools.partial(eval_step, model=run.model, task=run.task), donate_argnums=(2,))

    def evaluate(self, state: Any, split: str, batch: Any = None, final: bool = False
                 ) -> dict[str, float]:
        run, parallel = self.run, self.run.parallel
        variables = parallel.to_step_form(state.variables())
        sums = parallel.replicate(zero_eval_sums(run.task))
        kept = []
        for local in run.batches(split):
            sums, logits = self._step(variables, parallel.global_batch(local), sums)
            if run.task.keeps_outputs:
                kept.append((parallel.local_rows(logits), local["label"], local["weight"]))
        totals = parallel.fetch(sums)
        weight = max(float(totals.pop("weight")), 1.0)
        metrics = {key: float(value) / weight for key, value in totals.items()}
        if kept:
            logits, labels, weights = (np.concatenate(part) for part in zip(*kept))
            if jax.process_count() > 1:
                logits, labels, weights = (
                    np.asarray(multihost_utils.process_allgather(part, tiled=True))
                    for part in (logits, labels, weights))
            real = weights > 0
            metrics.update(run.task.summarize(logits[real], labels[real]))
        return metrics
