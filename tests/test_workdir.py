"""The run directory: bound to its config, locked, self-healing, loud when a save fails.

Each case of a workdir that used to lose or mix data, reproduced: a rerun under another
config, --eval_only under another config, a torn metrics line, a damaged latest checkpoint,
two runs at once, a stale lock, a full disk, a missing config file, an unwritable workdir.
Each now ends with one line and nothing lost. Most tests copy one finished 12-step run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from helpers import train_runs
from helpers.tiny_digits import get_config as tiny_config

from gapjax.train import run
from gapjax.train.checkpoint import CheckpointMismatchError, CheckpointSaveError
from gapjax.train.metrics import MetricsFileError, Progress, read_metrics, repair_metrics
from gapjax.train.workdir import (
    RESUMABLE_KEYS,
    WorkdirError,
    WorkdirLock,
    config_changes,
    format_changes,
    read_lock,
)

STEPS = 12  # tiny_digits: checkpoints every 4 steps, keeps 2 -> steps 8 and 12


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step run: its directory, records and final parameters."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = run(tiny_config(str(STEPS)), workdir)
    params = jax.tree.map(np.asarray, result.variables["params"])
    return workdir, train_runs.read_records(workdir), params


def _copy(finished, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(finished[0], target)
    return target


def _assert_same_params(a, b):
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # bitwise, not merely close


def _one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------------------
# The config record
# --------------------------------------------------------------------------------------


def test_config_changes_name_each_key_and_both_values():
    recorded = {"batch_size": 32, "model": {"pool": "gap", "widths": [8, 16]}, "seed": 0}
    current = {"batch_size": 64, "model": {"pool": "gmp", "widths": [8, 16]}, "seed": 0,
               "init_from": ""}
    changes = config_changes(recorded, current)
    assert [key for key, _, _ in changes] == ["batch_size", "init_from", "model.pool"]
    assert format_changes(changes) == ('batch_size 32 -> 64, init_from (absent) -> "", '
                                       'model.pool "gap" -> "gmp"')
    assert config_changes(recorded, json.loads(json.dumps(recorded))) == []
    assert config_changes({"x": 1}, {"x": 1.0}) != []  # a type change is a change
    assert "total_steps" in RESUMABLE_KEYS and "batch_size" not in RESUMABLE_KEYS


def test_rerun_under_another_config_is_refused_naming_each_key(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    config = tiny_config(str(STEPS))
    config.model.pool = "gmp"
    config.model.widths = (4, 8)  # a parameter shape change
    config.batch_size = 16
    config.total_steps = 20  # allowed on its own, but not a reason to accept the rest
    with pytest.raises(WorkdirError) as error:
        run(config, workdir)
    message = _one_line(str(error.value))
    assert ('batch_size 32 -> 16, model.pool "gap" -> "gmp", model.widths [8, 16] -> [4, 8]; '
            in message)
    assert "total_steps" not in message.split(";")[0]
    assert "--fresh" in message and "--fork" in message
    assert train_runs.read_records(workdir) == finished[1]  # nothing appended
    assert train_runs.saved_steps(workdir) == [8, 12]
    assert read_lock(workdir) is None  # the lock went with the refused run


def test_eval_only_under_another_config_evaluates_the_run_as_trained(finished, tmp_path,
                                                                     capfd):
    workdir = _copy(finished, tmp_path)
    config = tiny_config(str(STEPS))
    config.model.pool = "gmp"
    config.model.patch_size = 4  # a key of another model: it must not reach the cnn
    result = run(config, workdir, eval_only=True)
    # The GAP weights evaluated with the GAP model: the same numbers as at the end of
    # training, and nothing appended under the other config.
    assert result.metrics["eval/loss"] == finished[1][-1]["eval/loss"]
    assert train_runs.read_records(workdir) == finished[1]
    err = capfd.readouterr().err
    assert 'ignored: model.pool "gap" -> "gmp"; nothing is appended' in err
    # Under the recorded config it appends its record as before.
    run(tiny_config(str(STEPS)), workdir, eval_only=True)
    records = train_runs.read_records(workdir)
    assert records[:-1] == finished[1]
    assert records[-1]["eval/loss"] == finished[1][-1]["eval/loss"]


def test_resumable_keys_may_change_and_are_recorded(finished, tmp_path, capfd):
    workdir = _copy(finished, tmp_path)
    config = tiny_config("14")
    config.log_every = 7
    result = run(config, workdir)
    assert result.metrics["step"] == 14
    err = capfd.readouterr().err
    assert "config changes accepted on resume: log_every 5 -> 7, total_steps 12 -> 14" in err
    record = json.loads((workdir / "config.json").read_text())
    assert record["config"]["total_steps"] == 14
    assert record["resumed"] == [{"step": 12, "changes": {"log_every": [5, 7],
                                                          "total_steps": [12, 14]}}]


def test_fresh_starts_over_and_fork_branches(finished, tmp_path, capfd):
    old = _copy(finished, tmp_path, "old")
    # --fork: a new directory continues from the old run's newest checkpoint under a new
    # learning rate; the old run is untouched.
    config = tiny_config("14")
    config.optimizer.learning_rate = 0.01
    branch = tmp_path / "branch"
    result = run(config, branch, fork_from=old)
    assert result.metrics["step"] == 14
    assert train_runs.read_records(old) == finished[1]
    branched = train_runs.read_records(branch)
    assert branched[:len(finished[1])] == finished[1] and branched[-1]["step"] == 14
    record = json.loads((branch / "config.json").read_text())
    assert record["forked_from"] == {"workdir": str(old), "step": 12}
    assert "optimizer.learning_rate 0.05 -> 0.01" in capfd.readouterr().err
    # Rerunning the same fork resumes it instead of copying again.
    run(config, branch, fork_from=old)
    assert train_runs.read_records(branch) == branched

    # A fork whose model no longer fits the checkpoint: one line naming an array.
    config.model.widths = (4, 8)
    with pytest.raises(CheckpointMismatchError) as error:
        run(config, tmp_path / "narrow", fork_from=old)
    message = _one_line(str(error.value))
    assert re.search(r"does not fit the model: \S+ has shape \(\d+, 10\) there, \(8, 10\)",
                     message), message
    assert "Event loop is closed" not in capfd.readouterr().err

    # --fresh: the same directory, a new run from step 0 under the new config.
    config = tiny_config("4")
    config.model.pool = "gmp"
    run(config, old, fresh=True)
    assert [r["step"] for r in train_runs.read_records(old)] == [4]
    assert train_runs.saved_steps(old) == [4]
    assert json.loads((old / "config.json").read_text())["config"]["model"]["pool"] == "gmp"
    assert "--fresh: deleted checkpoints, metrics.jsonl" in capfd.readouterr().err
    with pytest.raises(WorkdirError, match="--fresh cannot be combined"):
        run(config, old, fresh=True, fork_from=branch)

    # A fork of a run already at total_steps says how to go on, and creates nothing.
    with pytest.raises(WorkdirError) as error:
        run(tiny_config("14"), tmp_path / "late", fork_from=branch)
    assert _one_line(str(error.value)) == (
        f"--fork: {branch} is already at step 14, and config.total_steps=14; raise it (e.g. "
        "--config.total_steps=28) to train the fork further")
    assert not (tmp_path / "late").exists()


# --------------------------------------------------------------------------------------
# Self-healing: torn metrics line, damaged checkpoints
# --------------------------------------------------------------------------------------


def test_repair_metrics_drops_a_torn_line_and_records_past_the_step(tmp_path, capfd):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "train/loss": 1.0}\n{"step": 8, "train/loss": 0.5}\n'
                    '{"step": 10, "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 8]  # readable as it is
    kept = repair_metrics(tmp_path, resume_step=6)
    assert [r["step"] for r in kept] == [5]
    assert path.read_text() == '{"step": 5, "train/loss": 1.0}\n'
    err = capfd.readouterr().err.strip()
    assert err == (f"note: {path}: dropped a torn last line (a crash mid-write) and 1 "
                   "record(s) past step 6, the step resumed from")
    repair_metrics(tmp_path, resume_step=6)  # nothing to do: no notice
    assert capfd.readouterr().err == ""
    path.write_text('{"step": 5}\ngarbage\n{"step": 6}\n')
    with pytest.raises(MetricsFileError, match=f"{re.escape(str(path))} line 2 is not"):
        read_metrics(tmp_path)


def test_torn_metrics_line_is_repaired_on_resume(finished, tmp_path, capfd):
    workdir = _copy(finished, tmp_path)
    # A crash after step 9's records were logged, mid-way through step 10's line, before
    # the checkpoint of step 12: the newest checkpoint is 8.
    shutil.rmtree(workdir / "checkpoints" / "12")
    with open(workdir / "metrics.jsonl", "a") as file:
        file.write('{"step": 10, "train/loss": 2.2')
    result = run(tiny_config(str(STEPS)), workdir)
    assert train_runs.read_records(workdir) == finished[1]
    _assert_same_params(result.variables["params"], finished[2])
    err = capfd.readouterr().err
    assert re.search(r"note: \S+metrics.jsonl: dropped a torn last line \(a crash mid-write\) "
                     r"and 2 record\(s\) past step 8", err), err


def _truncate_largest_array_file(step_dir):
    files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as file:
        file.truncate(files[-1].stat().st_size // 3)


@pytest.mark.parametrize("damage", ["truncated_array_file", "garbage_iterator_json"])
def test_damaged_latest_checkpoint_is_skipped_with_a_warning(finished, tmp_path, capfd,
                                                             damage):
    workdir = _copy(finished, tmp_path)
    latest = workdir / "checkpoints" / "12"
    if damage == "truncated_array_file":
        _truncate_largest_array_file(latest)
        named = str(latest / "state")
    else:
        (named_file,) = (latest / "data").glob("*.json")
        named_file.write_text('{"next_index": 3, garbage')
        named = str(named_file)
    # Rerun: it restores step 8, retrains 9..12, and ends where the clean run ended.
    result = run(tiny_config(str(STEPS)), workdir)
    err = capfd.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: cannot")]
    assert len(warning) == 1 and named in warning[0], err
    assert "trying the previous checkpoint" in warning[0]
    assert f"moved the damaged checkpoint {latest} to" in err
    assert (workdir / "damaged_checkpoints" / "12").is_dir()  # kept, not deleted
    assert train_runs.read_records(workdir) == finished[1]
    assert train_runs.saved_steps(workdir) == [8, 12]
    _assert_same_params(result.variables["params"], finished[2])
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------
# One run per workdir
# --------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    holder = WorkdirLock(workdir)
    holder.acquire()  # another run holds the workdir (a second open file: flock conflicts)
    try:
        with pytest.raises(WorkdirError) as error:
            run(tiny_config(str(STEPS)), workdir, eval_only=True)
        message = _one_line(str(error.value))
        assert f"is in use by another run (pid {os.getpid()} on host" in message
        assert train_runs.read_records(workdir) == finished[1]
    finally:
        holder.release()
    assert not (workdir / "lock").exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over(finished, tmp_path, capfd):
    workdir = _copy(finished, tmp_path)
    # What a run killed with SIGKILL leaves: the lock file, but no process holding it.
    (workdir / "lock").write_text(json.dumps(
        {"host": "elsewhere", "pid": 4194304, "started": "2026-01-01T00:00:00+00:00"}))
    config = tiny_config(str(STEPS))
    config.seed = 1
    with pytest.raises(WorkdirError, match="seed 0 -> 1"):  # got past the lock
        run(config, workdir)
    err = capfd.readouterr().err
    assert ("note: took over the lock of a run that is no longer running (pid 4194304 on "
            "host elsewhere, started 2026-01-01T00:00:00+00:00)") in err


# --------------------------------------------------------------------------------------
# A failed save
# --------------------------------------------------------------------------------------


# Orbax leaves the failed save's other writers pending; Python reports them at collection
# (the command line silences that after its one-line error).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path,
                                                                        monkeypatch, capfd):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full_from_step_8(self, item, directory):
        # The meta item of every checkpoint carries its step: from step 8 on the disk is
        # full, as a real ENOSPC in the background commit thread.
        if isinstance(item, dict) and item.get("step", 0) >= 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn",
                        disk_full_from_step_8)
    config = tiny_config("40")
    with pytest.raises(CheckpointSaveError) as error:
        run(config, tmp_path / "run")
    message = _one_line(str(error.value))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert error.value.errno == errno.ENOSPC and error.value.path == checkpoints / "8"
    assert message.startswith(f"saving checkpoint {checkpoints / '8'} failed: No space left "
                              "on device [errno 28 ENOSPC]; stopped; the previous checkpoint "
                              "(step 4) is kept")
    assert train_runs.saved_steps(tmp_path / "run") == [4]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4"]  # no temporary directory
    # Stopped at the first step after the failure was known, at the latest when the next
    # save (step 12) waited for it; not at the end of the run.
    assert max(r["step"] for r in train_runs.read_records(tmp_path / "run")) <= 12
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Failed to run" not in err
    # Space is back: the rerun resumes from step 4.
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", original)
    assert run(config, tmp_path / "run").metrics["step"] == 40


# --------------------------------------------------------------------------------------
# The command line: one line each
# --------------------------------------------------------------------------------------


def test_cli_missing_config_file_and_unwritable_workdir_are_one_line(tmp_path):
    missing = train_runs.run_train(tmp_path / "run", "--config.model.pool=gmp",
                                   "--config.model.pool_kwargs.p=3",
                                   config=f"{tmp_path / 'nope.py'}:12")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: --config: no such file: {tmp_path / 'nope.py'}"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unwritable = train_runs.run_train(blocker / "run")
    assert unwritable.returncode == 1
    assert unwritable.stderr.strip() == (f"error: cannot create workdir {blocker / 'run'}: "
                                         "Not a directory (ENOTDIR)")


def test_cli_refuses_a_changed_config_with_one_line(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    changed = train_runs.run_train(workdir, "--config.model.pool=gmp",
                                   config=f"{train_runs.TINY_CONFIG}:{STEPS}")
    assert changed.returncode == 1
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config differs from the run in")
    assert 'model.pool "gap" -> "gmp"' in lines[0]


DISK_FULL_FROM_STEP_8 = """
import errno, os, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler
original = json_checkpoint_handler.JsonCheckpointHandler._save_fn
async def disk_full_from_step_8(self, item, directory):
    if isinstance(item, dict) and item.get("step", 0) >= 8:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await original(self, item, directory)
