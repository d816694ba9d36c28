"""The CAM family side by side: where each method looks, how well it localizes, how faithful
it is to the model, and what it costs.

Every method of ``gapjax.cam.METHODS`` that applies (exact CAM and contribution maps,
Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM, Eigen-CAM, Score-CAM, Ablation-CAM)
is computed for the true class of the same test images:

* on the embedded cluttered digits with the GAP cnn the localization section trains
  (``common.standard_config``: the same run, trained once per process), scored for
  localization with the Choe et al. protocol (``gapjax.wsol``: MaxBoxAccV2, PxAP) and for
  faithfulness (``gapjax.cam.faithfulness``: deletion and insertion AUC of the target
  probability, ROAD's combined score, average drop and increase in confidence);
* on a pretrained ResNet-50 when a torchvision weight file is given (``weights=`` or the
  ``GAPJAX_RESNET50_WEIGHTS`` environment variable): scikit-learn's bundled photographs
  (or ``photos=``) through the ImageNet evaluation transform, faithfulness only (no boxes),
  maps of the predicted class.

Time per image is the median of repeated jitted calls (after compilation) divided by the
batch size. A random map (uniform noise, the same for every method) is the faithfulness
floor: the claim is that every method beats it on deletion, insertion and ROAD.

``python -m gapjax.experiments.cam_methods --out DIR [--full]`` writes
``cam_methods.md`` (the table), ``cam_methods.json`` and ``cam_methods.png`` (a grid:
images down, methods across).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gapjax import cam, imagenet, pretrained, wsol
from gapjax.cam import faithfulness
from gapjax.data import make_iterator
from gapjax.experiments import common
from gapjax.wsol import display_image

#: Where a ResNet-50 weight file is looked for when ``run`` is not given one.
WEIGHTS_ENV = "GAPJAX_RESNET50_WEIGHTS"
#: Images shown per model in the grid.
SHOWN = 4
#: Faithfulness settings: curve steps and ROAD percentiles (quick, full).
STEPS = {True: 8, False: 16}
PERCENTILES = {True: (20, 50, 80), False: (10, 20, 30, 40, 50, 60, 70, 80, 90)}
#: Test images scored on the digits (quick, full).
DIGIT_IMAGES = {True: 64, False: 500}
LABELS = {"cam": "CAM", "contribution": "contribution", "grad_cam": "Grad-CAM",
          "hires_cam": "HiResCAM", "grad_cam_pp": "Grad-CAM++", "xgrad_cam": "XGrad-CAM",
          "layer_cam": "LayerCAM", "eigen_cam": "Eigen-CAM", "score_cam": "Score-CAM",
          "ablation_cam": "Ablation-CAM", "random": "random map"}
TABLE_HEADERS = ("model", "method", "MaxBoxAccV2 %", "PxAP %", "deletion AUC (lower)",
                 "insertion AUC (higher)", "ROAD (higher)", "avg drop % (lower)",
                 "increase % (higher)", "ms / image")


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------


def localization_scores(maps: np.ndarray, boxes: np.ndarray, masks: np.ndarray
                        ) -> dict[str, float]:
    """MaxBoxAccV2 and PxAP (fractions) of ``maps [N, H, W]`` in ``[0, 1]``."""
    _, best = wsol.iou_curves(maps, boxes)
    return {
        "max_box_acc_v2": float(np.mean([wsol.box_accuracy(best, delta).max()
                                         for delta in wsol.V2_IOU_THRESHOLDS])),
        "pxap": float(wsol.pxap(maps, masks)),
    }


def random_maps(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Uniform noise maps, the faithfulness floor."""
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def median_seconds(fn: Any, repeats: int) -> float:
    """Median wall time of ``fn()`` (which blocks on its result) over ``repeats`` calls."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """Markdown rows of ``TABLE_HEADERS`` from ``run``'s records (percentages where marked)."""
    def percent(value):
        return None if value is None else 100.0 * value

    return [[r["model"], LABELS.get(r["method"], r["method"]),
             percent(r.get("max_box_acc_v2")), percent(r.get("pxap")), r["deletion"],
             r["insertion"], r["road"], percent(r["average_drop"]), percent(r["increase"]),
             None if r.get("seconds_per_image") is None else 1000 * r["seconds_per_image"]]
            for r in records]


