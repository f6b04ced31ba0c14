"""Every Redis key, stream, group and channel name Argus uses, with their TTLs.

No literal key string appears anywhere else in the code base: build names here.
The prefix is ``t2i:`` (see ``../shared/DESIGN.md``).
"""

from __future__ import annotations

PREFIX = "t2i"

# Streams and consumer groups (the request path).
PROMPT_STREAM = f"{PREFIX}:stream:prompts"
CLASSIFIER_GROUP = "classifier"
WORKER_GROUP = "workers"
DEAD_LETTER_STREAM = f"{PREFIX}:stream:dead"

# Plans published by the controller.
ALLOC_CURRENT = f"{PREFIX}:alloc:current"
ALLOC_UPDATES = f"{PREFIX}:alloc:updates"

# Jobs that are accepted and not yet terminal (sorted set, score = enqueue time).
INFLIGHT = f"{PREFIX}:inflight"
# Jobs whose images are stored (sorted set, score = when the images expire).
RESULTS_EXPIRY = f"{PREFIX}:results:expiry"
# Arrival counter per second bucket (hash: epoch second -> count), read by the controller.
ARRIVALS = f"{PREFIX}:arrivals"
# Predicted-tier counts per second bucket (hash: "<epoch second>:<tier>" -> count),
# written by the classifier, read (and trimmed) by the controller.
MIX = f"{PREFIX}:mix"
# The controller's latest observation and solution (JSON ``ControllerState``, with TTL),
# read by the gateway (``/v1/tiers``) and the classifier (per-tier queueing delay).
CONTROLLER_STATE = f"{PREFIX}:controller:state"
# The controller's overload estimate (JSON ``OverloadEstimate``, with TTL), read by the
# gateway to answer 429 with Retry-After.
OVERLOAD = f"{PREFIX}:overload"
# Consumer name prefix under which the controller takes entries of a tier left without
# workers (before moving them to a tier that has workers).
REHOME_CONSUMER = "controller-rehome"

# TTLs (seconds) of the per-job keys; defaults, overridable through settings.
JOB_TTL_S = 24 * 3600
RESULT_TTL_S = 3600
IDEMPOTENCY_TTL_S = 24 * 3600
CANCEL_TTL_S = 24 * 3600
DELIVERY_ERROR_TTL_S = 24 * 3600


def tier_stream(tier: int) -> str:
    """Stream of jobs routed to ``tier`` (consumed by group ``workers``)."""
    return f"{PREFIX}:stream:tier:{tier}"


def tier_stream_pattern() -> str:
    """SCAN pattern matching every tier stream."""
    return f"{PREFIX}:stream:tier:*"


def mix_field(second: int, tier: int) -> str:
    """Field of ``MIX`` counting predictions of ``tier`` during epoch ``second``."""
    return f"{second}:{tier}"


def job_key(job_id: str) -> str:
    """Hash holding a job's state, timings and outcome."""
    return f"{PREFIX}:job:{job_id}"


def result_key(job_id: str, index: int = 0) -> str:
    """PNG bytes of image ``index`` of a job."""
    return f"{PREFIX}:result:{job_id}:{index}"


def events_channel(job_id: str) -> str:
    """Pub/sub channel carrying a job's status and progress events."""
    return f"{PREFIX}:events:{job_id}"


def cancel_key(job_id: str) -> str:
    """Flag set when a client cancels a job; workers check it between steps."""
    return f"{PREFIX}:cancel:{job_id}"


def idem_key(key: str) -> str:
    """Idempotency-Key record: the job id and the hash of the request body."""
    return f"{PREFIX}:idem:{key}"


def heartbeat_key(service: str, instance: str) -> str:
    """Heartbeat of one service instance (PSETEX, value = JSON heartbeat)."""
    return f"{PREFIX}:hb:{service}:{instance}"


def heartbeat_pattern(service: str) -> str:
    """SCAN pattern matching every heartbeat of ``service``."""
    return f"{PREFIX}:hb:{service}:*"


def delivery_errors_key(stream: str) -> str:
    """Hash: stream entry id -> last processing error (kept for the dead-letter stream)."""
    return f"{stream}:errors"


def webhook_job_id(job_id: str) -> str:
    """arq job id of a job's completion webhook (deduplicates deliveries)."""
    return f"{PREFIX}:webhook:{job_id}"


# Approximate cache (NIRVANA-style latents + prompt embeddings), one namespace per
# (model, schedule length, image size): see ``services/worker/cache.py``.
CACHE_PREFIX = f"{PREFIX}:cache"


def cache_prefix(namespace: str) -> str:
    """Common prefix of every key of one cache namespace (the Lua scripts build the
    per-entry keys below from it, so the two must stay in step)."""
    return f"{CACHE_PREFIX}:{namespace}"


def cache_latent_key(namespace: str, prompt_id: str, k: int) -> str:
    """Encoded latent of a cached prompt after ``k`` denoising steps."""
    return f"{cache_prefix(namespace)}:lat:{prompt_id}:{k}"


def cache_meta_key(namespace: str, prompt_id: str) -> str:
    """Hash of a cached prompt: prompt text, ks, bytes, hits, benefit, seed."""
    return f"{cache_prefix(namespace)}:meta:{prompt_id}"



CACHE_PARTS = ("index", "tomb", "lcbfu", "emb", "bytes", "seq")
"""Per-namespace cache structures: ``index`` (zset prompt id -> insertion sequence),
``tomb`` (zset of evicted ids -> eviction sequence), ``lcbfu`` (zset id -> eviction
score), ``emb`` (hash id -> float32 embedding), ``bytes`` and ``seq`` (counters)."""


def cache_part_key(namespace: str, part: str) -> str:
    """One of the namespace-wide structures named in ``CACHE_PARTS``."""
    if part not in CACHE_PARTS:
        raise ValueError(f"unknown cache part {part!r}; one of {CACHE_PARTS}")
    return f"{cache_prefix(namespace)}:{part}"
