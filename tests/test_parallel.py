"""Scale-out on simulated CPU devices: 1 device, 4-device jit and 4-device pmap train alike,
and a checkpoint written on 4 devices restores and continues on 1 device like a 1-device
run. (Restoring on 8 devices takes the same path with a larger mesh:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py ...`` on a copy of a
4-device workdir, see docs/scaling.md.)"""

from __future__ import annotations

import shutil

import pytest
from helpers import train_runs
from helpers.tiny_digits import get_config as tiny_config

from gapjax.train import run

STEPS, MORE_STEPS = 30, 34
CONFIG = f"{train_runs.TINY_CONFIG}:{STEPS}"
MORE = f"{train_runs.TINY_CONFIG}:{MORE_STEPS}"


def _eval_loss(workdir, step):
    records = [r for r in train_runs.read_records(workdir) if r["step"] == step]
    assert records and "eval/loss" in records[-1], train_runs.read_records(workdir)
    return records[-1]["eval/loss"]


def test_device_counts_and_modes_agree_and_checkpoints_move_between_them(tmp_path):
    jit4, pmap4 = tmp_path / "jit4", tmp_path / "pmap4"
    jobs = [train_runs.start_train(jit4, devices=4, config=CONFIG),
            train_runs.start_train(pmap4, "--config.parallel=pmap", devices=4, config=CONFIG)]
    one = tmp_path / "one"
    run(tiny_config(str(STEPS)), one)  # this process has a single CPU device
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    reference = _eval_loss(one, STEPS)
    assert _eval_loss(jit4, STEPS) == pytest.approx(reference, rel=1e-4)
    assert _eval_loss(pmap4, STEPS) == pytest.approx(reference, rel=1e-4)

    # The 4-device checkpoint continues on 1 device, like the 1-device run does.
    on1 = tmp_path / "on1"
    shutil.copytree(jit4, on1)
    resumed = run(tiny_config(str(MORE_STEPS)), on1)
    run(tiny_config(str(MORE_STEPS)), one)
    assert _eval_loss(on1, MORE_STEPS) == pytest.approx(_eval_loss(one, MORE_STEPS), rel=1e-4)
    # It really resumed: the records up to step 30 are the 4-device run's own.
    steps = [r["step"] for r in train_runs.read_records(on1)]
    assert steps[-1] == MORE_STEPS and resumed.metrics["step"] == MORE_STEPS
