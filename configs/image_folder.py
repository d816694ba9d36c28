"""Your own images: a CNN with a GAP head on ``DIR/<split>/<class>/<image>``.

    python train.py --config configs/image_folder.py --workdir runs/mine \
        --config.dataset.source_dir=DIR
    python train.py --config configs/image_folder.py:resnet18 --workdir runs/mine_r18 \
        --config.dataset.source_dir=DIR --config.eval.localization=True

``DIR`` holds ``train/`` and ``val/`` (or ``validation/``, or ``test/``), each with one
folder per class; the classes sorted by name are the labels. The folder is prepared once
as ArrayRecord under the data directory, and again whenever its files change
(``gapjax.data.image_folder``, docs/datasets.md). With ``DIR/boxes.csv`` (``path,x0,y0,x1,
y1`` in pixels of the original image) batches carry boxes and
``--config.eval.localization=True`` adds the localization metrics of the class activation
maps (``eval/max_box_acc``, ``eval/top1_loc``, ...); with both ``val/`` and ``test/``,
``--config.eval.final_split=test`` scores ``test`` once at the end with the map threshold
calibrated on ``val``.

Variants: ``cnn`` (default): 64x64 inputs, four conv-BN-ReLU stages (32-256 channels,
8x8 final map); ``resnet18``: ResNet-18 (ImageNet stem) at 224x224, for a GPU. Every
``dataset`` key can be overridden: ``image_size``, ``channels`` (1 or 3; default: 1 when
every image is gray), ``eval_split``, ``max_shift``, ``flip``.
"""

from __future__ import annotations

import ml_collections

from gapjax.train.defaults import base_config

VARIANTS = ("cnn", "resnet18")


def get_config(variant: str = "cnn") -> ml_collections.ConfigDict:
    """``configs/image_folder.py[:cnn|resnet18]``; set ``--config.dataset.source_dir``."""
    variant = variant or "cnn"
    if variant not in VARIANTS:
        raise ValueError(f"configs/image_folder.py:{variant} is not a variant; choose one of: "
                         f"{', '.join(VARIANTS)}")
    placeholder = ml_collections.config_dict.placeholder
    config = base_config()  # SGD momentum 0.9, cosine, weight decay 5e-4
    config.dataset.name = "image_folder"
    config.dataset.source_dir = placeholder(str)
    config.dataset.channels = placeholder(int)  # None: 1 if every image is gray, else 3
    config.dataset.eval_split = placeholder(str)  # None: val, else validation, else test
    config.dataset.max_shift = placeholder(int)  # None: an eighth of the side
    config.dataset.flip = True

    config.model.pool = "gap"
    config.model.head = "gap"
    config.optimizer.nesterov = True
    config.total_steps = 3000
    config.eval_every = 500
    config.checkpoint_every = 500
    config.optimizer.warmup_steps = 100

    if variant == "cnn":
        config.dataset.image_size = 64
        config.model.name = "cnn"
        config.model.widths = (32, 64, 128, 256)
        config.model.strides = (1, 2, 2, 2)
        config.batch_size = 64
        config.optimizer.learning_rate = 0.05
    else:
        config.dataset.image_size = 224
        config.model.name = "resnet18"
        config.dtype = "bfloat16"
        config.batch_size = 128
        config.optimizer.learning_rate = 0.1
    return config
