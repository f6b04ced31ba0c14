"""NIRVANA's classifier side over the real shared cache (Redis): similarity -> K -> tier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from common.messages import PromptJob
from common.tiers import load_registry
from services.classifier.baselines import NirvanaPolicy
from services.classifier.cache_lookup import CacheLookup
from services.worker.cache import LatentCache, cache_namespace
from tests.test_policies import write_tiers


class Embedder:
    """Fixed vectors: 'near' is 0.97-similar to 'cached', 'far' is orthogonal."""

    name = "fake"

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        vectors = {"cached": [1.0, 0.0], "near": [0.97, float(np.sqrt(1 - 0.97**2))],
                   "far": [0.0, 1.0]}
        return np.asarray([vectors[p] for p in prompts], dtype=np.float32)


def test_nirvana_over_the_shared_cache(redis_url: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    reg = load_registry(write_tiers(
        tmp_path / "c.yaml", [{1: 1.0}, {1: 0.8}, {1: 0.6}], None,
        strategies=["exact", "cache", "cache"], skips=[0, 5, 10], steps=20))
    client = redis.Redis.from_url(redis_url)
    ns = cache_namespace("m", 20, 32, 32)
    LatentCache(client, ns, 20, 1 << 20).put(
        "cached", np.asarray([1.0, 0.0]), {5: torch.zeros(4, 4, 4), 10: torch.zeros(4, 4, 4)})
    policy = NirvanaPolicy(CacheLookup(client, reg, Embedder(), refresh_s=0.0), reg)
    jobs = [PromptJob(job_id=p, prompt=p, seed=0) for p in ("near", "far", "cached")]
    # 0.97 > 0.95 -> K 25/50 of 20 steps = 10: the K=10 tier; 0.0 -> miss -> exact.
    assert [d.predicted_tier for d in policy.decide(jobs)] == [2, 0, 2]
    other = [PromptJob(job_id="x", prompt="near", seed=0, width=64, height=64)]
    assert policy.decide(other)[0].predicted_tier == 0  # another size: another namespace
    client.close()
    broken = CacheLookup(redis.Redis(port=1), reg, Embedder())  # nothing listens there
    assert broken(jobs) == [None, None, None]
