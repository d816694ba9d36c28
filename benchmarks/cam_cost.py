"""Cost of class activation maps relative to the forward pass, for every method.

Per model, jitted and timed on random inputs (random weights; the cost does not depend on
their values):

* ``forward``: ``model.apply(variables, images)`` -> logits (inference mode);
* ``cam_from_features``: given the features and the classifier, the maps of the predicted
  class, upsampled to the input size and min-max normalised
  (``gapjax.cam.class_activation_map`` + ``select_targets`` + ``resize_maps`` +
  ``normalize_maps``): the extra work exact CAM adds to a forward pass (target <= 0.10);
* ``methods``: every name of ``gapjax.cam.METHODS`` the model supports, through
  ``gapjax.cam.make_map_fn`` (forward + maps, resized and normalised): seconds per image
  and the ratio to one forward pass per image (``over_forward``).

For the ResNets (torchvision layout) and when torch, torchvision and pytorch-grad-cam are
installed (the ``reference`` extra), the same torchvision model with the same weights
(loaded into gapjax with ``gapjax.pretrained``) is timed with pytorch-grad-cam on this CPU
for every method both libraries have (its default settings: eager PyTorch, per-image
loops and batches of 16 / 32 for Score-CAM / Ablation-CAM, OpenCV resizing), and
``torch_over_gapjax`` is reported beside each method: information, never asserted.

Quick mode: the cnn at 32x32 and ``resnet18_w16`` at 64x64, batch 2, one timed call.

    python benchmarks/cam_cost.py [--model resnet18 --model cnn] [--method grad_cam]
        [--batch B] [--image-size S] [--no-torch] [--quick] [--out cam_cost.json]
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import REPO_ROOT, base_parser, block, emit, error_entry, target, time_calls

#: name -> (registry name, input shape, classes, kwargs)
CAM_MODELS: dict[str, tuple[str, tuple[int, int, int], int, dict[str, Any]]] = {
    "resnet50": ("resnet50", (224, 224, 3), 1000, {}),
    "resnet18": ("resnet18", (224, 224, 3), 1000, {}),
    "resnet18_w16": ("resnet18", (64, 64, 3), 1000, {"base_width": 16}),
    "resnet18_cifar": ("resnet18", (32, 32, 3), 10, {"stem": "cifar"}),
    "cnn": ("cnn", (64, 64, 1), 10, {}),
}
#: Models with a torchvision counterpart (ImageNet stem), timed with pytorch-grad-cam.
#: ``resnet18_w16`` is ResNet-18 at a quarter of the widths (torchvision's blocks, stages
#: rebuilt narrower), so Score-CAM's one pass per channel stays affordable in quick mode.
TORCH_MODELS = ("resnet18", "resnet50", "resnet18_w16")
#: gapjax method -> pytorch-grad-cam class.
TORCH_CLASSES = {"grad_cam": "GradCAM", "hires_cam": "HiResCAM",
                 "grad_cam_pp": "GradCAMPlusPlus", "xgrad_cam": "XGradCAM",
                 "layer_cam": "LayerCAM", "eigen_cam": "EigenCAM", "score_cam": "ScoreCAM",
                 "ablation_cam": "AblationCAM"}
TARGET = 0.10


def import_grad_cam() -> Any:
    """pytorch-grad-cam, with the test helper's workaround for torchvision's compiled
    operators when they do not load against this torch build."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    try:
        from helpers.torch_reference import import_grad_cam as importer
    finally:
        sys.path.remove(str(REPO_ROOT / "tests"))
    return importer()


def torch_reference(registry_name: str, num_classes: int, model: Any
                    ) -> tuple[Any, Any, Any]:
    """``(torch model in eval mode, gapjax variables with its weights, pytorch_grad_cam)``
    for the gapjax ``model`` (a ResNet; ``base_width`` < 64 rebuilds torchvision's stages
    at that width with its own ``_make_layer``)."""
    import torch

    from gapjax import pretrained

    grad_cam = import_grad_cam()
    torchvision = sys.modules["torchvision"]
    torch.manual_seed(0)
    module = getattr(torchvision.models, registry_name)(num_classes=num_classes)
    width = getattr(model, "base_width", 64)
    if width != 64:
        block = type(module.layer1[0])
        module.inplanes = width
        module.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
        module.bn1 = torch.nn.BatchNorm2d(width)
        for index, stride in enumerate((1, 2, 2, 2)):
            setattr(module, f"layer{index + 1}", module._make_layer(
                block, width * 2**index, len(getattr(module, f"layer{index + 1}")),
                stride=stride))
        module.fc = torch.nn.Linear(8 * width * block.expansion, num_classes)
    module.eval()
    state = {key: value.detach().numpy() for key, value in module.state_dict().items()}
    variables = pretrained.variables_from_state_dict(registry_name, model, state)
    return module, variables, grad_cam


