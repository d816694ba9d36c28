"""Multi-host: local processes under ``jax.distributed`` (gloo CPU collectives).

Two processes x two CPU devices must train like one process on one device: the processes
read side by side the global batches one process would read, the step is sharded over 4
devices, and every reduction (loss, gradients, BatchNorm statistics) crosses the process
boundary.
"""

from __future__ import annotations

import pytest
from helpers import train_runs

STEPS = 30
CONFIG = f"{train_runs.TINY_CONFIG}:{STEPS}"


def test_two_processes_train_like_one(tmp_path):
    multi, single = tmp_path / "2x2", tmp_path / "1x1"
    address = f"127.0.0.1:{train_runs.free_port()}"
    processes = [
        train_runs.start_train(multi, f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={index}",
                               devices=2, config=CONFIG)
        for index in range(2)
    ]
    processes.append(train_runs.start_train(single, devices=1, config=CONFIG))
    for process in processes:
        _, err = process.communicate(timeout=400)
        assert process.returncode == 0, err[-3000:]
    multi_records = train_runs.read_records(multi)  # written by process 0 only
    single_records = train_runs.read_records(single)
    assert [r["step"] for r in multi_records] == [5, 6, 10, 12, 15, 18, 20, 24, 25, 30]
    assert [r["step"] for r in multi_records] == [r["step"] for r in single_records]
    for key in ("eval/loss", "train/loss"):
        assert train_runs.last(multi_records, key) == pytest.approx(
            train_runs.last(single_records, key), rel=1e-4)
    # Orbax wrote the checkpoints collectively; each process saved its data position.
    assert train_runs.saved_steps(multi)[-1] == STEPS
    data_dir = multi / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
