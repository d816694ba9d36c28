"""OGB molecule datasets prepared by TFDS: ``ogbg_molpcba`` and ``ogbg_molhiv`` by name.

Nothing is built here: these read a TFDS dataset already prepared as ArrayRecord in the
data directory (``tfds build ogbg_molpcba --file_format array_record`` on a machine with
internet, then copy the folder). TFDS's ``ogbg_molpcba`` builder defines the layout,
which any dataset of this family shares: ``node_feat float32 [n, 9]`` (OGB's nine
categorical atom features), ``edge_index int64 [e, 2]``, ``edge_feat``, ``num_nodes``,
``num_edges`` and ``labels float32 [K]`` with NaN for an unmeasured label. TFDS 4.9 has
no ``ogbg_molhiv`` builder; one prepared with the same features (by a TFDS that has it,
or a fork's builder) is read from its files.

Graphs: every edge in both directions (duplicates removed), node features the one-hots
of the nine atom features over OGB's vocabulary sizes (``ATOM_FEATURE_DIMS``: the input of
OGB's ``AtomEncoder``, 174 floats; out-of-range values fall in the last slot). Task
``graph_multilabel`` (NaN labels ignored; ``eval/map`` for molpcba, ``eval/roc_auc`` for
molhiv: OGB's metrics). Splits ``train`` / ``validation`` / ``test`` (scaffold split),
evaluated on ``validation``.

Batches pack graphs into static budgets: ``nodes_per_graph`` (default 64) and
``edges_per_graph`` (default 160) per graph slot plus room for one molecule of
``MAX_NODES`` atoms, so one jitted step serves every batch; ``config.dataset`` may raise
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from gapjax.data import wrapped
from gapjax.data.pipeline import DatasetError
from gapjax.data.spec import DatasetSpec, register
from gapjax.graph import batch_graphs

#: Registered name -> number of labels.
DATASETS = {"ogbg_molpcba": 128, "ogbg_molhiv": 1}
#: Vocabulary sizes of OGB's atom features (``ogb.utils.features.get_atom_feature_dims``):
#: atomic number, chirality, degree, formal charge, hydrogens, radical electrons,
#: hybridisation, aromatic, in a ring.
ATOM_FEATURE_DIMS = (119, 5, 12, 12, 10, 6, 6, 2, 2)
NUM_FEATURES = sum(ATOM_FEATURE_DIMS)
#: Room in every batch for one molecule this large (molpcba's largest has 332 atoms).
MAX_NODES = 400
MAX_EDGES = 2 * 450
DEFAULT_NODES_PER_GRAPH = 64
DEFAULT_EDGES_PER_GRAPH = 160


def atom_one_hot(node_feat: np.ndarray) -> np.ndarray:
    """OGB's categorical atom features ``[n, 9]`` -> concatenated one-hots ``float32
    [n, 174]``; a value outside a feature's vocabulary takes its last slot."""
    values = np.asarray(node_feat).reshape(-1, len(ATOM_FEATURE_DIMS))
    values = np.rint(values).astype(np.int64)
    dims = np.asarray(ATOM_FEATURE_DIMS)
    offsets = np.concatenate([[0], np.cumsum(dims)[:-1]])
    columns = offsets + np.clip(values, 0, dims - 1)
    out = np.zeros((len(values), NUM_FEATURES), np.float32)
    np.put_along_axis(out, columns, 1.0, axis=1)
    return out


def symmetric_edges(edge_index: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """``edge_index [e, 2]`` -> ``(senders, receivers)`` int32 with both directions of every
    edge, each directed edge once (sorted)."""
    pairs = np.asarray(edge_index, np.int64).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= num_nodes):
        raise DatasetError(f"an OGB graph has an edge endpoint outside its {num_nodes} nodes")
    both = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)
    return both[:, 0].astype(np.int32), both[:, 1].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class OgbConfig:
    name: str
    dataset: str
    nodes_per_graph: int
    edges_per_graph: int


