"""Class activation maps: where a classifier looked, for every common method, batched.

For a GAP head the class score is a spatial mean, ``logit_k = mean_i (W_k . x_i) + b_k``,
so ``W_k . x_i`` is an exact per-location map whose mean is the logit (CAM). Every head
whose pool splits exactly over positions (``Pool.contributions``: weighted and attention
pools, GMP's one-hot weights per channel, MAP) gives contributions that *sum* to the
logit. Other heads, and anyone who wants the maps people usually look at, get the
gradient and perturbation family: Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM,
Eigen-CAM, Score-CAM and Ablation-CAM, and models with attention get attention rollout:
one registry ``CAM_METHODS`` (``gapjax.cam.methods``, with each method's pure function),
with test-time-augmentation and principal-component ("eigen") smoothing. ``compute_maps``
and ``make_map_fn`` (``gapjax.cam.compute``) run any of them on a model through the model
contract.

Layout: features ``[B, h, w, C]``, maps ``[B, h, w]`` for one target class per image
(``targets [B]``) or ``[B, T, h, w]`` for ``T`` classes per image (``targets [B, T]``),
float32. Faithfulness metrics (deletion, insertion, ROAD, average drop / increase in
confidence) are in ``gapjax.cam.faithfulness``; the overlay command line is
``gapjax.cli.cam`` (``python -m gapjax.cam``).
"""

from gapjax.cam.compute import (
    METHODS,
    CamOutput,
    available_methods,
    check_target_range,
    compute_maps,
    make_map_fn,
    method_names,
    normalize_maps,
    resize_maps,
    resolve_method,
    select_targets,
)
from gapjax.cam.methods import (
    CAM_METHODS,
    attention_rollout,
    class_activation_map,
    eigen_cam_map,
    grad_cam_from_gradients,
    grad_cam_terms,
    reduce_terms,
)

__all__ = [
    "CAM_METHODS",
    "METHODS",
    "CamOutput",
    "attention_rollout",
    "available_methods",
    "check_target_range",
    "class_activation_map",
    "compute_maps",
    "eigen_cam_map",
    "grad_cam_from_gradients",
    "grad_cam_terms",
    "make_map_fn",
    "method_names",
    "normalize_maps",
    "reduce_terms",
    "resize_maps",
    "resolve_method",
    "select_targets",
]
