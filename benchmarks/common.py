"""Shared pieces of the benchmark scripts: timing, machine description, targets, JSON out.

Benchmarks are not tests: they print figures and never fail on a time. Every script prints
one JSON object to stdout (and writes it to ``--out FILE`` when given) holding the
measurements, the machine they came from, and for each target the measured value, the goal
and the distance to it.

This module needs only jax and numpy, so the GPU script (``gpu.sh``) can use it on a machine
without TFDS, grain, scikit-learn or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

# Scripts are run as ``python benchmarks/NAME.py`` from the repository root; make the
# project importable even when it is not pip-installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def quick_mode_from_env() -> bool:
    """True when ``GAPJAX_BENCH_QUICK=1``: tiny shapes, to prove a script runs end to end."""
    return os.environ.get("GAPJAX_BENCH_QUICK", "0") not in ("", "0", "false", "False")


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares: --out, --quick, --repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", default=quick_mode_from_env(),
                        help="small shapes and few repeats (also GAPJAX_BENCH_QUICK=1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default depends on --quick)")
    return parser


def block(tree: Any) -> Any:
    """Waits until every array in ``tree`` is computed (JAX dispatch is asynchronous)."""
    return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 1) -> dict[str, float]:
    """Times ``fn()`` (which must block until its result is ready) ``repeats`` times.

    Returns seconds: ``median``, ``min``, ``mean`` wall time, the ``first`` (warm-up) call,
    which for a freshly jitted function includes compilation, and ``cpu_median``: the
    median CPU time of this process per call (all threads). On a machine shared with
    other jobs the wall time grows with their load, the CPU time much less, so compare
    frameworks by both.
    """
    if repeats < 1:
        raise ValueError(f"time_calls: repeats must be >= 1; got {repeats}")
    first = None
    for _ in range(max(warmup, 0)):
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start if first is None else first
    samples, cpu_samples = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        samples.append(time.perf_counter() - start)
        cpu_samples.append(time.process_time() - cpu_start)
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "mean": statistics.fmean(samples),
        "first": samples[0] if first is None else first,
        "cpu_median": statistics.median(cpu_samples),
        "repeats": repeats,
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def target(name: str, value: float | None, goal: float, *, higher_is_better: bool,
           unit: str = "") -> dict[str, Any]:
    """A measured value against its goal.

    ``distance`` is ``value / goal`` when higher is better and ``goal / value`` otherwise, so
    ``distance >= 1`` always means the target is met and ``0.8`` means 20% short of it.
    """
    if value is None or value <= 0:
        return {"name": name, "value": value, "goal": goal, "unit": unit, "met": False,
                "distance": None, "higher_is_better": higher_is_better}
    distance = value / goal if higher_is_better else goal / value
    return {"name": name, "value": value, "goal": goal, "unit": unit, "met": distance >= 1.0,
            "distance": distance, "higher_is_better": higher_is_better}


def describe_target(result: dict[str, Any]) -> str:
    """One line for humans, e.g. ``SE/ResNet step time: 1.031 (goal <= 1.05) met, 1.02x``."""
    sign = ">=" if result["higher_is_better"] else "<="
    if result["distance"] is None:
        return f"{result['name']}: not measured (goal {sign} {result['goal']}{result['unit']})"
    status = "met" if result["met"] else "NOT met"
    return (f"{result['name']}: {result['value']:.4g}{result['unit']} (goal {sign} "
            f"{result['goal']}{result['unit']}) {status}, distance {result['distance']:.2f}x")


def emit(payload: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Adds the machine description, prints the JSON, writes it to ``out`` if given.

    Target lines go to stderr so stdout stays one parseable JSON document.
    """
    payload = {"machine": machine(), **payload}
    text = json.dumps(payload, indent=2, default=float)
    print(text)
    for result in payload.get("targets", []):
        print(describe_target(result), file=sys.stderr)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return payload


def error_entry(exc: BaseException) -> dict[str, str]:
    """How a benchmark item that could not run is recorded (the script carries on)."""
    return {"error": f"{type(exc).__name__}: {exc}"}


