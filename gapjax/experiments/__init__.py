"""Experiments: one module per scientific claim, each with ``run(out_dir, quick=True)``.

``python -m gapjax.experiments.report --out DIR`` reruns all of them and writes REPORT.md.
"""
