"""Building blocks shared by the image models: the attention a block adds, classification
heads, and the ``Classifier`` base class that ties a backbone to a head.

* Attention: one family, ``gapjax.attention`` (``ATTENTIONS``, ``make_attention``, re-exported
  here). A model's blocks take ``attn=<ATTENTIONS name>`` and ``attn_kwargs={...}`` and
  build it with ``block_attention``; ``attention_options`` folds the models' older SE
  options (``se_reduction``, ``se_divisor``, ``se_pool``, ``se_gate``) into timm's names.
* ``GAPHead`` pools (any ``POOLS`` name), optionally normalises and transforms the pooled
  vector, and applies one Dense: the head of CNNs and ViTs alike, with exact maps where it
  is affine after the pool. ``FCHead`` flattens the map and applies the classic VGG stack.

Pure functions (``adaptive_avg_pool``, ``project``, ``frozen_layer_norm``) hold the
arithmetic; the Linen modules own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from gapjax.attention import ATTENTIONS, Attention, make_attention, make_divisible
from gapjax.pooling import POOLS, make_pool
from gapjax.pooling.map import LAYERNORM_EPSILON, gelu
from gapjax.registry import build_with_options

Array = jax.Array

HEADS = ("gap", "fc")


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> Any:
    """Returns ``value`` if it is one of ``choices``; otherwise raises one clear ValueError."""
    if value not in choices:
        raise ValueError(
            f"{field}={value!r} is not valid; choose one of: "
            + ", ".join(repr(choice) for choice in choices)
        )
    return value


def frozen(value: Any) -> Any:
    """``value`` with every dict frozen and every list a tuple, at any depth, so a module
    holding it (``pool_kwargs={"pools": ["mean", "max"]}``) stays hashable: jit caches key
    on it."""
    if isinstance(value, Mapping):
        return FrozenDict({key: frozen(item) for key, item in value.items()})
    return tuple(frozen(item) for item in value) if isinstance(value, list | tuple) else value


def build_module(cls: type[nn.Module], model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiates the model ``cls(**kwargs)`` from ``config.model`` keys: every key must be
    one of its options, ``num_classes`` a positive integer; option values are ``frozen``."""
    if "num_classes" in kwargs:
        check_num_classes(kwargs["num_classes"])
    kwargs = {key: frozen(value) for key, value in kwargs.items()}
    return build_with_options(cls, f"model {model_name!r}", kwargs)


# --------------------------------------------------------------------------------------
# Attention in a model's blocks
# --------------------------------------------------------------------------------------

#: The models' older SE options -> (``attn_kwargs`` name, conversion): ``se_reduction=r``
#: is ``rd_ratio=1/r``, ``se_divisor`` is ``rd_divisor``, ``se_pool`` the ``squeeze``,
#: ``se_gate`` the ``gate_layer``. Kept so existing configs and runs read the same.
LEGACY_SE_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "se_reduction": ("rd_ratio", lambda reduction: 1.0 / reduction),
    "se_divisor": ("rd_divisor", lambda divisor: divisor),
    "se_pool": ("squeeze", lambda pool: pool),
    "se_gate": ("gate_layer", lambda gate: gate),
}


def check_attention(attn: Any) -> str | None:
    """``attn`` if it is None, ``""`` or an ``ATTENTIONS`` name (a fork's included), else
    one line naming the field and the registered names."""
    if attn is None or attn == "" or attn in ATTENTIONS:
        return attn or None
    raise ValueError(f"attn={attn!r} is not valid; choose one of: "
                     + ", ".join(repr(name) for name in ATTENTIONS.names()) + ", None")


def attention_options(attn_kwargs: Mapping[str, Any] | None = None,
                      **legacy: Any) -> dict[str, Any]:
    """A block attention's options: ``attn_kwargs`` plus the legacy SE options that are set
    (not None), renamed (``LEGACY_SE_OPTIONS``). Giving an option both ways is one line
    naming both."""
    options = dict(attn_kwargs or {})
    for old, value in legacy.items():
        if value is None:
            continue
        if old == "se_reduction" and (isinstance(value, bool) or not isinstance(
                value, int | float) or value <= 0):
            raise ValueError(f"se_reduction={value!r} is not valid; it must be a positive "
                             "number (the SE bottleneck is C / se_reduction wide)")
        new, convert = LEGACY_SE_OPTIONS[old]
        if new in options:
            raise ValueError(f"{old}={value!r} and attn_kwargs.{new}={options[new]!r} set the "
                             f"same option; keep attn_kwargs.{new}")
        options[new] = convert(value)
    return options


