"""Graph readouts and expressivity: sum keeps counts, mean proportions, max only presence.

Claim (Xu et al., "How Powerful are Graph Neural Networks?", ICLR 2019): a permutation-
invariant readout of a node multiset keeps the whole multiset with ``sum``, its
distribution with ``mean`` and only its underlying set with ``max``. So on the three
``gapjax_graph_tasks`` configs a GIN with a ``mean`` readout fails ``count`` and one with
a ``max`` readout fails ``count`` and ``proportion``, while ``sum`` solves all three; and
on the neighbourhood multisets of the paper's Figure 3, mean and max aggregators give
equal results exactly where the paper says they do.

Method: for each readout and task, a GIN (2 layers, 32 wide, sum aggregator, jumping
knowledge) is trained with AdamW for a fixed number of steps on 3 seeds (a seed fixes the
batches and the initialisation, so the readouts of one seed are a pair); the table reports
test accuracy (%) as mean ± sd over seeds and each readout's rank per task. The claim
pools are sum, mean and max; the quick mode adds a few other ``POOLS`` readouts
(``SETTINGS``), ``--full`` every pool of the registry that reads out graph segments
(``segment_readouts``: built on a probe graph batch, skipped when it cannot be or when
its output changes with the order of a graph's nodes, e.g. one learned weight per
position or a class token). A pool that needs statistics of the data (PNA's degree
scalers) gets them from the training graphs' sizes. Decision rule (fixed before running):
each task has its claimed readout (count: sum, proportion: mean, presence: max), compared
with each other claim pool by the 95% paired t-interval over seeds of the accuracy
difference (claimed - other, points). The three predicted failures (mean on count, max on
count and proportion) must show as intervals above zero with a mean gap of at least
``FAIL_MARGIN`` = 20 points, and no other comparison may lie below zero (the claimed
readout is at least as good as the others). The claim fails when a comparison lies below
zero, a predicted failure's interval lies wholly below 20 points, or the Figure 3 table
of the claim pools differs from the paper; otherwise it is undecided. The dataset's edges
join nodes of the same colour only, so message passing adds nothing a readout could use
besides the colour multiset (see ``gapjax.data.graph_tasks``; with edges between colours,
neighbourhoods are local samples of the colour distribution and a max readout over them
partly recovers proportions). The Figure 3 table aggregates the one-hot colours of each
pair's neighbourhoods (padded with zero channels to ``FIG3_WIDTH``) with every graph
readout of the registry, pools with parameters at random initialisations from several
seeds, and reports whether the two members differ; the claim pools' aggregates also pass
through a randomly initialised GIN layer.

Two training loops train the same model on the same data. The quick mode drives the
train and eval steps (``gapjax.train.steps``, ``gapjax.evaluators``) with the graph task over the
dataset's pipeline hooks (``preprocess``, ``collate``) in a loop of its own, in which every
readout's seeds train at once (vmapped; one compiled step per readout) and every readout
sees the same batches; ``gapjax.train.run`` would compile a step and write checkpoints per
run. The full mode (or ``--loop shared``) trains every cell with ``gapjax.train.run``,
exactly as ``train.py --config configs/graph_readout.py`` does.

``python -m gapjax.experiments.readouts --out DIR [--full] [--loop compiled|shared]``
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gapjax import tasks
from gapjax.data import graph_tasks, pipeline
from gapjax.experiments import seeds as seed_stats
from gapjax.experiments.common import (
    PALETTE,
    Stopwatch,
    markdown_table,
    new_figure,
    quick_config,
    records_table,
    run_name,
    save_figure,
    section_settings,
    to_jsonable,
    train,
    write_section,
)
from gapjax.graph import GraphBatch, batch_graphs, readout
from gapjax.models import gnn
from gapjax.pooling import POOLS, make_pool, pna_degree_statistics
from gapjax.train.metrics import last_value, read_metrics

#: The claim pools (the paper's three aggregators), always in the study.
READOUT_NAMES = ("sum", "mean", "max")
#: The readout each task's claim names.
CLAIMED = {"count": "sum", "proportion": "mean", "presence": "max"}
FAIL_MARGIN = 20.0  # points
SEEDS = (0, 1, 2)
#: (readout, task) cells that the theory says cannot be solved.
PREDICTED_FAILURES = (("mean", "count"), ("max", "count"), ("max", "proportion"))
#: Run sizes: quick (the report) and full. ``readouts``: the pools trained besides the
#: claim pools (None: every graph readout of the registry); ``fig3_seeds``: random
#: initialisations of each pool with parameters in the Figure 3 table.
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"num_train": 2000, "num_test": 500, "steps": 200, "batch_size": 64, "seeds": 3,
           # set_transformer reads graphs through its dense fallback (every graph padded to
           # the batch's node budget): 0.7 s a step on 2 CPU cores, so --full only.
           "readouts": ("std", "softmax", "multi", "pna", "set2set"),
           "fig3_seeds": 3},
    False: {"num_train": 4000, "num_test": 1000, "steps": 1000, "batch_size": 64,
            "seeds": 3, "readouts": None, "fig3_seeds": 5},
}
LOOPS = ("compiled", "shared")
MODEL = {"num_layers": 2, "hidden": 32, "aggregator": "sum", "jumping_knowledge": True}
LEARNING_RATE, WEIGHT_DECAY = 5e-3, 1e-4
#: Width the Figure 3 colours are padded to (multi-head pools split the channels).
FIG3_WIDTH = 8


# --------------------------------------------------------------------------------------
# Which pools read out graphs
# --------------------------------------------------------------------------------------


def readout_options(name: str, graph_sizes: Any) -> dict[str, Any]:
    """The options of pool ``name`` that come from the data: the degree statistics
    (``pna_degree_statistics`` of the training graphs' node counts ``graph_sizes``) for a
    pool that declares such fields (PNA's scalers); empty for every other pool."""
    pool_class = POOLS.get(name)
    fields = {field.name for field in dataclasses.fields(pool_class)} \
        if dataclasses.is_dataclass(pool_class) else set()
    statistics = pna_degree_statistics(np.bincount(np.asarray(graph_sizes, np.int64)))
    return {key: value for key, value in statistics.items() if key in fields}


def _parameter_shapes(module: Any, nodes: int) -> Any:
    """Shapes of ``module``'s variables when it reads out 3 graphs of ``nodes`` nodes in
    all (traced with ``jax.eval_shape``: nothing is compiled or run)."""
    x = jax.ShapeDtypeStruct((nodes, FIG3_WIDTH), jnp.float32)
    ids = jnp.arange(nodes) * 3 // nodes
    return jax.tree.map(lambda leaf: leaf.shape, jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x, ids, 3, None, method="segment"), x))


