"""``python -m gapjax.wsol --scoremap_root maps/ --metadata_root metadata/ --dataset_name CUB
--split test``: saved score maps scored against a benchmark's metadata, the reference's
``evaluation.py`` command line computed by ``gapjax.wsol.evaluate_scoremaps`` (docs/wsol.md).
A missing or corrupt file ends it with one line naming the file, exit status 1.
"""

from __future__ import annotations

import os

from gapjax.cli.common import Parser
from gapjax.wsol import evaluate_scoremaps


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parses ``argv``, scores the maps and prints the metrics; returns them."""
    parser = Parser(prog="python -m gapjax.wsol",
                    description="Score saved <image_id>.npy maps against a WSOL benchmark's "
                    "metadata, as the reference's evaluation.py does.")
    parser.add_argument("--scoremap_root", required=True)
    parser.add_argument("--metadata_root", default="metadata/")
    parser.add_argument("--mask_root", default="dataset/",
                        help="the folder holding OpenImages/ (as the reference's)")
    parser.add_argument("--dataset_name", required=True, choices=("CUB", "ILSVRC", "OpenImages"))
    parser.add_argument("--split", required=True, choices=("train", "val", "test"))
    parser.add_argument("--cam_curve_interval", type=float, default=0.01)
    parser.add_argument("--box_v1_metric", action="store_true",
                        help="MaxBoxAcc (largest contour, IoU 50) instead of MaxBoxAccV2")
    args = parser.parse_args(argv)
    masks = args.dataset_name == "OpenImages"
    with parser.user_errors(args.traceback):
        result = evaluate_scoremaps(
            args.scoremap_root, os.path.join(args.metadata_root, args.dataset_name, args.split),
            "masks" if masks else "boxes", os.path.join(args.mask_root, "OpenImages"),
            args.cam_curve_interval, not args.box_v1_metric, not args.box_v1_metric)
    for key, value in result.items():
        print(f"{key}: {value!r}")
    return result


if __name__ == "__main__":
    main()
