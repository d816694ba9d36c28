"""Multi-host: local processes under ``jax.distributed`` (gloo CPU collectives).

Two processes x two CPU devices must train exactly like two processes x one device: the
same per-process data shards, with the step sharded over 4 rather than 2 devices and
every reduction (loss, gradients, BatchNorm statistics) crossing the process boundary.
"""

from __future__ import annotations

import pytest
from helpers import train_runs

STEPS = 30
CONFIG = f"{train_runs.TINY_CONFIG}:{STEPS}"


def _start_job(workdir, devices_per_process):
    address = f"127.0.0.1:{train_runs.free_port()}"
    return [
        train_runs.start_train(workdir, f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={index}",
                               devices=devices_per_process, config=CONFIG)
        for index in range(2)
    ]


def test_two_processes_agree_across_device_counts(tmp_path):
    four, two = tmp_path / "2x2", tmp_path / "2x1"
    processes = _start_job(four, 2) + _start_job(two, 1)
    for process in processes:
        _, err = process.communicate(timeout=400)
        assert process.returncode == 0, err[-3000:]
    four_records = train_runs.read_records(four)  # written by process 0 only
    two_records = train_runs.read_records(two)
    assert [r["step"] for r in four_records] == [5, 6, 10, 12, 15, 18, 20, 24, 25, 30]
    assert [r["step"] for r in four_records] == [r["step"] for r in two_records]
    for key in ("eval/loss", "train/loss"):
        assert train_runs.last(four_records, key) == pytest.approx(
            train_runs.last(two_records, key), rel=1e-4)
    # Orbax wrote the checkpoints collectively; each process saved its data position.
    assert train_runs.saved_steps(four)[-1] == STEPS
    data_dir = four / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
