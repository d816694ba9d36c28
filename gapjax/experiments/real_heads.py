"""FC versus GAP heads on real images: Fashion-MNIST and Fashion-MNIST items on canvases.

Claim (Lin et al., "Network in Network", ICLR 2014): a global-average-pooling head has far
fewer parameters than a flatten + fully connected head and overfits less.

Method: the project's cnn (one conv + BN + ReLU per stage, 2x2 max pools) with either
head on ``fashion_mnist`` (28x28, strides 1, 2, 2) and on ``fashion_canvas`` (one item
among clutter, 56x56, strides 2, 2, 2); both end in a 7x7 map, so the FC head
(flatten + one Dense) holds 49 times the GAP head's weights. AdamW with a cosine
schedule, no augmentation, every seed of a model trained at once
(``seeds.train_seeds``). Overfitting shows only when a model sees its training images
many times, so quick mode trains on a fixed subset (the first ``train_examples``
Fashion-MNIST training images; ``canvas_train`` canvases) for several epochs; ``--full``
trains on everything. Train accuracy: the un-augmented training subset the model was
trained on; test accuracy: the whole test split; the gap is their difference in points.
A seed fixes the data order and the backbone's initialisation (Flax derives each
layer's key from its name), so the FC and GAP runs of one seed are a pair.

Decision rule (fixed before running): the GAP head has *far fewer* parameters when the
FC head is at least ``SHRINK_FACTOR`` times larger on both datasets (exact counts from the
variable shapes); it *overfits less* on a dataset when the 95% paired t-interval over
seeds of (FC gap - GAP gap) lies above zero. The claim holds when both parts hold on
both datasets; it fails when the head is not far smaller or when the interval lies below
zero on either dataset (GAP overfits more); otherwise it is undecided (an interval that
contains zero).

``python -m gapjax.experiments.real_heads --out DIR [--full]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gapjax import models
from gapjax.experiments import common, seeds

DATASETS = ("fashion_mnist", "fashion_canvas")
HEADS = ("fc", "gap")
#: "Far fewer": the FC head is at least this many times the GAP head.
SHRINK_FACTOR = 10.0
#: Train-accuracy shortfall (points) of GAP against FC that the verdict calls underfitting.
UNDERFIT_POINTS = 5.0
#: Strides per dataset: both inputs end in a 7x7 map.
STRIDES = {"fashion_mnist": (1, 2, 2), "fashion_canvas": (2, 2, 2)}
CANVAS_SIZE = 56
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"seeds": 3, "steps": 800, "batch_size": 32, "learning_rate": 2e-3,
           "widths": (16, 32, 64), "depth": 1, "train_examples": 2000,
           "canvas_train": 2000, "canvas_test": 1000},
    # For a GPU: all 60,000 training images (about 21 epochs at batch 128) and the
    # default 10,000 / 2,000 canvases, the default cnn widths, five seeds.
    False: {"seeds": 5, "steps": 10000, "batch_size": 128, "learning_rate": 2e-3,
            "widths": (32, 64, 128), "depth": 2, "train_examples": None,
            "canvas_train": 10000, "canvas_test": 2000},
}
#: Published figures this section stands beside.
PUBLISHED = (
    ("Lin et al. 2014, Network in Network (Table 5; quoted, not re-read here)",
     "CIFAR-10, no augmentation, NIN", "test error, FC / FC + dropout / GAP",
     "11.59% / 10.88% / 10.41%"),
    ("Fashion-MNIST README benchmark (zalandoresearch/fashion-mnist; submitted, not tested "
     "by the maintainers)", "Fashion-MNIST test",
     "accuracy: 2 Conv+pooling / 3 Conv+BN+pooling / 5 Conv+BN+pooling / ResNet18 / "
     "WRN-28-10", "0.876-0.916 / 0.921 / 0.931 / 0.949 / 0.959"),
    ("this project, configs/fashion_mnist.py (GAP cnn, augmentation, full training set)",
     "Fashion-MNIST test, 2 CPU cores, 9 min", "accuracy", "0.9252"),
)


def dataset_options(dataset: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The dataset's own keys for ``settings``."""
    if dataset == "fashion_canvas":
        return {"canvas_size": CANVAS_SIZE, "num_train": settings["canvas_train"],
                "num_test": settings["canvas_test"]}
    return {}


