"""Graph readouts on real molecules: sum for additive targets, mean for intensive, max for presence.

Claim (after Xu et al., "How Powerful are Graph Neural Networks?", ICLR 2019: sum keeps a
node multiset, mean its distribution, max its underlying set): on molecules, a GIN with
a ``sum`` readout suits targets that add up over atoms, one with a ``mean`` readout
targets that average over atoms, and one with a ``max`` readout targets that ask whether
some atom is present.

Method: the ``molecules`` dataset (RDKit's bundled sample of ~5,000 NCI molecules, or
``source_file``; RDKit computes every target, ``gapjax.data.molecules``) with its eight
targets of three kinds: additive (heavy-atom count, molecular weight, TPSA), intensive
(fraction of aromatic atoms, fraction of sp3 carbons, mean atomic mass) and presence
(contains a halogen, contains sulfur). For each readout one GIN (``configs/molecules.py``'s
model: sum aggregator, jumping knowledge; ``SETTINGS`` sizes) regresses all eight
standardised targets at once (one output each, mean squared error), so the readout is
the only thing that differs between models; AdamW with a cosine schedule, every seed
trained at once (``seeds.train_seeds``; a seed fixes the data order and the
initialisation, so the readouts of one seed are a pair). The score of a target is R^2 on
the test split (for a 0/1 presence target, R^2 of the squared error is the Brier skill
over predicting the base rate), the score of a kind is the mean R^2 of its targets. The
claim pools are sum, mean and max; the quick mode adds a few other ``POOLS`` readouts,
``--full`` every graph readout of the registry (``readouts.segment_readouts``); a pool
that needs statistics of the data (PNA's degree scalers) gets them from the training
molecules' atom counts.

Decision rule (fixed before running): for each kind, its claimed readout (additive: sum,
intensive: mean, presence: max) is compared with each of the other two claim pools by the
95% paired t-interval over seeds of the difference of the kind's score (claimed -
other). The claim holds when all six intervals lie above zero; it fails when any lies
below zero; otherwise (an interval containing zero) it is undecided.

``python -m gapjax.experiments.real_readouts --out DIR [--full]`` (needs RDKit: the
``chem`` extra)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from gapjax.data import molecules
from gapjax.data.pipeline import DatasetError
from gapjax.experiments import common, readouts, seeds

#: The readout each target kind's claim names.
CLAIMED = {"additive": "sum", "intensive": "mean", "presence": "max"}
KINDS = tuple(CLAIMED)
SETTINGS: dict[bool, dict[str, Any]] = {
    # Five seeds: the paired intervals of three were too wide to decide two comparisons.
    True: {"seeds": 5, "steps": 300, "batch_size": 32, "learning_rate": 3e-3,
           "num_layers": 2, "hidden": 32,
           "readouts": ("std", "softmax", "set2set")},
    # For a GPU: configs/molecules.py's model and length, every graph readout, five seeds.
    False: {"seeds": 5, "steps": 2000, "batch_size": 64, "learning_rate": 3e-3,
            "num_layers": 3, "hidden": 64, "readouts": None},
}
#: Published figures this section stands beside.
PUBLISHED = (
    ("Xu et al. 2019, GIN (Table 1; quoted, not re-read here)",
     "graph classification, 10-fold cross-validation, GIN-0 (sum aggregator and readout)",
     "test accuracy, MUTAG / NCI1 / PROTEINS", "89.4 ± 5.6 / 82.7 ± 1.7 / 76.2 ± 2.8"),
    ("Corso et al. 2020, PNA (as listed by Papers with Code; not re-read here)",
     "ZINC (12k molecules) constrained solubility; with edge features",
     "test MAE", "0.188; 0.142"),
)


def require_rdkit() -> None:
    """One clear line when RDKit (the ``chem`` extra) is missing."""
    if importlib.util.find_spec("rdkit") is None:
        raise DatasetError("real_readouts needs RDKit to build the molecules dataset; "
                           "install the chem extra (`pip install gapjax[chem]`)")


def model_config(readout: str, settings: dict[str, Any], data_dir: Path | str,
                 source_file: Path | str | None,
                 pool_kwargs: dict[str, Any] | None = None) -> Any:
    """The training config of the GIN with ``readout`` regressing every target."""
    options = {"targets": "all", **({"source_file": str(source_file)} if source_file else {})}
    config = common.quick_config(
        molecules.NAME, "gin", steps=settings["steps"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        dataset_options=common.real_dataset_options(data_dir, **options),
        pool=readout, num_layers=settings["num_layers"], hidden=settings["hidden"],
        aggregator="sum", jumping_knowledge=True)
    for key, value in (pool_kwargs or {}).items():
        config.model.pool_kwargs[key] = value
    return config


def atom_counts(dataset_config: Any, split: str) -> np.ndarray:
    """Heavy-atom count of every molecule of ``split`` ``[molecules]``."""
    counts = []
    for batch in seeds.evaluation_batches(dataset_config, split):
        per_graph = np.bincount(np.asarray(batch["node_graph"])[np.asarray(batch["node_mask"])],
                                minlength=len(batch["weight"]))
        counts.append(per_graph[np.asarray(batch["weight"]) > 0])
    return np.concatenate(counts)


def study_readouts(settings: dict[str, Any]) -> list[str]:
    """The claim pools, then ``settings["readouts"]`` (None: every graph readout)."""
    graph_readouts, _ = readouts.segment_readouts()
    chosen = settings["readouts"]
    if chosen is None:
        return graph_readouts
    unknown = [name for name in chosen if name not in graph_readouts]
    if unknown:
        raise ValueError(f"real_readouts: settings readouts {unknown} are not graph "
                         f"readouts; choose from: {', '.join(graph_readouts)}")
    return [*readouts.READOUT_NAMES,
            *[name for name in chosen if name not in readouts.READOUT_NAMES]]


def measure(names: list[str], settings: dict[str, Any], data_dir: Path,
            source_file: Path | str | None) -> dict[str, Any]:
    """Every readout trained on every seed: ``{readout: {"r2": {target: spread},
    "kinds": {kind: spread}, "seconds", "cpu_seconds"}}`` plus the split sizes."""
    plain = model_config("sum", settings, data_dir, source_file)
    sizes = None
    results: dict[str, Any] = {}
    test_batches = None
    for name in names:
        needs_data = bool(readouts.readout_options(name, [1]))
        if needs_data and sizes is None:
            sizes = atom_counts(plain.dataset, "train")
        config = model_config(name, settings, data_dir, source_file,
                              readouts.readout_options(name, sizes) if needs_data else None)
        run = seeds.train_seeds(config, settings["seeds"])
        if test_batches is None:
            test_batches = seeds.evaluation_batches(config.dataset, run.info.eval_split)
            examples = run.info.num_examples
        metrics = run.trainer.evaluate(run.state, test_batches)
        r2 = {target: metrics[f"r2_{index}"]
              for index, target in enumerate(molecules.TARGET_NAMES)}
        kinds = {kind: np.mean([r2[target] for target, target_kind in molecules.TARGETS.items()
                                if target_kind == kind], axis=0) for kind in KINDS}
        results[name] = {"r2": {target: seeds.spread(values) for target, values in r2.items()},
                         "kinds": {kind: seeds.spread(values) for kind, values in kinds.items()},
                         "train_seconds": run.seconds, "train_cpu_seconds": run.cpu_seconds}
    return {"readouts": results, "num_examples": dict(examples)}


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For each kind, the claimed readout's kind score minus each other claim pool's,
    paired over seeds (``seeds.paired_comparison``)."""
    rows = []
    for kind, claimed in CLAIMED.items():
        for other in readouts.READOUT_NAMES:
            if other != claimed:
                rows.append({"kind": kind, "claimed": claimed, "other": other,
                             **seeds.paired_comparison(
                                 results[claimed]["kinds"][kind]["runs"],
                                 results[other]["kinds"][kind]["runs"])})
    return rows


