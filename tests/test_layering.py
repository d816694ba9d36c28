"""The import floors hold: the import-linter contracts of pyproject.toml are kept (no module
imports a higher floor, no import cycle between sibling modules), no gapjax import hides
inside a function, and the modules an accelerator job imports load no optional heavy
dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LIGHT_MODULES = ("gapjax", "gapjax.registry", "gapjax.pooling", "gapjax.graph", "gapjax.tasks",
                 "gapjax.layers", "gapjax.models", "gapjax.cam", "gapjax.wsol",
                 "gapjax.gradflow", "gapjax.train.steps", "gapjax.train.state",
                 "gapjax.train.optim")
HEAVY_DEPENDENCIES = ("tensorflow_datasets", "grain", "sklearn", "matplotlib", "torch",
                      "torchvision", "timm")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_import_contracts_are_kept():
    result = _python("import sys; from importlinter.cli import lint_imports; "
                     "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, "
                     "no_logo=True))")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Floors: lower floors never import higher ones KEPT" in result.stdout
    assert "No import cycles between sibling modules KEPT" in result.stdout


#: Files whose function-level gapjax imports another branch removes this round (the list
#: empties when it merges).
PENDING = ("gapjax/experiments/", "gapjax/train/loop.py")


def test_no_gapjax_import_inside_a_function():
    hidden = []
    for path in sorted((REPO / "gapjax").rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        if name.startswith(PENDING):
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                modules = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                           [alias.name for alias in node.names] if isinstance(node, ast.Import)
                           else [])
                hidden += [f"{name}:{node.lineno}" for module in modules
                           if module.split(".")[0] == "gapjax"]
    assert not hidden, f"gapjax imports inside functions (move them to the top): {hidden}"


def test_light_modules_load_no_heavy_dependency():
    result = _python(
        f"import importlib, sys\n"
        f"for name in {LIGHT_MODULES!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in {HEAVY_DEPENDENCIES!r} if m in sys.modules))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
