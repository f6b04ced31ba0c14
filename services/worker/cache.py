"""The approximate cache (NIRVANA): intermediate latents of served prompts, shared in Redis.

Public API (used by the worker backends and by the classifier):

- :func:`k_for_similarity` (similarity, N) -> K: NIRVANA's rule scaled to N steps;
  :func:`choose_k` picks the largest available K not above a target.
- :func:`cache_namespace` (model, N, width, height) -> the namespace a cached latent is
  valid in: the same model, schedule length and image size; :func:`registry_cache`
  opens the namespace a registry's cache tiers use (the classifier's entry point).
- :class:`LatentCache` ``.nearest(embedding) -> Neighbor(prompt_id, similarity,
  available_ks) | None``, ``.get(prompt_id, k)``, ``.put(...)``, ``.record_hit(...)``,
  ``.refresh()``, ``.stats()``.

Layout (every key built by ``common.keys``): per namespace, one string per (prompt, K)
latent (an encoded array, see :func:`services.worker.cache_index.encode_latent`), a
meta hash per prompt (prompt text, ks, bytes, hits, benefit, seed), a hash of float32
prompt embeddings, a zset ``index`` (id -> insertion sequence), a zset ``tomb`` (evicted
id -> sequence, the last ``TOMB_KEEP``), a zset ``lcbfu`` (id -> eviction score) and two
counters (``bytes``, ``seq``). Every worker and the classifier share it.

Guarantees:
- ``put`` is one Lua script: atomic on the server, so any number of workers can insert
  concurrently and the namespace's stored bytes (latents + embedding) never exceed the
  budget; an entry is either wholly present (meta, embedding, every latent) or absent.
- Eviction is LCBFU (least computationally beneficial and frequently used): score =
  frequency x benefit, frequency = 1 + hits, benefit = K_max / N (the share of the
  schedule the entry can skip); the lowest score goes first, the oldest on ties.
- ``nearest`` searches a worker-local copy of the embeddings (numpy), re-synced
  incrementally from the ``index``/``tomb`` zsets at most every ``refresh_s`` seconds
  (a full reload when the tombstones were trimmed past it). It may name an entry evicted
  since the last sync; ``get`` then returns None and the caller treats it as a miss.
- ``nearest`` and ``refresh`` do blocking Redis I/O (``refresh`` only); async callers use
  ``refresh=False`` and run ``refresh`` in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import redis

from common import keys
from common.tiers import Registry, Strategy
from services.worker.cache_index import (
    NIRVANA_RULE,
    LatentFormatError,
    LocalIndex,
    Neighbor,
    choose_k,
    decode_latent,
    encode_latent,
    k_for_similarity,
)

__all__ = [
    "NIRVANA_RULE",
    "CacheError",
    "LatentCache",
    "Neighbor",
    "blob_to_tensor",
    "cache_namespace",
    "choose_k",
    "k_for_similarity",
    "prompt_id",
    "registry_cache",
    "tensor_to_blob",
]

log = logging.getLogger(__name__)

TOMB_KEEP = 10_000
#: Tie-break weight of the insertion sequence in the LCBFU score (older evicted first).
AGE_EPS = 1e-10

_PUT = """
local p, pid = ARGV[1], ARGV[2]
local budget, size, benefit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local nk = tonumber(ARGV[10])
if redis.call('EXISTS', p..':meta:'..pid) == 1 then return {0, 0} end
if size > budget then return {-1, 0} end
local used = tonumber(redis.call('GET', p..':bytes') or '0')
local evicted = 0
while used + size > budget do
  local low = redis.call('ZRANGE', p..':lcbfu', 0, 0)
  if #low == 0 then break end
  local v = low[1]
  local vks = redis.call('HGET', p..':meta:'..v, 'ks') or ''
  local vbytes = tonumber(redis.call('HGET', p..':meta:'..v, 'bytes') or '0')
  for k in string.gmatch(vks, '[^,]+') do redis.call('DEL', p..':lat:'..v..':'..k) end
  redis.call('DEL', p..':meta:'..v)
  redis.call('HDEL', p..':emb', v)
  redis.call('ZREM', p..':lcbfu', v)
  redis.call('ZREM', p..':index', v)
  redis.call('ZADD', p..':tomb', redis.call('INCR', p..':seq'), v)
  used = tonumber(redis.call('DECRBY', p..':bytes', vbytes))
  evicted = evicted + 1
end
for i = 0, nk - 1 do
  redis.call('SET', p..':lat:'..pid..':'..ARGV[13 + 2 * i], ARGV[14 + 2 * i])
end
redis.call('HSET', p..':meta:'..pid, 'prompt', ARGV[7], 'ks', ARGV[8], 'bytes', size,
           'hits', 0, 'benefit', benefit, 'seed', ARGV[9])
