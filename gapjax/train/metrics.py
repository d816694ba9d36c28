"""Where metrics go: ``DIR/metrics.jsonl``, TensorBoard event files, and the console.

``metrics.jsonl`` holds one JSON object per line: an integer ``step`` and float metrics
named ``train/...`` or ``eval/...``. Floats are written by ``json`` with ``repr`` precision,
so two runs can be compared to the last digit. A resumed run first drops the lines past
the step it resumes from (the interrupted run may have logged a few more), so the file of
a resumed run equals that of an uninterrupted one.

Only process 0 writes; the others get ``NullWriter`` / ``Progress("none")``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from gapjax.train.defaults import PROGRESS_MODES

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of ``workdir/metrics.jsonl`` in order (empty if there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
    """The latest value of ``key`` across ``records``, or None."""
    for record in reversed(records):
        if key in record:
            return record[key]
    return None


class MetricWriter:
    """Appends records to ``metrics.jsonl`` and TensorBoard (tensorboardX, no TensorFlow)."""

    def __init__(self, workdir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(workdir) if int(r.get("step", 0)) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(logdir=str(Path(workdir) / TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """One record: ``{"step": step, **metrics}`` (flushed at once, so a kill loses none)."""
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self._tensorboard.add_scalar(key, float(value), int(step))
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class NullWriter:
    """The writer of processes other than 0: drops everything."""

    def write(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def close(self) -> None:
        pass


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())


class Progress:
    """Console progress: a live rich bar ("bar"), periodic plain lines ("lines"), or nothing.

    ``"auto"`` picks the bar when stdout is a terminal and lines otherwise. ``advance`` is
    called every step (no device sync, just a counter); ``log`` at log intervals with
    host metrics already fetched.
    """

    def __init__(self, mode: str, total_steps: int, start_step: int, batch_size: int):
        if mode not in PROGRESS_MODES:
            raise ValueError(
                f"config.progress={mode!r} is not a progress mode; choose one of: "
                f"{', '.join(PROGRESS_MODES)}"
            )
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._step = start_step
        self._mark_step, self._mark_time = start_step, time.perf_counter()
        self._bar = None
        if mode == "bar":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            metrics="")
            self._bar.start()

    def advance(self, step: int) -> None:
        self._step = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def examples_per_second(self, step: int) -> float:
        """Throughput since the previous call (resets the mark)."""
        now = time.perf_counter()
        rate = (step - self._mark_step) * self.batch_size / max(now - self._mark_time, 1e-9)
        self._mark_step, self._mark_time = step, now
        return rate

    def log(self, step: int, metrics: dict[str, float], rate: float | None = None) -> None:
        """Shows the latest metrics (and examples/s when given)."""
        shown = dict(metrics)
        text = _format(shown) + (f"  {rate:.0f} ex/s" if rate is not None else "")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, metrics=text)
        elif self.mode == "lines":
            print(f"step {step}/{self.total_steps}  {text}", flush=True)

    def message(self, text: str) -> None:
        """A line that is not a metric (resume notice, summary); shown unless mode is none."""
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode == "lines":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
