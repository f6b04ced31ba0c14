"""``argus classifier train|eval``: the LightGBM tier classifier from the quality table.

- ``argus classifier train [--table CSV] [--tiers YAML] [--tolerance T] [--out DIR]``
  trains on the training prompt groups, writes ``DIR/model.json`` and
  ``DIR/report.json`` (the held-out report, ``services.classifier.train``) and prints a
  summary (``--json``: the whole report).
- ``argus classifier eval [--model FILE] [--table CSV] [--tiers YAML] [--json]`` prints
  the same report for a saved model on the held-out groups of the (current) table.

Exit codes: 0 done; 2 bad input (missing table or model, registry/table mismatch).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.settings import REPO_ROOT, ClassifierSettings

log = logging.getLogger(__name__)

DEFAULT_TABLE = REPO_ROOT / "profiles" / "world_quality.csv"
DEFAULT_OUT = REPO_ROOT / "models" / "classifier"


def _summary(report: dict[str, Any]) -> str:
    def line(name: str, m: dict[str, Any]) -> str:
        svo = m.get("saving_vs_oracle")
        return (f"{name:16s} safe {m['safe_rate']:.3f}  saving {m['saving']:.3f}  "
                f"vs oracle {'-' if svo is None else f'{svo:.3f}'}  acc {m['accuracy']:.3f}")

    rows = [f"held-out prompts: {report['n']} (confidence {report['confidence']}, "
            f"tolerance {report['tolerance']}, costs {report['cost_source']})",
            line("lgbm", report)]
    rows += [line(n, m) for n, m in report["baselines"].items()]
    if report.get("multiclass_argmax"):
        rows.append(line("multiclass", report["multiclass_argmax"]))
    for name, c in (report.get("seed_consistency") or {}).items():
        rows.append(f"label noise {name:10s} half-correlation {c['half_corr']:.3f}  "
                    f"same verdict {c['safe_agreement']:.3f}  ({int(c['seeds'])} seeds)")
    return "\n".join(rows)


def _label_noise(report: dict[str, Any], table: str | Path, tolerance: float) -> None:
    """Add how much of the labels is seed noise: the noise floor file, and the split-half
    consistency of every tier's loss when the table has two or more seeds."""
    import csv

    from services.classifier.features import noise_floor
    from services.profile.report import seed_consistency

    report["noise_floor"] = noise_floor(table, tolerance)
    with Path(table).open(newline="") as f:
        report["seed_consistency"] = seed_consistency(list(csv.DictReader(f)), tolerance)


def cmd_train(args: argparse.Namespace) -> int:
    """Train, save model + report, print the report."""
    from common.tiers import RegistryError, load_registry
    from services.classifier.features import load_embedder, read_table
    from services.classifier.train import Params, compare_multiclass, train

    s = ClassifierSettings()
    try:
        registry = load_registry(args.tiers or s.tiers_file)
        table = read_table(args.table, registry)
        embedder = load_embedder(args.embedder or s.classifier_embedder or "world")
    except (OSError, ValueError, RegistryError) as exc:
        sys.stderr.write(f"argus classifier train: {exc}\n")
        return 2
    tol = s.classifier_tolerance if args.tolerance is None else args.tolerance
    params = Params(tolerance=tol, seed=args.seed, valid_frac=args.valid_frac,
                    target_safe=args.target_safe, threads=args.threads)
    model, report = train(table, registry, embedder, params)
    _label_noise(report, args.table, tol)
    if args.compare_multiclass:
        report["multiclass_argmax"] = compare_multiclass(table, registry, embedder, params)
    out = Path(args.out)
    model.save(out / "model.json")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write((json.dumps(report, indent=1) if args.json else _summary(report)) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Print the held-out report of a saved model."""
    from common.tiers import RegistryError, load_registry
    from services.classifier.features import load_embedder, read_table
    from services.classifier.lgbm import ModelError, load_model
    from services.classifier.train import evaluate

    s = ClassifierSettings()
    try:
        model = load_model(args.model or s.classifier_model)
        registry = load_registry(args.tiers or s.tiers_file)
        table = read_table(args.table, registry)
        embedder = load_embedder(s.classifier_embedder or model.embedder)
    except (OSError, ValueError, RegistryError, ModelError) as exc:
        sys.stderr.write(f"argus classifier eval: {exc}\n")
        return 2
    report = evaluate(model, table, registry, embedder)
    _label_noise(report, args.table, model.tolerance)
    sys.stdout.write((json.dumps(report, indent=1) if args.json else _summary(report)) + "\n")
    return 0


def register(sub: Any) -> None:
    """Add ``argus classifier train|eval`` to the CLI."""
    area = sub.add_parser("classifier", help="the LightGBM tier classifier")
    cmds = area.add_subparsers(dest="classifier", required=True)
    t = cmds.add_parser("train", help="train on the per-prompt quality table")
    t.add_argument("--table", default=str(DEFAULT_TABLE), help="quality CSV")
    t.add_argument("--tiers", default=None, help="tier registry (default T2I_TIERS_FILE)")
    t.add_argument("--tolerance", type=float, default=None,
                   help="safe: relative quality >= 1 - tolerance (default 0.05)")
    t.add_argument("--out", default=str(DEFAULT_OUT), help="model directory")
    t.add_argument("--embedder", default="", help="world[:PATH] | open_clip:MODEL[:TAG]")
    t.add_argument("--seed", type=int, default=0, help="split and LightGBM seed")
    t.add_argument("--valid-frac", type=float, default=0.2, help="held-out share of groups")
    t.add_argument("--target-safe", type=float, default=0.96,
                   help="confidence calibrated to reach this safe-rate (early-stop split)")
    t.add_argument("--threads", type=int, default=2, help="LightGBM threads")
    t.add_argument("--compare-multiclass", action="store_true",
                   help="also report a multiclass/argmax model on the same split")
    t.add_argument("--json", action="store_true", help="print the whole report")
    t.set_defaults(func=cmd_train)
    e = cmds.add_parser("eval", help="held-out report of a saved model")
    e.add_argument("--model", default=None, help="model file (default T2I_CLASSIFIER_MODEL)")
    e.add_argument("--table", default=str(DEFAULT_TABLE), help="quality CSV")
    e.add_argument("--tiers", default=None, help="tier registry (default T2I_TIERS_FILE)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=cmd_eval)
