"""Prompt sets for replays, and their seeded assignment to arrivals.

Sources, chosen by :func:`load_prompts` from the path's extension:

* ``.tsv``: PartiPrompts (column ``Prompt``).
* ``.json``: DiffusionDB (a list of ``{"text", "image"}``) or a plain list of strings.
* ``.jsonl``: GenEval metadata (key ``prompt``; ``text`` accepted too).
* anything else: plain text, one prompt per non-blank line.
* the word ``world``: held-out captions of the project's small world
  (``world.scenes.heldout_captions``), imported only when asked for.

Guarantees: prompts are returned in file order, stripped, blanks dropped; an empty set
or an unreadable file raises :class:`PromptError` naming the file (and line, for JSONL).
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.paths import resolve_data_path

WORLD = "world"
# world.scenes has a few hundred held-out caption combinations and slows down sharply
# when asked for more distinct ones than exist, so draw this many and cycle through them.
WORLD_MAX_DISTINCT = 64


class PromptError(ValueError):
    """A prompt source is missing, malformed, empty or unavailable."""


def _clean(items: list[Any], where: str) -> list[str]:
    out = [s.strip() for s in items if isinstance(s, str) and s.strip()]
    if not out:
        raise PromptError(f"{where}: no prompts found")
    return out


def _read_tsv(p: Path) -> list[str]:
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        column = fields.get("prompt")
        if column is None:
            raise PromptError(f"{p}:1: no 'Prompt' column in {reader.fieldnames}")
        return _clean([row.get(column) for row in reader], str(p))


def _read_json(p: Path) -> list[str]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromptError(f"{p}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    if not isinstance(data, list):
        raise PromptError(f"{p}: expected a JSON list of prompts or of {{'text': ...}}")
    items = [d.get("text", d.get("prompt")) if isinstance(d, dict) else d for d in data]
    return _clean(items, str(p))


def _read_jsonl(p: Path) -> list[str]:
    items: list[Any] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(f"{p}:{lineno}: not valid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise PromptError(f"{p}:{lineno}: expected an object with a 'prompt' key")
            items.append(obj.get("prompt", obj.get("text")))
    return _clean(items, str(p))


def world_prompts(n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct held-out captions of the small world (at most 64, see module).

    Raises:
        PromptError: the ``world`` package (``world.scenes.heldout_captions``) is absent.
    """
    try:
        scenes = importlib.import_module("world.scenes")
        heldout = scenes.heldout_captions
    except (ImportError, AttributeError) as exc:
        raise PromptError("the 'world' prompt source needs world.scenes.heldout_captions "
                          f"(the small-world package), which is unavailable: {exc}") from exc
    pairs = heldout(max(1, min(n, WORLD_MAX_DISTINCT)), seed)
    return _clean(list(dict.fromkeys(str(caption) for caption, _meaning in pairs)), WORLD)


def load_prompts(source: str | Path, *, n: int = WORLD_MAX_DISTINCT, seed: int = 0) -> list[str]:
    """Load a prompt set by path (format from the extension) or the word ``world``.

    Args:
        source: a file path (relative paths are also looked up in the shared data
            directory) or ``"world"``.
        n: how many prompts the ``world`` source should draw (ignored for files).
        seed: seed of the ``world`` draw (ignored for files).

    Raises:
        PromptError: missing or unreadable file, bad content, or no prompts.
    """
    if str(source) == WORLD:
        return world_prompts(n, seed)
    p = resolve_data_path(source)
    suffix = p.suffix.lower()
    try:
        if suffix == ".tsv":
            return _read_tsv(p)
        if suffix == ".json":
            return _read_json(p)
        if suffix == ".jsonl":
            return _read_jsonl(p)
        return _clean(p.read_text(encoding="utf-8").splitlines(), str(p))
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt file {p} is not readable: {exc}") from exc


def assign(prompts: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` prompts for ``n`` arrivals: seeded shuffles of the set, concatenated.

    Every prompt is used once before any is used twice (a fresh permutation per pass), so
    short replays cover the set evenly. Same inputs and seed, same list.
    """
    if not prompts:
        raise PromptError("cannot assign from an empty prompt set")
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    passes = -(-n // len(prompts))
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(passes)])[:n]
    return [prompts[int(i)] for i in order]


def assign_ids(prompts: list[str], prompt_ids: list[int]) -> list[str]:
    """Prompts for a trace that names them: ``prompts[id % len(prompts)]`` per arrival."""
    if not prompts:
        raise PromptError("cannot assign from an empty prompt set")
    return [prompts[i % len(prompts)] for i in prompt_ids]
