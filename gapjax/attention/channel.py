"""Channel attention: one gate per channel computed from a global squeeze of the map.

``se``, ``ese``, ``eca``, ``ecam``, ``ceca``, ``ge``, ``gc``, ``gca`` follow timm's modules
of the same names (``timm.layers.create_attn``) parameter for parameter; ``srm`` (Lee et
al. 2019) and ``fca`` (Qin et al. 2021) follow their papers' code; ``local`` is SE's
bottleneck applied at every pixel, the control without global context.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.attention.base import (
    ATTENTIONS,
    Attention,
    ConvMlp,
    _Layer,
    check_positive,
)
from gapjax.attention.functional import (
    activation,
    avg_pool_excluding_padding,
    eca_kernel_size,
    fca_frequencies,
    multispectral_pool,
    nearest_resize,
    pooled_dct_filters,
    scale_by,
    softmax_context,
    style_pool,
)

Array = jax.Array


class _Bottleneck(Attention):
    """SE's excitation: 1x1 conv ``fc1`` (C -> hidden), optional BatchNorm ``bn``,
    activation, 1x1 conv ``fc2`` (hidden -> C)."""

    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    bias: bool = True
    act_layer: str = "relu"
    norm_layer: str | None = None
    gate_layer: str = "sigmoid"

    def excite(self, h: Array, channels: int, train: bool) -> Array:
        """``[B, h, w, C_in] -> [B, h, w, C]`` logits of the gate."""
        h = self.conv(self.reduced_width(channels), bias=self.bias, name="fc1")(h)
        if self.norm_layer is not None:
            h = self.norm(self.norm_layer, train, "bn", allowed=("batchnorm",))(h)
        h = activation(self.act_layer)(h)
        return self.conv(channels, bias=self.bias, name="fc2")(h)


@ATTENTIONS.register("se")
class SqueezeExcite(_Bottleneck):
    """Squeeze-and-Excitation (Hu et al. 2018; timm ``SEModule``):
    ``x * gate(fc2(act(fc1(squeeze(x)))))``. The bottleneck has ``make_divisible(C *
    rd_ratio, rd_divisor)`` units (64 -> 8, 256 -> 16). timm's ``add_maxpool=True`` is
    ``squeeze="avgmax"``."""

    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        pooled = self.squeeze_with(self.squeeze, x, "squeeze")[:, None, None, :]
        return scale_by(x, self.gate(self.excite(pooled, x.shape[-1], train)))


@ATTENTIONS.register("local")
class LocalExcite(_Bottleneck):
    """SE's bottleneck at every pixel, with no squeeze: ``x * gate(fc2(act(fc1(x))))``
    with 1x1 convolutions, so each gate sees its own pixel only. Same parameters (names,
    shapes) as ``se`` with the same options: the one difference is the global context.
    With ``norm_layer="batchnorm"`` the statistics run over batch and positions."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        return scale_by(x, self.gate(self.excite(x, x.shape[-1], train)))


@ATTENTIONS.register("ese")
class EffectiveSqueezeExcite(Attention):
    """Effective SE (Lee & Park 2020, CenterMask; timm ``EffectiveSEModule``): one full
    1x1 conv ``fc`` (C -> C, bias) on the squeeze, hard-sigmoid gate."""

    gate_layer: str = "hard_sigmoid"
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        pooled = self.squeeze_with(self.squeeze, x, "squeeze")[:, None, None, :]
        return scale_by(x, self.gate(self.conv(x.shape[-1], bias=True, name="fc")(pooled)))


def _check_kernel(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size!r} is not valid; it must be a positive "
                         "odd integer")
    return kernel_size


