"""``python -m gapjax.cam``: class activation maps of your own photos with pretrained
weights (``--image PATH... --model NAME --weights FILE [--out DIR] [--json]``), or of a
trained run's newest checkpoint (``--workdir DIR [--split test] [--num 16] [--out
cams.png]``). docs/cam.md ("Command line") describes the outputs and the errors: one line
on stderr naming the file or option and the fix, exit status 1 (usage errors 2).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from gapjax import data, imagenet, models, pretrained, wsol
from gapjax.cam import make_map_fn, method_names, resolve_method
from gapjax.cli.common import Parser, one_line, progress
from gapjax.train.checkpoint import load_run

PROG = "python -m gapjax.cam"
#: Methods that run many batched passes per image (one per chunk of channels).
SLOW_METHODS = ("score_cam", "ablation_cam")
#: Seconds between two progress lines of one slow map.
CHUNK_PROGRESS_SECONDS = 5.0


class ChunkProgress:
    """``on_chunk`` of a slow CAM method: a progress line on stderr as batched calls over
    chunks of channels finish (the first, then at most one per ``CHUNK_PROGRESS_SECONDS``,
    and the last), with the time since the first chunk of the map finished."""

    def __init__(self, method: str, every: float = CHUNK_PROGRESS_SECONDS):
        self.method, self.every = method, every
        self.began = self.shown = None

    def __call__(self, index: int, count: int) -> None:
        now = time.perf_counter()
        if index == 0 or self.began is None:
            self.began, self.shown = now, None
        if self.shown is None or index == count - 1 or now - self.shown >= self.every:
            self.shown = now
            progress(f"{self.method}: chunk {index + 1} of {count} of channels done "
                     f"({now - self.began:.1f} s after the first)")


def _parser() -> Parser:
    parser = Parser(
        prog=PROG,
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
    return parser


def main(argv: list[str] | None = None) -> str | list[dict[str, Any]]:
    """``python -m gapjax.cam --image PATH... --model NAME --weights FILE [--out DIR]``
    (returns the predictions) or ``--workdir DIR [--out cams.png]`` (returns the PNG)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.image is not None:
        if args.workdir is not None:
            parser.error("--image takes --model and --weights, not --workdir")
        if args.model is None or args.weights is None:
            parser.error("--image needs --model NAME and --weights FILE")
        for option in ("topk", "batch_size"):
            if getattr(args, option) < 1:
                parser.error(f"--{option}={getattr(args, option)} must be at least 1")
        if args.model not in pretrained.names():
            parser.error(f"--model {args.model!r} has no pretrained weight layout; choose one "
                         f"of: {', '.join(pretrained.names())}")
        with parser.user_errors(args.traceback):
            results, failed = photos(
                args.image, model_name=args.model, weights=args.weights,
                method=args.method or "auto", topk=args.topk, batch_size=args.batch_size,
                out=args.out or "cams", as_json=args.json, on_unreadable=parser.fail)
        if failed:
            parser.exit(1)
        return results
    if args.workdir is None:
        parser.error("give --image PATH... --model NAME --weights FILE, or --workdir DIR")
    if args.num < 1:
        parser.error(f"--num={args.num} must be at least 1")
    with parser.user_errors(args.traceback):
        return run_overlays(args.workdir, split=args.split, num=args.num,
                            out=args.out or "cams.png", method=args.method,
                            threshold=args.threshold)


