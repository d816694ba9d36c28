"""The readout study (``gapjax.experiments.readouts``): which registry pools are graph
readouts, the Figure 3 table over all of them, the seed-decided claim, and one tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gapjax.data import graph_tasks
from gapjax.experiments import readouts
from gapjax.pooling import POOLS


def _fig3():
    return [graph_tasks.preprocess(example, None) for example in graph_tasks.fig3_examples()]


def test_graph_readouts_come_from_the_registry_by_capability():
    names, skipped = readouts.segment_readouts()
    assert names[:3] == ["sum", "mean", "max"]
    # Every registry pool appears once, as a readout or with the reason it is none.
    classes = [POOLS.get(name) for name in [*names, *skipped]]
    assert len(set(classes)) == len(classes) == len({POOLS.get(n) for n in POOLS.names()})
    assert "position" in skipped["weighted"] and "class token" in skipped["token"]
    assert {"pna", "set2set", "set_transformer", "std", "sort"} <= set(names)
    # PNA's degree scalers get their statistics from the graph sizes; others nothing.
    assert set(readouts.readout_options("pna", [3, 4, 4])) == {"avg_log_degree", "avg_degree"}
    assert readouts.readout_options("std", [3, 4]) == {}


def test_fig3_table_over_readouts_with_and_without_parameters():
    rows = {row["readout"]: row for row in readouts.fig3_readout_table(
        _fig3(), ["sum", "mean", "max", "std", "deepsets", "pna"], fig3_seeds=2)}
    for name in readouts.READOUT_NAMES:  # the claim pools agree with the paper
        assert [bool(rows[name][label]) for label, _, _ in graph_tasks.FIG3_PAIRS] == \
            list(graph_tasks.FIG3_SEPARATES[name])
        assert rows[name]["inits"] == 1 and not rows[name]["parameters"]
    assert rows["deepsets"]["parameters"] and rows["deepsets"]["inits"] == 2
    assert rows["deepsets"]["theory"] is None
    # std of {G, G} and {G, G, G} is 0 for both; PNA's degree scalers see the sizes.
    assert (rows["std"]["a"], rows["pna"]["a"]) == (0, 1)


def _matrix(count_mean, proportion_max, seeds=3):
    rng = np.random.default_rng(0)
    cells = {"sum": (100, 100, 100), "mean": (100, 100, count_mean),
             "max": (100, proportion_max, 52)}
    return {name: {task: list(value + rng.normal(0, 0.5, seeds))
                   for task, value in zip(("presence", "proportion", "count"), values)}
            for name, values in cells.items()}


def test_claim_is_decided_with_paired_intervals_over_seeds():
    comparisons = readouts.claim_comparisons(_matrix(52, 50))
    assert len(comparisons) == 6
    assert {(c["task"], c["other"]) for c in comparisons if c["predicted_failure"]} == {
        ("count", "mean"), ("count", "max"), ("proportion", "max")}
    assert readouts.decide(comparisons, fig3_holds=True) is True
    assert readouts.decide(comparisons, fig3_holds=False) is False
    # max solving proportion: its predicted failure's interval lies below 20 points.
    assert readouts.decide(readouts.claim_comparisons(_matrix(52, 99)), True) is False
    # a 15-point gap whose interval reaches 20 points: undecided.
    wide = _matrix(52, 50)
    wide["max"]["proportion"] = [80.0, 90.0, 85.0]
    assert readouts.decide(readouts.claim_comparisons(wide), True) is None


def test_tiny_study_end_to_end(tmp_path, monkeypatch):
    # The Figure 3 table over every registry pool is covered above; here a short list.
    monkeypatch.setattr(readouts, "segment_readouts",
                        lambda: (["sum", "mean", "max", "std"], {"token": "class token"}))
    section = readouts.run(tmp_path, quick=True, num_train=64, num_test=32, steps=2,
                           batch_size=16, seeds=2, readouts=(), fig3_seeds=1)
    numbers = section["numbers"]
    assert set(numbers["accuracy"]) == {"sum", "mean", "max"}
    assert all(len(cell["runs"]) == 2 for row in numbers["accuracy"].values()
               for cell in row.values())
    assert section["holds"] in (True, False, None)
    assert [row["readout"] for row in numbers["fig3_readouts"]] == ["sum", "mean", "max", "std"]
    assert json.loads((tmp_path / "readouts.json").read_text())["seeds"] == [0, 1]
    assert "claimed - other" in (tmp_path / "readouts.md").read_text()
    with pytest.raises(ValueError, match="readouts: settings readouts"):
        readouts.run(tmp_path, readouts=("token",), steps=1)
