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

Training drives the training loop's own steps (``gapjax.train.steps.train_step``,
``gapjax.evaluators.eval_step``, ``create_train_state``), vmapped over the seeds: one
compiled step trains every seed of a member at once, on the dataset's own pipeline
(``gapjax.data.make_iterator``, seeded per seed). Quick mode trains a subset of the
members (``QUICK_MEMBERS``), ``--full`` every registered one, longer and with more seeds.

``python -m gapjax.experiments.attention --out DIR [--full] [--dataset NAME]``
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from gapjax import models, tasks
from gapjax.attention import ATTENTIONS
from gapjax.data import DATASETS, dataset_info, make_iterator
from gapjax.evaluators import eval_step, zero_eval_sums
from gapjax.experiments import common
from gapjax.pooling import POOLS
from gapjax.train.optim import make_optimizer
from gapjax.train.state import create_train_state
from gapjax.train.steps import train_step

#: The members quick mode trains (``--full``: every ``ATTENTIONS`` name): SE, its cheapest
#: relative, the context block, channel + spatial gates, coordinate attention, the style
#: and frequency squeezes, and the local control.
QUICK_MEMBERS = ("se", "eca", "gc", "cbam", "coord", "srm", "fca", "local")
#: SE's squeezes for "which squeeze" (names missing from ``POOLS`` are reported, not run).
SQUEEZES = ("gap", "gmp", "gem", "lse", "std")
NONE = "none"
#: Largest share of the backbone's forward FLOPs that still counts as "next to nothing".
FLOPS_LIMIT = 0.05
CONFIDENCE = 0.95
BACKBONE = {"widths": (16, 32, 64), "strides": (1, 2, 2), "depth": 1, "head": "gap",
            "pool": "gap"}
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"steps": 300, "batch_size": 32, "seeds": 3, "image_size": 16, "timing_steps": 5},
    False: {"steps": 3000, "batch_size": 128, "seeds": 5, "image_size": 16,
            "timing_steps": 20},
}
#: Keep the training batches in memory (shared by every member) below this size.
CACHE_BYTES = 512 * 2**20


