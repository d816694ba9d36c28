"""Graph readouts and expressivity: sum keeps counts, mean proportions, max only presence.

Claim (Xu et al., "How Powerful are Graph Neural Networks?", ICLR 2019): a permutation-
invariant readout of a node multiset keeps the whole multiset with ``sum``, its
distribution with ``mean`` and only its underlying set with ``max``. So on the three
``gapjax_graph_tasks`` configs a GIN with a ``mean`` readout fails ``count`` and one with
a ``max`` readout fails ``count`` and ``proportion``, while ``sum`` solves all three; and
on the neighbourhood multisets of the paper's Figure 3, mean and max aggregators give
equal results exactly where the paper says they do.

Method: for each readout (sum, mean, max) and task, a GIN (2 layers, 32 wide, sum
aggregator, jumping knowledge) is trained with AdamW for a fixed number of steps, with 3
seeds; the table reports test accuracy as mean ± std. A predicted failure "happens" when
the cell is at least ``FAIL_MARGIN`` = 20 points below the sum readout on the same task.
The dataset's edges join nodes of the same colour only, so message passing adds nothing
a readout could use besides the colour multiset (see ``gapjax.data.graph_tasks``; with
edges between colours, neighbourhoods are local samples of the colour distribution and a
max readout over them partly recovers proportions). The Figure 3 table aggregates the
one-hot colours of each pair's neighbourhoods with sum / mean / max (and passes them
through a randomly initialised GIN layer) and reports whether the two members differ.

Two training loops train the same model on the same data. The quick mode drives the
train and eval steps (``gapjax.train.steps``, ``gapjax.evaluators``) with the graph task over the
dataset's pipeline hooks (``preprocess``, ``collate``) in a loop of its own, in which the 27
short runs share one compiled step per readout and every readout sees the same batches:
about 1 minute of CPU time, against about 5 through
``gapjax.train.run``, where each run compiles its own step and writes checkpoints. The
full mode (or ``--loop shared``) trains every cell with ``gapjax.train.run``, exactly as
``train.py --config configs/graph_readout.py`` does.

``python -m gapjax.experiments.readouts --out DIR [--full] [--loop compiled|shared]``
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gapjax import tasks
from gapjax.data import graph_tasks, pipeline
from gapjax.evaluators import eval_step, zero_eval_sums
from gapjax.experiments.common import (
    PALETTE,
    Stopwatch,
    markdown_table,
    new_figure,
    quick_config,
    records_table,
    run_name,
    save_figure,
    section,
    to_jsonable,
    train,
)
from gapjax.graph import GraphBatch, batch_graphs, readout
from gapjax.models import gnn
from gapjax.train.metrics import last_value, read_metrics
from gapjax.train.state import create_train_state
from gapjax.train.steps import train_step

READOUT_NAMES = ("sum", "mean", "max")
FAIL_MARGIN = 0.20
SEEDS = (0, 1, 2)
#: (readout, task) cells that the theory says cannot be solved.
PREDICTED_FAILURES = (("mean", "count"), ("max", "count"), ("max", "proportion"))
#: Run sizes: quick (the report) and full.
SETTINGS = {
    True: {"num_train": 2000, "num_test": 500, "steps": 200, "batch_size": 64},
    False: {"num_train": 4000, "num_test": 1000, "steps": 1000, "batch_size": 64},
}
LOOPS = ("compiled", "shared")
MODEL = {"num_layers": 2, "hidden": 32, "aggregator": "sum", "jumping_knowledge": True}
LEARNING_RATE, WEIGHT_DECAY = 5e-3, 1e-4


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


def evaluation_batches(examples: list, batch_size: int) -> list[dict]:
    """One ordered pass; the last batch is padded (padding graphs have weight 0)."""

    return [graph_tasks.collate(examples[start:start + batch_size], batch_size)
            for start in range(0, len(examples), batch_size)]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class ReadoutTrainer:
    """The training loop's train / eval steps for one GIN readout, compiled once and reused
    across tasks and seeds."""

    def __init__(self, readout_name: str, steps: int):

        self.task = tasks.get(graph_tasks.SPEC.task, num_classes=graph_tasks.SPEC.num_classes)
        self.model = gnn.GIN(num_classes=self.task.num_classes, pool=readout_name, **MODEL)
        self.optimizer = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, steps),
                                     weight_decay=WEIGHT_DECAY)
        self._train_step = jax.jit(functools.partial(
            train_step, model=self.model, tx=self.optimizer, task=self.task))
        self._eval_step = jax.jit(functools.partial(eval_step, model=self.model, task=self.task))

    def fit(self, batches: list[dict], seed: int) -> dict[str, Any]:
        """Trains from scratch (initialisation from ``seed``), one step per batch; returns
        the variables."""
        state = create_train_state(self.model, self.optimizer,
                                   self.task.init_inputs(batches[0]), seed)
        for batch in batches:
            state = self._train_step(state, batch)
        return state.variables()

    def accuracy(self, variables: dict[str, Any], batches: list[dict]) -> float:
        """Weighted accuracy over evaluation batches."""
        sums = zero_eval_sums(self.task)
        for batch in batches:
            sums, _ = self._eval_step(variables, batch, sums)
        return float(sums["accuracy"]) / float(sums["weight"])


# --------------------------------------------------------------------------------------
# Figure 3: which aggregators tell the neighbourhood multisets apart
# --------------------------------------------------------------------------------------


def fig3_separation(fig3: list, seed: int = 0) -> list[dict[str, Any]]:
    """For each Figure 3 pair and aggregator: do the two neighbourhoods give different
    aggregates (of the one-hot colours), and different centre states after one randomly
    initialised GIN layer with that aggregator? ``fig3`` holds the six star graphs in
    ``(pair, member)`` order (centre = node 0)."""

    graphs = batch_graphs(fig3, node_budget=32, edge_budget=32, graph_budget=8)
    graphs = jax.tree_util.tree_map(jnp.asarray, graphs)
    leaves = graphs.node_mask & (jnp.arange(graphs.node_budget) != _centres(graphs)[
        jnp.clip(graphs.node_graph, 0, graphs.graph_budget - 1)])
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


def _centres(graphs: GraphBatch) -> jax.Array:
    """Index of the first node of every graph slot ``[G]`` (the star centres)."""
    node_index = jnp.arange(graphs.node_budget)
    return jax.ops.segment_min(jnp.where(graphs.node_mask, node_index, graphs.node_budget),
                               graphs.node_graph, graphs.graph_budget)


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def accuracy_matrix(splits: dict[str, dict[str, list]], settings: dict[str, Any],
                    seeds=SEEDS) -> dict[str, dict[str, list[float]]]:
    """Test accuracy per readout, task and seed: ``{readout: {task: [acc per seed]}}``."""
    trainers = {name: ReadoutTrainer(name, settings["steps"]) for name in READOUT_NAMES}
    matrix: dict[str, dict[str, list[float]]] = {name: {} for name in READOUT_NAMES}
    for task, data in splits.items():
        test = evaluation_batches(data["test"], 250)
        for name in READOUT_NAMES:
            matrix[name][task] = []
        for seed in seeds:
            # The readouts see the same batches in the same order: only the readout differs.
            batches = training_batches(data["train"], settings["batch_size"], settings["steps"],
                                       seed)
            for name, trainer in trainers.items():
                matrix[name][task].append(trainer.accuracy(trainer.fit(batches, seed), test))
    return matrix


def shared_loop_config(readout_name: str, task: str, seed: int, settings: dict[str, Any],
                       data_dir: Path) -> Any:
    """The ``gapjax.train.run`` config of one cell: ``configs/graph_readout.py``'s model and
    optimizer with this experiment's sizes (the same run as ``train.py`` would do)."""
    config = quick_config(
        "gapjax_graph_tasks", "gin", steps=settings["steps"],
        batch_size=settings["batch_size"], learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY, seed=seed,
        dataset_options={"task": task, "num_train": settings["num_train"],
                         "num_test": settings["num_test"], "data_dir": str(data_dir)},
        pool=readout_name, **MODEL)
    return config


