"""The embedded default: a small CNN with a GAP head on scikit-learn's handwritten digits.

    python train.py --config configs/digits.py --workdir runs/digits

Time on 2 CPU cores (measured, a shared machine): 38 s of training, 54 s with start-up
and the first dataset build excluded; 98.9% test accuracy. The optional argument picks
the pool of the GAP head: ``--config configs/digits.py:gmp``.
"""

from gapjax.train.defaults import base_config


def get_config(pool: str = "gap"):
    """Digits config; ``pool`` (``configs/digits.py:<pool>``) selects the head's pool."""
    config = base_config()  # batch 128, SGD momentum 0.9, cosine, weight decay 5e-4
    config.dataset.name = "gapjax_digits"
    config.dataset.image_size = 8  # native resolution; 16 and 32 are built on request
    config.model.name = "cnn"
    config.model.pool = pool or "gap"
    config.model.head = "gap"
    config.model.widths = (32, 64, 128)  # on 8x8 inputs: final map 2x2x128
    # An ATTENTIONS name in every block ("": none): --config.model.attn=eca, options
    # --config.model.attn_kwargs.squeeze=gmp (see docs/attention.md).
    config.model.attn = ""

    config.total_steps = 200
    config.eval_every = 100
    config.checkpoint_every = 100

    config.optimizer.nesterov = True
    config.optimizer.warmup_steps = 20
    return config