def segment_readouts() -> tuple[list[str], dict[str, str]]:
    """The registry's graph readouts: ``(names, skipped)``. ``names``: the claim pools
    (sum, mean, max) first, then every other ``POOLS`` name (aliases of one pool once)
    whose module builds on graph segments, whose parameters do not depend on the number
    of nodes (one learned weight per position would make it depend on their order) and
    that reads no class token; ``skipped``: ``{name: reason}`` for the rest. Each probe is
    traced, not run (``jax.eval_shape``)."""
    names = list(READOUT_NAMES)
    seen = {POOLS.get(name) for name in names}
    skipped: dict[str, str] = {}
    for name in POOLS.names():
        pool_class = POOLS.get(name)
        if pool_class in seen:
            continue
        seen.add(pool_class)
        if pool_class.reads_class_token:
            skipped[name] = "reads a class token at position 0 (depends on node order)"
            continue
        try:
            module = make_pool(name, **readout_options(name, [3, 4, 3]))
            shapes = [_parameter_shapes(module, nodes) for nodes in (10, 13)]
        except (ValueError, TypeError, NotImplementedError) as error:
            skipped[name] = f"cannot read out graph segments ({str(error).splitlines()[0]})"
            continue
        if shapes[0] != shapes[1]:
            skipped[name] = ("its parameters grow with the number of nodes (one per "
                             "position: depends on node order)")
            continue
        names.append(name)
    return names, skipped


