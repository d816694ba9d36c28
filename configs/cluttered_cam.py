"""Weakly supervised localization: a CNN with a GAP head on cluttered digits.

    python train.py --config configs/cluttered_cam.py --workdir runs/cluttered_cam
    python -m gapjax.cam --workdir runs/cluttered_cam --out cams.png

The model sees only class labels; evaluation adds the localization metrics of
``gapjax.wsol`` computed from class activation maps (``eval/top1_loc``,
``eval/gt_known_loc``, ``eval/max_box_acc``, ``eval/max_box_acc_v2``, ``eval/pxap``).
Other pools: ``--config.model.pool=gmp|gem|lse|attention`` (or ``cluttered_cam.py:gem``);
``config.eval.cam_method="auto"`` then picks contribution maps (attention, weighted) or
Grad-CAM (gmp, gem, lse) where the exact CAM does not apply.

The CNN's strides ``(1, 2, 2)`` keep a 16x16 feature map on the 64x64 canvases (8x8 on
``--config.dataset.canvas_size=32``), fine enough for the maps to outline a digit.

Time on 2 CPU cores: about 2 hours (an estimate: 32-42 examples/s measured over the first
steps of 2000 steps of batch 128 on a shared machine, plus four evaluations of about 35 s
each); the run says so after its first steps. ``--config.dataset.canvas_size=32`` is about
4x faster.
"""

from gapjax.train.defaults import base_config


def get_config(pool: str = "gap"):
    """Cluttered-digits CAM config; ``pool`` (``cluttered_cam.py:<pool>``) picks the pool."""
    config = base_config()  # batch 128, SGD momentum 0.9, cosine, weight decay 5e-4
    config.dataset.name = "gapjax_cluttered_digits"
    config.dataset.canvas_size = 64
    config.dataset.clutter = "medium"

    config.model.name = "cnn"
    config.model.pool = pool or "gap"
    config.model.head = "gap"
    config.model.widths = (32, 64, 128)
    config.model.strides = (1, 2, 2)
    # An ATTENTIONS name in every block ("": none): --config.model.attn=eca, options
    # --config.model.attn_kwargs.squeeze=gmp (see docs/attention.md).
    config.model.attn = ""

    config.total_steps = 2000

    config.optimizer.learning_rate = 0.05
    config.optimizer.nesterov = True
    config.optimizer.warmup_steps = 100

    config.eval.localization = True
    return config
