"""ViTs in the training loop and the report: train.py trains and resumes exactly, the
ImageNet config runs a step on mock data, the vit_heads experiment produces its section."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
from helpers import train_runs

from gapjax.train import run

VIT_DIGITS = str(train_runs.REPO / "configs" / "vit_digits.py")
#: A tiny ViT on the 8x8 digits: patch 4 (a 2x2 grid), width 32, 2 blocks, 6 steps.
TINY = ("--config.dataset.image_size=8", "--config.model.image_size=8",
        "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.batch_size=16", "--config.total_steps=6", "--config.checkpoint_every=3",
        "--config.eval_every=3", "--config.log_every=3", "--config.progress=none",
        "--config.optimizer.warmup_steps=2")


def load_config(name: str, arg: str | None = None):
    path = train_runs.REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def test_train_py_trains_a_vit_and_resumes_exactly(tmp_path):
    clean = tmp_path / "clean"
    done = train_runs.run_train(clean, *TINY, config=f"{VIT_DIGITS}:gap", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = train_runs.read_records(clean)
    assert train_runs.saved_steps(clean) == [3, 6]
    final = [record for record in records if record["step"] == 6]
    assert final and math.isfinite(train_runs.last(records, "eval/loss"))

    # The same run interrupted after its step-3 checkpoint: drop what came later, rerun.
    resumed = tmp_path / "resumed"
    shutil.copytree(clean, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    again = train_runs.run_train(resumed, *TINY, config=f"{VIT_DIGITS}:gap", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_runs.read_records(resumed) == records  # every loss, bit for bit
    assert train_runs.saved_steps(resumed) == [3, 6]


@pytest.mark.parametrize("arg", ["s16,gap", "ti16,token"])
def test_imagenet_vit_config_runs_a_step_on_mock_data(tmp_path, arg):
    import tensorflow_datasets as tfds

    config = load_config("imagenet_vit", arg)
    assert config.batch_size == 1024 and config.optimizer.name == "adamw"
    size, pool = arg.split(",")
    assert config.model.name == f"vit_{size}" and config.model.pool == pool
    assert config.model.class_token == (pool == "token")
    config.update(batch_size=2, total_steps=1, log_every=1, eval_every=1, checkpoint_every=1,
                  progress="none")
    config.dataset.image_size = 32
    config.model.image_size = 32
    config.model.depth = 1
    with tfds.testing.mock_data(num_examples=4):
        result = run(config, tmp_path)
    assert result.metrics["step"] == 1
    assert math.isfinite(result.metrics["train/loss"])
    assert math.isfinite(result.metrics["eval/loss"])
    with pytest.raises(ValueError, match="size 'h14' is not valid"):
        load_config("imagenet_vit", "h14,gap")


def test_vit_heads_experiment_writes_its_section(tmp_path):
    from gapjax.experiments import vit_heads

    section = vit_heads.run(tmp_path, quick=True, heads=("token", "gap", "map"), seeds=(0,),
                            steps=4, test_examples=48,
                            dataset_options={"num_train": 128, "num_test": 48})
    assert set(section) >= {"title", "claim", "method", "markdown", "numbers", "holds",
                            "verdict", "figures"}
    rows = section["numbers"]["rows"]
    assert [(row["head"], row["method"]) for row in rows] == [
        ("token", "grad_cam"), ("token", "rollout"), ("gap", "cam"), ("gap", "rollout"),
        ("map", "contribution"), ("map", "rollout")]
    for row in rows:
        assert 0.0 <= row["max_box_acc_v2"] <= 100.0 and 0.0 <= row["accuracy"] <= 100.0
        assert row["step_ms"] > 0 and row["parameters"] > row["head_parameters"] > 0
    by_head = {row["head"]: row for row in rows}
    assert by_head["map"]["head_parameters"] > by_head["gap"]["head_parameters"]
    assert section["holds"] in (True, False, None)  # None: undecided (4 steps: near chance)
    assert "MaxBoxAccV2" in section["verdict"]
    assert (tmp_path / "vit_heads.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "vit_heads.json").read_text())
    assert np.isclose(saved["rows"][0]["accuracy"], rows[0]["accuracy"])
