"""Multi-label digits (2 to 4 per canvas) with a cnn whose head pools with a chosen pool.

    python train.py --config configs/multilabel_pooling.py:gmp --workdir runs/ml_gmp

The optional argument picks the head's pool (default ``gap``); the gradient-flow
diagnostics of ``gapjax.gradflow`` are logged as ``train/grad_*`` every
``config.gradflow_every`` steps. This is the full-size run of the gradient-flow experiment
(``python -m gapjax.experiments.gradient_flow --out DIR --full``): 64x64 canvases, sigmoid
binary cross-entropy, mAP and per-class AP on the test split.

Time on 2 CPU cores: about 2.5 to 3 hours (an estimate: 20 examples/s measured over the
first steps of 3000 steps of batch 64 on a loaded machine; the diagnostics every 150 steps
and the evaluations add a few minutes); the run says so after its first steps.
"""

from gapjax.experiments.gradient_flow import make_config


def get_config(pool: str = "gap"):
    """The multi-label pooling config; ``pool`` (``:<pool>``) selects the head's pool."""
    config = make_config(pool or "gap", quick=False)
    # A command-line run reports progress and keeps intermediate evaluations/checkpoints.
    config.progress = "auto"
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 3
    return config
