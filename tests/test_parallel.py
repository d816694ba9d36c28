"""Scale-out on simulated CPU devices: 1 device, 4-device jit and 4-device pmap train alike,
and a checkpoint written on 4 devices restores and continues on 1 and on 8."""

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

    # The 4-device checkpoint continues on 8 devices and on 1, like the 1-device run does.
    on8, on1 = tmp_path / "on8", tmp_path / "on1"
    shutil.copytree(jit4, on8)
    shutil.copytree(jit4, on1)
    eight = train_runs.start_train(on8, devices=8, config=MORE)
    run(tiny_config(str(MORE_STEPS)), on1)
    run(tiny_config(str(MORE_STEPS)), one)
    _, err = eight.communicate(timeout=300)
    assert eight.returncode == 0, err
    reference = _eval_loss(one, MORE_STEPS)
    assert _eval_loss(on1, MORE_STEPS) == pytest.approx(reference, rel=1e-4)
    assert _eval_loss(on8, MORE_STEPS) == pytest.approx(reference, rel=1e-4)
    # The restored runs really resumed (no step 1..30 records were rewritten after 30).
    assert [r["step"] for r in train_runs.read_records(on8)][-1] == MORE_STEPS
