"""Running ``train.py`` in subprocesses for the training tests.

JAX fixes its device count when it starts, so multi-device runs need a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set beforehand.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "tests" / "helpers" / "tiny_digits.py")
COMPILATION_CACHE = Path(tempfile.gettempdir()) / "gapjax_test_compilation_cache"


def environment(devices: int = 1) -> dict[str, str]:
    """The environment of a child run with ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Child runs compile the same tiny programs over and over: share compiled executables.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def train_command(workdir: Path, *flags: str, config: str = TINY_CONFIG) -> list[str]:
    """``python train.py --config CONFIG --workdir DIR FLAGS...``."""
    return [sys.executable, str(REPO / "train.py"), f"--config={config}",
            f"--workdir={workdir}", *flags]


def run_train(workdir: Path, *flags: str, devices: int = 1, config: str = TINY_CONFIG,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs train.py to completion and returns the finished process (text output)."""
    return subprocess.run(train_command(workdir, *flags, config=config), cwd=REPO,
                          env=environment(devices), capture_output=True, text=True,
                          timeout=timeout)


def start_train(workdir: Path, *flags: str, devices: int = 1,
                config: str = TINY_CONFIG) -> subprocess.Popen:
    """Starts train.py in the background (output captured)."""
    return subprocess.Popen(train_command(workdir, *flags, config=config), cwd=REPO,
                            env=environment(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def saved_steps(workdir: Path) -> list[int]:
    """Steps of the committed (complete) checkpoints in ``workdir/checkpoints``."""
    directory = Path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def wait_for_checkpoints(process: subprocess.Popen, workdir: Path, count: int,
                         after: int = -1, timeout: float = 240) -> list[int]:
    """Polls until ``count`` checkpoints past step ``after`` are committed; fails if the
    process ends first. Returns those steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [step for step in saved_steps(workdir) if step > after]
        if len(steps) >= count:
            return steps
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"run ended before {count} checkpoints: {steps}\n{out}\n{err}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no {count} checkpoints within {timeout}s")


def read_records(workdir: Path) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last(records: list[dict], key: str) -> float:
    """The latest value of ``key`` in ``records`` (fails if it never appears)."""
    values = [record[key] for record in records if key in record]
    assert values, f"{key} never logged: {records}"
    return values[-1]


def free_port() -> int:
    """A TCP port that is free right now on localhost (for the JAX coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
