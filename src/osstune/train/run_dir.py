"""Run folders laid out like ms-swift's: ``OUTPUT_DIR/v{N}-{YYYYMMDD-HHMMSS}/`` with a secrets-free ``args.json``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any

RUN_NAME = re.compile(r"^v(\d+)-\d{8}-\d{6}$")
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)
REDACTED = "***"


def new_run_dir(output_dir: Path, now: _dt.datetime | None = None) -> Path:
    """Create and return the next run folder ``v{N}-{timestamp}`` under ``output_dir`` (N = highest + 1)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in output_dir.iterdir() if (m := RUN_NAME.match(p.name))]
    n = max(taken, default=-1) + 1
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    while True:
        path = output_dir / f"v{n}-{stamp}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def redact(value: Any) -> Any:
    """Drop secrets from a config: values of keys that name a key, token, secret or password become ``***``."""
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


