"""``loadgen simulate`` and ``loadgen plot``: conservation, determinism, the real
controller's decisions showing in the results, the model-switch cost, the quality model,
and the figures. Small traces and few GPUs: every test runs in a few seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common.tiers import load_registry
from loadgen.__main__ import build_parser, main
from loadgen.sim_quality import Table, quality_model, table_column
from loadgen.simulate import simulate

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = {"succeeded", "expired", "rejected", "unfinished"}


def write_trace(path: Path, rate: float, seconds: float, seed: int = 0,
                quiet_after: float | None = None) -> Path:
    """A generic ``arrival_s`` trace: Poisson arrivals at ``rate``/s for ``seconds``."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * seconds * 2))
    times = np.cumsum(gaps)
    times = times[times < seconds]
    if quiet_after is not None:
        times = times[times < quiet_after]
    path.write_text("arrival_s\n" + "\n".join(f"{t:.4f}" for t in times) + "\n")
    return path


FROZEN: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def frozen_registry(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The small-world registry with a fixed, batch-1-only CPU profile (0.6 s per exact
    image, linear in steps, no batching gain): the load levels of these tests stay what
    they were designed for whatever ``profiles/tiers.yaml`` measures on a given day."""
    doc = yaml.safe_load((REPO / "profiles" / "tiers.yaml").read_text())
    for tier in doc["tiers"]:
        tier["latency"] = {"cpu": {1: round(0.6 * (tier["steps"] - tier.get("skip", 0))
                                            / 20, 4)}}
    path = tmp_path_factory.mktemp("frozen") / "tiers.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    FROZEN[:] = [path]


def run_sim(*argv: str) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    if "--tiers" not in argv:
        argv = (*argv, "--tiers", str(FROZEN[0]))
    args = build_parser().parse_args(["simulate", *argv])
    summ, recs, result, _ = simulate(args)
    return summ, recs, result


@pytest.mark.parametrize("policy", ["expire", "degrade"])
def test_every_arrival_ends_exactly_once(tmp_path: Path, policy: str) -> None:
    """Overload (2.5x the cheapest tier's capacity) with a small gateway cap and a short
    drain: every arrival ends in exactly one outcome and the summary counts agree with
    the records; ``expire`` ends late jobs as expired, ``degrade`` never does."""
    trace = write_trace(tmp_path / "t.csv", rate=30.0, seconds=60)
    summ, recs, _ = run_sim("--trace", str(trace), "--policy", "argus", "--gpus", "2",
                            "--max-backlog", "150", "--deadline-policy", policy,
                            "--drain-timeout", "0.5", "--seed", "3")
    statuses = [r["status"] for r in recs]
    assert set(statuses) <= OUTCOMES
    assert [r["index"] for r in recs] == list(range(len(recs)))
    counts = {s: statuses.count(s) for s in OUTCOMES}
    assert sum(counts.values()) == summ["offered"] == len(recs)
    seen = {s for s, n in counts.items() if n}
    if policy == "expire":  # late jobs end early: the backlog may stay under the cap
        assert {"succeeded", "expired"} <= seen <= {"succeeded", "expired", "rejected"}, counts
    else:
        assert seen == {"succeeded", "rejected", "unfinished"}, counts
    assert summ["completed"] == counts["succeeded"]
    assert summ["expired"] == counts["expired"] and summ["rejected"] == counts["rejected"]
    assert summ["unfinished"] == counts["unfinished"]
    assert summ["accepted"] == len(recs) - counts["rejected"]
    registry = load_registry(REPO / "profiles" / "tiers.yaml")
    for r in recs:
        if r["status"] == "succeeded":
            t = r["timings"]
            assert t["enqueued"] <= t["started"] < t["finished"]
            assert t["finished"] - t["started"] >= \
                registry.tiers[r["tier"]].batch_latency("cpu", 1) - 1e-9
            assert 0.0 <= r["quality"] <= 1.0
        elif r["status"] == "rejected":
            assert r["http_status"] == 429 and r["reject_code"] in ("overloaded",
                                                                    "backlog_full")
        elif r["status"] == "expired":
            assert r["timings"]["started"] is None and r["slo_met"] is False
        else:
            assert r["last_status"] in ("queued", "running") and r["slo_met"] is False


def test_same_seed_same_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The summary JSON is identical for the same seed and differs for another."""
    trace = write_trace(tmp_path / "t.csv", rate=6.0, seconds=45)
    argv = ["simulate", "--trace", str(trace), "--policy", "argus", "--gpus", "3",
            "--target-utilization", "1.5", "--json"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    doc = json.loads(outs[0])
    for key in ("slo_violation_ratio", "mean_quality", "throughput_per_min",
                "goodput_per_min", "p99_latency_s"):
        assert doc[key] is not None, key


def test_policies_are_the_controllers(tmp_path: Path) -> None:
    """Under overload (twice the exact tier's capacity) the real policies differ as
    expected: Clipper-HA serves exact (quality 1) with more violations than Clipper-HT
    (all at the cheapest tier); Argus's MILP moves GPUs off the exact tier, re-plans, and
    lands in between: fewer violations than HA, higher quality than HT."""
    trace = write_trace(tmp_path / "t.csv", rate=6.0, seconds=60)
    common = ["--trace", str(trace), "--gpus", "2", "--seed", "0"]
    ha, _, _ = run_sim(*common, "--policy", "clipper-ha")
    ht, _, _ = run_sim(*common, "--policy", "clipper-ht")
    assert ha["mean_quality"] == pytest.approx(1.0)
    assert ht["mean_quality"] < ha["mean_quality"]
    assert ha["slo_violation_ratio"] > ht["slo_violation_ratio"]
    assert ha["tier_mix"].keys() == {"0"} and ht["tier_mix"].keys() == {"7"}
    argus, _, result = run_sim(*common, "--policy", "argus")
    assert argus["sim"]["plans"] > 1
    assert any(sum(n for k, n in row["gpus"].items() if k > 0) > 0 for row in result.control)
    assert argus["slo_violation_ratio"] < ha["slo_violation_ratio"]
    assert ht["mean_quality"] < argus["mean_quality"] < ha["mean_quality"]


def test_model_switch_costs_the_load_time(tmp_path: Path) -> None:
    """A GPU moved to a tier of another model serves it only ``load_time_s`` later."""
    reg = tmp_path / "two.yaml"
    reg.write_text(
        "name: two\ndevice: gpu\ntiers:\n"
        "- {id: 0, name: exact, strategy: exact, model: big, steps: 10, quality: 1.0,\n"
        "   latency: {gpu: {1: 1.0}}, load_time_s: 20}\n"
        "- {id: 1, name: light, strategy: model, model: small, steps: 2, quality: 0.9,\n"
        "   latency: {gpu: {1: 0.25}}, load_time_s: 20}\n")
    trace = write_trace(tmp_path / "t.csv", rate=6.0, seconds=90)
    summ, recs, result = run_sim("--trace", str(trace), "--tiers", str(reg), "--gpus", "2",
                                 "--policy", "argus", "--quality-file",
                                 str(tmp_path / "none.csv"), "--drain-timeout", "600")
    first = next(row["t"] for row in result.control if row["gpus"][1] > 0)
    light = [r["timings"]["started"] for r in recs
             if r["status"] == "succeeded" and r["tier"] == 1]
    assert summ["sim"]["model_switches"] >= 1 and light
    assert min(light) >= first + 20.0 - 1e-9
    assert any(row["loading"] > 0 for row in result.control)


def test_quality_model_standins_and_fallbacks() -> None:
    """SDXL tiers read their stand-in's column, clipped to [0, 1]; a prompt outside the
    table, or a tier without a column, gets the tier's mean."""
    registry = load_registry(REPO / "profiles" / "sdxl.yaml")
    cols = [table_column(t) for t in registry.tiers]
    assert cols[1] == "cache-k2" and cols[7] == "steps-5" and cols[8] == "lightning-4"
    table = Table({"p": {"exact": 1.0, "cache-k2": 1.3, "steps-5": 0.5}}, {"p": 0.9}, "t")
    q = {k: 1.0 - 0.01 * k for k in range(len(registry.tiers))}
    m = quality_model(registry, ["p", "other"], table, q)
    assert m.quality[0, 0] == 1.0 and m.quality[0, 1] == 1.0 and m.unclipped[0, 1] == 1.3
    assert m.quality[0, 7] == 0.5
    assert m.quality[1, 1] == pytest.approx(registry.tiers[1].quality)  # registry mean
    assert m.quality[0, 8] == pytest.approx(q[8])  # no column, no registry quality
    assert m.columns[8] is None and list(m.in_table) == [True, False]


def test_plot_writes_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two simulations overlaid give the four figures; a replay-like summary without
    quality or GPUs gives only the load and violation figures."""
    trace = write_trace(tmp_path / "t.csv", rate=4.0, seconds=130)
    dirs = []
    for policy in ("clipper-ha", "clipper-ht"):
        d = tmp_path / policy
        assert main(["simulate", "--trace", str(trace), "--policy", policy, "--gpus", "2",
                     "--out", str(d)]) == 0
        assert {p.name for p in d.iterdir()} == {"requests.jsonl", "control.jsonl",
                                                  "summary.json"}
        dirs.append(str(d))
    capsys.readouterr()
    out = tmp_path / "plots"
    assert main(["plot", *dirs, "--out", str(out)]) == 0
    names = {"load.png", "violations.png", "quality.png", "gpus.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replay = json.loads((Path(dirs[0]) / "summary.json").read_text())
    replay.pop("sim")
    for m in replay["per_minute"]:
        m.pop("quality"), m.pop("gpus")
    (tmp_path / "replay.json").write_text(json.dumps(replay))
    out2 = tmp_path / "plots2"
    assert main(["plot", str(tmp_path / "replay.json"), "--out", str(out2)]) == 0
    assert {p.name for p in out2.iterdir()} == {"load.png", "violations.png"}
    assert main(["plot", str(tmp_path / "missing.json"), "--out", str(out2)]) == 2
