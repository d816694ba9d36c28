"""Pictures of where a network looks: score maps over images, with true and estimated boxes.

``overlay_grid`` draws with NumPy alone (the training loop's ``eval/cam_overlay``);
``draw_overlays``, ``box_patch`` and ``display_image`` draw with matplotlib (imported when
called) for the command line and the experiments' figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def overlay_grid(images: Any, maps: Any, boxes: Any = None, columns: int = 4,
                 predicted: Any = None) -> np.ndarray:
    """A picture of where a network looks: ``uint8 [rows * H, columns * W, 3]``.

    Each tile is an image (per-image min-max scaled to grey or colour) blended with its
    score map in a blue-to-red colour scale, ground-truth boxes (normalised ``[M, 4]`` per
    image, padding rows ignored) drawn in green and estimated boxes in white.

    Args:
      images: ``[N, H, W, C]`` (any range; C of 1 or 3).
      maps: ``[N, H, W]`` in ``[0, 1]``.
      boxes: optional ``[N, M, 4]`` normalised ``(ymin, xmin, ymax, xmax)``.
      predicted: optional estimated boxes, a list of ``[n, 4]`` normalised per image.
    """
    images = np.asarray(images, np.float64)
    maps = np.clip(np.nan_to_num(np.asarray(maps, np.float64)), 0.0, 1.0)
    if images.ndim != 4 or maps.shape != images.shape[:3]:
        raise ValueError(f"images [N, H, W, C] and maps [N, H, W] must agree; got "
                         f"{images.shape} and {maps.shape}")
    count, height, width = maps.shape
    low = images.min(axis=(1, 2, 3), keepdims=True)
    spread = images.max(axis=(1, 2, 3), keepdims=True) - low
    shown = (images - low) / np.where(spread > 0, spread, 1.0)
    if shown.shape[-1] != 3:
        shown = np.repeat(shown[..., :1], 3, axis=-1)
    heat = np.stack([maps, 1.0 - np.abs(2.0 * maps - 1.0), 1.0 - maps], axis=-1)
    tiles = 0.5 * shown + 0.5 * heat
    for drawn, colour in ((predicted, (1.0, 1.0, 1.0)), (boxes, (0.0, 1.0, 0.0))):
        if drawn is None:
            continue
        for tile, image_boxes in zip(tiles, drawn):
            image_boxes = np.asarray(image_boxes, np.float64).reshape(-1, 4)
            for box in image_boxes[(image_boxes >= 0).all(axis=1)]:
                top = min(height - 1, int(box[0] * height))
                left = min(width - 1, int(box[1] * width))
                bottom = min(height - 1, max(top, int(np.ceil(box[2] * height)) - 1))
                right = min(width - 1, max(left, int(np.ceil(box[3] * width)) - 1))
                tile[top:bottom + 1, [left, right]] = colour
                tile[[top, bottom], left:right + 1] = colour
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    grid = np.ones((rows * height, columns * width, 3))
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = tile
    return (grid * 255).round().astype(np.uint8)


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


__all__ = ["box_patch", "display_image", "draw_overlays", "overlay_grid"]
