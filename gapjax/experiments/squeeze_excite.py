"""Squeeze-and-Excitation: global context for a tiny cost.

Claims (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018):

1. Cost: SE-ResNet-50 has about 10% more parameters than ResNet-50 (~2.5M, all in the
   excitation's two fully connected layers: ``(2/r) sum_s N_s C_s^2`` weights) and 0.26%
   more FLOPs (3.87 vs 3.86 GFLOPs at 224x224; the paper's "FLOPs" are multiply-adds of one
   forward pass). The paper measured a 1.10x training step time on GPUs; the project's
   target is <= 1.05.
2. Benefit: the gate needs *global* context: a purely local gate (LocalGate: the same
   bottleneck MLP per pixel, no pooling) does not give SE's gain. On cluttered digits,
   where the class is decided by one small object anywhere on the canvas, we compare no
   gate, LocalGate and SE in the project's cnn.
3. Ablations: the squeeze operator (GAP vs GMP; the paper found average slightly better)
   and the reduction ratio r (the paper found accuracy robust over a range of r, with
   r = 16 a good trade-off).

Parameters and FLOPs come from the variable shapes and from XLA's cost analysis of the
forward (2 FLOPs per multiply-add, plus elementwise work), so the relative FLOP overhead is
the comparable figure. The step-time overhead is measured by
``benchmarks/se_overhead.py`` (run in a subprocess when the benchmarks folder is present).

``python -m gapjax.experiments.squeeze_excite --out DIR [--full]``
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gapjax import models
from gapjax.experiments import common

#: The paper's figures (Hu et al. 2018, section 4 and Table 2).
PAPER = {
    "resnet50_gflops": 3.86,
    "seresnet50_gflops": 3.87,
    "flops_overhead_percent": 0.26,
    "params_overhead_percent": 10.0,
    "extra_params_millions": 2.5,
    "gpu_step_time_ratio": 1.10,
}
STEP_TIME_TARGET = 1.05
TIE_STANDARD_ERRORS = 2.0
REDUCTIONS = (4, 16, 64)
#: The SE runs set the hidden width to exactly C / r (divisor 1): with the cnn's small
#: widths, timm's rounding to multiples of 8 would make every r above 8 the same model.
SE_OPTIONS = {"se_divisor": 1}


def excitation_weights(stage_channels: tuple[int, ...], blocks: tuple[int, ...],
                       reduction: int = 16) -> int:
    """The paper's count of SE parameters, ``(2 / r) sum_s N_s C_s^2`` (weights only, no
    biases): ``stage_channels`` ``C_s`` are the output widths of the stages, ``blocks`` ``N_s``
    their block counts."""
    return int(sum(2 * n * (c // reduction) * c for c, n in zip(stage_channels, blocks)))


def compare_accuracy(first: float, second: float, examples: int) -> str:
    """``"better"``, ``"worse"`` or ``"tied"``: ``first`` against ``second`` (percent, both
    on ``examples`` test items), tied when within ``TIE_STANDARD_ERRORS`` binomial standard
    errors of the difference."""
    noise = TIE_STANDARD_ERRORS * float(np.hypot(
        common.accuracy_standard_error(first, examples),
        common.accuracy_standard_error(second, examples)))
    if abs(first - second) <= noise:
        return "tied"
    return "better" if first > second else "worse"


def overhead_table(input_size: int = 224) -> dict[str, Any]:
    """Parameters and forward FLOPs of resnet50 and seresnet50 (1000 classes) and the
    relative overhead, next to the paper's figures."""
    shape = (input_size, input_size, 3)
    measured = {}
    for name in ("resnet50", "seresnet50"):
        model = models.get(name, num_classes=1000)
        params = common.parameter_count(common.abstract_variables(model, shape)["params"])
        measured[name] = {"params": params, "flops": common.forward_flops(model, shape)}
    base, se = measured["resnet50"], measured["seresnet50"]
    paper_weights = excitation_weights((256, 512, 1024, 2048), (3, 4, 6, 3))
    return {
        "resnet50_params": base["params"],
        "seresnet50_params": se["params"],
        "extra_params": se["params"] - base["params"],
        "paper_formula_extra_weights": paper_weights,
        "params_overhead_percent": 100.0 * (se["params"] / base["params"] - 1.0),
        "resnet50_gflops_xla": base["flops"] / 1e9,
        "seresnet50_gflops_xla": se["flops"] / 1e9,
        "resnet50_gmacs_equivalent": base["flops"] / 2e9,
        "flops_overhead_percent": 100.0 * (se["flops"] / base["flops"] - 1.0),
        "input_size": input_size,
    }


