"""One command that reruns every claim of the project and writes a report.

    python -m gapjax.experiments.report --out DIR [--full] [--only heads,se]

writes ``DIR/REPORT.md`` (one section per claim: the claim, how it was measured, the
numbers, whether it holds), ``DIR/results.json`` (every number, per section) and the PNG
figures the sections draw, next to them. Quick mode (the default) took 16.5 minutes for
the digit sections and 18.0 for the real-data ones on a quiet 2-core CPU (with the
benchmarks, about 36 in all); ``--full`` trains longer (for a GPU). Each section runs on
its own: one that fails is reported as failed, with its error, and the others still run.

Sections and the modules that produce them:

* ``heads``: FC vs GAP heads (``gapjax.experiments.heads``);
* ``cam``: CAM localization table (``gapjax.experiments.localization``);
* ``cam_methods``: every CAM method's localization, faithfulness and cost
  (``gapjax.experiments.cam_methods``);
* ``weighted``: weighted / attention pooling (``gapjax.experiments.weighted_pooling``);
* ``se``: Squeeze-and-Excitation (``gapjax.experiments.squeeze_excite``);
* ``attention``: the SE family, global context vs the local gate and none, and SE's
  squeeze (``gapjax.experiments.attention``);
* ``gradflow``: gradient flow of GAP vs GMP (``gapjax.experiments.gradient_flow``);
* ``readouts``: graph readouts (``gapjax.experiments.readouts``);
* ``vit``: ViT heads, class token vs GAP vs MAP vs GeM (``gapjax.experiments.vit_heads``);
* ``real_heads``, ``real_se``, ``real_gradient_flow``, ``real_localization``,
  ``real_readouts``: the claims on real data (Fashion-MNIST, its cluttered canvases and
  mosaics, RDKit's molecules), each over seeds with a paired decision
  (``gapjax.experiments.real_*``); ``--only real`` runs these five, ``--only digits`` the
  sections on the embedded digits;
* ``benchmarks``: pooling against the memory-bound yardstick and CAM cost
  (``benchmarks/pooling.py`` at its full shapes and ``benchmarks/cam_cost.py``).

Every section module exposes ``run(out_dir, quick=True) -> dict``; a dict with the keys of
``gapjax.experiments.common.section`` is rendered as is, any other dict generically.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax

from gapjax.experiments import common

SectionFn = Callable[[Path, bool], dict[str, Any]]

#: Section name -> (module path of its ``run``, title); the order is the report's.
SECTIONS: dict[str, tuple[str, str]] = {
    "heads": ("gapjax.experiments.heads", "Heads: FC vs GAP"),
    "cam": ("gapjax.experiments.localization", "CAM and weakly supervised localization"),
    "cam_methods": ("gapjax.experiments.cam_methods",
                    "CAM methods: localization, faithfulness and cost"),
    "weighted": ("gapjax.experiments.weighted_pooling", "Weighted pooling"),
    "se": ("gapjax.experiments.squeeze_excite", "Squeeze-and-Excitation"),
    "attention": ("gapjax.experiments.attention", "Attention: global context"),
    "gradflow": ("gapjax.experiments.gradient_flow", "Gradient flow: GAP vs GMP"),
    "readouts": ("gapjax.experiments.readouts", "Graph readouts"),
    "vit": ("gapjax.experiments.vit_heads", "ViT heads: class token vs GAP vs MAP"),
    "real_heads": ("gapjax.experiments.real_heads", "Real data: FC vs GAP heads"),
    "real_se": ("gapjax.experiments.real_se", "Real data: Squeeze-and-Excitation"),
    "real_gradient_flow": ("gapjax.experiments.real_gradient_flow",
                           "Real data: gradient flow, GAP vs GMP (multi-label)"),
    "real_localization": ("gapjax.experiments.real_localization",
                          "Real objects: CAM localization against a centre prior"),
    "real_readouts": ("gapjax.experiments.real_readouts", "Real data: molecule readouts"),
    "benchmarks": ("gapjax.experiments.report", "Benchmarks: pooling and CAM cost"),
}
#: Quick-mode minutes of each group on a quiet 2-core CPU (measured; printed at the start).
QUICK_MINUTES = {"digits": 16.5, "real": 18.0}
#: ``--only`` names that stand for several sections.
GROUPS: dict[str, tuple[str, ...]] = {
    "real": tuple(name for name in SECTIONS if name.startswith("real_")),
    "digits": tuple(name for name in SECTIONS
                    if not name.startswith("real_") and name != "benchmarks"),
}
SECTION_KEYS = ("title", "claim", "method", "markdown", "numbers", "holds", "verdict", "figures")
BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
BENCHMARK_SCRIPTS = ("pooling.py", "cam_cost.py")
# The pooling ratios mean something only on memory-bound shapes, so the report always runs
# the full ones (about 30 s on 2 CPU cores); cam_cost follows the report's mode.
ALWAYS_FULL = ("pooling.py",)


# --------------------------------------------------------------------------------------
# The benchmarks section (the other sections live in their own modules)
# --------------------------------------------------------------------------------------


def benchmark_helpers() -> Any:
    """``benchmarks/common.py`` as a module (it ships with the repository, not the package)."""
    spec = importlib.util.spec_from_file_location("gapjax_benchmarks_common",
                                                  BENCHMARKS_DIR / "common.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{BENCHMARKS_DIR / 'common.py'} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark_script(script: Path, out: Path, quick: bool,
                         timeout_s: float = 600) -> dict[str, Any]:
    """Runs one benchmark script in a subprocess; returns its JSON (JSON lines become
    ``{"records": [...]}``, with the pooling targets added) or ``{"error": ...}``."""
    if not script.exists():
        return {"error": f"{script} not found"}
    command = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if quick else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout_s, env=_with_repo_on_path())
    except subprocess.TimeoutExpired:
        return {"error": f"{script.name} did not finish in {timeout_s:.0f} s"}
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or "").strip().splitlines()[-3:]
        return {"error": f"{script.name} exited with {done.returncode}: " + " / ".join(tail)}
    helpers = benchmark_helpers()
    payload = helpers.read_results(out)
    if "records" in payload:
        payload["targets"] = helpers.pooling_targets(payload["records"])
        payload.setdefault("machine", {"device_kind": payload["records"][0].get("device")}
                           if payload["records"] else {})
    return payload


def _with_repo_on_path() -> dict[str, str]:
    """The environment with the repository root on PYTHONPATH (the scripts import gapjax)."""
    env = dict(os.environ)
    root = str(BENCHMARKS_DIR.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def target_rows(payload: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[target, value, goal, met, distance]`` from a benchmark's ``targets`` list."""
    rows = []
    for item in payload.get("targets", []):
        sign = ">=" if item.get("higher_is_better") else "<="
        rows.append([item.get("name"), item.get("value"), f"{sign} {item.get('goal')}",
                     item.get("met"), item.get("distance")])
    return rows


