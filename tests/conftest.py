"""Test-session settings.

The tests compile hundreds of small XLA programs on the CPU and run each a few times, so
compilation, not execution, is most of their time: LLVM's backend optimisation is turned
off for the session (about 15% less wall time on 2 cores), and XLA's CPU fusion emitters
with it (the older emitters compile faster: about 20% less again). Results stay deterministic
(every comparison of two runs happens under the same flags); subprocesses inherit the
setting unless a test sets its own ``XLA_FLAGS``.
"""

import os

for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