def pool_has_parameters(name: str, graph_sizes: Any) -> bool:
    """Whether pool ``name`` (with its data options) owns parameters."""
    module = make_pool(name, **readout_options(name, graph_sizes))
    variables = jax.eval_shape(lambda: module.init(
        jax.random.key(0), jnp.zeros((4, FIG3_WIDTH)), jnp.zeros(4, jnp.int32), 1, None,
        method="segment"))
    return bool(jax.tree.leaves(variables))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_splits(task: str, data_dir: Path, num_train: int, num_test: int) -> dict[str, list]:
    """Prepares ``gapjax_graph_tasks`` for ``task`` (once) and returns its preprocessed
    ``train``, ``test`` and ``fig3`` examples (lists of graph dicts)."""

    config = graph_tasks.builder_config(
        {"task": task, "num_train": num_train, "num_test": num_test})
    builder = pipeline.prepare_embedded(graph_tasks.GapjaxGraphTasks, config, str(data_dir))
    sources = builder.as_data_source()
    splits = {}
    for split in ("train", "test", "fig3"):
        source = sources[split]
        raw = [source[index] for index in range(len(source))]
        if split == "fig3":  # stored shuffled; restore (pair, member) order
            raw.sort(key=lambda example: (int(example["pair"]), int(example["label"])))
        splits[split] = [graph_tasks.preprocess(example, None) for example in raw]
    return splits


def training_batches(examples: list, batch_size: int, steps: int, seed: int) -> list[dict]:
    """``steps`` collated batches of shuffled examples (reshuffled every epoch)."""

    rng = np.random.default_rng(seed)
    per_epoch = len(examples) // batch_size
    if per_epoch < 1:
        raise ValueError(f"readouts: {len(examples)} training graphs cannot fill a batch of "
                         f"{batch_size}")
    batches: list[dict] = []
    while len(batches) < steps:
        order = rng.permutation(len(examples))
        for start in range(0, per_epoch * batch_size, batch_size):
            if len(batches) == steps:
                break
            chosen = [examples[i] for i in order[start:start + batch_size]]
            batches.append(graph_tasks.collate(chosen, batch_size))
    return batches


def seed_batches(examples: list, batch_size: int, steps: int, seeds) -> list[dict]:
    """Every seed's ``training_batches``, stacked ``[seeds, ...]`` per step."""
    per_seed = [training_batches(examples, batch_size, steps, seed) for seed in seeds]
    return [{key: np.stack([batches[step][key] for batches in per_seed])
             for key in per_seed[0][step]} for step in range(steps)]


def evaluation_batches(examples: list, batch_size: int) -> list[dict]:
    """One ordered pass; the last batch is padded (padding graphs have weight 0)."""

    return [graph_tasks.collate(examples[start:start + batch_size], batch_size)
            for start in range(0, len(examples), batch_size)]


def graph_sizes(examples: list) -> np.ndarray:
    """Node count of every graph ``[num_graphs]``."""
    return np.array([len(example["node_features"]) for example in examples], np.int64)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def readout_trainer(readout_name: str, steps: int, seeds: int,
                    pool_kwargs: dict[str, Any] | None = None) -> seed_stats.SeedTrainer:
    """GIN with ``readout_name`` (``MODEL``), AdamW + cosine over ``steps``, the graph
    task: the training loop's own steps vmapped over ``seeds`` seeds."""
    task = tasks.get(graph_tasks.SPEC.task, num_classes=graph_tasks.SPEC.num_classes)
    model = gnn.GIN(num_classes=task.num_classes, pool=readout_name,
                    pool_kwargs=pool_kwargs or None, **MODEL)
    optimizer = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, steps),
                            weight_decay=WEIGHT_DECAY)
    return seed_stats.SeedTrainer(model, task, optimizer, seeds)


# --------------------------------------------------------------------------------------
# Figure 3: which aggregators tell the neighbourhood multisets apart
# --------------------------------------------------------------------------------------


