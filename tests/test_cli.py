"""The command lines (``gapjax.cli``): every user error is one line on stderr with a non-zero
exit status and no traceback (``--traceback`` shows it), unreadable photos are skipped and
named, slow map methods report progress, and a run trained with a fork's pool reopens from
any directory with no PYTHONPATH (``python -m gapjax.cam`` and ``config.init_from``).

The photos mode runs a small CNN in place of the pretrained ResNet (``pretrained.load`` is
replaced), at the 224x224 of the evaluation transform; everything else is the real code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from gapjax import models
from gapjax.cli import cam as cam_cli
from gapjax.cli import wsol as wsol_cli
from gapjax.train.checkpoint import Checkpointer
from gapjax.train.defaults import base_config

REPO = Path(__file__).resolve().parents[1]


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def exits(argv, main=cam_cli.main) -> int:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two readable photos, a truncated JPEG and a text file named .png."""
    directory = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (300, 200)), ("b.png", (90, 120))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(directory / name)
    whole = (directory / "a.jpg").read_bytes()
    (directory / "cut.jpg").write_bytes(whole[:len(whole) // 3])
    (directory / "text.png").write_text("not an image")
    return directory


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A 10-class CNN and its variables, in place of ``pretrained.load``'s ResNet, and a
    (valid) weight file."""
    model = models.get("cnn", num_classes=10, widths=(4, 8))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    safetensors.numpy.save_file({"fc.weight": np.ones((10, 64), np.float32)}, str(path))
    return model, variables, path


@pytest.fixture
def small_model(small_weights, monkeypatch):
    model, variables, path = small_weights
    monkeypatch.setattr(cam_cli.pretrained, "load", lambda name, weights: (model, variables))
    return path


def test_unreadable_photos_are_named_and_skipped_the_others_drawn(photos, small_model,
                                                                  tmp_path, capsys):
    out = tmp_path / "cams"
    argv = ["--image", str(photos), "--model", "resnet18", "--weights", str(small_model),
            "--out", str(out), "--method", "score_cam", "--batch_size", "2"]
    assert exits(argv) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert "cut.jpg" in errors[0] and "text.png" in errors[1]
    assert all("replace or remove the file" in line for line in errors)
    assert sorted(p.name for p in out.iterdir()) == ["a_cam.png", "b_cam.png"]
    assert len(captured.out.strip().splitlines()) == 3  # two predictions, "wrote 2 ..."
    progress = [line for line in captured.err.splitlines() if line.startswith("score_cam")]
    assert progress[0].startswith("score_cam: 2 image(s) in batches of 2")
    # live progress inside the batch: the first and the last chunk of channels at least
    chunks = [line.split(" of channels")[0] for line in progress[1:-1]]
    assert chunks[0].startswith("score_cam: chunk 1 of ") and len(chunks) == len(progress) - 2
    count = chunks[0].rsplit(" ", 1)[1]
    assert chunks[-1] == f"score_cam: chunk {count} of {count}"
    assert progress[-1].startswith("score_cam: images 1-2 of 2 done in")


@pytest.mark.parametrize("case, argv, status, says", [
    ("empty folder", ["--image", "{empty}"], 1, "no image files"),
    ("missing image", ["--image", "{tmp}/nothing.jpg"], 1, "nothing.jpg' does not exist"),
    ("missing weights", ["--weights", "{tmp}/none.safetensors"], 1,
     "none.safetensors' does not exist"),
    ("unknown model", ["--model", "resnet7"], 2, "--model 'resnet7' has no pretrained weight"),
    ("unknown method", ["--method", "gradcam"], 2, "invalid choice: 'gradcam'"),
    ("not a run", ["--workdir", "{tmp}"], 1, "is not a gapjax run"),
])
def test_each_user_error_is_one_line(case, argv, status, says, photos, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    defaults = {"--image": str(photos / "a.jpg"), "--model": "resnet18",
                "--weights": str(tmp_path / "w.safetensors")}
    argv = [arg.format(tmp=tmp_path, empty=tmp_path / "empty") for arg in argv]
    if "--workdir" not in argv:
        argv += [part for key, value in defaults.items() if key not in argv
                 for part in (key, value)]
    assert exits(argv) == status, case
    (line,) = error_lines(capsys)
    assert line.startswith("python -m gapjax.cam: error: ") and says in line, line


def test_damaged_weight_files_are_one_line_and_traceback_on_request(photos, tmp_path,
                                                                    small_weights, capsys,
                                                                    monkeypatch):
    whole = small_weights[2].read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(whole[:len(whole) // 2])
    argv = ["--image", str(photos / "a.jpg"), "--model", "resnet18", "--weights"]
    assert exits([*argv, str(truncated)]) == 1
    (line,) = error_lines(capsys)
    assert f"'{truncated}' is truncated or corrupt" in line

    checkpoint = tmp_path / "resnet18.pth"
    checkpoint.write_bytes(b"\x80\x02")
    monkeypatch.setitem(sys.modules, "torch", None)  # PyTorch not installed
    assert exits([*argv, str(checkpoint)]) == 1
    (line,) = error_lines(capsys)
    assert str(checkpoint) in line and 'pip install -e ".[reference]"' in line
    assert "convert it to .safetensors" in line
    with pytest.raises(ImportError, match="needs PyTorch"):
        cam_cli.main([*argv, str(checkpoint), "--traceback"])


def test_wsol_command_names_the_missing_or_corrupt_file(tmp_path, capsys):
    split = tmp_path / "metadata" / "CUB" / "test"
    split.mkdir(parents=True)
    (split / "image_ids.txt").write_text("a/x.jpg\n")
    (split / "class_labels.txt").write_text("a/x.jpg,0\n")
    (split / "image_sizes.txt").write_text("a/x.jpg,10,10\n")
    (split / "localization.txt").write_text("a/x.jpg,1,1,5,5\n")
    maps = tmp_path / "maps"
    argv = ["--scoremap_root", str(maps), "--metadata_root", str(tmp_path / "metadata"),
            "--dataset_name", "CUB", "--split", "test"]
    for says, write in (("score map folder", None), ("no score map", b""),
                        ("truncated or corrupt", b"\x93NUMPY\x01")):
        if write is not None:
            (maps / "a").mkdir(parents=True, exist_ok=True)
        if write:
            (maps / "a" / "x.jpg.npy").write_bytes(write)
        assert exits(argv, wsol_cli.main) == 1
        (line,) = error_lines(capsys)
        assert line.startswith("python -m gapjax.wsol: error: ") and says in line, line


FORK_POOL = '''
import jax.numpy as jnp
from gapjax.pooling import POOLS, Pool, gap


@POOLS.register("apps_power_mean")
class PowerMean(Pool):
    power: float = 2.0

    def __call__(self, x, mask=None):
        powered = jnp.abs(x.astype(jnp.float32)) ** self.power
        return (gap(powered, mask) ** (1 / self.power)).astype(x.dtype)
'''

REOPEN = '''
import runpy
import sys
import jax
from flax import traverse_util
from gapjax import models
from gapjax.train import init_from
from gapjax.train.checkpoint import load_run

run = load_run(sys.argv[1])
model = models.from_config(run.config, 10)
print(model.pool, dict(model.pool_kwargs), run.step)
fresh = traverse_util.flatten_dict(jax.eval_shape(
    model.init, jax.random.key(1), jax.ShapeDtypeStruct((1, 8, 8, 1), "float32")), sep="/")
loaded, kept = init_from.initial_leaves(sys.argv[1], "cnn", model, fresh)
print(len(loaded), kept)
# python -m gapjax.cam / gapjax.wsol: the library's entry points hand over to gapjax.cli.
sys.argv = ["gapjax.cam", "--workdir", sys.argv[1], "--num", "4", "--out", "cams.png"]
runpy.run_module("gapjax.cam", run_name="__main__")
sys.argv = ["gapjax.wsol", "--scoremap_root", "none", "--dataset_name", "CUB", "--split", "test"]
runpy.run_module("gapjax.wsol", run_name="__main__")
'''


def test_a_fork_run_reopens_from_any_directory_without_pythonpath(tmp_path):
    """The run's recorded ``imports`` bring the fork's pool back; its pool_kwargs hold."""
    fork = tmp_path / "fork"
    fork.mkdir()
    (fork / "apps_fork_pool.py").write_text(FORK_POOL)
    sys.path.insert(0, str(fork))
    try:
        import apps_fork_pool  # noqa: F401  (registers the pool in this process too)
    finally:
        sys.path.remove(str(fork))
    config = base_config()
    config.dataset.name, config.dataset.image_size = "gapjax_digits", 8
    config.model.name, config.model.widths = "cnn", (4, 8)
    config.model.pool, config.model.pool_kwargs = "apps_power_mean", {"power": 3.0}
    config.imports = (str(fork / "apps_fork_pool.py"),)  # as train.run records it: resolved
    model = models.from_config(config, 10)
    assert model.pool_kwargs["power"] == 3.0
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    workdir = tmp_path / "run"
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    iterator = type("Position", (), {"get_state": lambda self: {"index": 0}})()
    checkpointer.save(3, dict(variables), iterator, {"step": 3, "config": json.loads(
        config.to_json_best_effort())}, force=True)
    checkpointer.close()
    (workdir / "config.json").write_text(json.dumps({
        "config": json.loads(config.to_json_best_effort())}))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", REOPEN, str(workdir)], cwd=elsewhere,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "python -m gapjax.wsol: error: score map folder 'none' does not exist")
    lines = result.stdout.splitlines()
    assert lines[0] == "apps_power_mean {'power': 3.0} 3"
    assert lines[1].endswith(" []") and int(lines[1].split()[0]) == len(
        jax.tree.leaves(variables))
    assert "wrote cams.png" in lines and (elsewhere / "cams.png").stat().st_size > 0
