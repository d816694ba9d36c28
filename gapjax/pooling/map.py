"""Multihead attention pooling (MAP): a learned probe attends over the set.

MAP is the head of big_vision's ViTs and SigLIP ("MAPHead") and timm's
``global_pool="map"`` (``AttentionPoolLatent``). One learned query vector (the *probe*,
``latent``) attends over the set with multi-head dot-product attention; the attended
vector goes through an output projection and a pre-norm residual MLP:

    q   = latent W_q + b_q                                   [H, D]      (C = H * D)
    k_i, v_i = x_i W_kv + b_kv                               [H, D] each
    alpha[h, i] = softmax_i(q_h . k_{h,i} / sqrt(D))         over the real positions
    a   = sum_h sum_i alpha[h, i] v_{h,i} W_o^h + b_o        [C]   (W_o^h: rows h*D..(h+1)*D)
    y   = a + MLP(LayerNorm(a))                              [C]   (the pooled vector)

Registered as ``POOLS`` name ``"map"``, it works wherever a pool does: a ViT's head over
its patch tokens, a CNN's head over its feature map, a masked set ``[B, N, C]``, a graph
readout. Parameter names follow timm's ``AttentionPoolLatent`` (``latent``, ``q``, ``kv``,
``proj``, ``norm``, ``mlp/fc1``, ``mlp/fc2``), so timm's ``attn_pool.*`` weights map one to
one; big_vision's ``MAPHead`` has the same structure.

Exact per-position contributions (``contributions``). Once the attention weights are
fixed, ``sum_h alpha[h, i] v_{h,i} W_o^h`` is exactly what position ``i`` adds to ``a``. The
rest, ``b_o + MLP(LayerNorm(a))``, is a function of the pooled ``a``, not of any one
position, so it is handed out by the head-averaged attention ``w_i = mean_h alpha[h, i]``
(summing to one), a documented rule:

    c_i = sum_h alpha[h, i] v_{h,i} W_o^h + w_i (b_o + MLP(LayerNorm(a))),   sum_i c_i = y.

A classifier ``y W + b`` then gets per-position contributions ``c_i W`` summing to
``logits - b``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.pooling.base import POOLS, Contributions, Pool
from gapjax.pooling.functions import (
    as_sets,
    attention_weights,
    real_counts,
    result_dtype,
    zero_masked,
)

Array = jax.Array

#: LayerNorm epsilon of timm's and big_vision's ViTs (and their MAP heads).
LAYERNORM_EPSILON = 1e-6


def gelu(x: Array) -> Array:
    """The exact (erf) GELU of PyTorch's ``nn.GELU()`` and big_vision's ViTs."""
    return jax.nn.gelu(x, approximate=False)


class MlpBlock(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``[..., C] -> [..., out_features or C]`` with hidden width
    ``hidden``; timm's ``Mlp`` (names ``fc1``, ``fc2``). ``dropout`` after each Dense
    (timm's ``proj_drop``)."""

    hidden: int
    out_features: int | None = None
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        out = self.out_features or x.shape[-1]
        y = gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        if self.dropout > 0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.Dense(out, dtype=self.dtype, name="fc2")(y)
        if self.dropout > 0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return y


def multihead_attention_weights(queries: Array, keys: Array, mask: Array | None) -> Array:
    """Masked softmax attention of one query per head over a set.

    ``queries [H, D]`` (already scaled), ``keys [B, N, H, D]``, ``mask [B, N]`` ->
    ``alpha [B, H, N]`` float32, summing to one over the real positions of each row and
    head (all zeros for a row without real positions).
    """
    batch, count, heads = keys.shape[0], keys.shape[1], keys.shape[2]
    scores = jnp.einsum("hd,bnhd->bhn", queries.astype(jnp.float32), keys.astype(jnp.float32))
    flat = scores.reshape(batch * heads, count)
    flat_mask = None
    if mask is not None:
        flat_mask = jnp.broadcast_to(mask[:, None, :], (batch, heads, count))
        flat_mask = flat_mask.reshape(batch * heads, count)
    return attention_weights(flat, flat_mask).reshape(batch, heads, count)