json_checkpoint_handler.JsonCheckpointHandler._save_fn = disk_full_from_step_8
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_disk_full_is_one_line(tmp_path):
    import subprocess

    # train.py under the in-process disk-full simulation of the test above.
    wrapper = tmp_path / "disk_full.py"
    wrapper.write_text(DISK_FULL_FROM_STEP_8)
    command = train_runs.train_command(tmp_path / "run", config=f"{train_runs.TINY_CONFIG}:40")
    full = subprocess.run([command[0], str(wrapper), *command[1:]], cwd=train_runs.REPO,
                          env=train_runs.environment(), capture_output=True, text=True,
                          timeout=240)
    assert full.returncode == 1, full.stderr
    assert full.stderr.strip().splitlines() == [
        f"error: saving checkpoint {tmp_path / 'run' / 'checkpoints' / '8'} failed: No space "
        "left on device [errno 28 ENOSPC]; stopped; the previous checkpoint (step 4) is kept."
        " Free space or fix the directory, then rerun the same command to resume"], full.stderr


# --------------------------------------------------------------------------------------
# The console
# --------------------------------------------------------------------------------------


def test_a_long_run_says_so_once_from_its_timed_steps(monkeypatch, capsys):
    long, short = Progress("lines", 3611, 0, 32), Progress("lines", 100, 0, 32)
    clock = iter([100.0, 110.0, 100.0, 101.0])
    monkeypatch.setattr("gapjax.train.metrics.time.perf_counter", lambda: next(clock))
    for progress in (long, short):  # 10 steps in 10 s with 3600 left, then in 1 s with 89
        progress.time_step(1, 600)
        progress.time_step(11, 600)
    assert capsys.readouterr().out == (
        "note: training will take about 1:00:00 more here (32 examples/s over 10 timed steps,"
        " evaluations not included); Ctrl-C saves a checkpoint, and the same command resumes\n")