def run(out_dir: Path | str, quick: bool = True) -> dict[str, Any]:
    """The benchmarks section: ``benchmarks/pooling.py`` and ``benchmarks/cam_cost.py``."""
    out_dir = Path(out_dir)
    payloads = {script: run_benchmark_script(BENCHMARKS_DIR / script,
                                             out_dir / f"bench_{Path(script).stem}.json",
                                             quick and script not in ALWAYS_FULL)
                for script in BENCHMARK_SCRIPTS}
    rows = [row for payload in payloads.values() for row in target_rows(payload)]
    errors = {script: payload["error"] for script, payload in payloads.items()
              if "error" in payload}
    machine = max((payload.get("machine") or {} for payload in payloads.values()), key=len)
    parts = [f"Machine: {machine.get('device_kind', '?')} ({machine.get('cpu_count', '?')} "
             f"CPU cores, load {machine.get('load_average_1min', '?')})."]
    if rows:
        parts.append(common.markdown_table(["target", "value", "goal", "met", "distance"],
                                           rows))
    parts += [f"- {script}: {error}" for script, error in errors.items()]
    met = [row[3] for row in rows]
    holds = None if not rows or errors else all(met)
    return common.section(
        SECTIONS["benchmarks"][1],
        claim=("Parameter-free pools run within 1.2x of the memory-bound yardstick "
               "(x.sum()) on an accelerator (on a CPU the ratios are information only); "
               "CAM maps cost <= 10% of a forward pass."),
        method=("benchmarks/pooling.py ([256, 14, 14, 1024] float32 and [256, 7, 7, 2048] "
                "bfloat16) and benchmarks/cam_cost.py"
                + (" with --quick (small shapes)" if quick else "")
                + ", each in a fresh process; distance >= 1 means the target is met."),
        markdown="\n\n".join(parts),
        numbers={Path(script).stem: payload for script, payload in payloads.items()},
        holds=holds,
        verdict=(f"{sum(bool(m) for m in met)} of {len(met)} targets met"
                 + (f"; failed to run: {', '.join(errors)}" if errors else "") + "."),
    )


