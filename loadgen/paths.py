"""Where the shared data lives (traces, prompt sets), and how a user-given path is resolved.

The data directory is ``$T2I_DATA_DIR`` when set, else ``<repo>/../shared/data`` (CI runs
with a copy of ``shared/`` beside the clone). Data files are read in place, never copied.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.settings import REPO_ROOT


def data_dir() -> Path:
    """The shared data directory (it may not exist on a machine without the data)."""
    env = os.environ.get("T2I_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def resolve_data_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else the same relative path under :func:`data_dir`.

    So ``traces/AzureLLMInferenceTrace_code.csv`` works from any directory. When neither
    exists, ``path`` is returned unchanged and the reader reports it as missing.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    candidate = data_dir() / p
    return candidate if candidate.exists() else p
