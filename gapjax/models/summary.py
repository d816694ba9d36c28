"""Parameter and FLOP summary of a classifier, and the FC-versus-GAP head table.

``summary(model, input_shape)`` counts parameters without running anything (shapes come
from ``jax.eval_shape``) and takes the FLOPs of one inference forward pass from XLA's
cost analysis of the compiled function (a multiply-add counts as 2 FLOPs).

CLI::

    python -m gapjax.models.summary vgg16                  # FC and GAP heads, 224x224
    python -m gapjax.models.summary resnet50 --pool gem
    python -m gapjax.models.summary cnn --input 64 --channels 1 --num_classes 10
    python -m gapjax.models.summary resnet18 --head fc --input 32 --stem cifar
    python -m gapjax.models.summary mobilenetv3_large_100   # also efficientnet_b*, regnety_*,
                                                            # convnext_*

It prints one row per head (parameters total / backbone / head and GFLOPs) and, when both
heads are shown, the ratio of FC head to GAP head parameters. Both heads read the same
final map; the GAP head's count includes what follows the pool (MobileNetV3's
``pre_logits``, ConvNeXt's LayerNorm).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.models.zoo import get

HEAD_KEY = "head"


def count_params(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays or shape structs."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))


def _full_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(dim) for dim in input_shape)
    if len(shape) == 3:
        return (1, *shape)
    if len(shape) == 4:
        return shape
    raise ValueError(
        f"input_shape must be (height, width, channels) or (batch, height, width, channels); "
        f"got {shape}"
    )


def summary(
    model: nn.Module, input_shape: Sequence[int], *, flops: bool = True
) -> dict[str, Any]:
    """Parameter counts and forward FLOPs of an image classifier.

    Args:
      model: a classifier whose head is the submodule named ``head``.
      input_shape: ``(H, W, C)`` (batch 1) or ``(B, H, W, C)``.
      flops: compile the forward pass for XLA's FLOP count (False skips compilation).

    Returns:
      ``{"params_total", "params_backbone", "params_head", "flops", "input_shape",
      "feature_shape"}``: counts of trainable parameters (BatchNorm statistics excluded),
      FLOPs of ``apply(variables, x, train=False)`` for the whole batch (None when
      ``flops=False``), and the shape of the pre-pool feature map.
    """
    shape = _full_shape(input_shape)
    inputs = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), inputs)
    params = variables["params"]
    head_params = count_params(params.get(HEAD_KEY, {}))
    total = count_params(params)

    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, method="forward_features"), variables, inputs)
    feature_shape = tuple(features.shape)

    flop_count = None
    if flops:
        compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
            variables, inputs
        ).compile()
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
            analysis = analysis[0] if analysis else {}
        flop_count = float(analysis.get("flops", 0.0)) if analysis else None
    return {
        "params_total": total,
        "params_backbone": total - head_params,
        "params_head": head_params,
        "flops": flop_count,
        "input_shape": shape,
        "feature_shape": feature_shape,
    }


def head_table(
    name: str,
    *,
    input_size: int = 224,
    channels: int = 3,
    num_classes: int = 1000,
    heads: Sequence[str] = ("gap", "fc"),
    pool: str = "gap",
    flops: bool = True,
    **model_kwargs: Any,
) -> list[dict[str, Any]]:
    """``summary`` of model ``name`` once per head; rows carry ``head`` and ``pool`` too."""
    rows = []
    for head in heads:
        kwargs = dict(model_kwargs, head=head)
        if head == "gap":
            kwargs["pool"] = pool
        model = get(name, num_classes=num_classes, **kwargs)
        row = summary(model, (input_size, input_size, channels), flops=flops)
        rows.append({"head": head, "pool": pool if head == "gap" else "-", **row})
    return rows


def head_ratio(rows: Sequence[dict[str, Any]]) -> float | None:
    """FC head parameters / GAP head parameters, when both rows are present."""
    by_head = {row["head"]: row for row in rows}
    if "fc" not in by_head or "gap" not in by_head or not by_head["gap"]["params_head"]:
        return None
    return by_head["fc"]["params_head"] / by_head["gap"]["params_head"]


def format_table(name: str, rows: Sequence[dict[str, Any]]) -> str:
    """The printed table: one line per head, then the FC/GAP head ratio."""
    first = rows[0]
    _, height, width, channels = first["input_shape"]
    feature = "x".join(str(dim) for dim in first["feature_shape"][1:])
    lines = [
        f"{name}: input {height}x{width}x{channels}, feature map {feature}",
        f"{'head':<5} {'pool':<10} {'params total':>14} {'backbone':>14} {'head':>14} "
        f"{'GFLOPs':>9}",
    ]
    for row in rows:
        gflops = "-" if row["flops"] is None else f"{row['flops'] / 1e9:.3f}"
        lines.append(
            f"{row['head']:<5} {row['pool']:<10} {row['params_total']:>14,} "
            f"{row['params_backbone']:>14,} {row['params_head']:>14,} {gflops:>9}"
        )
    ratio = head_ratio(rows)
    if ratio is not None:
        lines.append(f"FC/GAP head parameters: {ratio:.1f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gapjax.models.summary",
        description="Parameters (backbone / head) and forward FLOPs with FC and GAP heads.",
    )
    parser.add_argument("name", help="a gapjax.models.MODELS name, e.g. vgg16, resnet50, cnn")
    parser.add_argument("--head", choices=("gap", "fc", "both"), default="both",
                        help="which head(s) to summarise (default both, with the ratio)")
    parser.add_argument("--pool", default="gap", help="POOLS name of the GAP head")
    parser.add_argument("--input", type=int, default=224, help="input height = width")
    parser.add_argument("--channels", type=int, default=3, help="input channels")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--stem", choices=("imagenet", "cifar"), default=None,
                        help="model stem (default: the model's own)")
    parser.add_argument("--no-flops", action="store_true", help="skip compiling for FLOPs")
    args = parser.parse_args(argv)

    heads = ("gap", "fc") if args.head == "both" else (args.head,)
    model_kwargs = {} if args.stem is None else {"stem": args.stem}
    try:
        rows = head_table(
            args.name, input_size=args.input, channels=args.channels,
            num_classes=args.num_classes, heads=heads, pool=args.pool,
            flops=not args.no_flops, **model_kwargs,
        )
    except (KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(args.name, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