def step_time_overhead(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Runs ``benchmarks/se_overhead.py`` and returns its JSON (or ``{"error": ...}``)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "se_overhead.py"
    if not script.exists():
        return {"error": f"{script} not found (the benchmarks folder ships with the repository)"}
    out = out_dir / "bench_se_overhead.json"
    command = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or "").strip().splitlines()[-3:]
        return {"error": "se_overhead.py failed: " + " / ".join(tail)}
    return json.loads(out.read_text())


def gate_runs(out_dir: Path, quick: bool) -> list[dict[str, Any]]:
    """Trains the cnn on cluttered digits with each gate variant; one record per run."""
    variants = [
        ("none", {}),
        ("local", {"attn": "local", **SE_OPTIONS}),
        ("se", {"attn": "se", **SE_OPTIONS}),
        ("se, gmp squeeze", {"attn": "se", "se_pool": "gmp", **SE_OPTIONS}),
    ]
    variants += [(f"se, r={r}", {"attn": "se", "se_reduction": r, **SE_OPTIONS})
                 for r in REDUCTIONS if r != 16]
    records = []
    for label, options in variants:
        config = common.standard_config(common.CLUTTERED, quick, head="gap", pool="gap",
                                        data_dir=out_dir / "tfds", **options)
        result = common.train(config, out_dir / "runs" / common.run_name(config))
        numbers = common.train_test_accuracy(result, config)
        params = common.parameter_count(result.variables["params"])
        records.append({"variant": label, "attn": options.get("attn", "none"),
                        "squeeze": options.get("se_pool", "gap") if options else "-",
                        "reduction": options.get("se_reduction", 16) if options else None,
                        "params": params, **numbers})
    return records


def noise_band(record: dict[str, Any]) -> float:
    """``TIE_STANDARD_ERRORS`` binomial standard errors of a run's test accuracy (points)."""
    return TIE_STANDARD_ERRORS * common.accuracy_standard_error(record["test_accuracy"],
                                                                record["test_examples"])


def plot_gates(records: list[dict[str, Any]], out_dir: Path,
               name: str = "squeeze_excite.png") -> str:
    """Left: test accuracy per gate variant. Right: accuracy against the reduction ratio."""
    fig, axes = common.new_figure(2, width=5.2, height=3.6)
    main = [record for record in records if not record["variant"].startswith("se, r=")]
    common.bar_chart(axes[0], [record["variant"].replace(", ", "\n") for record in main],
                     {"test accuracy": [record["test_accuracy"] for record in main]},
                     "test accuracy (%)")
    axes[0].errorbar(np.arange(len(main)), [record["test_accuracy"] for record in main],
                     yerr=[noise_band(record) for record in main], fmt="none", ecolor="black",
                     capsize=4)
    low = min(record["test_accuracy"] for record in main)
    axes[0].set_ylim(max(0.0, low - 15.0), 100.0)
    axes[0].set_title(f"Gates on cluttered digits (±{TIE_STANDARD_ERRORS:.0f} s.e.)")
    sweep = sorted((record for record in records if record["attn"] == "se"
                    and record["squeeze"] == "gap"), key=lambda record: record["reduction"])
    axes[1].errorbar([record["reduction"] for record in sweep],
                     [record["test_accuracy"] for record in sweep],
                     yerr=[noise_band(record) for record in sweep], fmt="o-", capsize=4,
                     color=common.PALETTE[0])
    axes[1].set_xscale("log", base=2)
    axes[1].set(xlabel="reduction ratio r (hidden = C / r)", ylabel="test accuracy (%)",
                title="SE reduction ratio sweep")
    return common.save_figure(fig, out_dir, name)


