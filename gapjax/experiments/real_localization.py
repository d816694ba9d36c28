"""Every CAM method on real objects: Fashion-MNIST items on cluttered canvases.

Claim (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016):
a classifier with a global-average-pooling head, trained with class labels only, shows
where the object is: its class activation map (CAM) localizes real objects better than a
prior that always looks at the centre of the image.

Method: the GAP cnn of ``real_heads`` on ``fashion_canvas`` (one Fashion-MNIST item among
pieces of items of other classes, 56x56, exact boxes and silhouettes), trained with the
very config ``real_heads.model_config("fashion_canvas", "gap", ...)`` and the same
settings over the same seeds (``seeds.train_seeds`` memoises by config, so in one report
process the model is trained once for both sections). For every seed, every method of
the CAM registry that applies to the model (``gapjax.cam.available_methods``: decided by
the model's map kinds and whether it exposes attention, never by name) computes the map
of the true class on the first ``images`` test canvases (bilinear to the input size,
min-max normalised: ``gapjax.cam.make_map_fn``'s defaults), scored with the Choe et al.
(CVPR 2020) protocol of ``gapjax.wsol``: MaxBoxAccV2 (multi-contour boxes, mean over IoU
0.3 / 0.5 / 0.7, best threshold of 0..0.99) and PxAP (pixel average precision against
the silhouette). The centre baseline is a centred Gaussian score map, the same for every
image (``localization.centre_gaussian_map``), scored by the same protocol, so the
threshold sweep picks its best centred box. Classification accuracy: the whole test
split, per seed. For a GAP head some methods coincide: the gradient of the logit at every
position is ``W_k / hw``, so Grad-CAM, HiResCAM and XGrad-CAM are ReLU(CAM) up to a
positive scale, and the contribution map is CAM / hw; min-max normalisation removes the
scale, so their rows agree (CAM keeps its negative part, the others clip it).

Decision rule (fixed before running): the centre baseline is one number per metric (it
does not depend on the seed), so the 95% paired t-interval over seeds of (CAM - centre)
is the one-sample t-interval of CAM's per-seed score around the baseline. The claim
holds when that interval lies above zero for both MaxBoxAccV2 and PxAP; it is false when
it lies below zero for either; otherwise it is undecided (an interval that contains
zero). Every other method gets the same interval against the centre, for information,
and the methods are ranked by their mean MaxBoxAccV2.

``python -m gapjax.experiments.real_localization --out DIR [--full]`` writes
``real_localization.md``, ``real_localization.json`` and ``real_localization.png`` (CAM
of seed 0 on the first test canvases, with the true box and the box the map gives at
the threshold that localizes the most scored canvases). The README figure
``docs/images/real_object_cam.png`` is that figure from a quick run:
``python -m gapjax.experiments.real_localization --out /tmp/rl && cp
/tmp/rl/real_localization.png docs/images/real_object_cam.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gapjax import cam, wsol
from gapjax.data.fashion_mnist import CLASS_NAMES
from gapjax.experiments import cam_methods, common, localization, real_heads, seeds

DATASET = "fashion_canvas"
#: The method the claim is about (the exact map of a GAP head).
CLAIMED = "cam"
METRICS = ("max_box_acc_v2", "pxap")
#: Test canvases drawn in the figure.
SHOWN = 8
#: The shared keys are real_heads' (same model, trained once per process); ``images``:
#: test canvases scored per seed and method (None: the whole test split); ``map_batch``:
#: canvases per map call.
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {**real_heads.SETTINGS[True], "images": 500, "map_batch": 100},
    False: {**real_heads.SETTINGS[False], "images": None, "map_batch": 100},
}
PUBLISHED = (
    ("Choe et al. 2020, Evaluating Weakly Supervised Object Localization Methods Right "
     "(CVPR; quoted from the paper, not re-read here)", "CUB-200-2011 test, CAM, ResNet-50",
     "MaxBoxAccV2", "63.0%"),
    ("Choe et al. 2020 (quoted from the paper)", "OpenImages30k test, CAM, ResNet-50",
     "PxAP", "58.5%"),
    ("Zhou et al. 2016, Learning Deep Features for Discriminative Localization (CVPR; "
     "quoted from the paper)", "ILSVRC 2014 val, CAM, GoogLeNet-GAP",
     "top-1 localization error", "56.4%"),
)


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------


def skipped_methods(model: Any) -> dict[str, str]:
    """Registry methods that do not apply to ``model``, each with the capability it lacks
    (the same test as ``cam.available_methods``)."""
    kinds = tuple(getattr(model, "map_kinds", ()))
    available = cam.available_methods(model)
    reasons = {}
    for name in cam.method_names()[1:]:
        if name in available:
            continue
        spec = cam.CAM_METHODS.get(name)
        if spec.exact_kind is not None and spec.exact_kind not in kinds:
            reasons[name] = (f"needs the head's exact {spec.exact_kind!r} maps; this head "
                             f"has map_kinds {kinds}")
        else:
            reasons[name] = f"needs {spec.needs!r} (forward_attention), which this model lacks"
    return reasons


def centre_scores(boxes: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The centre baseline's MaxBoxAccV2 and PxAP in percent on ``boxes [N, M, 4]``,
    ``masks [N, H, W]``."""
    scores = localization.baseline_scores(boxes, masks)
    return {metric: 100.0 * scores[metric] for metric in METRICS}