def shared_loop_matrix(settings: dict[str, Any], data_dir: Path, runs_dir: Path,
                       seeds=SEEDS) -> dict[str, dict[str, list[float]]]:
    """Like ``accuracy_matrix``, each cell trained by ``gapjax.train.run`` (its own
    workdir with ``metrics.jsonl`` and checkpoints; final ``eval/accuracy``)."""
    matrix: dict[str, dict[str, list[float]]] = {name: {} for name in READOUT_NAMES}
    for name in READOUT_NAMES:
        for task in graph_tasks.VARIANTS:
            matrix[name][task] = []
            for seed in seeds:
                config = shared_loop_config(name, task, seed, settings, data_dir)
                workdir = runs_dir / task / run_name(config)  # run_name omits the task
                train(config, workdir)
                accuracy = last_value(read_metrics(workdir), "eval/accuracy")
                if accuracy is None:
                    raise RuntimeError(f"readouts: {workdir}/metrics.jsonl has no eval/accuracy")
                matrix[name][task].append(float(accuracy))
    return matrix


def failure_checks(matrix: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """For every predicted failure: the gap to the sum readout and whether it is at least
    ``FAIL_MARGIN``."""
    checks = []
    for readout_name, task in PREDICTED_FAILURES:
        cell = float(np.mean(matrix[readout_name][task]))
        reference = float(np.mean(matrix["sum"][task]))
        checks.append({"readout": readout_name, "task": task, "accuracy": cell,
                       "sum_accuracy": reference, "gap": reference - cell,
                       "fails": reference - cell >= FAIL_MARGIN})
    return checks


def _matrix_markdown(matrix, tasks) -> str:
    rows = []
    for readout_name in READOUT_NAMES:
        row = [readout_name]
        for task in tasks:
            runs = np.asarray(matrix[readout_name][task]) * 100
            mark = " (theory: fails)" if (readout_name, task) in PREDICTED_FAILURES else ""
            row.append(f"{runs.mean():.1f} ± {runs.std():.1f}{mark}")
        rows.append(row)
    return markdown_table(["readout", *tasks], rows)


def _figure(matrix, tasks, out_dir: Path) -> str:
    fig, (ax,) = new_figure(width=6.0)
    width = 0.8 / len(READOUT_NAMES)
    positions = np.arange(len(tasks))
    for index, readout_name in enumerate(READOUT_NAMES):
        means = [100 * np.mean(matrix[readout_name][task]) for task in tasks]
        stds = [100 * np.std(matrix[readout_name][task]) for task in tasks]
        ax.bar(positions + (index - 1) * width, means, width, yerr=stds, capsize=3,
               label=readout_name, color=PALETTE[index])
    ax.axhline(50, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(positions, tasks)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("GIN readout vs task")
    ax.legend(frameon=False, title="readout", loc="upper center", bbox_to_anchor=(0.5, -0.1),
              ncol=len(READOUT_NAMES))
    return save_figure(fig, out_dir, "readouts.png")


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        loop: str | None = None) -> dict[str, Any]:
    """Runs the experiment; writes ``readouts.md`` and ``readouts.png`` under ``out_dir``.

    ``loop``: ``"compiled"`` (this module's loop, one compiled step per readout; the
    default in quick mode) or ``"shared"`` (every cell through ``gapjax.train.run``, as
    ``train.py --config configs/graph_readout.py`` would; the default otherwise).

    Returns a report section (see ``gapjax.experiments.common``) whose ``numbers`` hold the
    accuracy matrix (``{readout: {task: {"runs", "mean", "std"}}}``), the failure checks
    and the Figure 3 table.
    """
    watch = Stopwatch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    settings = SETTINGS[bool(quick)]
    loop = loop or ("compiled" if quick else "shared")
    if loop not in LOOPS:
        raise ValueError(f"readouts: loop={loop!r} is not available; choose one of: "
                         f"{', '.join(LOOPS)}")
    tasks = graph_tasks.VARIANTS
    splits = {task: load_splits(task, data_dir, settings["num_train"], settings["num_test"])
              for task in tasks}
    if loop == "compiled":
        matrix = accuracy_matrix(splits, settings)
    else:
        matrix = shared_loop_matrix(settings, data_dir, out_dir / "runs")
    checks = failure_checks(matrix)
    fig3_rows = fig3_separation(splits[tasks[0]]["fig3"])
    fig3_holds = all(row["aggregate_separates"] == row["theory_separates"]
                     and row["gin_layer_separates"] == row["theory_separates"]
                     for row in fig3_rows)
    failures_hold = all(check["fails"] for check in checks)
    figure = _figure(matrix, tasks, out_dir)
    seconds = watch.elapsed()

    failure_lines = [
        f"- {check['readout']} on {check['task']}: {100 * check['accuracy']:.1f}% vs sum "
        f"{100 * check['sum_accuracy']:.1f}% ({100 * check['gap']:.1f} points below): "
        f"{'fails as predicted' if check['fails'] else 'does NOT fail by 20 points'}"
        for check in checks
    ]
    markdown = "\n".join([
        f"Test accuracy (%) of GIN ({MODEL['num_layers']} layers, {MODEL['hidden']} wide, "
        f"sum aggregator, jumping knowledge), {len(SEEDS)} seeds, {settings['steps']} steps, "
        f"{settings['num_train']} training / {settings['num_test']} test graphs per task, "
        f"{loop} training loop.",
        "",
        _matrix_markdown(matrix, tasks),
        "",
        "Predicted failures (at least 20 points below the sum readout):",
        *failure_lines,
        "",
        "Figure 3 multiset pairs: does the aggregate (and one random GIN layer) tell "
        "v from v' apart?",
        "",
        records_table(fig3_rows),
        "",
        f"({seconds:.0f} s)",
    ])
    (out_dir / "readouts.md").write_text("# Graph readouts and expressivity\n\n" + markdown
                                         + "\n\n![readouts](readouts.png)\n")
    holds = failures_hold and fig3_holds
    verdict = (
        ("Holds: " if holds else "Does not hold: ")
        + "; ".join(f"{c['readout']}/{c['task']} {100 * c['gap']:.0f} points below sum"
                    for c in checks)
        + ("; Figure 3 pairs separated exactly as theory says." if fig3_holds
           else "; Figure 3 separation differs from theory."))
    numbers = {
        "accuracy": {r: {t: {"runs": matrix[r][t], "mean": float(np.mean(matrix[r][t])),
                             "std": float(np.std(matrix[r][t]))} for t in tasks}
                     for r in READOUT_NAMES},
        "failure_checks": checks,
        "fig3": fig3_rows,
        "settings": settings,
        "loop": loop,
        "seconds": seconds,
    }
    return section(
        "Graph readouts: sum counts, mean averages, max detects",
        claim="A GIN with a sum readout solves presence, proportion and count; mean fails "
              "count and max fails count and proportion (Xu et al., ICLR 2019).",
        method=__doc__.split("Method: ", 1)[1].split("\n\n", 1)[0].replace("\n", " "),
        markdown=markdown,
        numbers=to_jsonable(numbers),
        holds=holds,
        verdict=verdict,
        figures=[figure],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help="longer training runs")
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