def block_attention(attn: str | None, options: Mapping[str, Any], channels: int, *,
                    dtype: Any = None, axis_name: str | None = None,
                    name: str = "se") -> Attention | None:
    """The ``ATTENTIONS`` module ``attn`` of a block with ``channels`` output channels
    (``make_attention`` with ``options``), named ``name`` (timm's blocks call it ``se``);
    None when ``attn`` is None or ``""``."""
    attn = check_attention(attn)
    if attn is None:
        return None
    return make_attention(attn, channels, dtype=dtype, name=name, axis_name=axis_name,
                          **dict(options))


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def _adaptive_bins(size: int, bins: int) -> np.ndarray:
    """Averaging matrix ``[bins, size]``: row ``i`` averages positions
    ``floor(i * size / bins)`` to ``ceil((i + 1) * size / bins) - 1``. Bins overlap when
    ``size`` is not a multiple of ``bins`` and repeat positions when ``size < bins``."""
    matrix = np.zeros((bins, size), np.float32)
    for i in range(bins):  # runs at trace time on static sizes, never inside XLA
        start = (i * size) // bins
        end = math.ceil((i + 1) * size / bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: Array, output_size: tuple[int, int]) -> Array:
    """Average-pools ``x [B, H, W, C]`` to ``[B, oh, ow, C]`` with adaptive bins.

    Same bins as PyTorch's ``AdaptiveAvgPool2d``, so an FC head built for a 7x7 grid keeps
    its shape at any input size: larger maps are averaged down, smaller ones are repeated
    up (a 1x1 map becomes 7x7 copies of itself). When ``(H, W) == output_size`` the input
    is returned unchanged. Accumulates in float32.
    """
    out_h, out_w = output_size
    height, width = x.shape[1], x.shape[2]
    if (height, width) == (out_h, out_w):
        return x
    rows = jnp.asarray(_adaptive_bins(height, out_h))
    cols = jnp.asarray(_adaptive_bins(width, out_w))
    pooled = jnp.einsum("ih,bhwc,jw->bijc", rows, x.astype(jnp.float32), cols)
    return pooled.astype(x.dtype)


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


#: What a head computes, by the ``output`` argument of its ``__call__`` (and of
#: ``Classifier.__call__``, which adds ``"features"`` and ``"head"``).
HEAD_OUTPUTS = ("logits", "class_maps", "contributions")
#: Activations of ``GAPHead``'s optional pre-logits layer, by name.
PRE_LOGITS_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "hard_swish": jax.nn.hard_swish, "relu": jax.nn.relu, "gelu": gelu, "tanh": jnp.tanh,
    "silu": jax.nn.silu,
}


def project(features: Array, kernel: Array) -> Array:
    """A linear classifier at every position: ``[B, *S, C], [C, K] -> [B, *S, K]`` float32.

    The one projection behind every exact map (CAM, contributions): exact products, since
    on accelerators the default matmul precision (bf16 passes) would break the 1e-5
    additivity that makes the maps trustworthy."""
    return jnp.einsum("...c,ck->...k", jnp.asarray(features, jnp.float32),
                      jnp.asarray(kernel, jnp.float32), precision=jax.lax.Precision.HIGHEST)


def frozen_layer_norm(shares: Array, weights: Array, params: Mapping[str, Array]) -> Array:
    """A LayerNorm after the pool, split over positions with its statistics frozen.

    ``shares [B, *S, C]`` sum over positions to the pooled vector ``p``; ``weights``
    (``[B, *S, 1 or C]``, summing to one) hand out what is no position's own. With ``mu``,
    ``sigma`` of ``p`` fixed, ``LayerNorm(p) = sum_i [(s_i - w_i mu) / sigma * scale +
    w_i bias]``: the norm is affine, and the split stays exact (float32)."""
    pooled = shares.sum(axis=tuple(range(1, shares.ndim - 1)), keepdims=True)
    mean = pooled.mean(axis=-1, keepdims=True)
    variance = jnp.square(pooled - mean).mean(axis=-1, keepdims=True)
    scaled = (shares - weights * mean) * jax.lax.rsqrt(variance + LAYERNORM_EPSILON)
    return scaled * params["scale"] + weights * params["bias"]


