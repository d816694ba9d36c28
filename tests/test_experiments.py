"""The pure pieces of the report sections and the report's wiring (no long training)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax.experiments import common, heads, report, squeeze_excite, weighted_pooling

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# --------------------------------------------------------------------------------------
# Weighted pooling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", weighted_pooling.BIAS_KINDS)
@pytest.mark.parametrize("size", [(1, 1), (4, 4), (5, 3)])
def test_bias_weights_sum_to_one_and_start_uniform(kind, size):
    uniform = weighted_pooling.spatial_bias_weights(*size, kind, 0.0)
    np.testing.assert_allclose(uniform, np.full(size, 1.0 / (size[0] * size[1])))
    for strength in weighted_pooling.STRENGTHS:
        weights = weighted_pooling.spatial_bias_weights(*size, kind, strength)
        assert weights.shape == size
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)


def test_bias_direction_and_exact_values():
    centre = weighted_pooling.spatial_bias_weights(5, 5, "centre", 1.0)
    border = weighted_pooling.spatial_bias_weights(5, 5, "border", 1.0)
    assert centre[2, 2] == centre.max() and centre[0, 0] == 0.0
    assert border[2, 2] == 0.0 and border[0, 0] == border.max()
    distance = weighted_pooling.normalised_centre_distance(5, 5)
    np.testing.assert_allclose(border, distance / distance.sum())
    half = weighted_pooling.spatial_bias_weights(5, 5, "centre", 0.5)
    np.testing.assert_allclose(half, 0.5 / 25 + 0.5 * centre)


def test_bias_rejects_bad_choices_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"'middle'.*centre.*border"):
        weighted_pooling.spatial_bias_weights(4, 4, "middle", 0.3)
    with pytest.raises(ValueError, match=r"strength.*\[0, 1\].*1.5"):
        weighted_pooling.spatial_bias_weights(4, 4, "centre", 1.5)


def test_flip_table_counts_constructed_flips():
    # Channel 0 fires on the 2x2 centre of a 4x4 map, channel 1 on the border ring; the
    # identity classifier predicts the channel with the larger pooled value. GAP sees 4
    # centre cells x 3.0 = 12 against 12 border cells x 1.4 = 16.8 -> class 1. The centre
    # bias puts 0.283 of the mass on the centre at s = 0.1 (no flip: 0.85 < 1.00) and 0.566
    # at s = 1 (flip: 1.70 > 0.61); a border bias keeps class 1.
    features = np.zeros((3, 4, 4, 2), np.float32)
    centre = np.zeros((4, 4), bool)
    centre[1:3, 1:3] = True
    features[:, centre, 0] = 3.0
    features[:, ~centre, 1] = 1.4
    kernel, bias = np.eye(2, dtype=np.float32), np.zeros(2, np.float32)
    labels = np.zeros(3, np.int64)
    records = weighted_pooling.flip_table(features, kernel, bias, labels, strengths=(0.1, 1.0))
    by_key = {(r["bias"], r["strength"]): r for r in records}
    assert by_key[("centre", 0.1)]["flips"] == 0
    assert by_key[("centre", 1.0)]["flips"] == 3
    assert by_key[("centre", 1.0)]["accuracy_change"] == pytest.approx(100.0)
    assert by_key[("border", 1.0)]["flips"] == 0


def test_uniform_weights_reproduce_a_tiny_models_gap_logits():
    from gapjax import models

    model = models.get("cnn", num_classes=3, widths=(4, 8), depth=1)
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    # Jitted: op-by-op execution of init would compile every primitive on its own.
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images)
    logits, features = jax.jit(lambda v, x: (
        model.apply(v, x, train=False),
        model.apply(v, x, train=False, method="forward_features")))(variables, images)
    features = np.asarray(features)
    kernel, bias = weighted_pooling.classifier_parameters(variables)
    exactness = weighted_pooling.uniform_equals_gap(features, kernel, bias, np.asarray(logits))
    assert exactness["max_abs_diff_vs_gap"] <= 1e-6
    assert exactness["max_abs_diff_vs_model"] <= 1e-5
    records = weighted_pooling.flip_table(features, kernel, bias, np.zeros(2, np.int64))
    assert len(records) == len(weighted_pooling.BIAS_KINDS) * len(weighted_pooling.STRENGTHS)
    assert all(0 <= r["flips"] <= 2 for r in records)


# --------------------------------------------------------------------------------------
# Heads and SE bookkeeping
# --------------------------------------------------------------------------------------


def test_head_parameters_are_exact_for_a_small_cnn():
    kwargs = {"widths": (8, 16), "depth": 1}
    fc = heads.head_parameters("cnn", (16, 16, 1), 10, "fc", **kwargs)
    gap = heads.head_parameters("cnn", (16, 16, 1), 10, "gap", **kwargs)
    # One 2x2 downsampling: the final map is 8x8x16.
    assert fc["head"] == 8 * 8 * 16 * 10 + 10
    assert gap["head"] == 16 * 10 + 10
    assert fc["backbone"] == gap["backbone"] > 0
    assert fc["total"] == fc["head"] + fc["backbone"]


def test_se_paper_formula_matches_resnet50_extra_weights():
    # Hu et al.: (2 / r) sum_s N_s C_s^2 over ResNet-50's stages = about 2.5M.
    weights = squeeze_excite.excitation_weights((256, 512, 1024, 2048), (3, 4, 6, 3), 16)
    assert weights == 2_514_944


def test_standard_configs_are_shared_and_checked():
    first = common.standard_config(common.CLUTTERED, True, head="gap", pool="gap")
    second = common.standard_config(common.CLUTTERED, True, head="gap", pool="gap")
    other = common.standard_config(common.CLUTTERED, True, head="fc", pool="gap")
    assert common.config_key(first) == common.config_key(second) != common.config_key(other)
    assert first.model.widths == (16, 32, 64) and first.dataset.canvas_size == 32
    with pytest.raises(ValueError, match=r"'mnist'.*gapjax_cluttered_digits"):
        common.standard_config("mnist", True)


# --------------------------------------------------------------------------------------
# Tables and JSON
# --------------------------------------------------------------------------------------


def test_markdown_tables_format_numbers():
    table = common.markdown_table(["name", "count", "value"],
                                  [["a|b", 1234567, 0.123456], ["c", 3, float("nan")]])
    lines = table.splitlines()
    assert lines[0] == "| name | count | value |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1,234,567 | 0.1235 |"
    assert lines[3] == "| c | 3 | - |"
    with pytest.raises(ValueError, match="2 cells; expected 3"):
        common.markdown_table(["a", "b", "c"], [[1, 2]])
    records = common.records_table([{"x": 1, "y": True}, {"x": 2.5, "y": False}])
    assert records.splitlines()[2:] == ["| 1 | yes |", "| 2.5 | no |"]


def test_to_jsonable_makes_strict_json():
    value = {"a": np.float32(1.5), "b": np.arange(3), "c": (float("nan"), math.inf),
             "d": Path("x/y"), 3: jnp.ones(2)}
    text = json.dumps(common.to_jsonable(value), allow_nan=False)
    assert json.loads(text) == {"a": 1.5, "b": [0, 1, 2], "c": [None, None], "d": "x/y",
                                "3": [1.0, 1.0]}


# --------------------------------------------------------------------------------------
# The report's wiring, with stub sections
# --------------------------------------------------------------------------------------


def _plot_section(out_dir: Path, quick: bool) -> dict:
    fig, axes = common.new_figure(1)
    axes[0].plot([0, 1], [1, 0])
    name = common.save_figure(fig, out_dir, "stub.png")
    return common.section("Stub claim", claim="lines go down", method="a plot",
                          markdown=common.markdown_table(["q"], [[quick]]),
                          numbers={"slope": -1.0}, holds=True, verdict="it does",
                          figures=[name])


def _generic_section(out_dir: Path, quick: bool) -> dict:
    fig, _ = common.new_figure(1)
    common.save_figure(fig, out_dir, "generic.png")
    return {"table": "| a |\n|---|\n| 1 |", "accuracy": np.float32(0.5)}


def _broken_section(out_dir: Path, quick: bool) -> dict:
    raise RuntimeError("no data for this section")


def test_report_writes_every_section_and_survives_a_failure(tmp_path):
    sections = {"plot": _plot_section, "generic": _generic_section, "broken": _broken_section}
    results = report.build_report(tmp_path, quick=True, sections=sections)
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Stub claim" in text and "**Verdict: holds.** it does" in text
    assert "![stub.png](stub.png)" in text and "![generic.png](generic.png)" in text
    assert "| a |" in text
    assert "failed to run" in text and "RuntimeError: no data for this section" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(report.common.to_jsonable(results)))
    statuses = {name: section["status"] for name, section in saved["sections"].items()}
    assert statuses == {"plot": "ok", "generic": "ok", "broken": "failed"}
    assert saved["sections"]["plot"]["numbers"] == {"slope": -1.0}
    assert saved["sections"]["generic"]["numbers"]["accuracy"] == 0.5
    assert (tmp_path / "stub.png").stat().st_size > 1000


def test_report_only_selects_and_rejects_unknown_sections(tmp_path):
    sections = {"plot": _plot_section, "broken": _broken_section}
    results = report.build_report(tmp_path, only=["plot"], sections=sections)
    assert list(results["sections"]) == ["plot"]
    with pytest.raises(ValueError, match=r"'nope'.*plot, broken"):
        report.build_report(tmp_path, only=["nope"], sections=sections)
    with pytest.raises(ValueError, match=r"unknown report section 'nope'.*heads"):
        report.load_section("nope")


def test_report_sections_cover_every_claim():
    assert list(report.SECTIONS) == ["heads", "cam", "cam_methods", "weighted", "se",
                                            "attention", "gradflow", "readouts", "vit",
                                            "real_heads", "real_se", "real_gradient_flow",
                                            "real_localization", "real_readouts",
                                            "benchmarks"]
    for module, _ in report.SECTIONS.values():  # every section's module exists
        assert importlib.util.find_spec(module) is not None, module


# --------------------------------------------------------------------------------------
# Benchmark helpers
# --------------------------------------------------------------------------------------


def test_benchmark_targets_measure_distance():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import common as bench_common
    finally:
        sys.path.remove(str(BENCHMARKS))
    faster = bench_common.target("t", 2.0, 1.0, higher_is_better=True)
    assert faster["met"] and faster["distance"] == pytest.approx(2.0)
    slower = bench_common.target("r", 1.25, 1.05, higher_is_better=False)
    assert not slower["met"] and slower["distance"] == pytest.approx(1.05 / 1.25)
    missing = bench_common.target("m", None, 1.0, higher_is_better=True)
    assert missing["distance"] is None and "not measured" in bench_common.describe_target(missing)
    calls = []
    timing = bench_common.time_calls(lambda: calls.append(1), repeats=3, warmup=1)
    assert len(calls) == 4 and timing["repeats"] == 3 and timing["min"] <= timing["median"]


def test_report_command_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv, status, message in [
        (["--only", "heads"], 2, "error: the following arguments are required: --out; see "
                                 "--help"),
        (["--out", str(tmp_path), "--only", "heads,nope"], 2,
         f"error: --only: unknown section(s) nope; choose from "
         f"{', '.join(report.SECTIONS)} or the groups real, digits; see --help"),
        (["--out", str(blocker / "out"), "--only", "heads"], 1,
         f"error: --out {blocker / 'out'}: Not a directory ({blocker / 'out'}); choose another "
         "--out or free space"),
    ]:
        with pytest.raises(SystemExit) as exited:
            report.main(argv)
        assert exited.value.code == status
        assert capsys.readouterr().err.strip() == message
