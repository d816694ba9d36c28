"""ViT on ImageNet-1k in big_vision's "Better plain ViT baselines" recipe.

    python train.py --config configs/imagenet_vit.py:s16,gap --workdir gs://bucket/vit_s16_gap

The argument is ``<size>,<head>``: size ``ti16``, ``s16`` (default), ``b16`` or ``l16``;
head ``gap`` (default; the baseline paper's global average pooling), ``token`` (class
token), ``map`` (multihead attention pooling) or any ``POOLS`` name. Without a class
token unless the head is ``token``; 2-D sin-cos position embeddings (fixed), as the paper.

Recipe (Beyer, Zhai & Kolesnikov, 2022): batch 1024, Adam (b1 0.9, b2 0.999) with
decoupled weight decay 1e-4 per step on the kernels (big_vision's ``wd`` does not scale
with the learning rate; optax's AdamW multiplies its ``weight_decay`` by the learning rate,
hence 0.1 here: 0.1 x 1e-3 = 1e-4), learning rate 1e-3, 10k linear warm-up steps
then cosine decay, 90 epochs, global-norm gradient clipping at 1.0, bfloat16 compute,
random-resized crop 224 + flip. The paper also uses RandAugment(2, 10) and mixup 0.2;
gapjax's input pipeline offers neither (only random-resized crop and flip), so this config
runs without them and should be expected to land below the paper's 76.5% top-1 for S/16
at 90 epochs. Needs ``imagenet2012`` prepared as ArrayRecord under the TFDS data
directory (``--config.dataset.data_dir``). On 2 CPU cores it would take years (an estimate:
about 1 example/s for S/16 measured with batch 8 on TFDS mock data, for 115M examples).
"""

from gapjax.train.defaults import base_config, set_epochs

TRAIN_EXAMPLES = 1_281_167
SIZES = ("ti16", "s16", "b16", "l16")
WARMUP_STEPS = 10_000


def get_config(arg: str = "s16,gap"):
    """ImageNet ViT config; ``arg`` = ``"<size>,<head>"``, e.g. ``"b16,map"``."""
    size, _, pool = (arg or "s16,gap").partition(",")
    size, pool = size or "s16", pool or "gap"
    if size not in SIZES:
        raise ValueError(f"imagenet_vit: size {size!r} is not valid; choose one of: "
                         + ", ".join(SIZES))
    config = base_config()
    config.dataset.name = "imagenet2012"
    config.dataset.image_size = 224
    config.dataset.eval_split = "validation"
    config.model.name = f"vit_{size}"
    config.model.pool = pool
    config.model.class_token = pool == "token"
    config.model.posemb = "sincos2d"
    config.model.image_size = 224
    config.dtype = "bfloat16"

    config.batch_size = 1024
    set_epochs(config, TRAIN_EXAMPLES, epochs=90, checkpoint_every=1)
    config.optimizer.warmup_steps = WARMUP_STEPS
    config.log_every = 100

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.1  # x learning rate 1e-3 = big_vision's 1e-4
    config.optimizer.grad_clip = 1.0
    config.optimizer.schedule = "cosine"
    return config
