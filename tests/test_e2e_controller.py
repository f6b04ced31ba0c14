"""End to end: the argus controller re-plans under a load step, over real processes.

Four emulated workers, two tiers: exact at 1.25 jobs/s per GPU (5 jobs/s in all, 4.5
planned with the 10 % headroom), cheap at 5 jobs/s per GPU. A step from 1 to 8 jobs/s
(above the exact capacity, below the cheap one) must move GPUs to the cheap tier, and the
return to 1 job/s must bring every GPU back to exact; every job must succeed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.up import StackConfig, running_stack
from tests.conftest import free_port
from tests.test_e2e import wait_all
from tests.test_policies import write_tiers

pytestmark = pytest.mark.e2e


def submit_at(client: httpx.Client, rate: float, seconds: float, ids: list[str]) -> None:
    """Submit jobs at ``rate`` per second for ``seconds``, appending their ids."""
    start = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        if n < rate * elapsed:
            r = client.post("/v1/jobs", json={"prompt": f"a red square {len(ids)}",
                                              "seed": len(ids)})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            n += 1
        else:
            time.sleep(0.01)


def test_load_step_moves_gpus_to_cheap_tier_and_back(tmp_path: Path) -> None:
    reg = write_tiers(tmp_path / "tiers.yaml", [{1: 1.0, 2: 1.6}, {1: 0.25, 2: 0.4}],
                      [1.0, 0.8])
    env = {"T2I_POLICY": "argus", "T2I_FIXED_TIER": "0", "T2I_CONTROL_PERIOD_S": "0.5",
           "T2I_LOAD_LEVEL_TAU_S": "2", "T2I_LOAD_TREND_TAU_S": "30",
           "T2I_DRAIN_HORIZON_S": "10", "T2I_HYSTERESIS": "0",
           "T2I_QUALITY_FILE": str(tmp_path / "none.csv"), "T2I_STREAM_BLOCK_MS": "200"}
    config = StackConfig(workers=4, backend="emulated", port=free_port(), tiers_file=reg,
                         log_dir=tmp_path / "logs", env=env, with_tasks=False)
    history: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()
    with running_stack(config, timeout=60) as stack, \
            httpx.Client(base_url=stack.url, timeout=30) as client:

        def poll() -> None:
            with httpx.Client(base_url=stack.url, timeout=10) as c:
                while not stop.is_set():
                    body = c.get("/v1/tiers").json()
                    if body.get("plan"):
                        history.append((time.monotonic(), body["plan"]["gpus_per_tier"]))
                    time.sleep(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        ids: list[str] = []
        try:
            submit_at(client, 1.0, 3.0, ids)
            step_start = time.monotonic()
            submit_at(client, 8.0, 6.0, ids)
            step_end = time.monotonic()
            submit_at(client, 1.0, 4.0, ids)
            done = wait_all(client, ids, timeout=40)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (
                    not history or history[-1][1] != {"0": 4, "1": 0}):
                time.sleep(0.25)
        finally:
            stop.set()
            poller.join(5)
        during = [g for t, g in history if step_start <= t <= step_end + 3]
        assert any(g["1"] >= 2 for g in during), history
        assert history[-1][1] == {"0": 4, "1": 0}, history[-5:]
        assert all(b["status"] == "succeeded" for b in done.values()), done
        tiers = [b["tier"] for b in done.values()]
        assert tiers.count(1) > 0 and tiers.count(0) > 0
        state = client.get("/v1/tiers").json()["controller"]
        assert state["policy"] == "argus" and state["formulation"] == "flow"