def _rendered_lines(text: str) -> list[str]:
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", text).replace("\r", "\n")
    return [line for line in plain.split("\n") if line.strip()]


@pytest.mark.parametrize("total", [200, 450000])
def test_progress_bar_fits_80_columns(total):
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    progress = Progress("bar", total, 0, 128, console=console)
    step = total * 3 // 10
    progress.advance(step)
    progress.log(step, {"train/loss": 0.57123, "train/accuracy": 0.82634}, 1830.4)
    progress.log(step, {"eval/loss": 0.0263, "eval/accuracy": 0.9889})
    progress.close()
    lines = _rendered_lines(buffer.getvalue())
    assert f"step {step}/{total}  eval/loss 0.0263  eval/accuracy 0.9889" in lines
    bar = [line for line in lines if "ex/s" in line][-1]
    assert len(bar) <= 80, bar
    assert re.search(rf"\b{step}/{total} .*loss 0\.5712 acc 0\.8263 1830 ex/s  eta \d+:\d\d",
                     bar), bar


def test_embedded_dataset_first_build_prints_one_line(tmp_path):
    import subprocess
    import sys

    # A fresh process, as a first run is: TFDS's banner goes to stdout, its warnings
    # through absl logging to stderr.
    code = ("from helpers.tiny_digits import get_config; from gapjax import data; "
            "from absl import logging; logging.use_absl_handler(); "
            f"c = get_config().dataset; c.data_dir = {str(tmp_path / 'data')!r}; "
            "data.dataset_info(c)")
    env = train_runs.environment()
    env["PYTHONPATH"] = os.pathsep.join([str(train_runs.REPO / "tests"), env["PYTHONPATH"]])
    built = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=240, cwd=train_runs.REPO)
    assert built.returncode == 0, built.stderr
    assert built.stdout == ""
    assert built.stderr.strip() == (f"building gapjax_digits/8 in {tmp_path / 'data'} (first "
                                    "use; generated locally, nothing is downloaded)")


