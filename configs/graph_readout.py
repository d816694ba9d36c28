"""GIN on ``gapjax_graph_tasks``: which readout can solve which task.

    python train.py --config configs/graph_readout.py --workdir DIR \
        --config.model.pool=mean --config.dataset.task=count

``model.pool``: the graph readout, sum | mean | max (any ``POOLS`` name);
``dataset.task``: presence | proportion | count. ``get_config("mean,count")`` sets both.
Graph batches are padded to static budgets, so use ``parallel="jit"``. Time on 2 CPU cores
(measured, sum readout on count): 25 s of training, 32 s with start-up; 100% test accuracy.
"""

from __future__ import annotations

import ml_collections

from gapjax.train.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg`` optionally ``"READOUT,TASK"`` (e.g. ``"max,proportion"``)."""
    config = base_config()
    config.batch_size = 64
    config.total_steps = 1500

    config.dataset.name = "gapjax_graph_tasks"
    config.dataset.task = "count"
    config.dataset.augment = False  # readouts are invariant to node order: nothing to augment

    config.model.name = "gin"
    config.model.pool = "sum"
    config.model.aggregator = "sum"
    config.model.num_layers = 2
    config.model.hidden = 32
    config.model.jumping_knowledge = True
    config.model.learn_eps = True

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5e-3
    config.optimizer.weight_decay = 1e-4

    if arg:
        readout, _, task = arg.partition(",")
        config.model.pool = readout
        if task:
            config.dataset.task = task
    return config
