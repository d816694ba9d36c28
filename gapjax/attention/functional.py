"""The arithmetic of the attention modules, as plain functions of arrays.

Layouts are NHWC: a feature map is ``x [B, H, W, C]``. Everything here is shape-static (index
tables and DCT bases are NumPy arrays built at trace time from static sizes) and reduces in
float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Reductions that feed a gate keep full float32 products on accelerators too, where the
# default matmul precision would round the operands to bfloat16.
_EXACT = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Activations and gates, by timm's names
# --------------------------------------------------------------------------------------


def _mish(x: Array) -> Array:
    return x * jnp.tanh(jax.nn.softplus(x))


#: Activation functions by the names timm's ``create_act_layer`` accepts (``act_layer`` /
#: ``gate_layer`` options). ``gelu`` is the exact (erf) form, as in PyTorch.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    "elu": jax.nn.elu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "hardsigmoid": jax.nn.hard_sigmoid,
    "hard_swish": jax.nn.hard_swish,
    "hardswish": jax.nn.hard_swish,
}

#: The closed range of each bounded gate function; a gate not listed is unbounded.
GATE_RANGES: dict[str, tuple[float, float]] = {
    "sigmoid": (0.0, 1.0),
    "hard_sigmoid": (0.0, 1.0),
    "hardsigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
}


def activation(name: str, field: str = "act_layer") -> Callable[[Array], Array]:
    """The activation called ``name``; an unknown name is one line naming ``field`` and the
    valid choices."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not valid; choose one of: "
                         + ", ".join(sorted(ACTIVATIONS)))
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------
# Widths
# --------------------------------------------------------------------------------------


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """timm's channel rounding: the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), plus one ``divisor`` when rounding lost more than ``1 -
    round_limit`` of ``value``. SE-style bottlenecks pass ``round_limit=0`` (plain nearest
    multiple: 64 / 16 = 4 -> 8 with divisor 8); timm's ECA-MLP keeps the default 0.9."""
    if divisor < 1:
        raise ValueError(f"rd_divisor must be a positive integer; got {divisor!r}")
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA-Net's adaptive kernel size: the odd number nearest above
    ``|log2(C) + beta| / gamma`` (truncated), at least 3 (C = 64 -> 3, 256 -> 5)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


# --------------------------------------------------------------------------------------
# Squeezes that are not global pools
# --------------------------------------------------------------------------------------


def rows_as_sets(x: Array) -> Array:
    """``[B, H, W, C] -> [B*H, W, C]``: each image row a set of ``W`` vectors, so that any
    ``POOLS`` pool reduces it (the strip pooling of coordinate attention)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch * height, width, channels)


def columns_as_sets(x: Array) -> Array:
    """``[B, H, W, C] -> [B*W, H, C]``: each image column a set of ``H`` vectors."""
    batch, height, width, channels = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(batch * width, height, channels)


def depthwise_conv_1d(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """Depthwise 1-D convolution of ``x [B, L, C]`` with ``kernel [k, C]`` (k odd), zero
    padding ``k // 2`` on both sides (PyTorch's cross-correlation): float32 ``[B, L, C]``.

    Written as ``k`` shifted multiply-adds (a static loop over the taps, never over
    positions): one fused pass on every backend, where XLA:CPU's grouped convolution is
    an order of magnitude slower on these strips.
    """
    size, length = kernel.shape[0], x.shape[1]
    pad = size // 2
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (pad, pad), (0, 0)))
    weights = kernel.astype(jnp.float32)
    out = sum(padded[:, tap:tap + length] * weights[tap] for tap in range(size))
    return out if bias is None else out + bias.astype(jnp.float32)


def softmax_context(x: Array, logits: Array) -> Array:
    """GCNet's context: ``sum_i softmax(logits)_i x_i`` over the positions of ``x [B, H, W,
    C]`` with ``logits [B, H, W]`` -> float32 ``[B, C]`` (softmax and sum in float32)."""
    batch = x.shape[0]
    probs = jax.nn.softmax(logits.reshape(batch, -1).astype(jnp.float32), axis=-1)
    values = x.reshape(batch, -1, x.shape[-1]).astype(jnp.float32)
    return jnp.einsum("bn,bnc->bc", probs, values, precision=_EXACT)


def safe_sqrt(value: Array) -> Array:
    """``sqrt(max(value, 0))`` whose gradient at 0 is 0 instead of infinite (a constant
    channel, e.g. one a ReLU switched off, has standard deviation 0)."""
    positive = value > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, value, 1.0)), 0.0)


def style_pool(x: Array) -> Array:
    """SRM's style pooling: per-channel mean and standard deviation of ``x [B, H, W, C]``
    -> float32 ``[B, C, 2]``. The deviation is the unbiased one (``N - 1``), as in the
    paper's code; a 1x1 map has deviation 0."""
    batch, channels = x.shape[0], x.shape[-1]
    values = x.reshape(batch, -1, channels).astype(jnp.float32)
    count = values.shape[1]
    mean = values.mean(axis=1)
    squares = jnp.square(values - mean[:, None, :]).sum(axis=1)
    std = safe_sqrt(squares / max(count - 1, 1))
    return jnp.stack([mean, std], axis=-1)


