"""Vision Transformers whose head is a class token, GAP, MAP or any ``POOLS`` pool.

Layout (ViT, Dosovitskiy et al. 2021; timm's ``VisionTransformer``): a strided
convolution cuts the image into ``patch_size`` x ``patch_size`` patches and embeds each
(``patch_embed``), an optional class token is prepended (``cls_token``), position
embeddings are added (learned ``pos_embed``, or fixed 2-D sin-cos as in big_vision's
"Better plain ViT baselines"), then ``depth`` pre-norm encoder blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, with drop path), a final LayerNorm and the
head. The patch tokens are a set ``[B, N, C]`` (``N = gh * gw``), so any ``POOLS`` pool
reads them like a feature map ``[B, gh, gw, C]``:

* ``pool="token"`` reads the class token (needs ``class_token=True``);
* ``pool="gap"`` averages the patch tokens (timm ``global_pool="avg"``); ``"map"`` is
  multihead attention pooling with a learned probe (``gapjax.map_pooling``, timm
  ``global_pool="map"``); any other name (``gem``, ``gmp``, ``attention``, a fork's) pools
  the patch grid the same way. The class token, when there is one, attends in every block
  but is never pooled (timm's convention).

``fc_norm`` (timm): the final LayerNorm moves after the pool. ``None`` follows timm: after
the pool for ``gap``, ``gmp`` and ``avgmax`` (timm's avg / max / avgmax), before it
otherwise (token, map and the rest).

Parameter names mirror timm, so its weights map with a rename (``blocks.3.attn.qkv`` ->
``blocks_3/attn/qkv``, ``attn_pool`` -> ``head/pool``, ``fc_norm`` -> ``head/fc_norm``,
``head`` -> ``head/classifier``; see ``gapjax.pretrained``) and the parameter counts equal
timm's ``vit_{tiny,small,base,large}_patch16_224`` for every pool / class-token choice.

The model contract (``gapjax.layers.Classifier``):

* ``forward_features(images) -> [B, gh, gw, C]``: the final (normed) patch tokens on their
  grid, for every pool except ``"token"``. The class token, if any, is dropped there: it
  attended in every block (so it shaped the patch tokens) but a pooling head does not read
  it (timm's convention).
* ``pool="token"``: the head reads the class token, which no grid of final patch tokens
  holds, and it reads the patches only through the last block's attention. So
  ``forward_features`` returns the tokens *entering the last block* on the grid,
  ``[B, gh, gw, 2C]``: channels ``[:C]`` the patch tokens, ``[C:]`` the class token
  repeated at every position; ``forward_head`` is the last block, the final norm, the
  class token and the classifier, and it reads the class token as a constant. The gradient
  of a logit with respect to these features is then zero on the class-token channels, so
  Grad-CAM on them (``gapjax.cam``, any gradient method) is Grad-CAM on the last block's
  patch tokens, pytorch-grad-cam's ViT recipe (``blocks[-1].norm1``'s input, class token
  dropped). ``__call__`` runs the plain forward pass (same logits, gradients reach the
  class token in training).
* ``head_class_maps`` (``gap``) and ``head_contributions`` (``gap``, pools with position or
  channel weights, and ``map``) give exact maps on the patch grid; ``attention_rollout``
  gives rollout maps for any ViT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.layers import Classifier, check_choice
from gapjax.map_pooling import LAYERNORM_EPSILON, MAPPool, MlpBlock, split_contributions
from gapjax.models import register_preset
from gapjax.pooling import POOLS, make_pool

Array = jax.Array

POSEMBS = ("learn", "sincos2d")
#: POOLS names after which timm puts the final norm (``fc_norm``) when ``fc_norm=None``.
FC_NORM_POOLS = ("gap", "gmp", "avgmax")


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def pair(value: Any, field: str) -> tuple[int, int]:
    """``224 -> (224, 224)``; a pair stays a pair. Raises naming ``field`` otherwise."""
    if isinstance(value, int | np.integer):
        return int(value), int(value)
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{field}={value!r} must be an int or a pair (height, width)")
    return values


def sincos_2d_posemb(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> Array:
    """Fixed 2-D sin-cos position embeddings ``[gh * gw, width]`` (float32), big_vision's.

    A quarter of the channels each: ``sin(x w), cos(x w), sin(y w), cos(y w)`` with
    frequencies ``w_d = temperature ** (-d / (width / 4 - 1))``, rows in row-major
    order of the grid. ``width`` must be divisible by 4.
    """
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4; got {width}")
    rows, cols = grid
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    y, x = np.mgrid[:rows, :cols]
    x_angles = np.einsum("m,d->md", x.reshape(-1), omega)
    y_angles = np.einsum("m,d->md", y.reshape(-1), omega)
    table = np.concatenate([np.sin(x_angles), np.cos(x_angles), np.sin(y_angles),
                            np.cos(y_angles)], axis=1)
    return jnp.asarray(table, jnp.float32)


def resample_pos_embed(posemb: Any, new_grid: tuple[int, int], *, num_prefix_tokens: int = 0,
                       old_grid: tuple[int, int] | None = None,
                       method: str = "bicubic", antialias: bool = True) -> np.ndarray:
    """Resizes learned position embeddings to another patch grid.

    ``posemb [1, P + gh * gw, C]`` (or without the leading 1) -> ``[1, P + nh * nw, C]``:
    the first ``num_prefix_tokens`` rows (class token) are kept, the patch rows are laid
    on their ``old_grid`` (default: the square one) and resized with
    ``jax.image.resize(method, antialias)`` (half-pixel centres, like PyTorch's
    ``interpolate(align_corners=False)``). Same grid: returned unchanged.
    """
    table = np.asarray(posemb, np.float32)
    table = table[0] if table.ndim == 3 else table
    prefix, patches = table[:num_prefix_tokens], table[num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(patches.shape[0])
        if side * side != patches.shape[0]:
            raise ValueError(f"resample_pos_embed: {patches.shape[0]} patch embeddings are "
                             "not a square grid; pass old_grid=(rows, cols)")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if math.prod(old_grid) != patches.shape[0]:
        raise ValueError(f"resample_pos_embed: old_grid={old_grid} does not hold "
                         f"{patches.shape[0]} patch embeddings")
    if old_grid != new_grid:
        grid = jnp.asarray(patches.reshape(*old_grid, -1))
        grid = jax.image.resize(grid, (*new_grid, grid.shape[-1]), method=method,
                                antialias=antialias)
        patches = np.asarray(grid, np.float32).reshape(math.prod(new_grid), -1)
    return np.concatenate([prefix, patches], axis=0)[None]


def attention_rollout(attentions: Array, num_prefix_tokens: int, grid: tuple[int, int],
                      readout: str = "token", residual: float = 0.5) -> Array:
    """Attention rollout (Abnar & Zuidema, 2020): how much each patch flows into the output.

    Args:
      attentions: ``[L, B, H, T, T]`` attention weights of every block (rows sum to 1),
        tokens ``T = num_prefix_tokens + gh * gw``, prefix first.
      num_prefix_tokens: class token count (0 or 1).
      grid: ``(gh, gw)``.
      readout: which output the map explains: ``"token"`` (the class token, row 0) or
        ``"mean"`` (the average of the patch tokens: GAP heads; a first approximation for
        other pools).
      residual: weight of the identity mixed into each layer, ``A' = residual I +
        (1 - residual) mean_heads(A)`` (the skip connection); rows stay stochastic.

    Returns:
      ``[B, gh, gw]`` float32: the rolled-out attention of the readout over the patches.
      Before dropping the prefix columns each rolled-out row sums to one.
    """
    check_choice("readout", readout, ("token", "mean"))
    if readout == "token" and num_prefix_tokens < 1:
        raise ValueError("attention_rollout: readout='token' needs a class token; "
                         "use readout='mean' for a model without one")
    attentions = jnp.asarray(attentions, jnp.float32)
    tokens = attentions.shape[-1]
    if tokens != num_prefix_tokens + math.prod(grid):
        raise ValueError(f"attention_rollout: {tokens} tokens do not match {num_prefix_tokens} "
                         f"prefix tokens + grid {tuple(grid)}")
    eye = jnp.eye(tokens, dtype=jnp.float32)
    mixed = residual * eye + (1.0 - residual) * attentions.mean(axis=2)  # [L, B, T, T]

    def step(rollout, layer):
        return jnp.einsum("bij,bjk->bik", layer, rollout), None

    start = jnp.broadcast_to(eye, mixed.shape[1:])
    rollout, _ = jax.lax.scan(step, start, mixed)  # later layers on the left
    if readout == "token":
        row = rollout[:, 0]
    else:
        row = rollout[:, num_prefix_tokens:].mean(axis=1)
    return row[:, num_prefix_tokens:].reshape(-1, *grid)


def grad_cam_map(features: Array, gradients: Array) -> Array:
    """Grad-CAM on a grid: ``relu(sum_c mean_ij(dy/dA_c) A_c)``, ``[B, gh, gw, C]`` twice
    -> ``[B, gh, gw]`` float32."""
    features = jnp.asarray(features, jnp.float32)
    alpha = jnp.asarray(gradients, jnp.float32).mean(axis=(1, 2), keepdims=True)
    return jax.nn.relu((features * alpha).sum(axis=-1))


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def layer_norm(dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention, timm's layout: fused ``qkv`` Dense, ``proj`` Dense.

    ``[B, T, C] -> [B, T, C]``; with ``return_weights`` also ``[B, H, T, T]`` float32.
    """

    num_heads: int
    qkv_bias: bool = True
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False,
                 return_weights: bool = False) -> Array | tuple[Array, Array]:
        batch, tokens, channels = x.shape
        heads = self.num_heads
        head_dim = channels // heads
        qkv = nn.Dense(3 * channels, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32) * head_dim**-0.5,
                            key.astype(jnp.float32))
        weights = jax.nn.softmax(scores, axis=-1)
        dropped = weights
        if self.attn_dropout > 0:
            dropped = nn.Dropout(self.attn_dropout, deterministic=not train)(weights)
        out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(value.dtype), value)
        out = nn.Dense(channels, dtype=self.dtype, name="proj")(out.reshape(batch, tokens,
                                                                            channels))
        if self.proj_dropout > 0:
            out = nn.Dropout(self.proj_dropout, deterministic=not train)(out)
        return (out, weights) if return_weights else out


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + dp(attn(norm1(x)))``, then ``x + dp(mlp(norm2(x)))``.

    ``dp`` is drop path (stochastic depth): during training each example's residual branch
    is dropped with probability ``drop_path`` and the kept ones scaled by ``1 / (1 - p)``.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False,
                 return_weights: bool = False) -> Array | tuple[Array, Array]:
        attn = Attention(self.num_heads, self.qkv_bias, self.attn_dropout, self.proj_dropout,
                         self.dtype, name="attn")
        y, weights = attn(layer_norm(self.dtype, "norm1")(x), train, return_weights=True)
        x = x + self._drop_path(y, train)
        width = x.shape[-1]
        y = MlpBlock(int(width * self.mlp_ratio), dropout=self.proj_dropout, dtype=self.dtype,
                     name="mlp")(layer_norm(self.dtype, "norm2")(x), train)
        x = x + self._drop_path(y, train)
        return (x, weights) if return_weights else x

    def _drop_path(self, y: Array, train: bool) -> Array:
        if self.drop_path <= 0:
            return y
        # One keep/drop draw per example: the mask broadcasts over tokens and channels.
        return nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)(y)


