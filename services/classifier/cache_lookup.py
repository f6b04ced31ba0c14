"""NIRVANA's cache lookup for the classifier: embed the prompts, find each one's nearest
cached prompt in the shared approximate cache (``services.worker.cache``).

The namespace is the one the workers write: ``cache_namespace(model, N, width, height)``
of the registry's ``cache`` tiers (they share one model and N; the first one's are
used), so a classifier and the workers see the same entries. The embedder is the text
encoder of that model (``services.worker.embed.load_embedder``), the same embedding
space the workers index with.

Guarantees: one neighbour (or None) per job, in order; a cache or Redis failure is logged
and answered as misses (None), never raised: NIRVANA then serves prompts exactly. The
lookup does blocking I/O (the index re-sync): the classifier calls policies in a thread.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from common.messages import PromptJob
from common.tiers import Registry, Strategy, resolve_model
from services.classifier.baselines import Neighbour
from services.worker.cache import LatentCache, cache_namespace
from services.worker.embed import TextEmbedder, load_embedder

log = logging.getLogger(__name__)

READ_BUDGET_BYTES = 1 << 30
"""Budget given to the read-only cache handles (the classifier never writes)."""


class CacheLookup:
    """Callable ``Lookup`` over the shared cache (module doc)."""

    def __init__(self, client: Any, registry: Registry, embedder: TextEmbedder,
                 refresh_s: float = 1.0, source: str = "") -> None:
        cache_tiers = [t for t in registry.tiers if t.strategy is Strategy.CACHE]
        self.model = cache_tiers[0].model if cache_tiers else registry.tiers[0].model
        self.steps = cache_tiers[0].steps if cache_tiers else registry.tiers[0].steps
        self.client = client
        self.embedder = embedder
        self.source = source  # the model path or id the text encoder was loaded from
        self.refresh_s = refresh_s
        self._caches: dict[str, LatentCache] = {}

    def _cache(self, width: int, height: int) -> LatentCache:
        ns = cache_namespace(self.model, self.steps, width, height)
        if ns not in self._caches:
            self._caches[ns] = LatentCache(self.client, ns, self.steps, READ_BUDGET_BYTES,
                                           refresh_s=self.refresh_s)
        return self._caches[ns]

    def __call__(self, jobs: list[PromptJob], embeddings: np.ndarray | None = None
                 ) -> list[Neighbour | None]:
        """The top-1 neighbour ``(similarity, available Ks)`` of each job, or None.

        ``embeddings``: the jobs' unit embeddings by this lookup's own ``embedder``, when
        the caller already has them (one row per job); otherwise they are computed here.
        """
        if not jobs:
            return []
        try:
            if embeddings is None:
                embeddings = self.embedder.embed([j.prompt for j in jobs])
            out: list[Neighbour | None] = []
            for job, emb in zip(jobs, embeddings, strict=True):
                hit = self._cache(job.width, job.height).nearest(emb)
                out.append(None if hit is None else (hit.similarity, hit.available_ks))
            return out
        except Exception as exc:  # Redis down, corrupt index: misses, served exactly
            log.warning("cache lookup failed (%r): treating the batch as misses", exc)
            return [None] * len(jobs)


def build_lookup(redis_url: str, registry: Registry) -> CacheLookup:
    """A lookup for ``registry``'s cache model, with its text encoder loaded.

    Raises:
        ValueError: The model has no loadable text encoder (not a local pipeline).
    """
    import redis

    cache_tiers = [t for t in registry.tiers if t.strategy is Strategy.CACHE]
    model = (cache_tiers[0] if cache_tiers else registry.tiers[0]).model
    source = resolve_model(model)
    embedder = load_embedder(source)
    return CacheLookup(redis.Redis.from_url(redis_url, socket_timeout=5.0), registry,
                       embedder, source=source)
