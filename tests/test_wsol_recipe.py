"""configs/wsol.py end to end on a synthetic benchmark tree: two steps, the train-fullsup
evaluation with the reference protocol, the test evaluation at the calibrated threshold,
and the CAM overlay in TensorBoard's event file."""

from __future__ import annotations

import importlib.util
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers.wsol_tree import make_tree
from PIL import Image
from tensorboardX.proto import event_pb2

from gapjax.train import run

ROOT = Path(__file__).resolve().parents[1]


def _recipe(arg):
    spec = importlib.util.spec_from_file_location("wsol_recipe", ROOT / "configs" / "wsol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _events(directory: Path):
    """Every Event in the TFRecord event files under ``directory``."""
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            yield event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4


def test_recipe_choices_follow_the_reference():
    config = _recipe("cub,resnet50,adl")
    assert config.model.stage_strides == (1, 2, 2, 1)
    assert config.model.adl_blocks == ("layer3_0", "layer4_0", "layer4_2")
    assert config.optimizer.head_lr_multiplier == 10.0
    assert config.optimizer.step_boundaries == (0.3, 0.6, 0.9)  # every 15 of 50 epochs
    assert config.eval_every == 5994 // 32 and config.total_steps == 50 * (5994 // 32)
    large = _recipe("ilsvrc,vgg16,cam,large")
    assert large.model.pool_after == (1, 2, 3) and large.model.extra_convs == (1024,)
    assert large.optimizer.head_modules == ("head", "conv6_1")
    with pytest.raises(ValueError, match="method 'spg' is not one of"):
        _recipe("cub,vgg16,spg")


def test_recipe_runs_two_steps_and_evaluates_like_the_reference(tmp_path):
    tree = tmp_path / "cub"
    make_tree(str(tree), "boxes", split_sizes={"train": 8, "val": 6, "test": 5})
    config = _recipe("cub,vgg16,cutmix")
    config.dataset.image_root = str(tree / "images")
    config.dataset.metadata_root = str(tree / "metadata")
    config.dataset.image_size, config.dataset.resize_size = 32, 36
    config.model.base_width = 4
    config.model.extra_convs = (8,)
    config.batch_size = 4
    config.total_steps = config.eval_every = config.checkpoint_every = 2
    config.log_every = 1
    config.eval.overlay_images = 4
    config.progress = "none"
    result = run(config, tmp_path / "run")
    metrics = result.metrics
    for prefix in ("eval", "test"):
        for key in ("max_box_acc", "max_box_acc_v2", "gt_known_loc", "top1_loc"):
            assert 0.0 <= metrics[f"{prefix}/{key}"] <= 100.0
        assert f"{prefix}/max_box_acc_v2_iou50" in metrics
    # The test split used the threshold calibrated on train-fullsup.
    assert metrics["test/loc_threshold"] == metrics["eval/loc_threshold"]
    # The CAM overlay: a PNG beside the metrics and an image summary in the event file.
    png = tmp_path / "run" / "images" / "eval_cam_overlay_00000002.png"
    assert Image.open(png).size == (4 * 32, 32)
    images = [value for event in _events(tmp_path / "run")
              for value in event.summary.value if value.tag == "eval/cam_overlay"]
    assert len(images) == 1 and images[0].HasField("image")
    decoded = np.asarray(Image.open(io.BytesIO(images[0].image.encoded_image_string)))
    assert decoded.shape == (32, 128, 3) and decoded.std() > 0
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
