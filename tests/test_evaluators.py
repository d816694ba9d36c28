"""config.evals: today's keys become the default entries, an entry updates or turns off a
default, and every mistake in an entry is one line naming it (no data, no compilation)."""

from __future__ import annotations

import pytest

from gapjax import evaluators
from gapjax.registry import UnknownNameError
from gapjax.train.defaults import base_config


def test_todays_keys_become_the_default_entries():
    config = base_config()
    config.eval_every = 7
    assert evaluators.specs(config) == {
        "classification": {"type": "classification", "final_split": None, "every": 7}}
    config.eval.update(localization=True, cam_method="grad_cam", wsol_protocol="wsolevaluation",
                       overlay_images=4, final_split="test")
    config.gradflow_every = 3
    specs = evaluators.specs(config)
    assert specs["classification"]["final_split"] == "test"
    assert specs["localization"] == {"type": "localization", "method": "grad_cam",
                                     "protocol": "wsolevaluation", "overlay_images": 4,
                                     "final_split": "test", "every": 7}
    assert specs["gradflow"] == {"type": "gradflow", "every": 3}
    built = evaluators.build(config)
    assert [type(e).__name__ for e in built.values()] == [
        "ClassificationEval", "LocalizationEval", "GradientFlowEval"]
    assert built["localization"].method == "grad_cam" and built["gradflow"].every == 3


def test_an_entry_updates_adds_or_turns_off_entries():
    config = base_config()
    config.gradflow_every = 1
    config.evals.classification = {"every": 0}  # off
    config.evals.gradflow = {"every": 5, "max_examples": 4}  # a default's options
    config.evals.probe = {"type": "classification", "split": "train"}  # a second one
    specs = evaluators.specs(config)
    assert specs == {"gradflow": {"type": "gradflow", "every": 5, "max_examples": 4},
                     "probe": {"type": "classification", "split": "train",
                               "every": config.eval_every}}


@pytest.mark.parametrize("entry,error,needle", [
    ({"type": "nope"}, UnknownNameError,
     "unknown evaluator 'nope'; choose one of: classification, gradflow, localization"),
    ({"type": "localization", "methd": "cam"}, ValueError,
     "config.evals.bad ('localization') has no option 'methd' (got methd='cam'); valid "
     "options: every, final_split, method, overlay_images, protocol, split"),
    ({"every": 3}, ValueError, "config.evals.bad has no type; choose one of: classification"),
])
def test_a_bad_entry_is_one_line(entry, error, needle):
    config = base_config()
    config.evals.bad = entry
    with pytest.raises(error) as raised:
        evaluators.build(config)
    assert needle in str(raised.value) and "\n" not in str(raised.value)