class ViTHead(nn.Module):
    """Pool (or the class token), optional ``fc_norm``, dropout, ``classifier`` Dense.

    ``__call__(features, train)``: ``features`` is the class token ``[B, C]`` for
    ``pool="token"``, else the patch grid ``[B, gh, gw, C]``; returns float32 logits.
    ``class_maps`` and ``contributions`` are the exact per-position maps (see ``ViT``).
    """

    num_classes: int
    pool: str = "token"
    fc_norm: bool = False
    dropout: float = 0.0
    pool_kwargs: Mapping[str, Any] | None = None
    dtype: Any = None

    def setup(self) -> None:
        if self.pool != "token":
            self.pool_module = make_pool(self.pool, dtype=self.dtype, name="pool",
                                         **dict(self.pool_kwargs or {}))
        if self.fc_norm:
            self.fc_norm_layer = layer_norm(self.dtype, name="fc_norm")
        self.head_dropout = nn.Dropout(self.dropout)
        self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")

    @property
    def weighting(self) -> str | None:
        """The pool's declared weighting (``"uniform"`` for gap); None for token / others."""
        if self.pool == "token":
            return None
        return POOLS.get(self.pool).weighting

    def pooled(self, features: Array) -> Array:
        """``[B, gh, gw, C]`` (or the class token ``[B, C]``) -> float32 ``[B, width]``."""
        if self.pool == "token":
            return features.astype(jnp.float32)
        return self.pool_module(features).astype(jnp.float32)

    def __call__(self, features: Array, train: bool = False) -> Array:
        pooled = self.pooled(features)
        if self.fc_norm:
            pooled = self.fc_norm_layer(pooled).astype(jnp.float32)
        pooled = self.head_dropout(pooled, deterministic=not train or self.dropout <= 0)
        return self.classifier(pooled)

    def _classifier_inputs(self, shares: Array, weights: Array, pooled: Array) -> Array:
        """Per-position shares of the classifier's input, float32 ``[B, *S, C]``.

        ``shares`` sum over positions to the pooled vector ``pooled``; ``weights``
        (``[B, *S, 1]`` or ``[B, *S, C]``) sum to one. Without ``fc_norm`` the shares are
        the inputs. With it, ``LayerNorm(sum_i c_i) = sum_i [(c_i - w_i mu) / sigma * scale
        + w_i bias]`` (``mu``, ``sigma`` of the pooled vector): the centring and the norm's
        bias are handed out by the weights, and the split stays exact.
        """
        shares = shares.astype(jnp.float32)
        if not self.fc_norm:
            return shares
        params = self.fc_norm_layer.variables["params"]
        pooled = pooled.astype(jnp.float32)
        mean = pooled.mean(axis=-1, keepdims=True)
        variance = jnp.square(pooled - mean).mean(axis=-1, keepdims=True)
        expand = (pooled.shape[0], *([1] * (shares.ndim - 2)), 1)
        # Shares of the centring and of the norm's bias: the weights normalised to sum to
        # one (gsp's weights are all ones).
        spatial = tuple(range(1, shares.ndim - 1))
        weights = weights.astype(jnp.float32)
        total = weights.sum(axis=spatial, keepdims=True)
        weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
        centred = shares - weights * mean.reshape(expand)
        scaled = centred * jax.lax.rsqrt(variance.reshape(expand) + LAYERNORM_EPSILON)
        return scaled * params["scale"] + weights * params["bias"]

    def _shares(self, features: Array) -> tuple[Array, Array, Array]:
        """``(pooled [B, C], shares [B, *S, C], weights)``: an exact split of the pooled
        vector over positions and the weights (summing to one) that hand out the rest."""
        weighting = self.weighting
        if isinstance(self.pool_module, MAPPool):
            pooled, parts = self.pool_module(features, return_parts=True)
            return pooled, split_contributions(parts), parts["alpha"].mean(axis=1)[..., None]
        if weighting is not None:
            pooled, weights = self.pool_module(features, return_weights=True)
            weights = weights.astype(jnp.float32)
            if weights.ndim == features.ndim - 1:  # position weights [B, *S]
                weights = weights[..., None]
            return pooled, weights * features.astype(jnp.float32), weights
        raise ValueError(f"pool {self.pool!r} declares no weights, so its logits do not split "
                         "into exact per-position contributions; use Grad-CAM")

    def class_maps(self, features: Array) -> Array:
        """CAM for a uniform (GAP) pool: ``[B, gh, gw, C] -> [B, gh, gw, K]`` with
        ``maps.mean((1, 2)) + classifier bias == logits`` exactly (eval mode)."""
        if self.weighting != "uniform":
            raise ValueError(f"class maps (CAM) need a uniform pool (pool='gap'); this head's "
                             f"pool is {self.pool!r}: use head_contributions or Grad-CAM")
        count = math.prod(features.shape[1:-1])
        return self.contributions(features) * count

    def contributions(self, features: Array) -> Array:
        """Per-position logit contributions ``[B, gh, gw, K]`` summing over positions to
        ``logits - classifier bias`` (eval mode); see ``ViT.head_contributions``."""
        if self.pool == "token":
            raise ValueError("the class-token head has no per-position contributions; "
                             "use Grad-CAM or attention rollout")
        pooled, shares, weights = self._shares(features)
        inputs = self._classifier_inputs(shares, weights, pooled)
        return inputs @ self.classifier.variables["params"]["kernel"]


