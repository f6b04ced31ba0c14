"""``loadgen plot``: PNG figures from replay or simulation results, several overlaid.

A RESULT is a ``summary.json`` or a directory holding one (``loadgen replay
--result-dir`` or ``loadgen simulate --out``). Each result's label is its policy
(``sim.policy`` or ``config.policy``), else its directory name; repeated labels get the
directory name appended. Figures, from the summaries' per-minute series:

- ``load.png``: offered (dashed) and served (completed, solid) requests per minute;
- ``violations.png``: SLO violations per minute (by arrival minute);
- ``quality.png``: mean quality of the requests completed in each minute;
- ``gpus.png``: GPUs per tier over time, one panel per result (stacked).

A figure is written only when some result carries its series (a replay has no quality
and no GPUs per tier). Guarantees: only files named above are written, in ``--out``;
the exit code is 2 when a result cannot be read, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DPI = 110


@dataclass(frozen=True)
class Result:
    """One result: its label and its summary."""

    label: str
    summary: dict[str, Any]

    @property
    def minutes(self) -> list[dict[str, Any]]:
        """The per-minute series."""
        series = self.summary.get("per_minute") or []
        return [m for m in series if isinstance(m, dict)]


def add_parser(sub: Any) -> None:
    """Add the ``plot`` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("plot", help="PNG figures from replay/simulation results",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, metavar="RESULT",
                   help="summary.json files or result directories")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs")
    p.set_defaults(func=run)


def load_result(path: Path) -> tuple[str, dict[str, Any]]:
    """(default label, summary) of a result path.

    Raises:
        ValueError: No readable summary JSON object there.
    """
    file = path / "summary.json" if path.is_dir() else path
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable summary: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{file}: not a summary (expected a JSON object)")
    sim, config = doc.get("sim"), doc.get("config")
    sim = sim if isinstance(sim, dict) else {}
    config = config if isinstance(config, dict) else {}
    label = sim.get("policy") or config.get("policy") or file.parent.name or file.stem
    return str(label), doc


def load_results(paths: Sequence[Path]) -> list[Result]:
    """The results, labelled uniquely (module doc)."""
    loaded = [(p, *load_result(p)) for p in paths]
    labels = [label for _, label, _ in loaded]
    out = []
    for path, label, doc in loaded:
        if labels.count(label) > 1:
            where = path if path.is_dir() else path.parent
            label = f"{label} ({where.name or where})"
        out.append(Result(label, doc))
    return out


def _xy(result: Result, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for m in result.minutes:
        value = m.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            xs.append(float(m["minute"]))
            ys.append(float(value))
    return xs, ys


def _figure(title: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(9, 4.5), dpi=DPI)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("minute")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_load(results: Sequence[Result], out: Path) -> Path | None:
    """``load.png``: offered vs served per minute."""
    fig, ax = _figure("Offered vs served load", "requests per minute")
    drawn = False
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        xs, ys = _xy(r, "offered")
        if xs:
            ax.plot(xs, ys, linestyle="--", color=color, alpha=0.6, label=f"{r.label} offered")
        xs, ys = _xy(r, "completed")
        if xs:
            ax.plot(xs, ys, color=color, label=f"{r.label} served")
            drawn = True
    if not drawn:
        return None
    ax.legend(fontsize="small")
    return _save(fig, out / "load.png")


def plot_series(results: Sequence[Result], key: str, title: str, ylabel: str,
                path: Path) -> Path | None:
    """One line per result of the per-minute ``key``; None when no result has it."""
    fig, ax = _figure(title, ylabel)
    drawn = False
    for i, r in enumerate(results):
        xs, ys = _xy(r, key)
        if xs:
            ax.plot(xs, ys, color=f"C{i % 10}", label=r.label)
            drawn = True
    if not drawn:
        return None
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_gpus(results: Sequence[Result], out: Path) -> Path | None:
    """``gpus.png``: GPUs per tier over time, stacked, one panel per result with them."""
    with_gpus = [r for r in results if any(isinstance(m.get("gpus"), dict) for m in r.minutes)]
    if not with_gpus:
        return None
    fig = Figure(figsize=(9, 2.6 * len(with_gpus) + 0.6), dpi=DPI)
    axes = fig.subplots(len(with_gpus), 1, sharex=True, squeeze=False)[:, 0]
    for ax, r in zip(axes, with_gpus, strict=True):
        rows = [m for m in r.minutes if isinstance(m.get("gpus"), dict)]
        tiers = sorted({int(k) for m in rows for k in m["gpus"]})
        xs = [float(m["minute"]) for m in rows]
        stacks = [[float(m["gpus"].get(str(k), 0.0)) for m in rows] for k in tiers]
        ax.stackplot(xs, stacks, labels=[f"tier {k}" for k in tiers],
                     colors=[f"C{k % 10}" for k in tiers], step="post")
        ax.set_title(f"GPUs per tier: {r.label}")
        ax.set_ylabel("GPUs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xlabel("minute")
    return _save(fig, out / "gpus.png")


def plot_all(results: Sequence[Result], out: Path) -> list[Path]:
    """Every figure some result has data for (module doc); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_load(results, out),
            plot_series(results, "violations", "SLO violations", "violations per minute",
                        out / "violations.png"),
            plot_series(results, "quality", "Mean quality (relative to exact)",
                        "mean quality", out / "quality.png"),
            plot_gpus(results, out)]
    return [p for p in made if p is not None]


def run(args: argparse.Namespace) -> int:
    """Run ``loadgen plot``: 0, or 2 when a result cannot be read."""
    try:
        results = load_results(args.results)
    except ValueError as exc:
        sys.stderr.write(f"loadgen plot: {exc}\n")
        return 2
    for path in plot_all(results, args.out):
        sys.stdout.write(f"{path}\n")
    return 0
