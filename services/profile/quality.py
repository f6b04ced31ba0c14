"""``argus profile quality``: every tier of a registry on a prompt set, seed for seed,
scored per image; one CSV row per (prompt, tier).

Method:
- Seeds: seed ``i`` of prompt ``p`` is :func:`~services.profile.scoring.stable_seed`
  (p, seed_offset + i) (an offset gives a further, disjoint set of seeds). The
  starting noise of (p, i) is the same at every tier that starts from noise (exact,
  steps, model tiers with the same latent shape).
- Cache tiers: a bank of OTHER prompts (``default_bank``; never the prompt itself, and
  by default never a prompt of the same world meaning) is generated at the exact tier
  with its own seeds, capturing the latents after each cache tier's K (the bank runs
  stop at the largest K). Prompt p's neighbour is its most similar bank prompt (cosine
  of the serving embedder, as in the worker's cache); seed i of p resumes from seed i
  of the neighbour's latent.
- Quality: per image ``clip`` (and ``checker`` for the world). ``rel_quality`` of a
  tier = mean over seeds of ``max(0, 1 + (clip_tier(i) - clip_exact(i)) / C)``: the
  change, seed for seed, as a share of ``C``, the mean exact CLIP score of the first
  chunk of the run (kept in ``<out>.meta.json`` so a resumed run uses the same C). A
  per-prompt ratio clip_tier / clip_exact would be unstable: single images' CLIP
  scores range from below 0 to about 90, so a ratio explodes where the exact image
  scores near 0. Averaged over prompts, rel_quality = mean clip_tier / mean clip_exact
  exactly (the DESIGN's "CLIP score relative to tier 0"). ``checker_delta`` = mean
  over seeds of checker_tier(i) - checker_exact(i).
- Noise floor: for ``floor`` prompts (every ``len/floor``-th) the exact tier also runs
  with seeds ``S..2S-1``; the same statistics of that reseeded run against the exact
  one go to the floor CSV (one row per prompt).
- Resumable: prompts whose rows are all present in ``out`` are skipped; partial rows
  are dropped and redone. Prompts run in a fixed random order, so a partial run is a
  random sample of the set. Work is batched (``batch_size`` images per pipeline call)
  and written one chunk of prompts at a time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.tiers import Registry, Strategy, Tier
from services.profile.scoring import Prompt, Scorer, stable_seed, to_uint8
from services.worker.cache_index import k_for_similarity
from services.worker.generation import initial_latents, run_pipeline

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "category", "tier", "tier_name", "strategy", "unet_steps", "seeds",
           "clip_mean", "clip_std", "checker_mean", "checker_std", "rel_quality",
           "rel_quality_std", "checker_delta", "neighbor", "neighbor_similarity",
           "nirvana_k", "clip_per_seed", "checker_per_seed")
FLOOR_COLUMNS = ("prompt", "category", "seeds", "clip_exact", "clip_reseed",
                 "rel_quality", "rel_quality_std", "checker_exact", "checker_reseed",
                 "checker_delta")


@dataclass
class QualityConfig:
    """Knobs of one quality run."""

    seeds: int = 4
    seed_offset: int = 0
    batch_size: int = 256
    chunk: int = 128
    floor: int = 300
    width: int | None = None
    height: int | None = None
    exclude_same_meaning: bool = True


@dataclass
class Bank:
    """The cache bank: prompts, their embeddings and latents after each K (prompt-major,
    seed-minor rows)."""

    prompts: list[Prompt]
    embeddings: np.ndarray
    latents: dict[int, Any]


def _fmt(x: float) -> str:
    return "" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _category(meaning: Any) -> str:
    return str(getattr(meaning, "category", "") or "")


class QualityProfiler:
    """Runs the quality profile of one registry (see module docstring)."""

    def __init__(self, registry: Registry, pipes: Callable[[Tier], Any], scorer: Scorer,
                 embed: Callable[[Sequence[str]], np.ndarray], config: QualityConfig) -> None:
        self.registry = registry
        self.pipes = pipes
        self.scorer = scorer
        self.embed = embed
        self.cfg = config
        self.exact = registry.tiers[0]
        self.ref_clip: float | None = None
        self.ks = sorted({t.skip for t in registry.tiers if t.strategy is Strategy.CACHE})

    # ------------------------------------------------------------------ generation
    def noise(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int]) -> Any:
        """Starting noise of each (prompt, seed index)."""
        import torch

        off = self.cfg.seed_offset
        gens = [torch.Generator().manual_seed(stable_seed(p, off + s))
                for p, s in zip(prompts, seeds, strict=True)]
        return initial_latents(pipe, gens, self.cfg.width, self.cfg.height)

    def generate(self, tier: Tier, prompts: Sequence[str], latents: Any, start_step: int = 0,
                 capture: Sequence[int] = (), stop_after: int | None = None
                 ) -> tuple[np.ndarray, dict[int, Any]]:
        """uint8 images (and captured latents) of ``prompts`` at ``tier`` in batches.

        ``stop_after``: stop once that many steps ran (the images are then partial;
        used by the bank, which needs only the latents up to the largest K).
        """
        import torch

        def on_step(i: int, _total: int) -> bool:
            return stop_after is None or start_step + i < stop_after

        pipe = self.pipes(tier)
        bs = self.cfg.batch_size
        images: list[np.ndarray] = []
        caps: dict[int, list[Any]] = {k: [] for k in capture}
        for b in range(0, len(prompts), bs):
            out, cap = run_pipeline(
                pipe, prompts[b:b + bs], steps=tier.steps, guidance=tier.guidance,
                latents=latents[b:b + bs], start_step=start_step, capture=capture,
                output_type="np", width=self.cfg.width, height=self.cfg.height,
                on_step=on_step)
            images.append(to_uint8(out))
            for k in capture:
                caps[k].append(cap[k].float().cpu())
        return np.concatenate(images), {k: torch.cat(v) for k, v in caps.items()}

    def build_bank(self, bank: list[Prompt]) -> Bank:
        """Generate the bank at the exact tier, capturing the cache tiers' latents."""
        s = self.cfg.seeds
        texts = [p for p, _ in bank for _ in range(s)]
        idx = [i for _ in bank for i in range(s)]
        noise = self.noise(self.pipes(self.exact), texts, idx)
        _, lat = self.generate(self.exact, texts, noise, capture=self.ks,
                               stop_after=max(self.ks))
        return Bank(bank, self.embed([p for p, _ in bank]), lat)

    def neighbours(self, prompts: Sequence[Prompt], bank: Bank) -> tuple[np.ndarray, np.ndarray]:
        """Index of each prompt's nearest bank prompt (other text, and other meaning
        when ``exclude_same_meaning``) and its cosine similarity."""
        sims = self.embed([p for p, _ in prompts]) @ bank.embeddings.T
        for i, (p, m) in enumerate(prompts):
            for j, (q, bm) in enumerate(bank.prompts):
                same = self.cfg.exclude_same_meaning and m is not None and bm == m
                if q == p or same:
                    sims[i, j] = -np.inf
        best = sims.argmax(1)
        return best, sims[np.arange(len(prompts)), best]

    # ------------------------------------------------------------------ one chunk
    def run_chunk(self, chunk: list[Prompt], bank: Bank, floor_n: int
                  ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """All tiers for ``chunk``; returns (tier rows, floor rows for the first
        ``floor_n`` prompts of the chunk)."""
        s = self.cfg.seeds
        texts = [p for p, _ in chunk for _ in range(s)]
        items = [x for x in chunk for _ in range(s)]
        idx = [i for _ in chunk for i in range(s)]
        scores: dict[int, dict[str, np.ndarray]] = {}
        nb, sim = self.neighbours(chunk, bank) if self.ks else (None, None)
        for tier in self.registry.tiers:
            pipe = self.pipes(tier)
            if tier.strategy is Strategy.CACHE:
                assert nb is not None
                rows = [int(nb[i // s]) * s + (i % s) for i in range(len(texts))]
                start = bank.latents[tier.skip][rows]
                images, _ = self.generate(tier, texts, start, start_step=tier.skip)
            else:
                images, _ = self.generate(tier, texts, self.noise(pipe, texts, idx))
            sc = self.scorer.score(images, items)
            scores[tier.id] = {k: v.reshape(len(chunk), s) for k, v in sc.items()}
        if self.ref_clip is None:
            self.ref_clip = max(1.0, float(np.mean(scores[0]["clip"])))
        out = [self._row(p, tier, scores, i, nb, sim, bank) for i, p in enumerate(chunk)
               for tier in self.registry.tiers]
        floor_rows: list[dict[str, str]] = []
        if floor_n > 0:
            sub = chunk[:floor_n]
            t2 = [p for p, _ in sub for _ in range(s)]
            i2 = [s + i for _ in sub for i in range(s)]
            images, _ = self.generate(self.exact, t2,
                                      self.noise(self.pipes(self.exact), t2, i2))
            sc = self.scorer.score(images, [x for x in sub for _ in range(s)])
            re = {k: v.reshape(len(sub), s) for k, v in sc.items()}
            for i, (p, m) in enumerate(sub):
                floor_rows.append(self._floor_row(p, m, scores[0], re, i))
        return out, floor_rows

    def _rel(self, q: dict[str, np.ndarray], ref: dict[str, np.ndarray], i: int
             ) -> tuple[np.ndarray, float]:
        assert self.ref_clip is not None
        rel = np.maximum(0.0, 1.0 + (q["clip"][i] - ref["clip"][i]) / self.ref_clip)
        dchk = (float(np.nanmean(q["checker"][i] - ref["checker"][i]))
                if "checker" in q and np.isfinite(q["checker"][i]).any() else float("nan"))
        return rel, dchk

    def _row(self, prompt: Prompt, tier: Tier, scores: dict[int, dict[str, np.ndarray]],
             i: int, nb: np.ndarray | None, sim: np.ndarray | None, bank: Bank
             ) -> dict[str, str]:
        q = scores[tier.id]
        rel, dchk = self._rel(q, scores[0], i)
        chk = q.get("checker")
        cache = tier.strategy is Strategy.CACHE and nb is not None and sim is not None
        return {
            "prompt": prompt[0], "category": _category(prompt[1]), "tier": str(tier.id),
            "tier_name": tier.name, "strategy": tier.strategy.value,
            "unet_steps": str(tier.unet_steps), "seeds": str(self.cfg.seeds),
            "clip_mean": _fmt(float(q["clip"][i].mean())),
            "clip_std": _fmt(float(q["clip"][i].std())),
            "checker_mean": _fmt(float(np.nanmean(chk[i]))) if chk is not None else "",
            "checker_std": _fmt(float(np.nanstd(chk[i]))) if chk is not None else "",
            "rel_quality": _fmt(float(rel.mean())), "rel_quality_std": _fmt(float(rel.std())),
            "checker_delta": _fmt(dchk),
            "neighbor": bank.prompts[int(nb[i])][0] if cache and nb is not None else "",
            "neighbor_similarity": _fmt(float(sim[i])) if cache and sim is not None else "",
            "nirvana_k": (str(k_for_similarity(float(sim[i]), tier.steps))
                          if cache and sim is not None else ""),
            "clip_per_seed": ";".join(f"{v:.2f}" for v in q["clip"][i]),
            "checker_per_seed": (";".join(f"{v:.3f}" for v in chk[i])
                                 if chk is not None else ""),
        }

    def _floor_row(self, prompt: str, meaning: Any, ex: dict[str, np.ndarray],
                   re: dict[str, np.ndarray], i: int) -> dict[str, str]:
        rel, dchk = self._rel(re, ex, i)
        chk_e = ex.get("checker")
        chk_r = re.get("checker")
        return {
            "prompt": prompt, "category": _category(meaning), "seeds": str(self.cfg.seeds),
            "clip_exact": _fmt(float(ex["clip"][i].mean())),
            "clip_reseed": _fmt(float(re["clip"][i].mean())),
            "rel_quality": _fmt(float(rel.mean())), "rel_quality_std": _fmt(float(rel.std())),
            "checker_exact": _fmt(float(np.nanmean(chk_e[i]))) if chk_e is not None else "",
            "checker_reseed": _fmt(float(np.nanmean(chk_r[i]))) if chk_r is not None else "",
            "checker_delta": _fmt(dchk),
        }


# ---------------------------------------------------------------------- files
def done_prompts(path: Path, n_tiers: int) -> set[str]:
    """Prompts with all ``n_tiers`` rows in ``path``; rewrites the file without the
    rows of incomplete prompts (an interrupted chunk)."""
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    count: dict[str, int] = {}
    for r in rows:
        count[r["prompt"]] = count.get(r["prompt"], 0) + 1
    done = {p for p, c in count.items() if c == n_tiers}
    if len(done) != len(count):
        write_rows(path, COLUMNS, [r for r in rows if r["prompt"] in done], mode="w")
    return done


def write_rows(path: Path, columns: Sequence[str], rows: list[dict[str, str]],
               mode: str = "a") -> None:
    """Append (or write) rows, with a header when the file is new or rewritten."""
    new = mode == "w" or not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        w.writerows(rows)


def bank_cache_path(work_dir: Path, registry: Registry, bank: list[Prompt],
                    cfg: QualityConfig) -> Path:
    """Where a generated bank is kept for resumption (keyed by what determines it)."""
    t = registry.tiers[0]
    key = "|".join([t.model, str(t.steps), str(t.guidance), str(cfg.seeds),
                    str(cfg.seed_offset),
                    str(cfg.width), str(cfg.height),
                    ",".join(map(str, sorted({x.skip for x in registry.tiers}))),
                    *[p for p, _ in bank]])
    return work_dir / f"bank-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def run_quality(profiler: QualityProfiler, prompts: list[Prompt], bank: list[Prompt],
                out: Path, floor_out: Path, work_dir: Path, resume: bool = True,
                progress: bool = True, shard: tuple[int, int] = (0, 1),
                meta: Path | None = None) -> dict[str, int]:
    """Profile ``prompts`` into ``out`` (and the floor CSV); returns counts done.

    ``shard=(i, n)``: only every n-th prompt of the fixed order, from the i-th (run n
    processes with their own ``out`` and one shared ``meta``, started after the first
    has written it, so every shard uses the same reference CLIP score; the bank is
    shared through ``work_dir``).
    """
    import torch
    from tqdm import tqdm

    n_tiers = len(profiler.registry.tiers)
    meta = meta or out.with_name(out.name + ".meta.json")
    if not resume:
        for p in (out, floor_out, meta):
            p.unlink(missing_ok=True)
    done = done_prompts(out, n_tiers)
    floor_done = set()
    if floor_out.exists():
        with floor_out.open(newline="") as f:
            floor_done = {r["prompt"] for r in csv.DictReader(f)}
    # A fixed random order: whatever part of a long run finishes is a random sample.
    order = np.random.default_rng(0).permutation(len(prompts))
    mine = [prompts[i] for j, i in enumerate(order) if j % shard[1] == shard[0]]
    todo = [p for p in mine if p[0] not in done]
    step = max(1, len(prompts) // max(1, profiler.cfg.floor))
    floor_set = {p for p, _ in prompts[::step][:profiler.cfg.floor]} - floor_done
    if meta.exists():
        profiler.ref_clip = float(json.loads(meta.read_text())["ref_clip"])
    work_dir.mkdir(parents=True, exist_ok=True)
    cached = bank_cache_path(work_dir, profiler.registry, bank, profiler.cfg)
    if profiler.ks and cached.exists():
        b = torch.load(cached)
        bank_obj = Bank(bank, b["embeddings"].numpy(), b["latents"])
        log.info("bank of %d prompts loaded from %s", len(bank), cached)
    elif profiler.ks:
        log.info("generating the cache bank: %d prompts x %d seeds", len(bank),
                 profiler.cfg.seeds)
        bank_obj = profiler.build_bank(bank)
        torch.save({"embeddings": torch.from_numpy(bank_obj.embeddings),
                    "latents": bank_obj.latents}, cached)
    else:
        bank_obj = Bank([], np.zeros((0, 1), np.float32), {})
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="prompt",
               disable=not progress, desc="quality")
    for c in range(0, len(todo), profiler.cfg.chunk):
        chunk = todo[c:c + profiler.cfg.chunk]
        # Floor prompts first in the chunk, so the floor run covers a prefix.
        chunk.sort(key=lambda p: p[0] not in floor_set)
        n_floor = sum(p[0] in floor_set for p in chunk)
        rows, floor_rows = profiler.run_chunk(chunk, bank_obj, n_floor)
        if not meta.exists():
            meta.write_text(json.dumps({"ref_clip": profiler.ref_clip, "seeds":
                                        profiler.cfg.seeds, "seed_offset":
                                        profiler.cfg.seed_offset, "bank": len(bank)}))
        write_rows(out, COLUMNS, rows)
        if floor_rows:
            write_rows(floor_out, FLOOR_COLUMNS, floor_rows)
        bar.update(len(chunk))
    bar.close()
    return {"prompts": len(mine), "skipped": len(mine) - len(todo),
            "done": len(todo), "bank": len(bank)}
