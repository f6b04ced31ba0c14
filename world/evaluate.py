"""Evaluation of the world model: seeded batched generation, checker and CLIP scores per
category, latency, and contact sheets.

Guarantees: the initial noise of an image depends only on its seed (:func:`initial_noise`),
never on the batch it is generated in, so settings are compared seed for seed.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from world import scenes
from world.checker import check
from world.clip import clip_score
from world.pipeline import DEFAULT_GUIDANCE, WorldPipeline, load_world_pipeline, to_uint8

log = logging.getLogger("world.evaluate")


def initial_noise(seed: int) -> torch.Tensor:
    """The 1×3×32×32 starting noise of seed ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, 3, scenes.SIZE, scenes.SIZE), generator=g)


def prompt_seeds(base: int, n_prompts: int, per_prompt: int) -> list[int]:
    """Distinct noise seeds, ``per_prompt`` for each of ``n_prompts`` prompts, flattened
    prompt-major. No two prompts share a starting noise, so a setting's mean over prompts
    is not dominated by a few lucky or unlucky noise patterns."""
    return [
        (base * 1_000_003 + i * 1_009 + k) % 2**31
        for i in range(n_prompts)
        for k in range(per_prompt)
    ]


def generate(
    pipe: WorldPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 128,
    start_latents: torch.Tensor | None = None,
    start_step: int = 0,
    capture: Sequence[int] = (),
) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """Generate one image per (prompt, seed) pair; returns uint8 ``B×32×32×3`` images and
    the latents after each step count in ``capture`` (``{K: B×3×32×32}``).

    ``start_latents`` (with ``start_step``) replaces the seeded noise.
    """
    assert len(prompts) == len(seeds)
    images: list[np.ndarray] = []
    caps: dict[int, list[torch.Tensor]] = defaultdict(list)
    for b in range(0, len(prompts), batch_size):
        ps = list(prompts[b : b + batch_size])
        if start_latents is not None:
            lat = start_latents[b : b + batch_size]
        else:
            lat = torch.cat([initial_noise(s) for s in seeds[b : b + batch_size]])

        def cb(_p: Any, i: int, _t: Any, kw: dict[str, torch.Tensor]) -> None:
            if i + 1 in capture:
                caps[i + 1].append(kw["latents"].clone())

        out = pipe(
            ps,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=lat,
            start_step=start_step,
            output_type="np",
            callback_on_step_end=cb if capture else None,
        ).images
        images.append(to_uint8(out))
    return np.concatenate(images), {k: torch.cat(v) for k, v in caps.items()}


def score(
    pipe: WorldPipeline,
    images: np.ndarray,
    prompts: Sequence[str],
    meanings: Sequence[scenes.Meaning],
) -> tuple[np.ndarray, np.ndarray, list[dict[str, bool]]]:
    """(checker scores, CLIP scores, per-constraint results) of generated images."""
    res = [check(im, m) for im, m in zip(images, meanings, strict=True)]
    cs = clip_score(pipe.text_encoder, images, list(prompts))
    return np.array([r.score for r in res]), cs, [r.constraints for r in res]


def by_category(values: np.ndarray, meanings: Sequence[scenes.Meaning]) -> dict[str, float]:
    """Mean of ``values`` per category (categories present only)."""
    out: dict[str, list[float]] = defaultdict(list)
    for v, m in zip(values, meanings, strict=True):
        out[m.category].append(float(v))
    return {c: float(np.mean(out[c])) for c in scenes.CATEGORIES if c in out}


