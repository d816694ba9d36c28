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

It is registered as ``POOLS`` name ``"map"``, so it works wherever a pool does: the head
of a ViT over its patch tokens, a GAP-style image head on a CNN feature map
(``GAPHead(pool="map")``: positions ``[B, h, w, C]`` are the set), a padded point set
``[B, N, C]`` with a mask, and a graph readout (``Pool.segment``).

Parameter names follow timm's ``AttentionPoolLatent`` (``latent``, ``q``, ``kv``,
``proj``, ``norm``, ``mlp/fc1``, ``mlp/fc2``), so timm's ``attn_pool.*`` weights map one to
one; big_vision's ``MAPHead`` has the same structure (probe, attention, LayerNorm, MLP).

Exact per-position contributions (``contributions``). The attention path is linear in
the values once the attention weights are fixed: ``sum_h alpha[h, i] v_{h,i} W_o^h`` is
what position ``i`` adds to ``a``. The residual MLP is a function of the pooled ``a``, not
of any single position, so its output (and the projection bias) is apportioned to the
positions by the head-averaged attention weights ``w_i = mean_h alpha[h, i]``, which sum
to one. So

    c_i = sum_h alpha[h, i] v_{h,i} W_o^h + w_i (b_o + MLP(LayerNorm(a)))   and
    sum_i c_i = y  exactly.

The first term is the exact linear share of position ``i``; the second is a share of a
non-linear term, by a documented rule. Because ``sum_h alpha[h, i]`` is linear in ``v``,
a classifier ``logits = y W + b`` gets per-position logit contributions ``c_i W`` that sum
to ``logits - b``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax import pooling
from gapjax.pooling import POOLS, Pool

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
    return pooling.attention_weights(flat, flat_mask).reshape(batch, heads, count)


@POOLS.register("map")
class MAPPool(Pool):
    """Multihead attention pooling with a learned probe: ``[B, *S, C] -> [B, C]``.

    Attributes:
      num_heads: attention heads; ``C`` must be divisible by it. A ViT passes its own.
      mlp_ratio: hidden width of the residual MLP is ``int(C * mlp_ratio)``.
      qkv_bias: biases on the query and key/value projections.
      dtype: compute dtype of the projections; attention softmax and the pooled sums
        accumulate in float32.

    ``weighting`` is None: the pooled vector is not a weighted average of the inputs (the
    value projection and the residual MLP come after the weights), so the generic
    ``w_i x_i`` contribution rule does not apply. ``contributions`` gives the exact split
    instead (see the module docstring) and ``attention`` the weights ``[B, H, *S]``.
    """

    weighting: ClassVar[str | None] = None

    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dtype: Any = None

    def output_width(self, channels: int) -> int:
        return channels

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None,
                 return_parts: bool = False) -> Array | tuple[Array, dict[str, Array]]:
        """``x [B, *S, C]``, ``mask [B, *S]`` -> pooled ``[B, C]`` (input dtype; float32
        for integer inputs). A row without real positions pools to zeros.

        ``return_parts=True`` also returns the pieces the exact decomposition needs:
        ``alpha [B, H, *S]`` (float32), ``head_values [B, *S, H, C]`` (each position's
        value through its head's slice of the output projection, float32) and
        ``residual [B, C]`` (``b_o + MLP(LayerNorm(a))``, float32).
        """
        sets, flat_mask = pooling._as_sets(x, mask)
        batch, count, channels = sets.shape
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(
                f"map pool: channels={channels} must be divisible by num_heads="
                f"{self.num_heads}; set pool_kwargs num_heads to a divisor of {channels}"
            )
        heads, head_dim = self.num_heads, channels // self.num_heads
        # Zeroed so that padding (even inf) never reaches the projections' gradients.
        sets = pooling._zero_masked(sets, flat_mask)
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
        has_any = pooling._counts(sets, flat_mask) > 0  # [B, 1]
        pooled = jnp.where(has_any, pooled, 0.0)
        result = pooled.astype(pooling._result_dtype(jnp.asarray(x)))
        if not return_parts:
            return result
        kernel = proj.variables["params"]["kernel"].astype(jnp.float32)  # [C, C]
        bias = proj.variables["params"]["bias"].astype(jnp.float32)  # [C]
        head_values = jnp.einsum("bnhd,hdc->bnhc", values.astype(jnp.float32),
                                 kernel.reshape(heads, head_dim, channels))
        residual = jnp.where(has_any, bias + mlp_out.astype(jnp.float32), 0.0)
        spatial = jnp.shape(x)[1:-1]
        parts = {
            "alpha": alpha.reshape(batch, heads, *spatial),
            "head_values": head_values.reshape(batch, *spatial, heads, channels),
            "residual": residual,
        }
        return result, parts

    def attention(self, x: Array, mask: Array | None = None) -> Array:
        """The probe's attention weights ``[B, H, *S]`` (float32; each head sums to one
        over the real positions)."""
        return self(x, mask, return_parts=True)[1]["alpha"]

    def contributions(self, x: Array, mask: Array | None = None) -> tuple[Array, Array]:
        """Exact per-position split of the pooled vector: ``(pooled [B, C], c [B, *S, C])``
        with ``c.sum(spatial axes) == pooled`` (float32; see the module docstring).

        ``c_i = sum_h alpha[h, i] v_{h,i} W_o^h + mean_h(alpha[h, i]) (b_o + MLP(LN(a)))``.
        Masked positions contribute zero.
        """
        pooled, parts = self(x, mask, return_parts=True)
        return pooled, split_contributions(parts)


def split_contributions(parts: dict[str, Array]) -> Array:
    """The per-position contributions ``[B, *S, C]`` from ``MAPPool``'s ``return_parts``:
    the attention share ``sum_h alpha[h, i] head_values[i, h]`` plus the residual
    apportioned by the head-averaged weights. Sums over positions to the pooled vector."""
    alpha = parts["alpha"]  # [B, H, *S]
    spatial_axes = tuple(range(2, alpha.ndim))
    alpha_last = jnp.moveaxis(alpha, 1, -1)  # [B, *S, H]
    linear = jnp.einsum("...h,...hc->...c", alpha_last, parts["head_values"])
    share = alpha.mean(axis=1)  # [B, *S], sums to one per row (zero when empty)
    residual = parts["residual"].reshape(alpha.shape[0], *([1] * len(spatial_axes)), -1)
    return linear + share[..., None] * residual


__all__ = [
    "LAYERNORM_EPSILON",
    "MAPPool",
    "MlpBlock",
    "gelu",
    "multihead_attention_weights",
    "split_contributions",
]
