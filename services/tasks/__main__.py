"""``python -m services.tasks``: the arq worker for webhooks and maintenance."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from arq import cron, func
from arq.connections import RedisSettings
from arq.worker import Worker

from common.logging import configure_logging
from common.redisutil import connect
from common.settings import TaskSettings
from common.webhooks import WEBHOOK_TASK
from services.tasks.maintenance import maintenance
from services.tasks.webhooks import deliver_webhook


def _schedule(period_s: int) -> dict[str, Any]:
    """arq cron fields that fire every ``period_s`` seconds (rounded to what cron can say)."""
    if period_s < 60:
        return {"second": set(range(0, 60, period_s))}
    minutes = max(1, period_s // 60)
    return {"minute": set(range(0, 60, minutes)), "second": {0}}


def build_worker(settings: TaskSettings) -> Worker:
    """An arq Worker running webhook deliveries and the maintenance cron."""

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["redis_raw"] = connect(settings.redis_url)

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["redis_raw"].aclose()

    return Worker(
        functions=[func(deliver_webhook, name=WEBHOOK_TASK,
                        max_tries=settings.webhook_max_tries)],
        cron_jobs=[cron(maintenance, run_at_startup=True, unique=True,
                        **_schedule(settings.maintenance_period_s))],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        poll_delay=0.2,
        handle_signals=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the arq worker until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m services.tasks", description=__doc__)
    parser.parse_args(argv)
    settings = TaskSettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    asyncio.set_event_loop(asyncio.new_event_loop())
    build_worker(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
