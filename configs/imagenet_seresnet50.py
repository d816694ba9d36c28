"""SE-ResNet-50 with a GAP head on ImageNet-1k, for a GPU node or a TPU pod slice.

    python train.py --config configs/imagenet_seresnet50.py --workdir gs://bucket/se50

Needs ``imagenet2012`` prepared as ArrayRecord under the TFDS data directory
(``--config.dataset.data_dir``); the archive must be downloaded by hand (see the TFDS
catalogue). Recipe after Hu et al. (2018) with the now-standard extras: SGD + Nesterov
momentum 0.9, learning rate 0.1 per 256 examples scaled linearly with the batch, 5-epoch
warmup, cosine decay over 100 epochs, weight decay 1e-4 on kernels only, label smoothing
0.1, bfloat16 compute, random-resized-crop 224 + flip. Published SE-ResNet-50 top-1 is
77.6% (single 224 crop); expect about that. On 2 CPU cores it would take years (an
estimate: about 1 example/s measured with batch 8 on TFDS mock data, for 128M examples).
``configs/imagenet_seresnet50.py:resnet50`` trains the plain ResNet-50 baseline with the
same recipe.
"""

from gapjax.train.defaults import base_config, set_epochs

TRAIN_EXAMPLES = 1_281_167


def get_config(model: str = "seresnet50"):
    """ImageNet config; ``model`` (default seresnet50) picks the network."""
    config = base_config()
    config.dataset.name = "imagenet2012"
    config.dataset.image_size = 224
    config.dataset.eval_split = "validation"
    config.model.name = model or "seresnet50"
    config.model.pool = "gap"
    config.model.head = "gap"
    config.dtype = "bfloat16"

    config.batch_size = 1024
    set_epochs(config, TRAIN_EXAMPLES, epochs=100, checkpoint_every=1)
    config.log_every = 100

    config.optimizer.learning_rate = 0.1 * config.batch_size / 256
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.label_smoothing = 0.1
    return config
