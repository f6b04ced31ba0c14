"""``python -m services.worker [--check]``: one worker process per GPU.

See :mod:`common.service_main` for ``--check`` and the exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.service_main import service_main
from common.settings import WorkerSettings
from common.tiers import RegistryError
from services.worker.backends import BackendError
from services.worker.service import check, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker (or its health check); returns the process exit code."""
    return service_main("worker",
        "one worker process per GPU.",
        WorkerSettings,
        run, check, (RegistryError, BackendError), argv)


if __name__ == "__main__":
    sys.exit(main())
