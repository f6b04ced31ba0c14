"""``python -m services.worker [--check]``: one worker process per GPU.

Configuration comes from ``T2I_*`` environment variables
(``common.settings.WorkerSettings``). ``--check`` exits 0 when any worker heartbeat is
live, else 1 (instance names are per process, so a probe cannot name its own instance);
compose uses it as the healthcheck. A configuration error exits 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from common.logging import configure_logging
from common.settings import WorkerSettings
from common.tiers import RegistryError
from services.worker.backends import BackendError
from services.worker.service import check, run

log = logging.getLogger("services.worker")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker (or its health check); returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m services.worker",
                                     description="Argus worker: one worker process per GPU.")
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if a worker heartbeat is live, else 1")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    settings = WorkerSettings()
    if args.check:
        return 0 if asyncio.run(check(settings)) else 1
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    try:
        asyncio.run(run(settings))
    except (RegistryError, BackendError) as exc:
        log.error("configuration error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
