"""The real-data report sections (real_heads, real_se, real_gradient_flow) end to end on
tiny IDX files with tiny settings: every seed trained, the numbers and the decision
written, and the parts of each decision that follow from definitions checked exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.fashion_files import write_fashion_source

from gapjax.experiments import real_gradient_flow, real_heads, real_se, report

TINY = {"seeds": 2, "steps": 4, "batch_size": 8}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_fashion_source(tmp_path_factory.mktemp("fashion_idx"), train=40, test=20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("real_sections_tfds")


def check_section(section, out_dir, name, seeds):
    assert section["holds"] in (True, False, None)
    assert section["verdict"].split(" ", 1)[0] in ("Holds", "Does", "Undecided")
    numbers = json.loads((out_dir / f"{name}.json").read_text())
    assert numbers["seeds"] == list(range(seeds))
    assert (out_dir / f"{name}.md").read_text().startswith("# Real data")
    assert "published source" in section["markdown"]
    return numbers


def test_real_heads_counts_both_heads_exactly(tmp_path, source, data_dir):
    section = real_heads.run(tmp_path, data_dir=data_dir, source_dir=source, widths=(8, 8, 16),
                             train_examples=32, canvas_train=24, canvas_test=8, **TINY)
    numbers = check_section(section, tmp_path, "real_heads", TINY["seeds"])
    for dataset, result in numbers["datasets"].items():
        fc, gap = result["heads"]["fc"], result["heads"]["gap"]
        # 10 classes from 16 channels: flatten of the 7x7 map + FC vs GAP + FC.
        assert fc["head"] == 7 * 7 * 16 * 10 + 10 and gap["head"] == 16 * 10 + 10, dataset
        assert fc["backbone"] == gap["backbone"]
        for head in (fc, gap):
            runs = np.array(head["test_accuracy"]["runs"])
            assert runs.shape == (TINY["seeds"],) and ((runs >= 0) & (runs <= 100)).all()
            np.testing.assert_allclose(
                head["gap"]["runs"], np.subtract(head["train_accuracy"]["runs"], runs),
                atol=1e-9)
        assert result["overfitting"]["differences"] == pytest.approx(
            np.subtract(fc["gap"]["runs"], gap["gap"]["runs"]).tolist())
    assert numbers["datasets"]["fashion_mnist"]["split"] == "train[:32]"
    assert real_heads.decide({"a": {"head_ratio": 49.0, "overfitting": {"outcome": "hurts"}}}
                             ) is False


def test_real_se_compares_se_with_none_and_local(tmp_path, source, data_dir):
    section = real_se.run(tmp_path, data_dir=data_dir, source_dir=source, timing_steps=1,
                          **TINY)
    numbers = check_section(section, tmp_path, "real_se", TINY["seeds"])
    variants = numbers["variants"]
    assert {"none", "se", "local"} <= set(variants)
    assert variants["se"]["params_added"] > 0 and 0 < variants["se"]["flops_share"] < 0.05
    assert (tmp_path / "real_se.png").exists()


def test_real_gradient_flow_spread_follows_the_pools(tmp_path, source, data_dir):
    section = real_gradient_flow.run(tmp_path, data_dir=data_dir, source_dir=source,
                                     mosaic_train=24, mosaic_test=16, diagnostic_batches=1,
                                     widths=(8, 8, 8), **TINY)
    numbers = check_section(section, tmp_path, "real_gradient_flow", TINY["seeds"])
    parts = numbers["parts"]
    # Exact by definition on any trained network: GMP sends each label's gradient to one
    # position per channel, GAP to every position.
    assert parts["gmp_one_position"] and parts["gap_every_position"]
    for pool in ("gap", "gmp"):
        assert len(numbers["pools"][pool]["map"]["runs"]) == TINY["seeds"]


def test_report_groups_name_the_real_sections():
    assert report.expand_groups(["real"]) == [name for name in report.SECTIONS
                                              if name.startswith("real_")]
    assert len(report.GROUPS["real"]) == 5
    assert report.expand_groups(["heads", "digits"])[0] == "heads"
    assert "benchmarks" not in report.expand_groups(["digits", "real"])
    with pytest.raises(SystemExit):
        report.main(["--out", "/nonexistent", "--only", "reall"])


def test_unknown_setting_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="real_heads: unknown settings \\['step'\\]; valid: "):
        real_heads.run(tmp_path, step=3)
