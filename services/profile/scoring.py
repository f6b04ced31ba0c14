"""Prompt sets and image scorers of the quality profile.

Default prompt set (small world), ``default_prompts(n)``: every distinct held-out
combination of the world (its canonical caption; 501 of them, never seen in training),
then distinct training captions (varied templates, ``train_captions(., seed=1)``) until
``n``. Default cache bank, ``default_bank(b, exclude)``: ``b`` further distinct training
captions (``seed=2``), none equal to a prompt of the set: the prompts whose latents the
cache holds when the profiled prompts arrive.

Scorers return per-image arrays: ``clip`` (100 x cosine of image and prompt embedding:
the DESIGN's quality metric) and, for the world, ``checker`` (share of the prompt's
constraints the image satisfies, NaN for a prompt the world's grammar cannot parse).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Prompt = tuple[str, Any]
"""(text, world meaning or None)."""


def stable_seed(prompt: str, index: int) -> int:
    """Seed ``index`` of a prompt: sha1 of the text plus 7919 x index, below 2**31.

    Per-prompt seeds: a cached neighbour's run never shares a prompt's starting noise.
    """
    base = int(hashlib.sha1(prompt.encode()).hexdigest()[:8], 16)
    return (base + 7919 * index) % (2**31)


def default_prompts(n: int) -> list[Prompt]:
    """The small world's default profiling prompts (see module docstring)."""
    from world import scenes

    out: list[Prompt] = []
    seen: set[str] = set()
    for cat in scenes.CATEGORIES:
        for m in scenes.heldout_combinations(cat):
            text = scenes.canonical_caption(m)
            if text not in seen:
                seen.add(text)
                out.append((text, m))
    out = out[:n]
    draw = 0
    while len(out) < n:
        draw += 1
        for text, m in scenes.train_captions(4 * n, seed=draw):
            if text not in seen:
                seen.add(text)
                out.append((text, m))
                if len(out) == n:
                    break
    return out


def default_bank(b: int, exclude: set[str]) -> list[Prompt]:
    """``b`` distinct training captions (seed 2) that are not in ``exclude``."""
    from world import scenes

    out: list[Prompt] = []
    seen = set(exclude)
    draw = 1
    while len(out) < b:
        draw += 1
        for text, m in scenes.train_captions(4 * b, seed=draw * 1000 + 2):
            if text not in seen:
                seen.add(text)
                out.append((text, m))
                if len(out) == b:
                    break
    return out


def prompts_from_file(path: Path) -> list[Prompt]:
    """One prompt per non-empty line (first tab-separated column); world meanings are
    parsed when the text fits the world's grammar."""
    from world.scenes import parse_caption

    texts = [ln.split("\t")[0].strip() for ln in path.read_text().splitlines()]
    return [(t, parse_caption(t)) for t in dict.fromkeys(t for t in texts if t)]


class Scorer(Protocol):
    """Scores generated images against their prompts."""

    metrics: tuple[str, ...]

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
        """``{metric: float array}`` for uint8 ``B x H x W x 3`` images."""
        ...


class WorldScorer:
    """The world's checker and its tiny CLIP's score."""

    metrics: tuple[str, ...] = ("clip", "checker")

    def __init__(self, clip: Any) -> None:
        self.clip = clip

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
        """CLIP score and checker score per image."""
        from world.checker import check
        from world.clip import clip_score

        clip = clip_score(self.clip, images, [p for p, _ in prompts])
        chk = np.array([check(im, m).score if m is not None else np.nan
                        for im, (_, m) in zip(images, prompts, strict=True)], np.float64)
        return {"clip": np.asarray(clip, np.float64), "checker": chk}


class OpenClipScorer:
    """CLIP score with an open_clip model (for real models): ``100 x cos``."""

    metrics: tuple[str, ...] = ("clip",)

    def __init__(self, name: str, pretrained: str | None = None, device: str = "cpu") -> None:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
        """CLIP score per image."""
        import PIL.Image
        import torch

        x = torch.stack([self.preprocess(PIL.Image.fromarray(im)) for im in images])
        t = self.tokenizer([p for p, _ in prompts])
        with torch.inference_mode():
            a = self.model.encode_image(x.to(self.device)).float()
            b = self.model.encode_text(t.to(self.device)).float()
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return {"clip": (100.0 * (a * b).sum(-1)).cpu().numpy().astype(np.float64)}


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline ``np`` output (float [0, 1] B x H x W x 3) or PIL list -> uint8 array."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return images
        out: np.ndarray = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return out
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.uint8)
