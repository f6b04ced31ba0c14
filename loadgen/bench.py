"""``loadgen bench``: every serving policy on the shared Azure traces, in two scenarios,
simulated with ``loadgen simulate`` (in process); writes ``docs/RESULTS.md``.

Scenarios: ``small-world`` (``profiles/tiers.yaml``: the small world's own measured latency
profile and per-prompt quality table) and ``sdxl`` (``profiles/sdxl.yaml``: the published
SDXL latency profile; each tier's per-prompt quality is that of the small-world tier its
``quality_standin`` names, a modelling assumption printed with the results). Per scenario
x trace x policy, one simulation (``--gpus``, ``--target-utilization``, ``--duration``,
``--seed``, the ``table`` predictor, every other setting the services' default); its
``summary.json`` goes to ``--results-dir/<scenario>/<trace>/<policy>/``, figures overlaying
the policies (``loadgen plot``) to ``--figures-dir/<scenario>-<trace>/``, and the markdown
page (tables, goal checks computed from the numbers, assumptions, machine, command) to
``--markdown``. Reporting is mechanical: a goal not met is printed as NOT met, with the
numbers and the facts that the summaries give (outcome shares, tier shares); the human
analysis goes where the page says ``<!-- analysis -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.settings import REPO_ROOT, ControllerSettings
from common.tiers import Registry, load_registry
from loadgen import plot
from loadgen import simulate as S
from loadgen.paths import resolve_data_path
from loadgen.replay_cli import _clean
from loadgen.sim_quality import read_table, table_column
from services.controller.policies import POLICIES as KNOWN

POLICIES = ("argus", "clipper-ha", "clipper-ht", "nirvana", "proteus", "diffserve")
TRACES = {"conv": "traces/AzureLLMInferenceTrace_conv.csv",
          "code": "traces/AzureLLMInferenceTrace_code.csv"}
SCENARIOS = {"small-world": REPO_ROOT / "profiles" / "tiers.yaml",
             "sdxl": REPO_ROOT / "profiles" / "sdxl.yaml"}
DEFAULT_DURATION_S = 3600.0
"""The whole hour of each trace: the full bench takes ~1.5 min on the 2-core dev machine."""
ANALYSIS = "<!-- analysis -->"


@dataclass(frozen=True)
class Goal:
    """One goal of issue 7 on one scenario x trace (met None: not checkable); ``others``:
    the baselines it compares Argus with."""

    name: str
    met: bool | None
    detail: str
    others: tuple[str, ...] = ()


def add_parser(sub: Any) -> None:
    """Add the ``bench`` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("bench", help="simulate every policy on both traces, write RESULTS.md",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies")
    p.add_argument("--traces", default=",".join(TRACES),
                   help="comma-separated NAME (conv, code) or NAME=PATH")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated NAME (small-world, sdxl) or NAME=REGISTRY")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--target-utilization", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, metavar="S",
                   help="seconds of each trace simulated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=Path("bench/results/policies"))
    p.add_argument("--figures-dir", type=Path, default=Path("docs/results"))
    p.add_argument("--markdown", type=Path, default=Path("docs/RESULTS.md"))
    p.set_defaults(func=run)


def _pairs(spec: str, known: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if not value and name not in known:
            raise ValueError(f"unknown name {name!r} (known: {', '.join(known)}; or NAME=PATH)")
        out[name] = value or str(known[name])
    return out


def command_line(args: argparse.Namespace) -> str:
    """The exact command that regenerates this run."""
    argv = ["bench", "--policies", args.policies, "--traces", args.traces,
            "--scenarios", args.scenarios, "--gpus", str(args.gpus),
            "--target-utilization", f"{args.target_utilization:g}",
            "--duration", f"{args.duration:g}", "--seed", str(args.seed),
            "--results-dir", str(args.results_dir), "--figures-dir", str(args.figures_dir),
            "--markdown", str(args.markdown)]
    return "OMP_NUM_THREADS=1 .venv/bin/python -m loadgen " + shlex.join(argv)


def simulate_one(args: argparse.Namespace, registry: str, trace: str, policy: str
                 ) -> tuple[dict[str, Any], float]:
    """One ``loadgen simulate`` run in process: (summary, wall seconds)."""
    parser = argparse.ArgumentParser()
    S.add_parser(parser.add_subparsers())
    sim_args = parser.parse_args([
        "simulate", "--trace", trace, "--tiers", registry, "--policy", policy,
        "--gpus", str(args.gpus), "--target-utilization", str(args.target_utilization),
        "--duration", str(args.duration), "--seed", str(args.seed)])
    problem = S._check(sim_args)
    if problem:
        raise ValueError(problem)
    summ, _, _, wall = S.simulate(sim_args)
    return summ, wall


def shrink(png: Path, colors: int = 64) -> None:
    """Rewrite a figure as a palette PNG: a third of the size, nothing visible lost."""
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
    small.save(png, optimize=True)


# ---------------------------------------------------------------------- numbers -> text
def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _q(s: dict[str, Any]) -> float | None:
    q = s.get("mean_quality")
    return None if q is None else 100.0 * float(q)


def table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The markdown table of one scenario x trace, one row per policy."""
    rows = ["| policy | SLO-violation ratio | mean quality (% of exact) | throughput/min "
            "| goodput/min | p99 s | rejected | offered/min |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for policy, s in runs.items():
        rej = s["rejected"] / s["offered"] if s["offered"] else None
        rows.append(f"| {policy} | {_f(s['slo_violation_ratio'], '.3f')} | "
                    f"{_f(_q(s), '.2f')} | {_f(s['throughput_per_min'], '.1f')} | "
                    f"{_f(s['goodput_per_min'], '.1f')} | {_f(s['p99_latency_s'], '.2f')} | "
                    f"{_f(rej, '.3f')} | {_f(s['offered_per_min'], '.1f')} |")
    return rows


def goals(runs: dict[str, dict[str, Any]]) -> list[Goal]:
    """The four goals of issue 7 on one scenario x trace, from the summaries."""
    def v(p: str) -> float:
        x = runs[p]["slo_violation_ratio"]
        return math.nan if x is None else float(x)

    def q(p: str) -> float:
        x = _q(runs[p])
        return math.nan if x is None else x

    def g(p: str) -> float:
        x = runs[p]["goodput_per_min"]
        return math.nan if x is None else float(x)

    specs: list[tuple[str, str, Callable[[], tuple[bool, str]]]] = [
        ("SLO violations <= 1/10 of Clipper-HA's", "clipper-ha", lambda: (
            v("argus") <= v("clipper-ha") / 10, f"argus {v('argus'):.4f} vs clipper-ha "
            f"{v('clipper-ha'):.4f} (limit {v('clipper-ha') / 10:.4f})")),
        ("mean quality >= Clipper-HT's + 5 points", "clipper-ht", lambda: (
            q("argus") >= q("clipper-ht") + 5, f"argus {q('argus'):.2f} vs clipper-ht "
            f"{q('clipper-ht'):.2f} (needs >= {q('clipper-ht') + 5:.2f}"
            + (", above the maximum of 100: unreachable)" if q("clipper-ht") > 95 else ")"))),
        ("goodput >= 1.4x Clipper-HA's", "clipper-ha", lambda: (
            g("argus") >= 1.4 * g("clipper-ha"), f"argus {g('argus'):.1f}/min vs clipper-ha "
            f"{g('clipper-ha'):.1f}/min (needs >= {1.4 * g('clipper-ha'):.1f})")),
        ("beats Proteus on violations and quality", "proteus", lambda: (
            v("argus") < v("proteus") and q("argus") > q("proteus"),
            f"violations argus {v('argus'):.4f} vs proteus {v('proteus'):.4f} "
            f"({'lower' if v('argus') < v('proteus') else 'NOT lower'}); quality argus "
            f"{q('argus'):.2f} vs proteus {q('proteus'):.2f} "
            f"({'higher' if q('argus') > q('proteus') else 'NOT higher'})")),
    ]
    out = []
    for name, other, check in specs:
        absent = [p for p in ("argus", other) if p not in runs]
        if absent:
            out.append(Goal(name, None, f"not checkable: {', '.join(absent)} not run"))
        else:
            met, detail = check()
            out.append(Goal(name, bool(met), detail, (other,)))
    return out


def facts(policy: str, s: dict[str, Any], names: Sequence[str]) -> str:
    """What the summary says about where a policy's violations and quality come from."""
    n = s["offered"] or 1
    late = (s["completed"] or 0) - (s["slo_met"] or 0)
    parts = [f"{k} {100 * v / n:.1f}%" for k, v in
             (("late", late), ("rejected (429)", s["rejected"]), ("expired", s["expired"]),
              ("unfinished", s["unfinished"])) if v]
    served = ", ".join(f"{names[int(k)] if int(k) < len(names) else k} {100 * v:.1f}%"
                       for k, v in sorted(s["tier_fraction"].items(), key=lambda kv:
                                          -kv[1]))
    exact = 100 * s["tier_fraction"].get("0", 0.0)
    return (f"{policy}: of {s['offered']} offered, violations {'; '.join(parts) or 'none'}; "
            f"{100 - exact:.1f}% of completed requests served below exact ({served or '-'})")


def machine() -> str:
    """One line describing this machine and its load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{platform.node()}, {os.cpu_count()} CPUs ({cpu}), {platform.platform()}, "
            f"Python {platform.python_version()}, load average at start {load}")


def commit() -> str:
    """The repository's HEAD (with ``+dirty`` when the tree has changes), or ``unknown``."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "-s") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def not_modelled() -> str:
    """The simulator's "Not modelled" paragraph from ``loadgen/README.md``."""
    try:
        text = (REPO_ROOT / "loadgen" / "README.md").read_text(encoding="utf-8")
        start = text.index("**Not modelled**")
        return " ".join(text[start:text.index("\n\n", start)].split())
    except (OSError, ValueError):
        return "See the simulator's \"Not modelled\" list in `loadgen/README.md`."


def standins(registry: Registry, summ: dict[str, Any]) -> list[str]:
    """A markdown table of a registry's tiers and where their per-prompt quality comes from
    (:mod:`loadgen.sim_quality`): a quality-table column, else the tier's mean."""
    means = summ["sim"].get("tier_mean_quality") or []
    table_ = read_table(ControllerSettings().quality_file)
    rows = ["| tier | strategy | approximation | latency s (b=1) | per-prompt quality from "
            "| its mean (clipped) | tier mean (fallback) |", "|---|---|---|---:|---|---:|---:|"]
    for t in registry.tiers:
        approx = f"skip {t.skip} of {t.steps}" if t.skip else f"{t.steps} steps"
        col = table_column(t)
        vals = [min(1.0, max(0.0, r[col])) for r in table_.rel.values() if col in r] \
            if table_ else []
        source = (f"table column `{col}`" + (f" (`quality_standin` {t.quality_standin})"
                                             if t.quality_standin else "")
                  if vals else "none: the tier mean (registry `quality`, else the "
                  "controller's planning `q_k`)")
        mean = means[t.id] if t.id < len(means) else None
        rows.append(f"| {t.id} {t.name} | {t.strategy.value} | {approx} | "
                    f"{_f(t.batch_latency(registry.device, 1), '.3f')} | {source} | "
                    f"{_f(sum(vals) / len(vals) if vals else None, '.4f')} | "
                    f"{_f(mean, '.4f')} |")
    return rows


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(path)


def kept_analysis(path: Path) -> str:
    """The text after the analysis marker of an existing page, up to the next heading."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return text.partition(ANALYSIS)[2].split("\n## ", 1)[0].strip("\n")


def markdown(args: argparse.Namespace, scenarios: dict[str, str], traces: dict[str, str],
             results: dict[str, dict[str, dict[str, dict[str, Any]]]],
             figures: dict[tuple[str, str], list[Path]], wall: float, analysis: str = ""
             ) -> str:
    """The whole results page."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# Results: serving policies, simulated (issue 7)", "",
          "_Generated by `loadgen bench`. Edit only the Analysis section (below its marker): "
          "a re-run keeps it, and rewrites everything else._",
          "", f"* Date: {now}; commit {commit()}; bench wall time {wall:.0f} s.",
          f"* Machine: {machine()}.",
          f"* Regenerate: `{command_line(args)}` (or `make bench-results`).",
          f"* Setup: {args.gpus} GPUs (one worker each), `--target-utilization "
          f"{args.target_utilization:g}` (peak arrivals per minute = "
          f"{args.target_utilization:g}x the exact tier's capacity), the first "
          f"{args.duration:g} s of each trace, seed {args.seed}, predictor `table` (the "
          "quality table's oracle label), every other knob the services' default "
          "(deadline policy `degrade`, control period 2 s).",
          "* Traces: " + "; ".join(f"`{n}` = `{resolve_data_path(p)}`"
                                   for n, p in traces.items()) + ".",
          "* Runs: `loadgen simulate` per scenario x trace x policy; summaries in "
          f"`{args.results_dir}/<scenario>/<trace>/<policy>/summary.json`.", "",
          "## Goals", "",
          "Argus against the baselines, each checked on every scenario x trace:", "",
          "| goal | " + " | ".join(f"{s} / {t}" for s in scenarios for t in traces) + " |",
          "|---|" + "---|" * (len(scenarios) * len(traces))]
    checked = {(s, t): goals(results[s][t]) for s in scenarios for t in traces}
    first = next(iter(checked.values()))
    for i, g in enumerate(first):
        cells = ["met" if c[i].met else "n/a" if c[i].met is None else "**NOT met**"
                 for c in checked.values()]
        md.append(f"| {g.name} | " + " | ".join(cells) + " |")
    md += ["", "## Analysis", "", ANALYSIS, *([analysis] if analysis else []), ""]
    for scen, registry in scenarios.items():
        reg = load_registry(Path(registry))
        names = [t.name for t in reg.tiers]
        any_run = next(iter(next(iter(results[scen].values())).values()))
        md += [f"## Scenario `{scen}` (`{_rel(registry)}`, device `{reg.device}`, SLO "
               f"{any_run['slo_ms']} ms)", ""]
        for tname in traces:
            runs = results[scen][tname]
            md += [f"### {scen} / {tname}", "", *table(runs), ""]
            for g in checked[(scen, tname)]:
                verdict = "met" if g.met else "n/a" if g.met is None else "**NOT met**"
                md.append(f"* Goal \"{g.name}\": {verdict}: {g.detail}.")
                if g.met is False:
                    for p in ("argus", *g.others):
                        md.append(f"  * {facts(p, runs[p], names)}.")
            md.append("")
            for png in figures.get((scen, tname), []):
                rel = os.path.relpath(png, args.markdown.parent)
                md.append(f"![{scen} / {tname}: {png.stem}]({rel})")
            md.append("")
    md += ["## Modelling assumptions", ""]
    for scen, registry in scenarios.items():
        reg = load_registry(Path(registry))
        summ = next(iter(next(iter(results[scen].values())).values()))
        md += [f"Scenario `{scen}`: quality source {summ['sim']['quality_source']}.", "",
               *standins(reg, summ), ""]
    md += ["* **SDXL quality is not measured.** Each SDXL tier's per-prompt quality is the "
           "small-world tier named by its `quality_standin` (same strategy, same fraction of "
           "steps skipped or kept); a tier without one (lightning-4) gets its tier mean "
           "(registry `quality`, else the controller's planning `q_k`). The SDXL latencies "
           "are the published ones (`profiles/sdxl.yaml`), not measured here.",
           "* **Quality** is the per-prompt relative quality (exact = 100 %), clipped at 100 "
           "(one seed per prompt; see the quality caveat in `loadgen/README.md`).",
           f"* {not_modelled()}", ""]
    return "\n".join(md)


def run(args: argparse.Namespace) -> int:
    """Run ``loadgen bench``: 0, or 2 for bad input."""
    start = time.perf_counter()
    try:
        policies = [p for p in args.policies.split(",") if p]
        traces = _pairs(args.traces, TRACES)
        scenarios = _pairs(args.scenarios, SCENARIOS)
        if not policies or not traces or not scenarios or set(policies) - set(KNOWN):
            raise ValueError(f"--policies (of {', '.join(sorted(KNOWN))}), --traces and "
                             "--scenarios need one valid name each")
        results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        figures: dict[tuple[str, str], list[Path]] = {}
        for scen, registry in scenarios.items():
            results[scen] = {}
            for tname, trace in traces.items():
                results[scen][tname] = {}
                dirs = []
                for policy in policies:
                    summ, wall = simulate_one(args, registry, trace, policy)
                    out = args.results_dir / scen / tname / policy
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "summary.json").write_text(json.dumps(
                        _clean(summ), indent=2, allow_nan=False) + "\n", encoding="utf-8")
                    results[scen][tname][policy] = summ
                    dirs.append(out)
                    sys.stderr.write(
                        f"loadgen bench: {scen}/{tname}/{policy}: {summ['offered']} arrivals, "
                        f"violations {_f(summ['slo_violation_ratio'], '.3f')}, quality "
                        f"{_f(_q(summ), '.2f')} ({wall:.1f} s)\n")
                figures[(scen, tname)] = plot.plot_all(
                    plot.load_results(dirs), args.figures_dir / f"{scen}-{tname}")
                for png in figures[(scen, tname)]:
                    shrink(png)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"loadgen bench: {exc}\n")
        return 2
    text = markdown(args, scenarios, traces, results, figures, time.perf_counter() - start,
                    kept_analysis(args.markdown))
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text, encoding="utf-8")
    sys.stdout.write(f"{args.markdown}\n")
    for scen in scenarios:
        for tname in traces:
            sys.stdout.write(f"\n{scen} / {tname}\n" + "\n".join(table(results[scen][tname]))
                             + "\n" + "\n".join(f"  {g.name}: {g.met} ({g.detail})"
                                                for g in goals(results[scen][tname])) + "\n")
    return 0