def _fig3_batch(fig3: list) -> tuple[GraphBatch, jax.Array]:
    """The six star graphs batched, and the mask of their leaves (every node but the
    centre)."""
    graphs = batch_graphs(fig3, node_budget=32, edge_budget=32, graph_budget=8)
    graphs = jax.tree_util.tree_map(jnp.asarray, graphs)
    leaves = graphs.node_mask & (jnp.arange(graphs.node_budget) != _centres(graphs)[
        jnp.clip(graphs.node_graph, 0, graphs.graph_budget - 1)])
    return graphs, leaves


def fig3_separation(fig3: list, seed: int = 0) -> list[dict[str, Any]]:
    """For each Figure 3 pair and claim aggregator (sum, mean, max): do the two
    neighbourhoods give different aggregates (of the one-hot colours), and different
    centre states after one randomly initialised GIN layer with that aggregator? ``fig3``
    holds the six star graphs in ``(pair, member)`` order (centre = node 0)."""

    graphs, leaves = _fig3_batch(fig3)
    rows = []
    for aggregator in READOUT_NAMES:
        pooled = readout(aggregator, graphs.node_features, graphs.node_graph,
                         graphs.graph_budget, mask=leaves)
        layer = gnn.GINLayer(32, aggregator=aggregator, norm="none")
        states = layer.apply(layer.init(jax.random.key(seed), graphs.node_features, graphs),
                             graphs.node_features, graphs)
        centre_states = states[_centres(graphs)]
        for pair, (label, _, _) in enumerate(graph_tasks.FIG3_PAIRS):
            v, v_prime = 2 * pair, 2 * pair + 1
            rows.append({
                "pair": label,
                "aggregator": aggregator,
                "theory_separates": graph_tasks.FIG3_SEPARATES[aggregator][pair],
                "aggregate_separates": bool(jnp.abs(pooled[v] - pooled[v_prime]).max() > 1e-6),
                "gin_layer_separates": bool(
                    jnp.abs(centre_states[v] - centre_states[v_prime]).max() > 1e-6),
            })
    return rows


def fig3_readout_table(fig3: list, names, fig3_seeds: int) -> list[dict[str, Any]]:
    """For every readout in ``names`` and Figure 3 pair: at how many random
    initialisations (``fig3_seeds`` keys split from key 0; one for a pool without
    parameters) the
    readout of the two neighbourhoods' one-hot colours (zero-padded to ``FIG3_WIDTH``)
    differs. Rows ``{"readout", "parameters", "inits", <pair>: separating inits, ...,
    "theory"}`` (the paper's answer for the claim pools, else None)."""
    graphs, leaves = _fig3_batch(fig3)
    features = graphs.node_features.astype(jnp.float32)
    features = jnp.pad(features, ((0, 0), (0, max(FIG3_WIDTH - features.shape[1], 0))))
    sizes = np.asarray(jax.ops.segment_sum(leaves.astype(jnp.int32), graphs.node_graph,
                                           graphs.graph_budget))[:len(fig3)]
    rows = []
    for name in names:
        options = readout_options(name, sizes)
        learned = pool_has_parameters(name, sizes)
        inits = fig3_seeds if learned else 1
        module = make_pool(name, **options)
        # Eager: compiling each pool's initialisation would cost more than running it.
        pooled = np.stack([np.asarray(module.init_with_output(
            key, features, graphs.node_graph, graphs.graph_budget, leaves,
            method="segment")[0], np.float64)
            for key in jax.random.split(jax.random.key(0), inits)])
        differences = np.abs(pooled[:, 0:2 * len(graph_tasks.FIG3_PAIRS):2]
                             - pooled[:, 1:2 * len(graph_tasks.FIG3_PAIRS):2]).max(axis=-1)
        separating = (differences > 1e-6).sum(axis=0)
        row: dict[str, Any] = {"readout": name, "parameters": learned, "inits": inits}
        for pair, (label, _, _) in enumerate(graph_tasks.FIG3_PAIRS):
            row[label] = int(separating[pair])
        theory = graph_tasks.FIG3_SEPARATES.get(name)
        row["theory"] = None if theory is None else list(theory)
        rows.append(row)
    return rows


