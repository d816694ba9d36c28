"""gapjax.cam against pytorch-grad-cam 1.5.7 on the same ResNet-18 weights and inputs.

torchvision ResNet-18s with random weights and non-trivial BatchNorm statistics are
loaded into gapjax with ``gapjax.pretrained``; every method both libraries have must give
the same raw maps (before resizing and normalisation: pytorch-grad-cam's ``scale_cam_image``
is replaced by the identity, or its ``get_cam_image`` is called directly), with relative
error ``max|gapjax - reference| / max|reference| <= 1e-4``.

* full width, 2 images of 96x128 (3x4 maps), two target classes per image: CAM, Grad-CAM,
  HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM, Eigen-CAM and eigen smoothing (the last two
  up to the sign of the principal component, which SVD leaves arbitrary);
* a width-8 ResNet-18 (torchvision's blocks and naming, 1/8 of the channels so its 64
  whole-model passes per image stay cheap): Score-CAM, Ablation-CAM and augmentation
  smoothing, end to end through ``gapjax.cam.make_map_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.torch_reference import import_grad_cam, import_torchvision, randomize_

from gapjax import cam, pretrained

TOLERANCE = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
NUM_CLASSES = 10
#: Stage-1 width of the ResNet-18 the whole-model-pass methods run on (64 channels at the end).
NARROW = 8
#: gapjax name -> pytorch-grad-cam class name, for the gradient methods.
GRADIENT_CLASSES = {"grad_cam": "GradCAM", "hires_cam": "HiResCAM",
                    "grad_cam_pp": "GradCAMPlusPlus", "xgrad_cam": "XGradCAM",
                    "layer_cam": "LayerCAM"}


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_resnet18(width: int = 64, seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet-18; ``width`` < 64 rebuilds its stages with torchvision's own
    ``_make_layer`` at widths ``width * (1, 2, 4, 8)`` (same module names)."""
    models = import_torchvision().models
    torch.manual_seed(seed)
    model = models.resnet18(num_classes=NUM_CLASSES)
    if width != 64:
        block = models.resnet.BasicBlock
        model.inplanes = width
        model.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
        model.bn1 = torch.nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, 2)
        model.layer2 = model._make_layer(block, 2 * width, 2, stride=2)
        model.layer3 = model._make_layer(block, 4 * width, 2, stride=2)
        model.layer4 = model._make_layer(block, 8 * width, 2, stride=2)
        model.fc = torch.nn.Linear(8 * width, NUM_CLASSES)
    return randomize_(model, seed + 1)


def to_gapjax(model: torch.nn.Module, directory, **kwargs):
    from safetensors.torch import save_file

    path = directory / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return pretrained.load("resnet18", path, **kwargs)


def images_for(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3), np.float32)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture
def raw_reference_maps(monkeypatch):
    """pytorch-grad-cam with ``scale_cam_image`` as the identity: ``__call__`` returns the
    ReLU'd maps at feature resolution, augmentation smoothing averages them unscaled."""
    grad_cam = import_grad_cam()
    from pytorch_grad_cam import base_cam

    monkeypatch.setattr(base_cam, "scale_cam_image",
                        lambda maps, target_size=None: np.float32(maps))
    return grad_cam


