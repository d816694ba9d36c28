"""Where metrics go: ``DIR/metrics.jsonl``, TensorBoard event files, and the console.

``metrics.jsonl`` holds one JSON object per line: an integer ``step`` and float metrics
named ``train/...`` or ``eval/...``. Floats are written by ``json`` with ``repr`` precision,
so two runs can be compared to the last digit. Each record is appended with a single
``write`` of one whole line, so a crash leaves at most a torn last line. A resumed run
first repairs the file (``repair_metrics``): it drops a torn last line and the records
past the step it resumes from (the interrupted run may have logged a few more), with a
one-line notice, so the file of a resumed run equals that of an uninterrupted one.

Only process 0 writes; the others get ``NullWriter`` / ``Progress("none")``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from gapjax.train.defaults import PROGRESS_MODES
from gapjax.train.workdir import IMAGES_DIR, METRICS_FILE, TENSORBOARD_DIR, write_atomically


class MetricsFileError(ValueError):
    """A ``metrics.jsonl`` line other than the last that is not a JSON record."""


def _parse(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of ``path`` and whether its last line was torn (cut short by a crash:
    no final newline, or not a JSON object). Any other bad line raises
    ``MetricsFileError`` naming the file and line."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], False
    lines = text.split("\n")
    # A complete file ends with a newline, so its last piece is empty.
    torn = lines[-1].strip() != ""
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines) - 1 and not torn:
                torn = True  # a newline made it out but the line is cut: still the last
                continue
            raise MetricsFileError(
                f"{path} line {number} is not a metrics record ({error}); remove or fix "
                "that line") from None
        records.append(record)
    return records, torn


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of ``workdir/metrics.jsonl`` in order (empty if there is none); a torn
    last line (a crash mid-write) is left out."""
    return _parse(Path(workdir) / METRICS_FILE)[0]


def repair_metrics(workdir: str | Path, resume_step: int) -> list[dict[str, Any]]:
    """Makes ``workdir/metrics.jsonl`` the file of a run that stopped at ``resume_step``.

    Drops a torn last line and every record past ``resume_step``, rewriting the file
    atomically (temporary file, then rename) and printing one ``note:`` line on stderr
    saying what was dropped. Returns the kept records.
    """
    path = Path(workdir) / METRICS_FILE
    records, torn = _parse(path)
    kept = [record for record in records if int(record["step"]) <= resume_step]
    dropped = len(records) - len(kept)
    if not torn and not dropped:
        return kept
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))
    what = []
    if torn:
        what.append("a torn last line (a crash mid-write)")
    if dropped:
        what.append(f"{dropped} record(s) past step {resume_step}, the step resumed from")
    print(f"note: {path}: dropped {' and '.join(what)}", file=sys.stderr, flush=True)
    return kept


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
        repair_metrics(workdir, resume_step)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the events an interrupted run wrote past the
            # step it resumes from, as metrics.jsonl drops them.
            self._tensorboard = SummaryWriter(logdir=str(Path(workdir) / TENSORBOARD_DIR),
                                              purge_step=resume_step + 1 if resume_step
                                              else None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """One record: ``{"step": step, **metrics}``, appended with one ``write`` of the
        whole line (a kill loses none and tears at most the line being written)."""
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(self._fd, data):]
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self._tensorboard.add_scalar(key, float(value), int(step))
            self._tensorboard.flush()

    def write_image(self, step: int, tag: str, image: Any) -> Path:
        """An ``uint8 [H, W, 3]`` picture: ``DIR/images/<tag>_<step>.png`` and, with
        TensorBoard, an image summary ``tag`` at ``step``. Returns the PNG's path."""
        import numpy as np
        from PIL import Image

        pixels = np.asarray(image, np.uint8)
        path = self.path.parent / IMAGES_DIR / f"{tag.replace('/', '_')}_{int(step):08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, pixels, int(step), dataformats="HWC")
            self._tensorboard.flush()
        return path

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tensorboard is not None:
            self._tensorboard.close()


