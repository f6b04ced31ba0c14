"""The ``loadgen`` console script (also ``python -m loadgen``).

Sub-commands:

* ``replay``: replay an arrival trace against the gateway, write per-request records and
  a summary (:mod:`loadgen.replay_cli`).
* ``inspect``: the operator's view of streams, dead letters, backlog, plan and live
  services, read from Redis (:mod:`loadgen.inspector`).
* ``simulate``: a discrete-event simulation of the cluster on a trace, with the services'
  own policies (:mod:`loadgen.simulate`).
* ``plot``: PNG figures from one or several replay or simulation results
  (:mod:`loadgen.plot`).
* ``bench``: every policy on both traces in two scenarios, simulated; writes
  ``docs/RESULTS.md`` (:mod:`loadgen.bench`).

Each sub-command module provides ``add_parser(subparsers)``, which sets ``func`` on the
parsed namespace; ``main`` dispatches to it and returns its exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loadgen import bench, inspector, plot, replay_cli, simulate


def build_parser() -> argparse.ArgumentParser:
    """The full ``loadgen`` parser."""
    parser = argparse.ArgumentParser(prog="loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    replay_cli.add_parser(sub)
    inspector.add_parser(sub)
    simulate.add_parser(sub)
    plot.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loadgen`` CLI with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
