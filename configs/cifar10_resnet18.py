"""ResNet-18 with a GAP head on CIFAR-10, for a GPU or TPU.

    python train.py --config configs/cifar10_resnet18.py --workdir runs/cifar10_resnet18

Needs the prepared TFDS dataset (``python -c "import tensorflow_datasets as tfds;
tfds.builder('cifar10').download_and_prepare(file_format='array_record')"`` on a machine
with internet, then copy ``~/tensorflow_datasets/cifar10`` or set
``--config.dataset.data_dir``). The recipe is the usual one: SGD + Nesterov momentum 0.9,
learning rate 0.1 per 128 examples scaled linearly with the batch, 5-epoch warmup, cosine
decay, weight decay 5e-4 on kernels, 200 epochs, bfloat16 compute; expect ~95% top-1.
On 2 CPU cores it would take about two weeks (an estimate: 9 examples/s measured with
batch 64 on TFDS mock data, for 19,400 steps of 512).
The optional argument overrides the pool: ``configs/cifar10_resnet18.py:gmp``.
"""

from gapjax.train.defaults import base_config, set_epochs

TRAIN_EXAMPLES = 50_000


def get_config(pool: str = "gap"):
    """CIFAR-10 ResNet-18 config; ``pool`` selects the GAP head's pool."""
    config = base_config()
    config.dataset.name = "cifar10"
    config.dataset.augment = True  # random crop with 4-pixel padding + horizontal flip
    config.model.name = "resnet18"
    config.model.stem = "cifar"  # 3x3 stem, no max pool: 32x32 inputs keep a 4x4 final map
    config.model.pool = pool or "gap"
    config.model.head = "gap"
    # An ATTENTIONS name in every block ("": none): --config.model.attn=eca, options
    # --config.model.attn_kwargs.squeeze=gmp (see docs/attention.md).
    config.model.attn = ""
    config.dtype = "bfloat16"

    config.batch_size = 512
    set_epochs(config, TRAIN_EXAMPLES, epochs=200)  # eval, checkpoint, warmup: 5 epochs
    config.log_every = 100

    config.optimizer.learning_rate = 0.1 * config.batch_size / 128
    config.optimizer.nesterov = True
    return config
