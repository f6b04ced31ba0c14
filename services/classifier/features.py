"""Features of the tier classifier: a prompt's CLIP text embedding, what the approximate
cache offers for it, and cheap prompt statistics.

Embedders (one small interface, :class:`Embedder`), named by a *spec* string:

- ``world`` / ``world:PATH``: the small world's CLIP text tower (``world.clip``). PATH is
  a pipeline directory (its ``text_encoder``) or a ``WorldCLIP`` directory; default
  ``models/world/pipeline``.
- ``open_clip:MODEL[:PRETRAINED]``: any open_clip model, PRETRAINED a tag
  (``laion2b_s34b_b79k``) or a local checkpoint file; no tag: random weights (tests only).

Guarantees:
- ``Embedder.embed`` returns float32 ``B x D`` rows of unit L2 norm, deterministic for a
  given model (eval mode), ``D == embedder.dim``.
- :func:`build_features` returns float32 ``B x (D + 2 + len(STAT_NAMES))`` in the fixed
  column order of :func:`feature_names`: embedding, cache (top-1 similarity, best K
  available / N; both 0 with no cache or no neighbour), prompt statistics.

Training data (the labels' side): :func:`read_table` reads the per-prompt quality table
of ``argus profile quality`` (``services.profile.quality.COLUMNS``); :func:`safety` and
:func:`labels` turn relative quality into per-tier safety and the cheapest safe tier;
:func:`group_of` names the split group of a prompt (``services.classifier.train``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.settings import REPO_ROOT
from common.tiers import Registry

DEFAULT_EMBEDDER = "world"
DEFAULT_WORLD_PATH = REPO_ROOT / "models" / "world" / "pipeline"
STAT_NAMES = ("chars", "words", "digits", "commas", "conjunctions")
CACHE_NAMES = ("cache_similarity", "cache_best_k_frac")
_WORD = re.compile(r"[A-Za-z]+|\d+")
_CONJ = {"and", "with", "above", "below", "under", "beside", "next", "of"}


class Embedder(Protocol):
    """Prompt text -> unit vectors; ``name`` identifies the embedding space."""

    name: str
    dim: int

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 ``B x dim`` embeddings."""
        ...


def _unit(x: Any) -> np.ndarray:
    arr = np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x,
                     dtype=np.float32)
    out: np.ndarray = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


