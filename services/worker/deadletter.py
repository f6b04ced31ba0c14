"""Reading back dead letters (``t2i:stream:dead``), shared by the worker and classifier.

``StreamConsumer.reclaim`` moves entries over ``max_deliveries`` to the dead-letter
stream and drops their recorded error from the errors hash; the error survives only in
the dead letter, which is where the job's failure reason is read from.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from common import keys
from common.redisutil import text
from common.streams import Entry

FALLBACK_ERROR = "max deliveries exceeded"


async def dead_letter_error(redis: aioredis.Redis, entry: Entry, scan: int = 200) -> str:
    """The error recorded with ``entry``'s dead letter, or :data:`FALLBACK_ERROR`.

    Only the newest ``scan`` dead letters are searched (the entry was just moved there).
    """
    for _id, fields in await redis.xrevrange(keys.DEAD_LETTER_STREAM, count=scan):
        if (text(fields.get(b"source_id")) == entry.id
                and text(fields.get(b"source_stream")) == entry.stream):
            return text(fields.get(b"error")) or FALLBACK_ERROR
    return FALLBACK_ERROR
