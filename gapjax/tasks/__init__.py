"""Tasks: what a model learns from a batch (``TASKS``: classification, multilabel, graph,
regression, graph_regression, graph_multilabel).

Each task owns its per-example loss, its metrics, the aggregation of its evaluation
metrics and how a batch feeds the model (``gapjax.tasks.base.Task``). A fork adds a task
with ``@TASKS.register("mine")`` on a ``Task`` subclass in its own module and names it in
its ``DatasetSpec``.
"""

from gapjax.tasks.base import TASKS, Task, get
from gapjax.tasks.classification import Classification, top_k_correct
from gapjax.tasks.graph import GraphClassification
from gapjax.tasks.graph_multilabel import GraphMultiLabel
from gapjax.tasks.multilabel import MultiLabel
from gapjax.tasks.regression import GraphRegression, Regression

__all__ = ["TASKS", "Classification", "GraphClassification", "GraphMultiLabel",
           "GraphRegression", "MultiLabel", "Regression", "Task", "get", "top_k_correct"]
