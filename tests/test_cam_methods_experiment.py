"""The CAM-methods experiment end to end at a tiny budget (8 test images of a 64 / 16
example dataset, the model at its initial weights: the training loop has its own tests and
takes a minute to compile here), plus its pure pieces."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

from gapjax import cam
from gapjax.experiments import cam_methods, common


def test_tiny_run_writes_table_json_and_grid(tmp_path, monkeypatch):
    tiny = {"steps": 3, "batch_size": 8,
            "dataset": {"canvas_size": 32, "num_train": 64, "num_test": 16},
            "model": {"widths": (4, 8)}}
    monkeypatch.setitem(common.STANDARD_RUNS, (common.CLUTTERED, True), tiny)
    monkeypatch.setattr(common, "train", initial_weights)
    monkeypatch.setitem(cam_methods.DIGIT_IMAGES, True, 8)
    monkeypatch.setitem(cam_methods.PERCENTILES, True, (50,))
    monkeypatch.setitem(cam_methods.STEPS, True, 4)
    monkeypatch.setattr(cam_methods, "SHOWN", 2)
    monkeypatch.delenv(cam_methods.WEIGHTS_ENV, raising=False)
    common.clear_run_cache()
    section = cam_methods.run(tmp_path, quick=True)

    records = section["numbers"]["records"]
    methods = [r["method"] for r in records]
    assert methods == [*cam.available_methods(cam_methods_model(records)), "random"]
    for record in records:
        for key in ("deletion", "insertion", "road", "average_drop", "increase",
                    "max_box_acc_v2", "pxap"):
            assert np.isfinite(record[key]), (record["method"], key)
        assert 0 <= record["deletion"] <= 1 and 0 <= record["insertion"] <= 1
        assert (record["seconds_per_image"] is None) == (record["method"] == "random")
    table = (tmp_path / "cam_methods.md").read_text()
    assert "Score-CAM" in table and "Ablation-CAM" in table and "random map" in table
    saved = json.loads((tmp_path / "cam_methods.json").read_text())
    assert len(saved["records"]) == len(records)
    with open(tmp_path / "cam_methods.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert section["figures"] == ["cam_methods.png"]
    assert isinstance(section["holds"], bool) and "random map" in section["verdict"]
    assert "resnet50" not in section["verdict"].lower().split("set $")[0]


def initial_weights(config, workdir):
    """``common.train``'s result for ``config`` without training: the initial weights."""
    from gapjax import models

    model = models.from_config(config, num_classes=10)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32))
    return types.SimpleNamespace(model=model, variables=variables, metrics={})


def cam_methods_model(records):
    """The model class the digits case scores: a GAP cnn (exact CAM available)."""
    from gapjax import models

    assert records[0]["model"] == "cnn (digits)"
    return models.get("cnn", num_classes=10, widths=(4, 8))


def test_faithful_beyond_random_compares_with_the_same_models_floor():
    base = {"model": "m", "deletion": 0.5, "insertion": 0.5, "road": 0.0}
    records = [{**base, "method": "random"},
               {**base, "method": "cam", "deletion": 0.2, "insertion": 0.7, "road": 0.1},
               {**base, "method": "grad_cam", "deletion": 0.2, "insertion": 0.4, "road": 0.1}]
    assert cam_methods.faithful_beyond_random(records) == {"m/cam": True, "m/grad_cam": False}
    rows = cam_methods.table_rows([{**records[1], "average_drop": 0.25, "increase": 0.5,
                                    "seconds_per_image": 0.002}])
    assert rows[0][1] == "CAM" and rows[0][7] == pytest.approx(25.0)
    assert rows[0][9] == pytest.approx(2.0) and rows[0][2] is None
