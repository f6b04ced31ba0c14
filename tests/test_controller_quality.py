"""Quality sources of the controller (table, registry, rank proxy) and the bench CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import main
from common.tiers import load_registry
from services.controller.quality import load_quality, quality_from_table, relative_scores
from tests.test_policies import write_tiers


def test_relative_scores_compare_seed_for_seed() -> None:
    rows = [
        {"prompt": "a", "seed": "1", "tier": "0", "score": "0.5"},
        {"prompt": "a", "seed": "1", "tier": "1", "score": "0.5"},
        {"prompt": "a", "seed": "2", "tier": "0", "score": "0.25"},
        {"prompt": "a", "seed": "2", "tier": "1", "score": "0.2"},
        {"prompt": "b", "seed": "1", "tier": "0", "score": "0.4"},
        {"prompt": "b", "seed": "1", "tier": "1", "score": "0.2"},
        {"prompt": "c", "seed": "1", "tier": "1", "score": "0.9"},  # no exact: dropped
        {"prompt": "b", "seed": "1", "tier": "7", "score": "0.9"},  # unknown tier
        {"prompt": "b", "seed": "1", "tier": "1", "score": "nan?"},  # not a number
    ]
    rel = relative_scores(rows, 2)
    assert rel == {"a": {0: 1.0, 1: pytest.approx(0.9)}, "b": {0: 1.0, 1: 0.5}}
    q, table = quality_from_table(rel, 2, tolerance=0.1)
    assert q == {0: 1.0, 1: pytest.approx(0.7)}
    # a is safe at tier 1 (0.9 >= 1 - 0.1), b only at tier 0.
    assert table[0] == [1.0, 0.5] and table[1] == [1.0, pytest.approx(0.9)]
    with pytest.raises(ValueError, match="needs one of"):
        relative_scores([{"x": "1"}], 2)


def test_load_quality_prefers_table_then_registry_then_proxy(tmp_path: Path) -> None:
    lat = [{1: 1.0}, {1: 0.5}]
    with_q = load_registry(write_tiers(tmp_path / "q.yaml", lat, [1.0, 0.9]))
    without = load_registry(write_tiers(tmp_path / "n.yaml", lat, None))
    table = tmp_path / "quality.csv"
    table.write_text("prompt_id,tier,relative_quality\np,0,1.0\np,1,0.8\n")
    src = load_quality(without, table, 0.05)
    assert (src.source, src.q) == ("table", {0: 1.0, 1: 0.8})
    assert src.prompt_quality == [[1.0, 0.8], [1.0, 1.0]]  # class 1 empty: default row
    assert load_quality(with_q, tmp_path / "missing.csv", 0.05).source == "registry"
    bad = tmp_path / "bad.csv"
    bad.write_text("what,ever\n1,2\n")
    src = load_quality(with_q, bad, 0.05)
    assert src.source == "registry" and "unusable" in src.detail
    proxy = load_quality(without, None, 0.05)
    assert proxy.source == "rank-proxy" and proxy.q == {0: 1.0, 1: 0.99}


def test_bench_solver_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "solver", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["gpus"], r["tiers"], r["formulation"]) for r in rows} == {
        (g, t, f) for g in (8, 16, 64) for t in (6, 12) for f in ("argus", "flow")}
    assert all(r["median_ms"] > 0 for r in rows)


def test_tier_means_are_clipped_at_exact_and_unmeasured_tiers_inherit_them() -> None:
    """A score above exact is seed noise: q_k averages min(1, rel); a tier no prompt was
    measured at (a lighter model without a stand-in) gets the nearest less approximate
    tier's clipped mean, never more."""
    q, table = quality_from_table({"a": {0: 1.0, 1: 1.3}, "b": {0: 1.0, 1: 0.8}}, 3, 0.05)
    assert q == {0: 1.0, 1: pytest.approx(0.9), 2: pytest.approx(0.9)}
    assert all(0.0 <= v <= 1.0 for row in table for v in row)
