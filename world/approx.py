"""How much quality cheaper generation loses, per prompt: the ``approx-report``.

Settings, all scored with the checker (and CLIP score) over several seeds per prompt:

* ``full``: N steps (the exact tier); ``reseed``: N steps with other seeds (noise floor);
* ``steps_N/2``, ``steps_N/4``: fewer DDIM steps from the same initial noise;
* ``nn_K`` (approximate caching): start from the latent after K of N steps of the prompt's
  nearest neighbour (tiny-CLIP text cosine, equal meanings excluded) in a bank of cached
  prompts (the other evaluation prompts plus training prompts), generated from the
  neighbour's own seeds (every prompt has distinct seeds), and run the
  remaining N−K steps conditioned on the prompt; K = N/4 and N/2;
* ``rand_K``: the same from a random other prompt (a control that must hurt).

Guarantees: everything is seeded (same arguments → same report); per-prompt comparisons are
made on the mean over seeds; "noise floor" is the distribution of |mean(full) −
mean(reseed)| over prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from world import scenes
from world.clip import encode_text
from world.evaluate import by_category, generate, prompt_seeds, score
from world.pipeline import DEFAULT_GUIDANCE, WorldPipeline, load_world_pipeline

log = logging.getLogger("world.approx")


def nearest_neighbours(
    pipe: WorldPipeline,
    prompts: Sequence[str],
    meanings: Sequence[scenes.Meaning],
    bank: Sequence[str],
    bank_meanings: Sequence[scenes.Meaning],
) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``bank`` of each prompt's most similar bank prompt of a different meaning,
    and that cosine similarity."""
    e = encode_text(pipe.text_encoder, list(prompts))
    b = encode_text(pipe.text_encoder, list(bank))
    sim = e @ b.T
    for i, m in enumerate(meanings):
        for j, bm in enumerate(bank_meanings):
            if bm == m:
                sim[i, j] = -np.inf
    idx = sim.argmax(1)
    return idx, sim[np.arange(len(prompts)), idx]


def _summary(
    name: str,
    cost: int,
    per_prompt: np.ndarray,
    clip: np.ndarray,
    full: np.ndarray,
    floor: float,
    meanings: Sequence[scenes.Meaning],
) -> dict[str, Any]:
    delta = per_prompt - full
    return {
        "setting": name,
        "unet_steps": cost,
        "checker_mean": float(per_prompt.mean()),
        "clip_mean": float(clip.mean()),
        "keep_frac": float((delta >= -1e-9).mean()),
        "lose_beyond_noise_frac": float((delta < -floor).mean()),
        "mean_delta": float(delta.mean()),
        "mean_abs_delta": float(np.abs(delta).mean()),
        "checker_by_category": by_category(per_prompt, meanings),
        "keep_by_category": by_category((delta >= -1e-9).astype(float), meanings),
    }


def approx_report(
    model: str | Path | None = None,
    n: int = 60,
    steps: int = 20,
    seeds: int = 4,
    seed: int = 0,
    guidance: float | None = None,
    bank: int = 120,
    pipe: WorldPipeline | None = None,
) -> dict[str, Any]:
    """Run every setting on ``n`` held-out prompts × ``seeds`` seeds; returns a JSON-ready
    report with one row per setting (``rows``), the noise floor and per-prompt deltas."""
    pipe = pipe or load_world_pipeline(model)
    g = DEFAULT_GUIDANCE if guidance is None else guidance
    pairs = scenes.heldout_captions(n, seed)
    prompts = [p for p, _ in pairs]
    ms = [m for _, m in pairs]
    extra = [(scenes.canonical_caption(m), m) for _, m in scenes.train_captions(bank, seed + 7)]
    bank_p = prompts + [p for p, _ in extra]
    bank_m = ms + [m for _, m in extra]
    ks = sorted({max(1, steps // 4), max(1, steps // 2)})
    s_ids = prompt_seeds(seed, len(bank_p), seeds)  # prompt-major; prompts come first

    def rep(xs: Sequence[Any]) -> list[Any]:
        return [x for x in xs for _ in range(seeds)]

    def run(
        ps: Sequence[str], n_steps: int, sd: Sequence[int] = s_ids, **kw: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        imgs, _ = generate(pipe, rep(ps), list(sd)[: len(ps) * seeds], n_steps, g, **kw)
        chk, cs, _ = score(pipe, imgs, rep(ps), rep(ms))
        return chk.reshape(len(ps), seeds).mean(1), cs.reshape(len(ps), seeds).mean(1)

    # Full runs of every bank prompt (the cache), capturing latents after K steps.
    bank_imgs, lat = generate(pipe, rep(bank_p), s_ids, steps, g, capture=ks)
    chk_b, cs_b, _ = score(pipe, bank_imgs[: n * seeds], rep(prompts), rep(ms))
    full = chk_b.reshape(n, seeds).mean(1)
    full_cs = cs_b.reshape(n, seeds).mean(1)
    log.info("full N=%d: %.3f", steps, full.mean())
    reseed, reseed_cs = run(prompts, steps, prompt_seeds(seed + 500, n, seeds))
    floor_d = np.abs(reseed - full)
    floor = float(np.quantile(floor_d, 0.9))
    rows = [
        _summary(f"full_N{steps}", steps, full, full_cs, full, floor, ms),
        _summary(f"reseed_N{steps}", steps, reseed, reseed_cs, full, floor, ms),
    ]
    per_prompt: dict[str, list[float]] = {"full": full.tolist()}
    for n_steps in sorted({max(1, steps // 2), max(1, steps // 4)}, reverse=True):
        c, cs = run(prompts, n_steps)
        rows.append(_summary(f"steps_N{n_steps}", n_steps, c, cs, full, floor, ms))
        per_prompt[f"steps_N{n_steps}"] = c.tolist()
    nn_idx, nn_sim = nearest_neighbours(pipe, prompts, ms, bank_p, bank_m)
    rng = np.random.default_rng(seed + 99)
    rand_idx = np.array([(i + 1 + rng.integers(len(bank_p) - 1)) % len(bank_p) for i in range(n)])
    for k in ks:
        lat_k = lat[k].view(len(bank_p), seeds, *lat[k].shape[1:])
        for name, idx in (("nn", nn_idx), ("rand", rand_idx)):
            if name == "rand" and k != max(ks):
                continue
            start = torch.cat([lat_k[j] for j in idx])
            c, cs = run(prompts, steps, start_latents=start, start_step=k)
            rows.append(_summary(f"{name}_K{k}", steps - k, c, cs, full, floor, ms))
            per_prompt[f"{name}_K{k}"] = c.tolist()
    for r in rows:
        log.info("%s", {k: v for k, v in r.items() if not isinstance(v, dict)})
    return {
        "n_prompts": n,
        "seeds_per_prompt": seeds,
        "steps": steps,
        "guidance": g,
        "noise_floor_mean_abs": float(floor_d.mean()),
        "noise_floor_q90": floor,
        "nn_similarity_mean": float(nn_sim.mean()),
        "rows": rows,
        "prompts": prompts,
        "nn_prompt": [bank_p[j] for j in nn_idx],
        "per_prompt_checker": per_prompt,
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of a report's rows."""
    head = (
        "| setting | UNet steps | checker | CLIP | keep | lose > noise | mean Δ |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['setting']} | {r['unet_steps']} | {r['checker_mean']:.3f} | "
        f"{r['clip_mean']:.1f} | {r['keep_frac']:.2f} | {r['lose_beyond_noise_frac']:.2f} "
        f"| {r['mean_delta']:+.3f} |"
        for r in report["rows"]
    ]
    return head + "\n".join(lines) + "\n"
