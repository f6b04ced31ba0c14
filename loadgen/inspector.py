"""``loadgen inspect``: the operator's view of the queues, plan and services, from Redis.

Read-only: it runs XLEN, XINFO GROUPS/CONSUMERS, XREVRANGE, ZCARD, GET and SCAN, and
never writes. One snapshot is gathered with several commands, so counts may be a few
milliseconds apart. Group ``lag`` comes from XINFO GROUPS (Redis 7); where the server
cannot compute it (nil, or an older server), the stream length is shown instead and
``lag_exact`` is false.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from common import keys
from common.heartbeat import live_services, live_workers
from common.messages import AllocationPlan, now
from common.redisutil import aw, connect, text

DEAD_LETTERS_SHOWN = 5
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SERVICES = ("classifier", "controller")


def _tier_of(stream: str) -> int:
    match = re.search(r"(\d+)$", stream)
    return int(match.group(1)) if match else 1 << 30


async def stream_names(redis: aioredis.Redis) -> list[str]:
    """The prompt stream, then every tier stream in tier order.

    ``:errors`` hashes, and any other non-stream key the pattern matches, are skipped.
    """
    found = {text(k) async for k in redis.scan_iter(match=keys.tier_stream_pattern())}
    tiers = [k for k in found
             if not k.endswith(":errors") and text(await redis.type(k)) == "stream"]
    return [keys.PROMPT_STREAM, *sorted(tiers, key=_tier_of)]


async def stream_info(redis: aioredis.Redis, name: str) -> dict[str, Any]:
    """Length, groups (lag, pending, consumers with pending and idle ms) of one stream."""
    length = int(await redis.xlen(name))
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(name)
    except ResponseError:  # no such key, or a key that is not a stream
        groups = []
    out: list[dict[str, Any]] = []
    for g in groups:
        gname = text(g.get("name"))
        lag = g.get("lag")
        consumers = await redis.xinfo_consumers(name, gname)
        out.append({
            "name": gname, "pending": int(g.get("pending", 0)),
            "lag": int(lag) if lag is not None else length, "lag_exact": lag is not None,
            "last_delivered_id": text(g.get("last-delivered-id")),
            "consumers": [{"name": text(c.get("name")), "pending": int(c.get("pending", 0)),
                           "idle_ms": int(c.get("idle", 0))} for c in consumers],
        })
    return {"stream": name, "length": length, "groups": out}


async def dead_letters(redis: aioredis.Redis) -> dict[str, Any]:
    """Length of the dead-letter stream and its newest entries (reason, error, job)."""
    length = int(await redis.xlen(keys.DEAD_LETTER_STREAM))
    last: list[dict[str, Any]] = []
    for entry_id, raw in await redis.xrevrange(keys.DEAD_LETTER_STREAM,
                                               count=DEAD_LETTERS_SHOWN):
        fields = {text(k): text(v) for k, v in raw.items()}
        try:
            job_id = str(json.loads(fields.get("data", "{}")).get("job_id", ""))
        except (ValueError, AttributeError):
            job_id = ""
        last.append({"id": text(entry_id), "job_id": job_id,
                     **{k: fields.get(k, "") for k in ("source_stream", "reason", "error",
                                                       "deliveries", "dead_at")}})
    return {"length": length, "last": last}


async def current_plan(redis: aioredis.Redis) -> dict[str, Any] | None:
    """The published plan (version, policy, assignments, GPUs per tier), or None."""
    raw = await redis.get(keys.ALLOC_CURRENT)
    if raw is None:
        return None
    try:
        plan = AllocationPlan.model_validate_json(raw)
    except ValidationError as exc:
        return {"error": f"unreadable plan: {exc.errors()[0]['msg']}"}
    return {"version": plan.version, "policy": plan.policy,
            "age_s": round(now() - plan.created_at, 3), "assignments": plan.assignments,
            "gpus_per_tier": {str(k): v for k, v in plan.gpus_per_tier.items()}}


async def collect(redis: aioredis.Redis) -> dict[str, Any]:
    """One snapshot of streams, dead letters, backlog, plan, workers and services."""
    t = now()
    streams = [await stream_info(redis, name) for name in await stream_names(redis)]
    workers = [{"instance": w.instance, "tier": w.tier, "model": w.model, "busy": w.busy,
                "plan_version": w.plan_version, "jobs_done": w.jobs_done,
                "age_s": round(t - w.at, 3)} for w in await live_workers(redis)]
    services = {s: [{"instance": h.instance, "age_s": round(t - h.at, 3), "detail": h.detail}
                    for h in await live_services(redis, s)] for s in SERVICES}
    return {"at": t, "streams": streams, "dead_letters": await dead_letters(redis),
            "backlog": int(await aw(redis.zcard(keys.INFLIGHT))),
            "plan": await current_plan(redis), "workers": workers, "services": services}


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers, *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in cells]


def render(snap: dict[str, Any]) -> str:
    """The snapshot as human-readable tables."""
    rows: list[list[Any]] = []
    for s in snap["streams"]:
        if not s["groups"]:
            rows.append([s["stream"], s["length"], "-", None, None, ""])
        for g in s["groups"]:
            cons = ", ".join(f"{c['name']}(pending {c['pending']}, idle {c['idle_ms']} ms)"
                             for c in g["consumers"])
            lag = g["lag"] if g["lag_exact"] else f"{g['lag']}*"
            rows.append([s["stream"], s["length"], g["name"], lag, g["pending"], cons])
    out = ["STREAMS (* lag unknown: stream length shown)",
           *_table(["stream", "length", "group", "lag", "pending", "consumers"], rows), ""]
    dead = snap["dead_letters"]
    out.append(f"DEAD LETTERS {dead['length']}")
    out += [f"  {d['id']} job {d['job_id'] or '?'} from {d['source_stream']}: "
            f"{d['reason']}; {d['error'] or 'no error recorded'}" for d in dead["last"]]
    out += ["", f"BACKLOG (accepted, unfinished jobs) {snap['backlog']}", ""]
    plan = snap["plan"]
    if plan is None:
        out.append("PLAN none published")
    elif "error" in plan:
        out.append(f"PLAN {plan['error']}")
    else:
        out.append(f"PLAN v{plan['version']} policy {plan['policy']} age {plan['age_s']} s, "
                   f"GPUs per tier {plan['gpus_per_tier']}")
        out += [f"  {w} -> tier {t}" for w, t in sorted(plan["assignments"].items())]
    out += ["", f"WORKERS {len(snap['workers'])} live"]
    out += _table(["instance", "tier", "model", "busy", "plan", "done", "age_s"],
                  [[w["instance"], w["tier"], w["model"], w["busy"], w["plan_version"],
                    w["jobs_done"], w["age_s"]] for w in snap["workers"]])
    for service, beats in snap["services"].items():
        live = ", ".join(f"{b['instance']} ({b['age_s']} s ago)" for b in beats) or "none"
        out.append(f"{service.upper()} {live}")
    return "\n".join(out) + "\n"


async def inspect(url: str) -> dict[str, Any]:
    """Connect to ``url``, take one snapshot, close."""
    redis = connect(url, health_check_interval=0)
    try:
        return await collect(redis)
    finally:
        await redis.aclose()


def add_parser(sub: Any) -> None:
    """Add the ``inspect`` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("inspect", help="show queues, plan and live services from Redis",
                       description=__doc__)
    p.add_argument("--redis-url", default=os.environ.get("T2I_REDIS_URL", DEFAULT_REDIS_URL),
                   help="Redis URL (default: $T2I_REDIS_URL, else %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``loadgen inspect``; 1 when Redis cannot be reached."""
    try:
        snap = asyncio.run(inspect(args.redis_url))
    except (RedisError, OSError) as exc:
        sys.stderr.write(f"loadgen inspect: cannot read {args.redis_url}: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(snap, indent=2) + "\n" if args.json else render(snap))
    return 0
