"""Skip-K resume (approximate caching's mechanism) on the world pipeline, SD and SDXL:
resuming a prompt from its own latent after K steps reproduces the full run exactly, and
the denoiser runs exactly N - K times."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from services.worker.generation import ResumeError, run_pipeline, skip_scheduler
from tests.tinysd import build_tiny_sd, build_tiny_sdxl, tiny_world_pipeline

# One thread: on a shared 2-core machine two torch threads thrash (20x slower).
torch.set_num_threads(1)
N = 6
PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def world() -> Any:
    return tiny_world_pipeline()


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import diffusers

    path = build_tiny_sd(tmp_path_factory.mktemp("sd") / "p")
    pipe = cast(Any, diffusers).StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import diffusers

    path = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "p")
    pipe = cast(Any, diffusers).StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetCalls:
    """Counts forward calls of a pipeline's UNet (a forward hook)."""

    def __init__(self, pipe: Any) -> None:
        self.n = 0
        self.handle = pipe.unet.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.n += 1


@pytest.fixture
def counter(request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[UNetCalls] = []

    def make(pipe: Any) -> UNetCalls:
        made.append(UNetCalls(pipe))
        return made[-1]

    yield make
    for c in made:
        c.handle.remove()


def gens(seed: int = 0, n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("name,guidance,k", [
    ("world", 1.0, 1), ("world", 2.0, 3), ("sd", 1.0, 2), ("sd", 3.0, 3),
    ("sdxl", 1.0, 2), ("sdxl", 3.0, 3)])
def test_own_latent_resume_is_exact_and_runs_n_minus_k_steps(
        request: pytest.FixtureRequest, counter: Any, name: str, guidance: float,
        k: int) -> None:
    pipe = request.getfixturevalue(name)
    size: dict[str, Any] = {"width": 64, "height": 64} if name != "world" else {}
    calls = counter(pipe)
    full, cap = run_pipeline(pipe, PROMPTS, steps=N, guidance=guidance, generators=gens(),
                             capture=[k], output_type="np", **size)
    assert calls.n == N and set(cap) == {k}
    calls.n = 0
    steps_seen: list[tuple[int, int]] = []

    def seen(i: int, t: int) -> bool:
        steps_seen.append((i, t))
        return True

    resumed, _ = run_pipeline(pipe, PROMPTS, steps=N, guidance=guidance, latents=cap[k],
                              start_step=k, output_type="np",
                              on_step=seen,
                              **size)
    assert calls.n == N - k  # CFG batches both halves into one UNet call
    assert steps_seen == [(i, N - k) for i in range(1, N - k + 1)]
    assert np.abs(np.asarray(resumed) - np.asarray(full)).max() == 0.0
    # Another prompt from the same latent: a different image (the prompt conditions).
    other, _ = run_pipeline(pipe, ["three green triangles", "a yellow square"], steps=N,
                            guidance=guidance, latents=cap[k], start_step=k,
                            output_type="np", **size)
    assert np.abs(np.asarray(other) - np.asarray(full)).max() > 0


def test_scheduler_restored_and_config_untouched(sd: Any) -> None:
    before = type(sd.scheduler), dict(sd.config)
    _, cap = run_pipeline(sd, PROMPTS[:1], steps=4, guidance=1.0, generators=gens(n=1),
                          capture=[2], output_type="latent", width=64, height=64)
    run_pipeline(sd, PROMPTS[:1], steps=4, guidance=1.0, latents=cap[2], start_step=2,
                 output_type="latent", width=64, height=64)
    assert (type(sd.scheduler), dict(sd.config)) == before


def test_non_ddim_scheduler_is_refused(sd: Any) -> None:
    import diffusers

    euler = cast(Any, diffusers).EulerDiscreteScheduler.from_config(sd.scheduler.config)
    with pytest.raises(ResumeError, match="DDIM"):
        skip_scheduler(euler, 2)
    with pytest.raises(ResumeError):
        run_pipeline(sd, PROMPTS, steps=4, guidance=1.0, start_step=2)


def test_skip_scheduler_drops_first_k_timesteps(sd: Any) -> None:
    sd.scheduler.set_timesteps(10)
    full = sd.scheduler.timesteps.clone()
    sk = skip_scheduler(sd.scheduler, 4)
    sk.set_timesteps(10)
    assert torch.equal(sk.timesteps, full[4:]) and sk.num_inference_steps == 10


def test_tiny_sdxl_is_sdxl(tmp_path: Path) -> None:
    import json

    path = build_tiny_sdxl(tmp_path / "x")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert "text_encoder_2" in index and "tokenizer_2" in index
