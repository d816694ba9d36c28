"""Command line for class activation maps: overlays from a trained run's checkpoint.

``python -m gapjax.cam --workdir DIR [--split test] [--num 16] [--out cams.png]
[--method NAME]`` draws images, heat-map overlays, predicted and true boxes from a trained
run's latest checkpoint; ``--method`` takes any name of ``gapjax.cam.METHODS``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from gapjax.cam import METHODS, make_map_fn, resolve_method


def load_run(workdir: str) -> tuple[Any, dict[str, Any], int]:
    """``(config, variables, step)`` of the latest checkpoint in ``workdir/checkpoints``.

    The config is the one the run saved with its checkpoint, so the model is rebuilt
    exactly as it was trained.
    """
    from pathlib import Path

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


def main(argv: list[str] | None = None) -> str:
    """``python -m gapjax.cam --workdir DIR [--split test] [--num 16] [--out cams.png]``."""
    import argparse

    from gapjax import data, wsol
    from gapjax.models import from_config as build_model

    parser = argparse.ArgumentParser(
        prog="python -m gapjax.cam",
        description="Class activation maps of a trained run's latest checkpoint, drawn as "
        "image / overlay pairs with the true box (green) and the map's box (white).",
    )
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--out", default="cams.png", help="PNG to write (default cams.png)")
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="map method (default: the run's config.eval.cam_method)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="map threshold for the drawn boxes (default: the one that "
                        "localizes the most shown images, as MaxBoxAcc calibrates)")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num={args.num} must be at least 1")

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