# --------------------------------------------------------------------------------------
# Running and rendering sections
# --------------------------------------------------------------------------------------


def load_section(name: str) -> SectionFn:
    """The ``run`` function of section ``name``."""
    if name not in SECTIONS:
        raise ValueError(f"unknown report section {name!r}; choose from "
                         f"{', '.join(SECTIONS)}")
    return importlib.import_module(SECTIONS[name][0]).run


def normalize_section(name: str, result: Any, new_figures: Sequence[str]) -> dict[str, Any]:
    """Any section result -> a dict with every key of ``common.section``.

    Results built with ``common.section`` pass through. Other dicts are rendered generically:
    a ``markdown`` / ``table`` string if present, the remaining values as JSON, and the PNGs
    the section wrote as its figures.
    """
    if not isinstance(result, dict):
        result = {"result": result}
    if all(key in result for key in SECTION_KEYS):
        section = dict(result)
    else:
        text = result.get("markdown") or result.get("table")
        numbers = {key: value for key, value in result.items()
                   if key not in ("markdown", "table", "figures")}
        if not isinstance(text, str):
            text = "```json\n" + json.dumps(common.to_jsonable(numbers), indent=1)[:6000] + "\n```"
        section = {
            "title": result.get("title", SECTIONS.get(name, (name, name))[1]),
            "claim": result.get("claim", "(the section module states no claim)"),
            "method": result.get("method", f"{SECTIONS.get(name, (name,))[0]}.run"),
            "markdown": text,
            "numbers": numbers,
            "holds": result.get("holds"),
            "verdict": result.get("verdict", "(no verdict given)"),
            "figures": list(result.get("figures", [])),
        }
    figures = [str(figure) for figure in section.get("figures") or []]
    section["figures"] = figures + [figure for figure in new_figures if figure not in figures]
    return section


def run_section(name: str, fn: SectionFn, out_dir: Path, quick: bool) -> dict[str, Any]:
    """Runs one section; never raises. Adds ``status`` (ok | failed), ``seconds``, ``error``."""
    before = {path.name for path in out_dir.glob("*.png")}
    start = time.perf_counter()
    try:
        result = fn(out_dir, quick)
        new_figures = sorted(path.name for path in out_dir.glob("*.png")
                             if path.name not in before)
        section = normalize_section(name, result, new_figures)
        section.update(status="ok", error=None)
    except Exception as exc:  # one failing section must not lose the others
        section = {"title": SECTIONS.get(name, (name, name))[1], "claim": "", "method": "",
                   "markdown": "", "numbers": {}, "holds": None, "verdict": "section failed",
                   "figures": [], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=8)}
    section["seconds"] = time.perf_counter() - start
    return section


def holds_text(section: dict[str, Any]) -> str:
    if section["status"] != "ok":
        return "FAILED to run"
    return {True: "holds", False: "does not hold", None: "undecided"}[section["holds"]]


