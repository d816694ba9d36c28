"""The ``ATTENTIONS`` registry, the base class every attention module shares, the constructor
``make_attention`` and the small submodules several modules reuse (timm's ``ConvMlp`` and
``ConvNormAct``).

Conventions of every module (see docs/attention.md):

* ``__call__(x [B, H, W, C], train=False) -> [B, H, W, C]`` in ``x``'s dtype.
* Options are dataclass fields with timm's keyword names (``rd_ratio``, ``rd_divisor``,
  ``act_layer``, ``gate_layer``, ...; activations by timm's names), plus ``squeeze``: the
  ``POOLS`` name of the global pool where the module has one.
* ``dtype`` is the compute dtype of convolutions and dense layers; gates, softmaxes,
  norms and reductions are float32; parameters are float32.
* Submodule and parameter names are timm's (``fc1``, ``fc2``, ``conv``, ``mlp_scale/norm``,
  ``spatial/conv/bn``, ...), so a timm state dict maps onto a module by leaf renames alone
  (``weight`` -> ``kernel`` / ``scale``, ``running_mean`` -> ``mean``).
* Gates (float32) are sown under ``intermediates`` as ``gates`` (``gates_h`` / ``gates_w``
  for the two factors of coordinate attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.attention.functional import activation, make_divisible
from gapjax.pooling import make_pool
from gapjax.registry import Registry, build_with_options

Array = jax.Array

#: The attention modules by name: timm's ``create_attn`` names plus ``srm``, ``fca`` and
#: ``local``. A fork adds one with ``@ATTENTIONS.register("mine")`` on an ``Attention``
#: subclass.
ATTENTIONS: Registry[type[Attention]] = Registry("attention")

#: ``norm_layer`` values: BatchNorm (momentum 0.9 = PyTorch's 0.1, eps 1e-5), LayerNorm
#: over channels (timm's ``LayerNorm2d``, eps 1e-6), GroupNorm with one group (timm's
#: ``GroupNorm1``, eps 1e-5).
NORM_LAYERS = ("batchnorm", "layernorm", "groupnorm")


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else one line naming the field and choices."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not valid; choose one of: "
                         + ", ".join(repr(choice) for choice in choices))
    return value


def check_positive(field: str, value: Any, integer: bool = False) -> None:
    """One clear line unless ``value`` is a positive number (an int when ``integer``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{field}={value!r} is not valid; it must be {kind}")


class _Layer(nn.Module):
    """Helpers shared by the attention modules and their submodules, which declare the
    fields the helpers read (``dtype``; ``axis_name`` for ``norm``, ``gate_layer`` for
    ``gate``). Each helper returns a submodule (named like timm's) or an array; called
    from a compact method."""

    def conv(self, features: int, kernel_size: Sequence[int] = (1, 1), *, bias: bool,
             name: str, padding: Any = "VALID", groups: int = 1, strides: int = 1,
             dilation: int = 1, kernel_init: Callable[..., Array] | None = None) -> nn.Conv:
        """A convolution in the compute dtype (``kernel [*kernel_size, in / groups, out]``;
        PyTorch's ``[out, in / groups, *kernel_size]`` transposed)."""
        extra = {} if kernel_init is None else {"kernel_init": kernel_init}
        return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding,
                       kernel_dilation=dilation, feature_group_count=groups, use_bias=bias,
                       dtype=self.dtype, name=name, **extra)

    def norm(self, kind: str, train: bool, name: str,
             allowed: Sequence[str] = NORM_LAYERS) -> nn.Module:
        """A float32 norm layer over the last axis (see ``NORM_LAYERS``)."""
        check_choice("norm_layer", kind, tuple(allowed))
        if kind == "batchnorm":
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=jnp.float32, axis_name=self.axis_name,
                                use_fast_variance=False, name=name)
        if kind == "layernorm":
            return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False,
                                name=name)
        return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=jnp.float32,
                            use_fast_variance=False, name=name)

    def gate(self, logits: Array, name: str = "gates") -> Array:
        """``gate_layer(logits)`` in float32, sown as ``intermediates/<name>``."""
        gates = activation(self.gate_layer, "gate_layer")(logits.astype(jnp.float32))
        self.sow("intermediates", name, gates)
        return gates

    def squeeze_with(self, pool_name: str, x: Array, name: str) -> Array:
        """The ``POOLS`` pool ``pool_name`` (a submodule called ``name``) applied to
        ``x [B, *S, C]`` -> ``[B, width]``."""
        return make_pool(pool_name, dtype=self.dtype, name=name)(x)


