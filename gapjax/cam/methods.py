"""The CAM family as pure functions, and the one registry that names them.

Every method turns a classifier's pre-pool features ``A [B, *S, C]`` into one map per image
and target class. Most are a weighted sum over channels, ``map = sum_c terms[..., c]``, and
differ only in the per-channel (or per-position) weights:

==============  =======================================================================
method          channel terms, ``g`` = d(target logit) / dA, sums over positions ``i``
==============  =======================================================================
``grad_cam``    ``mean_i(g_c) A_ic`` (Selvaraju et al. 2017)
``hires_cam``   ``g_ic A_ic`` (Draelos and Carin 2020)
``grad_cam_pp`` ``sum_i(relu(g_ic) a_ic) A_ic``, ``a = g^2 / (2 g^2 + sum_i(A_ic) g^3)``
                (Chattopadhyay et al. 2018, closed form for an exponential score)
``xgrad_cam``   ``sum_i(g_ic A_ic / sum_j A_jc) A_ic`` (Fu et al. 2020)
``layer_cam``   ``relu(g_ic) A_ic`` (Jiang et al. 2021)
``score_cam``   ``softmax_c(score(image * up(A_c)))_c A_ic``, one forward pass of the
                whole model per channel (Wang et al. 2020)
``ablation_cam`` ``(s - s_without_c) / s * A_ic``, one head pass per channel with channel
                ``c`` zeroed (Desai and Ramaswamy 2020)
``eigen_cam``   projection of ``A`` on its first principal component (Muhammad and Yeasin
                2020); no gradients, no class
==============  =======================================================================

plus the exact maps of the model contract (``cam``: ``W_k . x_i`` of a uniform pool,
``contribution``: the pool's per-position contributions that sum to the logit) and
``rollout`` (Abnar and Zuidema 2020) for models that expose their attention.
The constants (``1e-6``, ``1e-7``, ``1e-8``) and the bilinear upsampling with aligned
corners are those of pytorch-grad-cam 1.5.7, against which ``tests/test_cam_reference.py``
checks every shared method; docs/cam.md lists where gapjax deliberately differs.

Layout: ``features [B, *S, C]``, ``gradients [B, T, *S, C]`` (one per target), channel
terms ``[B, T, *S, C]`` and maps ``[B, T, *S]`` (float32). Nothing here loops in Python over
images, positions or channels: Score-CAM and Ablation-CAM run their per-channel passes as
batched model calls over chunks of channels (``jax.lax.map``), so each compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gapjax.layers import project
from gapjax.registry import Registry

Array = jax.Array

#: pytorch-grad-cam's constants, kept so the maps agree with the reference to rounding.
GRAD_CAM_PP_EPS = 1e-6
XGRAD_CAM_EPS = 1e-7
SCORE_CAM_EPS = 1e-8
#: Channels per batched model call in Score-CAM and Ablation-CAM.
DEFAULT_CHANNEL_CHUNK = 64

_EXACT = jax.lax.Precision.HIGHEST


def _as_float(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def _features(features: Array, dtype: Any = jnp.float32) -> Array:
    """``features`` as an array of ``dtype`` (None: its own), checked to be ``[B, *S, C]``."""
    features = jnp.asarray(features, dtype)
    if features.ndim < 3:
        raise ValueError("features must have shape [batch, *spatial, channels] (e.g. "
                         f"[B, h, w, C]); got shape {tuple(features.shape)}")
    return features


def _pair(features: Array, gradients: Array) -> tuple[Array, Array]:
    """Float32 ``features [B, *S, C]`` and ``gradients [B, T, *S, C]``, shapes checked."""
    features, gradients = _features(features), _as_float(gradients)
    expected = (features.shape[0], gradients.shape[1] if gradients.ndim else 0,
                *features.shape[1:])
    if gradients.ndim != features.ndim + 1 or tuple(gradients.shape) != expected:
        raise ValueError(
            f"gradients must have shape [batch, targets, *spatial, channels] = "
            f"[{features.shape[0]}, T, {', '.join(map(str, features.shape[1:]))}]; got "
            f"{tuple(gradients.shape)}"
        )
    return features, gradients


def _positions(x: Array, leading: int) -> tuple[int, ...]:
    """The spatial axes of ``x [*leading, *S, C]``."""
    return tuple(range(leading, x.ndim - 1))


# --------------------------------------------------------------------------------------
# The exact map of a GAP head
# --------------------------------------------------------------------------------------


def class_activation_map(features: Array, kernel: Array, bias: Array | None = None) -> Array:
    """CAM of a GAP + dense head: ``[B, h, w, C], [C, K] -> [B, h, w, K]`` (float32).

    ``maps[b, i, j, k] = W[:, k] . features[b, i, j]`` (``gapjax.layers.project``), so for
    a head computing ``logits = mean_ij(features) @ W + bias``, ``maps.mean((1, 2)) + bias
    == logits`` up to float rounding (any spatial shape, square or not).

    ``bias [K]`` is accepted so the Dense parameters can be passed whole
    (``class_activation_map(f, **params["head"]["classifier"])``); it is checked for shape
    and deliberately not added: a constant shift says nothing about location.
    """
    features, kernel = _features(features, None), jnp.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] != features.shape[-1]:
        raise ValueError(
            f"kernel must have shape [channels, classes] = [{features.shape[-1]}, K] to "
            f"match features of shape {tuple(features.shape)}; got {tuple(kernel.shape)}")
    if bias is not None and tuple(jnp.shape(bias)) != (kernel.shape[1],):
        raise ValueError(f"bias must have shape [classes] = [{kernel.shape[1]}]; got "
                         f"{tuple(jnp.shape(bias))}")
    return project(features, kernel)


# --------------------------------------------------------------------------------------
# Gradient methods: channel terms [B, T, *S, C] from features and gradients
# --------------------------------------------------------------------------------------


def grad_cam_terms(features: Array, gradients: Array) -> Array:
    """Grad-CAM: ``mean_i(g_ic) * A_ic``; ``[B, *S, C], [B, T, *S, C] -> [B, T, *S, C]``."""
    features, gradients = _pair(features, gradients)
    alpha = gradients.mean(axis=_positions(gradients, 2), keepdims=True)
    return alpha * features[:, None]


def hires_cam_terms(features: Array, gradients: Array) -> Array:
    """HiResCAM: ``g_ic * A_ic`` (element-wise, no averaging); shapes as ``grad_cam_terms``.

    Summed over channels and positions it is the first-order Taylor term of the logit."""
    features, gradients = _pair(features, gradients)
    return gradients * features[:, None]


def grad_cam_pp_terms(features: Array, gradients: Array) -> Array:
    """Grad-CAM++: channel weights ``sum_i relu(g_ic) a_ic`` with
    ``a_ic = g_ic^2 / (2 g_ic^2 + sum_j(A_jc) g_ic^3 + 1e-6)`` (0 where ``g_ic == 0``), the
    closed form of Chattopadhyay et al. eq. 19; shapes as ``grad_cam_terms``."""
    features, gradients = _pair(features, gradients)
    axes = _positions(gradients, 2)
    square = gradients**2
    total = features.sum(axis=_positions(features, 1), keepdims=True)[:, None]
    alpha = square / (2 * square + total * square * gradients + GRAD_CAM_PP_EPS)
    alpha = jnp.where(gradients != 0, alpha, 0.0)
    weights = (jax.nn.relu(gradients) * alpha).sum(axis=axes, keepdims=True)
    return weights * features[:, None]


def xgrad_cam_terms(features: Array, gradients: Array) -> Array:
    """XGrad-CAM: channel weights ``sum_i g_ic A_ic / (sum_j A_jc + 1e-7)``; shapes as
    ``grad_cam_terms``."""
    features, gradients = _pair(features, gradients)
    total = features.sum(axis=_positions(features, 1), keepdims=True)
    share = (features / (total + XGRAD_CAM_EPS))[:, None]
    weights = (gradients * share).sum(axis=_positions(gradients, 2), keepdims=True)
    return weights * features[:, None]


def layer_cam_terms(features: Array, gradients: Array) -> Array:
    """LayerCAM: ``relu(g_ic) * A_ic``; shapes as ``grad_cam_terms``."""
    features, gradients = _pair(features, gradients)
    return jax.nn.relu(gradients) * features[:, None]


def grad_cam_from_gradients(features: Array, gradients: Array, relu: bool = True) -> Array:
    """Grad-CAM from features and the target logit's gradient: ``[B, *S, C] -> [B, *S]``.

    Channel weights are the gradients averaged over positions,
    ``alpha_c = mean_i d logit / d x_ic``, and the map is ``sum_c alpha_c x_ic``, passed
    through a ReLU when ``relu`` (Selvaraju et al.). For a GAP + dense head
    ``alpha_c = W_ck / N``, so the map is the CAM divided by ``N`` (then ReLU'd). The
    ``grad_cam`` method of ``compute_maps`` computes the gradients itself.
    """
    features, gradients = _as_float(features), _as_float(gradients)
    if features.shape != gradients.shape:
        raise ValueError(f"gradients must have the shape of features {tuple(features.shape)}; "
                         f"got {tuple(gradients.shape)}")
    maps = grad_cam_terms(features, gradients[:, None])[:, 0].sum(axis=-1)
    return jax.nn.relu(maps) if relu else maps


# --------------------------------------------------------------------------------------
# Principal-component projection (Eigen-CAM and eigen smoothing)
# --------------------------------------------------------------------------------------


def principal_projection(terms: Array, spatial_ndim: int) -> Array:
    """Projection of ``terms [..., *S, C]`` on their first principal component: ``[..., *S]``.

    Per leading index, the ``N = prod(S)`` positions are rows of an ``[N, C]`` matrix,
    centred over positions; the map is that matrix times its first right singular vector
    (pytorch-grad-cam's ``get_2d_projection``). A singular vector's sign is arbitrary, so
    the sign is fixed here: the projection correlates non-negatively with the plain channel
    sum ``terms.sum(-1)`` (the unsmoothed map), which makes the result deterministic and
    keeps eigen smoothing from turning a map upside down. Non-finite entries count as 0.
    """
    terms = _as_float(terms)
    spatial = terms.shape[terms.ndim - 1 - spatial_ndim:-1]
    leading = terms.shape[: terms.ndim - 1 - spatial_ndim]
    rows = jnp.where(jnp.isfinite(terms), terms, 0.0).reshape(
        *leading, int(np.prod(spatial)), terms.shape[-1])
    centred = rows - rows.mean(axis=-2, keepdims=True)
    _, _, right = jnp.linalg.svd(centred, full_matrices=False)
    projection = jnp.einsum("...nc,...c->...n", centred, right[..., 0, :], precision=_EXACT)
    plain = rows.sum(axis=-1)
    agreement = ((plain - plain.mean(axis=-1, keepdims=True)) * projection).sum(-1)
    sign = jnp.where(agreement < 0, -1.0, 1.0)[..., None]
    return (sign * projection).reshape(*leading, *spatial)


def eigen_cam_map(features: Array) -> Array:
    """Eigen-CAM: ``features [B, *S, C] -> [B, *S]``, the first principal component of the
    features (class-agnostic; see ``principal_projection`` for the sign)."""
    features = _features(features)
    return principal_projection(features, features.ndim - 2)


def reduce_terms(terms: Array, spatial_ndim: int, eigen_smooth: bool = False) -> Array:
    """Channel terms ``[..., *S, C]`` to maps ``[..., *S]``: their sum, or with
    ``eigen_smooth`` their first principal component (pytorch-grad-cam's ``eigen_smooth``)."""
    if eigen_smooth:
        return principal_projection(terms, spatial_ndim)
    return _as_float(terms).sum(axis=-1)


# --------------------------------------------------------------------------------------
# Perturbation methods: batched model calls over chunks of channels
# --------------------------------------------------------------------------------------


def align_corners_matrix(size_in: int, size_out: int) -> Array:
    """``[size_out, size_in]`` linear interpolation with aligned corners (the first and last
    samples sit on the first and last pixels), as ``torch.nn.UpsamplingBilinear2d``."""
    if size_in == 1 or size_out == 1:
        positions = np.zeros(size_out)
    else:
        positions = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    low = np.clip(np.floor(positions).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = positions - low
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return jnp.asarray(matrix)


def _chunked(values: Array, chunk: int, fill: float) -> tuple[Array, int]:
    """``values [N, ...]`` padded with ``fill`` to ``[n_chunks, chunk, ...]``."""
    count = values.shape[0]
    chunk = max(1, min(int(chunk), count))
    padded = -(-count // chunk) * chunk
    values = jnp.concatenate(
        [values, jnp.full((padded - count, *values.shape[1:]), fill, values.dtype)])
    return values.reshape(padded // chunk, chunk, *values.shape[1:]), chunk


def _map_chunks(scores_of: Callable[[Array], Array], chunks: Array,
                on_chunk: Callable[[int, int], None] | None) -> Array:
    """``jax.lax.map(scores_of, chunks)``; with ``on_chunk``, each finished chunk calls
    ``on_chunk(index, n_chunks)`` on the host (ordered), for progress on long maps."""
    if on_chunk is None:
        return jax.lax.map(scores_of, chunks)
    count = chunks.shape[0]

    def report(index: Array) -> None:
        on_chunk(int(index), count)

    def scores_and_report(item: tuple[Array, Array]) -> Array:
        index, values = item
        scores = scores_of(values)
        jax.debug.callback(report, index, ordered=True)
        return scores

    return jax.lax.map(scores_and_report, (jnp.arange(count), chunks))


def _pick(scores: Array, targets: Array) -> Array:
    """``scores [B, N, K]``, ``targets [B, T]`` -> ``[B, T, N]``."""
    picked = jnp.take_along_axis(scores, targets[:, None, :].astype(jnp.int32), axis=-1)
    return jnp.swapaxes(picked, 1, 2)


def score_cam_weights(
    features: Array,
    images: Array,
    targets: Array,
    model_fn: Callable[[Array], Array],
    channel_chunk: int = DEFAULT_CHANNEL_CHUNK,
    on_chunk: Callable[[int, int], None] | None = None,
) -> Array:
    """Score-CAM channel weights ``[B, T, C]``.

    Each channel ``A_c`` of ``features [B, h, w, C]`` is upsampled to the image size
    (bilinear, aligned corners), min-max scaled to ``[0, 1]`` (``+1e-8`` in the
    denominator), multiplied into ``images [B, H, W, Cin]``, and the masked image scored by
    ``model_fn(images) -> logits [n, K]``; the weights are the softmax over channels of the
    target logits (``targets [B, T]``). The ``B * C`` forward passes run as
    ``ceil(C / channel_chunk)`` batched calls of ``B * channel_chunk`` images; ``on_chunk``
    (optional) is called on the host with ``(index, n_chunks)`` as each call finishes.
    """
    features, images = _as_float(features), jnp.asarray(images)
    if features.ndim != 4 or images.ndim != 4:
        raise ValueError(
            "score_cam needs features [B, h, w, C] and images [B, H, W, Cin]; got "
            f"{tuple(features.shape)} and {tuple(images.shape)}"
        )
    batch, height, width = images.shape[:3]
    channels = features.shape[-1]
    per_channel = jnp.moveaxis(features, -1, 0)  # [C, B, h, w]
    chunks, chunk = _chunked(per_channel, channel_chunk, 0.0)
    rows = align_corners_matrix(features.shape[1], height)
    cols = align_corners_matrix(features.shape[2], width)

    def scores_of(maps: Array) -> Array:  # [chunk, B, h, w] -> [B, chunk, K]
        up = jnp.einsum("Hh,Ww,nbhw->bnHW", rows, cols, maps, precision=_EXACT)
        low = up.min(axis=(2, 3), keepdims=True)
        high = up.max(axis=(2, 3), keepdims=True)
        masks = (up - low) / (high - low + SCORE_CAM_EPS)
        masked = images[:, None] * masks[..., None].astype(images.dtype)
        logits = model_fn(masked.reshape(batch * chunk, *images.shape[1:]))
        return jnp.asarray(logits, jnp.float32).reshape(batch, chunk, -1)

    scores = _map_chunks(scores_of, chunks, on_chunk)  # [n, B, chunk, K]
    scores = jnp.moveaxis(scores, 0, 1).reshape(batch, -1, scores.shape[-1])[:, :channels]
    return jax.nn.softmax(_pick(scores, targets), axis=-1)


def ablation_cam_weights(
    features: Array,
    targets: Array,
    head_fn: Callable[[Array], Array],
    channel_chunk: int = DEFAULT_CHANNEL_CHUNK,
    on_chunk: Callable[[int, int], None] | None = None,
) -> Array:
    """Ablation-CAM channel weights ``[B, T, C]``: ``(s - s_c) / s``.

    ``s`` is the target logit of ``head_fn(features)`` and ``s_c`` the same with channel
    ``c`` of ``features [B, *S, C]`` set to zero. The reference score is the first entry of
    the same batched head calls as the ``C`` ablations (same arithmetic, so near-equal scores
    cancel cleanly). ``s == 0`` gives weight 0 rather than a division by zero. ``on_chunk``:
    as in ``score_cam_weights``.
    """
    features = _features(features, None)
    batch, channels = features.shape[0], features.shape[-1]
    # -1 ablates nothing (the reference score); padding entries repeat it and are dropped.
    ablated = jnp.arange(-1, channels, dtype=jnp.int32)
    chunks, chunk = _chunked(ablated, channel_chunk, -1)
    spatial_ones = (1,) * (features.ndim - 2)

    def scores_of(which: Array) -> Array:  # [chunk] -> [B, chunk, K]
        keep = (jnp.arange(channels)[None, :] != which[:, None]).astype(features.dtype)
        copies = features[:, None] * keep.reshape(1, chunk, *spatial_ones, channels)
        logits = head_fn(copies.reshape(batch * chunk, *features.shape[1:]))
        return jnp.asarray(logits, jnp.float32).reshape(batch, chunk, -1)

    scores = _map_chunks(scores_of, chunks, on_chunk)
    scores = jnp.moveaxis(scores, 0, 1).reshape(batch, -1, scores.shape[-1])[:, : channels + 1]
    picked = _pick(scores, targets)  # [B, T, 1 + C]
    reference, without = picked[..., :1], picked[..., 1:]
    usable = reference != 0
    return jnp.where(usable, (reference - without) / jnp.where(usable, reference, 1.0), 0.0)


def weighted_terms(features: Array, weights: Array) -> Array:
    """``weights [B, T, C]`` times ``features [B, *S, C]`` -> channel terms ``[B, T, *S, C]``."""
    features, weights = _as_float(features), _as_float(weights)
    shape = (weights.shape[0], weights.shape[1]) + (1,) * (features.ndim - 2) + (-1,)
    return weights.reshape(shape) * features[:, None]


# --------------------------------------------------------------------------------------
# Attention rollout
# --------------------------------------------------------------------------------------


def attention_rollout(attentions: Array, readout: Array, grid: tuple[int, ...],
                      residual: float = 0.5) -> Array:
    """Attention rollout (Abnar & Zuidema, 2020): how much each patch flows into the output.

    ``attentions [L, B, H, T, T]`` are every block's attention (rows sum to one), the last
    ``prod(grid)`` of the ``T`` tokens the patches of ``grid`` in row-major order (prefix
    tokens such as a class token first); ``readout [B, T]`` weighs the final tokens the
    head reads (a class token: one-hot; a mean: uniform over the patches). Each layer
    mixes in the skip connection, ``A' = residual I + (1 - residual) mean_heads(A)``, and
    the map is ``readout A'_L ... A'_1`` at the patches: ``[B, *grid]`` float32 (the whole
    row, prefix columns included, sums to ``sum(readout)``).
    """
    attentions = _as_float(attentions)
    tokens, count = attentions.shape[-1], int(np.prod(grid))
    if tokens < count or jnp.shape(readout) != (*attentions.shape[1:2], tokens):
        raise ValueError(f"attention_rollout: attentions {tuple(attentions.shape)} and readout "
                         f"{tuple(jnp.shape(readout))} do not cover a {tuple(grid)} patch grid")
    mixed = residual * jnp.eye(tokens) + (1.0 - residual) * attentions.mean(axis=2)

    def step(row: Array, layer: Array) -> tuple[Array, None]:  # later layers first
        return jnp.einsum("bi,bij->bj", row, layer, precision=_EXACT), None

    row, _ = jax.lax.scan(step, _as_float(readout), mixed, reverse=True)
    return row[:, tokens - count:].reshape(-1, *grid)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

#: What a method needs: "exact" (a head map of the model contract), "gradients" (of the
#: target logits at the features), "head" (batched head calls), "model" (batched calls of
#: the whole model), "features" (nothing else) or "attention" (the model's
#: ``forward_attention``).
NEEDS = ("exact", "gradients", "head", "model", "features", "attention")
#: Needs whose maps come whole, without channel terms to smooth.
WHOLE_MAPS = ("exact", "attention")


@dataclass(frozen=True)
class CamMethod:
    """One map method.

    name: registry name. needs: one of ``NEEDS``. terms: for ``gradients`` methods,
    ``fn(features, gradients) -> channel terms``. exact_kind: the ``model.map_kinds`` entry an
    exact method requires. rectified: whether ``relu`` applies (False for the exact maps,
    which are signed and additive). summary: one line for docs and ``--help``.
    """

    name: str
    needs: str
    summary: str
    terms: Callable[[Array, Array], Array] | None = None
    exact_kind: str | None = None
    rectified: bool = True


CAM_METHODS: Registry[CamMethod] = Registry("cam method")


def _register(method: CamMethod) -> CamMethod:
    if method.needs not in NEEDS:
        raise ValueError(f"needs={method.needs!r} is not one of {NEEDS}")
    return CAM_METHODS.add(method.name, method)


def register_gradient_method(name: str, terms: Callable[[Array, Array], Array],
                             summary: str = "") -> CamMethod:
    """Adds a gradient method to ``CAM_METHODS`` (a fork's variant): ``terms(features
    [B, *S, C], gradients [B, T, *S, C]) -> channel terms [B, T, *S, C]``, summed over
    channels (or eigen-smoothed) and ReLU'd like the built-in ones. ``compute_maps``,
    the command line and the localization evaluator then take ``name``."""
    if not callable(terms):
        raise ValueError(f"register_gradient_method({name!r}): terms must be callable")
    return _register(CamMethod(name, "gradients", summary or name, terms=terms))


_register(CamMethod("cam", "exact", "W_k . x_i of a uniform (GAP) pool: exact, sums to the "
                    "logit", exact_kind="cam", rectified=False))
_register(CamMethod("contribution", "exact", "the pool's weighted per-position contributions: "
                    "exact, sum to the logit", exact_kind="contribution", rectified=False))
_register(CamMethod("grad_cam", "gradients", "Grad-CAM: position-mean gradients weight the "
                    "channels", terms=grad_cam_terms))
_register(CamMethod("hires_cam", "gradients", "HiResCAM: gradient times activation, "
                    "element-wise", terms=hires_cam_terms))
_register(CamMethod("grad_cam_pp", "gradients", "Grad-CAM++: higher-order positive-gradient "
                    "weights", terms=grad_cam_pp_terms))
_register(CamMethod("xgrad_cam", "gradients", "XGrad-CAM: activation-normalised gradient "
                    "weights", terms=xgrad_cam_terms))
_register(CamMethod("layer_cam", "gradients", "LayerCAM: positive gradients, element-wise",
                    terms=layer_cam_terms))
_register(CamMethod("eigen_cam", "features", "Eigen-CAM: first principal component of the "
                    "features (class-agnostic)"))
_register(CamMethod("score_cam", "model", "Score-CAM: softmax of masked-input scores, one "
                    "forward pass per channel"))
_register(CamMethod("ablation_cam", "head", "Ablation-CAM: relative score drop when a "
                    "channel is zeroed, one head pass per channel"))
_register(CamMethod("rollout", "attention", "attention rollout: the head's readout traced "
                    "back through every block's attention (class-agnostic)", rectified=False))
