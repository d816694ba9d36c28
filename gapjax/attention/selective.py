"""Selective Kernel convolution (Li et al. 2019, SKNet; timm ``SelectiveKernel``).

Not an ``ATTENTIONS`` member: it replaces a convolution of a residual block (it may change
the width and the stride), where the registry's modules map a map to one of its shape. Its
attention over the paths is SE's: a squeeze of the summed paths (GAP, or any ``POOLS``
name with ``squeeze``), a bottleneck, and a softmax across the paths per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.attention.base import ConvNorm, _Layer, check_positive
from gapjax.attention.functional import activation, make_divisible

Array = jax.Array


def selective_sum(paths: Array, logits: Array) -> Array:
    """``sum_p softmax_p(logits)[p] * paths[p]``: ``paths [B, P, H, W, C]``, ``logits [B, P,
    C]`` -> ``[B, H, W, C]`` in ``paths``' dtype (softmax in float32)."""
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=1)
    return (paths * weights[:, :, None, None, :].astype(paths.dtype)).sum(axis=1)


class SelectiveKernelAttention(_Layer):
    """The path attention (timm ``SelectiveKernelAttn``): ``squeeze`` of the summed paths,
    1x1 ``fc_reduce`` (C -> ``attn_channels``, no bias), BatchNorm ``bn``, ``act_layer``,
    1x1 ``fc_select`` (-> ``P C``, no bias). ``[B, P, H, W, C] -> logits [B, P, C]``
    (torch's channel ``p C + c`` is path ``p``, channel ``c``)."""

    attn_channels: int
    act_layer: str = "relu"
    squeeze: str = "gap"
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, paths: Array, train: bool = False) -> Array:
        batch, num_paths, channels = paths.shape[0], paths.shape[1], paths.shape[-1]
        pooled = self.squeeze_with(self.squeeze, paths.sum(axis=1), "squeeze")
        if pooled.shape[-1] != channels:
            raise ValueError(f"SelectiveKernel needs one pooled value per channel, but "
                             f"squeeze={self.squeeze!r} pools {channels} channels to "
                             f"{pooled.shape[-1]}; choose a pool that keeps the width")
        h = self.conv(self.attn_channels, bias=False, name="fc_reduce")(pooled[:, None, None])
        h = activation(self.act_layer)(self.norm("batchnorm", train, "bn")(h))
        logits = self.conv(num_paths * channels, bias=False, name="fc_select")(h)
        return logits.reshape(batch, num_paths, channels)


class SelectiveKernel(_Layer):
    """Selective Kernel convolution: ``[B, H, W, C_in] -> [B, H / stride, W / stride,
    features]``.

    One path per ``kernel_size`` entry: ``paths_<i>`` (timm's ``ConvNormAct``: a bias-free
    conv, BatchNorm, ``act_layer``). With ``keep_3x3`` every path is 3x3 and a k x k kernel
    becomes dilation ``dilation (k - 1) / 2`` (5x5 -> 3x3 dilated 2). ``split_input`` gives
    path ``i`` the ``i``-th of ``P`` equal channel slices of the input (fewer parameters),
    else every path reads all channels. ``attn`` weighs the paths per channel
    (``SelectiveKernelAttention``, width ``rd_channels`` or ``make_divisible(features
    rd_ratio, rd_divisor)`` with timm's round limit 0.9) and the weighted paths are summed.
    """

    features: int | None = None
    kernel_size: Sequence[int] = (3, 5)
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    keep_3x3: bool = True
    split_input: bool = True
    act_layer: str = "relu"
    squeeze: str = "gap"
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        in_channels = x.shape[-1]
        features = self.features or in_channels
        kernels = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
        if len(kernels) == 1:
            kernels = kernels * 2  # timm: one size means two paths of it
        for kernel in kernels:
            if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 3 \
                    or kernel % 2 == 0:
                raise ValueError(f"kernel_size={self.kernel_size!r} is not valid; each entry "
                                 "must be an odd integer >= 3")
        if self.keep_3x3:
            dilations = [self.dilation * (k - 1) // 2 for k in kernels]
            kernels = (3,) * len(kernels)
        else:
            dilations = [self.dilation] * len(kernels)
        num_paths = len(kernels)
        if self.split_input and in_channels % num_paths:
            raise ValueError(f"SelectiveKernel with split_input=True needs input channels "
                             f"divisible by its {num_paths} paths; got {in_channels}")
        inputs = (jnp.split(x, num_paths, axis=-1) if self.split_input
                  else [x] * num_paths)
        groups = min(features, self.groups)
        paths = jnp.stack([
            ConvNorm(features, kernel, strides=self.strides, dilation=dilation, groups=groups,
                     act_layer=self.act_layer, dtype=self.dtype, axis_name=self.axis_name,
                     name=f"paths_{index}")(inputs[index], train)
            for index, (kernel, dilation) in enumerate(zip(kernels, dilations))], axis=1)
        if self.rd_channels:
            check_positive("rd_channels", self.rd_channels, integer=True)
            attn_channels = int(self.rd_channels)
        else:
            check_positive("rd_ratio", self.rd_ratio)
            check_positive("rd_divisor", self.rd_divisor, integer=True)
            attn_channels = make_divisible(features * self.rd_ratio, self.rd_divisor)
        logits = SelectiveKernelAttention(attn_channels, self.act_layer, self.squeeze,
                                          dtype=self.dtype, axis_name=self.axis_name,
                                          name="attn")(paths, train)
        self.sow("intermediates", "gates", jax.nn.softmax(logits.astype(jnp.float32), axis=1))
        return selective_sum(paths, logits)


__all__ = ["SelectiveKernel", "SelectiveKernelAttention", "selective_sum"]
