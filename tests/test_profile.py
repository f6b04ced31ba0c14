"""Profiling commands on a tiny random-weight world model: quality CSV (seeds, cache bank,
resume, noise floor), latency measurement and its write-back, report, ``argus tiers``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from common.cli import main
from common.settings import WorkerSettings
from common.tiers import load_registry
from services.profile.latency import measure, write_latency
from services.profile.quality import COLUMNS, QualityConfig, QualityProfiler, run_quality
from services.profile.report import markdown, merge, summarize
from services.profile.scoring import WorldScorer, default_bank, default_prompts, stable_seed
from services.worker.backends.diffusers_backend import DiffusersBackend
from services.worker.embed import embedder_for_pipeline
from tests.tinysd import build_tiny_world, write_world_registry

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("prof")
    model = build_tiny_world(tmp / "pipe")
    reg = write_world_registry(tmp / "tiers.yaml", model, steps=4, skips=(1, 2), fewer=(2,),
                               batch_sizes=(1, 2))
    return model, reg


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_default_prompt_set_and_bank() -> None:
    from world import scenes

    ps = default_prompts(600)
    texts = [p for p, _ in ps]
    assert len(set(texts)) == 600
    heldout = sum(scenes.is_heldout(m) for _, m in ps)
    assert heldout == sum(len(scenes.heldout_combinations(c)) for c in scenes.CATEGORIES)
    bank = default_bank(50, set(texts))
    assert len({p for p, _ in bank}) == 50 and not {p for p, _ in bank} & set(texts)
    assert stable_seed("a", 0) == stable_seed("a", 0) != stable_seed("a", 1)


def test_quality_profile_resumable_with_floor(world: tuple[Path, Path], tmp_path: Path
                                              ) -> None:
    _, reg_path = world
    reg = load_registry(reg_path)
    reg = reg.model_copy(update={"tiers": reg.tiers[:-1]})  # drop the model tier
    backend = DiffusersBackend(WorkerSettings(cache_enabled=False))
    pipe = backend.pipeline(reg.tiers[0])
    prof = QualityProfiler(reg, backend.pipeline, WorldScorer(pipe.text_encoder),
                           embedder_for_pipeline(pipe).embed,
                           QualityConfig(seeds=2, batch_size=5, chunk=3, floor=2))
    prompts = default_prompts(505)[-6:]  # 2 held-out + 4 training captions
    bank = default_bank(4, {p for p, _ in prompts})
    out, floor = tmp_path / "q.csv", tmp_path / "q_floor.csv"
    res = run_quality(prof, prompts, bank, out, floor, tmp_path / "work", progress=False)
    assert res == {"prompts": 6, "skipped": 0, "done": 6, "bank": 4}
    rows = rows_of(out)
    assert len(rows) == 6 * len(reg.tiers) and list(rows[0]) == list(COLUMNS)
    for r in rows:
        if r["tier"] == "0":
            assert float(r["rel_quality"]) == pytest.approx(1.0, abs=1e-4)
            assert float(r["checker_delta"]) == 0.0
        if r["strategy"] == "cache":
            assert r["neighbor"] in {p for p, _ in bank} and r["neighbor"] != r["prompt"]
            assert -1 <= float(r["neighbor_similarity"]) <= 1
        assert len(r["clip_per_seed"].split(";")) == 2
    assert len(rows_of(floor)) == 2
    # Resume: nothing left to do; a partially written prompt is dropped and redone.
    assert run_quality(prof, prompts, bank, out, floor, tmp_path / "work",
                       progress=False)["done"] == 0
    with out.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(COLUMNS)).writerow({**rows[0], "prompt": "torn"})
    assert run_quality(prof, prompts, bank, out, floor, tmp_path / "work",
                       progress=False)["done"] == 0
    assert all(r["prompt"] != "torn" for r in rows_of(out))
    # Same seeds, same images: a rerun from scratch reproduces the table.
    again = tmp_path / "again.csv"
    run_quality(prof, prompts, bank, again, tmp_path / "again_floor.csv", tmp_path / "work",
                progress=False)
    key = sorted((r["prompt"], r["tier"], r["clip_per_seed"]) for r in rows_of(out))
    assert key == sorted((r["prompt"], r["tier"], r["clip_per_seed"]) for r in rows_of(again))
    # Two shards with one shared reference cover the set exactly once, same numbers.
    meta = tmp_path / "q.csv.meta.json"
    parts = [tmp_path / f"s{i}.csv" for i in range(2)]
    for i, part in enumerate(parts):
        run_quality(prof, prompts, bank, part, tmp_path / f"s{i}_floor.csv",
                    tmp_path / "work", progress=False, shard=(i, 2), meta=meta)
    sharded = [r for part in parts for r in rows_of(part)]
    assert sorted((r["prompt"], r["tier"], r["rel_quality"]) for r in sharded) == sorted(
        (r["prompt"], r["tier"], r["rel_quality"]) for r in rows_of(out))
    merged = tmp_path / "merged.csv"
    c = merge(parts, merged, [tmp_path / f"s{i}_floor.csv" for i in range(2)],
              tmp_path / "merged_floor.csv")
    assert c == pytest.approx(json.loads((tmp_path / "merged.csv.meta.json").read_text())
                              ["ref_clip"])
    assert len(rows_of(merged)) == len(rows) and len(rows_of(tmp_path / "merged_floor.csv"
                                                             )) == 2
    assert all(float(r["rel_quality"]) == 1.0 for r in rows_of(merged) if r["tier"] == "0")
    summary = summarize(reg, out, floor, "cpu")
    assert summary["prompts"] == 6 and summary["noise_floor"]["n"] == 2
    assert "| 0 exact |" in markdown(summary)


def test_latency_measure_and_write_back(world: tuple[Path, Path], tmp_path: Path) -> None:
    _, reg_path = world
    path = tmp_path / "tiers.yaml"
    path.write_text("# keep me\n" + reg_path.read_text())
    raw = yaml.safe_load(path.read_text())
    raw["tiers"][0]["notes"] = "kept"
    path.write_text("# keep me\n" + yaml.safe_dump(raw, sort_keys=False))
    reg = load_registry(path)
    backend = DiffusersBackend(WorkerSettings(cache_enabled=False))
    prof = measure(reg, backend.pipeline, "cpu", [1, 2], repeats=1, warmup=0)
    assert set(prof) == {t.id for t in reg.tiers}
    assert all(v > 0 for t in prof.values() for v in t.values())
    write_latency(path, "cpu", prof)
    assert path.read_text().startswith("# keep me\n")
    again = load_registry(path)
    assert again.tiers[0].notes == "kept"
    assert again.tiers[2].latency["cpu"][2] == round(prof[2][2], 5)


def test_cli_tiers_show_and_profile_latency(world: tuple[Path, Path], tmp_path: Path,
                                            capsys: Any) -> None:
    _, reg_path = world
    path = tmp_path / "t.yaml"
    path.write_text(reg_path.read_text())
    assert main(["tiers", "show", "--tiers", str(path), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [t["strategy"] for t in body["tiers"]][:2] == ["exact", "cache"]
    assert main(["profile", "latency", "--tiers", str(path), "--batch-sizes", "1",
                 "--repeats", "1", "--warmup", "0", "--only", "0,1", "--write"]) == 0
    reg = load_registry(path)
    assert reg.tiers[1].latency["cpu"][1] > 0 and not reg.tiers[2].latency
    assert reg.tiers[0].load_time_s is not None and reg.tiers[0].load_time_s > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntiers: []\n")
    assert main(["tiers", "show", "--tiers", str(bad)]) == 2


def test_merge_combines_disjoint_seed_sets(world: tuple[Path, Path], tmp_path: Path) -> None:
    """Seed 0 and seed 1 run separately (``seed_offset``), merged: the same per-seed
    scores as one two-seed run, so seeds can be added run by run."""
    _, reg_path = world
    reg = load_registry(reg_path)
    reg = reg.model_copy(update={"tiers": reg.tiers[:3]})  # exact + the first two tiers
    backend = DiffusersBackend(WorkerSettings(cache_enabled=False))
    pipe = backend.pipeline(reg.tiers[0])

    def profiler(seeds: int, offset: int) -> QualityProfiler:
        return QualityProfiler(reg, backend.pipeline, WorldScorer(pipe.text_encoder),
                               embedder_for_pipeline(pipe).embed,
                               QualityConfig(seeds=seeds, seed_offset=offset, batch_size=8,
                                             chunk=3, floor=0))

    prompts = default_prompts(505)[-3:]
    bank = default_bank(3, {p for p, _ in prompts})
    parts = []
    for off in (0, 1):
        part = tmp_path / f"seed{off}.csv"
        run_quality(profiler(1, off), prompts, bank, part, tmp_path / f"f{off}.csv",
                    tmp_path / "work", progress=False)
        parts.append(part)
    both = tmp_path / "both.csv"
    run_quality(profiler(2, 0), prompts, bank, both, tmp_path / "fb.csv", tmp_path / "work",
                progress=False)
    merged = tmp_path / "merged.csv"
    merge(parts, merged, [], None)
    got = {(r["prompt"], r["tier"]): r for r in rows_of(merged)}
    want = {(r["prompt"], r["tier"]): r for r in rows_of(both)}
    assert got.keys() == want.keys()
    for key, r in want.items():
        assert got[key]["seeds"] == "2"
        assert got[key]["clip_per_seed"] == r["clip_per_seed"]
        assert got[key]["checker_per_seed"] == r["checker_per_seed"]
        assert float(got[key]["checker_delta"]) == pytest.approx(float(r["checker_delta"]),
                                                                 abs=1e-3)
    # The same seed set twice is not double-counted.
    merge([parts[0], parts[0]], merged, [], None)
    assert all(r["seeds"] == "1" for r in rows_of(merged))


def test_seed_consistency_separates_prompt_from_seed_noise() -> None:
    """A loss that belongs to the prompt repeats across seed halves (correlation near 1,
    verdicts agree); a loss that is fresh noise per seed does not (near 0)."""
    from services.profile.report import seed_consistency

    rng = np.random.default_rng(0)

    def table(prompt_part: float) -> list[dict[str, str]]:
        rows = []
        for i in range(400):
            loss = rng.normal(0, 0.1)
            ex = rng.normal(80, 5, 4)
            tier = ex + 80 * (prompt_part * loss + (1 - prompt_part) * rng.normal(0, 0.1, 4))
            for k, name, clip in ((0, "exact", ex), (1, "steps-5", tier)):
                rows.append({"prompt": f"p{i}", "tier": str(k), "tier_name": name,
                             "clip_per_seed": ";".join(f"{x:.2f}" for x in clip)})
        return rows

    prompt, noise = seed_consistency(table(1.0)), seed_consistency(table(0.0))
    assert prompt["steps-5"]["seeds"] == 4 and prompt["steps-5"]["prompts"] == 400
    assert prompt["steps-5"]["half_corr"] > 0.95 and prompt["steps-5"]["safe_agreement"] > 0.9
    assert abs(noise["steps-5"]["half_corr"]) < 0.15
    assert noise["steps-5"]["safe_agreement"] < 0.8
    assert seed_consistency([r for r in table(1.0) if r["tier"] == "1"]) == {}
