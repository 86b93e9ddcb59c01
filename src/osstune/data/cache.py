"""On-disk cache of prepared samples, keyed by a hash of everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from osstune.chat.options import IGNORE_INDEX
from osstune.paths import cache_root


def dataset_cache_dir() -> Path:
    """Where prepared datasets are cached: ``$OSSTUNE_DATASET_CACHE``, else ``cache_root()/datasets``."""
    return Path(os.environ.get("OSSTUNE_DATASET_CACHE") or cache_root() / "datasets")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, merges, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:32]


class SampleCache:
    """One cache entry: a folder holding the flattened token arrays and the report.

    Args:
        root: folder holding every entry.
        key: the entry's hash (see ``osstune.data.pipeline.cache_key``).
    """

    def __init__(self, root: Path, key: str) -> None:
        self.path = Path(root) / key

    def load(self) -> tuple[Any, Any, dict[str, Any]] | None:
        """Return ``(train, val_or_None, report_json)``, or None when the entry is absent or unreadable."""
        from osstune.data.pipeline import Prepared

        try:
            meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
            splits = []
            for name in ("train", "val"):
                if name not in meta["splits"]:
                    splits.append(None)
                    continue
                with np.load(self.path / f"{name}.npz") as z:
                    ids, labels, offsets = z["input_ids"], z["labels"], z["offsets"]
                part = Prepared()
                info = meta["splits"][name]
                for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
                    part.append(info["sources"][i], info["indices"][i], ids[a:b], labels[a:b])
                splits.append(part)
            return splits[0], splits[1], meta["report"]
        except (OSError, KeyError, ValueError, json.JSONDecodeError):
            return None

    def save(self, train: Any, val: Any, report: dict[str, Any]) -> None:
        """Write the entry atomically (a temporary folder renamed into place)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.path.parent))
        try:
            meta: dict[str, Any] = {"splits": {}, "report": report, "ignore_index": IGNORE_INDEX}
            for name, part in (("train", train), ("val", val)):
                if part is None:
                    continue
                lengths = [len(x) for x in part.input_ids]
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                np.savez(tmp / f"{name}.npz", input_ids=np.concatenate(part.input_ids),
                         labels=np.concatenate(part.labels), offsets=offsets)
                meta["splits"][name] = {"sources": part.sources, "indices": part.indices}
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