def head_map_kinds(pool: str, pre_logits: int | None = None) -> tuple[str, ...]:
    """Exact maps of a ``GAPHead`` with ``pool``: the pool's ``exact_maps()``, or none
    after a pre-logits nonlinearity."""
    return () if pre_logits else POOLS.get(pool).exact_maps()


class GAPHead(nn.Module):
    """The pooling head of every classifier, CNN or ViT: pool -> optional LayerNorm ->
    optional pre-logits layer -> dropout -> classifier. ``[B, *S, C] -> float32 [B, K]``.

    Submodules, named as the weight layouts expect: ``pool`` (any ``POOLS`` name, with
    ``pool_kwargs``), ``fc_norm`` (``norm=True``: timm ViT's ``fc_norm``, ConvNeXt's head
    norm), ``pre_logits`` (``pre_logits=width``: a Dense, then ``pre_logits_act``;
    MobileNetV3's ``conv_head``), ``classifier`` (a Dense in float32 whatever the compute
    dtype, so logits and maps share the arithmetic).

    Exact maps (``output=``, eval mode, where ``map_kinds`` allows): ``"contributions"``
    ``[B, *S, K]``, the pool's ``Pool.contributions`` through the affine tail (a norm with
    the pooled vector's statistics frozen), sum to ``logits - bias``; ``"class_maps"``
    (uniform pools) are those times the number of positions (without a norm, ``W_k . x_i``).
    """

    num_classes: int
    pool: str = "gap"
    pool_kwargs: Any = None
    dropout: float = 0.0
    dtype: Any = None
    norm: bool = False
    pre_logits: int | None = None
    pre_logits_act: str = "hard_swish"

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """The exact maps of this head (``head_map_kinds``; no variables needed)."""
        return head_map_kinds(self.pool, self.pre_logits)

    @nn.compact
    def __call__(self, features: Array, train: bool = False, output: str = "logits") -> Array:
        check_choice("output", output, HEAD_OUTPUTS)
        pool = make_pool(self.pool, dtype=self.dtype, name="pool", **dict(self.pool_kwargs or {}))
        if output != "logits":
            kind = "cam" if output == "class_maps" else "contribution"
            if kind not in self.map_kinds:
                raise ValueError(
                    f"pool {self.pool!r}{' with a pre-logits layer' if self.pre_logits else ''}"
                    f" gives no exact {kind!r} maps; use method='grad_cam'")
            params = self.variables["params"]
            shares, weights = pool.contributions(features)
            if self.norm:
                shares = frozen_layer_norm(shares, weights, params["fc_norm"])
            maps = project(shares, params["classifier"]["kernel"])
            return maps * math.prod(features.shape[1:-1]) if kind == "cam" else maps
        pooled = pool(features).astype(jnp.float32)
        if self.norm:
            pooled = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype,
                                  name="fc_norm")(pooled).astype(jnp.float32)
        if self.pre_logits:
            activation = PRE_LOGITS_ACTIVATIONS[check_choice(
                "pre_logits_act", self.pre_logits_act, tuple(PRE_LOGITS_ACTIVATIONS))]
            pooled = activation(nn.Dense(self.pre_logits, dtype=self.dtype, name="pre_logits")(
                pooled)).astype(jnp.float32)
        if self.dropout > 0:
            pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(pooled)