def time_torch(module: Any, grad_cam: Any, method: str, images: np.ndarray,
               targets: np.ndarray, repeats: int) -> float:
    """Median seconds of one pytorch-grad-cam call on the batch (maps of ``targets``)."""
    import contextlib
    import io

    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = module.layer4
    explainer = getattr(grad_cam, TORCH_CLASSES[method])(module, [layer])
    tensor = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    chosen = [ClassifierOutputTarget(int(k)) for k in targets]

    def call() -> None:
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm progress bars
            explainer(tensor, chosen)

    try:
        return time_calls(call, repeats=repeats)["median"]
    finally:
        explainer.activations_and_grads.release()


def measure(name: str, batch: int, repeats: int, image_size: int | None,
            methods: list[str] | None, with_torch: bool) -> dict[str, Any]:
    """Times the forward, exact CAM on top of it, and every method (and pytorch-grad-cam)."""
    from gapjax import cam, models

    registry_name, input_shape, num_classes, kwargs = CAM_MODELS[name]
    if image_size is not None:
        input_shape = (image_size, image_size, input_shape[2])
    model = models.get(registry_name, num_classes=num_classes, **kwargs)
    images = jax.random.normal(jax.random.key(0), (batch, *input_shape), jnp.float32)
    module = grad_cam = None
    torch_error = None
    if with_torch and name in TORCH_MODELS:
        try:
            module, variables, grad_cam = torch_reference(registry_name, num_classes, model)
        except Exception as exc:  # recorded, never fatal
            torch_error = error_entry(exc)["error"]
            module = None
    if module is None:
        variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images[:1])

    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    features_of = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                   method="forward_features"))
    logits = forward(variables, images)
    features = features_of(variables, images)
    targets = jnp.argmax(logits, axis=-1)
    classifier = variables["params"]["head"]["classifier"]

    @jax.jit
    def cam_from_features(features, kernel, bias, targets):
        maps = cam.select_targets(cam.class_activation_map(features, kernel, bias), targets)
        return cam.normalize_maps(cam.resize_maps(maps, input_shape[:2]))

    # The two cheap baselines always take a few samples: one is at the mercy of a busy core.
    base_repeats = max(repeats, 5)
    forward_s = time_calls(lambda: block(forward(variables, images)),
                           repeats=base_repeats)["median"]
    cam_s = time_calls(lambda: block(cam_from_features(
        features, classifier["kernel"], classifier["bias"], targets)),
        repeats=base_repeats)["median"]

    per_method: dict[str, Any] = {}
    for method in methods or cam.available_methods(model):
        if method not in cam.available_methods(model):
            per_method[method] = {"error": f"{method} does not apply to {name}"}
            continue
        entry: dict[str, Any] = {}
        try:
            map_fn = cam.make_map_fn(model, method)
            timing = time_calls(lambda map_fn=map_fn: block(map_fn(variables, images, targets)),
                                repeats=repeats)
            entry = {"seconds_per_image": timing["median"] / batch,
                     "compile_s": timing["first"] - timing["median"],
                     "over_forward": timing["median"] / forward_s}
        except Exception as exc:  # recorded, never fatal
            entry = error_entry(exc)
        if module is not None and method in TORCH_CLASSES and "error" not in entry:
            try:
                torch_s = time_torch(module, grad_cam, method, np.asarray(images),
                                     np.asarray(targets), repeats)
                entry["torch_seconds_per_image"] = torch_s / batch
                entry["torch_over_gapjax"] = torch_s / batch / entry["seconds_per_image"]
            except Exception as exc:  # recorded, never fatal
                entry["torch_error"] = error_entry(exc)["error"]
        per_method[method] = entry
        print(name, method, entry, file=sys.stderr)
    return {
        "model": name,
        "input_shape": list(input_shape),
        "feature_shape": list(features.shape[1:]),
        "batch": batch,
        "forward_s": forward_s,
        "forward_per_image_s": forward_s / batch,
        "cam_from_features_s": cam_s,
        "cam_over_forward": cam_s / forward_s,
        "methods": per_method,
        "torch": (None if module is None else "pytorch-grad-cam, same weights, eager CPU"),
        **({"torch_error": torch_error} if torch_error else {}),
        "repeats": repeats,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(CAM_MODELS))
    parser.add_argument("--method", action="append", default=None,
                        help="a gapjax.cam method (repeatable; default: every one that applies)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the pytorch-grad-cam side-by-side timings")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    names = args.model or (["cnn", "resnet18_w16"] if args.quick else ["resnet50", "resnet18",
                                                                       "cnn"])
    repeats = args.repeats or (1 if args.quick else 5)
    results, targets = [], []
    for name in names:
        batch = args.batch or (2 if args.quick else (32 if platform != "cpu" else 4))
        image_size = args.image_size or (32 if args.quick and name == "cnn" else None)
        try:
            result = measure(name, batch, repeats, image_size, args.method,
                             with_torch=not args.no_torch)
            targets.append(target(f"{name} CAM maps / forward time (batch {batch})",
                                  result["cam_over_forward"], TARGET, higher_is_better=False,
                                  unit="x"))
        except Exception as exc:  # recorded, never fatal
            result = {"model": name, "batch": batch, **error_entry(exc)}
        results.append(result)
    emit({"benchmark": "cam_cost", "results": results, "targets": targets}, args.out)


if __name__ == "__main__":
    main()
