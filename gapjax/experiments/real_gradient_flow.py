"""Gradient flow of GAP and GMP heads on real multi-label images: Fashion-MNIST mosaics.

Claim (the project's seed, after the gradient_flow section on multi-label digits): with
global max pooling one position per channel receives each label's gradient and the labels
of an image collide there; with global average pooling every position learns, and the
per-label gradients on the shared backbone conflict less ("conflicts are averaged out").

Method: the cnn (one conv + BN + ReLU per stage, strides 2, 2, 2: a 7x7 map from 56x56
mosaics) with a GAP or a GMP head, trained with sigmoid binary cross-entropy on
``fashion_mosaic`` (2-4 Fashion-MNIST items of distinct classes on a 2x2 grid), AdamW +
cosine, every seed at once (``seeds.train_seeds``); a seed fixes the data order and the
backbone's initialisation, so the GAP and GMP runs of one seed are a pair. Per seed:
test mAP, and ``gapjax.gradflow``'s diagnostics on the first ``diagnostic_batches`` x 16
test mosaics (``gradient_flow.final_diagnostics``): coverage / entropy of each label's
gradient over the positions of the pre-pool map (and at the first convolution), the GMP
collision rate, and the cosine between the per-label gradients on the backbone
parameters (mean, and the share of label pairs with a negative cosine).

Decision rule (fixed before running), in three parts: (1) spread: on every seed GMP
coverage is one position per channel (1 / (h w)) and GAP coverage is every position (1);
(2) collisions: on every seed the GMP collision rate is at least ``COLLIDE`` and GAP's at
most ``NO_COLLIDE``; (3) conflict: the 95% paired t-interval over seeds of GAP - GMP mean
cosine lies above zero and that of GMP - GAP negative-pair share lies above zero (GAP's
labels pull the backbone more alike). Parts (1) and (2) follow from the pools'
definitions and check the tools on trained networks; part (3) is the empirical claim.
The claim holds when all three hold; it fails when (1) or (2) fails or either interval
of (3) lies on GMP's side of zero; otherwise (an interval containing zero) it is
undecided. mAP is reported beside it (GAP - GMP, paired), not part of the rule.

``python -m gapjax.experiments.real_gradient_flow --out DIR [--full]``
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from gapjax.experiments import common, gradient_flow, seeds
from gapjax.experiments.gradient_flow import COLLIDE, NO_COLLIDE

DATASET = "fashion_mosaic"
POOLS_COMPARED = ("gap", "gmp")
CANVAS_SIZE = 56
#: Per-seed diagnostics shown (mean ± sd) and compared (GAP - GMP, paired).
DIAGNOSTICS = ("map", "coverage", "entropy", "early_coverage", "collision_rate",
               "conflict_mean", "conflict_negative")
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"seeds": 5, "steps": 300, "batch_size": 32, "learning_rate": 3e-3,
           "widths": (16, 32, 64), "depth": 1, "mosaic_train": 4000, "mosaic_test": 500,
           "diagnostic_batches": 4},
    # For a GPU: the default 10,000 / 2,000 mosaics, about 38 epochs at batch 128.
    False: {"seeds": 8, "steps": 3000, "batch_size": 128, "learning_rate": 2e-3,
            "widths": (32, 64, 128), "depth": 2, "mosaic_train": 10000,
            "mosaic_test": 2000, "diagnostic_batches": 16},
}
PUBLISHED = (
    ("Zhou et al. 2016, Learning Deep Features for Discriminative Localization, section 2",
     "GAP vs GMP heads (GoogLeNet, ILSVRC)", "argument",
     "GAP's loss rewards every discriminative part of an object, GMP's only the most "
     "discriminative one"),
    ("this project, gradient_flow section", "multi-label digits, 1 seed",
     "conflicts averaged out (GAP's mean cosine higher, fewer negative pairs)",
     "did not hold at the report's quick scale"),
)


def model_config(pool: str, settings: dict[str, Any], data_dir: Path | str,
                 source_dir: Path | str | None = None) -> Any:
    """The multi-label cnn with a ``pool`` head on the Fashion-MNIST mosaics."""
    return common.quick_config(
        DATASET, "cnn", steps=settings["steps"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        dataset_options=common.real_dataset_options(
            data_dir, source_dir, canvas_size=CANVAS_SIZE, num_train=settings["mosaic_train"],
            num_test=settings["mosaic_test"]),
        widths=tuple(settings["widths"]), depth=settings["depth"], strides=(2, 2, 2),
        head="gap", pool=pool)


def measure(pool: str, settings: dict[str, Any], data_dir: Path,
            source_dir: Path | None) -> dict[str, Any]:
    """One pool over every seed: per-seed mAP and gradient diagnostics."""
    config = model_config(pool, settings, data_dir, source_dir)
    run = seeds.train_seeds(config, settings["seeds"])
    metrics = run.trainer.evaluate(
        run.state, seeds.evaluation_batches(config.dataset, run.info.eval_split))
    per_seed = []
    for seed in range(settings["seeds"]):
        trained = types.SimpleNamespace(model=run.trainer.model, variables=run.variables(seed))
        per_seed.append(gradient_flow.final_diagnostics(trained, config,
                                                        settings["diagnostic_batches"]))
    record: dict[str, Any] = {key: seeds.spread([values[key] for values in per_seed])
                              for key in per_seed[0]}
    record["map"] = seeds.spread(metrics["map"])
    record["positions"] = int(per_seed[0]["positions"])
    record["train_seconds"], record["train_cpu_seconds"] = run.seconds, run.cpu_seconds
    return record


def decide(records: dict[str, dict[str, Any]]) -> tuple[bool | None, dict[str, Any]]:
    """The decision rule of the module docstring; returns ``(holds, parts)``."""
    gap, gmp = records["gap"], records["gmp"]
    positions = gmp["positions"]
    parts: dict[str, Any] = {
        "gmp_one_position": all(abs(value - 1.0 / positions) <= 1e-6
                                for value in gmp["coverage"]["runs"]),
        "gap_every_position": all(value >= 1.0 - 1e-6 for value in gap["coverage"]["runs"]),
        "gmp_labels_collide": all(value >= COLLIDE for value in gmp["collision_rate"]["runs"]),
        "gap_labels_do_not_collide": all(value <= NO_COLLIDE
                                         for value in gap["collision_rate"]["runs"]),
        "cosine_gap_minus_gmp": seeds.paired_comparison(gap["conflict_mean"]["runs"],
                                                        gmp["conflict_mean"]["runs"]),
        "negative_share_gmp_minus_gap": seeds.paired_comparison(
            gmp["conflict_negative"]["runs"], gap["conflict_negative"]["runs"]),
    }
    definitional = all(parts[key] for key in ("gmp_one_position", "gap_every_position",
                                              "gmp_labels_collide",
                                              "gap_labels_do_not_collide"))
    conflict = [parts["cosine_gap_minus_gmp"]["outcome"],
                parts["negative_share_gmp_minus_gap"]["outcome"]]
    if not definitional or "hurts" in conflict:
        return False, parts
    return (True if conflict == ["helps", "helps"] else None), parts


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        source_dir: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Trains the GAP and GMP cnns over seeds on the mosaics, measures the diagnostics;
    writes ``real_gradient_flow.md`` and ``.json``; returns the report section."""
    watch = common.Stopwatch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    settings = common.section_settings("real_gradient_flow", SETTINGS, quick, overrides)
    records = {pool: measure(pool, settings, data_dir, source_dir) for pool in POOLS_COMPARED}
    holds, parts = decide(records)
    comparisons = {key: seeds.paired_comparison(records["gap"][key]["runs"],
                                                records["gmp"][key]["runs"])
                   for key in DIAGNOSTICS}

    rows = [[pool] + [seeds.mean_sd_text(records[pool][key]["runs"], 3) for key in DIAGNOSTICS]
            for pool in POOLS_COMPARED]
    rows.append(["GAP - GMP"] + [seeds.interval_text(comparisons[key], 3)
                                 for key in DIAGNOSTICS])
    table = common.markdown_table(["pool", "test mAP", "coverage", "entropy",
                                   "early coverage", "collision rate", "backbone cosine",
                                   "negative pairs"], rows)
    gap, gmp = records["gap"], records["gmp"]
    positions = gmp["positions"]
    failed = [name for name in ("gmp_one_position", "gap_every_position",
                                "gmp_labels_collide", "gap_labels_do_not_collide")
              if not parts[name]]
    cosine, negative = parts["cosine_gap_minus_gmp"], parts["negative_share_gmp_minus_gap"]
    if holds is None:
        conflict_text = "conflict undecided: an interval contains zero"
    elif cosine["outcome"] == "hurts" or negative["outcome"] == "hurts":
        conflict_text = ("the conflict part fails: GAP's per-label backbone gradients are "
                         + ("less alike (lower mean cosine)" if cosine["outcome"] == "hurts"
                            else "more often opposed (more negative pairs)")
                         + " than GMP's")
    else:
        conflict_text = "GAP's per-label backbone gradients conflict less than GMP's"
    head = {True: "Holds", False: "Does not hold", None: "Undecided"}[holds]
    verdict = (
        f"{head} ({settings['seeds']} seeds; 95% paired t-intervals, GAP - GMP): "
        + (f"definitional parts failed: {', '.join(failed)}; " if failed else
           f"spread and collisions as defined on every seed (GMP coverage "
           f"{gmp['coverage']['mean'] * positions:.2f} of {positions} positions, GAP "
           f"{gap['coverage']['mean']:.3f}; collision rate GMP "
           f"{gmp['collision_rate']['mean']:.2f}, GAP {gap['collision_rate']['mean']:.2f}); ")
        + f"{conflict_text} (mean cosine {seeds.interval_text(cosine, 3)}, negative-pair "
        f"share GMP - GAP {seeds.interval_text(negative, 3)}). Test mAP GAP - GMP "
        f"{seeds.interval_text(comparisons['map'], 3)}; early-layer coverage GAP - GMP "
        f"{seeds.interval_text(comparisons['early_coverage'], 3)}.")
    timing = watch.timing()
    markdown = "\n\n".join([
        table, "Beside it:", common.published_table(PUBLISHED),
        watch.timing_text(timing)])
    numbers = common.to_jsonable({
        "seeds": list(range(settings["seeds"])), "settings": settings, "pools": records,
        "parts": parts, "comparisons": comparisons, **timing})
    return common.write_section(
        out_dir, "real_gradient_flow", "Real data: gradient flow, GAP vs GMP (multi-label)",
        claim=("GMP: one position per channel gets each label's gradient and the labels "
               "collide there; GAP: every position learns, and the per-label gradients on "
               "the shared backbone conflict less than GMP's (higher mean cosine, fewer "
               "opposed label pairs). Measured on Fashion-MNIST mosaics."),
        doc=__doc__, markdown=markdown, numbers=numbers, holds=holds, verdict=verdict)


if __name__ == "__main__":
    common.experiment_cli(run, __doc__, full_help="the default mosaics, larger cnn, eight "
                          "seeds (for a GPU)")
