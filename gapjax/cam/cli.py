"""Command line for class activation maps: your own photos, or a trained run's checkpoint.

Photos with pretrained weights (torchvision / timm files, see ``gapjax.pretrained``)::

    python -m gapjax.cam --image PATH [PATH ...] --model resnet50 --weights FILE
        [--method auto|cam|grad_cam|...] [--topk 3] [--batch_size 8] --out DIR [--json]

decodes each image (Pillow; a folder means its image files), applies torchvision's
ImageNet evaluation transform (``gapjax.imagenet``), prints the top-k classes with their
names and writes ``DIR/<name>_cam.png`` per image: the original picture with the evaluated
crop marked, and the crop under the heat map of the top-1 class with class name and
probability. Batches have one fixed size (the last one is padded), so the map function
compiles once. ``--json`` prints ``[{"path", "top": [{"index", "name", "probability"}],
"overlay"}]`` on stdout instead of the text lines.

A trained gapjax run::

    python -m gapjax.cam --workdir DIR [--split test] [--num 16] [--out cams.png]
        [--method NAME]

draws images, heat-map overlays, predicted and true boxes from the run's latest
checkpoint; ``--method`` takes any name of ``gapjax.cam.method_names()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from gapjax.cam import make_map_fn, method_names, resolve_method


def load_run(workdir: str) -> tuple[Any, dict[str, Any], int]:
    """``(config, variables, step)`` of the latest checkpoint in ``workdir/checkpoints``.

    The config is the one the run saved with its checkpoint, so the model is rebuilt
    exactly as it was trained.
    """
    import ml_collections
    import orbax.checkpoint as ocp

    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--workdir {workdir!r} has no checkpoints/ folder; train first with "
            f"python train.py --config configs/cluttered_cam.py --workdir {workdir}"
        )
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    manager.close()
    state = restored["state"]
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return ml_collections.ConfigDict(restored["meta"]["config"]), variables, int(step)


def box_patch(box: Any, shape: tuple[int, int], **style: Any) -> Any:
    """A matplotlib rectangle for a normalised ``(ymin, xmin, ymax, xmax)`` box on an image
    of ``shape = (H, W)`` drawn by ``imshow`` (pixel edges at half-integers)."""
    from matplotlib.patches import Rectangle

    ymin, xmin, ymax, xmax = (float(v) for v in box)
    height, width = shape
    return Rectangle((xmin * width - 0.5, ymin * height - 0.5), (xmax - xmin) * width,
                     (ymax - ymin) * height, fill=False, **style)


def display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``[H, W, C]`` normalised input -> (picture in [0, 1], colour map) for ``imshow``."""
    picture = np.asarray(image, np.float64)
    picture = picture - picture.min()
    picture = picture / max(picture.max(), 1e-12)
    if picture.shape[-1] == 1:
        return picture[..., 0], "gray"
    return picture, None


