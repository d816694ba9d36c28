"""Attention modules of the Squeeze-and-Excitation family, on one pool registry.

``ATTENTIONS`` holds timm's ``create_attn`` names (``se, ese, eca, ecam, ceca, ge, gc, gca,
cbam, lcbam, coord, scoord, ela, strip``), each equal to timm's module of that name, plus
``srm`` (style recalibration), ``fca`` (FcaNet's DCT channel attention) and ``local`` (SE's
bottleneck at every pixel: the control without global context)::

    from gapjax.attention import make_attention
    se = make_attention("se", 256)                           # timm's SEModule(256)
    se_gem = make_attention("se", 256, squeeze="gem")        # the squeeze: any POOLS name
    eca_max = make_attention("eca", 256, squeeze="gmp")

Every module maps ``x [B, H, W, C] -> [B, H, W, C]`` (``__call__(x, train=False)``) and
keeps timm's submodule names and shapes. ``functional`` holds the arithmetic, ``base`` the
registry, the base class and ``make_attention``, ``channel`` and ``spatial`` the modules;
``selective`` holds SKNet's selective kernel convolution (a block's convolution, not a
registry member).
A fork registers its own with ``@ATTENTIONS.register("mine")`` on an ``Attention``
subclass. See docs/attention.md.
"""

from gapjax.attention.base import (
    ATTENTIONS,
    NORM_LAYERS,
    Attention,
    ConvMlp,
    ConvNorm,
    make_attention,
)
from gapjax.attention.channel import (
    CircularEfficientChannelAttention,
    EffectiveSqueezeExcite,
    EfficientChannelAttention,
    EfficientChannelAttentionMLP,
    FrequencyChannelAttention,
    GatherExcite,
    GlobalContext,
    GlobalContextAdd,
    LocalExcite,
    SqueezeExcite,
    StyleRecalibration,
)
from gapjax.attention.functional import (
    ACTIVATIONS,
    GATE_RANGES,
    dct_filters,
    eca_kernel_size,
    make_divisible,
    style_pool,
)
from gapjax.attention.selective import SelectiveKernel, SelectiveKernelAttention
from gapjax.attention.spatial import (
    ConvolutionalBlockAttention,
    CoordinateAttention,
    EfficientLocalAttention,
    LightConvolutionalBlockAttention,
    SimpleCoordinateAttention,
    StripAttention,
)

__all__ = [
    "ACTIVATIONS",
    "ATTENTIONS",
    "GATE_RANGES",
    "NORM_LAYERS",
    "Attention",
    "CircularEfficientChannelAttention",
    "ConvMlp",
    "ConvNorm",
    "ConvolutionalBlockAttention",
    "CoordinateAttention",
    "EffectiveSqueezeExcite",
    "EfficientChannelAttention",
    "EfficientChannelAttentionMLP",
    "EfficientLocalAttention",
    "FrequencyChannelAttention",
    "GatherExcite",
    "GlobalContext",
    "GlobalContextAdd",
    "LightConvolutionalBlockAttention",
    "LocalExcite",
    "SelectiveKernel",
    "SelectiveKernelAttention",
    "SimpleCoordinateAttention",
    "SqueezeExcite",
    "StripAttention",
    "StyleRecalibration",
    "dct_filters",
    "eca_kernel_size",
    "make_attention",
    "make_divisible",
    "style_pool",
]
