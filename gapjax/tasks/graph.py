"""Graph classification: one class per graph of a packed ``GraphBatch``."""

from __future__ import annotations

from typing import Any

from gapjax.graph import GraphBatch
from gapjax.tasks.base import TASKS, Batch
from gapjax.tasks.classification import Classification


@TASKS.register("graph")
class GraphClassification(Classification):
    """Classification of the graphs of a batch: the model reads a ``GraphBatch`` built from
    the batch's graph keys, ``label [G]`` int32, ``weight [G]`` (0 for padding graphs).

    A batch packs its graphs' nodes and edges into shared budgets, so it cannot be split
    over devices or processes by rows, and initialisation needs the whole batch.
    """

    rows_split = False
    spatial_inputs = False

    def model_inputs(self, batch: Batch) -> GraphBatch:
        return GraphBatch.from_dict(batch)

    def init_inputs(self, batch: Batch) -> Any:
        return self.model_inputs(batch)
