"""The diffusers backend's cache tiers on the world pipeline, SD and SDXL: hits resume
from the cached latent (own latent -> the exact image), misses run the full schedule,
full runs populate the cache; steps and model tiers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from common.messages import ClassifiedJob
from common.settings import WorkerSettings
from common.tiers import Registry, load_registry
from services.worker.backends.diffusers_backend import DiffusersBackend
from services.worker.cache import prompt_id
from tests.tinysd import build_tiny_sd, build_tiny_sdxl, build_tiny_world, write_world_registry

torch.set_num_threads(1)
N = 6


def job(prompt: str, seed: int = 1, size: int = 32, n: int = 1, **kw: Any) -> ClassifiedJob:
    return ClassifiedJob(job_id=f"{prompt}-{seed}", prompt=prompt, seed=seed, width=size,
                         height=size, n=n, tier=0, predicted_tier=0, **kw)


def keep_going(_i: int, _t: int) -> bool:
    return True


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_world(tmp_path_factory.mktemp("world") / "pipe")


@pytest.fixture
def make(redis_url: str, tmp_path: Path) -> Callable[..., tuple[DiffusersBackend, Registry]]:
    def _make(model: Path, **settings: Any) -> tuple[DiffusersBackend, Registry]:
        reg = load_registry(write_world_registry(tmp_path / "t.yaml", model, steps=N,
                                                 skips=(2, 4), fewer=(3,)))
        s = WorkerSettings(**{"redis_url": redis_url, **settings})
        return DiffusersBackend(s, reg), reg

    return _make


class Calls:
    def __init__(self, backend: DiffusersBackend, reg: Registry) -> None:
        self.n = 0
        backend._pipeline(reg.tier(0)).unet.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.n += 1


def test_world_miss_runs_full_then_own_latent_hit_is_exact(make: Any, world_dir: Path) -> None:
    backend, reg = make(world_dir)
    exact, cache4 = reg.tier(0), reg.tier(2)
    calls = Calls(backend, reg)
    first = backend.generate([job("a red circle")], cache4, keep_going)
    d = backend.last_details[0]
    assert d["cache"] == "miss" and d["reason"] == "cache empty" and calls.n == N
    ref = backend.generate([job("a red circle")], exact, keep_going)
    assert first == ref  # a miss is the exact generation, bit for bit
    calls.n = 0
    hit = backend.generate([job("a red circle")], cache4, keep_going)
    d = backend.last_details[0]
    assert d["cache"] == "hit" and d["k_used"] == 4 and d["similarity"] == pytest.approx(1.0)
    assert d["neighbor"] == prompt_id("a red circle") and d["neighbor_prompt"] == "a red circle"
    assert calls.n == N - 4 and hit == ref  # own latent: identical PNG bytes


def test_world_neighbour_hit_batch_and_misses(make: Any, world_dir: Path) -> None:
    backend, reg = make(world_dir, cache_min_similarity=-1.0)  # random CLIP: any sim
    backend.generate([job("a red circle"), job("two blue squares", 2)], reg.tier(0),
                     keep_going)
    cache2 = reg.tier(1)
    jobs = [job("a red circle on the left", 5), job("three green triangles", 7)]
    out = backend.generate(jobs, cache2, keep_going)
    assert [len(x) for x in out] == [1, 1]
    d = backend.last_details
    assert d[0]["cache"] == "hit" and d[0]["k_used"] == 2 and -1 <= d[0]["similarity"] <= 1
    assert d[0]["neighbor"] in {prompt_id("a red circle"), prompt_id("two blue squares")}
    assert d[1]["cache"] == "hit"
    out = backend.generate([job("a red circle", 6, n=2)], cache2, keep_going)
    assert len(out[0]) == 2 and out[0][0] != out[0][1]
    assert backend.last_details[0]["reason"] == "n > 1 images"
    # The classifier's neighbour is used when it is cached.
    pid = prompt_id("two blue squares")
    backend.generate([job("a red circle on the left", 5, cache_neighbor=pid,
                          cache_similarity=0.9)], cache2, keep_going)
    assert backend.last_details[0]["neighbor"] == pid
    assert backend.last_details[0]["similarity"] == 0.9


def test_low_similarity_and_unreachable_cache_are_misses(make: Any, world_dir: Path) -> None:
    backend, reg = make(world_dir, cache_min_similarity=1.0)
    backend.generate([job("a red circle")], reg.tier(0), keep_going)
    backend.generate([job("two blue squares")], reg.tier(1), keep_going)
    assert backend.last_details[0]["reason"] == "similarity below minimum"
    down, _ = make(world_dir, redis_url="redis://127.0.0.1:1/0")
    out = down.generate([job("a red circle")], reg.tier(1), keep_going)
    assert len(out) == 1 and down.last_details[0]["cache"] == "miss"
    assert down.last_details[0]["reason"].startswith("cache error")


def test_steps_tier_is_free_model_tier_counts_a_load(make: Any, world_dir: Path) -> None:
    backend, reg = make(world_dir)
    backend.generate([job("a red circle")], reg.tier(0), keep_going)
    assert backend.model_switches == 1 and backend.last_details[0]["model_loaded_now"]
    calls = Calls(backend, reg)
    backend.generate([job("a red circle")], reg.tier(3), keep_going)  # steps-3
    assert backend.model_switches == 1 and calls.n == 3
    assert not backend.last_details[0]["model_loaded_now"]
    backend.generate([job("a red circle")], reg.tier(4), keep_going)  # model tier
    d = backend.last_details[0]
    assert backend.model_switches == 2 and d["model_loaded_now"] and d["model_load_s"] > 0


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_sdxl])
def test_sd_and_sdxl_cache_tier_own_latent_is_exact(
        make: Any, tmp_path_factory: pytest.TempPathFactory,
        builder: Callable[[Path], Path]) -> None:
    model = builder(tmp_path_factory.mktemp("m") / "pipe")
    backend, reg = make(model, cache_min_similarity=-1.0)
    calls = Calls(backend, reg)
    ref = backend.generate([job("a photo of a cat", size=64)], reg.tier(0), keep_going)
    assert calls.n == N
    calls.n = 0
    hit = backend.generate([job("a photo of a cat", size=64)], reg.tier(2), keep_going)
    assert backend.last_details[0]["cache"] == "hit" and calls.n == N - 4
    assert hit == ref
    calls.n = 0
    backend.generate([job("a photo of a dog", size=64)], reg.tier(2), keep_going)
    assert backend.last_details[0]["cache"] == "hit" and calls.n == N - 4


def test_model_with_cache_tiers_is_served_with_ddim(make: Any, tmp_path: Path) -> None:
    import diffusers

    d: Any = diffusers
    src = build_tiny_sd(tmp_path / "sd")
    pipe = d.StableDiffusionPipeline.from_pretrained(src)
    pipe.scheduler = d.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "euler")
    backend, reg = make(tmp_path / "euler", cache_min_similarity=-1.0)
    assert isinstance(backend.pipeline(reg.tier(0)).scheduler, d.DDIMScheduler)
    ref = backend.generate([job("a photo of a cat", size=64)], reg.tier(0), keep_going)
    assert backend.generate([job("a photo of a cat", size=64)], reg.tier(1), keep_going) == ref