def _fig3_markdown(rows: list[dict[str, Any]]) -> str:
    labels = [label for label, _, _ in graph_tasks.FIG3_PAIRS]

    def cell(row, index, label):
        count, inits = row[label], row["inits"]
        text = ("yes" if count == inits else "no" if count == 0 else f"{count}/{inits} inits")
        if row["theory"] is not None:
            text += f" (theory: {'yes' if row['theory'][index] else 'no'})"
        return text

    table_rows = [[row["readout"], "random init x" + str(row["inits"]) if row["parameters"]
                   else "none", *[cell(row, index, label) for index, label in enumerate(labels)]]
                  for row in rows]
    return markdown_table(["readout", "parameters", *[f"pair {label}" for label in labels]],
                          table_rows)


def _centres(graphs: GraphBatch) -> jax.Array:
    """Index of the first node of every graph slot ``[G]`` (the star centres)."""
    node_index = jnp.arange(graphs.node_budget)
    return jax.ops.segment_min(jnp.where(graphs.node_mask, node_index, graphs.node_budget),
                               graphs.node_graph, graphs.graph_budget)


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def accuracy_matrix(splits: dict[str, dict[str, list]], settings: dict[str, Any],
                    names=READOUT_NAMES) -> dict[str, dict[str, list[float]]]:
    """Test accuracy (%) per readout, task and seed: ``{readout: {task: [acc per seed]}}``
    (seeds ``0..settings["seeds"]-1``, trained at once)."""
    seeds = list(range(settings["seeds"]))
    sizes = np.concatenate([graph_sizes(data["train"]) for data in splits.values()])
    trainers = {name: readout_trainer(name, settings["steps"], len(seeds),
                                      readout_options(name, sizes))
                for name in names}
    matrix: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for task, data in splits.items():
        test = evaluation_batches(data["test"], 250)
        # The readouts see the same batches in the same order: only the readout differs.
        batches = seed_batches(data["train"], settings["batch_size"], settings["steps"], seeds)
        for name, trainer in trainers.items():
            matrix[name][task] = trainer.accuracy(trainer.fit(batches), test).tolist()
    return matrix


def shared_loop_config(readout_name: str, task: str, seed: int, settings: dict[str, Any],
                       data_dir: Path, pool_kwargs: dict[str, Any] | None = None) -> Any:
    """The ``gapjax.train.run`` config of one cell: ``configs/graph_readout.py``'s model and
    optimizer with this experiment's sizes (the same run as ``train.py`` would do)."""
    config = quick_config(
        "gapjax_graph_tasks", "gin", steps=settings["steps"],
        batch_size=settings["batch_size"], learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY, seed=seed,
        dataset_options={"task": task, "num_train": settings["num_train"],
                         "num_test": settings["num_test"], "data_dir": str(data_dir)},
        pool=readout_name, **MODEL)
    for key, value in (pool_kwargs or {}).items():
        config.model.pool_kwargs[key] = value
    return config


def shared_loop_matrix(settings: dict[str, Any], data_dir: Path, runs_dir: Path,
                       names=READOUT_NAMES, sizes=None) -> dict[str, dict[str, list[float]]]:
    """Like ``accuracy_matrix``, each cell trained by ``gapjax.train.run`` (its own
    workdir with ``metrics.jsonl`` and checkpoints; final ``eval/accuracy`` in %).
    ``sizes``: the training graphs' node counts, for pools that need data options."""
    matrix: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for name in names:
        options = readout_options(name, sizes) if sizes is not None else {}
        for task in graph_tasks.VARIANTS:
            matrix[name][task] = []
            for seed in range(settings["seeds"]):
                config = shared_loop_config(name, task, seed, settings, data_dir, options)
                workdir = runs_dir / task / run_name(config)  # run_name omits the task
                train(config, workdir)
                accuracy = last_value(read_metrics(workdir), "eval/accuracy")
                if accuracy is None:
                    raise RuntimeError(f"readouts: {workdir}/metrics.jsonl has no eval/accuracy")
                matrix[name][task].append(100.0 * float(accuracy))
    return matrix


