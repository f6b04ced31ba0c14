"""WorldPipeline semantics the serving system relies on (tiny random-weight model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from world.clip import WorldCLIP, clip_score, encode_text, text_states, tiny_clip_config
from world.pipeline import DEFAULT_PATH, WorldPipeline, load_world_pipeline
from world.unet import build_unet, sample_scheduler

TINY_CLIP = tiny_clip_config()
PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def pipe() -> WorldPipeline:
    torch.manual_seed(0)
    clip = WorldCLIP(model_cfg=TINY_CLIP).eval()
    unet = build_unet(16, tiny=True).eval()
    p = WorldPipeline(unet=unet, scheduler=sample_scheduler(), text_encoder=clip)
    p.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return p


def noise(b: int = 2) -> torch.Tensor:
    return torch.randn((b, 3, 32, 32), generator=torch.Generator().manual_seed(1))


def test_clip_helpers(pipe: WorldPipeline) -> None:
    te = pipe.text_encoder
    e = encode_text(te, ["a red circle", "some unknown words entirely"])
    assert e.shape == (2, 16) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert text_states(te, PROMPTS).shape == (2, 24, 16)
    ids = te.tokenizer("zebra " * 50)
    assert ids.shape == (1, 24) and int(ids[0, -1]) == te.tokenizer.eot
    s = clip_score(te, np.full((2, 32, 32, 3), 255, np.uint8), PROMPTS)
    assert s.shape == (2,) and np.all(np.abs(s) <= 100.0001)


def test_outputs_and_determinism(pipe: WorldPipeline) -> None:
    a = pipe(PROMPTS, num_inference_steps=4, latents=noise(), output_type="np").images
    b = pipe(PROMPTS, num_inference_steps=4, latents=noise(), output_type="np").images
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.float32 and (a == b).all()
    pil = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images
    assert pil[0].size == (32, 32)
    lat = pipe(PROMPTS, num_inference_steps=2, output_type="latent").images
    assert lat.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_start_step_resume_is_exact(pipe: WorldPipeline, guidance: float) -> None:
    n, k = 8, 3
    seen: dict[int, torch.Tensor] = {}

    def cb(p: WorldPipeline, i: int, t: torch.Tensor, kw: dict[str, torch.Tensor]) -> None:
        seen[i] = kw["latents"].clone()

    full = pipe(
        PROMPTS,
        num_inference_steps=n,
        guidance_scale=guidance,
        latents=noise(),
        callback_on_step_end=cb,
        output_type="np",
    ).images
    assert sorted(seen) == list(range(n))
    seen_resume: dict[int, torch.Tensor] = {}

    def cb2(p: WorldPipeline, i: int, t: torch.Tensor, kw: dict[str, torch.Tensor]) -> None:
        seen_resume[i] = kw["latents"].clone()

    part = pipe(
        PROMPTS,
        num_inference_steps=n,
        guidance_scale=guidance,
        latents=seen[k - 1],
        start_step=k,
        callback_on_step_end=cb2,
        output_type="np",
    ).images
    assert sorted(seen_resume) == list(range(k, n))
    assert np.abs(full - part).max() == 0.0


def test_callback_can_replace_latents(pipe: WorldPipeline) -> None:
    def cb(
        p: WorldPipeline, i: int, t: torch.Tensor, kw: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"latents": torch.full_like(kw["latents"], 1.0)}

    out = pipe(
        PROMPTS, num_inference_steps=3, latents=noise(), callback_on_step_end=cb, output_type="np"
    ).images
    assert np.allclose(out, 1.0)


def test_interrupt_stops_between_steps(pipe: WorldPipeline) -> None:
    steps: list[int] = []

    def cb(p: WorldPipeline, i: int, t: torch.Tensor, kw: dict[str, torch.Tensor]) -> None:
        steps.append(i)
        if i == 2:
            p._interrupt = True

    pipe(PROMPTS, num_inference_steps=10, latents=noise(), callback_on_step_end=cb)
    assert steps == [0, 1, 2] and pipe.interrupt
    pipe(PROMPTS, num_inference_steps=2, latents=noise())  # reset at the start of a call
    assert not pipe.interrupt


def test_save_load_round_trip(pipe: WorldPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(str(tmp_path / "p"))
    loaded = load_world_pipeline(tmp_path / "p")
    a = pipe(PROMPTS, num_inference_steps=3, latents=noise(), output_type="np").images
    b = loaded(PROMPTS, num_inference_steps=3, latents=noise(), output_type="np").images
    assert np.abs(a - b).max() == 0.0
    assert loaded.text_encoder.tokenizer.vocab == pipe.text_encoder.tokenizer.vocab


@pytest.mark.skipif(
    not (DEFAULT_PATH / "model_index.json").exists(),
    reason="committed world model not exported yet",
)
def test_committed_model_generates() -> None:
    p = load_world_pipeline()
    img = p("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