def test_cam_and_gradient_methods_equal_pytorch_grad_cam(tmp_path):
    grad_cam = import_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    reference = torch_resnet18()
    model, variables = to_gapjax(reference, tmp_path)
    images = images_for(2, 96, 128)
    targets = np.array([[3, 7], [1, 3]])

    def features_gradients_maps(variables, images, targets):
        features = model.apply(variables, images, train=False, method="forward_features")
        logits, pullback = jax.vjp(
            lambda f: model.apply(variables, f, train=False, method="forward_head"), features)
        cotangents = jax.nn.one_hot(targets, logits.shape[-1])
        (gradients,) = jax.vmap(pullback, in_axes=1, out_axes=1)(cotangents)
        class_maps = model.apply(variables, features, method="head_class_maps")
        return features, gradients, class_maps, logits

    compiled = jax.jit(features_gradients_maps).lower(
        variables, images, targets).compile(FAST_COMPILE)
    features, gradients, class_maps, logits = compiled(variables, images, targets)
    assert features.shape == (2, 3, 4, 512)

    # Exact CAM: the torch fc weights times torch's layer4 output.
    captured = {}
    hook = reference.layer4.register_forward_hook(
        lambda module, inputs, output: captured.update(features=output.detach()))
    with torch.no_grad():
        torch_logits = reference(nchw(images)).numpy()
    hook.remove()
    torch_features = captured["features"].numpy().transpose(0, 2, 3, 1)
    assert relative_error(logits, torch_logits) <= TOLERANCE
    torch_cam = np.einsum("bhwc,kc->bhwk", torch_features, reference.fc.weight.detach().numpy())
    assert relative_error(class_maps, torch_cam) <= TOLERANCE

    # One forward / backward pass of the reference per target column; every gradient
    # method's get_cam_image then reads the same activations and gradients.
    passes = []
    with grad_cam.GradCAM(reference, [reference.layer4]) as explainer:
        for t in range(targets.shape[1]):
            chosen = [ClassifierOutputTarget(int(k)) for k in targets[:, t]]
            explainer(nchw(images), chosen)
            passes.append((chosen, explainer.activations_and_grads.activations[0].numpy(),
                           explainer.activations_and_grads.gradients[0].numpy()))
    for name, class_name in GRADIENT_CLASSES.items():
        method = cam.CAM_METHODS.get(name)
        ours = np.asarray(cam.reduce_terms(method.terms(features, gradients), 2))  # [B, T, h, w]
        smooth = np.asarray(cam.reduce_terms(method.terms(features, gradients), 2, True))
        with getattr(grad_cam, class_name)(reference, [reference.layer4]) as explainer:
            for t, (chosen, activations, grads) in enumerate(passes):
                theirs = explainer.get_cam_image(nchw(images), reference.layer4, chosen,
                                                 activations, grads, eigen_smooth=False)
                error = relative_error(ours[:, t], theirs)
                assert error <= TOLERANCE, (name, t, error)
                # eigen smoothing, up to each map's sign
                theirs = explainer.get_cam_image(nchw(images), reference.layer4, chosen,
                                                 activations, grads, eigen_smooth=True)
                signs = np.sign((smooth[:, t] * theirs).sum(axis=(1, 2)))[:, None, None]
                error = relative_error(smooth[:, t], signs * theirs)
                assert error <= TOLERANCE, (name, "eigen_smooth", t, error)

    # Eigen-CAM: the first principal component of the features, up to its sign.
    ours = np.asarray(cam.eigen_cam_map(features))
    theirs = get_2d_projection(captured["features"].numpy())
    signs = np.sign((ours * theirs).sum(axis=(1, 2)))[:, None, None]
    assert relative_error(ours, signs * theirs) <= TOLERANCE
    with grad_cam.EigenCAM(reference, [reference.layer4]) as explainer:
        theirs = explainer.get_cam_image(nchw(images), reference.layer4, None, passes[0][1],
                                         None, eigen_smooth=False)
    assert relative_error(ours, signs * theirs) <= TOLERANCE


@pytest.mark.parametrize("method", ["score_cam", "ablation_cam", "grad_cam_aug_smooth"])
def test_perturbation_methods_and_smoothing_equal_pytorch_grad_cam(
        method, tmp_path, raw_reference_maps):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference = torch_resnet18(width=NARROW, seed=3)
    model, variables = to_gapjax(reference, tmp_path, base_width=NARROW)
    images = images_for(2, 96, 96, seed=1)
    targets = np.array([4, 9])
    chosen = [ClassifierOutputTarget(int(k)) for k in targets]
    if method == "grad_cam_aug_smooth":
        options = {"aug_smooth": True}
        explainer = raw_reference_maps.GradCAM(reference, [reference.layer4])
        theirs = explainer(nchw(images), chosen, aug_smooth=True)
        method = "grad_cam"
    else:
        options = {"channel_chunk": 24}  # 64 channels + reference: 3 chunks, the last padded
        explainer = {"score_cam": raw_reference_maps.ScoreCAM,
                     "ablation_cam": raw_reference_maps.AblationCAM}[method](
            reference, [reference.layer4])
        theirs = explainer(nchw(images), chosen)
    explainer.activations_and_grads.release()
    jitted = cam.make_map_fn(model, method, resize=None, normalize=False, **options).jitted
    arguments = (variables, jnp.asarray(images), jnp.asarray(targets))
    ours = jitted.lower(*arguments).compile(FAST_COMPILE)(*arguments)
    assert ours.maps.shape == theirs.shape == (2, 3, 3)
    assert float(np.abs(theirs).max()) > 0
    error = relative_error(ours.maps, theirs)
    assert error <= TOLERANCE, (method, error)
