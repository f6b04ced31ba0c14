"""End to end: a job sent to each tier of a world registry (exact, cache, steps, model)
through the running system comes back with its tier, strategy and cache outcome recorded.

One stack (a random-weight world model saved to a tmp dir, one diffusers worker). After
it is ready the controller is stopped and the test publishes the plans itself, one per
tier: the worker is assigned tier k and the routing row of the classifier's fixed
prediction (tier 0) sends every job to k. Jobs still go gateway -> classifier -> tier
stream -> worker -> job store, as in production.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common import keys
from common.jobs import JobRecord
from common.messages import AllocationPlan
from services.up import StackConfig, running_stack
from tests.conftest import free_port
from tests.test_e2e import PNG_MAGIC, wait_all
from tests.tinysd import build_tiny_world, write_world_registry

pytestmark = pytest.mark.e2e

WORKER = "worker-0"


def publish(r: Any, tier: int) -> None:
    """Publish a plan putting the worker on ``tier`` and routing tier 0 there."""
    raw = r.get(keys.ALLOC_CURRENT)
    version = AllocationPlan.model_validate_json(raw).version if raw else 0
    plan = AllocationPlan(version=version + 1, policy="test", assignments={WORKER: tier},
                          gpus_per_tier={tier: 1}, routing={0: {tier: 1.0}})
    data = plan.model_dump_json()
    with r.pipeline(transaction=True) as pipe:
        pipe.set(keys.ALLOC_CURRENT, data)
        pipe.publish(keys.ALLOC_UPDATES, data)
        pipe.execute()


def wait_worker_on(r: Any, tier: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hb = r.get(keys.heartbeat_key("worker", WORKER))
        if hb and json.loads(hb).get("tier") == tier:
            time.sleep(0.3)  # the classifier follows the same pub/sub message
            return
        time.sleep(0.1)
    raise AssertionError(f"worker not on tier {tier} after {timeout}s")


def test_every_tier_end_to_end(tmp_path: Path) -> None:
    model = build_tiny_world(tmp_path / "world")
    reg = write_world_registry(tmp_path / "tiers.yaml", model, steps=4, skips=(1, 2),
                               fewer=(2,), batch_sizes=(1, 4))
    env = {"T2I_CONTROL_PERIOD_S": "0.5", "T2I_POLICY": "fixed", "T2I_FIXED_TIER": "0",
           "T2I_STATIC_TIER": "0", "T2I_CACHE_MIN_SIMILARITY": "-1", "OMP_NUM_THREADS": "1",
           "T2I_HEARTBEAT_INTERVAL_S": "0.2"}
    config = StackConfig(workers=1, backend="diffusers", port=free_port(), tiers_file=reg,
                         log_dir=tmp_path / "logs", env=env, with_tasks=False)
    with running_stack(config, timeout=120) as stack, \
            httpx.Client(base_url=stack.url, timeout=30) as client:
        stack.procs["controller"].terminate()
        stack.procs["controller"].wait(15)
        r: Any = redis.Redis.from_url(stack.redis_url)
        expected = [(0, "exact", None), (1, "cache", "hit"), (2, "cache", "hit"),
                    (3, "steps", None), (4, "model", None)]
        for tier, strategy, cache in expected:
            publish(r, tier)
            wait_worker_on(r, tier)
            job_id = client.post("/v1/jobs", json={"prompt": "a red circle on the left",
                                                   "seed": 3}).json()["id"]
            body = wait_all(client, [job_id], timeout=60)[job_id]
            assert body["status"] == "succeeded" and body["tier"] == tier, body
            assert client.get(f"/v1/jobs/{job_id}/image").content.startswith(PNG_MAGIC)
            rec = JobRecord.from_hash(r.hgetall(keys.job_key(job_id)))
            assert rec.tier == tier and rec.detail["strategy"] == strategy, rec.detail
            if cache:  # the exact job cached the prompt's latents: its own latent hits
                assert rec.detail["cache"] == cache and rec.detail["k_used"] == tier
                assert rec.detail["similarity"] == pytest.approx(1.0, abs=1e-3)
            if strategy == "model":  # another model: loaded (and counted) on the switch
                assert rec.detail["model_load_s"] > 0
                hb = json.loads(r.get(keys.heartbeat_key("worker", WORKER)) or b"{}")
                assert hb["model_switches"] == 2