class FCHead(nn.Module):
    """Flatten -> [Dense(width) -> ReLU -> Dropout] per width -> Dense(K): the classic VGG
    head with ``widths=(4096, 4096)``; ``widths=()`` is a single linear layer on the
    flattened map. ``[B, h, w, C] -> float32 logits [B, K]``.

    ``grid=(gh, gw)`` first average-pools the map to a fixed grid with adaptive bins (VGG
    uses 7x7), so the head has the same shape at every input size; larger inputs are
    averaged down, smaller ones repeated up. With ``grid=None`` the head flattens the map
    as it is, so its first Dense is sized by the input size used at ``init``; applying
    it to another size raises an error that says so. It has no per-location maps.
    """

    #: A flatten head has no exact per-location maps.
    map_kinds: ClassVar[tuple[str, ...]] = ()

    num_classes: int
    widths: Sequence[int] = (4096, 4096)
    dropout: float = 0.5
    grid: tuple[int, int] | None = None
    dtype: Any = None
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, features: Array, train: bool = False, output: str = "logits") -> Array:
        if check_choice("output", output, HEAD_OUTPUTS) != "logits":
            raise ValueError("head='fc' flattens the map, so it has no exact per-location "
                             "maps; use method='grad_cam'")
        if self.grid is not None:
            features = adaptive_avg_pool(features, tuple(self.grid))
        flat = features.reshape(features.shape[0], -1)
        self._check_flat_size(flat.shape[1], features.shape)
        for index, width in enumerate(self.widths):
            flat = nn.Dense(
                width, dtype=self.dtype, kernel_init=self.kernel_init, name=f"fc{index + 1}"
            )(flat)
            flat = nn.relu(flat)
            if self.dropout > 0:
                flat = nn.Dropout(self.dropout, deterministic=not train)(flat)
        flat = flat.astype(jnp.float32)
        return nn.Dense(
            self.num_classes, dtype=jnp.float32, kernel_init=self.kernel_init,
            name="classifier",
        )(flat)

    def _check_flat_size(self, size: int, shape: tuple[int, ...]) -> None:
        first = "fc1" if self.widths else "classifier"
        params = self.variables.get("params", {})
        if first not in params:
            return  # initialising
        expected = params[first]["kernel"].shape[0]
        if expected != size:
            raise ValueError(
                f"FCHead: the feature map {tuple(shape[1:])} flattens to {size} values but "
                f"the head was initialised for {expected}; a flatten head without a grid "
                "fixes the input size. Apply it at the input size used for init, or set "
                "fc_grid=(h, w) to pool to a fixed grid first."
            )


# --------------------------------------------------------------------------------------
# The model contract
# --------------------------------------------------------------------------------------

