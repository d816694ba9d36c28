"""Gradient flow in multi-label training: GMP is winner-takes-all, GAP a gradient democracy.

Claim (the seed): with global max pooling one position per channel receives gradient and
the labels of an image collide there; with global average pooling every position learns
and the conflicts between labels are averaged out.

Method: the project's cnn is trained on ``gapjax_multilabel_digits`` (2 to 4 distinct
digits per canvas, sigmoid binary cross-entropy) once per pool in ``POOLS_COMPARED``
(gap, gmp, lse with learnable r from 10, gem with learnable p from 3), with the gradient
diagnostics of ``gapjax.gradflow`` logged every ``config.gradflow_every`` steps
(``train/grad_*``). After training, the diagnostics are measured once more on the first
test canvases (``diagnostic_batches`` x ``DIAGNOSTIC_EXAMPLES``), and the table reports
them with the test mAP:

* coverage / entropy / Gini: spread of each label's gradient over the positions of the
  pre-pool feature map, per (label, image, channel) (coverage: share of positions above
  1e-3 of the slice's max; 1 = every position, ``1 / (h w)`` = one position);
* early coverage: the same at the output of the first convolution;
* conflict: cosine similarity of per-label gradients on the backbone parameters (mean, and
  the fraction of label pairs with a negative cosine);
* collision rate: share of (image, channel, pair of positive labels using the channel)
  where both labels put a majority of their gradient on the same position.

The claim is judged in three parts: (1) GMP coverage is exactly one position per channel
(``1 / (h w)``) and GAP coverage is 1; (2) GMP labels collide (rate >= ``COLLIDE``) while
GAP's do not (rate <= ``NO_COLLIDE``); (3) "conflicts are averaged out": GAP's per-label
backbone gradients agree more than GMP's (higher mean cosine and a smaller share of
negative pairs). Parts (1) and (2) follow from the pools' definitions and test the tools
on trained networks; part (3) is the empirical one.

``python -m gapjax.experiments.gradient_flow --out DIR [--full]`` writes
``gradient_flow.md`` (table and verdict), ``gradient_flow.json`` (all numbers) and
``gradient_flow_coverage.png`` (coverage over training) into ``DIR``; training runs live in
``DIR/runs/<pool>`` and are resumed, not repeated, when the command is run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from gapjax import gradflow
from gapjax.data import dataset_info, make_iterator
from gapjax.experiments import common
from gapjax.pooling import POOLS
from gapjax.train.metrics import read_metrics

DATASET = "gapjax_multilabel_digits"
#: The pools compared, in table order.
POOLS_COMPARED = ("gap", "gmp", "lse", "gem")
#: Test canvases per diagnostic batch: the training hook's default, so the hook's compiled
#: function serves the final measurement too.
DIAGNOSTIC_EXAMPLES = gradflow.DEFAULT_MAX_EXAMPLES
#: Collision rates that count as "labels collide" (GMP) and "labels do not collide" (GAP).
COLLIDE, NO_COLLIDE = 0.5, 0.05

#: Run sizes. Quick: 32x32 canvases and a half-width cnn (8x8 feature map), which trains
#: the four pools within a few minutes on 2 CPU cores; full: 64x64 canvases, the default
#: cnn (16x16 feature map) and 3000 steps.
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"canvas_size": 32, "widths": (16, 32, 64), "batch_size": 32, "steps": 240,
           "gradflow_every": 40, "learning_rate": 3e-3, "diagnostic_batches": 4},
    False: {"canvas_size": 64, "widths": (32, 64, 128), "batch_size": 64, "steps": 3000,
            "gradflow_every": 150, "learning_rate": 2e-3, "diagnostic_batches": 32},
}


def make_config(pool: str = "gap", quick: bool = False) -> ml_collections.ConfigDict:
    """The multi-label pooling config: cnn with a GAP-style head using ``pool``.

    ``configs/multilabel_pooling.py`` returns ``make_config(pool, quick=False)``; the
    experiment trains ``make_config(pool, quick)`` for every pool in ``POOLS_COMPARED``.
    """
    if pool not in POOLS:
        raise ValueError(f"config.model.pool={pool!r} is not a pool; choose one of: "
                         f"{', '.join(POOLS.names(aliases=True))}")
    settings = SETTINGS[bool(quick)]
    config = common.quick_config(
        DATASET, "cnn", steps=settings["steps"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], optimizer="adamw", weight_decay=1e-4,
        augment=False, dataset_options={"canvas_size": settings["canvas_size"]},
        pool=pool, head="gap", widths=settings["widths"],
    )
    config.gradflow_every = settings["gradflow_every"]
    config.log_every = settings["gradflow_every"]
    return config


def training_curves(records: list[dict[str, Any]], key: str = "train/grad_coverage"
                    ) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one logged metric, in step order (last record of a step wins,
    so a resumed run does not repeat points)."""
    by_step = {int(record["step"]): float(record[key]) for record in records if key in record}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def final_diagnostics(result: Any, config: ml_collections.ConfigDict,
                      batches: int) -> dict[str, float]:
    """``gapjax.gradflow`` diagnostics of a trained run on the first ``batches`` test batches
    of ``DIAGNOSTIC_EXAMPLES`` canvases (averaged; the collision rate weighted by its
    triples), plus the number of positions ``h * w`` of the pre-pool feature map.

    The batches have the size the training hook uses, so its compiled function is reused.
    """
    info = dataset_info(config.dataset)
    iterator = make_iterator(config.dataset, info.eval_split, batch_size=DIAGNOSTIC_EXAMPLES,
                             seed=0, train=False, process_index=0, process_count=1)
    measured: list[dict[str, float]] = []
    for batch in iterator:
        measured.append(gradflow.training_diagnostics(
            result.model, result.variables, batch, info.task, max_examples=DIAGNOSTIC_EXAMPLES))
        if len(measured) == batches:
            break
    values = {key: float(np.mean([m[key] for m in measured])) for key in measured[0]}
    triples = np.array([m["collision_triples"] for m in measured])
    rates = np.array([m["collision_rate"] for m in measured])
    values["collision_triples"] = float(triples.sum())
    values["collision_rate"] = float((rates * triples).sum() / max(triples.sum(), 1.0))
    features = jax.eval_shape(
        lambda v, x: result.model.apply(v, x, train=False, method="forward_features"),
        result.variables, batch["image"][:1])
    values["positions"] = int(features.shape[1] * features.shape[2])
    return values


