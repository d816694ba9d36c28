"""``gapjax_graph_tasks``: what a graph readout can know about a multiset of node colours.

Random graphs of 5-40 nodes coloured red, green or blue. The label depends only on the
multiset of colours, and each builder config asks for a different statistic of it (Xu et
al., "How Powerful are Graph Neural Networks?", ICLR 2019). The structure is a random
2-regular multigraph whose edges join nodes of the same colour (one random cycle per
colour), so it carries no information of its own: after any number of message-passing
layers a node's state depends on its colour only, the multiset of node states is the
multiset of colours, and the readout is the one thing that decides what a model can
know. (With edges between colours, neighbourhoods are local samples of the colour
distribution and a max readout over them estimates proportions and, through rare local
patterns in larger graphs, sizes, which blurs the comparison.)

* ``presence``: is there a red node (1-3 red nodes, or none)? A *set* property: sum,
  mean and max readouts can all represent it.
* ``proportion``: are most nodes red (red fraction 0.3-0.5 or 0.5-0.7, never exactly
  1/2)? A *distribution* property: sum and mean can represent it, max cannot.
* ``count``: are there at least ``COUNT_THRESHOLD`` = 10 red nodes (6-9 or 10-13 red)?
  The graph size is ``round(red / q)`` with the red fraction ``q`` drawn from the same
  range for both classes, so proportions do not reveal the answer. A *multiset*
  property: only sum can represent it.

Every config also holds the split ``fig3``: the three pairs of neighbourhoods of the
paper's Figure 3, each a star whose centre (blue) has the leaf colours below; label =
member of the pair (0 for ``v``, 1 for ``v'``), ``pair`` = index of the pair.

* (a) ``{g, g}`` vs ``{g, g, g}``: mean and max both fail, sum separates them.
* (b) ``{g, r}`` vs ``{g, r, r}``: max fails, mean and sum separate them.
* (c) ``{g, r}`` vs ``{g, g, r, r}``: mean and max both fail, sum separates them.

Examples store variable-length arrays: ``colors [n]``, ``senders [e]``, ``receivers [e]``
(both directions of each undirected edge; ``e = 2n`` for the random graphs). Generation
is deterministic (NumPy seeded by task, split and index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data.spec import DatasetSpec, register
from gapjax.graph import batch_graphs

NAME = "gapjax_graph_tasks"
# The readout problems (``config.dataset.task``); the learning task is "graph" (gapjax.tasks).
VARIANTS = ("presence", "proportion", "count")
COLORS = ("red", "green", "blue")
RED, GREEN, BLUE = range(len(COLORS))
NUM_COLORS = len(COLORS)
MIN_NODES, MAX_NODES = 5, 40
# Every node receives exactly two messages (see ``random_structure``).
MAX_EDGES = 2 * MAX_NODES
COUNT_THRESHOLD = 10
NUM_TRAIN, NUM_TEST = 4000, 1000
_TASK_SEEDS = {task: index for index, task in enumerate(VARIANTS)}
_SPLIT_SEEDS = {"train": 1, "test": 2}

#: The multisets of Figure 3 as (leaves of v, leaves of v'), and which aggregators the
#: theory says tell them apart.
FIG3_PAIRS = (
    ("a", (GREEN, GREEN), (GREEN, GREEN, GREEN)),
    ("b", (GREEN, RED), (GREEN, RED, RED)),
    ("c", (GREEN, RED), (GREEN, GREEN, RED, RED)),
)
FIG3_SEPARATES = {
    "sum": (True, True, True),
    "mean": (False, True, False),
    "max": (False, False, False),
}


# --------------------------------------------------------------------------------------
# Generators (pure NumPy)
# --------------------------------------------------------------------------------------


def random_structure(colors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random 2-regular multigraph whose edges join nodes of the same colour.

    The nodes of each colour form one cycle in random order (for two nodes the cycle is a
    double edge, for a lone node a double self-loop), so every node receives exactly two
    messages, both from nodes of its own colour. Returns ``(senders, receivers)`` int32
    ``[2n]`` with both directions of every edge.
    """
    senders, receivers = [], []
    for color in np.unique(colors):
        cycle = rng.permutation(np.flatnonzero(colors == color)).astype(np.int32)
        following = np.roll(cycle, -1)
        senders += [cycle, following]
        receivers += [following, cycle]
    return np.concatenate(senders), np.concatenate(receivers)


