"""Cost of class activation maps relative to the forward pass that produces the features.

Per model, jitted and timed on random inputs (randomly initialised weights; the cost does
not depend on their values):

* ``forward``: ``model.apply(variables, images)`` -> logits (inference mode);
* ``cam_from_features``: given the sown features and the classifier, the maps of the
  predicted class, upsampled to the input size and min-max normalised
  (``gapjax.cam.class_activation_map`` + ``select_targets`` + ``resize_maps`` +
  ``normalize_maps``): the extra work CAM adds to a forward pass;
* ``one_call``: ``gapjax.cam.make_map_fn`` (forward with the feature switch + maps);
* ``grad_cam_one_call``: the same helper with ``method="grad_cam"``, for reference.

Target: ``cam_from_features / forward <= 0.10``.

    python benchmarks/cam_cost.py [--model resnet50 --model cnn] [--batch B] [--quick]
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
from common import base_parser, block, emit, error_entry, target, time_calls

#: name -> (registry name, input shape, classes, kwargs)
CAM_MODELS: dict[str, tuple[str, tuple[int, int, int], int, dict[str, Any]]] = {
    "resnet50": ("resnet50", (224, 224, 3), 1000, {}),
    "resnet18": ("resnet18", (32, 32, 3), 10, {"stem": "cifar"}),
    "cnn": ("cnn", (64, 64, 1), 10, {}),
}
TARGET = 0.10


def measure(name: str, batch: int, repeats: int, image_size: int | None) -> dict[str, Any]:
    """Times the forward, the CAM work on top of it, and the one-call helpers."""
    from gapjax import cam, models

    registry_name, input_shape, num_classes, kwargs = CAM_MODELS[name]
    if image_size is not None:
        input_shape = (image_size, image_size, input_shape[2])
    model = models.get(registry_name, num_classes=num_classes, **kwargs)
    images = jax.random.normal(jax.random.key(0), (batch, *input_shape), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images[:1])

    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    with_features = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                     mutable=["intermediates"]))
    logits, state = with_features(variables, images)
    features = state["intermediates"]["features"][0]
    classifier = variables["params"]["head"]["classifier"]
    targets = jnp.argmax(logits, axis=-1)

    @jax.jit
    def cam_from_features(features, kernel, bias, targets):
        maps = cam.select_targets(cam.class_activation_map(features, kernel, bias), targets)
        return cam.normalize_maps(cam.resize_maps(maps, input_shape[:2]))

    one_call = cam.make_map_fn(model, method="cam")
    grad_cam_call = cam.make_map_fn(model, method="grad_cam")
    timings = {
        "forward": time_calls(lambda: block(forward(variables, images)), repeats=repeats),
        "forward_with_features": time_calls(lambda: block(with_features(variables, images)),
                                            repeats=repeats),
        "cam_from_features": time_calls(
            lambda: block(cam_from_features(features, classifier["kernel"],
                                            classifier["bias"], targets)), repeats=repeats),
        "one_call": time_calls(lambda: block(one_call(variables, images)), repeats=repeats),
        "grad_cam_one_call": time_calls(lambda: block(grad_cam_call(variables, images)),
                                        repeats=repeats),
    }
    forward_s = timings["forward"]["median"]
    return {
        "model": name,
        "input_shape": list(input_shape),
        "feature_shape": list(features.shape[1:]),
        "batch": batch,
        **{f"{key}_s": value["median"] for key, value in timings.items()},
        "cam_over_forward": timings["cam_from_features"]["median"] / forward_s,
        "one_call_over_forward": timings["one_call"]["median"] / forward_s,
        "grad_cam_over_forward": timings["grad_cam_one_call"]["median"] / forward_s,
        "repeats": repeats,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(CAM_MODELS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    names = args.model or (["cnn"] if args.quick else ["resnet50", "cnn"])
    repeats = args.repeats or (3 if args.quick else 10)
    results, targets = [], []
    for name in names:
        batch = args.batch or (4 if args.quick else (64 if platform != "cpu" else 8))
        try:
            result = measure(name, batch, repeats, args.image_size)
            targets.append(target(f"{name} CAM maps / forward time (batch {batch})",
                                  result["cam_over_forward"], TARGET, higher_is_better=False,
                                  unit="x"))
        except Exception as exc:  # recorded, never fatal
            result = {"model": name, "batch": batch, **error_entry(exc)}
        results.append(result)
        print(result, file=sys.stderr)
    emit({"benchmark": "cam_cost", "results": results, "targets": targets}, args.out)


if __name__ == "__main__":
    main()