def render_report(sections: dict[str, dict[str, Any]], *, quick: bool, command: str,
                  seconds: float, machine: dict[str, Any]) -> str:
    """REPORT.md: header, a summary table, then one part per section."""
    lines = [
        "# gapjax report",
        "",
        f"Regenerate with `{command}` ({'quick' if quick else 'full'} mode). Written "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min "
        f"on {machine['processor']} ({machine['cpu_count']} CPU cores, {machine['platform']}, "
        f"jax {machine['jax']}, load average {machine['load_average_1min']:.1f} at the end).",
        "",
        common.markdown_table(["section", "claim", "time (s)"],
                              [[f"[{section['title']}](#{slug(section['title'])})",
                                holds_text(section), section["seconds"]]
                               for section in sections.values()], digits=3),
    ]
    for name, section in sections.items():
        lines += ["", f"## {section['title']}", ""]
        if section["status"] != "ok":
            lines += [f"**This section failed to run** (`{name}`): `{section['error']}`", "",
                      "```", section.get("traceback", "").strip(), "```"]
            continue
        lines += [f"**Claim.** {section['claim']}", "", f"**Method.** {section['method']}", "",
                  section["markdown"], "",
                  f"**Verdict: {holds_text(section)}.** {section['verdict']}"]
        lines += [f"\n![{figure}]({figure})" for figure in section["figures"]]
        lines += ["", f"_({section['seconds']:.0f} s)_"]
    return "\n".join(lines) + "\n"


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def machine_description() -> dict[str, Any]:
    return {"processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0}


def build_report(out_dir: Path | str, *, quick: bool = True, only: Sequence[str] | None = None,
                 sections: dict[str, SectionFn] | None = None,
                 command: str = "python -m gapjax.experiments.report") -> dict[str, Any]:
    """Runs the sections (all, or ``only``) and writes REPORT.md and results.json.

    ``sections`` maps names to ``run`` functions; default: every entry of
    ``SECTIONS``, imported when its turn comes (so a section whose module is missing
    or broken fails alone). Returns the results dict written to results.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(sections) if sections is not None else list(SECTIONS)
    if only:
        unknown = [name for name in only if name not in names]
        if unknown:
            raise ValueError(f"--only: unknown section(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(names)}")
        names = [name for name in names if name in only]
    if quick and sections is None:
        groups = [group for group, members in GROUPS.items() if set(members) & set(names)]
        print("[report] quick mode took " + ", ".join(
            f"{QUICK_MINUTES[group]:.0f} min for all the {group} sections" for group in groups)
            + " on a quiet 2-core CPU", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"[report] {name} ...", file=sys.stderr, flush=True)
        if sections is not None:
            fn = sections[name]
        else:
            def fn(path: Path, quick_mode: bool, name: str = name) -> dict[str, Any]:
                return load_section(name)(path, quick=quick_mode)
        done[name] = run_section(name, fn, out_dir, quick)
        failure = (done[name]["error"] or "").splitlines()[:1]  # one line per section
        print(f"[report] {name}: {holds_text(done[name])} ({done[name]['seconds']:.0f} s)",
              *failure, file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    machine = machine_description()
    (out_dir / "REPORT.md").write_text(
        render_report(done, quick=quick, command=command, seconds=seconds, machine=machine))
    results = {
        "quick": quick,
        "seconds": seconds,
        "machine": machine,
        "sections": {name: {key: value for key, value in section.items() if key != "markdown"}
                     for name, section in done.items()},
    }
    (out_dir / "results.json").write_text(
        json.dumps(common.to_jsonable(results), indent=2, allow_nan=False) + "\n")
    return results


def expand_groups(names: Iterable[str]) -> list[str]:
    """Section names with each ``GROUPS`` name replaced by its sections, in order, once."""
    expanded: list[str] = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            if member not in expanded:
                expanded.append(member)
    return expanded


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage text
        self.exit(2, f"error: {message}; see --help\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--full", action="store_true", help="larger runs (quick by default)")
    parser.add_argument("--only", default="", help="comma-separated sections: "
                        + ", ".join(SECTIONS) + "; or the groups " + ", ".join(GROUPS))
    parser.add_argument("--traceback", action="store_true", help="the traceback of an error")
    args = parser.parse_args(argv)
    only = expand_groups(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(SECTIONS)} or the groups {', '.join(GROUPS)}")
    command = "python -m gapjax.experiments.report " + " ".join(
        sys.argv[1:] if argv is None else argv)
    try:
        results = build_report(args.out, quick=not args.full, only=only,
                               command=command.strip())
    except OSError as error:  # an unwritable or full --out
        if args.traceback:
            raise
        parser.exit(1, f"error: --out {args.out}: {error.strerror or error} "
                       f"({error.filename}); choose another --out or free space\n")
    failed = [name for name, section in results["sections"].items()
              if section["status"] != "ok"]
    print(f"wrote {args.out / 'REPORT.md'} and results.json in {results['seconds'] / 60:.1f} "
          f"min" + (f"; failed sections (tracebacks in REPORT.md): {', '.join(failed)}"
                    if failed else ""))


if __name__ == "__main__":
    main()