def _colours(num_nodes: int, num_red: int, rng: np.random.Generator) -> np.ndarray:
    others = rng.choice(np.array([GREEN, BLUE], np.int32), size=num_nodes - num_red)
    return rng.permutation(np.concatenate([np.full(num_red, RED, np.int32), others]))


def sample_colour_counts(task: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """Draws ``(label, num_nodes, num_red)`` for ``task``; labels are balanced."""
    label = int(rng.integers(2))
    if task == "presence":
        num_nodes = int(rng.integers(MIN_NODES, MAX_NODES + 1))
        num_red = int(rng.integers(1, 4)) if label else 0
    elif task == "proportion":
        num_nodes = int(rng.integers(MIN_NODES, MAX_NODES + 1))
        if label:  # strictly more than half red, at most 70 %
            low = num_nodes // 2 + 1
            high = max(low, int(np.floor(0.7 * num_nodes)))
        else:  # strictly less than half red, at least 30 %
            high = (num_nodes - 1) // 2
            low = min(high, int(np.ceil(0.3 * num_nodes)))
        num_red = int(rng.integers(low, high + 1))
    elif task == "count":
        num_red = int(
            rng.integers(COUNT_THRESHOLD, COUNT_THRESHOLD + 4)
            if label
            else rng.integers(COUNT_THRESHOLD - 4, COUNT_THRESHOLD)
        )
        # The same red-fraction range for both classes: only the count tells them apart.
        fraction = rng.uniform(0.35, 0.85)
        num_nodes = int(np.clip(round(num_red / fraction), max(MIN_NODES, num_red), MAX_NODES))
    else:
        raise ValueError(f"unknown graph task {task!r}; choose one of: {', '.join(VARIANTS)}")
    return label, num_nodes, num_red


def generate_example(task: str, rng: np.random.Generator) -> dict[str, Any]:
    """One random coloured graph for ``task``: ``colors``, ``senders``, ``receivers``, ``label``."""
    label, num_nodes, num_red = sample_colour_counts(task, rng)
    colors = _colours(num_nodes, num_red, rng)
    senders, receivers = random_structure(colors, rng)
    return {
        "colors": colors,
        "senders": senders,
        "receivers": receivers,
        "label": label,
        "pair": -1,
    }


def star(center: int, leaves: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A star graph: node 0 has colour ``center`` and is joined to one leaf per colour."""
    leaf_ids = np.arange(1, len(leaves) + 1, dtype=np.int32)
    return {
        "colors": np.array([center, *leaves], np.int32),
        "senders": np.concatenate([np.zeros_like(leaf_ids), leaf_ids]),
        "receivers": np.concatenate([leaf_ids, np.zeros_like(leaf_ids)]),
    }


def fig3_examples() -> list[dict[str, Any]]:
    """The six star graphs of Figure 3, in pair order ``(a: v, v'), (b: v, v'), (c: v, v')``."""
    examples = []
    for pair, (_, leaves, other_leaves) in enumerate(FIG3_PAIRS):
        for member, member_leaves in enumerate((leaves, other_leaves)):
            examples.append({**star(BLUE, member_leaves), "label": member, "pair": pair})
    return examples


# --------------------------------------------------------------------------------------
# TFDS builder
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class GraphTasksConfig(tfds.core.BuilderConfig):
    """A task and split sizes."""

    task: str = "presence"
    num_train: int = NUM_TRAIN
    num_test: int = NUM_TEST


def builder_config(dataset_config: Any) -> GraphTasksConfig:
    """``config.dataset`` -> the builder config, checking every key it reads.

    Keys: ``task`` (``presence`` | ``proportion`` | ``count``, default ``presence``) and,
    for quick runs and tests, ``num_train`` / ``num_test`` (default 4000 / 1000; other
    counts get their own config name so their files never mix with the standard ones).
    """
    get = dataset_config.get
    task = get("task", "presence")
    num_train = get("num_train", NUM_TRAIN)
    num_test = get("num_test", NUM_TEST)
    if task not in VARIANTS:
        raise ValueError(
            f"config.dataset.task={task!r} is not available for {NAME}; choose one of: "
            f"{', '.join(VARIANTS)}"
        )
    for key, value in (("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"config.dataset.{key}={value!r} is not valid for {NAME}; choose a positive integer"
            )
    name = (
        task
        if (num_train, num_test) == (NUM_TRAIN, NUM_TEST)
        else (f"{task}_{num_train}x{num_test}")
    )
    return GraphTasksConfig(
        name=name,
        description=f"{task}: {num_train} train / {num_test} test graphs",
        task=task,
        num_train=num_train,
        num_test=num_test,
    )


class GapjaxGraphTasks(tfds.core.GeneratorBasedBuilder):
    """Coloured random graphs; labels from the colour multiset (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    # Where ``gapjax`` resolves to a multiplexed (namespace-like) resource path, as under
    # pytest, TFDS looks the source file up through ``importlib_resources``, a package it
    # does not declare; the builder needs no file next to it (no checksums), so say where
    # it is.
    code_path: ClassVar[epath.Path] = epath.Path(__file__)
    BUILDER_CONFIGS: ClassVar[list[GraphTasksConfig]] = [
        builder_config({"task": task}) for task in VARIANTS
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "presence"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "colors": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "senders": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "receivers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "label": tfds.features.ClassLabel(num_classes=2),
                    "pair": tfds.features.Scalar(dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated locally
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test),
            "fig3": self._generate_fig3(),
        }

    def _generate_examples(self, split: str, count: int):
        task = self.builder_config.task
        for index in range(count):
            rng = np.random.default_rng([_TASK_SEEDS[task], _SPLIT_SEEDS[split], index])
            yield index, generate_example(task, rng)

    def _generate_fig3(self):
        yield from enumerate(fig3_examples())


# --------------------------------------------------------------------------------------
# Pipeline hooks
# --------------------------------------------------------------------------------------


def preprocess(example: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    """Raw example -> one graph with one-hot ``node_features [n, 3]`` float32.

    ``rng`` is unused: every readout is invariant to node order, so there is nothing to
    augment.
    """
    del rng
    colors = np.asarray(example["colors"], np.int32)
    return {
        "node_features": np.eye(NUM_COLORS, dtype=np.float32)[colors],
        "senders": np.asarray(example["senders"], np.int32),
        "receivers": np.asarray(example["receivers"], np.int32),
        "label": np.int32(example["label"]),
    }


def budgets(batch_size: int) -> tuple[int, int, int]:
    """``(node_budget, edge_budget, graph_budget)`` that fit any ``batch_size`` graphs."""
    return batch_size * MAX_NODES, batch_size * MAX_EDGES, batch_size


def collate(examples: list[Mapping[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
    """Preprocessed graphs -> a static-shape batch: ``GraphBatch`` fields, ``label [G]``,
    ``weight [G]`` (1 real, 0 padding), with the budgets of ``budgets(batch_size)``."""
    if len(examples) > batch_size:
        raise ValueError(f"collate got {len(examples)} graphs for batch_size={batch_size}")
    graphs = batch_graphs(examples, *budgets(batch_size))
    batch = graphs.to_dict()
    if not examples:  # keep the feature width even for an all-padding batch
        batch["node_features"] = np.zeros((graphs.node_budget, NUM_COLORS), np.float32)
    label = np.zeros(batch_size, np.int32)
    label[: len(examples)] = [int(example["label"]) for example in examples]
    batch["label"] = label
    batch["weight"] = graphs.graph_mask.astype(np.float32)
    return batch


SPEC = register(
    DatasetSpec(
        name=NAME,
        builder_class=GapjaxGraphTasks,
        task="graph",
        num_classes=2,
        input_shape=(NUM_COLORS,),
        builder_config=builder_config,
        preprocess=preprocess,
        collate=collate,
    )
)

__all__ = [
    "COLORS",
    "COUNT_THRESHOLD",
    "FIG3_PAIRS",
    "FIG3_SEPARATES",
    "SPEC",
    "VARIANTS",
    "GapjaxGraphTasks",
    "GraphTasksConfig",
    "budgets",
    "builder_config",
    "collate",
    "fig3_examples",
    "generate_example",
    "preprocess",
    "random_structure",
    "sample_colour_counts",
]
