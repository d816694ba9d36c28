"""``python -m gapjax.cam``: runs the application ``gapjax.cli.cam`` (the library never
imports the command-line floor, so the entry point hands over by name)."""

import runpy

runpy.run_module("gapjax.cli.cam", run_name="__main__", alter_sys=True)
