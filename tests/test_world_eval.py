"""Evaluation helpers and the approximation report run end to end on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from world.approx import approx_report, format_table
from world.clip import WorldCLIP, tiny_clip_config
from world.evaluate import contact_sheet, evaluate, generate
from world.pipeline import WorldPipeline
from world.unet import build_unet, sample_scheduler

TINY_CLIP = tiny_clip_config()


@pytest.fixture(scope="module")
def pipe() -> WorldPipeline:
    torch.manual_seed(0)
    p = WorldPipeline(
        unet=build_unet(16, tiny=True).eval(),
        scheduler=sample_scheduler(),
        text_encoder=WorldCLIP(model_cfg=TINY_CLIP).eval(),
    )
    p.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return p


def test_generation_independent_of_batch(pipe: WorldPipeline) -> None:
    prompts = ["a red circle", "two blue squares", "a green triangle on the left"]
    a, _ = generate(pipe, prompts, [1, 2, 3], 3, batch_size=3)
    b, _ = generate(pipe, prompts, [1, 2, 3], 3, batch_size=1)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_evaluate_keys(pipe: WorldPipeline, tmp_path: object) -> None:
    res = evaluate(pipe=pipe, n=6, steps=2, seed=0, seeds_per_prompt=1)
    assert 0.0 <= res["checker_mean"] <= 1.0
    for c in (
        "single_object",
        "position",
        "counting",
        "two_objects",
        "relation",
        "attribute_binding",
    ):
        assert f"checker_{c}" in res
    assert res["latency_s"] > 0


def test_approx_report_runs(pipe: WorldPipeline) -> None:
    rep = approx_report(pipe=pipe, n=6, steps=4, seeds=2, bank=4)
    names = [r["setting"] for r in rep["rows"]]
    assert names == ["full_N4", "reseed_N4", "steps_N2", "steps_N1", "nn_K1", "nn_K2", "rand_K2"]
    assert all(p != q for p, q in zip(rep["prompts"], rep["nn_prompt"], strict=True))
    assert "| full_N4 |" in format_table(rep)


def test_contact_sheet() -> None:
    imgs = np.full((3, 32, 32, 3), 255, np.uint8)
    sheet = contact_sheet(
        ["a", "b b b b b b b b b b b b b b b b b b b b b b b b", "c"], imgs, [1.0, 0.5, 0.0], cols=2
    )
    assert sheet.size[0] == 2 * (32 * 4 + 8) and sheet.size[1] > 2 * 128
