"""MobileNetV3-Large and -Small (width 1.0) in timm's layout
(``timm.create_model('mobilenetv3_large_100')``, ``'mobilenetv3_small_100'``).

Layout (Howard et al. 2019; timm's ``MobileNetV3``): ``conv_stem`` 3x3/2 (16) - ``bn1``
- hard-swish, the MBConv stages of ``gapjax.models.mbconv`` (ReLU in the early blocks,
hard-swish later; SE in some blocks with width ``make_divisible(expanded * 0.25, 8)``,
ReLU and a hard-sigmoid gate), a last 1x1 conv - BN - hard-swish block (960 / 576
channels: the pre-pool map), then the "efficient head": pool, ``pre_logits`` (timm's
``conv_head``, a 1x1 convolution with bias to 1280 / 1024 features), hard-swish,
dropout, ``classifier``. With 1000 classes the parameter counts equal timm's to the
unit: 5,483,032 (large), 2,542,856 (small).

Maps: a nonlinear layer sits between the pool and the classifier, so no map is exact
(``map_kinds == ()``): ``head_class_maps`` / ``head_contributions`` raise a ValueError
naming ``grad_cam``, and ``gapjax.cam`` resolves ``method="auto"`` to Grad-CAM.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.layers import HEAD_OUTPUTS, Classifier, check_choice
from gapjax.models import register_preset
from gapjax.models.mbconv import (
    StageSpec,
    activation,
    apply_blocks,
    batch_norm,
    block_configs,
    conv2d,
)
from gapjax.pooling import make_pool

Array = jax.Array

#: timm's ``mobilenetv3_large_100`` table (``ds_r1_k3_s1_e1_c16_nre``, ...).
LARGE_STAGES: tuple[tuple[StageSpec, ...], ...] = (
    (StageSpec("ds", 1, 3, 1, 1.0, 16, act="relu"),),
    (StageSpec("ir", 1, 3, 2, 4.0, 24, act="relu"), StageSpec("ir", 1, 3, 1, 3.0, 24, act="relu")),
    (StageSpec("ir", 3, 5, 2, 3.0, 40, 0.25, "relu"),),
    (StageSpec("ir", 1, 3, 2, 6.0, 80), StageSpec("ir", 1, 3, 1, 2.5, 80),
     StageSpec("ir", 2, 3, 1, 2.3, 80)),
    (StageSpec("ir", 2, 3, 1, 6.0, 112, 0.25),),
    (StageSpec("ir", 3, 5, 2, 6.0, 160, 0.25),),
    (StageSpec("cn", 1, 1, 1, 1.0, 960),),
)
#: timm's ``mobilenetv3_small_100`` table.
SMALL_STAGES: tuple[tuple[StageSpec, ...], ...] = (
    (StageSpec("ds", 1, 3, 2, 1.0, 16, 0.25, "relu"),),
    (StageSpec("ir", 1, 3, 2, 4.5, 24, act="relu"),
     StageSpec("ir", 1, 3, 1, 3.67, 24, act="relu")),
    (StageSpec("ir", 1, 5, 2, 4.0, 40, 0.25), StageSpec("ir", 2, 5, 1, 6.0, 40, 0.25)),
    (StageSpec("ir", 2, 5, 1, 3.0, 48, 0.25),),
    (StageSpec("ir", 3, 5, 2, 6.0, 96, 0.25),),
    (StageSpec("cn", 1, 1, 1, 1.0, 576),),
)
VARIANTS = {"large": (LARGE_STAGES, 1280), "small": (SMALL_STAGES, 1024)}


class PreLogitsHead(nn.Module):
    """Pool -> ``pre_logits`` Dense (with bias) -> activation -> dropout -> ``classifier``:
    ``[B, h, w, C] -> float32 logits [B, K]``. The nonlinearity after the pool means the
    logit has no exact per-location split, so ``output="class_maps"`` and
    ``"contributions"`` raise a ValueError naming ``grad_cam``."""

    num_classes: int
    hidden: int
    pool: str = "gap"
    pool_kwargs: Any = None
    act: str = "hard_swish"
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, features: Array, train: bool = False, output: str = "logits") -> Array:
        if check_choice("output", output, HEAD_OUTPUTS) != "logits":
            raise ValueError(
                f"this head applies a Dense layer and {self.act} after the pool, so the "
                "logit has no exact per-location maps; use method='grad_cam'")
        pool = make_pool(self.pool, dtype=self.dtype, name="pool", **dict(self.pool_kwargs or {}))
        hidden = nn.Dense(self.hidden, dtype=self.dtype, name="pre_logits")(pool(features))
        hidden = activation(self.act)(hidden).astype(jnp.float32)
        if self.dropout > 0:
            hidden = nn.Dropout(self.dropout, deterministic=not train)(hidden)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(hidden)


class MobileNetV3(Classifier):
    """MobileNetV3: ``[B, H, W, 3] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      variant: ``"large"`` or ``"small"``.
      drop_path: stochastic depth of the last block (block ``i`` of ``n``: ``rate * i /
        n``); off in evaluation.
      se_squeeze: ``POOLS`` name of the SE squeeze (``gap`` as published).
      head: ``"gap"`` is the efficient head (pool, ``pre_logits``, hard-swish,
        ``classifier``); ``"fc"`` flattens the final map into the ``FCHead``.
      stem: only ``"imagenet"``.
    """

    variant: str = "large"
    drop_path: float = 0.0
    se_squeeze: str = "gap"

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """No exact maps: hard-swish follows the pool (the FC head flattens)."""
        return ()

    def make_head(self) -> nn.Module:
        if check_choice("head", self.head, ("gap", "fc")) == "fc":
            return super().make_head()
        _, hidden = VARIANTS[check_choice("variant", self.variant, tuple(VARIANTS))]
        return PreLogitsHead(self.num_classes, hidden, self.pool, self.pool_kwargs,
                             "hard_swish", self.dropout or 0.0, self.compute_dtype,
                             name="head")

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, ("imagenet",))
        stages, _ = VARIANTS[check_choice("variant", self.variant, tuple(VARIANTS))]
        dtype = self.compute_dtype
        x = self.early_tap(conv2d(16, 3, 2, dtype=dtype, name="conv_stem")(x))
        x = batch_norm(train, dtype=dtype, axis_name=self.axis_name, name="bn1")(x)
        x = activation("hard_swish")(x)
        blocks = block_configs(stages, stem_channels=16, default_act="hard_swish",
                               se_from_expanded=True, drop_path=self.drop_path)
        return apply_blocks(x, blocks, train, se_act="relu", se_gate="hard_sigmoid",
                            squeeze=self.se_squeeze, dtype=dtype, axis_name=self.axis_name)


for _variant in VARIANTS:
    register_preset(
        f"mobilenetv3_{_variant}_100", MobileNetV3, {"variant": _variant},
        f"MobileNetV3-{_variant.capitalize()} 1.0, timm's mobilenetv3_{_variant}_100; keyword "
        "arguments are MobileNetV3 attributes (num_classes, pool, head, dtype, drop_path, "
        "dropout, ...).",
    )


# --------------------------------------------------------------------------------------
# timm weight layout (data; gapjax.pretrained turns it into a Layout)
# --------------------------------------------------------------------------------------
# As EfficientNet's (blocks_s_i <-> blocks.s.i, se/reduce <-> se.conv_reduce, ...), plus
# the head: head/pre_logits <-> conv_head (a 1x1 convolution with bias), head/classifier
# <-> classifier.

TIMM_RENAMES = (
    (r"^blocks_(\d+)_(\d+)", r"blocks.\1.\2"),
    (r"/se/reduce$", "/se/conv_reduce"),
    (r"/se/expand$", "/se/conv_expand"),
    (r"^head/pre_logits$", "conv_head"),
    (r"^head/classifier$", "classifier"),
)
TIMM_KERNELS = (
    (r"/se/(reduce|expand)$", "conv1x1_dense"),
    (r"^head/pre_logits$", "conv1x1_dense"),
)
TIMM_LAYOUTS = {
    "mobilenetv3_": {"renames": TIMM_RENAMES, "kernels": TIMM_KERNELS,
                     "torch_models": "timm.create_model('mobilenetv3_{large,small}_100')"},
}