class ViT(Classifier):
    """Vision Transformer: ``[B, H, W, C] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s ``num_classes``, ``dtype``, ``pool``, ``dropout``):
      pool: ``"token"`` (class token), ``"gap"``, ``"map"`` or any ``POOLS`` name.
      class_token: prepend a learned class token (required by ``pool="token"``).
      posemb: ``"learn"`` (``pos_embed`` parameter, covering the class token too, as timm)
        or ``"sincos2d"`` (fixed, patches only, as big_vision).
      image_size: input size the learned position embeddings are built for (int or
        pair); other sizes are an error (``gapjax.pretrained`` resamples on load).
      patch_size, width, depth, num_heads, mlp_ratio, qkv_bias: the architecture.
      drop_path: stochastic depth rate of the last block (linear from 0 at the first).
      attn_dropout / proj_dropout / pos_dropout: timm's attn_drop / proj_drop / pos_drop.
      dropout: dropout before the classifier (timm's drop_rate).
      fc_norm: final norm after the pool (True), before it (False), or timm's default.
      pool_kwargs: keyword arguments of the pool module (``map`` defaults to the model's
        ``num_heads`` and ``mlp_ratio``).
      head: only ``"gap"`` (the pool head); ``stem``, ``fc_widths``, ``fc_grid`` and
        ``axis_name`` are ``Classifier`` options without effect here (no BatchNorm).
    """

    pool: str = "token"
    class_token: bool = True
    posemb: str = "learn"
    image_size: Any = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    pos_dropout: float = 0.0
    fc_norm: bool | None = None

    # ----------------------------------------------------------------------------------
    # Options
    # ----------------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(gh, gw)`` of ``image_size``."""
        height, width = pair(self.image_size, "image_size")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image_size={self.image_size!r} must be divisible by "
                             f"patch_size={self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def uses_fc_norm(self) -> bool:
        if self.fc_norm is not None:
            return bool(self.fc_norm)
        return self.pool != "token" and POOLS.canonical(self.pool) in FC_NORM_POOLS

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """Exact maps the head supports (no variables needed): ``("cam", "contribution")``
        for gap, ``("contribution",)`` for map and for pools with position or channel
        weights, ``()`` for the class token and other pools (Grad-CAM, rollout)."""
        if self.pool == "token":
            return ()
        canonical = POOLS.canonical(self.pool)
        if canonical == "gap":
            return ("cam", "contribution")
        if canonical == "map":
            return ("contribution",)
        weighting = POOLS.get(self.pool).weighting
        return ("contribution",) if weighting in ("position", "channel") else ()

    def _check_options(self) -> None:
        check_choice("head", self.head, ("gap",))
        check_choice("posemb", self.posemb, POSEMBS)
        if self.pool != "token":
            POOLS.get(self.pool)  # unknown names list the registry's choices
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' reads the class token; set class_token=True or "
                             "pool to 'gap', 'map' or another POOLS name")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be at least 1")

    # ----------------------------------------------------------------------------------
    # Modules
    # ----------------------------------------------------------------------------------

    def setup(self) -> None:
        self._check_options()
        dtype = self.compute_dtype
        self.patch_embed = nn.Conv(
            self.width, (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size), padding="VALID", dtype=dtype,
            name="patch_embed",
        )
        if self.class_token:
            self.cls_token = self.param("cls_token", nn.initializers.zeros,
                                        (1, 1, self.width), jnp.float32)
        if self.posemb == "learn":
            tokens = self.num_prefix_tokens + math.prod(self.grid)
            self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                        (1, tokens, self.width), jnp.float32)
        self.pos_drop = nn.Dropout(self.pos_dropout)
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else [
            self.drop_path]
        self.blocks = [
            EncoderBlock(self.num_heads, self.mlp_ratio, self.qkv_bias, float(rate),
                         self.attn_dropout, self.proj_dropout, dtype, name=f"blocks_{index}")
            for index, rate in enumerate(rates)
        ]
        if not self.uses_fc_norm:
            self.norm = layer_norm(dtype, name="norm")
        pool_kwargs = dict(self.pool_kwargs or {})
        if self.pool != "token" and POOLS.canonical(self.pool) == "map":
            pool_kwargs.setdefault("num_heads", self.num_heads)
            pool_kwargs.setdefault("mlp_ratio", self.mlp_ratio)
        dropout = 0.0 if self.dropout is None else float(self.dropout)
        self.head_module = ViTHead(self.num_classes, self.pool, self.uses_fc_norm, dropout,
                                   pool_kwargs, dtype, name="head")

    # ----------------------------------------------------------------------------------
    # Forward passes
    # ----------------------------------------------------------------------------------

    def embed(self, images: Array, train: bool = False) -> Array:
        """Images ``[B, H, W, C]`` -> tokens ``[B, P + gh * gw, width]`` entering block 0."""
        if images.ndim != 4:
            raise ValueError(f"ViT expects images of shape [batch, height, width, channels]; "
                             f"got shape {tuple(images.shape)}")
        expected = pair(self.image_size, "image_size")
        if self.posemb == "learn" and tuple(images.shape[1:3]) != expected:
            raise ValueError(
                f"ViT built for image_size={expected} (learned position embeddings for a "
                f"{self.grid} patch grid) got images of size {tuple(images.shape[1:3])}; set "
                "image_size to the input size (gapjax.pretrained.load resamples the "
                "embeddings of saved weights)")
        dtype = self.compute_dtype
        patches = self.early_tap(self.patch_embed(jnp.asarray(images, dtype)))  # [B, gh, gw, C]
        batch, rows, cols, channels = patches.shape
        tokens = patches.reshape(batch, rows * cols, channels)
        if self.posemb == "sincos2d":
            tokens = tokens + sincos_2d_posemb((rows, cols), channels).astype(dtype)
        if self.class_token:
            cls = jnp.broadcast_to(self.cls_token.astype(dtype), (batch, 1, channels))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        if self.posemb == "learn":
            tokens = tokens + self.pos_embed.astype(dtype)
        return self.pos_drop(tokens, deterministic=not train or self.pos_dropout <= 0)

    def patch_grid(self, tokens: Array) -> Array:
        """``[B, P + gh * gw, C]`` tokens -> the patch tokens on their grid
        ``[B, gh, gw, C]`` (prefix tokens dropped)."""
        rows, cols = self._grid_of(tokens.shape[1] - self.num_prefix_tokens)
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.reshape(tokens.shape[0], rows, cols, tokens.shape[-1])

    def _grid_of(self, count: int) -> tuple[int, int]:
        rows, cols = self.grid
        if rows * cols == count:
            return rows, cols
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} patch tokens are not image_size={self.image_size!r}'s "
                             f"grid {self.grid}")
        return side, side

    def forward_features(self, images: Array, train: bool = False) -> Array:
        """What maps are computed on, on the patch grid.

        Pooling heads: the final patch tokens ``[B, gh, gw, C]`` (normed, unless
        ``fc_norm``). ``pool="token"``: ``[B, gh, gw, 2C]``, the tokens *entering the last
        block*: channels ``[:C]`` are the patch tokens, ``[C:]`` the class token repeated
        at every position (see the module docstring).
        """
        tokens = self.embed(images, train)
        if self.pool != "token":
            for block in self.blocks:
                tokens = block(tokens, train)
            if not self.uses_fc_norm:
                tokens = self.norm(tokens)
            return self.patch_grid(tokens)
        for block in self.blocks[:-1]:
            tokens = block(tokens, train)
        grid = self.patch_grid(tokens)
        cls = jnp.broadcast_to(tokens[:, 0, None, None, :], grid.shape)
        return jnp.concatenate([grid, cls], axis=-1)

    def forward_head(self, features: Array, train: bool = False) -> Array:
        """``forward_features``' output -> float32 logits ``[B, K]``.

        ``pool="token"``: the last block, the final norm, the class token, the classifier.
        The class token is read (from position (0, 0)) as a constant: the gradient of a
        logit with respect to ``features`` is the gradient with respect to the patch tokens
        alone, so Grad-CAM on these features is Grad-CAM on the last block's patch tokens.
        Training goes through ``__call__``, whose gradients do reach the class token.
        """
        if self.pool != "token":
            return self.head_module(features, train).astype(jnp.float32)
        if features.ndim != 4 or features.shape[-1] != 2 * self.width:
            raise ValueError(f"the class-token ViT's forward_head takes forward_features' "
                             f"[B, gh, gw, 2 * width = {2 * self.width}] features; got shape "
                             f"{tuple(features.shape)}")
        batch, rows, cols, _ = features.shape
        patches = features[..., :self.width].reshape(batch, rows * cols, self.width)
        cls = jax.lax.stop_gradient(features[:, 0, 0, self.width:])
        tokens = jnp.concatenate([cls[:, None], patches], axis=1)
        return self._token_logits(self.blocks[-1](tokens, train), train)

    def _token_logits(self, tokens: Array, train: bool) -> Array:
        return self.head_module(self.norm(tokens)[:, 0], train).astype(jnp.float32)

    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.pool != "token":
            return self.forward_head(self.forward_features(x, train), train)
        tokens = self.embed(x, train)
        for block in self.blocks:
            tokens = block(tokens, train)
        return self._token_logits(tokens, train)

    def head_class_maps(self, features: Array) -> Array:
        """CAM on the patch grid (``pool="gap"``): ``[B, gh, gw, C] -> [B, gh, gw, K]`` with
        ``maps.mean((1, 2)) + head/classifier/bias == logits`` (eval mode). With ``fc_norm``
        each position is normalised by the pooled vector's statistics and carries the norm's
        bias, so the identity stays exact."""
        self._check_grid_features(features, "head_class_maps")
        return self.head_module.class_maps(features)

    def head_contributions(self, features: Array) -> Array:
        """Per-position logit contributions ``[B, gh, gw, K]`` summing over the grid to
        ``logits - head/classifier/bias`` (eval mode): ``W . x_i / N`` for gap,
        ``w_i W . x_i`` for pools with position (or channel) weights, and for ``map`` the
        exact attention-path share plus the residual MLP apportioned by the head-averaged
        attention (``gapjax.map_pooling``). Raises ValueError for other heads."""
        self._check_grid_features(features, "head_contributions")
        if "contribution" not in self.map_kinds:
            raise ValueError(f"pool={self.pool!r} (fc_norm={self.uses_fc_norm}) has no exact "
                             "contribution maps; use Grad-CAM or attention rollout")
        return self.head_module.contributions(features)

    def _check_grid_features(self, features: Array, method: str) -> None:
        if self.pool == "token" or features.ndim != 4:
            raise ValueError(f"{method} needs the patch grid [B, gh, gw, C] of a pooling head; "
                             f"pool={self.pool!r} gives features of shape "
                             f"{tuple(features.shape)}")

    def forward_attention(self, images: Array) -> Array:
        """Attention weights of every block, ``[depth, B, heads, T, T]`` float32 (eval)."""
        tokens = self.embed(images, False)
        weights = []
        for block in self.blocks:
            tokens, block_weights = block(tokens, False, return_weights=True)
            weights.append(block_weights)
        return jnp.stack(weights)