def draw_overlays(
    images: np.ndarray,
    maps: np.ndarray,
    *,
    titles: list[str],
    true_boxes: np.ndarray | None = None,
    predicted_boxes: list[np.ndarray] | None = None,
    columns: int = 4,
    out: str = "cams.png",
    suptitle: str | None = None,
) -> str:
    """Writes a grid of (image, heat-map overlay with boxes) pairs to ``out`` (PNG).

    Args:
      images: ``[N, H, W, C]``; maps: ``[N, H, W]`` in ``[0, 1]``.
      titles: one line per example (class and score).
      true_boxes: ``[N, M, 4]`` normalised boxes (negative = padding), drawn in green.
      predicted_boxes: per example ``[n, 4]`` boxes from the map, drawn dashed in white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    rows = -(-count // columns)
    # Fixed margins in inches (legend below, title above), so few rows never squeeze titles.
    bottom, top = 0.35, 0.45 if suptitle else 0.1
    height = 2.5 * rows + bottom + top
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2.0 * 2 * columns, height),
                                squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    shape = images.shape[1:3]
    for index in range(count):
        image_axis = axes[index // columns, 2 * (index % columns)]
        overlay_axis = axes[index // columns, 2 * (index % columns) + 1]
        picture, colour_map = display_image(images[index])
        image_axis.imshow(picture, cmap=colour_map, interpolation="nearest")
        image_axis.set_title(titles[index], fontsize=8, loc="left")
        overlay_axis.imshow(picture, cmap=colour_map, interpolation="nearest")
        overlay_axis.imshow(maps[index], cmap="jet", alpha=0.45, vmin=0, vmax=1,
                            interpolation="bilinear")
        if true_boxes is not None:
            for box in np.asarray(true_boxes[index]).reshape(-1, 4):
                if (box >= 0).all():
                    for axis in (image_axis, overlay_axis):
                        axis.add_patch(box_patch(box, shape, edgecolor="lime", linewidth=1.5))
        if predicted_boxes is not None:
            for box in predicted_boxes[index]:
                overlay_axis.add_patch(box_patch(box, shape, edgecolor="white", linewidth=1.5,
                                                 linestyle="--"))
    handles = [
        matplotlib.lines.Line2D([], [], color="lime", lw=1.5, label="true box"),
        matplotlib.lines.Line2D([], [], color="black", lw=1.5, ls="--",
                                label="box from the map (white)"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    if suptitle:
        figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout(rect=(0, bottom / height, 1, 1 - top / height))
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> str | list[dict[str, Any]]:
    """``python -m gapjax.cam --image PATH... --model NAME --weights FILE [--out DIR]``
    (returns the predictions) or ``--workdir DIR [--out cams.png]`` (returns the PNG)."""
    import argparse

    from gapjax import data, wsol
    from gapjax.models import from_config as build_model

    parser = argparse.ArgumentParser(
        prog="python -m gapjax.cam",
        description="Class activation maps of your own photos with pretrained weights "
        "(--image --model --weights), or of a trained run's latest checkpoint (--workdir), "
        "drawn as image / overlay pairs (runs: with the true box in green and the map's "
        "box in white).",
    )
    parser.add_argument("--workdir", default=None, help="a trained run's --workdir")
    parser.add_argument("--image", nargs="+", default=None, metavar="PATH",
                        help="image files or folders (photos mode)")
    parser.add_argument("--model", default=None,
                        help="model name for --weights, e.g. resnet50, seresnet50, vgg16")
    parser.add_argument("--weights", default=None,
                        help="torchvision / timm weight file (.safetensors, .pth, .pt, .bin)")
    parser.add_argument("--topk", type=int, default=3, help="classes to print (default 3)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8,
                        help="images per compiled batch (default 8)")
    parser.add_argument("--json", action="store_true",
                        help="print the predictions as JSON on stdout")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--out", default=None,
                        help="photos: folder for the overlay PNGs (default cams/); runs: the "
                        "PNG to write (default cams.png)")
    parser.add_argument("--method", default=None, choices=method_names(),
                        help="map method (default: auto for photos, the run's "
                        "config.eval.cam_method for runs)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="map threshold for the drawn boxes (default: the one that "
                        "localizes the most shown images, as MaxBoxAcc calibrates)")
    args = parser.parse_args(argv)
    if args.image is not None:
        if args.workdir is not None:
            parser.error("--image takes --model and --weights, not --workdir")
        if args.model is None or args.weights is None:
            parser.error("--image needs --model NAME and --weights FILE")
        for option in ("topk", "batch_size"):
            if getattr(args, option) < 1:
                parser.error(f"--{option}={getattr(args, option)} must be at least 1")
        return photos(args.image, model_name=args.model, weights=args.weights,
                      method=args.method or "auto", topk=args.topk,
                      batch_size=args.batch_size, out=args.out or "cams",
                      as_json=args.json)
    if args.workdir is None:
        parser.error("give --image PATH... --model NAME --weights FILE, or --workdir DIR")
    if args.num < 1:
        parser.error(f"--num={args.num} must be at least 1")
    args.out = args.out or "cams.png"

    config, variables, step = load_run(args.workdir)
    info = data.dataset_info(config.dataset)
    if info.task != "classification":
        parser.error(f"CAM overlays need a classification dataset; {info.name} is {info.task}")
    model = build_model(config, info.num_classes, None)
    method = args.method or config.eval.get("cam_method", "auto")
    batch = next(iter(data.make_iterator(config.dataset, args.split, batch_size=args.num,
                                         seed=0, train=False)))
    real = np.asarray(batch["weight"]) > 0
    output = make_map_fn(model, method)(variables, batch["image"])
    maps = np.asarray(output.maps)[real]
    probabilities = np.asarray(jax.nn.softmax(output.logits))[real]
    predicted = np.asarray(output.targets)[real]
    labels = np.asarray(batch["label"])[real]
    true_boxes = np.asarray(batch["bbox"])[real] if "bbox" in batch else None
    threshold = args.threshold
    if threshold is None and true_boxes is not None:
        largest, _ = wsol.iou_curves(maps, true_boxes)
        threshold = float(wsol.DEFAULT_THRESHOLDS[np.argmax(wsol.box_accuracy(largest, 0.5))])
    elif threshold is None:
        threshold = wsol.DEFAULT_LOC_THRESHOLD
    predicted_boxes = [wsol.boxes_from_score_map(m, threshold) for m in maps]
    titles = [
        f"pred {p} ({probabilities[i, p]:.2f})  true {t}" + ("" if p == t else "  ✗")
        for i, (p, t) in enumerate(zip(predicted, labels))
    ]
    resolved = resolve_method(model, method)
    suptitle = (f"{info.name}, step {step}: {resolved} maps of the predicted class "
                f"(pool {getattr(model, 'pool', '?')}), boxes at map > {threshold:.2f}")
    out = draw_overlays(np.asarray(batch["image"])[real], maps, titles=titles,
                        true_boxes=true_boxes, predicted_boxes=predicted_boxes,
                        out=args.out, suptitle=suptitle)
    print(f"wrote {out}")
    return out


# --------------------------------------------------------------------------------------
# Photos mode: pretrained weights on your own images
# --------------------------------------------------------------------------------------


def predict_photos(
    paths: list[Path], model: Any, variables: Any, *, method: str = "auto",
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Runs the evaluation transform and the map function over ``paths``.

    Returns ``(inputs [N, 224, 224, 3], maps [N, 224, 224] in [0, 1] for each image's
    top-1 class, probabilities [N, K], pictures)`` with the decoded PIL pictures. Every
    batch is padded to ``batch_size`` images, so the map function compiles once.
    """
    from gapjax import imagenet

    map_fn = make_map_fn(model, method)
    pictures = [imagenet.load_image(path) for path in paths]
    inputs = np.stack([imagenet.eval_transform(picture) for picture in pictures])
    maps, probabilities = [], []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        padded = np.zeros((batch_size, *inputs.shape[1:]), np.float32)
        padded[:len(chunk)] = chunk
        output = map_fn(variables, padded)
        maps.append(np.asarray(output.maps)[:len(chunk)])
        probabilities.append(np.asarray(jax.nn.softmax(output.logits, axis=-1))[:len(chunk)])
    return inputs, np.concatenate(maps), np.concatenate(probabilities), pictures


