"""Worker pieces without Redis: batching, plan following rules, the emulated backend."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from common.messages import AllocationPlan, ClassifiedJob
from common.plans import is_newer, tier_of
from common.settings import WorkerSettings
from common.tiers import load_registry
from services.worker.backends import BackendError, make_backend
from services.worker.backends.emulated import EmulatedBackend
from services.worker.batching import batch_limit, group_batches, reclaim_period_s, shape_key
from tests.tinysd import write_registry


def _job(i: int, size: int = 32, n: int = 1) -> ClassifiedJob:
    return ClassifiedJob(job_id=f"j{i}", prompt=f"p{i}", seed=i, n=n, width=size,
                         height=size, tier=0, predicted_tier=0)


def test_group_batches_by_shape_in_order_and_capped() -> None:
    jobs = [_job(0), _job(1, 64), _job(2), _job(3), _job(4, n=2), _job(5)]
    groups = group_batches(jobs, shape_key, limit=2)
    assert [[j.job_id for j in g] for g in groups] == [
        ["j0", "j2"], ["j1"], ["j3", "j5"], ["j4"]]
    assert sorted(j.job_id for g in groups for j in g) == [j.job_id for j in jobs]
    with pytest.raises(ValueError):
        group_batches(jobs, shape_key, limit=0)


def test_batch_limit_and_reclaim_period(tmp_path: Path) -> None:
    tier = load_registry(write_registry(tmp_path / "t.yaml", "m", batch_sizes=(1, 8))).tiers[0]
    assert batch_limit(0, tier) == 8
    assert batch_limit(3, tier) == 3
    assert reclaim_period_s(1000) == 0.5


def test_serving_batch_fits_the_slo_share(tmp_path: Path) -> None:
    """Batches as large as fit the budget (a share of the SLO), the controller's capacity at
    that size: exact at 1/2/4/8 takes 0.6/0.7/0.9/1.5 s; SLO 3 x 0.6 s = 1.8 s."""
    from services.controller.overload import per_gpu_rate

    lat = {1: 0.6, 2: 0.7, 4: 0.9, 8: 1.5}
    reg = load_registry(write_registry(tmp_path / "t.yaml", "m", steps=(4, 2), latency=lat,
                                       batch_sizes=(1, 2, 4, 8)))
    exact, half = reg.tiers
    assert reg.default_slo_ms() == 1800 and reg.batch_budget_s(0.5) == pytest.approx(0.9)
    assert reg.batch_budget_s(0.0) is None
    assert batch_limit(0, exact, "cpu", reg.batch_budget_s(0.5)) == 4
    assert batch_limit(0, half, "cpu", reg.batch_budget_s(0.5)) == 8  # half the steps
    assert batch_limit(0, exact, "cpu", 0.1) == 1  # nothing fits: the smallest size
    assert batch_limit(0, exact, "cpu", None) == 8 == batch_limit(0, exact, "gpu", 0.9)
    assert batch_limit(2, exact, "cpu", 0.9) == 2  # T2I_MAX_BATCH wins
    rate = per_gpu_rate(reg, "cpu", reg.batch_budget_s(0.5))
    assert rate is not None and rate[0] == pytest.approx(4 / 0.9)


def test_plan_rules() -> None:
    v1 = AllocationPlan(version=1, policy="p", assignments={"a": 0})
    v2 = AllocationPlan(version=2, policy="p", assignments={"a": 1})
    assert is_newer(None, v1) and is_newer(v1, v2)
    assert not is_newer(v2, v1) and not is_newer(v2, v2)
    assert tier_of(v2, "a") == 1 and tier_of(v2, "b") is None and tier_of(None, "a") is None


def test_emulated_timing_follows_profile(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "t.yaml", "m", steps=(4, 2), latency={1: 0.2, 2: 0.3})
    registry = load_registry(path)
    settings = WorkerSettings(backend="emulated", tiers_file=path, emulated_latency_scale=1.0)
    backend = make_backend(settings, registry)
    steps: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> bool:
        steps.append((step, total))
        return True

    t0 = time.monotonic()
    out = backend.generate([_job(0, n=2), _job(1, n=2)], registry.tiers[0], on_step)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 0.6
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [len(pngs) for pngs in out] == [2, 2]
    image = Image.open(io.BytesIO(out[0][0]))
    assert image.format == "PNG" and image.size == (32, 32)
    assert out[0][0] != out[0][1]  # image index is part of the colour key
    # Tier 1 runs half the steps: half the latency, scaled by 0.5.
    half = EmulatedBackend(settings.model_copy(update={"emulated_latency_scale": 0.5}),
                           registry)
    t0 = time.monotonic()
    half.generate([_job(0)], registry.tiers[1], lambda s, t: True)
    assert 0.05 <= time.monotonic() - t0 < 0.25


def test_emulated_interrupt_stops_early(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "t.yaml", "m", steps=(10, 5), latency={1: 1.0})
    registry = load_registry(path)
    backend = make_backend(WorkerSettings(backend="emulated", tiers_file=path), registry)
    t0 = time.monotonic()
    out = backend.generate([_job(0)], registry.tiers[0], lambda step, total: step < 2)
    assert out == [] and time.monotonic() - t0 < 0.5


def test_emulated_without_profile_is_a_startup_error(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "t.yaml", "m", latency={1: 0.1}, device="a100")
    registry = load_registry(path)
    with pytest.raises(BackendError, match=r"tier\(s\) 0 \(exact\), 1 .*'cpu'"):
        make_backend(WorkerSettings(backend="emulated", device="cpu"), registry)
    # No delay asked for: no profile needed.
    make_backend(WorkerSettings(backend="emulated", emulated_latency_scale=0), registry)
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend(WorkerSettings(backend="nope"), registry)


def test_diffusers_backend_loads_the_world_pipeline_lazily(tmp_path: Path) -> None:
    """A ``model_index.json`` naming a non-diffusers class loads through ``world.pipeline``;
    a pipeline without width/height/num_images_per_prompt still serves n images."""
    torch = pytest.importorskip("torch")
    # Imported as untyped modules: world/ is another package's code, still in progress.
    world_pipeline = pytest.importorskip("world.pipeline")
    world_clip = pytest.importorskip("world.clip")
    world_unet = pytest.importorskip("world.unet")

    torch.manual_seed(0)
    torch.set_num_threads(1)
    clip = world_clip.WorldCLIP()
    pipe = world_pipeline.WorldPipeline(
        unet=world_unet.build_unet(clip.clip.transformer.width, tiny=True),
        scheduler=world_unet.sample_scheduler(), text_encoder=clip)
    pipe.save_pretrained(tmp_path / "world")
    registry = load_registry(write_registry(tmp_path / "t.yaml", tmp_path / "world"))
    backend = make_backend(WorkerSettings(backend="diffusers"), registry)
    steps: list[int] = []

    def on_step(step: int, total: int) -> bool:
        steps.append(step)
        return True

    out = backend.generate([_job(0, n=2), _job(1, n=2)], registry.tiers[0], on_step)
    assert steps == [1, 2, 3, 4] and [len(x) for x in out] == [2, 2]
    assert Image.open(io.BytesIO(out[1][1])).size == (32, 32)
    assert out[0][0] != out[0][1]  # image i is seeded with seed + i
    assert backend.generate([_job(0, n=2)], registry.tiers[1], lambda s, t: True)[0][0] \
        != out[0][0]  # fewer steps, other image; same pipeline (no reload)
    assert backend.model_switches == 1
    with pytest.raises(BackendError, match="32x32 images only"):
        backend.generate([_job(0, size=64)], registry.tiers[0], lambda s, t: True)


def test_diffusers_backend_serves_cache_tiers_refuses_bad_dtypes(tmp_path: Path) -> None:
    from common.tiers import Strategy, Tier
    from services.worker.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(WorkerSettings())
    missing = str(tmp_path / "no-such-model")
    cache = Tier(id=1, name="cache-10", strategy=Strategy.CACHE, model=missing, steps=20,
                 skip=10)
    with pytest.raises(BackendError, match="not found"):  # the model, not the strategy
        backend.prepare(cache)
    assert backend.model_switches == 0 and backend.loaded_model is None
    with pytest.raises(BackendError, match="unknown dtype 'fp8'"):
        DiffusersBackend(WorkerSettings(dtype="fp8"))


def test_emulated_model_switch_holds_the_worker_for_the_load_time(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "t.yaml", "m", steps=(10, 5), latency={1: 0.01})
    registry = load_registry(path)
    other = registry.tiers[1].model_copy(update={"model": "other", "load_time_s": 0.4})
    backend = EmulatedBackend(WorkerSettings(backend="emulated", tiers_file=path,
                                             emulated_latency_scale=0.5), registry)
    t0 = time.monotonic()
    backend.prepare(registry.tiers[0])  # the first model: already loaded at start
    backend.prepare(registry.tiers[0])  # same model: free
    assert time.monotonic() - t0 < 0.1
    backend.prepare(other)  # another model: 0.4 s x scale 0.5
    assert 0.18 <= time.monotonic() - t0 < 0.5
    assert backend.model_switches == 2 and backend.loaded_model == "other"