# --------------------------------------------------------------------------------------
# Maps for any ViT
# --------------------------------------------------------------------------------------


def rollout_maps(model: ViT, variables: Any, images: Array, residual: float = 0.5) -> Array:
    """Attention rollout maps ``[B, gh, gw]`` of a ViT: the class token's for a model with
    one, the patch average's otherwise."""
    attentions = model.apply(variables, images, method="forward_attention")
    readout = "token" if model.class_token and model.pool == "token" else "mean"
    rows, cols = model.grid if model.posemb == "learn" else (
        images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
    return attention_rollout(attentions, model.num_prefix_tokens, (rows, cols), readout,
                             residual)


def grad_cam(model: ViT, variables: Any, images: Array,
             targets: Array | None = None) -> tuple[Array, Array]:
    """Grad-CAM on the patch tokens: ``(maps [B, gh, gw], logits [B, K])``.

    For ``pool="token"`` the features are the patch tokens entering the last block (the
    class token reads the patches only through the last block's attention); for a pooling
    head, the final patch grid. ``targets [B]`` default to the predicted classes.
    ``gapjax.cam.compute_maps(method="grad_cam", normalize=False, resize=None)`` gives the
    same maps through the model contract.
    """
    features = model.apply(variables, images, train=False, method="forward_features")

    def head(feats):
        return model.apply(variables, feats, train=False, method="forward_head")

    logits, pullback = jax.vjp(head, features)
    if targets is None:
        targets = jnp.argmax(logits, axis=-1)
    seed = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    (gradients,) = pullback(seed)
    if model.pool == "token":
        features, gradients = features[..., :model.width], gradients[..., :model.width]
    return grad_cam_map(features, gradients), logits


# --------------------------------------------------------------------------------------
# Presets: timm's vit_{tiny,small,base,large}_patch16_224
# --------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, int]] = {
    "ti": {"width": 192, "depth": 12, "num_heads": 3},
    "s": {"width": 384, "depth": 12, "num_heads": 6},
    "b": {"width": 768, "depth": 12, "num_heads": 12},
    "l": {"width": 1024, "depth": 24, "num_heads": 16},
}
#: gapjax preset name -> timm model name (the same architecture at patch 16, 224x224).
TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_l16": "vit_large_patch16_224",
}

