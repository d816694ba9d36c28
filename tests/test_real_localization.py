"""The real_localization section: end to end on tiny IDX files, and its pure pieces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.fashion_files import write_fashion_source

from gapjax import cam, models, wsol
from gapjax.data import fashion_mnist
from gapjax.experiments import localization, real_localization

TINY = {"seeds": 2, "steps": 3, "batch_size": 4, "widths": (4, 8, 8), "depth": 1,
        "canvas_train": 8, "canvas_test": 6, "images": 6, "map_batch": 4}


def test_section_end_to_end_on_tiny_canvases(tmp_path, monkeypatch):
    # Only the tiny files: Debian's Fashion-MNIST, where installed, is hidden.
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    source = write_fashion_source(tmp_path / "idx")
    out = tmp_path / "out"
    section = real_localization.run(out, quick=True, source_dir=source, **TINY)

    assert section["holds"] in (True, False, None)
    assert set(section) >= {"title", "claim", "method", "markdown", "numbers", "verdict"}
    numbers = section["numbers"]
    model = models.get("cnn", num_classes=10, widths=TINY["widths"], depth=1,
                       strides=(2, 2, 2), head="gap", pool="gap")
    # Every applicable registry method scored, the rest skipped with a reason.
    assert list(numbers["methods"]) == list(cam.available_methods(model))
    assert set(numbers["methods"]) | set(numbers["skipped"]) == set(cam.method_names()[1:])
    assert numbers["images"] == TINY["images"]  # 4 + 2 real rows of two padded batches
    means = [numbers["methods"][name]["max_box_acc_v2"]["mean"] for name in numbers["ranking"]]
    assert means == sorted(means, reverse=True)

    def in_range(value):
        return math.isfinite(value) and 0.0 <= value <= 100.0

    for record in numbers["methods"].values():
        for metric in real_localization.METRICS:
            assert len(record[metric]["runs"]) == TINY["seeds"]
            assert all(in_range(value) for value in record[metric]["runs"])
            assert in_range(record[metric]["mean"]) and in_range(record[metric]["std"])
            assert record["versus_centre"][metric]["outcome"] in ("helps", "hurts", "tied")
    assert all(in_range(value) for value in numbers["centre"].values())
    assert all(in_range(value) for value in numbers["accuracy"]["runs"])
    saved = json.loads((out / "real_localization.json").read_text())
    assert saved["methods"].keys() == numbers["methods"].keys()
    assert "centre baseline" in (out / "real_localization.md").read_text()
    assert section["figures"] == ["real_localization.png"]
    assert (out / "real_localization.png").stat().st_size > 0


def test_unknown_setting_is_one_line_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"real_localization: unknown settings \['image'\]; "
                       r"valid: .*images") as raised:
        real_localization.run(tmp_path, image=5)
    assert "\n" not in str(raised.value)


def test_centre_scores_are_the_wsol_metrics_of_the_centred_gaussian():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0.0, 0.5, size=(5, 1, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(0.2, 0.5, size=(5, 1, 2))], -1)
    masks = (rng.uniform(size=(5, 16, 16)) > 0.6).astype(np.uint8)
    maps = np.broadcast_to(localization.centre_gaussian_map(16, 16), (5, 16, 16))
    scores = real_localization.centre_scores(boxes, masks)
    assert scores["max_box_acc_v2"] == pytest.approx(100 * wsol.max_box_acc_v2(maps, boxes))
    assert scores["pxap"] == pytest.approx(100 * wsol.pxap(maps, masks))


def test_skipped_methods_and_the_decision_rule():
    model = models.get("cnn", num_classes=3, widths=(4,), depth=1, head="gap", pool="gap")
    skipped = real_localization.skipped_methods(model)
    assert set(skipped).isdisjoint(cam.available_methods(model))
    assert "rollout" in skipped and "forward_attention" in skipped["rollout"]
    gmp = models.get("cnn", num_classes=3, widths=(4,), depth=1, head="gap", pool="gmp")
    assert "cam" in real_localization.skipped_methods(gmp)  # no exact CAM without GAP

    def outcomes(box, pixel):
        return {"max_box_acc_v2": {"outcome": box}, "pxap": {"outcome": pixel}}

    assert real_localization.decide(outcomes("helps", "helps")) is True
    assert real_localization.decide(outcomes("helps", "hurts")) is False
    assert real_localization.decide(outcomes("tied", "hurts")) is False
    assert real_localization.decide(outcomes("helps", "tied")) is None
