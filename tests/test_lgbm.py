"""LightGBM tier classifier: labels, split, training, persistence, decision, hot reload.

Everything runs on a small synthetic quality table whose safety rules are known: the
cheapest tier (5 steps) is safe for short prompts, 10 steps for medium ones, the cache
tier when the neighbour is similar enough.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.messages import PromptJob
from common.tiers import Registry, load_registry
from services.classifier.features import QualityTable, labels, read_table, safety
from services.classifier.lgbm import (
    LgbmPolicy,
    ModelError,
    TierModel,
    choose_tiers,
    cost_order,
    feasibility,
    load_model,
    tier_costs,
    tier_infos,
)
from services.classifier.train import Params, split_mask, train


class BagEmbedder:
    """Test double: hashed bag of words, unit norm (deterministic, no torch)."""

    name = "bag"
    dim = 16

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), np.float32)
        for i, p in enumerate(prompts):
            for w in re.findall(r"[a-z]+", p.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        unit: np.ndarray = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return unit


def write_registry4(path: Path) -> Path:
    """exact (20 steps), cache K=8, steps-10, steps-5; latency proportional to steps."""
    spec = [("exact", "exact", 20, 0), ("cache-8", "cache", 20, 8),
            ("steps-10", "steps", 10, 0), ("steps-5", "steps", 5, 0)]
    tiers = [{"id": i, "name": n, "strategy": s, "model": "m", "steps": st, "skip": k,
              "batch_sizes": [1, 4], "latency": {"cpu": {1: 0.01 * (st - k),
                                                         4: 0.03 * (st - k)}}}
             for i, (n, s, st, k) in enumerate(spec)]
    path.write_text(yaml.safe_dump({"name": "synthetic", "device": "cpu", "tiers": tiers}))
    return path


def synthetic_rules(prompt: str, sim: float) -> list[bool]:
    """Which tiers are really safe for a prompt (the ground truth of the table)."""
    words = len(prompt.split())
    return [True, sim > 0.85, words <= 8, words <= 5]


def write_table(path: Path, n: int = 500, seed: int = 0, drop_last_tier: int = 0) -> Path:
    """A quality CSV in ``argus profile quality``'s columns; the last ``drop_last_tier``
    prompts lack their steps-5 row (a partial profile)."""
    from world.scenes import train_captions

    rng = np.random.default_rng(seed)
    prompts = list(dict.fromkeys(t for t, _ in train_captions(3 * n, seed=seed + 5)))[:n]
    names = ["exact", "cache-8", "steps-10", "steps-5"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "category", "tier", "tier_name",
                                          "strategy", "rel_quality", "neighbor_similarity"])
        w.writeheader()
        for i, p in enumerate(prompts):
            sim = float(rng.uniform(0.6, 1.0))
            for k, ok in enumerate(synthetic_rules(p, sim)):
                if k == 3 and i >= n - drop_last_tier:
                    continue
                rel = 1.0 if k == 0 else (0.99 if ok else 0.88) + rng.normal(0, 0.01)
                w.writerow({"prompt": p, "category": "", "tier": k, "tier_name": names[k],
                            "strategy": "cache" if k == 1 else "steps" if k else "exact",
                            "rel_quality": f"{rel:.4f}",
                            "neighbor_similarity": f"{sim:.4f}" if k == 1 else ""})
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[TierModel, dict[str, object], QualityTable, Registry, Path]:
    d = tmp_path_factory.mktemp("lgbm")
    registry = load_registry(write_registry4(d / "tiers.yaml"))
    table = read_table(write_table(d / "q.csv"), registry)
    model, report = train(table, registry, BagEmbedder(),
                          Params(threads=1, rounds=200, target_safe=0.95))
    return model, report, table, registry, d


def test_costs_order_labels_and_feasibility(tmp_path: Path) -> None:
    registry = load_registry(write_registry4(tmp_path / "t.yaml"))
    costs, source = tier_costs(registry)
    assert source == "latency:cpu" and costs == pytest.approx([0.15, 0.09, 0.075, 0.0375])
    tiers = tier_infos(registry)
    assert cost_order(tiers) == [3, 2, 1, 0]
    safe = safety(np.array([[0.5, 1.0, 0.96, 0.94], [1.0, np.nan, 0.9, 0.9]]), 0.05)
    assert safe.tolist() == [[True, True, True, False], [True, False, False, False]]
    feas = feasibility(tiers, np.array([0.9, np.nan]), [(8,), ()])
    assert feas[:, 1].tolist() == [True, False]
    assert labels(safe, feas, cost_order(tiers)).tolist() == [2, 0]
    probs = np.array([[1, 0.9, 0.5, 0.7], [1, 0.99, 0.99, 0.2]])
    assert choose_tiers(probs, feas, [3, 2, 1, 0], 0.6).tolist() == [3, 2]
    assert choose_tiers(probs, feas, [3, 2, 1, 0], 0.8).tolist() == [1, 2]
    assert choose_tiers(probs, feas, [3, 2, 1, 0], 0.995).tolist() == [0, 0]
    # No latency profile: the UNet-steps proxy, ties broken towards the higher id.
    doc = yaml.safe_load((tmp_path / "t.yaml").read_text())
    for t in doc["tiers"]:
        t.pop("latency")
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(doc))
    costs, source = tier_costs(load_registry(tmp_path / "n.yaml"))
    assert source == "unet_steps-proxy" and costs[0] > costs[1] > costs[2] > costs[3]


def test_read_table_drops_partial_prompts_and_checks_tiers(tmp_path: Path) -> None:
    registry = load_registry(write_registry4(tmp_path / "t.yaml"))
    table = read_table(write_table(tmp_path / "q.csv", n=40, drop_last_tier=5), registry)
    assert len(table.prompts) == 35 and table.rel.shape == (35, 4)
    assert np.isfinite(table.similarity).all()
    text = (tmp_path / "q.csv").read_text().replace("steps-10", "steps-9")
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match="not tier 2"):
        read_table(tmp_path / "bad.csv", registry)


def test_split_is_by_group_without_leakage(
        trained: tuple[TierModel, dict[str, object], QualityTable, Registry, Path]) -> None:
    model, report, table, registry, _ = trained
    held = split_mask(table.groups, 0.2, "0")
    assert 0 < held.sum() < len(held)
    groups = [set(np.array(table.groups)[m]) for m in (held, ~held)]
    texts = [{table.prompts[i] for i in np.flatnonzero(m)} for m in (held, ~held)]
    assert not groups[0] & groups[1] and not texts[0] & texts[1]
    # Two captions of one world combination always fall on the same side.
    from world.scenes import combination_key, parse_caption

    m = parse_caption("a red circle")
    assert m is not None and split_mask([combination_key(m)] * 2, 0.5, "x").tolist() in (
        [True, True], [False, False])
    split = report["split"]
    assert isinstance(split, dict) and split["heldout"] == int(held.sum())
    assert split["train"] + split["heldout"] == len(table.prompts)
    # The held-out labels never reach the model: scrambling them changes nothing.
    from dataclasses import replace

    rel = table.rel.copy()
    rel[held] = np.random.default_rng(1).uniform(0.8, 1.0, size=rel[held].shape)
    again, _ = train(replace(table, rel=rel), registry, BagEmbedder(),
                     Params(threads=1, rounds=200, target_safe=0.95))
    from services.classifier.features import build_features

    x = build_features(BagEmbedder().embed(table.prompts), table.prompts, table.similarity)
    assert again.confidence == model.confidence
    assert np.array_equal(again.predict_safe(x), model.predict_safe(x))


def test_training_learns_the_rules_and_reports(
        trained: tuple[TierModel, dict[str, object], QualityTable, Registry, Path]) -> None:
    _, report, _, _, _ = trained
    base = report["baselines"]
    assert isinstance(base, dict)
    for key in ("safe_rate", "saving", "saving_vs_oracle", "accuracy", "confusion"):
        assert key in report
    assert report["safe_rate"] >= 0.9 and report["accuracy"] >= 0.7  # type: ignore[operator]
    assert report["saving_vs_oracle"] >= 0.7  # type: ignore[operator]
    assert base["always_exact"]["saving"] == 0 and base["always_exact"]["safe_rate"] == 1
    assert base["oracle"]["safe_rate"] == 1 and base["oracle"]["saving_vs_oracle"] == 1
    assert report["saving"] > base["nirvana"]["saving"]
    assert report["safe_rate"] > base["always_cheapest"]["safe_rate"]
    sweep = report["sweep"]
    assert isinstance(sweep, list) and len(sweep) >= 5
    savings = [s["saving"] for s in sweep]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(savings))


def test_saved_model_round_trips(
        trained: tuple[TierModel, dict[str, object], QualityTable, Registry, Path]) -> None:
    model, _, table, _, d = trained
    from services.classifier.features import build_features

    x = build_features(BagEmbedder().embed(table.prompts), table.prompts, table.similarity,
                       np.full(len(table.prompts), 0.4))
    model.save(d / "m.json")
    again = load_model(d / "m.json")
    assert np.array_equal(model.predict_safe(x), again.predict_safe(x))
    assert again.confidence == model.confidence and again.tiers == model.tiers
    (d / "bad.json").write_text("{not json")
    with pytest.raises(ModelError):
        load_model(d / "bad.json")


def test_policy_decides_and_hot_reloads(
        trained: tuple[TierModel, dict[str, object], QualityTable, Registry, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _, _, d = trained
    import services.classifier.lgbm as lgbm_mod

    monkeypatch.setattr(lgbm_mod, "load_feature_embedder", lambda spec: BagEmbedder())
    path = d / "serve.json"
    model.save(path)
    policy = LgbmPolicy(path, d / "tiers.yaml", reload_s=3600)
    jobs = [PromptJob(job_id=str(i), prompt=p, seed=1)
            for i, p in enumerate(["a red circle", "a small blue square on the left of "
                                   "a large green triangle at the top"])]
    first = policy.decide(jobs)
    assert [len(x.probabilities) for x in first] == [4, 4]
    assert first[0].probabilities[0] == 1.0 and first[0].predicted_tier == 3
    assert first[1].predicted_tier == 0  # long: unsafe below exact; no cache neighbour
    # A new model (every tier certain to be unsafe) is picked up at the next check.
    strict = TierModel(model.tiers, model.embedder, model.dim, {}, {1: 0.0, 2: 0.0, 3: 0.0},
                       model.tolerance, model.confidence)
    strict.save(path)
    os.utime(path, ns=(1, 1))
    assert policy.maybe_reload(force=True) and policy.reloads == 1
    assert [x.predicted_tier for x in policy.decide(jobs)] == [0, 0]
    # A bad file is logged and the model in use is kept.
    path.write_text("garbage")
    assert not policy.maybe_reload(force=True) and policy.reload_failures == 1
    assert [x.predicted_tier for x in policy.decide(jobs)] == [0, 0]
    with pytest.raises(ModelError):
        LgbmPolicy(path, d / "tiers.yaml")
    # A registry whose tiers are not the model's is refused as well.
    strict.save(path)
    renamed = (d / "tiers.yaml").read_text().replace("steps-5", "steps-4")
    (d / "renamed.yaml").write_text(renamed)
    with pytest.raises(ModelError, match="trained for tiers"):
        LgbmPolicy(path, d / "renamed.yaml")


def test_cli_train_then_eval_reports_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    import argparse
    import json

    import services.classifier.features as features_mod
    from common.cli import AREAS
    from services.classifier.cli import register

    assert AREAS["classifier"] == "services.classifier.cli"
    parser = argparse.ArgumentParser(prog="argus")  # `argus` without its other areas
    register(parser.add_subparsers(dest="area", required=True))

    def main(argv: list[str]) -> int:
        args = parser.parse_args(argv)
        return int(args.func(args))

    monkeypatch.setattr(features_mod, "load_embedder", lambda spec: BagEmbedder())
    tiers = write_registry4(tmp_path / "t.yaml")
    table = write_table(tmp_path / "q.csv", n=200)
    out = tmp_path / "clf"
    assert main(["classifier", "train", "--table", str(table), "--tiers", str(tiers),
                 "--out", str(out), "--threads", "1", "--compare-multiclass", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["multiclass_argmax"]["n"] == trained["n"]
    trained.pop("multiclass_argmax")
    assert json.loads((out / "report.json").read_text())["safe_rate"] == trained["safe_rate"]
    assert main(["classifier", "eval", "--model", str(out / "model.json"), "--table",
                 str(table), "--tiers", str(tiers), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("safe_rate", "saving", "saving_vs_oracle", "accuracy", "baselines", "n"):
        assert evaluated[key] == trained[key]
    assert evaluated["seed_consistency"] == {}  # no per-seed columns in this table
    assert main(["classifier", "eval", "--model", str(tmp_path / "none.json"),
                 "--table", str(table), "--tiers", str(tiers)]) == 2


def test_higher_confidence_never_chooses_a_cheaper_tier() -> None:
    rng = np.random.default_rng(0)
    costs = np.array([1.0, 0.7, 0.5, 0.2])
    order = [3, 2, 1, 0]
    for _ in range(200):
        probs = rng.uniform(size=(16, 4))
        feas = rng.uniform(size=(16, 4)) < 0.8
        lo, hi = sorted(rng.uniform(size=2))
        assert (costs[choose_tiers(probs, feas, order, hi)]
                >= costs[choose_tiers(probs, feas, order, lo)]).all()