def top_classes(probabilities: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Per image the ``k`` most probable classes ``{index, name, probability}``
    (``probabilities [N, K]``; ImageNet names when K is 1000)."""
    from gapjax import imagenet

    num_classes = probabilities.shape[-1]
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [[{"index": int(index), "name": imagenet.class_name(int(index), num_classes),
              "probability": float(row[index])} for index in indices]
            for row, indices in zip(probabilities, order)]


def draw_photo_overlay(picture: Any, crop: np.ndarray, heat_map: np.ndarray,
                       top: list[dict[str, Any]], *, title: str, out: str | Path) -> Path:
    """One PNG: the original ``picture`` (PIL) with the evaluated crop dashed, and the
    crop (``[224, 224, 3]`` normalised) under ``heat_map [224, 224]`` in ``[0, 1]``,
    titled with the top-1 class and probability; the top-k list underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from gapjax import imagenet

    figure, (left, right) = plt.subplots(1, 2, figsize=(9.0, 4.9))
    left.imshow(np.asarray(picture))
    top_px, left_px, bottom_px, right_px = imagenet.eval_crop_region(picture.height,
                                                                    picture.width)
    left.add_patch(Rectangle((left_px - 0.5, top_px - 0.5), right_px - left_px,
                             bottom_px - top_px, fill=False, edgecolor="white",
                             linestyle="--", linewidth=1.5))
    left.set_title(f"original {picture.width}x{picture.height} (dashed: the 224 crop)",
                   fontsize=9)
    right.imshow(imagenet.denormalize(crop))
    shown = right.imshow(heat_map, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0,
                         interpolation="bilinear")
    best = top[0]
    right.set_title(f"{best['name']} ({best['index']}): {best['probability']:.1%}",
                    fontsize=11, fontweight="bold")
    figure.colorbar(shown, ax=right, fraction=0.046, pad=0.03)
    for axis in (left, right):
        axis.axis("off")
    ranking = "   ".join(f"{rank + 1}. {entry['name']} {entry['probability']:.1%}"
                         for rank, entry in enumerate(top))
    figure.text(0.5, 0.04, ranking, ha="center", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _overlay_names(paths: list[Path]) -> list[str]:
    """``<stem>_cam.png`` per image, numbered where two images share a stem."""
    stems = [path.stem for path in paths]
    return [f"{stem}_cam.png" if stems.count(stem) == 1 else f"{stem}_{index}_cam.png"
            for index, stem in enumerate(stems)]


def photos(images: list[str], *, model_name: str, weights: str, method: str = "auto",
           topk: int = 3, batch_size: int = 8, out: str = "cams", as_json: bool = False
           ) -> list[dict[str, Any]]:
    """The photos mode of ``python -m gapjax.cam``; returns the printed predictions."""
    import json
    import sys

    from gapjax import imagenet, pretrained

    paths = imagenet.image_paths(images)
    model, variables = pretrained.load(model_name, weights)
    resolved = resolve_method(model, method)
    inputs, maps, probabilities, pictures = predict_photos(
        paths, model, variables, method=resolved, batch_size=batch_size)
    tops = top_classes(probabilities, topk)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    log = sys.stderr if as_json else sys.stdout
    for index, (path, name) in enumerate(zip(paths, _overlay_names(paths))):
        overlay = draw_photo_overlay(
            pictures[index], inputs[index], maps[index], tops[index],
            title=f"{path.name}: {model_name}, {resolved} map of the top-1 class",
            out=directory / name)
        results.append({"path": str(path), "top": tops[index], "overlay": str(overlay)})
        if not as_json:
            ranking = ", ".join(f"{entry['name']} ({entry['index']}) {entry['probability']:.4f}"
                                for entry in tops[index])
            print(f"{path}: {ranking}", file=log)
    if as_json:
        print(json.dumps(results, indent=1))
    print(f"wrote {len(results)} overlay(s) to {directory}", file=log)
    return results

