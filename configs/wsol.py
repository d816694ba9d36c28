"""WSOL as Choe et al. measure it: ``configs/wsol.py:<dataset>,<arch>,<method>[,large]``.

    python train.py --config configs/wsol.py:cub,resnet50,cam --workdir runs/cub_r50_cam \
        --config.dataset.image_root=dataset/CUB --config.dataset.metadata_root=metadata/CUB \
        --config.init_from=weights/resnet50.pth

``dataset``: ``cub``, ``ilsvrc`` or ``openimages`` (``gapjax.data.wsol_benchmarks``; images
under ``image_root``, the reference's metadata under ``metadata_root``). ``arch``:
``resnet50`` or ``vgg16``, the reference's CAM backbones: ResNet-50 with its last stage at
stride 1 (a 14x14 map at 224; ``large``: the third stage too, 28x28), VGG-16 without its
fifth max pool plus a 3x3 conv of 1024 channels (``conv6_1``; ``large``: without the fourth
pool either). ``method``: ``cam``, ``has`` (Hide-and-Seek), ``cutmix`` or ``adl``, with the
reference's default hyperparameters (``gapjax.wsol_methods``).

Training follows the reference's ``main.py``: ImageNet-pretrained weights through
``config.init_from`` (a torchvision ``.pth`` / ``.safetensors`` file; the head starts
fresh), SGD with Nesterov momentum 0.9 and weight decay 1e-4, batch 32, the learning rate
multiplied by 10 on the new layers (``config.optimizer.head_lr_multiplier`` on
``head_modules``: the head and ``conv6_1`` for VGG, the head and the last stage for
ResNet, as the reference groups them) and by 0.1 every ``decay`` epochs; 50 epochs with a
decay every 15 on CUB, 10 epochs with a decay every 3 on ILSVRC and OpenImages. Inputs: resize
to 256, random 224 crop and flip; evaluation resizes to 224.

Evaluation runs on ``train_fullsup`` (CUBV2 / ImageNetV2 / OpenImages val) after every
epoch and, at the end, on ``test`` (``test/*`` metrics) with the map threshold calibrated
on ``train_fullsup`` (``eval/loc_threshold``) for top-1 and GT-known localization, all with
``protocol="wsolevaluation"``, so ``test/max_box_acc_v2`` (CUB, ILSVRC) and ``test/pxap``
(OpenImages) are the reference code's numbers (percentages), comparable with its tables.
An overlay grid of CAMs (``eval/cam_overlay``) goes to TensorBoard and ``images/``.

The learning rates below are the reference's default (0.01 for CUB / ILSVRC) and the value
of its published OpenImages example (0.00227913316); the tuned rate of each (dataset,
arch, method) is in the authors' hyperparameter sheet: set it with
``--config.optimizer.learning_rate``. See docs/wsol.md.

Time: a GPU's work. On 2 CPU cores ResNet-50 at 224 trains about 0.4 examples/s (measured
with batch 8 on a synthetic tree, a loaded shared machine), so CUB's 50 epochs (300k
examples) would take about 8 days, OpenImages' about the same, ILSVRC's about a year
(estimates).
"""

from gapjax import wsol_methods
from gapjax.train.defaults import base_config

#: dataset -> (registered name, training images, epochs, decay every, learning rate).
DATASETS = {
    "cub": ("wsol_cub", 5994, 50, 15, 0.01),
    "ilsvrc": ("wsol_ilsvrc", 1_281_167, 10, 3, 0.01),
    "openimages": ("wsol_openimages", 29_819, 10, 3, 0.00227913316),
}
ARCHS = ("resnet50", "vgg16")
BATCH_SIZE = 32
CLASSIFIER_LR_RATIO = 10.0
OVERLAY_IMAGES = 16


def _parse(arg: str) -> tuple[str, str, str, bool]:
    parts = [part.strip() for part in (arg or "cub,resnet50,cam").split(",")]
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "large"):
        raise ValueError(f"configs/wsol.py:{arg!r} must be <dataset>,<arch>,<method>[,large], "
                         "e.g. configs/wsol.py:cub,resnet50,cam")
    dataset, arch, method = parts[:3]
    for field, value, choices in (("dataset", dataset, tuple(DATASETS)),
                                  ("arch", arch, ARCHS),
                                  ("method", method, wsol_methods.METHODS)):
        if value not in choices:
            raise ValueError(f"configs/wsol.py: {field} {value!r} is not one of: "
                             f"{', '.join(choices)}")
    return dataset, arch, method, len(parts) == 4


def get_config(arg: str = "cub,resnet50,cam"):
    """The WSOL recipe for ``<dataset>,<arch>,<method>[,large]``."""
    dataset, arch, method, large = _parse(arg)
    name, train_examples, epochs, decay, learning_rate = DATASETS[dataset]
    config = base_config()

    config.dataset.name = name
    config.dataset.image_root = ""  # required: the folder the image ids are relative to
    config.dataset.metadata_root = ""  # required: the benchmark's metadata folder
    config.dataset.mask_root = ""  # OpenImages masks; default image_root
    config.dataset.image_size = 224
    config.dataset.resize_size = 256
    config.dataset.wsol_method = method
    config.dataset.has_grid_size = wsol_methods.HAS_GRID_SIZE
    config.dataset.has_drop_rate = wsol_methods.HAS_DROP_RATE
    config.dataset.cutmix_beta = wsol_methods.CUTMIX_BETA
    config.dataset.cutmix_prob = wsol_methods.CUTMIX_PROB

    config.model.name = arch
    config.model.head = "gap"
    config.model.pool = "gap"
    if arch == "resnet50":
        config.model.stage_strides = (1, 2, 1, 1) if large else (1, 2, 2, 1)
        new_layers = ("head", "layer4_0", "layer4_1", "layer4_2")
    else:
        config.model.pool_after = (1, 2, 3) if large else (1, 2, 3, 4)
        config.model.extra_convs = (1024,)
        new_layers = ("head", "conv6_1")
    if method == "adl":
        config.model.adl_blocks = wsol_methods.ADL_BLOCKS["resnet" if arch == "resnet50"
                                                          else "vgg"]
        config.model.adl_drop_rate = wsol_methods.ADL_DROP_RATE
        config.model.adl_threshold = wsol_methods.ADL_THRESHOLD

    config.init_from = ""  # an ImageNet-pretrained torchvision file, e.g. resnet50.pth

    config.batch_size = BATCH_SIZE
    steps_per_epoch = max(1, train_examples // BATCH_SIZE)
    config.total_steps = epochs * steps_per_epoch
    config.eval_every = steps_per_epoch
    config.checkpoint_every = steps_per_epoch
    config.log_every = min(100, steps_per_epoch)

    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = learning_rate
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "step"
    config.optimizer.step_factor = 0.1
    config.optimizer.step_boundaries = tuple(k * decay / epochs
                                             for k in range(1, -(-epochs // decay))
                                             if k * decay < epochs)
    config.optimizer.warmup_steps = 0
    config.optimizer.head_lr_multiplier = CLASSIFIER_LR_RATIO
    config.optimizer.head_modules = new_layers

    config.eval.localization = True
    config.eval.cam_method = "cam"
    config.eval.wsol_protocol = "wsolevaluation"
    config.eval.final_split = "test"
    config.eval.overlay_images = OVERLAY_IMAGES
    return config
