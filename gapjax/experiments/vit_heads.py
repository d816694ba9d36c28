"""ViT heads over patches: class token vs GAP vs MAP (vs GeM), for accuracy and for maps.

Claim: in a Vision Transformer trained with class labels only, pooling the patch tokens
(GAP, or multihead attention pooling MAP) classifies about as well as reading a class
token, and its exact maps (GAP's class activation maps on the patch grid, MAP's
contribution maps) localize the object at least as well as what the class token offers
(Grad-CAM on the last block's patch tokens, attention rollout).

Measured here: a small ViT (ViT-Ti's blocks at width 64, depth 4, 4 heads; patch 8 on low
clutter in quick mode, patch 4 on medium clutter with --full) on the embedded cluttered
digits, once per head and seed: test accuracy, MaxBoxAccV2 of each map
kind for the true class (``gapjax.wsol``: multi-contour boxes, mean over IoU 0.3 / 0.5 /
0.7, thresholds 0..0.99), parameters (head and total), and the time of one training step
(forward + backward, the batch of the run, median of repeats, after compilation). Maps:
``token``: Grad-CAM and rollout; ``gap``: CAM (exact) and rollout; ``map``: contribution
(exact) and rollout; ``gem``: Grad-CAM and rollout. Numbers are means over seeds with
their standard deviation.

``python -m gapjax.experiments.vit_heads --out DIR [--full]``
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from gapjax import cam, wsol
from gapjax.data import make_iterator
from gapjax.experiments import common

HEADS = ("token", "gap", "map", "gem")
#: ``gapjax.cam`` methods scored per head: the exact one (if any) or Grad-CAM, then rollout.
MAPS_PER_HEAD = {
    "token": ("grad_cam", "rollout"),
    "gap": ("cam", "rollout"),
    "map": ("contribution", "rollout"),
    "gem": ("grad_cam", "rollout"),
}
MAP_LABELS = {"cam": "CAM (exact)", "contribution": "contribution (exact)",
              "grad_cam": "Grad-CAM", "rollout": "rollout"}
#: The small ViT: ViT-Ti's layout at digit scale (the patch size is per mode).
VIT = {"width": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
#: Per mode: steps, batch, learning rate, canvas, clutter, patch size, seeds. A ViT learns
#: the cluttered digits slowly (300 steps on medium clutter stay at chance), so the quick
#: mode uses low clutter and 8-pixel patches (a 4x4 grid: 16 tokens, fast steps).
RUNS = {
    True: {"steps": 600, "batch_size": 64, "learning_rate": 2e-3, "canvas_size": 32,
           "clutter": "low", "patch_size": 8, "seeds": (0, 1)},
    False: {"steps": 5000, "batch_size": 64, "learning_rate": 1e-3, "canvas_size": 64,
            "clutter": "medium", "patch_size": 4, "seeds": (0, 1, 2)},
}
#: A pooled head "classifies about as well" when its mean accuracy is within this many
#: points of the class token's, or above it.
ACCURACY_TOLERANCE = 3.0
#: Standard errors (over seeds, of the difference) within which two MaxBoxAccV2 tie.
TIE_STANDARD_ERRORS = 2.0
#: Chance accuracy on the ten digit classes; a comparison needs every head to beat twice
#: it (a model at chance has no object to localize, its maps say nothing).
CHANCE_ACCURACY = 10.0
LEARNED_FACTOR = 2.0


# --------------------------------------------------------------------------------------
# Configs and measurements
# --------------------------------------------------------------------------------------


def vit_config(head: str, seed: int, quick: bool, data_dir: Path | str | None = None,
               steps: int | None = None, dataset_options: dict[str, Any] | None = None) -> Any:
    """The training config of one run: the small ViT with ``head`` on cluttered digits."""
    run = RUNS[quick]
    options = {"canvas_size": run["canvas_size"], "clutter": run["clutter"],
               **(dataset_options or {})}
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    config = common.quick_config(
        common.CLUTTERED, "vit_ti16", steps=steps or run["steps"],
        batch_size=run["batch_size"], learning_rate=run["learning_rate"], seed=seed,
        dataset_options=options, pool=head, class_token=head == "token",
        image_size=run["canvas_size"], patch_size=run["patch_size"], **VIT)
    config.optimizer.grad_clip = 1.0
    return config


def test_split(dataset_config: Any, limit: int | None = None) -> dict[str, np.ndarray]:
    """The test images, labels and boxes of one ordered pass (padding dropped)."""
    parts: dict[str, list[np.ndarray]] = {"image": [], "label": [], "bbox": []}
    for batch in make_iterator(dataset_config, "test", batch_size=250, seed=0, train=False,
                               process_index=0, process_count=1):
        real = np.asarray(batch["weight"]) > 0
        for key in parts:
            parts[key].append(np.asarray(batch[key])[real])
    data = {key: np.concatenate(values) for key, values in parts.items()}
    return data if limit is None else {key: value[:limit] for key, value in data.items()}


def true_class_maps(model: Any, variables: Any, images: np.ndarray, labels: np.ndarray,
                    method: str, batch_size: int = 250) -> np.ndarray:
    """Maps ``[N, H, W]`` of the true class (rollout: class-agnostic) by ``gapjax.cam``,
    bilinear to the input size and min-max normalised."""
    map_fn = cam.make_map_fn(model, method)
    return np.concatenate([
        np.asarray(map_fn(variables, images[start:start + batch_size],
                          labels[start:start + batch_size]).maps)
        for start in range(0, len(images), batch_size)])


def step_seconds(model: Any, variables: Any, images: np.ndarray, labels: np.ndarray,
                 repeats: int = 7) -> float:
    """Median seconds of one jitted forward + backward pass (softmax cross-entropy, train
    mode with dropout rngs) on this batch, after compilation."""
    params = variables["params"]
    rest = {key: value for key, value in variables.items() if key != "params"}

    def loss(p, x, y):
        logits = model.apply({"params": p, **rest}, x, train=True,
                             rngs={"dropout": jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_fn = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad_fn(params, images, labels))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad_fn(params, images, labels))
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def measure_run(result: Any, config: Any, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy, parameters, step time and MaxBoxAccV2 per map kind of one trained run."""
    head = config.model.pool
    model, variables = result.model, result.variables
    params = variables["params"]
    record: dict[str, Any] = {
        "head": head, "seed": int(config.seed),
        "accuracy": 100.0 * float(result.metrics.get("eval/accuracy", float("nan"))),
        "head_parameters": common.parameter_count(params.get("head", {})),
        "parameters": common.parameter_count(params),
    }
    batch = int(config.batch_size)
    record["step_ms"] = 1000.0 * step_seconds(model, variables, data["image"][:batch],
                                              data["label"][:batch])
    for method in MAPS_PER_HEAD[head]:
        maps = true_class_maps(model, variables, data["image"], data["label"], method)
        record[f"max_box_acc_v2/{method}"] = 100.0 * wsol.max_box_acc_v2(maps, data["bbox"])
    return record


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (head, map kind): means and standard deviations over seeds."""
    rows = []
    for head in HEADS:
        runs = [r for r in records if r["head"] == head]
        if not runs:
            continue
        for method in MAPS_PER_HEAD[head]:
            scores = [r[f"max_box_acc_v2/{method}"] for r in runs]
            accuracies = [r["accuracy"] for r in runs]
            rows.append({
                "head": head, "maps": MAP_LABELS[method], "method": method,
                "accuracy": statistics.fmean(accuracies), "accuracy_std": _std(accuracies),
                "max_box_acc_v2": statistics.fmean(scores), "max_box_acc_v2_std": _std(scores),
                "head_parameters": runs[0]["head_parameters"],
                "parameters": runs[0]["parameters"],
                "step_ms": statistics.fmean(r["step_ms"] for r in runs),
                "seeds": len(runs),
            })
    return rows


def _std(values: Sequence[float]) -> float:
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def _standard_error(row: dict[str, Any], key: str) -> float:
    return row[f"{key}_std"] / math.sqrt(max(row["seeds"], 1))


def verdict_of(rows: Sequence[dict[str, Any]]) -> tuple[bool | None, str]:
    """Whether the claim holds on these rows, and the sentence that says why."""
    by = {(row["head"], row["method"]): row for row in rows}
    needed = [("token", "grad_cam"), ("token", "rollout"), ("gap", "cam"),
              ("map", "contribution")]
    if any(key not in by for key in needed):
        return None, "Not every head ran; no verdict."
    token_best = max((by[("token", "grad_cam")], by[("token", "rollout")]),
                     key=lambda row: row["max_box_acc_v2"])
    floor = LEARNED_FACTOR * CHANCE_ACCURACY
    untrained = sorted({row["head"] for row in rows if row["accuracy"] < floor})
    lines, ok = [], True
    for head, method in (("gap", "cam"), ("map", "contribution")):
        row = by[(head, method)]
        accurate = row["accuracy"] >= by[("token", "grad_cam")]["accuracy"] - ACCURACY_TOLERANCE
        tie = TIE_STANDARD_ERRORS * math.hypot(_standard_error(row, "max_box_acc_v2"),
                                               _standard_error(token_best, "max_box_acc_v2"))
        localizes = row["max_box_acc_v2"] >= token_best["max_box_acc_v2"] - tie
        ok = ok and accurate and localizes
        lines.append(
            f"{head.upper()} {row['accuracy']:.1f}% accuracy vs token "
            f"{by[('token', 'grad_cam')]['accuracy']:.1f}% "
            f"({'within' if accurate else 'NOT within'} {ACCURACY_TOLERANCE:.0f} points); its "
            f"{MAP_LABELS[method]} maps reach MaxBoxAccV2 {row['max_box_acc_v2']:.1f}% vs the "
            f"token's best ({MAP_LABELS[token_best['method']]}) "
            f"{token_best['max_box_acc_v2']:.1f}% ({'at least as good' if localizes else 'worse'}"
            f", tie band {tie:.1f})")
    gem = by.get(("gem", "grad_cam"))
    if gem is not None:
        lines.append(f"GeM (Grad-CAM only): {gem['accuracy']:.1f}% accuracy, MaxBoxAccV2 "
                     f"{gem['max_box_acc_v2']:.1f}%")
    if untrained:
        return None, (f"Inconclusive: {', '.join(untrained)} stayed below {floor:.0f}% test "
                      f"accuracy ({LEARNED_FACTOR:.0f}x chance), so their maps explain "
                      "nothing; train longer (--full). Measured: " + "; ".join(lines) + ".")
    return ok, "; ".join(lines) + "."


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------


def plot(rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "vit_heads.png") -> str:
    """Accuracy per head, MaxBoxAccV2 per (head, maps) with seed spread, step time."""
    fig, axes = common.new_figure(3, width=4.4, height=3.8)
    heads = [head for head in HEADS if any(row["head"] == head for row in rows)]
    first = {head: next(row for row in rows if row["head"] == head) for head in heads}
    positions = np.arange(len(heads))
    axes[0].bar(positions, [first[h]["accuracy"] for h in heads],
                yerr=[first[h]["accuracy_std"] for h in heads], capsize=3,
                color=common.PALETTE[0])
    axes[0].set_xticks(positions, heads)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 105)
    axes[0].set_title("Accuracy (mean, std over seeds)")
    labels = [f"{row['head']}\n{row['maps'].replace(' (exact)', '*')}" for row in rows]
    spots = np.arange(len(rows))
    colours = [common.PALETTE[heads.index(row["head"]) % len(common.PALETTE)] for row in rows]
    axes[1].bar(spots, [row["max_box_acc_v2"] for row in rows],
                yerr=[row["max_box_acc_v2_std"] for row in rows], capsize=3, color=colours)
    axes[1].set_xticks(spots, labels, fontsize=7)
    axes[1].set_ylabel("MaxBoxAccV2 (%)")
    axes[1].set_ylim(0, 100)
    axes[1].set_title("Maps of the true class (* exact)")
    common.bar_chart(axes[2], heads, {"step (ms)": [first[h]["step_ms"] for h in heads]},
                     "ms per training step (fwd + bwd)")
    axes[2].set_title("Step time")
    return common.save_figure(fig, out_dir, name)


# --------------------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------------------


def run(out_dir: Path | str, quick: bool = True, *, heads: Sequence[str] = HEADS,
        seeds: Sequence[int] | None = None, steps: int | None = None,
        test_examples: int | None = None,
        dataset_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains the small ViT once per head and seed, measures, writes ``vit_heads.md``,
    ``vit_heads.json`` and ``vit_heads.png`` into ``out_dir``; returns the report section.
    ``heads``, ``seeds``, ``steps``, ``test_examples`` and ``dataset_options`` (e.g. a
    smaller ``num_train``) shrink the run (tests)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    watch = common.Stopwatch()
    seeds = tuple(RUNS[quick]["seeds"] if seeds is None else seeds)
    records, data, config = [], None, None
    for head in heads:
        for seed in seeds:
            config = vit_config(head, seed, quick, out_dir / "tfds", steps, dataset_options)
            result = common.train(config, out_dir / "runs" / common.run_name(config))
            if data is None:
                data = test_split(config.dataset, test_examples)
            records.append(measure_run(result, config, data))
    rows = summarize(records)
    columns = ["head", "maps", "accuracy", "accuracy_std", "max_box_acc_v2",
               "max_box_acc_v2_std", "head_parameters", "parameters", "step_ms", "seeds"]
    table = common.records_table(rows, columns, digits=3)
    figure = plot(rows, out_dir)
    holds, verdict = verdict_of(rows)
    numbers = {"rows": rows, "runs": records, "steps": int(config.total_steps),
               "canvas_size": int(config.dataset.canvas_size), "vit": VIT,
               "patch_size": int(config.model.patch_size), "clutter": config.dataset.clutter,
               "test_examples": len(data["label"]), "seconds": watch.elapsed()}
    (out_dir / "vit_heads.md").write_text(table + "\n")
    (out_dir / "vit_heads.json").write_text(json.dumps(common.to_jsonable(numbers), indent=1))
    return common.section(
        "ViT heads: class token vs GAP vs MAP",
        claim=("Pooling a ViT's patch tokens (GAP, MAP) classifies about as well as a class "
               f"token (within {ACCURACY_TOLERANCE:.0f} points) and its exact maps (GAP's CAM, "
               "MAP's contributions) localize at least as well as the class token's Grad-CAM "
               "or attention rollout. Undecided while any head is below twice chance "
               "accuracy."),
        method=(f"vit_ti16 layout at width {VIT['width']}, depth {VIT['depth']}, "
                f"{VIT['num_heads']} heads, patch {config.model.patch_size} (class token only "
                f"for the token head), {config.total_steps} AdamW steps (lr "
                f"{config.optimizer.learning_rate:g}, cosine, clip 1) at batch "
                f"{config.batch_size} on {config.dataset.canvas_size}x"
                f"{config.dataset.canvas_size} cluttered digits ({config.dataset.clutter} "
                f"clutter), seeds {list(seeds)}. "
                "MaxBoxAccV2 of the true class's maps (bilinear to the input, min-max "
                "normalised) over the test split; step time = one jitted forward + backward "
                "pass at the training batch (median of 7). Ties: within "
                f"{TIE_STANDARD_ERRORS:.0f} standard errors over seeds."),
        markdown=table,
        numbers=numbers,
        holds=holds,
        verdict=verdict,
        figures=[figure],
    )


def main() -> None:
    common.experiment_cli(run, __doc__)


if __name__ == "__main__":
    main()