def train_split(dataset: str, settings: dict[str, Any]) -> str:
    """The training split: a fixed subset of Fashion-MNIST's when ``train_examples`` is
    set (the canvases are generated at ``canvas_train`` instead)."""
    if dataset == "fashion_mnist" and settings["train_examples"]:
        return f"train[:{settings['train_examples']}]"
    return "train"


def model_config(dataset: str, head: str, settings: dict[str, Any], data_dir: Path | str,
                 source_dir: Path | str | None = None) -> Any:
    """The training config of the cnn with ``head`` (pool ``gap``) on ``dataset``;
    real_localization trains (shares) the same GAP model on the canvases."""
    return common.quick_config(
        dataset, "cnn", steps=settings["steps"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        dataset_options=common.real_dataset_options(data_dir, source_dir,
                                                    **dataset_options(dataset, settings)),
        widths=tuple(settings["widths"]), depth=settings["depth"], strides=STRIDES[dataset],
        head=head, pool="gap")


def head_parameters(config: Any, input_shape: tuple[int, ...], num_classes: int
                    ) -> dict[str, int]:
    """``{"head", "backbone"}`` parameter counts of the model ``config`` describes."""
    model = models.from_config(config, num_classes)
    params = common.abstract_variables(model, input_shape)["params"]
    head = common.parameter_count(params["head"])
    return {"head": head, "backbone": common.parameter_count(params) - head}


def measure(dataset: str, settings: dict[str, Any], data_dir: Path,
            source_dir: Path | None) -> dict[str, Any]:
    """Both heads on ``dataset``: per-seed train / test accuracy and gap, parameters, and
    the paired comparisons."""
    split = train_split(dataset, settings)
    heads: dict[str, dict[str, Any]] = {}
    for head in HEADS:
        config = model_config(dataset, head, settings, data_dir, source_dir)
        run = seeds.train_seeds(config, settings["seeds"], split)
        train_batches = seeds.evaluation_batches(config.dataset, split)
        test_batches = seeds.evaluation_batches(config.dataset, run.info.eval_split)
        train = run.trainer.accuracy(run.state, train_batches)
        test = run.trainer.accuracy(run.state, test_batches)
        heads[head] = {
            "train_accuracy": seeds.spread(train), "test_accuracy": seeds.spread(test),
            "gap": seeds.spread(train - test),
            **head_parameters(config, run.info.input_shape, run.info.num_classes),
            "train_examples": run.info.num_examples.get(split) or settings["train_examples"],
            "test_examples": run.info.num_examples[run.info.eval_split],
            "epochs": settings["steps"] * settings["batch_size"]
            / (run.info.num_examples.get(split) or settings["train_examples"]),
            "train_seconds": run.seconds, "train_cpu_seconds": run.cpu_seconds,
        }
    fc, gap = heads["fc"], heads["gap"]
    return {
        "heads": heads,
        "head_ratio": fc["head"] / gap["head"],
        "overfitting": seeds.paired_comparison(fc["gap"]["runs"], gap["gap"]["runs"]),
        "test_gap_minus_fc": seeds.paired_comparison(gap["test_accuracy"]["runs"],
                                                     fc["test_accuracy"]["runs"]),
        "split": split,
    }


def decide(results: dict[str, dict[str, Any]]) -> bool | None:
    """The decision rule of the module docstring from ``measure``'s results per dataset."""
    far_fewer = all(result["head_ratio"] >= SHRINK_FACTOR for result in results.values())
    outcomes = [result["overfitting"]["outcome"] for result in results.values()]
    if not far_fewer or "hurts" in outcomes:
        return False
    return True if all(outcome == "helps" for outcome in outcomes) else None


def underfitting_note(results: dict[str, dict[str, Any]]) -> str:
    """A sentence for each dataset where GAP's train accuracy trails FC's by more than
    ``UNDERFIT_POINTS``: part of its smaller gap is fitting the training set less."""
    notes = []
    for dataset, result in results.items():
        fc, gap = (result["heads"][head]["train_accuracy"]["mean"] for head in HEADS)
        if fc - gap > UNDERFIT_POINTS:
            notes.append(f"{dataset} (train accuracy GAP {gap:.1f}% vs FC {fc:.1f}%)")
    return ("" if not notes else " At this budget GAP fits the training set less on "
            + ", ".join(notes) + ": part of its smaller gap is that, not only less "
            "overfitting.")


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        source_dir: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Trains both heads on both datasets over seeds; writes ``real_heads.md`` and
    ``real_heads.json``; returns the report section. ``data_dir``: where the datasets are
    prepared (default ``OUT/tfds``); ``source_dir``: Fashion-MNIST's IDX files (default
    the Debian location); ``overrides`` replace ``SETTINGS`` entries."""
    watch = common.Stopwatch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    settings = common.section_settings("real_heads", SETTINGS, quick, overrides)
    results = {dataset: measure(dataset, settings, data_dir, source_dir)
               for dataset in DATASETS}
    holds = decide(results)

    rows = []
    for dataset, result in results.items():
        for head in HEADS:
            record = result["heads"][head]
            rows.append([dataset, head, record["backbone"], record["head"],
                         f"{record['train_examples']:,} x {record['epochs']:.1f} ep",
                         seeds.mean_sd_text(record["train_accuracy"]["runs"]),
                         seeds.mean_sd_text(record["test_accuracy"]["runs"]),
                         seeds.mean_sd_text(record["gap"]["runs"]),
                         seeds.interval_text(result["overfitting"]) if head == "gap" else "-",
                         seeds.interval_text(result["test_gap_minus_fc"]) if head == "gap"
                         else "-"])
    table = common.markdown_table(
        ["dataset", "head", "backbone params", "head params", "training", "train acc (%)",
         "test acc (%)", "train-test gap", "FC gap - GAP gap", "test: GAP - FC"], rows)
    parts = "; ".join(
        f"{dataset}: FC head {result['head_ratio']:.0f}x the GAP head, FC gap - GAP gap "
        f"{seeds.interval_text(result['overfitting'])} points"
        for dataset, result in results.items())
    head = {True: "Holds", False: "Does not hold", None: "Undecided"}[holds]
    verdict = (f"{head} ({settings['seeds']} seeds; 95% paired t-intervals): {parts}. "
               "Test accuracy, GAP - FC: " + "; ".join(
                   f"{dataset} {seeds.interval_text(result['test_gap_minus_fc'])}"
                   for dataset, result in results.items()) + "."
               + underfitting_note(results))
    timing = watch.timing()
    markdown = "\n\n".join([
        table, "Published figures beside ours (their setting differs: larger networks, "
        "full training sets, more epochs):", common.published_table(PUBLISHED),
        watch.timing_text(timing)])
    numbers = common.to_jsonable({"seeds": list(range(settings["seeds"])),
                                  "settings": settings, "datasets": results,
                                  "shrink_factor": SHRINK_FACTOR, **timing})
    return common.write_section(
        out_dir, "real_heads", "Real data: FC vs GAP heads",
        claim=("A GAP head has far fewer parameters than a flatten + FC head (at least "
               f"{SHRINK_FACTOR:.0f}x fewer) and overfits less (a smaller train-test "
               "accuracy gap), on Fashion-MNIST and on Fashion-MNIST items among clutter."),
        doc=__doc__, markdown=markdown, numbers=numbers, holds=holds, verdict=verdict)


if __name__ == "__main__":
    common.experiment_cli(run, __doc__, full_help="all training images, larger cnn, five "
                          "seeds (for a GPU)")
