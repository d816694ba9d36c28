"""A tiny, fast digits config for the training tests: ``--config tests/helpers/tiny_digits.py``.

A 2-stage cnn with 8 and 16 channels, batch 32, a handful of steps; every interval is
small so that a short run logs, evaluates and checkpoints several times.
"""

from gapjax.train.defaults import base_config


def get_config(steps: str = "12"):
    """``steps`` (``tiny_digits.py:30``) sets ``total_steps``."""
    config = base_config()
    config.dataset.name = "gapjax_digits"
    config.dataset.image_size = 8
    config.model.name = "cnn"
    config.model.widths = (8, 16)
    config.model.pool = "gap"
    config.model.head = "gap"
    config.batch_size = 32
    config.total_steps = int(steps or 12)
    config.log_every = 5  # deliberately not a divisor of checkpoint_every
    config.eval_every = 6
    config.checkpoint_every = 4
    config.keep_checkpoints = 2
    config.progress = "none"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.05
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 2
    return config
