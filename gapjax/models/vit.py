"""Vision Transformers whose head is a class token, GAP, MAP or any ``POOLS`` pool.

Layout (ViT, Dosovitskiy et al. 2021; timm's ``VisionTransformer``): a strided
convolution embeds ``patch_size`` x ``patch_size`` patches (``patch_embed``), an optional
class token is prepended (``cls_token``), position embeddings are added (learned
``pos_embed``, or big_vision's fixed 2-D sin-cos), then ``depth`` pre-norm encoder blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, with drop path), a final LayerNorm and the
head: ``gapjax.layers.GAPHead``, as in every classifier. Its pool reads the patch tokens on
their grid ``[B, gh, gw, C]`` (``gap`` = timm ``global_pool="avg"``, ``map``, ``gem``, a
fork's, ...; a class token attends in every block but is not pooled, timm's convention),
or, for a pool that ``reads_class_token`` (``token``), all tokens, class token first.
``fc_norm`` moves the final norm after the pool; ``None`` follows timm: after the pools
that are means or maxima of the patches (weighting ``"uniform"`` or ``"channel"``: gap,
gmp, avgmax), before it otherwise.

Parameter names mirror timm (``blocks.3.attn.qkv`` -> ``blocks_3/attn/qkv``, ``attn_pool``
-> ``head/pool``, ``fc_norm`` -> ``head/fc_norm``, ``head`` -> ``head/classifier``; see
``gapjax.pretrained``), and the parameter counts equal timm's
``vit_{tiny,small,base,large}_patch16_224`` for every pool / class-token choice.

The model contract (``gapjax.layers.Classifier``): ``forward_features(images)`` is what
the head pools, the final (normed) patch tokens ``[B, gh, gw, C]``, with the head's exact
maps (``map_kinds``). A class-token head reads the patches only through the last block's
attention, so there ``forward_features`` returns the tokens *entering the last block*,
``[B, gh, gw, 2C]`` (channels ``[:C]`` the patch tokens, ``[C:]`` the class token repeated)
and ``forward_head`` runs the last block, the final norm and the head, reading the class
token as a constant: the gradient with respect to the features is zero on its channels,
so ``gapjax.cam``'s gradient methods work on the last block's patch tokens
(pytorch-grad-cam's ViT recipe) and ``map_kinds`` is empty. ``__call__`` is the plain
forward pass (same logits; gradients reach the class token). ``forward_attention`` gives
every block's attention and the head's readout, for ``gapjax.cam``'s ``rollout``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.layers import Classifier, check_choice
from gapjax.models import register_preset
from gapjax.pooling import POOLS
from gapjax.pooling.map import LAYERNORM_EPSILON, MlpBlock

Array = jax.Array

POSEMBS = ("learn", "sincos2d")


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


class ViT(Classifier):
    """Vision Transformer: ``[B, H, W, C] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s ``num_classes``, ``dtype``, ``pool``, ``dropout``):
      pool: any ``POOLS`` name: ``"token"`` (the class token), ``"gap"``, ``"map"``, ...
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
      pool_kwargs: keyword arguments of the pool module (a pool with ``num_heads`` /
        ``mlp_ratio`` options, ``map``, defaults them to the model's).
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
    def reads_class_token(self) -> bool:
        """Whether the head's pool reads the class token (then the head gets every token)."""
        return POOLS.get(self.pool).reads_class_token

    @property
    def uses_fc_norm(self) -> bool:
        if self.fc_norm is not None:
            return bool(self.fc_norm)
        return POOLS.get(self.pool).weighting in ("uniform", "channel")

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """The head's exact maps on the patch grid (no variables needed); none for a head
        that reads the class token (Grad-CAM, rollout)."""
        return () if self.reads_class_token else super().map_kinds

    def head_options(self) -> dict[str, Any]:
        pool_kwargs = dict(self.pool_kwargs or {})
        fields = POOLS.get(self.pool).__dataclass_fields__
        for key in ("num_heads", "mlp_ratio"):
            if key in fields:
                pool_kwargs.setdefault(key, getattr(self, key))
        return {"norm": self.uses_fc_norm, "pool_kwargs": pool_kwargs}

    def _check_options(self) -> None:
        check_choice("head", self.head, ("gap",))
        check_choice("posemb", self.posemb, POSEMBS)
        if self.reads_class_token and not self.class_token:
            raise ValueError(f"pool={self.pool!r} reads the class token; set class_token=True "
                             "or choose a pool of the patch tokens")
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
        self.head_module = self.make_head()

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

    def encode(self, tokens: Array, train: bool, start: int = 0, stop: int | None = None,
               return_weights: bool = False) -> Array | tuple[Array, list[Array]]:
        """Runs ``blocks[start:stop]`` on ``tokens [B, T, C]``, then the final norm when
        they reach the last block (unless ``fc_norm``); with ``return_weights`` also the
        blocks' attention weights ``[B, H, T, T]``."""
        weights = []
        for block in self.blocks[start:stop]:
            tokens, block_weights = block(tokens, train, return_weights=True)
            weights.append(block_weights)
        if (stop is None or stop >= self.depth) and not self.uses_fc_norm:
            tokens = self.norm(tokens)
        return (tokens, weights) if return_weights else tokens

    def _head_inputs(self, tokens: Array) -> Array:
        return tokens if self.reads_class_token else self.patch_grid(tokens)

    def __call__(self, x: Array, train: bool = False) -> Array:
        tokens = self.encode(self.embed(x, train), train)
        return self.head_module(self._head_inputs(tokens), train).astype(jnp.float32)

    def forward_features(self, images: Array, train: bool = False) -> Array:
        """What maps are computed on, on the patch grid: the final patch tokens
        ``[B, gh, gw, C]`` (normed, unless ``fc_norm``); for a head that reads the class
        token, ``[B, gh, gw, 2C]``: the tokens *entering the last block*, channels
        ``[:C]`` the patch tokens, ``[C:]`` the class token repeated (module docstring)."""
        last = self.depth - 1 if self.reads_class_token else None
        tokens = self.encode(self.embed(images, train), train, stop=last)
        grid = self.patch_grid(tokens)
        if not self.reads_class_token:
            return grid
        return jnp.concatenate([grid, jnp.broadcast_to(tokens[:, 0, None, None], grid.shape)],
                               axis=-1)

    def forward_head(self, features: Array, train: bool = False) -> Array:
        """``forward_features``' output -> float32 logits ``[B, K]``. A class-token head
        reads the class token (at position (0, 0)) as a constant: the gradient with respect
        to ``features`` is that with respect to the patch tokens alone."""
        if not self.reads_class_token:
            return self.head_module(features, train).astype(jnp.float32)
        if features.ndim != 4 or features.shape[-1] != 2 * self.width:
            raise ValueError(f"pool={self.pool!r}: forward_head takes forward_features' "
                             f"[B, gh, gw, 2 * width = {2 * self.width}] features; got shape "
                             f"{tuple(features.shape)}")
        batch, rows, cols, _ = features.shape
        patches = features[..., :self.width].reshape(batch, rows * cols, self.width)
        cls = jax.lax.stop_gradient(features[:, :1, 0, self.width:])
        tokens = self.encode(jnp.concatenate([cls, patches], axis=1), train, self.depth - 1)
        return self.head_module(tokens, train).astype(jnp.float32)

    def head_class_maps(self, features: Array) -> Array:
        """The head's class maps on the patch grid ``[B, gh, gw, K]`` (uniform pools:
        ``maps.mean((1, 2)) + bias == logits``, eval mode)."""
        return self._head_maps(features, "class_maps")

    def head_contributions(self, features: Array) -> Array:
        """The head's contributions ``[B, gh, gw, K]``, summing over the grid to
        ``logits - bias`` (eval mode; ``gapjax.layers.GAPHead``)."""
        return self._head_maps(features, "contributions")

    def _head_maps(self, features: Array, output: str) -> Array:
        if self.reads_class_token:
            raise ValueError(f"pool={self.pool!r} reads the class token after the last block, "
                             f"so the head has no exact {output} on the patch grid; use "
                             "method='grad_cam' or 'rollout'")
        return self.head_module(features, output=output)

    def forward_attention(self, images: Array) -> tuple[Array, Array]:
        """``(attentions [depth, B, heads, T, T], readout [B, T])`` (float32, eval mode):
        every block's attention over the ``T = P + gh * gw`` tokens (prefix first, then the
        patch grid row-major) and the weights with which the head reads the final tokens:
        the class token, or the mean of the patch tokens (a first approximation for
        weighted pools)."""
        tokens, weights = self.encode(self.embed(images, False), False, return_weights=True)
        count = tokens.shape[1]
        if self.reads_class_token:
            readout = jnp.zeros((count,), jnp.float32).at[0].set(1.0)
        else:
            patches = jnp.arange(count) >= self.num_prefix_tokens
            readout = patches / (count - self.num_prefix_tokens)
        return jnp.stack(weights), jnp.broadcast_to(readout, (tokens.shape[0], count))


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
    "pair",
    "resample_pos_embed",
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
