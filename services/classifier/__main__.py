"""``python -m services.classifier [--check]``: decides each prompt's tier and routes it.

See :mod:`common.service_main` for ``--check`` and the exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.service_main import service_main
from common.settings import ClassifierSettings
from common.tiers import RegistryError
from services.classifier.policies import PolicyError
from services.classifier.service import check, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the classifier (or its health check); returns the process exit code."""
    return service_main("classifier",
        "decides each prompt's tier and routes it.",
        ClassifierSettings,
        run, check, (RegistryError, PolicyError), argv)


if __name__ == "__main__":
    sys.exit(main())
