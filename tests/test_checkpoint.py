"""Checkpoints: kill -9 and SIGTERM mid-run, then rerun, end bitwise equal to one clean run."""

from __future__ import annotations

import re
import signal

from helpers import train_runs

STEPS = "40"
CONFIG = f"{train_runs.TINY_CONFIG}:{STEPS}"


def test_sigkill_and_sigterm_then_rerun_match_an_uninterrupted_run(tmp_path):
    clean_dir, broken_dir = tmp_path / "clean", tmp_path / "broken"
    clean = train_runs.start_train(clean_dir, config=CONFIG)

    # kill -9 right after the second checkpoint is committed.
    killed = train_runs.start_train(broken_dir, config=CONFIG)
    steps = train_runs.wait_for_checkpoints(killed, broken_dir, 2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert steps[-1] < int(STEPS)

    # Rerun, then SIGTERM once it has written one more checkpoint: it saves and exits 0.
    preempted = train_runs.start_train(broken_dir, "--config.progress=lines", config=CONFIG)
    train_runs.wait_for_checkpoints(preempted, broken_dir, 1, after=steps[-1])
    preempted.send_signal(signal.SIGTERM)
    out, err = preempted.communicate(timeout=120)
    finished = "done: step 40" in out
    assert preempted.returncode == 0, err
    if not finished:  # the signal arrived before the end: a checkpoint at that very step
        match = re.search(r"saved a checkpoint at step (\d+)", out)
        assert match, out + err
        assert int(match.group(1)) in train_runs.saved_steps(broken_dir)
        assert int(match.group(1)) < int(STEPS)

    # The final rerun completes the run.
    resumed = train_runs.run_train(broken_dir, config=CONFIG)
    assert resumed.returncode == 0, resumed.stderr
    _, clean_err = clean.communicate(timeout=240)
    assert clean.returncode == 0, clean_err

    clean_records = train_runs.read_records(clean_dir)
    broken_records = train_runs.read_records(broken_dir)
    for key in ("train/loss", "eval/loss", "eval/accuracy"):
        # Exactly equal floats: bitwise identical, not merely close.
        assert train_runs.last(broken_records, key) == train_runs.last(clean_records, key)
    assert broken_records == clean_records
    assert train_runs.saved_steps(broken_dir)[-1] == int(STEPS)