def channel_mean_max(x: Array) -> tuple[Array, Array]:
    """Mean and max over the channels of ``x [B, H, W, C]``: two ``[B, H, W, 1]`` maps (the
    squeeze of CBAM's spatial attention); the mean accumulates in float32."""
    mean = x.astype(jnp.float32).mean(axis=-1, keepdims=True).astype(x.dtype)
    return mean, x.max(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------
# Resampling with static index tables
# --------------------------------------------------------------------------------------


def adaptive_bins(size: int, bins: int) -> np.ndarray:
    """Averaging matrix ``[bins, size]`` of PyTorch's adaptive average pooling: row ``i``
    averages positions ``floor(i * size / bins)`` to ``ceil((i + 1) * size / bins) - 1``."""
    matrix = np.zeros((bins, size), np.float32)
    for i in range(bins):  # static sizes, at trace time
        start, end = (i * size) // bins, math.ceil((i + 1) * size / bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def avg_pool_excluding_padding(x: Array, window: int, stride: int, padding: int) -> Array:
    """Average pooling of ``x [B, H, W, C]`` over ``window x window`` patches with the
    given stride and symmetric zero padding, dividing by the number of real positions in
    each patch (PyTorch's ``count_include_pad=False``); float32 ``[B, oh, ow, C]``."""
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    values = x.astype(jnp.float32)
    sums = jax.lax.reduce_window(values, 0.0, jax.lax.add, dims, strides, pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), jnp.float32)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pads)
    return sums / counts


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output position in PyTorch's ``interpolate(mode="nearest")``:
    ``floor(i * in / out)`` computed in float32, clipped to the input."""
    scale = np.float32(in_size / out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def nearest_resize(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of ``x [B, h, w, C]`` to ``[B, *size, C]`` (PyTorch's rule)."""
    rows = nearest_indices(x.shape[1], size[0])
    cols = nearest_indices(x.shape[2], size[1])
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


# --------------------------------------------------------------------------------------
# FcaNet: 2-D DCT bases
# --------------------------------------------------------------------------------------