def constraint_rates(results: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Pass rate per constraint kind (colour, shape, count, size, position, relation)."""
    acc: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        for k, v in r.items():
            acc[k.split(":")[0]].append(v)
    return {k: float(np.mean(v)) for k, v in sorted(acc.items())}


def latency(pipe: WorldPipeline, steps: int, guidance: float, repeats: int = 5) -> float:
    """Median wall time (s) of one single-prompt call at ``steps`` steps."""
    ts = []
    pipe(["a red circle"], num_inference_steps=2, output_type="np")  # warm-up
    for i in range(repeats):
        t = time.perf_counter()
        pipe(
            ["a red circle on the left"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=initial_noise(i),
            output_type="np",
        )
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def evaluate(
    model: str | Path | None = None,
    n: int = 120,
    steps: int = 20,
    seed: int = 0,
    guidance: float | None = None,
    seeds_per_prompt: int = 1,
    sheet: str | None = None,
    pipe: WorldPipeline | None = None,
) -> dict[str, Any]:
    """Checker and CLIP scores on ``n`` held-out prompts (stratified by category) with
    ``seeds_per_prompt`` seeds each. JSON-ready dict: ``checker_mean``, ``clip_mean``,
    ``checker_<category>``, ``clip_<category>``, ``constraint_<kind>``, ``latency_s``."""
    pipe = pipe or load_world_pipeline(model)
    g = DEFAULT_GUIDANCE if guidance is None else guidance
    pairs = scenes.heldout_captions(n, seed)
    prompts = [p for p, _ in pairs for _ in range(seeds_per_prompt)]
    ms = [m for _, m in pairs for _ in range(seeds_per_prompt)]
    seeds = prompt_seeds(seed, len(pairs), seeds_per_prompt)
    t0 = time.perf_counter()
    images, _ = generate(pipe, prompts, seeds, steps, g)
    gen_s = time.perf_counter() - t0
    chk, cs, res = score(pipe, images, prompts, ms)
    out: dict[str, Any] = {
        "n_prompts": n,
        "seeds_per_prompt": seeds_per_prompt,
        "steps": steps,
        "guidance": g,
        "checker_mean": float(chk.mean()),
        "clip_mean": float(cs.mean()),
        "perfect_frac": float((chk == 1.0).mean()),
    }
    for c, v in by_category(chk, ms).items():
        out[f"checker_{c}"] = v
    for c, v in by_category(cs, ms).items():
        out[f"clip_{c}"] = v
    for k, v in constraint_rates(res).items():
        out[f"constraint_{k}"] = v
    out["batch_gen_s_per_image"] = gen_s / len(prompts)
    out["latency_s"] = latency(pipe, steps, g)
    if sheet:
        n_sheet = min(len(pairs), 24)
        idx = [i * seeds_per_prompt for i in range(n_sheet)]
        contact_sheet([prompts[i] for i in idx], images[idx], [float(chk[i]) for i in idx]).save(
            sheet
        )
        out["sheet"] = sheet
    return out


def contact_sheet(
    prompts: Sequence[str],
    images: Sequence[Any] | np.ndarray,
    scores: Sequence[float] | None = None,
    cols: int = 6,
    scale: int = 4,
) -> PIL.Image.Image:
    """A grid of images (upscaled ``scale``×, nearest) with their prompt (and score) below."""
    arr = to_uint8(images) if not isinstance(images, np.ndarray) else images
    if arr.dtype != np.uint8:
        arr = to_uint8(arr)
    cell_w, img_h, text_h = scenes.SIZE * scale + 8, scenes.SIZE * scale, 44
    rows = (len(prompts) + cols - 1) // cols
    sheet = PIL.Image.new("RGB", (cols * cell_w, max(1, rows) * (img_h + text_h)), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for i, (p, im) in enumerate(zip(prompts, arr, strict=True)):
        x, y = (i % cols) * cell_w + 4, (i // cols) * (img_h + text_h)
        sheet.paste(
            PIL.Image.fromarray(im).resize((img_h, img_h), PIL.Image.Resampling.NEAREST), (x, y)
        )
        words, lines, cur = p.split(), [], ""
        for w in words:
            if len(cur) + len(w) + 1 > 22 and cur:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        if scores is not None:
            lines = [*lines[:2], f"checker {scores[i]:.2f}"]
        for j, line in enumerate(lines[:3]):
            draw.text((x, y + img_h + 2 + 13 * j), line, fill="black")
    return sheet


def write_sheet(
    model: str | Path | None,
    prompts: Sequence[str] | None,
    out: Path,
    n: int = 12,
    steps: int = 20,
    seed: int = 0,
    guidance: float | None = None,
) -> Path:
    """Generate images for ``prompts`` (default: ``n`` held-out prompts) and save a sheet."""
    pipe = load_world_pipeline(model)
    g = DEFAULT_GUIDANCE if guidance is None else guidance
    ps = list(prompts) if prompts else [p for p, _ in scenes.heldout_captions(n, seed)]
    images, _ = generate(pipe, ps, [seed + i for i in range(len(ps))], steps, g)
    ms = [scenes.parse_caption(p) for p in ps]
    sc = [check(im, m).score if m else float("nan") for im, m in zip(images, ms, strict=True)]
    contact_sheet(ps, images, sc).save(out)
    return out


def guidance_sweep(
    pipe: WorldPipeline,
    n: int,
    guidances: Sequence[float],
    steps_list: Sequence[int],
    seed: int = 0,
    seeds_per_prompt: int = 2,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean checker / CLIP for each (guidance, steps) on held-out prompts."""
    pairs = scenes.heldout_captions(n, seed)
    prompts = [p for p, _ in pairs for _ in range(seeds_per_prompt)]
    ms = [m for _, m in pairs for _ in range(seeds_per_prompt)]
    seeds = prompt_seeds(seed, len(pairs), seeds_per_prompt)
    out: dict[str, dict[str, float]] = {}
    for g in guidances:
        for s in steps_list:
            images, _ = generate(pipe, prompts, seeds, s, g)
            chk, cs, _ = score(pipe, images, prompts, ms)
            out[f"g{g}_n{s}"] = {"checker": float(chk.mean()), "clip": float(cs.mean())}
            if log_fn:
                log_fn(f"g{g} n{s}: {out[f'g{g}_n{s}']}")
    return out
