"""``python -m services.controller [--check]``: publishes the allocation plan.

See :mod:`common.service_main` for ``--check`` and the exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.service_main import service_main
from common.settings import ControllerSettings
from common.tiers import RegistryError
from services.controller.policies import PolicyError
from services.controller.service import check, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the controller (or its health check); returns the process exit code."""
    return service_main("controller",
        "publishes the allocation plan.",
        ControllerSettings,
        run, check, (RegistryError, PolicyError), argv)


if __name__ == "__main__":
    sys.exit(main())