# --------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------


def test_ctrl_c_saves_at_the_current_step_and_a_second_one_aborts(tmp_path):
    config = f"{train_runs.TINY_CONFIG}:10000000"  # days: it says so after 11 steps
    workdir = tmp_path / "run"
    first = train_runs.start_train(workdir, "--config.progress=lines", config=config)
    steps = train_runs.wait_for_checkpoints(first, workdir, 1, after=11)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    match = re.search(r"stopped \(Ctrl-C\): saved a checkpoint at step (\d+)", out)
    assert match, out + err
    stopped = int(match.group(1))
    # Saved at the step it was at, not only at the last interval checkpoint.
    assert stopped >= steps[0] and stopped in train_runs.saved_steps(workdir)
    assert "interrupted: saving a checkpoint at the current step" in err
    assert "Traceback" not in err
    assert len(re.findall(r"note: training will take about \d+:\d\d:\d\d more here", out)) == 1
    assert not (workdir / "lock").exists()
    # The rerun resumes from that step.
    resumed = train_runs.start_train(workdir, "--config.progress=lines", config=config)
    train_runs.wait_for_checkpoints(resumed, workdir, 1, after=stopped)
    resumed.send_signal(signal.SIGTERM)
    out, err = resumed.communicate(timeout=120)
    assert f"resuming from step {stopped}" in out and "stopped (SIGTERM)" in out, out + err