def import_train_step_modules() -> tuple[Any, Any, Any]:
    """``(gapjax.train.steps, gapjax.train.state, gapjax.train.optim)``: the project's own
    train step, state and optimizers (they need only jax, flax and optax)."""
    import importlib

    names = ("steps", "state", "optim")
    return tuple(importlib.import_module(f"gapjax.train.{name}") for name in names)


# --------------------------------------------------------------------------------------
# Reading results back: pooling targets, HBM bandwidth, the gpu.sh summary
# --------------------------------------------------------------------------------------

#: Pools that must run within ``POOL_TARGET`` of the ``x.sum()`` yardstick on an
#: accelerator (GPU, TPU); on a CPU the ratios are reported as information only (users
#: train on accelerators; XLA's CPU reductions are not what they run).
PARAMETER_FREE_POOLS = ("gap", "gmp", "gsp", "avgmax", "catavgmax")
POOL_TARGET = 1.2
GAP_BANDWIDTH_TARGET = 0.8
#: Peak HBM bandwidth (GB/s) by a substring of ``device_kind``; first match wins.
PEAK_HBM_GBPS = (("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0),
                 ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0))


def read_results(path: Path) -> dict[str, Any]:
    """A benchmark output file: one JSON document, or JSON lines (``{"records": [...]}``)."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError:
        return {"records": [json.loads(line) for line in text.splitlines() if line.strip()]}


def peak_hbm_gbps(device_kind: str) -> float | None:
    """Datasheet HBM bandwidth of a known accelerator, else None."""
    return next((peak for key, peak in PEAK_HBM_GBPS if key in device_kind), None)


def pooling_targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Targets from ``benchmarks/pooling.py`` records, on accelerators only: each
    parameter-free pool's forward pass within 1.2x of ``x.sum()`` per shape, and on a known
    GPU, GAP's achieved bandwidth (largest shape) at >= 80% of the HBM peak."""
    targets = []
    forward = [r for r in records if r.get("pass") == "forward"
               and r.get("platform", "cpu") != "cpu"]
    for record in forward:
        if record.get("pool") in PARAMETER_FREE_POOLS:
            shape = "x".join(map(str, record["shape"]))
            targets.append(target(f"{record['pool']} {shape} {record['dtype']} time / x.sum()",
                                  record.get("ratio"), POOL_TARGET, higher_is_better=False,
                                  unit="x"))
    gap = [r for r in forward if r.get("pool") == "gap"]
    if gap:
        largest = max(gap, key=lambda r: r["median_ms"])
        peak = peak_hbm_gbps(str(largest.get("device", "")))
        if peak is not None:
            shape = "x".join(map(str, largest["shape"]))
            targets.append(target(f"gap {shape} {largest['dtype']} bandwidth / HBM peak "
                                  f"({peak:.0f} GB/s)", largest["gbps"] / peak,
                                  GAP_BANDWIDTH_TARGET, higher_is_better=True))
    return targets


def summarize_run(out_dir: Path, seconds: float) -> dict[str, Any]:
    """Collects every ``*.json`` under ``out_dir`` (gpu.sh's items) into ``summary.json``:
    each item's status and every target with its distance; prints them."""
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"seconds": seconds, "machine": None, "items": {},
                               "targets": []}
    for path in sorted(out_dir.glob("*.json")):
        if path.name == "summary.json":
            continue
        try:
            payload = read_results(path)
        except ValueError as exc:
            payload = {"error": f"unreadable output: {exc}"}
        summary["items"][path.stem] = payload.get("error", "ok")
        summary["targets"] += payload.get("targets", [])
        if "records" in payload:
            summary["targets"] += pooling_targets(payload["records"])
        summary["machine"] = summary["machine"] or payload.get("machine")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for item, status in summary["items"].items():
        print(f"{item}: {status}")
    for result in summary["targets"]:
        print(describe_target(result))
    print(f"total {seconds:.0f} s")
    return summary