class NullWriter:
    """The writer of processes other than 0: drops everything."""

    def write(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def write_image(self, step: int, tag: str, image: Any) -> None:
        del step, tag, image

    def close(self) -> None:
        pass


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short(metrics: dict[str, float]) -> str:
    """The bar's metric field: ``loss 0.5712 acc 0.8263`` (other train metrics by their
    short name), compact enough for an 80-column terminal."""
    parts = []
    for key, value in metrics.items():
        name = key.split("/", 1)[-1].replace("accuracy", "acc")
        parts.append(f"{name} {value:.4g}")
    return " ".join(parts)


class Progress:
    """Console progress: a live rich bar ("bar"), periodic plain lines ("lines"), or nothing.

    ``"auto"`` picks the bar when stdout is a terminal and lines otherwise. ``advance`` is
    called every step (no device sync, just a counter); ``log`` at log intervals with
    host metrics already fetched. Training metrics go into the bar (or a ``step s/total``
    line); evaluation metrics (``eval/...``) are always printed as a line of their own.

    The bar fits an 80-column terminal: ``s/total``, a short bar, ``loss`` and ``acc``,
    examples per second and the estimated time left, e.g.
    ``  60/200 ━━━━━━━━━━━━━━━━━━━━ loss 0.5712 acc 0.8263  1830 ex/s  eta 0:30``.
    """

    def __init__(self, mode: str, total_steps: int, start_step: int, batch_size: int,
                 console: Any = None):
        if mode not in PROGRESS_MODES:
            raise ValueError(
                f"config.progress={mode!r} is not a progress mode; choose one of: "
                f"{', '.join(PROGRESS_MODES)}")
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._step = start_step
        self._mark_step, self._mark_time = start_step, time.perf_counter()
        self._rate: float | None = None
        self._timed: tuple[int, float] | None = None
        self._bar = None
        if mode == "bar":
            import rich
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as RichProgress

            console = console or rich.get_console()
            digits = len(str(total_steps))
            # Room for "s/total", "loss x acc y" (22), "n ex/s  eta h:mm:ss" (~24), gaps.
            bar_width = min(30, max(6, console.width - 2 * digits - 52))
            self._bar = RichProgress(
                TextColumn(f"{{task.completed:>{digits}.0f}}/{total_steps}"),
                BarColumn(bar_width=bar_width),
                TextColumn("{task.fields[metrics]}"),
                TextColumn("{task.fields[speed]}"),
                console=console,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            metrics="", speed="")
            self._bar.start()

    def _eta(self, step: int) -> str:
        if not self._rate:
            return ""
        steps_per_second = self._rate / max(self.batch_size, 1)
        return f"eta {_clock((self.total_steps - step) / steps_per_second)}"

    def advance(self, step: int) -> None:
        self._step = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def examples_per_second(self, step: int) -> float:
        """Throughput since the previous call (resets the mark)."""
        now = time.perf_counter()
        rate = (step - self._mark_step) * self.batch_size / max(now - self._mark_time, 1e-9)
        self._mark_step, self._mark_time = step, now
        self._rate = rate
        return rate

    def time_step(self, step: int, longer_than: float) -> None:
        """Called, device synchronised, after the first (compiling) step and after a few
        more: the second call prints one line when the steps left will take longer than
        ``longer_than`` seconds at the rate between the two."""
        now = time.perf_counter()
        if self._timed is None:
            self._timed = (step, now)
            return
        rate = (step - self._timed[0]) / max(now - self._timed[1], 1e-9)  # steps/s
        left = (self.total_steps - step) / rate
        if left > longer_than:
            self.message(f"note: training will take about {_clock(left)} more here "
                         f"({rate * self.batch_size:.0f} examples/s over "
                         f"{step - self._timed[0]} timed steps, evaluations not included); "
                         "Ctrl-C saves a checkpoint, and the same command resumes")

    def log(self, step: int, metrics: dict[str, float], rate: float | None = None) -> None:
        """Shows the latest metrics (and examples/s when given): training metrics in the
        bar or a progress line, evaluation metrics (``eval/...``) as their own line."""
        evaluation = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        training = {k: v for k, v in metrics.items() if not k.startswith("eval/")}
        if rate is not None:
            self._rate = rate
        if training:
            speed = (f"{rate:.0f} ex/s  " if rate is not None else "") + self._eta(step)
            if self._bar is not None:
                self._bar.update(self._task, completed=step, metrics=_short(training),
                                 speed=speed)
            elif self.mode == "lines":
                print(f"step {step}/{self.total_steps}  {_format(training)}  {speed}".rstrip(),
                      flush=True)
        if evaluation:
            self.message(f"step {step}/{self.total_steps}  {_format(evaluation)}")

    def message(self, text: str) -> None:
        """A line that is not a metric (resume notice, summary); shown unless mode is none."""
        if self._bar is not None:
            self._bar.console.print(text, soft_wrap=True, highlight=False)
        elif self.mode == "lines":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
