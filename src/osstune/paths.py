"""Where osstune keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$OSSTUNE_CACHE``, else ``~/.cache/osstune``: the o200k_harmony files and the dataset cache live below it."""
    return Path(os.environ.get("OSSTUNE_CACHE") or Path.home() / ".cache" / "osstune")