def decide(rows: list[dict[str, Any]]) -> bool | None:
    """The decision rule of the module docstring."""
    outcomes = [row["outcome"] for row in rows]
    if "hurts" in outcomes:
        return False
    return True if all(outcome == "helps" for outcome in outcomes) else None


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        source_file: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Trains every readout on every seed; writes ``real_readouts.md`` and
    ``real_readouts.json``; returns the report section. ``data_dir``: where the dataset is
    prepared (default ``OUT/tfds``); ``source_file``: a SMILES file (default RDKit's NCI
    sample); ``overrides`` replace ``SETTINGS`` entries."""
    require_rdkit()
    watch = common.Stopwatch()
    settings = common.section_settings("real_readouts", SETTINGS, quick, overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    names = study_readouts(settings)
    measured = measure(names, settings, data_dir, source_file)
    results = measured["readouts"]
    rows = comparisons(results)
    holds = decide(rows)

    targets = molecules.TARGET_NAMES
    ranks = {kind: sorted(results, key=lambda name: -results[name]["kinds"][kind]["mean"])
             for kind in KINDS}
    table = common.markdown_table(
        ["readout", *[f"{target} ({molecules.TARGETS[target]})" for target in targets],
         *[f"{kind} (mean)" for kind in KINDS]],
        [[name, *[seeds.mean_sd_text(results[name]["r2"][target]["runs"]) for target in targets],
          *[f"{seeds.mean_sd_text(results[name]['kinds'][kind]['runs'])} "
            f"#{ranks[kind].index(name) + 1}" for kind in KINDS]]
         for name in results])
    claim_table = common.markdown_table(
        ["kind", "claimed", "other", "claimed R^2", "other R^2", "claimed - other"],
        [[row["kind"], row["claimed"], row["other"],
          seeds.mean_sd_text(results[row["claimed"]]["kinds"][row["kind"]]["runs"]),
          seeds.mean_sd_text(results[row["other"]]["kinds"][row["kind"]]["runs"]),
          seeds.interval_text(row)] for row in rows])
    head = {True: "Holds", False: "Does not hold", None: "Undecided"}[holds]
    verdict = (f"{head} ({settings['seeds']} seeds; 95% paired t-intervals of the kind's "
               "mean test R^2, claimed - other): " + "; ".join(
                   f"{row['kind']}: {row['claimed']} - {row['other']} "
                   f"{seeds.interval_text(row)}" for row in rows)
               + ". Best per kind: " + ", ".join(f"{kind} {ranks[kind][0]}" for kind in KINDS)
               + ".")
    timing = watch.timing()
    markdown = "\n\n".join([
        f"Test R^2 per target (standardised; mean ± sd over {settings['seeds']} seeds) of a "
        f"GIN ({settings['num_layers']} layers, {settings['hidden']} wide, sum aggregator, "
        f"jumping knowledge) per readout, {settings['steps']} steps of "
        f"{settings['batch_size']} molecules, all eight targets regressed at once; "
        f"{', '.join(f'{count:,} {split}' for split, count in measured['num_examples'].items())} "
        "molecules. Kind columns: the mean R^2 of "
        "the kind's targets and the readout's rank (#).",
        table,
        "The claim, decided over seeds (every interval above zero: holds; any below: "
        "does not hold):",
        claim_table,
        "Published figures beside ours (other tasks and data; no published study of these "
        "RDKit targets by readout is known to us):",
        common.published_table(PUBLISHED),
        watch.timing_text(timing)])
    numbers = common.to_jsonable({
        "seeds": list(range(settings["seeds"])), "settings": settings,
        "targets": dict(molecules.TARGETS), "readouts": results, "ranking": ranks,
        "claim_comparisons": rows, "num_examples": measured["num_examples"], **timing})
    return common.write_section(
        out_dir, "real_readouts", "Real data: graph readouts on molecules",
        claim=("On molecules, a sum readout suits additive targets (heavy atoms, molecular "
               "weight, TPSA), a mean readout intensive ones (aromatic and sp3 fractions, "
               "mean atomic mass) and a max readout presence ones (halogen, sulfur)."),
        doc=__doc__, markdown=markdown, numbers=numbers, holds=holds, verdict=verdict)


if __name__ == "__main__":
    common.experiment_cli(run, __doc__, full_help="configs/molecules.py's model and length, "
                          "every graph readout, five seeds (for a GPU)")
