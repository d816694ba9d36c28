"""Training throughput of the project's own train step on synthetic data.

For each model: compile time, median step time, examples per second and the achieved
FLOP rate (XLA's cost analysis of the compiled step) of ``gapjax.train.steps.train_step``
(SGD + momentum, weight decay, cross-entropy), jitted and donating the state the way
``gapjax.train.parallel`` compiles it, on random images and labels.

    python benchmarks/train_throughput.py [--model resnet18 ...] [--batch 64]
        [--dtype float32|bfloat16] [--image-size N] [--torch] [--quick] [--out FILE]

Models: cnn (64x64x1, 10 classes), resnet18 (CIFAR stem, 32x32x3, 10 classes), resnet50,
seresnet50, vit_b16 (ViT-B/16, class token), efficientnet_b0 and convnext_tiny (224x224x3,
1000 classes). ``--torch`` also runs the PyTorch eager ResNet-18 (``torch_resnet18.py``, in
a subprocess) at the same batch and reports the ratio against the target "at least as fast
as PyTorch eager". On a GPU, ResNet-50 bfloat16 is reported against 3,000 images/s (one
H100).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    base_parser,
    block,
    emit,
    error_entry,
    import_train_step_modules,
    target,
    time_calls,
)

#: name -> (registry name, input shape, classes, extra model kwargs)
BENCH_MODELS: dict[str, tuple[str, tuple[int, int, int], int, dict[str, Any]]] = {
    "cnn": ("cnn", (64, 64, 1), 10, {}),
    "resnet18": ("resnet18", (32, 32, 3), 10, {"stem": "cifar"}),
    "seresnet18": ("seresnet18", (32, 32, 3), 10, {"stem": "cifar"}),
    "resnet50": ("resnet50", (224, 224, 3), 1000, {}),
    "seresnet50": ("seresnet50", (224, 224, 3), 1000, {}),
    "vit_b16": ("vit_b16", (224, 224, 3), 1000, {}),
    "efficientnet_b0": ("efficientnet_b0", (224, 224, 3), 1000, {}),
    "convnext_tiny": ("convnext_tiny", (224, 224, 3), 1000, {}),
}
DEFAULT_MODELS = ("cnn", "resnet18", "resnet50", "seresnet50")
DTYPES = ("float32", "bfloat16")
#: Optimizer of the benchmark step: the shared defaults (SGD, momentum 0.9, wd 5e-4).
OPTIMIZER = types.SimpleNamespace(name="sgd", learning_rate=0.1, schedule="constant",
                                  warmup_steps=0, momentum=0.9, nesterov=False,
                                  weight_decay=5e-4, grad_clip=0.0)
TORCH_SCRIPT = Path(__file__).resolve().parent / "torch_resnet18.py"
GPU_RESNET50_TARGET = 3000.0


def default_batch(name: str, platform: str, quick: bool) -> int:
    """Batch per model: large on accelerators, small on CPU, tiny with --quick."""
    if quick:
        return 4
    if platform != "cpu":
        return 256
    return 8 if name in ("resnet50", "seresnet50", "vit_b16", "efficientnet_b0",
                         "convnext_tiny") else 64


def synthetic_batch(batch: int, input_shape: tuple[int, ...], num_classes: int,
                    seed: int = 0) -> dict[str, jax.Array]:
    """Random normalised images, labels and unit weights: ``image [b, H, W, C]``,
    ``label [b]`` int32, ``weight [b]``."""
    image_key, label_key = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.normal(image_key, (batch, *input_shape), jnp.float32),
        "label": jax.random.randint(label_key, (batch,), 0, num_classes, jnp.int32),
        "weight": jnp.ones((batch,), jnp.float32),
    }


def build_train_step(name: str, *, batch: int, dtype: str, image_size: int | None = None,
                     extra_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model, initial state, a synthetic batch and the jitted project train step.

    Returns ``{"model", "state", "batch", "step", "input_shape", "num_classes"}``;
    ``step(state, batch) -> state`` donates ``state``.
    """
    from gapjax import models, tasks

    steps, state_lib, optim = import_train_step_modules()
    registry_name, input_shape, num_classes, kwargs = BENCH_MODELS[name]
    if image_size is not None:
        input_shape = (image_size, image_size, input_shape[2])
    if registry_name.startswith("vit_"):  # learned position embeddings fix the input size
        kwargs = {**kwargs, "image_size": input_shape[0]}
    model = models.get(registry_name, num_classes=num_classes, dtype=dtype,
                       **{**kwargs, **(extra_kwargs or {})})
    tx = optim.make_optimizer(OPTIMIZER, total_steps=1000)
    sample = jnp.zeros((1, *input_shape), jnp.float32)
    state = jax.jit(lambda: state_lib.create_train_state(model, tx, sample, seed=0))()
    task = tasks.get("classification", num_classes=num_classes)
    step_fn = functools.partial(steps.train_step, model=model, tx=tx, task=task,
                                axis_name=None)
    step = jax.jit(step_fn, donate_argnums=(0,))
    return {"model": model, "state": state, "step": step, "input_shape": input_shape,
            "num_classes": num_classes,
            "batch": synthetic_batch(batch, input_shape, num_classes)}


