"""The ``argus`` console script: one entry point, one sub-command group per area.

Each area module exposes ``register(subparsers)`` that adds its commands and sets
``func`` on the parsed namespace; ``main`` dispatches to it and returns its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Areas are imported lazily by name so that ``argus --help`` stays fast and an area with
# heavy imports (torch) costs nothing to the others.
AREAS: dict[str, str] = {
    "up": "services.up",
    "demo": "services.demo",
    "world": "world.cli",
    "bench": "services.controller.bench",
    "classifier": "services.classifier.cli",
    "profile": "services.profile.cli",
    "tiers": "services.profile.tiers_cli",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser; imports every area module."""
    parser = argparse.ArgumentParser(prog="argus", description=__doc__)
    sub = parser.add_subparsers(dest="area", required=True)
    for module in AREAS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``argus`` CLI; returns the process exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