@ATTENTIONS.register("eca")
class EfficientChannelAttention(Attention):
    """ECA-Net (Wang et al. 2020; timm ``EcaModule``): a 1-D convolution across the
    channels of the squeeze, ``x * gate(conv1d(squeeze(x)))``, no bias.

    The kernel is ``eca_kernel_size(C, gamma, beta)`` (C = 64 -> 3, 256 -> 5) unless
    ``kernel_size`` is given (timm ignores an explicit kernel size once it knows C).
    ``use_mlp=True`` (``ecam``, a timm experiment) replaces the convolution by ``conv``
    (1 -> ``make_divisible(C * rd_ratio, rd_divisor)`` features, width 1, bias),
    ``act_layer`` (default ReLU), ``conv2`` (-> 1 feature, width k, bias). The channels
    are the length axis: kernels are ``[k, in, out]``.
    """

    kernel_size: int | None = None
    gamma: float = 2.0
    beta: float = 1.0
    act_layer: str | None = None
    gate_layer: str = "sigmoid"
    rd_ratio: float = 1.0 / 8
    rd_channels: int | None = None
    rd_divisor: int = 8
    use_mlp: bool = False
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        channels = x.shape[-1]
        size, sequence = _eca_sequence(self, x)
        pad = ((size // 2, size // 2),)
        if self.use_mlp:
            # timm rounds this width with make_divisible's default round_limit (0.9).
            hidden = self.reduced_width(channels, round_limit=0.9)
            sequence = self.conv(hidden, (1,), bias=True, name="conv")(sequence)
            sequence = activation(self.act_layer or "relu")(sequence)
            sequence = self.conv(1, (size,), bias=True, padding=pad, name="conv2")(sequence)
        else:
            sequence = self.conv(1, (size,), bias=False, padding=pad, name="conv")(sequence)
        return scale_by(x, self.gate(sequence[:, None, None, :, 0]))


def _eca_sequence(module: Any, x: Array) -> tuple[int, Array]:
    """ECA's kernel size (given, or from ``C`` by ``gamma`` / ``beta``) and the squeezed
    channels as a sequence ``[B, C, 1]`` for the 1-D convolution, for ``module`` (an
    ``eca`` / ``ceca``) inside its compact ``__call__``."""
    channels = x.shape[-1]
    size = _check_kernel(module.kernel_size or eca_kernel_size(channels, module.gamma,
                                                               module.beta))
    pooled = module.squeeze_with(module.squeeze, x, "squeeze")
    return size, module.pooled_channels(pooled, channels, module.squeeze)[:, :, None]


@ATTENTIONS.register("ecam")
class EfficientChannelAttentionMLP(EfficientChannelAttention):
    """``eca`` with ``use_mlp=True`` (timm's ``partial(EcaModule, use_mlp=True)``)."""

    use_mlp: bool = True


@ATTENTIONS.register("ceca")
class CircularEfficientChannelAttention(Attention):
    """Circular ECA (timm ``CecaModule``): ECA with the channel axis padded circularly, so
    the first and last channels are neighbours; kernel ``conv [k, 1, 1]``. ``bias`` adds a
    bias (timm adds one when given an ``act_layer``, which it never applies)."""

    kernel_size: int | None = None
    gamma: float = 2.0
    beta: float = 1.0
    bias: bool = False
    gate_layer: str = "sigmoid"
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        size, sequence = _eca_sequence(self, x)
        sequence = jnp.pad(sequence, ((0, 0), (size // 2, size // 2), (0, 0)), mode="wrap")
        logits = self.conv(1, (size,), bias=self.bias, name="conv")(sequence)
        return scale_by(x, self.gate(logits[:, None, None, :, 0]))


class _GatherConvs(_Layer):
    """GE-theta's parametric gather (timm ``GatherExcite.gather``): depthwise ``conv{i}``
    + BatchNorm ``norm{i}`` (+ activation between stages). ``extent=0``: one convolution
    whose kernel covers ``window`` with no padding (1x1 output on a map of that size);
    ``extent=e``: ``log2(e)`` 3x3 stride-2 convolutions."""

    extent: int
    window: tuple[int, int]
    act_layer: str
    norm_layer: str | None
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        channels = x.shape[-1]
        if self.extent == 0:
            stages = [dict(kernel_size=self.window, strides=1, padding="VALID")]
        else:
            stages = [dict(kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)))
                      ] * int(math.log2(self.extent))
        for index, stage in enumerate(stages, start=1):
            x = self.conv(channels, bias=False, groups=channels, name=f"conv{index}",
                          **stage)(x)
            if self.norm_layer is not None:
                x = self.norm(self.norm_layer, train, f"norm{index}", ("batchnorm",))(x)
            if index < len(stages):
                x = activation(self.act_layer)(x)
        return x


@ATTENTIONS.register("ge")
class GatherExcite(Attention):
    """Gather-Excite (Hu et al. 2018; timm ``GatherExcite``): gather context over an
    ``extent``, excite with ``mlp`` (timm's ``ConvMlp``: ``fc1``, ``fc2``, biases),
    resize the context back to the map (nearest) and gate.

    * ``extent=0`` (default): global; the gather is ``squeeze`` (any ``POOLS`` name;
      GE-theta-minus with GAP is SE with ``rd_divisor=1``).
    * ``extent=e`` (even): parameter-free average pooling, window ``2e - 1``, stride
      ``e``, padding excluded from the mean; ``squeeze`` must stay ``"gap"``.
    * ``extra_params=True`` (GE-theta): depthwise convolutions ``gather/conv{i}`` with
      BatchNorm ``gather/norm{i}``: for ``extent=0`` one unpadded convolution over
      ``feat_size`` (default: the input's size), as in the paper; timm pads it by
      ``(k - 1) // 2``, so its output is not 1x1, and its BatchNorm gets the wrong
      arguments in timm 1.0.31, so this variant follows the paper.
    """

    feat_size: tuple[int, int] | None = None
    extra_params: bool = False
    extent: int = 0
    use_mlp: bool = True
    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 1
    act_layer: str = "relu"
    norm_layer: str | None = "batchnorm"
    gate_layer: str = "sigmoid"
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        height, width, channels = x.shape[1:]
        extent = self.extent
        if isinstance(extent, bool) or not isinstance(extent, int) or extent < 0 \
                or extent % 2:
            raise ValueError(f"extent={extent!r} is not valid; it must be 0 (global) or a "
                             "positive even integer")
        if (extent or self.extra_params) and self.squeeze != "gap":
            raise ValueError(f"squeeze={self.squeeze!r} applies to the parameter-free global "
                             "gather only (extent=0, extra_params=False)")
        if self.extra_params:
            window = tuple(self.feat_size or (height, width))
            if window[0] > height or window[1] > width:
                raise ValueError(f"feat_size={window} is larger than the input map "
                                 f"{(height, width)}")
            context = _GatherConvs(extent, window, self.act_layer, self.norm_layer,
                                   self.dtype, self.axis_name, name="gather")(x, train)
        elif extent == 0:
            context = self.squeeze_with(self.squeeze, x, "squeeze")[:, None, None, :]
        else:
            context = avg_pool_excluding_padding(x, 2 * extent - 1, extent, extent - 1)
        if self.use_mlp:
            context = ConvMlp(self.reduced_width(channels), channels, self.act_layer,
                              dtype=self.dtype, name="mlp")(context)
        context = self.pooled_channels(context, channels, self.squeeze)
        if context.shape[1:3] != (1, 1):
            context = nearest_resize(context, (height, width))
        return scale_by(x, self.gate(context))


@ATTENTIONS.register("gc")
class GlobalContext(Attention):
    """Global context block (Cao et al. 2019, GCNet; timm ``GlobalContext``).

    Context: softmax attention over positions with logits from a 1x1 conv ``conv_attn``
    (C -> 1, bias), i.e. an attention pool; ``use_attn=False`` uses GAP instead, and a
    ``squeeze`` (any ``POOLS`` name) replaces the published context (no ``conv_attn``).
    Transforms (timm's ``ConvMlp`` with LayerNorm, ``rd_ratio`` 1/8, divisor 1):
    ``mlp_scale`` gates the map, ``x * gate(mlp_scale(context))`` (``fuse_scale``);
    ``mlp_add`` is added, ``x + mlp_add(context)`` (``fuse_add``, its last kernel starts
    at zero). Both: scale first.
    """

    use_attn: bool = True
    fuse_add: bool = False
    fuse_scale: bool = True
    rd_ratio: float = 1.0 / 8
    rd_channels: int | None = None
    rd_divisor: int = 1
    act_layer: str = "relu"
    gate_layer: str = "sigmoid"
    squeeze: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        channels = x.shape[-1]
        if not (self.fuse_add or self.fuse_scale):
            raise ValueError("gc needs fuse_scale=True or fuse_add=True (else it is the "
                             "identity)")
        if self.squeeze is None and self.use_attn:
            he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
            logits = self.conv(1, bias=True, name="conv_attn", kernel_init=he_normal)(x)
            context = softmax_context(x, logits[..., 0])
        else:
            context = self.squeeze_with(self.squeeze or "gap", x, "squeeze")
        context = context[:, None, None, :].astype(x.dtype)
        hidden = self.reduced_width(channels)
        out = x
        if self.fuse_scale:
            logits = ConvMlp(hidden, channels, self.act_layer, "layernorm", dtype=self.dtype,
                             name="mlp_scale")(context)
            out = scale_by(out, self.gate(logits))
        if self.fuse_add:
            added = ConvMlp(hidden, channels, self.act_layer, "layernorm",
                            zero_init_last=True, dtype=self.dtype, name="mlp_add")(context)
            out = out + added.astype(out.dtype)
        return out


@ATTENTIONS.register("gca")
class GlobalContextAdd(GlobalContext):
    """``gc`` with ``fuse_add=True, fuse_scale=False``: ``x + mlp_add(context)``."""

    fuse_add: bool = True
    fuse_scale: bool = False
    multiplicative: ClassVar[bool] = False


@ATTENTIONS.register("srm")
class StyleRecalibration(Attention):
    """Style-based Recalibration Module (Lee, Kim & Nam 2019).

    Style pooling: per-channel mean and (unbiased) standard deviation, ``t [B, C, 2]``;
    style integration: a channel-wise fully connected layer ``z_c = cfc[c] . t_c``
    (``cfc [C, 2]``, no bias, zero init as in the paper's code), BatchNorm ``bn``, then
    ``gate`` (sigmoid): ``4C`` parameters (+ ``2C`` BatchNorm statistics). A ``squeeze``
    (a ``POOLS`` name or a tuple of them) replaces the two style statistics by those
    pools, one ``cfc`` column each.
    """

    gate_layer: str = "sigmoid"
    squeeze: str | tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        channels = x.shape[-1]
        if self.squeeze is None:
            styles = style_pool(x)
        else:
            names = (self.squeeze,) if isinstance(self.squeeze, str) else self.squeeze
            styles = jnp.stack(
                [self.pooled_channels(self.squeeze_with(name, x, f"squeeze_{i}"), channels,
                                      name).astype(jnp.float32)
                 for i, name in enumerate(names)], axis=-1)
        cfc = self.param("cfc", nn.initializers.zeros, (channels, styles.shape[-1]),
                         jnp.float32)
        z = (styles * cfc).sum(axis=-1)[:, None, None, :]
        z = self.norm("batchnorm", train, "bn")(z)
        return scale_by(x, self.gate(z))


@ATTENTIONS.register("fca")
class FrequencyChannelAttention(Attention):
    """FcaNet's multi-spectral channel attention (Qin et al. 2021).

    The map is average-pooled to ``dct_h x dct_w`` (adaptive bins, when its size differs),
    the channels split into ``n`` groups and group ``i`` pooled with the 2-D DCT basis of
    the ``i``-th frequency of ``freq_sel_method`` (``"top16"``: the paper's 16 best;
    frequencies on a 7x7 grid, scaled by ``dct // 7``); then SE's excitation without
    biases: Dense ``fc1`` (C -> C // reduction), ``act_layer``, Dense ``fc2`` (-> C),
    gate. Frequency (0, 0) is GAP times ``sqrt(dct_h dct_w)``. ``2 C^2 / reduction``
    parameters; the filter bank is a constant, not a variable. C must be a multiple of
    ``n``.
    """

    reduction: int = 16
    dct_h: int = 7
    dct_w: int = 7
    freq_sel_method: str = "top16"
    act_layer: str = "relu"
    gate_layer: str = "sigmoid"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        channels = x.shape[-1]
        for field in ("dct_h", "dct_w", "reduction"):
            check_positive(field, getattr(self, field), integer=True)
        if min(self.dct_h, self.dct_w) < 7:
            raise ValueError(f"fca: dct_h={self.dct_h}, dct_w={self.dct_w} must be >= 7 "
                             "(frequencies live on a 7x7 grid scaled by dct // 7)")
        hidden = channels // self.reduction
        if hidden < 1:
            raise ValueError(f"fca: channels // reduction = {channels} // {self.reduction} "
                             "is 0; lower reduction")
        frequencies = [(u * (self.dct_h // 7), v * (self.dct_w // 7))
                       for u, v in fca_frequencies(self.freq_sel_method)]
        filters = pooled_dct_filters(*x.shape[1:3], self.dct_h, self.dct_w, frequencies,
                                     channels)
        pooled = multispectral_pool(x, filters)
        h = nn.Dense(hidden, use_bias=False, dtype=self.dtype, name="fc1")(pooled)
        h = activation(self.act_layer)(h)
        logits = nn.Dense(channels, use_bias=False, dtype=self.dtype, name="fc2")(h)
        return scale_by(x, self.gate(logits[:, None, None, :]))


__all__ = [
    "CircularEfficientChannelAttention",
    "EffectiveSqueezeExcite",
    "EfficientChannelAttention",
    "EfficientChannelAttentionMLP",
    "FrequencyChannelAttention",
    "GatherExcite",
    "GlobalContext",
    "GlobalContextAdd",
    "LocalExcite",
    "SqueezeExcite",
    "StyleRecalibration",
]