def _pairs(vertical: Sequence[int], horizontal: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple(zip(vertical, horizontal, strict=True))


#: FcaNet's frequency orders on a 7x7 grid, ``(u, v)`` = (vertical, horizontal) frequency:
#: ``top`` ranks the 49 single-frequency channel attentions by their ImageNet accuracy
#: (the paper's Fig. 4), ``low`` goes outward from (0, 0) by anti-diagonals, ``bot`` is
#: the worst-ranked first. ``freq_sel_method="top16"`` takes the first 16 of ``top``.
FCA_FREQUENCIES: dict[str, tuple[tuple[int, int], ...]] = {
    "top": _pairs((0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2,
                   4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1),
                  (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2,
                   6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3)),
    "low": _pairs((0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0,
                   1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4),
                  (0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5,
                   4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3)),
    "bot": _pairs((6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5,
                   6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6),
                  (6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1,
                   4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3)),
}
FCA_COUNTS = (1, 2, 4, 8, 16, 32)


def fca_frequencies(method: str) -> tuple[tuple[int, int], ...]:
    """The frequencies of ``freq_sel_method`` (``"top16"``, ``"low4"``, ``"bot1"``, ...)."""
    order, count = method[:3], method[3:]
    if order not in FCA_FREQUENCIES or not count.isdigit() or int(count) not in FCA_COUNTS:
        choices = [f"{o}{n}" for o in FCA_FREQUENCIES for n in FCA_COUNTS]
        raise ValueError(f"freq_sel_method={method!r} is not valid; choose one of: "
                         + ", ".join(choices))
    return FCA_FREQUENCIES[order][: int(count)]


def dct_basis(position: np.ndarray, frequency: int, length: int) -> np.ndarray:
    """The orthonormal DCT-II basis function of ``frequency`` on ``length`` points."""
    scale = math.sqrt(1.0 / length) if frequency == 0 else math.sqrt(2.0 / length)
    return scale * np.cos(math.pi * frequency * (position + 0.5) / length)


def dct_filters(height: int, width: int, frequencies: Sequence[tuple[int, int]],
                channels: int) -> np.ndarray:
    """FcaNet's multi-spectral filter bank ``[height, width, C]`` (float32): the channels
    split into ``len(frequencies)`` equal groups and group ``i`` gets the 2-D DCT basis of
    frequency ``frequencies[i]``. Frequency (0, 0) is the constant ``1 / sqrt(h w)``, so
    pooling with it is ``sqrt(h w)`` times GAP."""
    if channels % len(frequencies):
        raise ValueError(f"fca splits the channels into {len(frequencies)} frequency groups, "
                         f"so channels must be a multiple of {len(frequencies)}; got {channels}")
    group = channels // len(frequencies)
    rows, cols = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    bases = [np.outer(dct_basis(rows, u, height), dct_basis(cols, v, width))
             for u, v in frequencies]
    return np.repeat(np.stack(bases, axis=-1), group, axis=-1).astype(np.float32)


def pooled_dct_filters(height: int, width: int, dct_h: int, dct_w: int,
                       frequencies: Sequence[tuple[int, int]], channels: int) -> np.ndarray:
    """``dct_filters`` on a ``dct_h x dct_w`` grid, applied after PyTorch's adaptive
    average pooling of a ``height x width`` map to that grid, folded into one filter bank
    ``[height, width, C]`` (both steps are linear, so pooling with the folded bank equals
    pooling the pooled map, without materialising it)."""
    filters = dct_filters(dct_h, dct_w, frequencies, channels).astype(np.float64)
    if (height, width) == (dct_h, dct_w):
        return filters.astype(np.float32)
    rows, cols = adaptive_bins(height, dct_h), adaptive_bins(width, dct_w)
    return np.einsum("ih,jw,ijc->hwc", rows, cols, filters).astype(np.float32)


def multispectral_pool(x: Array, filters: Array | np.ndarray) -> Array:
    """``sum_hw x[b, h, w, c] filters[h, w, c]``: ``[B, h, w, C] -> float32 [B, C]``."""
    return jnp.einsum("bhwc,hwc->bc", x.astype(jnp.float32), jnp.asarray(filters),
                      precision=_EXACT)


def scale_by(x: Array, gates: Array) -> Array:
    """``x * gates`` in ``x``'s dtype; ``gates`` broadcasts against ``x [B, H, W, C]``."""
    return x * gates.astype(x.dtype)


__all__ = [
    "ACTIVATIONS",
    "FCA_FREQUENCIES",
    "GATE_RANGES",
    "activation",
    "adaptive_bins",
    "avg_pool_excluding_padding",
    "channel_mean_max",
    "columns_as_sets",
    "dct_basis",
    "dct_filters",
    "depthwise_conv_1d",
    "eca_kernel_size",
    "fca_frequencies",
    "make_divisible",
    "multispectral_pool",
    "nearest_indices",
    "nearest_resize",
    "pooled_dct_filters",
    "rows_as_sets",
    "safe_sqrt",
    "scale_by",
    "softmax_context",
    "style_pool",
]