def run_overlays(workdir: str, *, split: str = "test", num: int = 16, out: str = "cams.png",
                 method: str | None = None, threshold: float | None = None) -> str:
    """The runs mode of ``python -m gapjax.cam``: the overlay grid of ``num`` images of
    ``split`` drawn from the run's newest checkpoint; returns the PNG's path."""
    run = load_run(workdir)
    config = run.config
    info = data.dataset_info(config.dataset)
    if info.task != "classification":
        raise ValueError(f"CAM overlays need a classification dataset; the run's "
                         f"config.dataset.name={info.name!r} is a {info.task} task")
    model = models.from_config(config, info.num_classes, None)
    method = resolve_method(model, method or config.eval.get("cam_method", "auto"))
    batch = next(iter(data.make_iterator(config.dataset, split, batch_size=num, seed=0,
                                         train=False)))
    real = np.asarray(batch["weight"]) > 0
    began = time.perf_counter()
    if method in SLOW_METHODS:
        progress(f"{method}: {len(real)} images, one batched pass per chunk of channels ...")
    options = {"on_chunk": ChunkProgress(method)} if method in SLOW_METHODS else {}
    output = make_map_fn(model, method, **options)(run.variables, batch["image"])
    maps = np.asarray(output.maps)[real]
    if method in SLOW_METHODS:
        progress(f"{method}: done in {time.perf_counter() - began:.1f} s")
    probabilities = np.asarray(jax.nn.softmax(output.logits))[real]
    predicted = np.asarray(output.targets)[real]
    labels = np.asarray(batch["label"])[real]
    true_boxes = np.asarray(batch["bbox"])[real] if "bbox" in batch else None
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
    suptitle = (f"{info.name}, step {run.step}: {method} maps of the predicted class "
                f"(pool {getattr(model, 'pool', '?')}), boxes at map > {threshold:.2f}")
    out = wsol.draw_overlays(np.asarray(batch["image"])[real], maps, titles=titles,
                             true_boxes=true_boxes, predicted_boxes=predicted_boxes,
                             out=out, suptitle=suptitle)
    print(f"wrote {out}")
    return out


# --------------------------------------------------------------------------------------
# Photos mode: pretrained weights on your own images
# --------------------------------------------------------------------------------------


def read_pictures(paths: list[Path], on_unreadable: Callable[[str], None]
                  ) -> tuple[list[Path], list[Any]]:
    """``(readable paths, their decoded pictures)``; each unreadable file (truncated,
    corrupt, not an image) is named through ``on_unreadable`` in one line and skipped."""
    readable, pictures = [], []
    for path in paths:
        try:
            pictures.append(imagenet.load_image(path))
            readable.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            on_unreadable(f"cannot read image {path} ({one_line(error)}); skipped it: "
                          "replace or remove the file")
    return readable, pictures


def predict_photos(
    pictures: list[Any], model: Any, variables: Any, *, method: str = "auto",
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the evaluation transform and the map function over the decoded ``pictures``.

    Returns ``(inputs [N, 224, 224, 3], maps [N, 224, 224] in [0, 1] for each image's
    top-1 class, probabilities [N, K])``. Every batch is padded to ``batch_size`` images,
    so the map function compiles once. Slow methods report each batch on stderr.
    """
    inputs = np.stack([imagenet.eval_transform(picture) for picture in pictures])
    slow = resolve_method(model, method) in SLOW_METHODS
    map_fn = make_map_fn(model, method, **({"on_chunk": ChunkProgress(method)} if slow else {}))
    if slow:
        progress(f"{method}: {len(inputs)} image(s) in batches of {batch_size}, one batched "
                 "pass per chunk of channels of the feature map")
    maps, probabilities = [], []
    for start in range(0, len(inputs), batch_size):
        began = time.perf_counter()
        chunk = inputs[start:start + batch_size]
        padded = np.zeros((batch_size, *inputs.shape[1:]), np.float32)
        padded[:len(chunk)] = chunk
        output = map_fn(variables, padded)
        maps.append(np.asarray(output.maps)[:len(chunk)])
        probabilities.append(np.asarray(jax.nn.softmax(output.logits, axis=-1))[:len(chunk)])
        if slow:
            progress(f"{method}: images {start + 1}-{start + len(chunk)} of {len(inputs)} "
                     f"done in {time.perf_counter() - began:.1f} s")
    return inputs, np.concatenate(maps), np.concatenate(probabilities)


def top_classes(probabilities: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Per image the ``k`` most probable classes ``{index, name, probability}``
    (``probabilities [N, K]``; ImageNet names when K is 1000)."""
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
           topk: int = 3, batch_size: int = 8, out: str = "cams", as_json: bool = False,
           on_unreadable: Callable[[str], None] = progress
           ) -> tuple[list[dict[str, Any]], int]:
    """The photos mode of ``python -m gapjax.cam``: ``(the printed predictions, the number
    of unreadable images)``, each unreadable one named through ``on_unreadable``."""
    found = imagenet.image_paths(images)
    paths, pictures = read_pictures(found, on_unreadable)
    failed = len(found) - len(paths)
    if not paths:
        return [], failed
    model, variables = pretrained.load(model_name, weights)
    resolved = resolve_method(model, method)
    inputs, maps, probabilities = predict_photos(pictures, model, variables, method=resolved,
                                                 batch_size=batch_size)
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
    return results, failed


if __name__ == "__main__":
    main()
