"""Attention: does global context help, and does it cost next to nothing?

Claim (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, and the family after it): a
channel gate computed from global context, the whole feature map squeezed to one vector,
makes a CNN more accurate at next to no cost, and it is the global context that helps: the
same gate computed at every pixel from that pixel alone (``local``: SE's parameters, no
squeeze) does not.

Method: one small cnn (widths 16, 32, 64; one conv + BN + ReLU per stage; 2x2 max pools)
with an ``ATTENTIONS`` member after every stage, or none, trained with AdamW and a cosine
schedule for a fixed number of steps from several seeds. A seed fixes the data order and
the initial convolutions (Flax derives each layer's key from its name), so the runs of two
members with one seed are a pair. A member *helps* (*hurts*) against a baseline when the
95% t-interval of the paired test-accuracy differences over seeds lies above (below) zero:
a paired t-test at 5%, two-sided; otherwise the two are *tied*, which with few seeds often
means "not resolved". Costs per member: parameters added per block, forward FLOPs added
(XLA's cost analysis, per example), and the training step's time relative to no
attention (all seeds in one vmapped step; CPU times on a shared machine move by 2x, and
at this size a step's time is mostly per-operation overhead, so the FLOPs decide "cost").
"Which squeeze": SE with the GAP, GMP, GeM, LSE and std (where the build has it) squeezes,
each against SE with GAP. The claim holds when SE helps against both ``none`` and
``local`` and adds at most ``FLOPS_LIMIT`` of the backbone's FLOPs; it fails when SE hurts
against either or costs more; otherwise it is undecided.

Training drives the training loop's own steps, vmapped over the seeds
(``gapjax.experiments.seeds``): one compiled step trains every seed of a member at once,
on the dataset's own pipeline (``gapjax.data.make_iterator``, seeded per seed). Quick
mode trains a subset of the members (``QUICK_MEMBERS``), ``--full`` every registered one,
longer and with more seeds.

``python -m gapjax.experiments.attention --out DIR [--full] [--dataset NAME]``
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gapjax.attention import ATTENTIONS
from gapjax.data import dataset_info, make_iterator
from gapjax.experiments import common
from gapjax.experiments.seeds import CONFIDENCE, SeedBatches, SeedTrainer, paired_comparison
from gapjax.pooling import POOLS

#: The members quick mode trains (``--full``: every ``ATTENTIONS`` name): SE, its cheapest
#: relative, the context block, channel + spatial gates, coordinate attention, the style
#: and frequency squeezes, and the local control.
QUICK_MEMBERS = ("se", "eca", "gc", "cbam", "coord", "srm", "fca", "local")
#: SE's squeezes for "which squeeze" (names missing from ``POOLS`` are reported, not run).
SQUEEZES = ("gap", "gmp", "gem", "lse", "std")
NONE = "none"
#: Largest share of the backbone's forward FLOPs that still counts as "next to nothing".
FLOPS_LIMIT = 0.05
BACKBONE = {"widths": (16, 32, 64), "strides": (1, 2, 2), "depth": 1, "head": "gap",
            "pool": "gap"}
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"steps": 300, "batch_size": 32, "seeds": 3, "image_size": 16, "timing_steps": 5},
    False: {"steps": 3000, "batch_size": 128, "seeds": 5, "image_size": 16,
            "timing_steps": 20},
}


#: The embedded digits: the section runs on any machine, within the quick report's time
#: (every member on Fashion-MNIST is the ``real_se`` section's job, for SE, local and none).
DEFAULT_DATASET = "gapjax_digits"


def claim_outcome(se_vs_none: str, se_vs_local: str, flops_share: float) -> bool | None:
    """The section's ``holds``: True when SE helps against none and local within the FLOPs
    limit, False when it hurts against either or costs more, None otherwise."""
    if se_vs_none == "hurts" or se_vs_local == "hurts" or flops_share > FLOPS_LIMIT:
        return False
    if se_vs_none == "helps" and se_vs_local == "helps":
        return True
    return None


def attention_parameters(abstract: Any) -> dict[str, int]:
    """Parameters of each block's attention (``stage<n>_se``) of the cnn."""
    params = abstract["params"]
    return {name: common.parameter_count(params[name]) for name in sorted(params)
            if name.endswith("_se")}


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def variants(members: Sequence[str], squeezes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Label -> model options: no attention, each member, SE with each other squeeze."""
    out: dict[str, dict[str, Any]] = {NONE: {"attn": ""}}
    for member in members:
        out[member] = {"attn": member}
    for squeeze in squeezes:
        if squeeze != "gap":
            out[f"se/{squeeze}"] = {"attn": "se", "attn_kwargs": {"squeeze": squeeze}}
    return out


def measure(label: str, options: dict[str, Any], settings: dict[str, Any], dataset: str,
            dataset_options: dict[str, Any], batches: SeedBatches, eval_batches: list,
            info: Any) -> tuple[dict[str, Any], SeedTrainer, Any]:
    """Trains one variant on every seed: its accuracies and costs, the trainer and the
    trained state (for the timing rounds)."""
    watch = common.Stopwatch()
    config = common.quick_config(
        dataset, "cnn", steps=settings["steps"], batch_size=settings["batch_size"],
        dataset_options=dataset_options, **BACKBONE, **options)
    trainer = SeedTrainer.from_config(config, info.num_classes, info.task, settings["seeds"])
    state = trainer.fit(batches)
    accuracies = trainer.accuracy(state, eval_batches)
    print(f"[attention] {label}: {settings['seeds']} seeds x {settings['steps']} steps, "
          f"accuracy {np.mean(accuracies):.2f}% ({watch.elapsed():.0f} s)", file=sys.stderr,
          flush=True)
    abstract = common.abstract_variables(trainer.model, info.input_shape)
    record = {
        "variant": label,
        "runs": [float(value) for value in accuracies],
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
        "params": common.parameter_count(abstract["params"]),
        "params_per_block": list(attention_parameters(abstract).values()),
        "flops": common.forward_flops(trainer.model, info.input_shape),
        "seconds": watch.elapsed(),
    }
    return record, trainer, state


def step_times(trained: dict[str, tuple[SeedTrainer, Any]], batch: dict[str, np.ndarray],
               steps: int, rounds: int = 3) -> dict[str, float]:
    """Seconds per training step of each variant: the fastest of ``rounds`` timings, the
    variants interleaved within each round, so that a change of the machine's load hits
    them alike."""
    best = {label: math.inf for label in trained}
    for _ in range(rounds):
        for label, (trainer, state) in trained.items():
            best[label] = min(best[label], trainer.step_seconds(state, batch, steps, repeats=1))
    return best


def _figure(records: dict[str, dict[str, Any]], members: Sequence[str],
            squeeze_labels: Sequence[str], out_dir: Path, name: str = "attention") -> str:
    fig, axes = common.new_figure(2, width=5.6, height=3.8)
    for ax, labels, title in ((axes[0], [NONE, *members], "Members (± sd over seeds)"),
                              (axes[1], ["se", *squeeze_labels], "SE's squeeze")):
        means = [records[label]["mean"] for label in labels]
        spreads = [records[label]["std"] for label in labels]
        positions = np.arange(len(labels))
        ax.bar(positions, means, 0.6, yerr=spreads, capsize=3, color=common.PALETTE[0])
        ax.axhline(records[NONE]["mean"], color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(positions, labels, rotation=45, ha="right")
        low = min(m - s for m, s in zip(means, spreads))
        ax.set_ylim(max(0.0, low - 5.0), min(100.0, max(means) + 3.0))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
    return common.save_figure(fig, out_dir, f"{name}.png")


def _interval(comparison: dict[str, Any]) -> str:
    return (f"{comparison['mean_difference']:+.2f} [{comparison['low']:+.2f}, "
            f"{comparison['high']:+.2f}] {comparison['outcome']}")


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        dataset: str | None = None, members: Sequence[str] | None = None,
        squeezes: Sequence[str] | None = None, name: str = "attention",
        dataset_options: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Runs the experiment; writes ``<name>.md``, ``<name>.json`` (the numbers) and
    ``<name>.png`` under ``out_dir`` (``name``: ``attention``; real_se runs the study
    as ``real_se``).

    ``dataset``: default ``DEFAULT_DATASET``; ``members`` / ``squeezes``: default
    ``QUICK_MEMBERS`` (quick) or every ``ATTENTIONS`` name, and ``SQUEEZES``; ``overrides``
    replace ``SETTINGS`` entries (``steps``, ``seeds``, ...). ``local`` and ``se`` always
    run (they are the claim's comparisons). Returns a report section whose ``numbers`` hold
    every variant's runs and costs and the paired comparisons. ``dataset_options``: more
    ``config.dataset`` keys (e.g. Fashion-MNIST's ``source_dir``).
    """
    watch = common.Stopwatch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "tfds"
    settings = {**SETTINGS[bool(quick)], **overrides}
    unknown = set(overrides) - set(SETTINGS[True])
    if unknown:
        raise ValueError(f"attention: unknown settings {sorted(unknown)}; valid: "
                         f"{', '.join(SETTINGS[True])}")
    if settings["seeds"] < 2:
        raise ValueError(f"attention: seeds={settings['seeds']} must be >= 2 (paired tests)")
    dataset = dataset or DEFAULT_DATASET
    subset = quick and not members  # quick mode's default subset of the members
    members = list(members or (QUICK_MEMBERS if quick else ATTENTIONS.names()))
    for required in ("se", "local"):
        if required not in members:
            members.insert(0, required)
    for member in members:
        ATTENTIONS.get(member)  # one line listing the names for a typo
    squeezes = list(SQUEEZES if squeezes is None else squeezes)
    missing_pools = [name for name in squeezes if name not in POOLS]
    squeezes = [name for name in squeezes if name in POOLS]

    dataset_options = {"data_dir": str(data_dir), **(dataset_options or {}),
                       **({"image_size": settings["image_size"]}
                          if dataset == "gapjax_digits" else {})}
    probe = common.quick_config(dataset, "cnn", steps=1, dataset_options=dataset_options)
    info = dataset_info(probe.dataset)
    batches = SeedBatches(probe.dataset, info.train_split, settings["batch_size"],
                          settings["seeds"], settings["steps"])
    eval_batches = list(make_iterator(probe.dataset, info.eval_split, batch_size=256, seed=0,
                                      train=False, process_index=0, process_count=1))
    records, trained = {}, {}
    for label, options in variants(members, squeezes).items():
        records[label], *trained[label] = measure(label, options, settings, dataset,
                                                  dataset_options, batches, eval_batches, info)
    for label, seconds in step_times(trained, next(iter(batches)),
                                     settings["timing_steps"]).items():
        records[label]["step_seconds"] = seconds

    none = records[NONE]
    rows = []
    for label, record in records.items():
        record["params_added"] = record["params"] - none["params"]
        record["flops_added"] = record["flops"] - none["flops"]
        record["flops_share"] = record["flops_added"] / none["flops"]
        record["step_time_ratio"] = record["step_seconds"] / none["step_seconds"]
        if label != NONE:
            record["vs_none"] = paired_comparison(record["runs"], none["runs"])
            record["vs_local"] = paired_comparison(record["runs"], records["local"]["runs"])
        if label.startswith("se/"):
            record["vs_se_gap"] = paired_comparison(record["runs"], records["se"]["runs"])
    for label in [NONE, *members]:
        record = records[label]
        rows.append([label, "/".join(f"{n:,}" for n in record["params_per_block"]) or "-",
                     f"{100 * record['flops_share']:+.2f}%",
                     f"{record['step_time_ratio']:.2f}x",
                     f"{record['mean']:.2f} ± {record['std']:.2f}",
                     _interval(record["vs_none"]) if label != NONE else "-",
                     _interval(record["vs_local"]) if label not in (NONE, "local") else "-"])
    squeeze_labels = [f"se/{name}" for name in squeezes if name != "gap"]
    squeeze_rows = [[f"se ({label.split('/')[1]})", f"{records[label]['mean']:.2f} ± "
                     f"{records[label]['std']:.2f}", _interval(records[label]["vs_se_gap"]),
                     _interval(records[label]["vs_none"])] for label in squeeze_labels]

    se = records["se"]
    holds = claim_outcome(se["vs_none"]["outcome"], se["vs_local"]["outcome"],
                          se["flops_share"])
    helping = [label for label in members if records[label]["vs_none"]["outcome"] == "helps"]
    hurting = [label for label in members if records[label]["vs_none"]["outcome"] == "hurts"]
    costly = [label for label in members if records[label]["flops_share"] > FLOPS_LIMIT]
    slow = [label for label in members if records[label]["step_time_ratio"] > 1.5]
    if holds is True:
        head = "Holds"
    elif holds is False:
        head = "Does not hold"
    else:
        head = "Undecided"
    verdict = (
        f"{head} on {dataset} ({settings['seeds']} seeds, {settings['steps']} steps): SE vs "
        f"none {_interval(se['vs_none'])}, SE vs local {_interval(se['vs_local'])} points; "
        f"SE adds {se['params_added']:,} parameters "
        f"({100 * se['params_added'] / none['params']:.1f}%), {100 * se['flops_share']:.2f}% "
        f"FLOPs, step time {se['step_time_ratio']:.2f}x. "
        f"Members that help against none: {', '.join(helping) or 'none'}; hurt: "
        f"{', '.join(hurting) or 'none'}; above {100 * FLOPS_LIMIT:.0f}% FLOPs: "
        f"{', '.join(costly) or 'none'}; step time above 1.5x: {', '.join(slow) or 'none'}.")
    figure = _figure(records, members, squeeze_labels, out_dir, name)
    seconds = watch.elapsed()
    markdown = "\n".join([
        f"The cnn (widths {BACKBONE['widths']}, one conv per stage) on {dataset} "
        f"({info.num_examples.get(info.train_split, '?')} training / "
        f"{info.num_examples.get(info.eval_split, '?')} test images), "
        f"{settings['steps']} AdamW steps of {settings['batch_size']}, seeds "
        f"0..{settings['seeds'] - 1}; "
        + ("quick mode: a subset of the members (`--full` runs every one). " if subset else "")
        + f"Differences are in accuracy points, paired by seed, with the {CONFIDENCE:.0%} "
        "t-interval and the outcome of the paired t-test. Parameters: added per block "
        f"(the backbone without attention has {none['params']:,}); FLOPs: forward, per "
        f"example, added over the {none['flops'] / 1e6:.2f} MFLOPs of the backbone; step "
        "time: one training step of every seed, relative to none (CPU, shared machine).",
        "",
        common.markdown_table(["member", "parameters per block", "FLOPs added", "step time",
                               "accuracy (%)", "vs none", "vs local"], rows),
        "",
        "Which squeeze (SE, the same bottleneck; GAP is the `se` row above):",
        "",
        common.markdown_table(["variant", "accuracy (%)", "vs SE with GAP", "vs none"],
                              squeeze_rows) if squeeze_rows else "(no other squeeze)",
        "",
        (f"Not in this build's POOLS, not run: {', '.join(missing_pools)}." if missing_pools
         else ""),
        f"({seconds:.0f} s)",
    ])
    numbers = {
        "dataset": dataset,
        "seeds": list(range(settings["seeds"])),
        "settings": settings,
        "members": members,
        "squeezes": squeezes,
        "missing_squeezes": missing_pools,
        "flops_limit": FLOPS_LIMIT,
        "variants": records,
        "seconds": seconds,
    }
    return common.write_section(
        out_dir, name, "Attention: global context",
        claim="A gate from global context (SE's squeeze of the whole map) makes a CNN more "
              "accurate at next to no cost, and the global context is what helps: the same "
              "gate from each pixel alone (local) does not.",
        doc=__doc__, method_end="\n\n", markdown=markdown,
        numbers=common.to_jsonable(numbers), holds=holds, verdict=verdict, figures=[figure])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true",
                        help="every member, longer runs, more seeds (for a GPU)")
    parser.add_argument("--dataset", default=None,
                        help=f"dataset name (default: {DEFAULT_DATASET}; e.g. fashion_mnist)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to build the dataset (default OUT/tfds)")
    args = parser.parse_args()
    result = run(args.out, quick=not args.full, data_dir=args.data_dir, dataset=args.dataset)
    print(result["markdown"])
    print(result["verdict"])


if __name__ == "__main__":
    main()
