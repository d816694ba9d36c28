"""MobileNetV3-Large and -Small (width 1.0) in timm's layout
(``timm.create_model('mobilenetv3_large_100')``, ``'mobilenetv3_small_100'``).

Layout (Howard et al. 2019; timm's ``MobileNetV3``): ``conv_stem`` 3x3/2 (16) - ``bn1``
- hard-swish, the MBConv stages of ``gapjax.models.mbconv`` (ReLU in the early blocks,
hard-swish later; in some blocks ``gapjax.attention``'s ``"se"`` with width
``make_divisible(expanded * 0.25, 8)`` (timm's ``round_channels``), ReLU and a
hard-sigmoid gate; ``attn_kwargs`` overrides its options), a last 1x1 conv - BN -
hard-swish block (960 / 576 channels: the pre-pool map), then the "efficient head":
``GAPHead`` with ``pre_logits`` (timm's ``conv_head``, a 1x1 convolution with bias to
1280 / 1024 features) and hard-swish before dropout and the ``classifier``. With 1000
classes the parameter counts equal timm's to the unit: 5,483,032 (large), 2,542,856
(small).

Maps: a nonlinear layer sits between the pool and the classifier, so no map is exact
(``map_kinds == ()``): ``head_class_maps`` / ``head_contributions`` raise a ValueError
naming ``grad_cam``, and ``gapjax.cam`` resolves ``method="auto"`` to Grad-CAM.
"""

from __future__ import annotations

from typing import Any

import jax

from gapjax.layers import Classifier, check_choice
from gapjax.models import LAYOUTS, register_preset
from gapjax.models.mbconv import (
    MBCONV_LAYOUT,
    StageSpec,
    activation,
    apply_blocks,
    batch_norm,
    block_configs,
    conv2d,
)

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


class MobileNetV3(Classifier):
    """MobileNetV3: ``[B, H, W, 3] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      variant: ``"large"`` or ``"small"``.
      drop_path: stochastic depth of the last block (block ``i`` of ``n``: ``rate * i /
        n``); off in evaluation.
      attn_kwargs: options of the blocks' ``"se"`` (``gapjax.attention``) over the
        family's ``rd_channels``, ``act_layer="relu"``, ``gate_layer="hard_sigmoid"``,
        e.g. ``{"squeeze": "gem"}`` (see ``mbconv.se_options``).
      head: ``"gap"`` is the efficient head (``GAPHead`` with ``pre_logits`` and
        hard-swish); ``"fc"`` flattens the final map into the ``FCHead``.
      stem: only ``"imagenet"``.
    """

    variant: str = "large"
    drop_path: float = 0.0
    attn_kwargs: Any = None

    def head_options(self) -> dict[str, Any]:
        """The efficient head: ``pre_logits`` (1280 / 1024 features) and hard-swish."""
        _, width = VARIANTS[check_choice("variant", self.variant, tuple(VARIANTS))]
        return {"pre_logits": width, "pre_logits_act": "hard_swish"}

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
                            attn_kwargs=self.attn_kwargs, dtype=dtype,
                            axis_name=self.axis_name)


for _variant in VARIANTS:
    register_preset(
        f"mobilenetv3_{_variant}_100", MobileNetV3, {"variant": _variant},
        f"MobileNetV3-{_variant.capitalize()} 1.0, timm's mobilenetv3_{_variant}_100; keyword "
        "arguments are MobileNetV3 attributes (num_classes, pool, head, dtype, drop_path, "
        "dropout, ...).",
    )


# Weights: the MBConv trunk's names (``mbconv.MBCONV_LAYOUT``), and the head's
# ``head/pre_logits`` <-> ``conv_head`` (a 1x1 convolution with bias).
LAYOUTS.add("mobilenetv3_", MBCONV_LAYOUT.extend(
    renames=((r"^head/pre_logits$", "conv_head"),),
    kernels=((r"^head/pre_logits$", "conv1x1_dense"),),
    torch_models="timm.create_model('mobilenetv3_{large,small}_100')"))