for _size, _dims in SIZES.items():
    register_preset(
        f"vit_{_size}16", ViT, {**_dims, "patch_size": 16},
        f"ViT-{_size.upper()}/16 (width {_dims['width']}, depth {_dims['depth']}, "
        f"{_dims['num_heads']} heads); keyword arguments are ViT attributes: num_classes, "
        "pool ('token', 'gap', 'map', any POOLS name), class_token, posemb, image_size, "
        "drop_path, dropout, dtype, ...",
    )

__all__ = [
    "POSEMBS",
    "SIZES",
    "TIMM_NAMES",
    "Attention",
    "EncoderBlock",
    "ViT",
    "ViTHead",
    "attention_rollout",
    "grad_cam",
    "grad_cam_map",
    "pair",
    "resample_pos_embed",
    "rollout_maps",
    "sincos_2d_posemb",
]


# --------------------------------------------------------------------------------------
# Weights: timm's vit_*_patch16_* (gapjax.pretrained finds this layout in LAYOUTS)
# --------------------------------------------------------------------------------------
# gapjax names follow timm's module for module (blocks_3/attn/qkv <-> blocks.3.attn.qkv);
# the head is gathered under ``head``: head/classifier <-> head, head/fc_norm <-> fc_norm,
# head/pool (the MAP pool) <-> attn_pool. Learned position embeddings saved at another
# image size are resampled on load (``resample_pos_embed``). The block keeps its import so
# that it stays apart from the model code above.
from gapjax.models import layouts  # noqa: E402