class WorldClipEmbedder:
    """The world's CLIP text tower (``world.clip.encode_text``)."""

    def __init__(self, clip: Any, name: str = "world", source: str = "") -> None:
        self.clip = clip
        self.name = name
        self.source = source  # the CLIP directory it was loaded from
        self.dim = int(clip.clip.text_projection.shape[1])

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit float32 embeddings; an empty batch gives ``0 x dim``."""
        if not prompts:
            return np.zeros((0, self.dim), np.float32)
        from world.clip import encode_text

        return _unit(encode_text(self.clip, list(prompts)))


class OpenClipEmbedder:
    """An open_clip model's text tower (``encode_text``)."""

    def __init__(self, model_name: str, pretrained: str | None = None) -> None:
        import open_clip
        import torch

        model, _, _ = open_clip.create_model_and_transforms(model_name,
                                                            pretrained=pretrained or None)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"open_clip:{model_name}:{pretrained or ''}"
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[1])

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit float32 embeddings; an empty batch gives ``0 x dim``."""
        import torch

        if not prompts:
            return np.zeros((0, self.dim), np.float32)
        with torch.no_grad():
            return _unit(self.model.encode_text(self.tokenizer(list(prompts))))


def load_embedder(spec: str) -> Embedder:
    """The embedder named by ``spec`` (module docstring).

    Raises:
        ValueError: Unknown spec kind, or a world path holding no CLIP.
    """
    kind, _, rest = spec.partition(":")
    if kind == "world":
        path = Path(rest) if rest else DEFAULT_WORLD_PATH
        if not path.is_absolute():
            path = REPO_ROOT / path
        clip_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        if not (clip_dir / "config.json").is_file():
            raise ValueError(f"embedder {spec!r}: no WorldCLIP at {clip_dir}")
        from world.clip import load_clip

        return WorldClipEmbedder(load_clip(clip_dir), name=spec, source=str(clip_dir))
    if kind == "open_clip":
        model, _, pretrained = rest.partition(":")
        if not model:
            raise ValueError(f"embedder {spec!r}: expected open_clip:MODEL[:PRETRAINED]")
        return OpenClipEmbedder(model, pretrained or None)
    raise ValueError(f"unknown embedder {spec!r}: use world[:PATH] or "
                     "open_clip:MODEL[:PRETRAINED]")


def prompt_stats(prompts: Sequence[str]) -> np.ndarray:
    """Cheap per-prompt statistics, float32 ``B x len(STAT_NAMES)``: characters, words,
    digits, commas, and relation/conjunction words (a proxy for the number of objects)."""
    out = np.zeros((len(prompts), len(STAT_NAMES)), np.float32)
    for i, p in enumerate(prompts):
        words = [w.lower() for w in _WORD.findall(p)]
        out[i] = (len(p), len(words), sum(w.isdigit() for w in words), p.count(","),
                  sum(w in _CONJ for w in words))
    return out


def feature_names(dim: int) -> list[str]:
    """Column names of :func:`build_features` for a ``dim``-dimensional embedding."""
    return [f"emb_{i}" for i in range(dim)] + list(CACHE_NAMES) + list(STAT_NAMES)


def build_features(embeddings: np.ndarray, prompts: Sequence[str],
                   similarity: np.ndarray | None = None,
                   best_k_frac: np.ndarray | None = None) -> np.ndarray:
    """The classifier's feature matrix (column order of :func:`feature_names`).

    Args:
        embeddings: ``B x D`` prompt embeddings.
        prompts: The B prompt texts (for the statistics).
        similarity: Top-1 cache cosine similarity per prompt; None or NaN entries: 0.
        best_k_frac: Largest K the neighbour has stored, divided by N; None/NaN: 0.

    Raises:
        ValueError: Row counts disagree.
    """
    n = len(prompts)
    if embeddings.shape[0] != n:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {n} prompts")
    cache = np.zeros((n, len(CACHE_NAMES)), np.float32)
    for col, values in enumerate((similarity, best_k_frac)):
        if values is not None:
            cache[:, col] = np.nan_to_num(np.asarray(values, np.float32), nan=0.0)
    return np.hstack([embeddings.astype(np.float32), cache, prompt_stats(prompts)])


# ------------------------------------------------------------------ training data
@dataclass
class QualityTable:
    """Per-prompt view of the quality table: B prompts x K tiers (complete prompts only).

    Attributes:
        prompts: Prompt texts.
        rel: ``B x K`` relative quality per tier (NaN where the table has none).
        similarity: Top-1 cache neighbour similarity (NaN without cache tiers).
        groups: Split group of each prompt (module docstring).
        heldout_combo: True for the world's held-out caption combinations.
    """

    prompts: list[str]
    rel: np.ndarray
    similarity: np.ndarray
    groups: list[str]
    heldout_combo: np.ndarray


def _float(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def group_of(prompt: str) -> tuple[str, bool]:
    """(split group, is a held-out world combination) of a prompt (module docstring)."""
    try:
        from world.scenes import combination_key, is_heldout, parse_caption

        m = parse_caption(prompt)
    except Exception:  # the world package is optional for production tables
        m = None
    if m is not None:
        return combination_key(m), is_heldout(m)
    return "text:" + re.sub(r"\s+", " ", prompt.strip().lower()), False


def read_table(path: str | Path, registry: Registry) -> QualityTable:
    """Read the quality CSV for ``registry``'s tiers; prompts lacking a row for any tier
    are dropped (a partial profile). A blank ``rel_quality`` reads as NaN (unsafe).

    Raises:
        ValueError: Missing columns, a tier id or name the registry does not have, or no
            complete prompt.
    """
    n_tiers = len(registry.tiers)
    names = {t.id: t.name for t in registry.tiers}
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"prompt", "tier", "rel_quality"} <= set(rows[0]):
        raise ValueError(f"{path}: empty, or no prompt, tier, rel_quality columns")
    rel: dict[str, np.ndarray] = {}
    seen: dict[str, set[int]] = {}
    sim: dict[str, float] = {}
    for r in rows:
        try:
            k = int(r["tier"])
        except (TypeError, ValueError):  # a line cut short while the profile writes
            continue
        if k not in names or r.get("tier_name", names[k]) != names[k]:
            raise ValueError(f"{path}: tier {k} ({r.get('tier_name')}) is not tier {k} of "
                             f"registry {registry.name} ({names.get(k)})")
        p = r["prompt"]
        rel.setdefault(p, np.full(n_tiers, np.nan))[k] = _float(r["rel_quality"])
        seen.setdefault(p, set()).add(k)
        s = _float(r.get("neighbor_similarity"))
        if np.isfinite(s):
            sim[p] = s
    prompts = [p for p in rel if len(seen[p]) == n_tiers]
    if not prompts:
        raise ValueError(f"{path}: no prompt has rows for all {n_tiers} tiers")
    groups = [group_of(p) for p in prompts]
    return QualityTable(prompts, np.stack([rel[p] for p in prompts]),
                        np.array([sim.get(p, np.nan) for p in prompts]),
                        [g for g, _ in groups], np.array([h for _, h in groups], bool))


def noise_floor(table_path: str | Path, tolerance: float) -> dict[str, Any] | None:
    """The profile's noise floor (``<table>_noise_floor.csv``: the exact tier re-run
    with other seeds, scored like a tier): how many prompts it covers, the mean relative
    quality, and the share that would count as safe at ``tolerance``, i.e. the safe-rate
    of the exact tier itself against a reseed. None when the file is absent or empty."""
    p = Path(table_path)
    floor = p.with_name(p.stem + "_noise_floor.csv")
    if not floor.is_file():
        return None
    with floor.open(newline="") as f:
        rel = np.array([_float(r.get("rel_quality")) for r in csv.DictReader(f)])
    rel = rel[np.isfinite(rel)]
    if not len(rel):
        return None
    return {"file": floor.name, "prompts": len(rel), "rel_quality_mean": float(rel.mean()),
            "safe_share": float((rel >= 1.0 - tolerance).mean())}


def safety(rel: np.ndarray, tolerance: float) -> np.ndarray:
    """``B x K`` bool: relative quality >= 1 - tolerance (exact always safe)."""
    safe: np.ndarray = np.nan_to_num(rel, nan=-np.inf) >= 1.0 - tolerance
    safe[:, 0] = True
    return safe


def labels(safe: np.ndarray, feasible: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """The cheapest feasible safe tier of each prompt (the oracle's choice)."""
    out = np.zeros(len(safe), np.int64)
    done = np.zeros(len(safe), bool)
    for k in order:
        ok = ~done & safe[:, k] & feasible[:, k]
        out[ok] = k
        done |= ok
    return out
