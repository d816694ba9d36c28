"""WSOL training methods beyond CAM, as in Choe et al.'s library (clovaai/wsolevaluation).

* Hide-and-Seek (Singh & Lee, ICCV 2017): ``hide_and_seek`` hides each ``grid_size`` x
  ``grid_size`` patch of a training image with probability ``drop_rate`` (the hidden
  pixels are 0 after normalisation, i.e. the mean colour).
* CutMix (Yun et al., ICCV 2019): ``cutmix`` pastes a random box of another image of the
  batch; the loss is ``lam * CE(label) + (1 - lam) * CE(other label)`` with ``lam`` the
  share of pixels kept (the ``label_mix`` and ``mix`` batch keys; ``Task.training_losses``).
* ADL (Choe & Shim, CVPR 2019): ``ADL``, a parameter-free layer inserted in the backbone
  (``adl_blocks`` of ``gapjax.models`` ResNet / VGG). In training, from the channel-mean
  self-attention map it either multiplies the features by the sigmoid importance map or,
  with probability ``drop_rate``, zeroes the positions whose attention is at least
  ``threshold`` times the image's maximum; at evaluation it is the identity.

``hide_and_seek`` and ``cutmix`` are pure functions of their arrays and of explicit random
draws; ``xp`` is NumPy (the input pipeline applies them there, deterministically from its
per-example generators) or ``jax.numpy`` (then they jit). Defaults are the reference's
published hyperparameters (its ``config.py``): HaS grid 4, drop rate 0.5; CutMix beta 1,
probability 1; ADL drop rate 0.75, threshold 0.9.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: Methods of the recipe: the reference's names.
METHODS = ("cam", "has", "cutmix", "adl")
HAS_GRID_SIZE = 4
HAS_DROP_RATE = 0.5
CUTMIX_BETA = 1.0
CUTMIX_PROB = 1.0
ADL_DROP_RATE = 0.75
ADL_THRESHOLD = 0.9

#: Where ADL goes in the reference's backbones (after these blocks; see ``adl_blocks``).
ADL_BLOCKS = {
    "resnet": ("layer3_0", "layer4_0", "layer4_2"),
    "vgg": ("pool3", "block4", "block5"),
}


def hide_and_seek(image: Any, uniforms: Any, grid_size: int = HAS_GRID_SIZE,
                  drop_rate: float = HAS_DROP_RATE, xp: Any = np) -> Any:
    """Hides random patches of one image.

    Args:
      image: ``[H, W, C]`` normalised image.
      uniforms: ``[ceil(H / g), ceil(W / g)]`` draws in ``[0, 1)``, one per patch; a patch
        is hidden when its draw is ``<= drop_rate`` (the reference's test).
      grid_size: ``g``, the patch side in pixels (0 disables hiding).
      drop_rate: probability of hiding a patch.
      xp: ``numpy`` or ``jax.numpy``.

    Returns the image with hidden patches set to 0, same shape and dtype.
    """
    if grid_size <= 0:
        return image
    height, width = image.shape[:2]
    rows = xp.arange(height) // grid_size
    columns = xp.arange(width) // grid_size
    hidden = xp.asarray(uniforms)[rows[:, None], columns[None, :]] <= drop_rate
    return xp.where(hidden[..., None], xp.zeros_like(image), image)


def patch_grid(height: int, width: int, grid_size: int = HAS_GRID_SIZE) -> tuple[int, int]:
    """The ``uniforms`` shape ``hide_and_seek`` needs for an ``H x W`` image."""
    return -(-height // grid_size), -(-width // grid_size)


def cutmix_box(height: int, width: int, lam: Any, centre_y: Any, centre_x: Any,
               xp: Any = np) -> tuple[Any, Any, Any, Any]:
    """The reference's CutMix box ``(top, left, bottom, right)`` (exclusive ends) for a
    kept share ``lam``: sides ``int(side * sqrt(1 - lam))`` around the centre, clipped."""
    ratio = xp.sqrt(1.0 - lam)
    cut_h = xp.floor(height * ratio).astype(xp.int32)
    cut_w = xp.floor(width * ratio).astype(xp.int32)
    top = xp.clip(centre_y - cut_h // 2, 0, height)
    bottom = xp.clip(centre_y + cut_h // 2, 0, height)
    left = xp.clip(centre_x - cut_w // 2, 0, width)
    right = xp.clip(centre_x + cut_w // 2, 0, width)
    return top, left, bottom, right


def cutmix(images: Any, labels: Any, permutation: Any, lam: Any, centre_y: Any, centre_x: Any,
           xp: Any = np) -> tuple[Any, Any, Any]:
    """Pastes the same box of ``images[permutation]`` into every image.

    Args:
      images: ``[B, H, W, C]``; labels: ``[B]`` int.
      permutation: ``[B]`` partner of each image; lam: the drawn ``Beta(beta, beta)`` share.
      centre_y, centre_x: the box centre (uniform integers in ``[0, H)``, ``[0, W)``).
      xp: ``numpy`` or ``jax.numpy``.

    Returns ``(mixed images, partner labels [B], kept share [B])``: the share is
    recomputed from the clipped box, ``1 - box area / (H W)``, as in the reference.
    """
    height, width = images.shape[1:3]
    top, left, bottom, right = cutmix_box(height, width, lam, centre_y, centre_x, xp)
    rows = xp.arange(height)[:, None]
    columns = xp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)
    mixed = xp.where(inside[None, :, :, None], images[permutation], images)
    kept = 1.0 - ((bottom - top) * (right - left)) / (height * width)
    share = xp.full(labels.shape, kept, dtype=xp.float32)
    return mixed, labels[permutation], share


class ADL(nn.Module):
    """Attention-based Dropout Layer: ``[B, H, W, C] -> [B, H, W, C]``.

    Training: ``a = mean_c(x)``; with probability ``drop_rate`` (one draw per batch, as
    the reference) ``x * (a < threshold * max(a))`` per image, otherwise
    ``x * sigmoid(a)``. Evaluation: ``x``. Draws from the ``"dropout"`` RNG stream.
    """

    drop_rate: float = ADL_DROP_RATE
    threshold: float = ADL_THRESHOLD

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not 0.0 <= self.drop_rate <= 1.0 or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"ADL drop_rate={self.drop_rate!r} and threshold="
                             f"{self.threshold!r} must lie in [0, 1]")
        if not train:
            return x
        attention = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)
        peak = jnp.max(attention, axis=(1, 2, 3), keepdims=True)
        drop_mask = (attention < peak * self.threshold).astype(jnp.float32)
        importance = jax.nn.sigmoid(attention)
        use_drop = jax.random.uniform(self.make_rng("dropout"), ()) < self.drop_rate
        selected = jnp.where(use_drop, drop_mask, importance)
        return (x * selected).astype(x.dtype)


__all__ = [
    "ADL",
    "ADL_BLOCKS",
    "METHODS",
    "cutmix",
    "cutmix_box",
    "hide_and_seek",
    "patch_grid",
]
