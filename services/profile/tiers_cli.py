"""``argus tiers show [--tiers FILE] [--json]``: print the active tier registry
(``T2I_TIERS_FILE``, default ``profiles/tiers.yaml``), validated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.settings import CommonSettings
from common.tiers import RegistryError, load_registry


def cmd_show(args: argparse.Namespace) -> int:
    """Print the registry (a table, or JSON with ``--json``); 2 when it is invalid."""
    path = Path(args.tiers) if args.tiers else CommonSettings().tiers_file
    try:
        reg = load_registry(path)
    except RegistryError as exc:
        print(str(exc), file=sys.stderr)  # noqa: T201
        return 2
    if args.json:
        print(reg.model_dump_json(indent=1))  # noqa: T201
        return 0
    print(f"{reg.name} ({path}); default device {reg.device}")  # noqa: T201
    print(f"{'id':>3} {'name':<14} {'strategy':<8} {'N':>3} {'K':>3} {'g':>4} "  # noqa: T201
          f"{'s/img b=1':>10}  model")
    for t in reg.tiers:
        lat = t.batch_latency(reg.device, 1)
        print(f"{t.id:>3} {t.name:<14} {t.strategy.value:<8} {t.steps:>3} "  # noqa: T201
              f"{t.skip:>3} {t.guidance:>4} {lat if lat is not None else '-':>10}  "
              f"{t.model}")
    return 0


def register(sub: Any) -> None:
    """Add ``argus tiers show`` to the CLI."""
    p = sub.add_parser("tiers", help="the tier registry")
    ps = p.add_subparsers(dest="tiers_cmd", required=True)
    show = ps.add_parser("show", help="print the active registry")
    show.add_argument("--tiers", default=None, help="registry file (default T2I_TIERS_FILE)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