def plot_coverage(curves: dict[str, tuple[list[int], list[float]]],
                  early: dict[str, tuple[list[int], list[float]]], out_dir: Path) -> str:
    """Coverage of the feature map and of the first convolution over training, per pool."""
    fig, axes = common.new_figure(2, width=5.0, height=3.6)
    for index, pool in enumerate(curves):
        color = common.PALETTE[index % len(common.PALETTE)]
        axes[0].plot(*curves[pool], marker="o", markersize=3, color=color, label=pool)
        axes[1].plot(*early[pool], marker="o", markersize=3, color=color, label=pool)
    axes[0].set_title("pre-pool feature map")
    axes[1].set_title("first convolution")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylabel("gradient coverage")
        ax.set_ylim(0.0, 1.05)
        ax.legend(frameon=False)
    return common.save_figure(fig, out_dir, "gradient_flow_coverage.png")


def judge(rows: dict[str, dict[str, float]]) -> tuple[bool, dict[str, bool], str]:
    """Decides the three parts of the claim from the per-pool diagnostics; returns
    ``(holds, parts, verdict text with the numbers)``."""
    gap, gmp = rows["gap"], rows["gmp"]
    positions = gmp["positions"]
    parts = {
        "gmp_one_position": abs(gmp["coverage"] - 1.0 / positions) <= 1e-6,
        "gap_every_position": gap["coverage"] >= 1.0 - 1e-6,
        "gmp_labels_collide": gmp["collision_rate"] >= COLLIDE,
        "gap_labels_do_not_collide": gap["collision_rate"] <= NO_COLLIDE,
        "gap_conflicts_averaged_out": (gap["conflict_mean"] > gmp["conflict_mean"]
                                       and gap["conflict_negative"] < gmp["conflict_negative"]),
    }
    spread = (
        f"Spread: GMP coverage {gmp['coverage']:.4f} = {gmp['coverage'] * positions:.2f} of "
        f"{positions} positions per channel (entropy {gmp['entropy']:.3f}, Gini "
        f"{gmp['gini']:.3f}); GAP coverage {gap['coverage']:.4f} (entropy {gap['entropy']:.3f},"
        f" Gini {gap['gini']:.3f}). At the first convolution: GMP {gmp['early_coverage']:.3f},"
        f" GAP {gap['early_coverage']:.3f}.")
    collide = (
        f"Collisions: GMP {gmp['collision_rate']:.3f} vs GAP {gap['collision_rate']:.3f} "
        f"(over {gmp['collision_triples']:.0f} and {gap['collision_triples']:.0f} image-channel-"
        "label-pair triples).")
    conflict = (
        f"Conflict on the backbone: mean cosine GAP {gap['conflict_mean']:.3f} vs GMP "
        f"{gmp['conflict_mean']:.3f}; negative pairs GAP {gap['conflict_negative']:.3f} vs GMP "
        f"{gmp['conflict_negative']:.3f}.")
    early_gap = abs(gmp["early_coverage"] - gap["early_coverage"])
    if early_gap < 0.05:
        spread += (" So the one-position bottleneck of GMP does not reach the first "
                   "convolution: there the pools differ by only "
                   f"{early_gap:.3f} in coverage (the arg-max positions of all channels and "
                   "their receptive fields together cover the canvas; ReLU zeros bound both).")
    holds = all(parts.values())
    failed = [name for name, ok in parts.items() if not ok]
    summary = ("The claim holds." if holds else
               "The claim does not hold in full; failed parts: " + ", ".join(failed) + ".")
    return holds, parts, " ".join([summary, spread, collide, conflict])