def compiled_step(name: str, *, batch: int, dtype: str, image_size: int | None = None,
                  extra_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds and compiles one model's train step.

    Returns ``{"run": run_one_step, "compile_s", "flops_per_step", "input_shape",
    "state": lambda: current state}``; ``run_one_step()`` does one update on the synthetic
    batch and blocks until it is done.
    """
    pieces = build_train_step(name, batch=batch, dtype=dtype, image_size=image_size,
                              extra_kwargs=extra_kwargs)
    data = pieces["batch"]
    start = time.perf_counter()
    compiled = pieces["step"].lower(pieces["state"], data).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    holder = {"state": pieces["state"]}

    def run_one_step():
        holder["state"] = compiled(holder["state"], data)
        block(holder["state"].step)

    return {"run": run_one_step, "compile_s": compile_s,
            "flops_per_step": float((cost or {}).get("flops", 0.0)),
            "input_shape": pieces["input_shape"], "state": lambda: holder["state"]}


def measure(name: str, *, batch: int, dtype: str, repeats: int, image_size: int | None = None,
            extra_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile time, step time and throughput of one model's train step."""
    step = compiled_step(name, batch=batch, dtype=dtype, image_size=image_size,
                         extra_kwargs=extra_kwargs)
    timing = time_calls(step["run"], repeats=repeats, warmup=2)
    flops = step["flops_per_step"]
    loss_sum = float(np.asarray(step["state"]().sums["loss_sum"]))
    return {
        "model": name,
        "input_shape": list(step["input_shape"]),
        "batch": batch,
        "dtype": dtype,
        "compile_s": step["compile_s"],
        "step_time_s": timing["median"],
        "step_time_min_s": timing["min"],
        "step_cpu_s": timing["cpu_median"],
        "examples_per_s": batch / timing["median"],
        "examples_per_cpu_s": batch / max(timing["cpu_median"], 1e-9),
        "flops_per_step": flops,
        "achieved_tflops": flops / timing["median"] / 1e12 if flops else None,
        "repeats": repeats,
        "loss_finite": bool(np.isfinite(loss_sum)),
        **({"kwargs": extra_kwargs} if extra_kwargs else {}),
    }


def torch_baseline(batch: int, repeats: int, image_size: int) -> dict[str, Any]:
    """Runs ``torch_resnet18.py`` in a subprocess (torch never enters this process)."""
    if importlib.util.find_spec("torch") is None:
        return {"error": "torch is not installed (pip install torch==2.13.0, the bench extra)"}
    command = [sys.executable, str(TORCH_SCRIPT), "--batch", str(batch), "--repeats",
               str(repeats), "--image-size", str(image_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(BENCH_MODELS),
                        help=f"repeat for several (default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--image-size", type=int, default=None,
                        help="override every model's input size (e.g. 64 for a quick run)")
    parser.add_argument("--torch", action="store_true",
                        help="also time PyTorch eager ResNet-18 (CIFAR stem) at the same batch")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    names = args.model or list(DEFAULT_MODELS)
    repeats = args.repeats or (2 if args.quick else 10)

    results, targets = [], []
    for name in names:
        batch = args.batch or default_batch(name, platform, args.quick)
        image_size = args.image_size
        if args.quick and image_size is None and BENCH_MODELS[name][1][0] > 64:
            image_size = 64
        try:
            results.append(measure(name, batch=batch, dtype=args.dtype, repeats=repeats,
                                   image_size=image_size))
        except Exception as exc:  # a benchmark item that cannot run is recorded, not fatal
            results.append({"model": name, "batch": batch, **error_entry(exc)})
        print(json.dumps(results[-1]), file=sys.stderr)

    payload: dict[str, Any] = {"benchmark": "train_throughput", "results": results}
    by_name = {result["model"]: result for result in results if "error" not in result}
    if args.torch and "resnet18" in by_name:
        ours = by_name["resnet18"]
        torch_result = torch_baseline(ours["batch"], repeats, ours["input_shape"][0])
        payload["torch_resnet18"] = torch_result
        ratio = (ours["examples_per_s"] / torch_result["examples_per_s"]
                 if "examples_per_s" in torch_result else None)
        cpu_ratio = (ours["examples_per_cpu_s"] / torch_result["examples_per_cpu_s"]
                     if "examples_per_cpu_s" in torch_result else None)
        targets.append(target(f"resnet18 cifar b{ours['batch']} {ours['dtype']}: gapjax / "
                              "torch eager examples/s (wall)", ratio, 1.0,
                              higher_is_better=True, unit="x"))
        targets.append(target(f"resnet18 cifar b{ours['batch']} {ours['dtype']}: gapjax / "
                              "torch eager examples per CPU-second", cpu_ratio, 1.0,
                              higher_is_better=True, unit="x"))
    if platform == "gpu" and "resnet50" in by_name:
        resnet50 = by_name["resnet50"]
        targets.append(target(f"resnet50 {resnet50['dtype']} b{resnet50['batch']} "
                              f"{resnet50['input_shape'][0]}px images/s",
                              resnet50["examples_per_s"], GPU_RESNET50_TARGET,
                              higher_is_better=True))
    payload["targets"] = targets
    emit(payload, args.out)


if __name__ == "__main__":
    main()
