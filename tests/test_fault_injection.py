"""Fault injection: a small training SIGKILLed at many random moments and restarted each
time ends bitwise identical to an uninterrupted run (metrics.jsonl and parameters).

The kills cycle through three kinds of moment:

* inside a checkpoint write: the moment a ``<step>.orbax-checkpoint-tmp`` directory
  appears (the second one of each restart, so that every restart commits one checkpoint
  first and the run makes progress);
* right after a metrics record was appended (between a record and its checkpoint);
* at a random delay after the start (start-up, compilation, restore, training, evaluation).

The number of kills survived is printed (``pytest -s``) and asserted to be large.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import jax
import numpy as np
from helpers import train_runs

STEPS = 30
FLAGS = ("--config.checkpoint_every=2", "--config.log_every=3", "--config.eval_every=10",
         "--config.keep_checkpoints=2", "--config.progress=none")
CONFIG = f"{train_runs.TINY_CONFIG}:{STEPS}"
MIN_KILLS = 4
MAX_KILLS = 14
KILL_BUDGET_S = 30.0  # stop killing after this long (a loaded machine gets fewer kills)


def _temporary_checkpoints(workdir: Path) -> list[str]:
    directory = workdir / "checkpoints"
    try:
        return [entry.name for entry in directory.iterdir() if "orbax-checkpoint-tmp" in entry.name]
    except FileNotFoundError:
        return []


def _metrics_size(workdir: Path) -> int:
    try:
        return (workdir / "metrics.jsonl").stat().st_size
    except FileNotFoundError:
        return 0


def _kill_at(process, workdir: Path, kind: str, delay: float) -> tuple[bool, bool]:
    """Waits for the moment of ``kind`` and SIGKILLs ``process`` then.

    Returns (killed, inside_a_save): killed is False when the run finished first.
    """
    started = time.monotonic()
    seen_saves: set[str] = set()
    growths, size = 0, _metrics_size(workdir)
    while process.poll() is None:
        temporary = _temporary_checkpoints(workdir)
        if kind == "save":
            seen_saves.update(temporary)
            if len(seen_saves) >= 2 and temporary:
                break
        elif kind == "record":
            new_size = _metrics_size(workdir)
            if new_size > size:
                growths, size = growths + 1, new_size
                if growths >= 2:
                    break
        elif time.monotonic() - started >= delay:
            break
        time.sleep(0.001)
    if process.poll() is not None:
        return False, False
    inside = bool(_temporary_checkpoints(workdir))
    process.kill()
    process.communicate(timeout=60)
    return True, inside


def _final_params(workdir: Path):
    import orbax.checkpoint as ocp

    step = train_runs.saved_steps(workdir)[-1]
    restored = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return step, jax.tree.map(np.asarray, restored["params"])


def test_sigkill_at_random_moments_then_restart_matches_an_uninterrupted_run(tmp_path):
    clean_dir, broken_dir = tmp_path / "clean", tmp_path / "broken"
    clean = train_runs.start_train(clean_dir, *FLAGS, config=CONFIG)

    rng = random.Random(18)
    kinds = ("save", "record", "random")
    kills = inside_saves = restarts = 0
    lifetime = 8.0  # a first guess of how long a restart lives, refined as we go
    began = time.monotonic()
    finished = None
    while finished is None:
        restarts += 1
        process = train_runs.start_train(broken_dir, *FLAGS, config=CONFIG)
        if kills >= MAX_KILLS or (time.monotonic() - began > KILL_BUDGET_S
                                  and kills >= MIN_KILLS):
            finished = process  # enough: let this one run to the end
            break
        kind = kinds[kills % len(kinds)]
        started = time.monotonic()
        killed, inside = _kill_at(process, broken_dir, kind, rng.uniform(0.2, lifetime))
        if not killed:
            finished = process
            break
        kills += 1
        inside_saves += inside
        if kind != "random":
            lifetime = 0.5 * lifetime + 0.5 * (time.monotonic() - started)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, out + err
    _, clean_err = clean.communicate(timeout=300)
    assert clean.returncode == 0, clean_err

    print(f"\nfault injection: survived {kills} SIGKILLs ({inside_saves} inside a checkpoint "
          f"write) over {restarts} starts in {time.monotonic() - began:.0f}s")
    assert kills >= MIN_KILLS
    assert inside_saves >= 1
    assert train_runs.read_records(broken_dir) == train_runs.read_records(clean_dir)
    clean_step, clean_params = _final_params(clean_dir)
    broken_step, broken_params = _final_params(broken_dir)
    assert clean_step == broken_step == STEPS
    leaves = zip(jax.tree.leaves(clean_params), jax.tree.leaves(broken_params), strict=True)
    for a, b in leaves:
        assert np.array_equal(a, b)  # bitwise
    assert not _temporary_checkpoints(broken_dir)
    assert not (broken_dir / "lock").exists()