def faithful_beyond_random(records: list[dict[str, Any]]) -> dict[str, bool]:
    """Per ``model/method``: deletion lower, insertion and ROAD higher than the random map's
    on the same model."""
    verdicts = {}
    for record in records:
        if record["method"] == "random":
            continue
        floor = next(r for r in records if r["model"] == record["model"]
                     and r["method"] == "random")
        verdicts[f"{record['model']}/{record['method']}"] = bool(
            record["deletion"] < floor["deletion"] and record["insertion"] > floor["insertion"]
            and record["road"] > floor["road"])
    return verdicts


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def score_methods(model: Any, variables: Any, images: np.ndarray, targets: np.ndarray, *,
                  name: str, quick: bool, batch_size: int, boxes: np.ndarray | None = None,
                  masks: np.ndarray | None = None, methods: tuple[str, ...] | None = None,
                  repeats: int = 3) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Records (one per method plus the random map) and the maps of the first ``SHOWN``
    images per method, for ``images [N, H, W, C]`` and ``targets [N]``."""
    methods = methods or cam.available_methods(model)
    apply_fn = functools.partial(model.apply, train=False)
    key = jax.random.key(0)
    count = len(images) - len(images) % batch_size or len(images)
    batches = [slice(start, start + batch_size) for start in range(0, count, batch_size)]
    records, shown = [], {}

    def faithfulness_of(maps: np.ndarray) -> dict[str, float]:
        totals: dict[str, list[np.ndarray]] = {}
        for part in batches:
            scores = faithfulness.evaluate(
                apply_fn, jnp.asarray(images[part]), jnp.asarray(maps[part]),
                jnp.asarray(targets[part]), key, steps=STEPS[quick],
                percentiles=PERCENTILES[quick], variables=variables)
            for metric, values in scores.items():
                totals.setdefault(metric, []).append(np.asarray(values))
        return {metric: float(np.concatenate(values).mean())
                for metric, values in totals.items()}

    for method in (*methods, "random"):
        if method == "random":
            maps = random_maps(images[:count].shape[:3])
            seconds = None
        else:
            map_fn = cam.make_map_fn(model, method)
            outputs = [map_fn(variables, jnp.asarray(images[part]), jnp.asarray(targets[part]))
                       for part in batches]
            maps = np.concatenate([np.asarray(out.maps) for out in outputs])
            first = (jnp.asarray(images[batches[0]]), jnp.asarray(targets[batches[0]]))
            seconds = median_seconds(
                functools.partial(_blocking_call, map_fn, variables, *first), repeats
            ) / len(first[0])
        record = {"model": name, "method": method, "seconds_per_image": seconds,
                  **faithfulness_of(maps)}
        if boxes is not None and masks is not None:
            record.update(localization_scores(maps, boxes[:count], masks[:count]))
        records.append(record)
        shown[method] = maps[:SHOWN]
    return records, shown


def _blocking_call(map_fn: Any, variables: Any, images: Any, targets: Any) -> None:
    jax.block_until_ready(map_fn(variables, images, targets).maps)


def digits_case(out_dir: Path, quick: bool) -> dict[str, Any]:
    """The GAP cnn on cluttered digits: trained (or reused) and scored."""
    config = common.standard_config(common.CLUTTERED, quick, head="gap", pool="gap",
                                    data_dir=out_dir / "tfds")
    result = common.train(config, out_dir / "runs" / common.run_name(config))
    wanted = DIGIT_IMAGES[quick]
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("image", "label", "bbox", "segmentation")}
    for batch in make_iterator(config.dataset, "test", batch_size=min(wanted, 250), seed=0,
                               train=False):
        real = np.asarray(batch["weight"]) > 0
        for key in parts:
            parts[key].append(np.asarray(batch[key])[real])
        if sum(len(p) for p in parts["image"]) >= wanted:
            break
    data = {key: np.concatenate(values)[:wanted] for key, values in parts.items()}
    records, shown = score_methods(
        result.model, result.variables, data["image"], data["label"].astype(np.int32),
        name="cnn (digits)", quick=quick, batch_size=32, boxes=data["bbox"],
        masks=data["segmentation"])
    return {"records": records, "shown": shown, "images": data["image"][:SHOWN],
            "labels": data["label"][:SHOWN], "steps": int(config.total_steps),
            "canvas_size": int(config.dataset.canvas_size)}


def resnet50_case(weights: str | Path, quick: bool,
                  photos: list[str | Path] | None = None) -> dict[str, Any]:
    """A pretrained ResNet-50 on photographs (faithfulness only): the predicted class.

    One timed call per method: Score-CAM runs 2048 forward passes per image (minutes per
    photograph on a CPU), the other methods about one."""
    model, variables = pretrained.load("resnet50", weights)
    if photos:
        pictures = [imagenet.load_image(path) for path in photos]
    else:
        from PIL import Image
        from sklearn.datasets import load_sample_images

        pictures = [Image.fromarray(image) for image in load_sample_images().images]
    images = np.stack([imagenet.eval_transform(picture) for picture in pictures])
    logits = jax.jit(functools.partial(model.apply, train=False))(variables,
                                                                  jnp.asarray(images))
    targets = np.asarray(logits).argmax(axis=-1).astype(np.int32)
    records, shown = score_methods(model, variables, images, targets, name="ResNet-50",
                                   quick=quick, batch_size=len(images), repeats=1)
    return {"records": records, "shown": shown, "images": images[:SHOWN],
            "labels": targets[:SHOWN]}


def run(out_dir: Path | str, quick: bool = True, weights: str | Path | None = None,
        photos: list[str | Path] | None = None) -> dict[str, Any]:
    """Scores every method on the digits (and on ResNet-50 when ``weights`` or
    ``$GAPJAX_RESNET50_WEIGHTS`` names a file); writes the table, JSON and grid figure
    into ``out_dir``. Returns a report section with ``table``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    watch = common.Stopwatch()
    cases = {"digits": digits_case(out_dir, quick)}
    weights = weights or os.environ.get(WEIGHTS_ENV)
    if weights:
        cases["resnet50"] = resnet50_case(weights, quick, photos)
    records = [record for case in cases.values() for record in case["records"]]
    table = common.markdown_table(TABLE_HEADERS, table_rows(records), digits=3)
    figure = plot(cases, out_dir)
    verdicts = faithful_beyond_random(records)
    numbers = {"records": records, "faithful_beyond_random": verdicts,
               "digits_steps": cases["digits"]["steps"],
               "canvas_size": cases["digits"]["canvas_size"],
               "resnet50": "resnet50" in cases, "seconds": watch.elapsed()}
    (out_dir / "cam_methods.md").write_text(table + "\n")
    (out_dir / "cam_methods.json").write_text(json.dumps(common.to_jsonable(numbers), indent=1))
    holds = all(verdicts.values())
    failing = [name for name, ok in verdicts.items() if not ok]
    scored = [r for r in records if r["method"] != "random"]
    best = {metric: min(scored, key=lambda r: r[metric] * (1 if lower else -1))
            for metric, lower in (("deletion", True), ("insertion", False), ("road", False))}
    localized = [r for r in scored if r.get("max_box_acc_v2") is not None]
    verdict = (
        f"{sum(verdicts.values())} of {len(verdicts)} maps beat the random map on deletion, "
        f"insertion and ROAD" + (f" (not: {', '.join(failing)})" if failing else "") + ". "
        + "Best: " + "; ".join(f"{metric} {LABELS[r['method']]} ({r['model']}, "
                               f"{r[metric]:.3f})" for metric, r in best.items())
        + (f"; MaxBoxAccV2 {LABELS[max(localized, key=lambda r: r['max_box_acc_v2'])['method']]}"
           if localized else "") + "."
        + ("" if weights else f" No ResNet-50 rows: set ${WEIGHTS_ENV} to a torchvision "
           "resnet50 weight file to add them.")
    )
    return {
        **common.section(
            "CAM methods: localization, faithfulness and cost",
            claim=("Every CAM-family map of a trained GAP classifier is faithful to it: the "
                   "target probability falls faster when its top pixels are deleted, and "
                   "rises faster when they are inserted, than with a random map, and ROAD "
                   "(remove and debias) agrees."),
            method=(f"cnn (GAP head) trained {cases['digits']['steps']} steps on "
                    f"{cases['digits']['canvas_size']}px cluttered digits; "
                    f"{DIGIT_IMAGES[quick]} test images, true-class maps (bilinear, min-max); "
                    "MaxBoxAccV2 / PxAP by gapjax.wsol; deletion (zero baseline) and "
                    f"insertion (blur baseline) AUC over {STEPS[quick]} steps; ROAD "
                    f"(lerf - morf) / 2 at percentiles {PERCENTILES[quick]} with noisy linear "
                    "imputation; average drop and increase in confidence on image x map; "
                    "time: median jitted call / batch on this machine."
                    + (" ResNet-50: scikit-learn's photographs, predicted-class maps."
                       if weights else "")),
            markdown=table,
            numbers=numbers,
            holds=holds,
            verdict=verdict,
            figures=[figure],
        ),
        "table": table,
    }


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------


