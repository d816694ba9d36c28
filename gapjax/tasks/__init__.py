"""Tasks: what a model learns from a batch (``TASKS``: classification, multilabel, graph).

Each task owns its per-example loss, its metrics, the aggregation of its evaluation
metrics and how a batch feeds the model (``gapjax.tasks.base.Task``). A fork adds a task
with ``@TASKS.register("mine")`` on a ``Task`` subclass in its own module and names it in
its ``DatasetSpec``.
"""

from gapjax.tasks.base import TASKS, Task, get
from gapjax.tasks.classification import Classification, top_k_correct
from gapjax.tasks.graph import GraphClassification
from gapjax.tasks.multilabel import MultiLabel

__all__ = ["TASKS", "Classification", "GraphClassification", "MultiLabel", "Task", "get",
           "top_k_correct"]