def calibrated_threshold(maps: np.ndarray, boxes: np.ndarray) -> float:
    """The threshold of ``wsol.DEFAULT_THRESHOLDS`` at which the largest component's box
    reaches IoU 0.5 on the most of ``maps [N, H, W]`` (the first such threshold)."""
    largest, _ = wsol.iou_curves(maps, boxes)
    return float(wsol.DEFAULT_THRESHOLDS[int(np.argmax(wsol.box_accuracy(largest, 0.5)))])


def decide(comparisons: dict[str, dict[str, Any]]) -> bool | None:
    """The decision rule of the module docstring from CAM's ``paired_comparison`` against
    the centre per metric."""
    outcomes = [comparisons[metric]["outcome"] for metric in METRICS]
    if "hurts" in outcomes:
        return False
    return True if all(outcome == "helps" for outcome in outcomes) else None


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def test_canvases(config: Any, split: str, settings: dict[str, Any]
                  ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The scored test canvases: fixed-shape batches (padding rows have ``weight == 0``)
    and their real rows' ``image``, ``label``, ``bbox [N, M, 4]`` and ``segmentation``."""
    batches = seeds.evaluation_batches(config.dataset, split, batch_size=settings["map_batch"],
                                       max_examples=settings["images"])
    real = [np.asarray(batch["weight"]) > 0 for batch in batches]
    data = {key: np.concatenate([np.asarray(batch[key])[keep]
                                 for batch, keep in zip(batches, real, strict=True)])
            for key in ("image", "label", "bbox", "segmentation")}
    data["bbox"] = data["bbox"].reshape(len(data["bbox"]), -1, 4)
    return batches, data


def method_maps(map_fn: Any, variables: Any, batches: list[dict[str, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray]:
    """True-class maps ``[N, H, W]`` and predicted classes ``[N]`` of the real rows of
    ``batches``."""
    maps, predicted = [], []
    for batch in batches:
        output = map_fn(variables, jnp.asarray(batch["image"]),
                        jnp.asarray(batch["label"], jnp.int32))
        real = np.asarray(batch["weight"]) > 0
        maps.append(np.asarray(output.maps)[real])
        predicted.append(np.asarray(output.logits).argmax(axis=-1)[real])
    return np.concatenate(maps), np.concatenate(predicted)


def score_methods(run: Any, batches: list[dict[str, np.ndarray]], data: dict[str, np.ndarray],
                  baseline: dict[str, float]
                  ) -> tuple[dict[str, dict[str, Any]], tuple[np.ndarray, np.ndarray]]:
    """Per applicable method: per-seed MaxBoxAccV2 and PxAP (percent), their spread, the
    paired comparison with the centre baseline and the seconds taken; plus CAM's maps
    ``[N, H, W]`` and predicted classes ``[N]`` of seed 0 (for the figure)."""
    model = run.trainer.model
    records: dict[str, dict[str, Any]] = {}
    shown = None
    for method in cam.available_methods(model):
        start = time.perf_counter()
        map_fn = cam.make_map_fn(model, method)
        per_seed: dict[str, list[float]] = {metric: [] for metric in METRICS}
        for seed in range(run.trainer.seeds):
            maps, predicted = method_maps(map_fn, run.variables(seed), batches)
            scores = cam_methods.localization_scores(maps, data["bbox"], data["segmentation"])
            for metric in METRICS:
                per_seed[metric].append(100.0 * scores[metric])
            if method == CLAIMED and seed == 0:
                shown = (maps, predicted)
        records[method] = {
            **{metric: seeds.spread(values) for metric, values in per_seed.items()},
            "versus_centre": {metric: seeds.paired_comparison(
                values, [baseline[metric]] * len(values)) for metric, values in per_seed.items()},
            "seconds": time.perf_counter() - start,
        }
    return records, shown


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        source_dir: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Trains (or reuses real_heads') GAP cnn on the canvases over seeds, scores every
    applicable CAM method and the centre baseline; writes ``real_localization.md``,
    ``.json`` and ``.png``; returns the report section. ``data_dir``: where the datasets
    are prepared (default ``OUT/tfds``, as real_heads); ``source_dir``: Fashion-MNIST's
    IDX files (default the Debian location); ``overrides`` replace ``SETTINGS`` entries."""
    watch = common.Stopwatch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    settings = common.section_settings("real_localization", SETTINGS, quick, overrides)
    config = real_heads.model_config(DATASET, "gap", settings, data_dir, source_dir)
    trained = seeds.train_seeds(config, settings["seeds"])
    training = watch.timing()
    scoring = common.Stopwatch()

    split = trained.info.eval_split
    accuracy = trained.trainer.accuracy(trained.state,
                                        seeds.evaluation_batches(config.dataset, split))
    batches, data = test_canvases(config, split, settings)
    baseline = centre_scores(data["bbox"], data["segmentation"])
    records, shown = score_methods(trained, batches, data, baseline)
    skipped = skipped_methods(trained.trainer.model)
    claimed = records[CLAIMED]["versus_centre"]
    holds = decide(claimed)

    ranking = sorted(records, key=lambda name: -records[name]["max_box_acc_v2"]["mean"])
    labels = cam_methods.LABELS
    rows = [[rank, labels.get(name, name),
             *(seeds.mean_sd_text(records[name][metric]["runs"]) for metric in METRICS),
             *(seeds.interval_text(records[name]["versus_centre"][metric])
               for metric in METRICS), records[name]["seconds"]]
            for rank, name in enumerate(ranking, start=1)]
    rows.append(["-", "centre baseline", *(f"{baseline[metric]:.2f}" for metric in METRICS),
                 "-", "-", None])
    table = common.markdown_table(
        ["rank", "maps", "MaxBoxAccV2 %", "PxAP %", "MaxBoxAccV2: maps - centre",
         "PxAP: maps - centre", "seconds (all seeds)"], rows, digits=3)
    threshold = calibrated_threshold(shown[0], data["bbox"])
    figure = plot(data, shown[0][:SHOWN], shown[1][:SHOWN], threshold, out_dir)

    head = {True: "Holds", False: "Does not hold", None: "Undecided"}[holds]
    beat = [labels.get(name, name) for name in ranking
            if all(records[name]["versus_centre"][m]["outcome"] == "helps" for m in METRICS)]
    verdict = (
        f"{head} ({settings['seeds']} seeds, {len(data['label'])} test canvases; 95% paired "
        f"t-intervals, CAM - centre): MaxBoxAccV2 "
        f"{seeds.interval_text(claimed['max_box_acc_v2'])} (points; CAM "
        f"{seeds.mean_sd_text(records[CLAIMED]['max_box_acc_v2']['runs'])} vs centre "
        f"{baseline['max_box_acc_v2']:.2f}), PxAP {seeds.interval_text(claimed['pxap'])} "
        f"(points; CAM {seeds.mean_sd_text(records[CLAIMED]['pxap']['runs'])} vs "
        f"{baseline['pxap']:.2f}). Test accuracy {seeds.mean_sd_text(accuracy)}%. Best "
        f"MaxBoxAccV2: {labels.get(ranking[0], ranking[0])}; above the centre on both "
        f"metrics: {', '.join(beat) or 'none'} ({len(beat)} of {len(records)}).")
    timing = watch.timing()
    own = scoring.timing()
    timing_line = (
        f"({timing['seconds']:.0f} s wall, {timing['cpu_seconds']:.0f} s CPU, load "
        f"{timing['load_average']:.1f}; of which maps and scores {own['seconds']:.0f} s wall, "
        f"{own['cpu_seconds']:.0f} s CPU, and training {training['seconds']:.0f} s wall: "
        "the model real_heads trains, shared when both run in one process)")
    skipped_line = ("Skipped (capability): " + "; ".join(
        f"{labels.get(name, name)}: {reason}" for name, reason in skipped.items()) + "."
        if skipped else "No registry method skipped.")
    markdown = "\n\n".join([
        table, skipped_line,
        f"Test accuracy (whole test split, {trained.info.num_examples[split]:,} canvases): "
        f"{seeds.mean_sd_text(accuracy)}%.",
        "Published figures beside ours (their setting differs: ImageNet-pretrained networks "
        "on natural photographs at 224 px; top-1 localization also needs the right class):",
        common.published_table(PUBLISHED), timing_line])
    numbers = common.to_jsonable({
        "seeds": list(range(settings["seeds"])), "settings": settings,
        "images": len(data["label"]), "accuracy": seeds.spread(accuracy),
        "methods": records, "ranking": ranking, "centre": baseline, "skipped": skipped,
        "claimed_method": CLAIMED, "figure_threshold": threshold,
        "train_seconds": trained.seconds, "train_cpu_seconds": trained.cpu_seconds,
        "scoring_seconds": own["seconds"], "scoring_cpu_seconds": own["cpu_seconds"],
        **timing})
    return common.write_section(
        out_dir, "real_localization", "Real objects: CAM localization against a centre prior",
        claim=("With class labels only, the class activation map of a GAP classifier "
               "localizes real objects (Fashion-MNIST items among clutter) better than a "
               "centre prior, on MaxBoxAccV2 and on PxAP."),
        doc=__doc__, markdown=markdown, numbers=numbers, holds=holds, verdict=verdict,
        figures=[figure])


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------


def plot(data: dict[str, np.ndarray], maps: np.ndarray, predicted: np.ndarray,
         threshold: float, out_dir: Path) -> str:
    """CAM overlays (``maps [n, H, W]``) of the first ``n`` test canvases with the true
    box (green) and the map's box at ``threshold`` (white, dashed), titled with the true
    and predicted classes; written as a 128-colour PNG (a quarter of the size, for the
    README); returns the file name."""
    from PIL import Image

    count = len(maps)
    names = [CLASS_NAMES[int(label)] + ("" if label == guess else
                                        f" (predicted {CLASS_NAMES[int(guess)]})")
             for label, guess in zip(data["label"][:count], predicted, strict=True)]
    name = "real_localization.png"
    path = wsol.draw_overlays(
        np.asarray(data["image"][:count], np.float32), maps, titles=names,
        true_boxes=data["bbox"][:count],
        predicted_boxes=[wsol.boxes_from_score_map(score_map, threshold) for score_map in maps],
        columns=min(4, count), out=str(out_dir / name),
        suptitle=f"CAM of a GAP cnn (seed 0) for the true class; box at threshold "
        f"{threshold:.2f}")
    with Image.open(path) as picture:
        palette = picture.convert("RGB").quantize(colors=128)
    palette.save(path, optimize=True)
    return name


if __name__ == "__main__":
    common.experiment_cli(run, __doc__, full_help="all canvases and test images, larger "
                          "cnn, five seeds (for a GPU)")
