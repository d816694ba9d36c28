"""Multi-host: two local processes x two CPU devices under ``jax.distributed`` (gloo
collectives) train like one process on one device."""

from __future__ import annotations

import pytest
from helpers import train_runs
from helpers.tiny_digits import get_config as tiny_config

from gapjax.train import run

STEPS = 30
CONFIG = f"{train_runs.TINY_CONFIG}:{STEPS}"


def test_two_processes_match_one_process(tmp_path):
    address = f"127.0.0.1:{train_runs.free_port()}"
    workdir = tmp_path / "multi"
    processes = [
        train_runs.start_train(workdir, f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={index}",
                               devices=2, config=CONFIG)
        for index in range(2)
    ]
    single = tmp_path / "single"
    run(tiny_config(str(STEPS)), single)
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    multi_records = train_runs.read_records(workdir)  # written by process 0 only
    single_records = train_runs.read_records(single)
    assert [r["step"] for r in multi_records] == [r["step"] for r in single_records]
    assert train_runs.last(multi_records, "eval/loss") == pytest.approx(
        train_runs.last(single_records, "eval/loss"), rel=1e-4)
    # Orbax wrote the checkpoints collectively; each process saved its data position.
    assert train_runs.saved_steps(workdir)[-1] == STEPS
    data_files = sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").iterdir())
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