def plot(cases: dict[str, dict[str, Any]], out_dir: Path) -> str:
    """Grid of overlays: one row per shown image (per model), one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(case, index) for case in cases.values() for index in range(len(case["images"]))]
    methods = list(next(iter(cases.values()))["shown"])
    for case in cases.values():
        methods += [m for m in case["shown"] if m not in methods]
    figure, axes = plt.subplots(len(rows), len(methods) + 1,
                                figsize=(1.45 * (len(methods) + 1), 1.55 * len(rows) + 0.4),
                                squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for row, (case, index) in enumerate(rows):
        picture, colour_map = display_image(case["images"][index])
        axes[row, 0].imshow(picture, cmap=colour_map, interpolation="nearest")
        axes[row, 0].set_title(f"{case['records'][0]['model']}\nclass {case['labels'][index]}",
                               fontsize=7)
        for column, method in enumerate(methods, start=1):
            if method not in case["shown"]:
                continue
            axis = axes[row, column]
            axis.imshow(picture, cmap=colour_map, interpolation="nearest")
            axis.imshow(case["shown"][method][index], cmap="jet", alpha=0.5, vmin=0, vmax=1,
                        interpolation="bilinear")
            if row == 0:
                axis.set_title(LABELS.get(method, method), fontsize=8)
    figure.tight_layout()
    name = "cam_methods.png"
    figure.savefig(out_dir / name, dpi=100)
    plt.close(figure)
    return name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``--out DIR [--full] [--weights resnet50.pth] [--photo PATH ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help="more images and steps")
    parser.add_argument("--weights", default=None,
                        help=f"torchvision resnet50 weights (default: ${WEIGHTS_ENV})")
    parser.add_argument("--photo", action="append", default=None,
                        help="a photograph for the ResNet-50 rows (repeatable; default: "
                        "scikit-learn's sample images)")
    args = parser.parse_args(argv)
    result = run(args.out, quick=not args.full, weights=args.weights, photos=args.photo)
    print(result["markdown"])
    print(result["verdict"])
    return result


if __name__ == "__main__":
    main()
