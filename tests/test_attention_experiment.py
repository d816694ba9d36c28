"""The ``attention`` experiment: its decision rule on constructed numbers, and a tiny run
(two steps, two seeds, SE / local / none and SE with GMP) that writes its section.

Cost: four small cnns compiled once each (all seeds in one vmapped step), 16x16 digits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gapjax.experiments import attention, report, seeds


def test_paired_comparison_decides_by_the_t_interval():
    helps = seeds.paired_comparison([91.0, 92.0, 93.0], [90.0, 90.5, 91.5])
    assert helps["outcome"] == "helps" and helps["low"] > 0
    assert np.isclose(helps["mean_difference"], (1.0 + 1.5 + 1.5) / 3)
    hurts = seeds.paired_comparison([88.0, 89.0, 90.0], [90.0, 91.2, 91.9])
    assert hurts["outcome"] == "hurts" and hurts["high"] < 0
    tied = seeds.paired_comparison([90.0, 93.0, 89.0], [91.0, 90.0, 90.0])
    assert tied["outcome"] == "tied" and tied["low"] < 0 < tied["high"]
    assert tied["p_value"] > 0.05 > helps["p_value"]
    # Differences without spread: decided by their sign.
    assert seeds.paired_comparison([2.0, 3.0], [1.0, 2.0])["outcome"] == "helps"
    assert seeds.paired_comparison([1.0, 2.0], [1.0, 2.0])["outcome"] == "tied"
    with pytest.raises(ValueError, match="at least two seeds"):
        seeds.paired_comparison([1.0], [2.0])


def test_claim_outcome_truth_table():
    cheap, costly = 0.01, 2 * attention.FLOPS_LIMIT
    assert attention.claim_outcome("helps", "helps", cheap) is True
    assert attention.claim_outcome("helps", "helps", costly) is False
    assert attention.claim_outcome("hurts", "helps", cheap) is False
    assert attention.claim_outcome("helps", "hurts", cheap) is False
    assert attention.claim_outcome("helps", "tied", cheap) is None
    assert attention.claim_outcome("tied", "tied", cheap) is None


def test_the_experiment_writes_its_section(tmp_path):
    section = attention.run(tmp_path, quick=True, dataset="gapjax_digits", members=("se",),
                            squeezes=("gap", "gmp", "not_a_pool"), steps=2, seeds=2,
                            timing_steps=1)
    assert set(section) >= set(report.SECTION_KEYS)
    assert report.SECTIONS["attention"][0] == "gapjax.experiments.attention"
    numbers = section["numbers"]
    assert numbers["dataset"] == "gapjax_digits" and numbers["seeds"] == [0, 1]
    assert numbers["members"] == ["local", "se"]  # the claim's comparisons always run
    assert numbers["missing_squeezes"] == ["not_a_pool"]
    records = numbers["variants"]
    assert set(records) == {"none", "se", "local", "se/gmp"}
    for label, record in records.items():
        assert len(record["runs"]) == 2 and all(0 <= run <= 100 for run in record["runs"])
        assert record["step_seconds"] > 0 and record["flops"] > 0
        if label != "none":
            assert record["vs_none"]["outcome"] in ("helps", "hurts", "tied")
    # SE and local: the same parameters (three stages of widths 16, 32, 64), SE's FLOPs
    # far below local's, which runs its bottleneck at every pixel.
    assert records["se"]["params_per_block"] == records["local"]["params_per_block"] \
        == [2 * c * 8 + 8 + c for c in (16, 32, 64)]
    assert records["none"]["params_per_block"] == []
    assert 0 < records["se"]["flops_added"] < records["local"]["flops_added"]
    assert records["se/gmp"]["params"] == records["se"]["params"]
    assert section["holds"] in (True, False, None)
    assert section["verdict"].split(" ")[0] in ("Holds", "Does", "Undecided")
    assert "| se |" in section["markdown"] and "se (gmp)" in section["markdown"]
    assert (tmp_path / "attention.png").stat().st_size > 1000
    assert (tmp_path / "attention.md").read_text().startswith("# Attention")
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["variants"]["se"]["runs"] == records["se"]["runs"]
