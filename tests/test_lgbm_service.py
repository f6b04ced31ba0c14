"""The ``lgbm`` predictor inside the classifier service, over a real Redis: jobs carry
the model's predicted tier and probabilities, and are routed by the controller's plan."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from common import keys
from common.messages import AllocationPlan, ClassifiedJob, JobState, PromptJob
from common.plans import publish_plan
from common.settings import ClassifierSettings
from common.tiers import load_registry
from services.classifier.features import read_table
from services.classifier.lgbm import LgbmPolicy
from services.classifier.policies import PolicyError, make_policy
from services.classifier.train import Params, train
from tests.test_classifier import classifier, create, state
from tests.test_lgbm import BagEmbedder, write_registry4, write_table

SHORT, LONG = "a red circle", "a small blue square on the left of a large green triangle"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on the synthetic table (bag-of-words test embedder: no torch, so
    the test stays fast; the world embedder is tested in test_classifier_features)."""
    d = tmp_path_factory.mktemp("lgbm-svc")
    registry = load_registry(write_registry4(d / "tiers.yaml"))
    table = read_table(write_table(d / "q.csv", n=300), registry)
    model, _ = train(table, registry, BagEmbedder(), Params(threads=1, rounds=100))
    model.save(d / "model.json")
    return d


@pytest.fixture(autouse=True)
def bag_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service resolves the model's embedder spec ('bag') to the test embedder."""
    import services.classifier.lgbm as lgbm_mod

    monkeypatch.setattr(lgbm_mod, "load_feature_embedder", lambda spec: BagEmbedder())


async def test_service_routes_by_lgbm_predictions(
        aredis: aioredis.Redis, redis_url: str, model_dir: Path) -> None:
    cfg = ClassifierSettings(
        redis_url=redis_url, instance="c-lgbm", tiers_file=model_dir / "tiers.yaml",
        policy="argus", predictor="lgbm", classifier_model=model_dir / "model.json",
        stream_block_ms=100, heartbeat_interval_s=0.1)
    local = LgbmPolicy(model_dir / "model.json", model_dir / "tiers.yaml")
    expect = local.decide([PromptJob(job_id="x", prompt=p, seed=1) for p in (SHORT, LONG)])
    assert [d.predicted_tier for d in expect] == [3, 0]  # no cache: tier 1 infeasible
    async with classifier(cfg):
        ids = [await create(aredis, SHORT), await create(aredis, LONG)]
        recs = [await state(aredis, i, JobState.CLASSIFIED) for i in ids]
        for rec, want in zip(recs, expect, strict=True):
            assert rec.predicted_tier == rec.tier == want.predicted_tier
            assert rec.probabilities == pytest.approx(want.probabilities, abs=1e-6)
        # The controller sends every tier-3 prediction to tier 2.
        await publish_plan(aredis, AllocationPlan(version=1, policy="argus",
                                                  routing={3: {2: 1.0}}))
        await asyncio.sleep(0.3)
        again = await create(aredis, SHORT)
        rec = await state(aredis, again, JobState.CLASSIFIED)
        assert (rec.predicted_tier, rec.tier) == (3, 2)
    (routed,) = [ClassifiedJob.from_fields(f)
                 for _, f in await aredis.xrange(keys.tier_stream(2))]
    assert routed.job_id == again and routed.policy == "argus"
    assert len(await aredis.hgetall(keys.MIX)) >= 2  # type: ignore[misc]  # the mix h


def test_missing_model_refuses_to_start(model_dir: Path) -> None:
    registry = load_registry(model_dir / "tiers.yaml")
    cfg = ClassifierSettings(tiers_file=model_dir / "tiers.yaml", policy="argus",
                             predictor="lgbm", classifier_model=model_dir / "nope.json")
    with pytest.raises(PolicyError, match="predictor 'lgbm'"):
        make_policy(cfg, registry)


def test_policy_probabilities_are_per_tier_safety(model_dir: Path) -> None:
    policy = LgbmPolicy(model_dir / "model.json", model_dir / "tiers.yaml", confidence=1.0)
    (d,) = policy.decide([PromptJob(job_id="y", prompt=SHORT, seed=1)])
    assert d.predicted_tier == 0 and d.probabilities[0] == 1.0
    assert all(0 <= p <= 1 for p in d.probabilities) and len(d.probabilities) == 4
    assert np.isfinite(d.probabilities).all()