@POOLS.register("map")
class MAPPool(Pool):
    """Multihead attention pooling with a learned probe: ``[B, *S, C] -> [B, C]``.

    Attributes:
      num_heads: attention heads; ``C`` must be divisible by it. A ViT passes its own.
      mlp_ratio: hidden width of the residual MLP is ``int(C * mlp_ratio)``.
      qkv_bias: biases on the query and key/value projections.
      dtype: compute dtype of the projections; attention softmax and the pooled sums
        accumulate in float32.

    ``weighting`` is None: the pooled vector is no weighted average of the inputs (the
    value projection and the residual MLP come after the weights), so ``contributions``
    is its own (see the module docstring); ``attention`` gives the weights ``[B, H, *S]``.
    """

    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None,
                 return_parts: bool = False) -> Array | tuple[Array, dict[str, Array]]:
        """``x [B, *S, C]``, ``mask [B, *S]`` -> pooled ``[B, C]`` (input dtype; float32
        for integer inputs). A row without real positions pools to zeros.

        ``return_parts=True`` also returns ``(alpha [B, H, *S], Contributions)``.
        """
        sets, flat_mask = as_sets(x, mask)
        batch, count, channels = sets.shape
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(
                f"map pool: channels={channels} must be divisible by num_heads="
                f"{self.num_heads}; set pool_kwargs num_heads to a divisor of {channels}"
            )
        heads, head_dim = self.num_heads, channels // self.num_heads
        # Zeroed so that padding (even inf) never reaches the projections' gradients.
        sets = zero_masked(sets, flat_mask)
        latent = self.param("latent", nn.initializers.truncated_normal(channels**-0.5),
                            (1, 1, channels), jnp.float32)
        query = nn.Dense(channels, use_bias=self.qkv_bias, dtype=self.dtype, name="q")(latent)
        query = query.reshape(heads, head_dim).astype(jnp.float32) * head_dim**-0.5
        key_value = nn.Dense(2 * channels, use_bias=self.qkv_bias, dtype=self.dtype,
                             name="kv")(sets)
        key_value = key_value.reshape(batch, count, 2, heads, head_dim)
        keys, values = key_value[:, :, 0], key_value[:, :, 1]
        alpha = multihead_attention_weights(query, keys, flat_mask)  # [B, H, N]
        attended = jnp.einsum("bhn,bnhd->bhd", alpha, values.astype(jnp.float32))
        proj = nn.Dense(channels, dtype=self.dtype, name="proj")
        pooled_attention = proj(attended.reshape(batch, channels)).astype(jnp.float32)
        normed = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype,
                              name="norm")(pooled_attention)
        mlp_out = MlpBlock(int(channels * self.mlp_ratio), dtype=self.dtype, name="mlp")(normed)
        pooled = pooled_attention + mlp_out.astype(jnp.float32)
        has_any = real_counts(sets, flat_mask) > 0  # [B, 1]
        pooled = jnp.where(has_any, pooled, 0.0)
        result = pooled.astype(result_dtype(jnp.asarray(x)))
        if not return_parts:
            return result
        # Position i's share of the attention path, sum_h alpha[h, i] v_{h,i} W_o^h, and of
        # the rest (b_o + MLP), handed out by the head-averaged attention.
        kernel = proj.variables["params"]["kernel"].astype(jnp.float32)
        linear = jnp.einsum("bhn,bnhd,hdc->bnc", alpha, values.astype(jnp.float32),
                            kernel.reshape(heads, head_dim, channels))
        share = alpha.mean(axis=1)[..., None]  # [B, N, 1]: sums to one (zero when empty)
        residual = proj.variables["params"]["bias"].astype(jnp.float32) + mlp_out.astype(
            jnp.float32)
        shares = linear + share * jnp.where(has_any, residual, 0.0)[:, None]
        spatial = jnp.shape(x)[1:-1]
        return result, (alpha.reshape(batch, heads, *spatial), Contributions(
            shares.reshape(batch, *spatial, channels), share.reshape(batch, *spatial, 1)))

    def attention(self, x: Array, mask: Array | None = None) -> Array:
        """The probe's attention weights ``[B, H, *S]`` (float32; each head sums to one
        over the real positions)."""
        return self(x, mask, return_parts=True)[1][0]

    def contributions(self, x: Array, mask: Array | None = None) -> Contributions:
        """The exact split of the pooled vector (see the module docstring): shares
        ``c_i = sum_h alpha[h, i] v_{h,i} W_o^h + w_i (b_o + MLP(LN(a)))`` and weights
        ``w_i = mean_h alpha[h, i]`` (float32; masked positions hold 0)."""
        return self(x, mask, return_parts=True)[1][1]


__all__ = [
    "LAYERNORM_EPSILON",
    "MAPPool",
    "MlpBlock",
    "gelu",
    "multihead_attention_weights",
]
