"""``loadgen bench`` on a tiny configuration (2 policies, 1 generated trace, both
scenarios, 2 GPUs, 60 s): the results page has a table row per policy, the goal lines
(checked or marked not checkable), the assumptions and the command, the figures exist,
and a re-run keeps the hand-written analysis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadgen.__main__ import main
from loadgen.bench import ANALYSIS


def test_bench_writes_results_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(1 / 3.0, 400))
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s\n" + "\n".join(f"{t:.4f}" for t in times[times < 60]) + "\n")
    md, figs, res = tmp_path / "RESULTS.md", tmp_path / "fig", tmp_path / "res"
    argv = ["bench", "--policies", "argus,clipper-ha", "--traces", f"tiny={trace}",
            "--gpus", "2", "--duration", "60", "--results-dir", str(res),
            "--figures-dir", str(figs), "--markdown", str(md)]
    assert main(argv) == 0
    text = md.read_text()
    for scenario in ("small-world", "sdxl"):
        assert f"### {scenario} / tiny" in text
        for policy in ("argus", "clipper-ha"):
            summary = json.loads((res / scenario / "tiny" / policy / "summary.json")
                                 .read_text())
            row = f"| {policy} | {summary['slo_violation_ratio']:.3f} | "
            assert row in text
        for name in ("load", "violations", "quality", "gpus"):
            png = figs / f"{scenario}-tiny" / f"{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"(fig/{scenario}-tiny/{name}.png)" in text
    for goal in ("SLO violations <= 1/10 of Clipper-HA's", "goodput >= 1.4x Clipper-HA's"):
        assert text.count(f'* Goal "{goal}": met') + \
            text.count(f'* Goal "{goal}": **NOT met**') == 2
    assert text.count("not checkable: clipper-ht not run") == 2
    assert text.count("not checkable: proteus not run") == 2
    assert "small-world:cache-k2" in text and "**Not modelled**" in text
    assert "python -m loadgen bench --policies argus,clipper-ha" in text
    assert ANALYSIS in text
    capsys.readouterr()

    md.write_text(text.replace(ANALYSIS, ANALYSIS + "\nHand-written analysis.\n"))
    assert main(argv) == 0
    again = md.read_text()
    assert f"{ANALYSIS}\nHand-written analysis.\n" in again
    assert again.count("Hand-written analysis.") == 1
