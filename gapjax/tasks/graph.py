"""Tasks on packed graph batches: ``GraphInputs`` (how any graph task feeds its model)
and graph classification, one class per graph of a ``GraphBatch``."""

from __future__ import annotations

from typing import Any

from gapjax.graph import GraphBatch
from gapjax.tasks.base import TASKS, Batch
from gapjax.tasks.classification import Classification


class GraphInputs:
    """Mixed into a graph task: the model reads a ``GraphBatch`` built from the batch's
    graph keys. A batch packs its graphs' nodes and edges into shared budgets, so it
    cannot be split over devices or processes by rows, and initialisation needs the
    whole batch."""

    rows_split = False
    spatial_inputs = False

    def model_inputs(self, batch: Batch) -> GraphBatch:
        return GraphBatch.from_dict(batch)

    def init_inputs(self, batch: Batch) -> Any:
        return self.model_inputs(batch)


@TASKS.register("graph")
class GraphClassification(GraphInputs, Classification):
    """Classification of the graphs of a batch (``GraphInputs``): ``label [G]`` int32,
    ``weight [G]`` (0 for padding graphs)."""
