"""Evaluators (``config.evals``): ``classification``, ``localization``, ``gradflow`` and a
fork's own (``@EVALUATORS.register("mine")``); see ``gapjax.evaluators.base``."""

from gapjax.evaluators.base import EVALUATORS, Evaluator, Run, build, specs
from gapjax.evaluators.classification import ClassificationEval, eval_step, zero_eval_sums
from gapjax.evaluators.gradflow import GradientFlowEval
from gapjax.evaluators.localization import LocalizationEval

__all__ = ["EVALUATORS", "ClassificationEval", "Evaluator", "GradientFlowEval",
           "LocalizationEval", "Run", "build", "eval_step", "specs", "zero_eval_sums"]
