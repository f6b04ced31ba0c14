"""The shared ``main()`` of headless services: ``python -m services.<name> [--check]``.

Configuration comes from ``T2I_*`` environment variables. ``--check`` exits 0 when any
heartbeat of the service is live, else 1 (instance names are per process, so a probe
cannot name its own instance); compose uses it as the healthcheck. A configuration error
exits 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from common.logging import configure_logging
from common.settings import CommonSettings

S = TypeVar("S", bound=CommonSettings)


def service_main(name: str, description: str, make_settings: Callable[[], S],
                 run: Callable[[S], Coroutine[Any, Any, None]],
                 check: Callable[[S], Coroutine[Any, Any, bool]],
                 config_errors: tuple[type[Exception], ...],
                 argv: Sequence[str] | None = None) -> int:
    """Parse ``--check``, build the settings, run the service; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}",
                                     description=f"Argus {name}: {description}")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 0 if a {name} heartbeat is live, else 1")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    settings = make_settings()
    if args.check:
        return 0 if asyncio.run(check(settings)) else 1
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    try:
        asyncio.run(run(settings))
    except config_errors as exc:
        logging.getLogger(f"services.{name}").error("configuration error: %s", exc)
        return 2
    return 0


def stop_on_signals() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT; call from inside the running event loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