def failure_checks(matrix: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """For every predicted failure: the mean gap to the sum readout (points) and whether
    it is at least ``FAIL_MARGIN``."""
    checks = []
    for readout_name, task in PREDICTED_FAILURES:
        cell = float(np.mean(matrix[readout_name][task]))
        reference = float(np.mean(matrix["sum"][task]))
        checks.append({"readout": readout_name, "task": task, "accuracy": cell,
                       "sum_accuracy": reference, "gap": reference - cell,
                       "fails": reference - cell >= FAIL_MARGIN})
    return checks


def claim_comparisons(matrix: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """For each task, its claimed readout minus each other claim pool, paired over seeds
    (``seeds.paired_comparison``, points), with ``predicted_failure`` marking the three
    cells the theory says fail."""
    comparisons = []
    for task, claimed in CLAIMED.items():
        if task not in matrix[claimed]:
            continue
        for other in READOUT_NAMES:
            if other == claimed:
                continue
            comparison = seed_stats.paired_comparison(matrix[claimed][task], matrix[other][task])
            comparisons.append({"task": task, "claimed": claimed, "other": other,
                                "predicted_failure": (other, task) in PREDICTED_FAILURES,
                                **comparison})
    return comparisons


def decide(comparisons: list[dict[str, Any]], fig3_holds: bool) -> bool | None:
    """The module docstring's decision rule: True, False or None (undecided)."""
    if not fig3_holds:
        return False
    for comparison in comparisons:
        if comparison["outcome"] == "hurts":
            return False
        if comparison["predicted_failure"] and comparison["high"] < FAIL_MARGIN:
            return False
    failures = [c for c in comparisons if c["predicted_failure"]]
    if all(c["outcome"] == "helps" and c["mean_difference"] >= FAIL_MARGIN for c in failures):
        return True
    return None


def ranking(matrix: dict[str, dict[str, list[float]]], task: str) -> list[str]:
    """Readouts by mean accuracy on ``task``, best first."""
    return sorted(matrix, key=lambda name: -float(np.mean(matrix[name][task])))


def ranks(matrix: dict[str, dict[str, list[float]]], task: str) -> dict[str, int]:
    """Competition ranks by mean accuracy on ``task``: 1 + the number of readouts with a
    higher mean (equal means share a rank)."""
    means = {name: round(float(np.mean(matrix[name][task])), 6) for name in matrix}
    return {name: 1 + sum(other > mean for other in means.values())
            for name, mean in means.items()}


def best(matrix: dict[str, dict[str, list[float]]], task: str) -> list[str]:
    """The readouts of rank 1 on ``task``."""
    return [name for name, rank in ranks(matrix, task).items() if rank == 1]


def _matrix_markdown(matrix, tasks) -> str:
    ranks_ = {task: ranks(matrix, task) for task in tasks}
    rows = []
    for readout_name in matrix:
        row = [readout_name]
        for task in tasks:
            mark = " (theory: fails)" if (readout_name, task) in PREDICTED_FAILURES else ""
            row.append(f"{seed_stats.mean_sd_text(matrix[readout_name][task], 1)} "
                       f"#{ranks_[task][readout_name]}{mark}")
        rows.append(row)
    return markdown_table(["readout", *tasks], rows)


def _versus_claimed_markdown(matrix, tasks) -> str:
    """Every readout minus the task's claimed readout (paired interval, points)."""
    rows = []
    for readout_name in matrix:
        row = [readout_name]
        for task in tasks:
            claimed = CLAIMED[task]
            row.append("-" if readout_name == claimed else seed_stats.interval_text(
                seed_stats.paired_comparison(matrix[readout_name][task],
                                             matrix[claimed][task]), 1))
        rows.append(row)
    return markdown_table(["readout", *[f"{task} - {CLAIMED[task]}" for task in tasks]], rows)


def _figure(matrix, tasks, out_dir: Path) -> str:
    fig, (ax,) = new_figure(width=max(6.0, 0.6 * len(matrix) + 3.0))
    width = 0.8 / len(matrix)
    positions = np.arange(len(tasks))
    for index, readout_name in enumerate(matrix):
        means = [np.mean(matrix[readout_name][task]) for task in tasks]
        stds = [seed_stats.spread(matrix[readout_name][task])["std"] for task in tasks]
        ax.bar(positions + (index - (len(matrix) - 1) / 2) * width, means, width, yerr=stds,
               capsize=2, label=readout_name, color=PALETTE[index % len(PALETTE)],
               hatch="//" if index >= len(PALETTE) else None)
    ax.axhline(50, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(positions, tasks)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
    ax.set_title("GIN readout vs task")
    ax.legend(frameon=False, title="readout", loc="upper center", bbox_to_anchor=(0.5, -0.1),
              ncol=min(len(matrix), 5))
    return save_figure(fig, out_dir, "readouts.png")


def study_readouts(settings: dict[str, Any]) -> tuple[list[str], dict[str, str], list[str]]:
    """``(trained, skipped, graph_readouts)``: the readouts the accuracy matrix trains (the
    claim pools, then ``settings["readouts"]`` or every graph readout), the registry's
    pools that are no graph readouts with the reason, and every graph readout."""
    graph_readouts, skipped = segment_readouts()
    chosen = settings["readouts"]
    if chosen is None:
        return graph_readouts, skipped, graph_readouts
    unknown = [name for name in chosen if name not in graph_readouts]
    if unknown:
        raise ValueError(f"readouts: settings readouts {unknown} are not graph readouts; "
                         f"choose from: {', '.join(graph_readouts)}")
    return ([*READOUT_NAMES, *[name for name in chosen if name not in READOUT_NAMES]],
            skipped, graph_readouts)


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        loop: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Runs the experiment; writes ``readouts.md``, ``readouts.json`` and ``readouts.png``
    under ``out_dir``.

    ``loop``: ``"compiled"`` (this module's loop, one compiled step per readout; the
    default in quick mode) or ``"shared"`` (every cell through ``gapjax.train.run``, as
    ``train.py --config configs/graph_readout.py`` would; the default otherwise).
    ``overrides`` replace ``SETTINGS`` entries (tests pass tiny ones).

    Returns a report section (see ``gapjax.experiments.common``) whose ``numbers`` hold the
    accuracy matrix (``{readout: {task: {"runs", "mean", "std"}}}``, %), the ranking per
    task, the paired comparisons of the claim, the failure checks and both Figure 3 tables.
    """
    watch = Stopwatch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    settings = section_settings("readouts", SETTINGS, quick, overrides)
    loop = loop or ("compiled" if quick else "shared")
    if loop not in LOOPS:
        raise ValueError(f"readouts: loop={loop!r} is not available; choose one of: "
                         f"{', '.join(LOOPS)}")
    names, skipped, graph_readouts = study_readouts(settings)
    tasks = graph_tasks.VARIANTS
    splits = {task: load_splits(task, data_dir, settings["num_train"], settings["num_test"])
              for task in tasks}
    if loop == "compiled":
        matrix = accuracy_matrix(splits, settings, names)
    else:
        sizes = np.concatenate([graph_sizes(data["train"]) for data in splits.values()])
        matrix = shared_loop_matrix(settings, data_dir, out_dir / "runs", names, sizes)
    checks = failure_checks(matrix)
    comparisons = claim_comparisons(matrix)
    fig3 = splits[tasks[0]]["fig3"]
    fig3_rows = fig3_separation(fig3)
    fig3_all = fig3_readout_table(fig3, graph_readouts, settings["fig3_seeds"])
    fig3_holds = all(row["aggregate_separates"] == row["theory_separates"]
                     and row["gin_layer_separates"] == row["theory_separates"]
                     for row in fig3_rows)
    holds = decide(comparisons, fig3_holds)
    figure = _figure(matrix, tasks, out_dir)
    timing = watch.timing()

    comparison_rows = [
        [c["task"], c["claimed"], c["other"], "yes" if c["predicted_failure"] else "no",
         seed_stats.mean_sd_text(matrix[c["claimed"]][c["task"]], 1),
         seed_stats.mean_sd_text(matrix[c["other"]][c["task"]], 1),
         seed_stats.interval_text(c, 1)]
        for c in comparisons]
    markdown = "\n".join([
        f"Test accuracy (%) of GIN ({MODEL['num_layers']} layers, {MODEL['hidden']} wide, "
        f"sum aggregator, jumping knowledge), mean ± sd over {settings['seeds']} seeds and "
        f"rank (#) per task, {settings['steps']} steps, {settings['num_train']} training / "
        f"{settings['num_test']} test graphs per task, {loop} training loop.",
        "",
        _matrix_markdown(matrix, tasks),
        "",
        "Each readout minus the task's claimed readout (count: sum, proportion: mean, "
        "presence: max), 95% paired t-interval over seeds (points):",
        "",
        _versus_claimed_markdown(matrix, tasks),
        "",
        f"The claim, decided over seeds (predicted failures need an interval above zero "
        f"and a mean gap of at least {FAIL_MARGIN:.0f} points; no comparison may lie "
        "below zero):",
        "",
        markdown_table(["task", "claimed", "other", "predicted failure", "claimed acc",
                        "other acc", "claimed - other"], comparison_rows),
        "",
        "Figure 3 multiset pairs: does the aggregate (and one random GIN layer) tell "
        "v from v' apart?",
        "",
        records_table(fig3_rows),
        "",
        f"Figure 3 pairs through every graph readout of the registry ({len(graph_readouts)}; "
        f"pools with parameters at {settings['fig3_seeds']} random initialisations): does "
        "the readout of the neighbours' one-hot colours tell v from v' apart?",
        "",
        _fig3_markdown(fig3_all),
        "",
        "Not graph readouts: " + ("; ".join(f"{name}: {reason}" for name, reason
                                            in skipped.items()) or "none") + ".",
        "",
        watch.timing_text(timing),
    ])
    head = {True: "Holds", False: "Does not hold", None: "Undecided"}[holds]
    verdict = (
        f"{head} ({settings['seeds']} seeds; 95% paired t-intervals, claimed - other): "
        + "; ".join(f"{c['task']}: {c['claimed']} - {c['other']} "
                    f"{seed_stats.interval_text(c, 1)}" for c in comparisons)
        + ("; Figure 3 pairs separated exactly as theory says." if fig3_holds
           else "; Figure 3 separation differs from theory.")
        + " Best per task (rank 1, ties shared): " + "; ".join(
            f"{task} {', '.join(best(matrix, task))}" for task in tasks) + ".")
    numbers = to_jsonable({
        "seeds": list(range(settings["seeds"])),
        "accuracy": {r: {t: seed_stats.spread(matrix[r][t]) for t in tasks} for r in matrix},
        "ranking": {task: ranking(matrix, task) for task in tasks},
        "ranks": {task: ranks(matrix, task) for task in tasks},
        "claim_comparisons": comparisons,
        "failure_checks": checks,
        "fig3": fig3_rows,
        "fig3_readouts": fig3_all,
        "not_graph_readouts": skipped,
        "settings": settings,
        "loop": loop,
        **timing,
    })
    return write_section(
        out_dir, "readouts", "Graph readouts: sum counts, mean averages, max detects",
        claim="Sum counts, mean keeps proportions, max detects presence: on each task the "
              "claimed readout (count: sum, proportion: mean, presence: max) is at least "
              "as accurate as the other two, mean fails count and max fails count and "
              "proportion (Xu et al., ICLR 2019); other registry readouts are ranked beside "
              "them.",
        doc=__doc__, method_end="\n\n", markdown=markdown, numbers=numbers, holds=holds,
        verdict=verdict, figures=[figure])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true",
                        help="longer training runs, every graph readout of the registry")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to build the dataset (default OUT/tfds)")
    parser.add_argument("--loop", choices=LOOPS, default=None,
                        help="compiled (default when quick) or shared (gapjax.train.run)")
    args = parser.parse_args()
    result = run(args.out, quick=not args.full, data_dir=args.data_dir, loop=args.loop)
    print(result["markdown"])
    print(result["verdict"])


if __name__ == "__main__":
    main()