redis.call('HSET', p..':emb', pid, ARGV[6])
local s = redis.call('INCR', p..':seq')
redis.call('ZADD', p..':index', s, pid)
redis.call('ZREM', p..':tomb', pid)
redis.call('ZADD', p..':lcbfu', benefit + s * tonumber(ARGV[11]), pid)
redis.call('INCRBY', p..':bytes', size)
redis.call('ZREMRANGEBYRANK', p..':tomb', 0, -(tonumber(ARGV[12]) + 1))
return {1, evicted}
"""

_HIT = """
local p, pid = ARGV[1], ARGV[2]
if redis.call('EXISTS', p..':meta:'..pid) == 0 then return 0 end
redis.call('HINCRBY', p..':meta:'..pid, 'hits', 1)
local b = tonumber(redis.call('HGET', p..':meta:'..pid, 'benefit') or '0')
redis.call('ZINCRBY', p..':lcbfu', b, pid)
return 1
"""


class CacheError(RuntimeError):
    """The cache refused an operation (entry larger than the whole budget, bad dtype)."""


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: sha1 of its whitespace-normalised, lower-cased text."""
    norm = " ".join(prompt.lower().split())
    return hashlib.sha1(norm.encode()).hexdigest()[:20]


def cache_namespace(model: str, steps: int, width: int, height: int) -> str:
    """Namespace of latents valid for (model as named in the registry, N, size)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_")[-48:]
    digest = hashlib.sha1(model.encode()).hexdigest()[:8]
    return f"{slug}-{digest}:n{steps}:{width}x{height}"


def tensor_to_blob(latent: Any, store_dtype: str = "native") -> bytes:
    """Encode one torch latent (any device) as stored bytes in ``store_dtype``
    ("native" keeps its own dtype: lossless)."""
    import torch

    t = latent.detach().cpu()
    name = str(t.dtype).removeprefix("torch.") if store_dtype == "native" else store_dtype
    if name == "bfloat16":
        return encode_latent(t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                             "bfloat16")
    if name not in ("float16", "float32"):
        raise CacheError(f"cannot store latents as {name!r}")
    return encode_latent(t.to(getattr(torch, name)).numpy(), name)


def blob_to_tensor(blob: bytes) -> Any:
    """Decode stored bytes to a CPU torch tensor in the stored dtype."""
    import torch

    arr, name = decode_latent(blob)
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


class LatentCache:
    """One namespace of the shared cache, with a worker-local embedding index.

    Args:
        client: A synchronous Redis client (bytes responses).
        namespace: From :func:`cache_namespace`.
        steps: N of the namespace's schedule (for the benefit K_max / N).
        budget_bytes: Most bytes the namespace may hold (latents + embeddings).
        store_dtype: "native", "float16" or "float32".
        refresh_s: ``nearest`` re-syncs the local index when older than this.
    """

    def __init__(self, client: redis.Redis, namespace: str, steps: int,
                 budget_bytes: int, store_dtype: str = "native",
                 refresh_s: float = 1.0) -> None:
        if store_dtype not in ("native", "float16", "float32"):
            raise CacheError(f"unknown cache dtype {store_dtype!r}")
        self.redis = client
        self.namespace = namespace
        self.steps = steps
        self.budget_bytes = budget_bytes
        self.store_dtype = store_dtype
        self.refresh_s = refresh_s
        self.prefix = keys.cache_prefix(namespace)
        self.index = LocalIndex()
        self._seq = 0.0
        self._synced_at = -float("inf")
        self._put = client.register_script(_PUT)
        self._hit = client.register_script(_HIT)

    def _key(self, part: str) -> str:
        return keys.cache_part_key(self.namespace, part)

    # ------------------------------------------------------------------ writes
    def put(self, prompt: str, embedding: np.ndarray, latents: Mapping[int, Any],
            seed: int = 0) -> tuple[bool, int]:
        """Store a prompt's latents after each K in ``latents`` (torch tensors, one image).

        Returns:
            ``(stored, evicted)``: False when the prompt is already cached (entries are
            never overwritten: the first generation stays); ``evicted`` entries were
            dropped to make room.

        Raises:
            CacheError: The entry alone is larger than the budget, or no latents given.
        """
        if not latents:
            raise CacheError("nothing to cache: no latents")
        ks = sorted(int(k) for k in latents)
        if any(not 0 < k < self.steps for k in ks):
            raise CacheError(f"K values {ks} must lie in 1..{self.steps - 1}")
        blobs = [tensor_to_blob(latents[k], self.store_dtype) for k in ks]
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
        emb_bytes = emb.tobytes()
        size = sum(len(b) for b in blobs) + len(emb_bytes)
        benefit = max(ks) / self.steps
        pid = prompt_id(prompt)
        args: list[Any] = [self.prefix, pid, self.budget_bytes, size, benefit, emb_bytes,
                           prompt, ",".join(map(str, ks)), int(seed), len(ks), AGE_EPS,
                           TOMB_KEEP]
        for k, b in zip(ks, blobs, strict=True):
            args += [k, b]
        status, evicted = self._put(args=args)
        if int(status) == -1:
            raise CacheError(f"entry of {size} bytes exceeds the cache budget "
                             f"({self.budget_bytes} bytes)")
        if int(status) == 1:
            self.index.add(pid, emb, ks)
        return int(status) == 1, int(evicted)

    def record_hit(self, pid: str) -> bool:
        """Count one use of ``pid`` (frequency + 1: its score grows by its benefit);
        False when it was evicted meanwhile."""
        return bool(self._hit(args=[self.prefix, pid]))

    # ------------------------------------------------------------------ reads
    def get(self, pid: str, k: int) -> Any | None:
        """The latent of ``pid`` after ``k`` steps (CPU tensor, stored dtype), or None
        when absent (evicted) or unreadable (logged)."""
        blob: Any = self.redis.get(keys.cache_latent_key(self.namespace, pid, k))
        if blob is None:
            self.index.remove(pid)  # stale local row: the entry is gone
            return None
        try:
            return blob_to_tensor(bytes(blob))
        except LatentFormatError:
            log.error("corrupt cached latent %s K=%d ignored", pid, k)
            return None

    def meta(self, pid: str) -> dict[str, str]:
        """The entry's meta hash as text (empty when absent)."""
        raw: Any = self.redis.hgetall(keys.cache_meta_key(self.namespace, pid))
        return {_text(k): _text(v) for k, v in raw.items()}

    def nearest(self, embedding: np.ndarray, exclude: Iterable[str] = (),
                refresh: bool = True) -> Neighbor | None:
        """The cached prompt most similar to ``embedding`` (cosine), or None when the
        namespace is empty. ``refresh``: re-sync first when the local copy is older than
        ``refresh_s`` (blocking I/O)."""
        if refresh and time.monotonic() - self._synced_at >= self.refresh_s:
            self.refresh()
        return self.index.nearest(embedding, exclude)

    def refresh(self) -> int:
        """Apply insertions and evictions since the last sync; returns how many.

        The index and tombstone reads are one MULTI transaction, so the events seen are
        a consistent cut; if the local copy then disagrees with the stored entry count
        (tombstones trimmed past our sync point), it is reloaded in full.
        """
        events, total = self._read_events()
        skipped = self._apply(events)
        if len(self.index) + skipped != total:
            log.info("cache index out of step (%d local, %d stored); reloading",
                     len(self.index), total)
            self.index.clear()
            self._seq = 0.0
            events, total = self._read_events()
            self._apply(events)
        self._synced_at = time.monotonic()
        return len(events)

    def _read_events(self) -> tuple[list[tuple[float, int, str]], int]:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrangebyscore(self._key("index"), f"({self._seq}", "+inf", withscores=True)
            pipe.zrangebyscore(self._key("tomb"), f"({self._seq}", "+inf", withscores=True)
            pipe.zcard(self._key("index"))
            added, dead, total = pipe.execute()
        events = [(s, 1, _text(m)) for m, s in added] + [(s, 0, _text(m)) for m, s in dead]
        events.sort()
        return events, int(total)

    def _apply(self, events: list[tuple[float, int, str]]) -> int:
        """Apply events in sequence order; returns additions skipped (evicted since)."""
        new = [pid for _, op, pid in events if op == 1]
        embs: list[Any] = []
        metas: list[Any] = []
        if new:
            embs = list(self.redis.hmget(self._key("emb"), new))  # type: ignore[arg-type]
            with self.redis.pipeline(transaction=False) as pipe:
                for pid in new:
                    pipe.hget(keys.cache_meta_key(self.namespace, pid), "ks")
                metas = pipe.execute()
        got = dict(zip(new, zip(embs, metas, strict=True), strict=True))
        skipped = 0
        for _, op, pid in events:
            if op == 0:
                self.index.remove(pid)
                continue
            emb, ks = got[pid]
            if emb is None or ks is None:  # evicted after the read: its tomb comes next
                skipped += 1
                continue
            vec = np.frombuffer(bytes(emb), dtype=np.float32)
            self.index.add(pid, vec, [int(k) for k in _text(ks).split(",") if k])
        if events:
            self._seq = max(self._seq, max(s for s, _, _ in events))
        return skipped

    def stats(self) -> dict[str, int]:
        """``entries``, ``bytes`` stored and ``budget_bytes`` of the namespace."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zcard(self._key("index"))
            pipe.get(self._key("bytes"))
            n, used = pipe.execute()
        return {"entries": int(n), "bytes": int(used or 0), "budget_bytes": self.budget_bytes}


def registry_cache(client: redis.Redis, registry: Registry, width: int, height: int,
                   budget_bytes: int = 1 << 30, refresh_s: float = 1.0) -> LatentCache | None:
    """The namespace the registry's cache tiers read for ``width`` x ``height`` images
    (their model and N; the first cache tier's when several models have some), or None
    when the registry has no cache tier. For the classifier: ``registry_cache(...)
    .nearest(embedding)``, with the embedding from
    ``services.worker.embed.load_embedder(resolve_model(tier.model))``."""
    tier = next((t for t in registry.tiers if t.strategy is Strategy.CACHE), None)
    if tier is None:
        return None
    ns = cache_namespace(tier.model, tier.steps, width, height)
    return LatentCache(client, ns, tier.steps, budget_bytes, refresh_s=refresh_s)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