def default_dataset() -> str:
    """Fashion-MNIST where this build registers it, else the embedded (real) digits."""
    return "fashion_mnist" if "fashion_mnist" in DATASETS else "gapjax_digits"


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def paired_comparison(first: Sequence[float], second: Sequence[float],
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``first - second`` paired by seed: the mean difference, its two-sided t-interval
    at ``confidence``, the t-test's p-value and the outcome: ``"helps"`` (interval above
    zero), ``"hurts"`` (below) or ``"tied"``. Differences without spread are decided by
    their sign (an interval of one point)."""
    differences = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    if differences.size < 2:
        raise ValueError("paired_comparison needs at least two seeds")
    mean = float(differences.mean())
    spread = float(differences.std(ddof=1))
    if spread == 0.0:
        low = high = mean
        p_value = 1.0 if mean == 0.0 else 0.0
    else:
        error = spread / math.sqrt(differences.size)
        half = float(stats.t.ppf(0.5 + confidence / 2, differences.size - 1)) * error
        low, high = mean - half, mean + half
        p_value = float(2 * stats.t.sf(abs(mean) / error, differences.size - 1))
    outcome = "helps" if low > 0 else "hurts" if high < 0 else "tied"
    return {"mean_difference": mean, "low": low, "high": high, "p_value": p_value,
            "outcome": outcome, "differences": differences.tolist()}


def claim_outcome(se_vs_none: str, se_vs_local: str, flops_share: float) -> bool | None:
    """The section's ``holds``: True when SE helps against none and local within the FLOPs
    limit, False when it hurts against either or costs more, None otherwise."""
    if se_vs_none == "hurts" or se_vs_local == "hurts" or flops_share > FLOPS_LIMIT:
        return False
    if se_vs_none == "helps" and se_vs_local == "helps":
        return True
    return None


# --------------------------------------------------------------------------------------
# Training: the loop's own steps, vmapped over seeds
# --------------------------------------------------------------------------------------


class SeedBatches:
    """The training batches of every seed, stacked ``[seeds, batch, ...]`` per step: each
    seed's own shuffled pass of the dataset's pipeline, identical for every member. Kept
    in memory when they fit ``CACHE_BYTES``, else read again for each member."""

    def __init__(self, dataset_config: Any, split: str, batch_size: int, seeds: int,
                 steps: int):
        self.dataset_config, self.split = dataset_config, split
        self.batch_size, self.seeds, self.steps = batch_size, seeds, steps
        self._cache: list[dict[str, np.ndarray]] | None = None
        first = self._stream()
        sample = next(first)
        size = sum(value.nbytes for value in sample.values()) * steps
        if size <= CACHE_BYTES:
            self._cache = [sample] + [next(first) for _ in range(steps - 1)]
        self.sample = sample

    def _stream(self):
        iterators = [make_iterator(self.dataset_config, self.split, batch_size=self.batch_size,
                                   seed=seed, train=True, process_index=0, process_count=1)
                     for seed in range(self.seeds)]
        while True:
            batches = [next(iterator) for iterator in iterators]
            yield {key: np.stack([np.asarray(batch[key]) for batch in batches])
                   for key in batches[0]}

    def __iter__(self):
        if self._cache is not None:
            return iter(self._cache)
        stream = self._stream()
        return (next(stream) for _ in range(self.steps))


#: XLA options for programs that run once or twice (initialisation, evaluation): compiled
#: about 5x faster; the training step keeps the default optimisation, as it runs hundreds
#: of times.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


class SeedTrainer:
    """One model's train / eval steps, vmapped over seeds and compiled once."""

    def __init__(self, config: Any, num_classes: int, task_name: str, seeds: int):
        self.model = models.from_config(config, num_classes)
        self.task = tasks.get(task_name, num_classes=num_classes)
        self.tx = make_optimizer(config.optimizer, config.total_steps)
        self.seeds = seeds
        model, tx, task = self.model, self.tx, self.task
        self._init = jax.jit(jax.vmap(
            lambda seed, inputs: create_train_state(model, tx, inputs, seed),
            in_axes=(0, None)))
        self._train = jax.jit(jax.vmap(functools.partial(
            train_step, model=model, tx=tx, task=task)))
        self._eval = jax.jit(jax.vmap(functools.partial(eval_step, model=model, task=task),
                                      in_axes=(0, None, 0)))
        self._compiled: dict[str, Any] = {}

    def _program(self, name: str, *args: Any) -> Any:
        """The compiled ``name`` program for ``args``' shapes (compiled on first use)."""
        if name not in self._compiled:
            lowered = getattr(self, f"_{name}").lower(*args)
            self._compiled[name] = (lowered.compile() if name == "train"
                                    else lowered.compile(FAST_COMPILE))
        return self._compiled[name]

    def fit(self, batches: SeedBatches) -> Any:
        """Trains every seed from its initialisation; returns the stacked train state."""
        sample = {key: value[0] for key, value in batches.sample.items()}
        seeds, inputs = jnp.arange(self.seeds), self.task.init_inputs(sample)
        state = self._program("init", seeds, inputs)(seeds, inputs)
        for batch in batches:
            state = self._program("train", state, batch)(state, batch)
        return state

    def step_seconds(self, state: Any, batch: dict[str, np.ndarray], steps: int,
                     repeats: int = 3) -> float:
        """Seconds per training step of all seeds (the fastest of ``repeats`` timed runs
        of ``steps`` steps on one batch; compilation is done by then)."""
        step = self._program("train", state, batch)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            timed = state
            for _ in range(steps):
                timed = step(timed, batch)
            jax.block_until_ready(timed.params)
            best = min(best, (time.perf_counter() - start) / steps)
        return best

    def accuracy(self, state: Any, eval_batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Test accuracy (%) of each seed over the evaluation batches."""
        variables = state.variables()
        sums = jax.tree.map(lambda zero: jnp.zeros((self.seeds,), zero.dtype),
                            zero_eval_sums(self.task))
        for batch in eval_batches:
            sums, _ = self._program("eval", variables, batch, sums)(variables, batch, sums)
        return 100.0 * np.asarray(sums["accuracy"]) / np.asarray(sums["weight"])


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
            data_dir: Path, batches: SeedBatches, eval_batches: list, info: Any
            ) -> tuple[dict[str, Any], SeedTrainer, Any]:
    """Trains one variant on every seed: its accuracies and costs, the trainer and the
    trained state (for the timing rounds)."""
    watch = common.Stopwatch()
    config = common.quick_config(
        dataset, "cnn", steps=settings["steps"], batch_size=settings["batch_size"],
        dataset_options={"image_size": settings["image_size"], "data_dir": str(data_dir)}
        if dataset == "gapjax_digits" else {"data_dir": str(data_dir)},
        **BACKBONE, **options)
    trainer = SeedTrainer(config, info.num_classes, info.task, settings["seeds"])
    state = trainer.fit(batches)
    accuracies = trainer.accuracy(state, eval_batches)
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
            squeeze_labels: Sequence[str], out_dir: Path) -> str:
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
    return common.save_figure(fig, out_dir, "attention.png")


def _interval(comparison: dict[str, Any]) -> str:
    return (f"{comparison['mean_difference']:+.2f} [{comparison['low']:+.2f}, "
            f"{comparison['high']:+.2f}] {comparison['outcome']}")


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        dataset: str | None = None, members: Sequence[str] | None = None,
        squeezes: Sequence[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Runs the experiment; writes ``attention.md``, ``attention.json`` (the numbers) and
    ``attention.png`` under ``out_dir``.

    ``dataset``: default ``default_dataset()``; ``members`` / ``squeezes``: default
    ``QUICK_MEMBERS`` (quick) or every ``ATTENTIONS`` name, and ``SQUEEZES``; ``overrides``
    replace ``SETTINGS`` entries (``steps``, ``seeds``, ...). ``local`` and ``se`` always
    run (they are the claim's comparisons). Returns a report section whose ``numbers`` hold
    every variant's runs and costs and the paired comparisons.
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
    dataset = dataset or default_dataset()
    members = list(members or (QUICK_MEMBERS if quick else ATTENTIONS.names()))
    for required in ("se", "local"):
        if required not in members:
            members.insert(0, required)
    for member in members:
        ATTENTIONS.get(member)  # one line listing the names for a typo
    squeezes = list(SQUEEZES if squeezes is None else squeezes)
    missing_pools = [name for name in squeezes if name not in POOLS]
    squeezes = [name for name in squeezes if name in POOLS]

    probe = common.quick_config(dataset, "cnn", steps=1, dataset_options={
        "data_dir": str(data_dir), **({"image_size": settings["image_size"]}
                                      if dataset == "gapjax_digits" else {})})
    info = dataset_info(probe.dataset)
    batches = SeedBatches(probe.dataset, info.train_split, settings["batch_size"],
                          settings["seeds"], settings["steps"])
    eval_batches = list(make_iterator(probe.dataset, info.eval_split, batch_size=256, seed=0,
                                      train=False, process_index=0, process_count=1))
    records, trained = {}, {}
    for label, options in variants(members, squeezes).items():
        records[label], *trained[label] = measure(label, options, settings, dataset, data_dir,
                                                  batches, eval_batches, info)
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
    figure = _figure(records, members, squeeze_labels, out_dir)
    seconds = watch.elapsed()
    markdown = "\n".join([
        f"The cnn (widths {BACKBONE['widths']}, one conv per stage) on {dataset} "
        f"({info.num_examples.get(info.train_split, '?')} training / "
        f"{info.num_examples.get(info.eval_split, '?')} test images), "
        f"{settings['steps']} AdamW steps of {settings['batch_size']}, seeds "
        f"0..{settings['seeds'] - 1}; "
        + ("quick mode: a subset of the members (`--full` runs every one). " if quick else "")
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
    (out_dir / "attention.md").write_text("# Attention: global context\n\n" + markdown
                                          + "\n\n![attention](attention.png)\n")
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
    numbers = common.to_jsonable(numbers)
    (out_dir / "attention.json").write_text(json.dumps(numbers, indent=1))
    return common.section(
        "Attention: global context",
        claim="A gate from global context (SE's squeeze of the whole map) makes a CNN more "
              "accurate at next to no cost, and the global context is what helps: the same "
              "gate from each pixel alone (local) does not.",
        method=__doc__.split("Method: ", 1)[1].split("\n\n", 1)[0].replace("\n", " "),
        markdown=markdown,
        numbers=numbers,
        holds=holds,
        verdict=verdict,
        figures=[figure],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true",
                        help="every member, longer runs, more seeds (for a GPU)")
    parser.add_argument("--dataset", default=None,
                        help="dataset name (default: fashion_mnist where registered, else "
                             "gapjax_digits)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to build the dataset (default OUT/tfds)")
    args = parser.parse_args()
    result = run(args.out, quick=not args.full, data_dir=args.data_dir, dataset=args.dataset)
    print(result["markdown"])
    print(result["verdict"])


if __name__ == "__main__":
    main()