class ResamplePosEmbed(layouts.Transform):
    """A ViT's learned ``pos_embed [1, P + n * n, C]``: identical when the file's grid is
    the model's; otherwise the ``num_prefix_tokens`` rows are kept and the patch rows
    resampled from the file's square grid to the model's."""

    def __init__(self, num_prefix_tokens: int):
        self.num_prefix_tokens = num_prefix_tokens
        self.name = f"pos_embed(prefix={num_prefix_tokens})"

    def adapt(self, tensor, shapes):
        want = tuple(shapes[0])
        if tensor.ndim != 3 or tensor.shape == want or tensor.shape[-1] != want[-1]:
            return tensor  # equal, or a mismatch the shape check reports
        patches = want[1] - self.num_prefix_tokens
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"pos_embed: resampling needs a square patch grid; the model has "
                             f"{patches} patches (image_size not square)")
        layouts.logger.warning("pos_embed: resampling %d position embeddings to %d (a %dx%d "
                               "grid)", tensor.shape[1] - self.num_prefix_tokens, patches,
                               side, side)
        return resample_pos_embed(tensor, (side, side), num_prefix_tokens=self.num_prefix_tokens)


_VIT_LAYOUT = layouts.Layout(source="timm", renames=(
    (r"^blocks_(\d+)", r"blocks.\1"), (r"^patch_embed$", "patch_embed/proj"),
    (r"^head/classifier$", "head"), (r"^head/fc_norm$", "fc_norm"), (r"^head/pool", "attn_pool")))


def _vit_tensors(shapes):
    prefix = 1 if "params/cls_token" in shapes else 0
    return [layouts.TorchTensor(row.key, row.leaves, ResamplePosEmbed(prefix))
            if row.leaves == ("params/pos_embed",) else row for row in _VIT_LAYOUT.tensors(shapes)]


layouts.LAYOUTS.add("vit_", layouts.Layout(
    source="timm", tensors_fn=_vit_tensors,
    torch_models="timm.create_model('vit_{tiny,small,base,large}_patch16_224', "
                 "global_pool='token'|'avg'|'map', class_token=..., img_size=...)"))
