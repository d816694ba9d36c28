"""``python -m gapjax.wsol``: runs the application ``gapjax.cli.wsol`` (the library never
imports the command-line floor, so the entry point hands over by name)."""

import runpy

runpy.run_module("gapjax.cli.wsol", run_name="__main__", alter_sys=True)