def test_second_ctrl_c_aborts_at_once():
    from gapjax.train.workdir import StopSignals

    signals = StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a save at this step
        assert signals.raised and signals.name == "Ctrl-C"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second does not wait
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    terms = StopSignals()
    terms.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM never aborts: it only asks
        assert terms.raised and terms.name == "SIGTERM"
    finally:
        terms.restore()


def test_tensorboard_is_an_extra_and_documented():
    import tomllib

    project = tomllib.loads((train_runs.REPO / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("tensorboard") for req in
               project["optional-dependencies"]["tensorboard"])
    assert 'pip install -e ".[tensorboard]"' in (train_runs.REPO / "README.md").read_text()


def test_fresh_keeps_other_files_and_fork_refuses_a_directory_with_another_run(tmp_path):
    from gapjax.train.workdir import clear_run, open_workdir

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "4").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 4}\n')
    (run_dir / "notes.txt").write_text("mine")
    assert clear_run(run_dir) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]

    config = {"model": {"pool": "gap"}, "total_steps": 4}
    other = tmp_path / "other"
    (other / "checkpoints" / "8").mkdir(parents=True)
    (run_dir / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(WorkdirError, match=f"--fork: {re.escape(str(other))} already holds "
                                           "another run"):
        with open_workdir(other, config, fork_from=run_dir):
            pass
    with pytest.raises(WorkdirError, match="does not exist"):
        with open_workdir(tmp_path / "new", config, fork_from=tmp_path / "missing"):
            pass
    with pytest.raises(WorkdirError, match="--fork needs a new directory"):
        with open_workdir(run_dir, config, fork_from=run_dir):
            pass
    assert not (other / "lock").exists() and not (run_dir / "lock").exists()