class Attention(_Layer):
    """Base of the ``ATTENTIONS`` modules: ``x [B, H, W, C] -> [B, H, W, C]`` (x's dtype).

    Attributes:
      channels: C, checked against the input when given (None: taken from the input).
      dtype: compute dtype of the convolutions / dense layers (None: from the inputs).
      axis_name: pmap axis for cross-device BatchNorm statistics (modules with BatchNorm).
    """

    channels: int | None = None
    dtype: Any = None
    axis_name: str | None = None

    #: Whether ``gate_layer`` bounds the output of this module as ``x * gate``; False for
    #: additive modules (``gca``).
    multiplicative: ClassVar[bool] = True

    def prepare(self, x: Array) -> Array:
        """``x`` as an array after checking it is ``[B, H, W, C]`` with C = ``channels``."""
        x = jnp.asarray(x)
        what = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{what} expects a feature map [batch, height, width, channels]; "
                             f"got shape {tuple(x.shape)}")
        if self.channels is not None and x.shape[-1] != self.channels:
            raise ValueError(f"{what} was built for channels={self.channels}; got an input "
                             f"with {x.shape[-1]} channels (shape {tuple(x.shape)})")
        return x

    def reduced_width(self, channels: int, round_limit: float = 0.0) -> int:
        """The bottleneck width: ``rd_channels`` when set, else ``make_divisible(channels *
        rd_ratio, rd_divisor, round_limit)`` (timm's rule)."""
        if self.rd_channels:
            check_positive("rd_channels", self.rd_channels, integer=True)
            return int(self.rd_channels)
        check_positive("rd_ratio", self.rd_ratio)
        check_positive("rd_divisor", self.rd_divisor, integer=True)
        return make_divisible(channels * self.rd_ratio, self.rd_divisor,
                              round_limit=round_limit)

    def pooled_channels(self, pooled: Array, channels: int, pool_name: str) -> Array:
        """``pooled [..., width]`` after checking ``width == channels``, for modules whose
        gate reads one pooled value per channel."""
        if pooled.shape[-1] != channels:
            raise ValueError(
                f"{type(self).__name__} needs one pooled value per channel, but squeeze="
                f"{pool_name!r} pools {channels} channels to {pooled.shape[-1]}; choose a "
                "pool that keeps the width")
        return pooled

    def __call__(self, x: Array, train: bool = False) -> Array:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def _frozen(value: Any) -> Any:
    """Lists (from a JSON config) as tuples, so that module fields stay hashable."""
    return tuple(_frozen(item) for item in value) if isinstance(value, list) else value


def make_attention(attn: str | None, channels: int | None = None, /, *, dtype: Any = None,
                   **options: Any) -> Attention | None:
    """The ``ATTENTIONS`` module ``attn`` for ``channels`` input channels (None: taken from
    the input), or None when ``attn`` is None or empty (no attention).

    ``options`` are the module's fields (``attn_kwargs`` of a config; ``name=`` names the
    submodule); an unknown one is one line naming it and the valid options, an unknown
    ``attn`` one line listing the registered names. Lists become tuples (a ``squeeze``
    list from a JSON config).
    """
    if attn is None or attn == "":
        return None
    module_class = ATTENTIONS.get(attn)
    if channels is not None:
        check_positive("channels", channels, integer=True)
        options = {"channels": int(channels), **options}
    if dtype is not None:
        options = {"dtype": dtype, **options}
    options = {key: _frozen(value) for key, value in options.items()}
    return build_with_options(module_class, f"attention {attn!r}", options)


class ConvMlp(_Layer):
    """timm's ``ConvMlp`` on ``[B, h, w, C_in]``: ``fc2(act(norm(fc1(x))))`` with 1x1
    convolutions ``fc1`` (-> ``hidden``) and ``fc2`` (-> ``features``) and an optional
    ``norm`` (a ``NORM_LAYERS`` name) on the hidden units. ``zero_init_last`` starts
    ``fc2``'s kernel at zero (GCNet's additive branch)."""

    hidden: int
    features: int
    act_layer: str = "relu"
    norm_layer: str | None = None
    bias: bool = True
    zero_init_last: bool = False
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        h = self.conv(self.hidden, bias=self.bias, name="fc1")(x)
        if self.norm_layer is not None:
            h = self.norm(self.norm_layer, train, "norm")(h)
        h = activation(self.act_layer)(h)
        last_init = nn.initializers.zeros if self.zero_init_last else None
        return self.conv(self.features, bias=self.bias, name="fc2", kernel_init=last_init)(h)


def torch_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's symmetric padding of a convolution (``get_padding``): ``((stride - 1) +
    dilation (k - 1)) // 2`` on each side (``k // 2`` for an odd kernel at stride 1)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class ConvNorm(_Layer):
    """timm's ``ConvNormAct``: a bias-free k x k ``conv`` with timm's symmetric padding
    (``torch_padding``), BatchNorm ``bn``, then ``act_layer`` (None: no activation, as
    with timm's ``apply_act=False``). ``[B, H, W, C_in] -> [B, H / stride, W / stride,
    features]``."""

    features: int
    kernel_size: int
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    act_layer: str | None = None
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        pad = torch_padding(self.kernel_size, self.strides, self.dilation)
        h = self.conv(self.features, (self.kernel_size, self.kernel_size), bias=False,
                      padding=((pad, pad), (pad, pad)), strides=self.strides,
                      dilation=self.dilation, groups=self.groups, name="conv")(x)
        h = self.norm("batchnorm", train, "bn")(h)
        return h if self.act_layer is None else activation(self.act_layer)(h)


__all__ = [
    "ATTENTIONS",
    "NORM_LAYERS",
    "Attention",
    "ConvMlp",
    "ConvNorm",
    "check_choice",
    "check_positive",
    "make_attention",
    "torch_padding",
]
