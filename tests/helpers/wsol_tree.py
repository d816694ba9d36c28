"""A synthetic WSOL benchmark tree in the reference's layout, with generated JPEGs.

``make_tree(root, benchmark)`` writes ``root/images/...`` and ``root/metadata/<split>/*.txt``
as clovaai/wsolevaluation lays them out, for a box benchmark (CUB / ILSVRC style) or a mask
benchmark (OpenImages style). Each image is noise with one coloured rectangle whose colour
is its class; its box (or mask) is that rectangle. Returns what was written, so tests can
compare the readers' output with it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

SPLIT_SIZES = {"train": 12, "val": 6, "test": 6}
COLOURS = ((230, 40, 40), (40, 200, 40), (40, 40, 230))


def make_tree(root: str, kind: str = "boxes", num_classes: int = 3, seed: int = 0,
              split_sizes: dict[str, int] | None = None) -> dict:
    """Writes the tree; returns ``{split: [{"id", "label", "size": (w, h), "boxes"|...}]}``."""
    rng = np.random.default_rng(seed)
    images_root = os.path.join(root, "images")
    written: dict[str, list[dict]] = {}
    for split, count in (split_sizes or SPLIT_SIZES).items():
        meta = os.path.join(root, "metadata", split)
        os.makedirs(meta, exist_ok=True)
        records = []
        for index in range(count):
            label = index % num_classes
            width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = rng.integers(0, 60, size=(height, width, 3)).astype(np.uint8)
            x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            x1 = int(rng.integers(x0 + 4, width))
            y1 = int(rng.integers(y0 + 4, height))
            pixels[y0:y1 + 1, x0:x1 + 1] = COLOURS[label % len(COLOURS)]
            image_id = f"{split}/{label:03d}.class/{split}_{index:04d}.jpg"
            path = os.path.join(images_root, image_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(pixels).save(path, quality=95)
            record = {"id": image_id, "label": label, "size": (width, height)}
            if kind == "boxes":
                record["boxes"] = [(x0, y0, x1, y1)]
                if index % 3 == 0:  # a second box on some images
                    record["boxes"].append((0, 0, width - 1, height // 3))
            else:
                mask = np.zeros((height, width), np.uint8)
                mask[y0:y1 + 1, x0:x1 + 1] = 255
                ignore = np.zeros((height, width), np.uint8)
                ignore[: height // 4, :] = 255
                stem = image_id[:-4]
                record["masks"] = [f"{stem}_m0.png"]
                record["ignore"] = f"{stem}_ignore.png"
                Image.fromarray(mask).save(os.path.join(images_root, record["masks"][0]))
                Image.fromarray(ignore).save(os.path.join(images_root, record["ignore"]))
            records.append(record)
        with open(os.path.join(meta, "image_ids.txt"), "w") as handle:
            handle.writelines(f"{r['id']}\n" for r in records)
        with open(os.path.join(meta, "class_labels.txt"), "w") as handle:
            handle.writelines(f"{r['id']},{r['label']}\n" for r in records)
        if kind == "boxes":
            with open(os.path.join(meta, "image_sizes.txt"), "w") as handle:
                handle.writelines(f"{r['id']},{r['size'][0]},{r['size'][1]}\n" for r in records)
            with open(os.path.join(meta, "localization.txt"), "w") as handle:
                for r in records:
                    handle.writelines(f"{r['id']},{x0},{y0},{x1},{y1}\n"
                                      for x0, y0, x1, y1 in r["boxes"])
        else:
            with open(os.path.join(meta, "localization.txt"), "w") as handle:
                for r in records:
                    handle.write(f"{r['id']},{r['masks'][0]},{r['ignore']}\n")
        written[split] = records
    return written
