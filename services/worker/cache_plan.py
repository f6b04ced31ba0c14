"""How a worker uses the approximate cache for one batch: which jobs resume from which
cached latent (hits), which run the full schedule (misses), and what full runs store.

Miss policy (a ``cache`` tier job that cannot resume): run the full exact schedule from
the job's own seed. It costs the tier's skipped K steps more but never loses quality,
and the run stores its latents, so the next similar prompt hits. The alternative (resume
from a worse neighbour at a lower K) would trade quality that the classifier did not
agree to for time. A job is a miss when: the cache is disabled or unreachable, no entry
is cached, the nearest one's similarity is below ``cache_min_similarity``, it has no
latent at any K <= the tier's K, the latent vanished (evicted) before it was read, or
the job asks for ``n > 1`` images (one cached latent would give n identical images).

Every job of a cache tier gets a ``detail`` record: ``cache`` ("hit" | "miss"),
``neighbor`` (prompt id), ``neighbor_prompt``, ``similarity``, ``k_used`` and, for a
miss, ``reason``. Guarantees: :meth:`CacheFront.plan` never raises on a cache problem
(it degrades to misses and logs); it returns one decision per job, in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.messages import ClassifiedJob
from common.settings import WorkerSettings
from common.tiers import Registry, Strategy, Tier
from services.worker.cache import CacheError, LatentCache, cache_namespace, choose_k, prompt_id
from services.worker.embed import TextEmbedder

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """One job's plan: resume from ``latent`` after ``k`` steps, or (k == 0) run fully."""

    k: int = 0
    latent: Any = None
    detail: dict[str, Any] = field(default_factory=dict)


def cache_ks(registry: Registry | None, tier: Tier) -> list[int]:
    """The K values of the registry's cache tiers that share ``tier``'s model and N."""
    if registry is None:
        return []
    return sorted({t.skip for t in registry.tiers if t.strategy is Strategy.CACHE
                   and t.model == tier.model and t.steps == tier.steps and t.skip > 0})


class CacheFront:
    """The worker side of the shared cache: one :class:`LatentCache` per namespace."""

    def __init__(self, settings: WorkerSettings, registry: Registry | None,
                 client: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self._client = client
        self._caches: dict[str, LatentCache] = {}

    def cache_for(self, tier: Tier, width: int, height: int) -> LatentCache:
        """The cache namespace of (tier model, N, size), created on first use."""
        ns = cache_namespace(tier.model, tier.steps, width, height)
        cache = self._caches.get(ns)
        if cache is None:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.settings.redis_url,
                                                    socket_timeout=5.0)
            s = self.settings
            cache = LatentCache(self._client, ns, tier.steps, s.cache_budget_bytes,
                                s.cache_dtype, s.cache_refresh_s)
            self._caches[ns] = cache
        return cache

    def plan(self, jobs: list[ClassifiedJob], tier: Tier,
             embeddings: np.ndarray | None) -> list[Decision]:
        """Hits and misses for a ``cache`` tier batch (see module docstring)."""
        out = [Decision(detail={"cache": "miss", "k_used": 0}) for _ in jobs]
        if not self.settings.cache_enabled:
            return _missed(out, "cache disabled")
        if embeddings is None:
            return _missed(out, "no embedder")
        try:
            cache = self.cache_for(tier, jobs[0].width, jobs[0].height)
            for job, emb, dec in zip(jobs, embeddings, out, strict=True):
                self._plan_one(cache, job, emb, tier, dec)
        except Exception as exc:  # Redis down, corrupt entry...: degrade to misses
            log.warning("cache lookup failed (%r): serving the batch as misses", exc)
            return _missed([Decision(detail={"cache": "miss", "k_used": 0})
                            for _ in jobs], f"cache error: {exc!r}")
        return out

    def _plan_one(self, cache: LatentCache, job: ClassifiedJob, emb: np.ndarray,
                  tier: Tier, dec: Decision) -> None:
        if job.n != 1:
            dec.detail["reason"] = "n > 1 images"
            return
        pid: str | None = None
        sim: float | None = None
        ks: tuple[int, ...] = ()
        if job.cache_neighbor is not None:  # the classifier's pick wins when still cached
            pid, sim = job.cache_neighbor, job.cache_similarity
            ks = _ks_of(cache, pid)
        if not ks:
            near = cache.nearest(emb)
            if near is None:
                dec.detail["reason"] = "cache empty"
                return
            pid, sim, ks = near.prompt_id, near.similarity, near.available_ks
        assert pid is not None
        dec.detail.update(neighbor=pid, similarity=None if sim is None else round(sim, 4))
        if sim is not None and sim < self.settings.cache_min_similarity:
            dec.detail["reason"] = "similarity below minimum"
            return
        k = choose_k(tier.skip, ks)
        if k == 0:
            dec.detail["reason"] = f"no latent at K <= {tier.skip}"
            return
        latent = cache.get(pid, k)
        if latent is None:
            dec.detail["reason"] = "entry evicted"
            return
        cache.record_hit(pid)
        dec.k, dec.latent = k, latent
        dec.detail.update(cache="hit", k_used=k,
                          neighbor_prompt=cache.meta(pid).get("prompt", ""))

    def store(self, jobs: list[ClassifiedJob], tier: Tier, embeddings: np.ndarray | None,
              captured: dict[int, Any], rows: list[int]) -> int:
        """Cache the latents captured by a full-schedule run; returns entries stored.

        ``rows[i]`` is the image row of job ``i`` in ``captured[k]`` (its first image).
        Never raises: a cache problem is logged and the batch's result stands.
        """
        if not captured or embeddings is None or not self.settings.cache_enabled:
            return 0
        stored = 0
        try:
            cache = self.cache_for(tier, jobs[0].width, jobs[0].height)
            for job, emb, row in zip(jobs, embeddings, rows, strict=True):
                lat = {k: v[row] for k, v in captured.items()}
                ok, _ = cache.put(job.prompt, emb, lat, seed=job.seed)
                stored += int(ok)
        except CacheError as exc:
            log.warning("not cached: %s", exc)
        except Exception as exc:
            log.warning("cache store failed: %r", exc)
        return stored


def _ks_of(cache: LatentCache, pid: str) -> tuple[int, ...]:
    meta = cache.meta(pid)
    return tuple(int(k) for k in meta.get("ks", "").split(",") if k)


def _missed(decisions: list[Decision], reason: str) -> list[Decision]:
    for d in decisions:
        d.detail["reason"] = reason
    return decisions


__all__ = ["CacheFront", "Decision", "TextEmbedder", "cache_ks", "prompt_id"]
