"""ConvNeXt-Atto, -Tiny and -Small in timm's layout (``timm.create_model('convnext_tiny')``).

Layout (Liu et al. 2022; timm's ``ConvNeXt``): a patchify stem (``stem_0``: 4x4/4 conv
with bias, ``stem_1``: LayerNorm), four stages; stages 2-4 open with a downsample
(``stages_i_downsample_0``: LayerNorm, ``_1``: 2x2/2 conv). A block is ``conv_dw`` (7x7
depthwise, bias) - ``norm`` (LayerNorm) - ``mlp`` (``fc1`` 4x wider, exact GELU, ``fc2``)
- layer scale ``gamma`` (init 1e-6) - drop path, plus the input. Every LayerNorm has
epsilon 1e-6. The head is ``GAPHead`` with ``norm=True``: pool, LayerNorm ``fc_norm``
(timm's ``head.norm``, epsilon 1e-6), dropout, ``classifier`` (``head.fc``). Widths / depths:
atto (40, 80, 160, 320) x (2, 2, 6, 2); tiny (96, 192, 384, 768) x (3, 3, 9, 3); small
the same widths x (3, 3, 27, 3). With 1000 classes the parameter counts equal timm's to
the unit: 3,695,520 / 28,589,128 / 50,223,688. (timm's atto uses 1x1 convolutions for the
MLP and tiny / small Linear layers; the arithmetic is the same, only the stored kernel
shapes differ, and the weight layouts handle that.)

Maps: a LayerNorm follows the pool. Its statistics (mean and standard deviation over the
channels of the pooled vector) are one pair of numbers per image; with them held at
their values for that image, the norm is affine in the pooled vector, and the logit
splits exactly over positions: ``LayerNorm(sum_i w_i x_i) = sum_i w_i [(x_i - mu) / sigma
* scale + bias]``. So ``map_kinds`` is ``("cam", "contribution")`` for ``gap`` (the CAM
is ``N`` times the contribution map: its mean plus the classifier bias is the logit) and
``("contribution",)`` for pools with position or channel weights, exactly as a ViT's
``fc_norm`` head (the same ``GAPHead``, ``layers.frozen_layer_norm``). The maps are exact
for the image they are computed on; they are not a linear function of the features (sigma
depends on all of them), which is also true of attention pooling's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.layers import Classifier, check_choice
from gapjax.models import LAYOUTS, Layout, register_preset
from gapjax.models.mbconv import conv2d, drop_path, linear_drop_path_rates
from gapjax.pooling.map import LAYERNORM_EPSILON, MlpBlock

Array = jax.Array

#: Initialisation of timm's ConvNeXt convolutions and Dense layers.
TRUNC_NORMAL = nn.initializers.truncated_normal(0.02)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=dtype, name=name)


class ConvNeXtBlock(nn.Module):
    """``[B, H, W, C] -> [B, H, W, C]``: ``x + drop_path(gamma * mlp(norm(conv_dw(x))))``."""

    kernel: int = 7
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-6
    drop_path: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        channels = x.shape[-1]
        y = conv2d(channels, self.kernel, groups=channels, bias=True, dtype=self.dtype,
                   kernel_init=TRUNC_NORMAL, name="conv_dw")(x)
        y = _layer_norm(self.dtype, "norm")(y)
        y = MlpBlock(int(self.mlp_ratio * channels), dtype=self.dtype, name="mlp")(y, train)
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init),
                           (channels,), jnp.float32)
        y = y * gamma.astype(y.dtype)
        return drop_path(y, self.drop_path, train) + x


class ConvNeXt(Classifier):
    """ConvNeXt: ``[B, H, W, 3] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      depths / dims: blocks and channels per stage.
      kernel: depthwise kernel size (7).
      mlp_ratio: hidden width of the block MLP over its channels (4).
      layer_scale_init: initial ``gamma`` (1e-6).
      patch_size: stride and size of the patchify stem (4).
      drop_path: stochastic depth, rising linearly from 0 (first block) to this rate
        (last block); off in evaluation. timm trains tiny with 0.1, small with 0.4.
      head: ``"gap"`` is ``GAPHead`` with ``norm=True`` (pool, LayerNorm, ``classifier``);
        ``"fc"`` flattens the final map into the ``FCHead`` (no norm). ``stem`` (only
        ``"imagenet"``) and ``axis_name`` (no BatchNorm) have no other use here.
    """

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    kernel: int = 7
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-6
    patch_size: int = 4
    drop_path: float = 0.0

    def head_options(self) -> dict[str, Any]:
        """The LayerNorm after the pool (``fc_norm``; epsilon 1e-6, as every norm here)."""
        return {"norm": True}

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, ("imagenet",))
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths={tuple(self.depths)} and dims={tuple(self.dims)} must "
                             "have one entry per stage")
        dtype = self.compute_dtype
        x = conv2d(self.dims[0], self.patch_size, self.patch_size, bias=True, padding=0,
                   dtype=dtype, kernel_init=TRUNC_NORMAL, name="stem_0")(x)
        x = _layer_norm(dtype, "stem_1")(self.early_tap(x))
        rates = linear_drop_path_rates(self.drop_path, self.depths)
        for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if stage > 0:
                x = _layer_norm(dtype, f"stages_{stage}_downsample_0")(x)
                x = conv2d(dim, 2, 2, bias=True, padding=0, dtype=dtype,
                           kernel_init=TRUNC_NORMAL, name=f"stages_{stage}_downsample_1")(x)
            for index in range(depth):
                x = ConvNeXtBlock(self.kernel, self.mlp_ratio, self.layer_scale_init,
                                  rates[stage][index], dtype,
                                  name=f"stages_{stage}_blocks_{index}")(x, train)
        return x


#: name -> (depths, dims), timm's ``convnext_*``.
SIZES = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
}

for _name, (_depths, _dims) in SIZES.items():
    register_preset(
        _name, ConvNeXt, {"depths": _depths, "dims": _dims},
        f"ConvNeXt-{_name.split('_')[1].capitalize()} (depths {_depths}, dims {_dims}), "
        f"timm's {_name}; keyword arguments are ConvNeXt attributes (num_classes, pool, "
        "head, dtype, drop_path, dropout, ...).",
    )


# Weights: timm's names, stem_0 <-> stem.0, stages_1_downsample_1 <->
# stages.1.downsample.1, stages_2_blocks_4/mlp/fc1 <-> stages.2.blocks.4.mlp.fc1, the layer
# scale gamma by its own name; head/fc_norm <-> head.norm, head/classifier <-> head.fc.
# convnext_atto (timm's conv_mlp=True) holds its MLP kernels as 1x1 convolutions, tiny and
# small as Linear layers.
CONVNEXT_LAYOUT = LAYOUTS.add("convnext_", Layout(
    source="timm", torch_models="timm.create_model('convnext_{tiny,small}')",
    renames=((r"^stem_(\d)$", r"stem.\1"),
             (r"^stages_(\d+)_downsample_(\d)$", r"stages.\1.downsample.\2"),
             (r"^stages_(\d+)_blocks_(\d+)", r"stages.\1.blocks.\2"),
             (r"^head/fc_norm$", "head/norm"), (r"^head/classifier$", "head/fc"))))
LAYOUTS.add("convnext_atto", CONVNEXT_LAYOUT.extend(
    kernels=((r"/mlp/fc[12]$", "conv1x1_dense"),),
    torch_models="timm.create_model('convnext_atto')"))


__all__ = ["ConvNeXt", "ConvNeXtBlock"]