def run(out_dir: Path | str, quick: bool = True) -> dict[str, Any]:
    """Trains the cnn with each pool, measures the diagnostics, writes the table and plot.

    Returns a report section (``common.section``) whose ``numbers`` hold the per-pool rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, float]] = {}
    curves, early_curves = {}, {}
    for pool in POOLS_COMPARED:
        config = make_config(pool, quick)
        workdir = out_dir / "runs" / pool
        result = common.train(config, workdir)
        records = read_metrics(workdir)
        curves[pool] = training_curves(records)
        early_curves[pool] = training_curves(records, "train/grad_early_coverage")
        final = final_diagnostics(result, config, SETTINGS[bool(quick)]["diagnostic_batches"])
        maps = [record["eval/map"] for record in records if "eval/map" in record]
        final["map"] = float(result.metrics.get("eval/map", maps[-1] if maps else float("nan")))
        rows[pool] = final
    figure = plot_coverage(curves, early_curves, out_dir)
    holds, parts, verdict = judge(rows)

    columns = ["pool", "map", "coverage", "entropy", "gini", "early_coverage", "conflict_mean",
               "conflict_negative", "collision_rate"]
    table = common.records_table([{"pool": pool, **values} for pool, values in rows.items()],
                                 columns)
    settings = SETTINGS[bool(quick)]
    method = (
        f"cnn (widths {settings['widths']}, GAP-style head with the given pool) on "
        f"{DATASET} {settings['canvas_size']}x{settings['canvas_size']}, AdamW "
        f"lr {settings['learning_rate']} + cosine, batch {settings['batch_size']}, "
        f"{settings['steps']} steps, sigmoid BCE; diagnostics every "
        f"{settings['gradflow_every']} steps on {DIAGNOSTIC_EXAMPLES} training canvases and "
        f"at the end on {settings['diagnostic_batches']} x {DIAGNOSTIC_EXAMPLES} test canvases "
        f"(the table); feature map "
        f"{rows['gmp']['positions']} positions; mAP on the test split.")
    claim = ("GMP: one position per channel gets gradient and the labels collide there; "
             "GAP: every position learns and conflicts between labels are averaged out.")
    markdown = "\n\n".join([
        "# Gradient flow: GAP vs GMP in multi-label training", f"Claim: {claim}",
        f"Method: {method}", table, f"![coverage over training]({figure})",
        f"Verdict: {verdict}",
    ])
    (out_dir / "gradient_flow.md").write_text(markdown + "\n")
    numbers = {"rows": rows, "parts": parts, "settings": settings,
               "curves": {pool: {"step": steps, "coverage": values}
                          for pool, (steps, values) in curves.items()}}
    (out_dir / "gradient_flow.json").write_text(
        json.dumps(common.to_jsonable({"holds": holds, "verdict": verdict, **numbers}),
                   indent=2) + "\n")
    return common.section(
        "Gradient flow: GAP vs GMP (multi-label)", claim=claim, method=method,
        markdown=table, numbers=numbers, holds=holds, verdict=verdict, figures=[figure],
    )


if __name__ == "__main__":
    common.experiment_cli(run, __doc__, full_help="64x64 canvases, longer training")