#: What ``Classifier.__call__`` computes, by its ``output`` argument.
OUTPUTS = ("logits", "features", "head", "class_maps", "contributions")


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` as a positive int, or one clear ValueError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) \
            or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not valid; it must be an integer "
                         ">= 1")
    return int(num_classes)


class Classifier(nn.Module):
    """Base of the image classifiers: a backbone to a feature map, then the ``head``.

    The model contract (docs/ARCHITECTURE.md), plain ``apply`` calls, one forward pass each:

    * ``apply(v, x, train=False) -> logits [B, K]`` (float32);
    * ``apply(v, x, train=False, method="forward_features") -> features [B, h, w, C]``,
      the pre-pool map (compute dtype);
    * ``apply(v, features, train=False, method="forward_head") -> logits [B, K]``;
    * ``apply(v, features, method="head_class_maps") -> [B, h, w, K]``: ``W_k . x_i``;
    * ``apply(v, features, method="head_contributions") -> [B, h, w, K]``: per-location
      contributions summing to ``logits - bias`` (pools with contributions);
    * ``model.map_kinds``: the exact maps the head allows (``"cam"``, ``"contribution"``).

    ``__call__`` is ``forward_head(forward_features(x))``. Subclasses implement
    ``backbone(x, train) -> [B, h, w, C']`` and call ``self.early_tap(x)`` on their first
    layer's output (a Flax perturbation named ``early``: gradient diagnostics read the
    gradient there). The head is the submodule ``head`` and its last Dense ``classifier``.

    Attributes:
      num_classes: K.
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``, or their names);
        parameters and BatchNorm statistics stay float32, logits are float32.
      head: ``"gap"`` (pool + Dense) or ``"fc"`` (flatten + Dense stack).
      pool: ``POOLS`` name of the GAP head's pool; ``pool_kwargs`` its options (a dict).
      dropout: head dropout; None = the head's default (0 for gap, 0.5 for fc).
      fc_widths: hidden widths of the FC head (subclasses set their classic default).
      fc_grid: fixed grid the FC head pools to before flattening, or None.
      axis_name: pmap axis for cross-device BatchNorm statistics, None under jit.
      stem: ``"imagenet"`` or ``"cifar"`` (see each model).
    """

    num_classes: int
    dtype: Any = jnp.float32
    head: str = "gap"
    pool: str = "gap"
    pool_kwargs: Any = None
    dropout: float | None = None
    fc_widths: Sequence[int] = ()
    fc_grid: tuple[int, int] | None = None
    axis_name: str | None = None
    stem: str = "imagenet"

    def backbone(self, x: Array, train: bool) -> Array:
        raise NotImplementedError(f"{type(self).__name__} must implement backbone()")

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """Exact per-location maps the head allows (``GAPHead.map_kinds``): ``("cam",
        "contribution")`` for a uniform pool, ``("contribution",)`` for a pool with
        contributions, ``()`` otherwise (FC head; GeM, LSE, ... use Grad-CAM)."""
        if self.head != "gap":
            return ()
        return head_map_kinds(self.pool, self.head_options().get("pre_logits"))

    def head_options(self) -> dict[str, Any]:
        """``GAPHead`` options beyond the pool and dropout (``norm``, ``pre_logits``,
        ``pre_logits_act``, ``pool_kwargs``) that a model family sets; none by default."""
        return {}

    def make_head(self) -> nn.Module:
        """The head submodule, named ``head``."""
        check_choice("head", self.head, HEADS)
        if self.head == "gap":
            options = {"pool_kwargs": self.pool_kwargs, **self.head_options()}
            dropout = 0.0 if self.dropout is None else self.dropout
            return GAPHead(self.num_classes, self.pool, dropout=dropout,
                           dtype=self.compute_dtype, name="head", **options)
        dropout = 0.5 if self.dropout is None else self.dropout
        return FCHead(
            self.num_classes, tuple(self.fc_widths), dropout, self.resolved_fc_grid(),
            self.compute_dtype, kernel_init=self.fc_kernel_init(), name="head",
        )

    def resolved_fc_grid(self) -> tuple[int, int] | None:
        return None if self.fc_grid is None else tuple(self.fc_grid)

    def fc_kernel_init(self) -> Callable[..., Array]:
        return nn.initializers.lecun_normal()

    def norm_layer(self, train: bool, name: str) -> nn.Module:
        """BatchNorm with the reference momentum 0.9 and epsilon 1e-5, float32 statistics."""
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=self.compute_dtype, axis_name=self.axis_name, name=name,
        )

    def early_tap(self, x: Array) -> Array:
        """The first layer's output, with the ``early`` perturbation added when the caller
        passes a ``perturbations`` collection (gradient diagnostics); a no-op otherwise."""
        return x if self.is_initializing() else self.perturb("early", x)

    @nn.compact
    def __call__(self, x: Array, train: bool = False, output: str = "logits") -> Array:
        """``output``: ``"logits"`` or ``"features"`` of images ``x``; ``"head"``,
        ``"class_maps"`` or ``"contributions"`` of features ``x``. The named methods below
        are the public entry points."""
        check_num_classes(self.num_classes)
        check_choice("output", output, OUTPUTS)
        if output in ("logits", "features"):
            if x.ndim != 4:
                raise ValueError(
                    f"{type(self).__name__} expects images of shape [batch, height, width, "
                    f"channels]; got shape {tuple(x.shape)}"
                )
            x = self.backbone(jnp.asarray(x, self.compute_dtype), train)
            if output == "features":
                return x
        if output in ("logits", "head"):
            return self.make_head()(x, train=train).astype(jnp.float32)
        return self.make_head()(x, output=output)

    def forward_features(self, images: Array, train: bool = False) -> Array:
        """``[B, H, W, C_in] -> [B, h, w, C]``: the pre-pool feature map."""
        return self(images, train, output="features")

    def forward_head(self, features: Array, train: bool = False) -> Array:
        """``[B, h, w, C] -> float32 logits [B, K]``."""
        return self(features, train, output="head")

    def head_class_maps(self, features: Array) -> Array:
        """``[B, h, w, C] -> [B, h, w, K]``: ``W_k . x_i`` (CAM; float32)."""
        return self(features, False, output="class_maps")

    def head_contributions(self, features: Array) -> Array:
        """``[B, h, w, C] -> [B, h, w, K]``: contributions summing to ``logits - bias``."""
        return self(features, False, output="contributions")


#: Convolution init of the reference ResNets and VGGs: He normal with fan-out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


__all__ = [
    "ATTENTIONS",
    "HEADS",
    "HEAD_OUTPUTS",
    "LEGACY_SE_OPTIONS",
    "OUTPUTS",
    "PRE_LOGITS_ACTIVATIONS",
    "Classifier",
    "FCHead",
    "GAPHead",
    "adaptive_avg_pool",
    "attention_options",
    "block_attention",
    "build_module",
    "check_attention",
    "check_choice",
    "check_num_classes",
    "conv_kernel_init",
    "frozen",
    "frozen_layer_norm",
    "head_map_kinds",
    "make_attention",
    "make_divisible",
    "project",
]