class OgbBuilder(wrapped.WrappedBuilder):
    """A prepared TFDS OGB dataset behind the pipeline's builder interface (never builds:
    ``is_prepared`` is True once the files are found, else construction fails with one
    line saying how to prepare them)."""

    eval_split = "validation"

    def __init__(self, config: OgbConfig, data_dir: str, file_format: str = ""):
        super().__init__(config, data_dir, file_format)
        name = config.dataset
        how = (f"prepare it with `tfds build {name} --data_dir {data_dir} --file_format "
               "array_record` where TFDS can download it, then copy it here, or set "
               "config.dataset.data_dir")
        try:
            self.inner = tfds.builder(name, data_dir=data_dir, file_format="array_record")
            self.inner.as_data_source(split="train")
        except Exception as error:  # not registered, not prepared, another format
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DatasetError(f"config.dataset.name={name!r} is not prepared as ArrayRecord "
                               f"in {data_dir} ({type(error).__name__}: {reason[:120]}); "
                               f"{how}") from None
        features = self.inner.info.features
        missing = [key for key in ("node_feat", "edge_index", "labels") if key not in features]
        if missing:
            raise DatasetError(f"config.dataset.name={name!r}: the prepared dataset lacks the "
                               f"OGB features {', '.join(missing)}")

    def is_prepared(self) -> bool:
        return True

    def extra_fields(self, split: str) -> dict[str, Any]:
        config = self.builder_config
        return {"nodes_per_graph_": config.nodes_per_graph,
                "edges_per_graph_": config.edges_per_graph}


def builder_config(name: str):
    """``config.dataset`` -> ``OgbConfig`` for the dataset registered as ``name``."""

    def make(dataset_config: Any) -> OgbConfig:
        budgets = []
        for key, default in (("nodes_per_graph", DEFAULT_NODES_PER_GRAPH),
                             ("edges_per_graph", DEFAULT_EDGES_PER_GRAPH)):
            value = dataset_config.get(key) or default
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.dataset.{key}={value!r} is not valid for {name}; "
                                 "choose a positive integer")
            budgets.append(value)
        return OgbConfig(f"{name}_n{budgets[0]}_e{budgets[1]}", name, *budgets)

    return make


def preprocess(example: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    """One OGB graph -> ``node_features float32 [n, 174]``, ``senders``, ``receivers``
    (both directions) and ``label float32 [K]`` (NaN = unmeasured)."""
    del rng  # readouts are invariant to node order: nothing to augment
    node_features = atom_one_hot(example["node_feat"])
    senders, receivers = symmetric_edges(example["edge_index"], len(node_features))
    return {
        "node_features": node_features,
        "senders": senders,
        "receivers": receivers,
        "label": np.asarray(example["labels"], np.float32).reshape(-1),
        "nodes_per_graph_": example.get("nodes_per_graph_", DEFAULT_NODES_PER_GRAPH),
        "edges_per_graph_": example.get("edges_per_graph_", DEFAULT_EDGES_PER_GRAPH),
    }


def collate(examples: list[Mapping[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
    """Preprocessed graphs -> ``GraphBatch`` fields, ``label float32 [G, K]``, ``weight``."""
    first = examples[0] if examples else {}
    node_budget = batch_size * int(first.get("nodes_per_graph_", DEFAULT_NODES_PER_GRAPH))
    edge_budget = batch_size * int(first.get("edges_per_graph_", DEFAULT_EDGES_PER_GRAPH))
    try:
        graphs = batch_graphs(examples, node_budget + MAX_NODES, edge_budget + MAX_EDGES,
                              batch_size)
    except ValueError as error:
        raise DatasetError(f"{error}; raise config.dataset.nodes_per_graph / "
                           "edges_per_graph") from None
    batch = graphs.to_dict()
    if not examples:
        batch["node_features"] = np.zeros((graphs.node_budget, NUM_FEATURES), np.float32)
    width = len(first["label"]) if examples else 1
    label = np.zeros((batch_size, width), np.float32)
    label[:len(examples)] = [example["label"] for example in examples]
    batch["label"] = label
    batch["weight"] = graphs.graph_mask.astype(np.float32)
    return batch


SPECS = {
    name: register(DatasetSpec(
        name=name,
        builder_class=OgbBuilder,
        task="graph_multilabel",
        num_classes=labels,
        input_shape=(NUM_FEATURES,),
        train_split="train",
        eval_split="validation",
        builder_config=builder_config(name),
        preprocess=preprocess,
        collate=collate,
    ))
    for name, labels in DATASETS.items()
}

__all__ = ["ATOM_FEATURE_DIMS", "DATASETS", "NUM_FEATURES", "SPECS", "OgbBuilder",
           "atom_one_hot", "builder_config", "collate", "preprocess", "symmetric_edges"]