def run(out_dir: Path | str, quick: bool = True) -> dict[str, Any]:
    """Overheads, step time, gate comparison and ablations; returns a report section."""
    out_dir = Path(out_dir)
    overhead = overhead_table()
    timing = step_time_overhead(out_dir, quick)
    records = gate_runs(out_dir, quick)
    figure = plot_gates(records, out_dir)

    by_variant = {record["variant"]: record["test_accuracy"] for record in records}
    ratio = timing.get("ratio") if isinstance(timing, dict) else None
    params_close = abs(overhead["params_overhead_percent"] - PAPER["params_overhead_percent"]) < 1
    flops_small = overhead["flops_overhead_percent"] < 1.0
    examples = records[0]["test_examples"]
    versus_local = compare_accuracy(by_variant["se"], by_variant["local"], examples)
    versus_none = compare_accuracy(by_variant["se"], by_variant["none"], examples)
    checks = [params_close, flops_small, versus_local != "worse", versus_none != "worse"]
    if ratio is not None:
        checks.append(ratio <= STEP_TIME_TARGET)
    # Undecided (None) when nothing contradicts the claim but a part of it could not be
    # shown: the step time was not measured, or the accuracy differences are within noise.
    decided = ratio is not None and versus_local == versus_none == "better"
    holds = False if not all(checks) else (True if decided else None)
    overhead_rows = [
        ["parameters, ResNet-50", "25.6M", overhead["resnet50_params"]],
        ["parameters, SE-ResNet-50", "~28.1M", overhead["seresnet50_params"]],
        ["extra parameters", "~2.5M (FC weights only)", overhead["extra_params"]],
        ["paper's formula (2/r) sum N_s C_s^2", "-", overhead["paper_formula_extra_weights"]],
        ["parameter overhead %", PAPER["params_overhead_percent"],
         overhead["params_overhead_percent"]],
        ["forward cost, ResNet-50", "3.86 GMACs", f"{overhead['resnet50_gflops_xla']:.3f} "
         "GFLOPs (XLA)"],
        ["forward cost, SE-ResNet-50", "3.87 GMACs", f"{overhead['seresnet50_gflops_xla']:.3f} "
         "GFLOPs (XLA)"],
        ["FLOP overhead %", PAPER["flops_overhead_percent"], overhead["flops_overhead_percent"]],
        ["train step time ratio", f"{PAPER['gpu_step_time_ratio']} (GPU)",
         ratio if ratio is not None else timing.get("error", "not measured")],
    ]
    timing_text = ("not measured: " + str(timing.get("error"))) if ratio is None else (
        f"{ratio:.3f} ({timing.get('setting', '')}; target <= {STEP_TIME_TARGET})")
    markdown = "\n\n".join([
        common.markdown_table(["quantity", "paper", "measured here"], overhead_rows),
        f"Step-time ratio SE-ResNet-50 / ResNet-50: {timing_text}.",
        common.records_table(records, ["variant", "attn", "squeeze", "reduction", "params",
                                       "train_accuracy", "test_accuracy"]),
    ])
    verdict = (
        f"Parameter overhead {overhead['params_overhead_percent']:.2f}% (paper ~10%), FLOP "
        f"overhead {overhead['flops_overhead_percent']:.2f}% (paper 0.26%): "
        f"{'both as published' if params_close and flops_small else 'differs from the paper'}. "
        f"Step time ratio: {timing_text}. Test accuracy: none {by_variant['none']:.2f}%, "
        f"LocalGate {by_variant['local']:.2f}%, SE {by_variant['se']:.2f}%, SE with GMP "
        f"squeeze {by_variant['se, gmp squeeze']:.2f}% ({examples} test images): against "
        f"the local gate SE is {versus_local}, against no gate {versus_none} (differences "
        f"within {TIE_STANDARD_ERRORS:.0f} standard errors count as ties).")
    return common.section(
        "Squeeze-and-Excitation",
        claim=("SE adds ~10% parameters and ~0.26% FLOPs to ResNet-50, costs <= 1.05x step "
               "time here, and helps because its gate sees global context: SE is more "
               "accurate than LocalGate and than no gate on cluttered digits."),
        method=("Counts from variable shapes and XLA cost analysis at 224x224, 1000 classes "
                "(XLA counts every floating-point op, 2 per multiply-add; the paper counts "
                "multiply-adds only, so compare the relative overheads). Step time from "
                "benchmarks/se_overhead.py (interleaved timing of the project's train step). "
                "Gates: the cnn with attn=None|'local'|'se' after each stage, hidden width "
                "C/r exactly (se_divisor=1), trained with the standard cluttered-digits run; "
                "squeeze ablation se_pool='gmp'; reduction sweep r in "
                f"{', '.join(map(str, REDUCTIONS))}."),
        markdown=markdown,
        numbers={"overhead": overhead, "paper": PAPER, "step_time": timing, "gates": records},
        holds=holds,
        verdict=verdict,
        figures=[figure],
    )


if __name__ == "__main__":
    common.experiment_cli(run, __doc__)
