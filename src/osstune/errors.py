"""Errors that reach the user as a clear message and exit code 2, never as a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class OsstuneError(Exception):
    """An error caused by the user's input or environment; the CLI prints it and exits with code 2."""

    exit_code = 2


@dataclass
class DataError(OsstuneError):
    """A problem in one dataset record.

    Args:
        problem: what is wrong, in one sentence.
        fix: what the user should do about it.
        source: the file (or dataset name) the record came from.
        record: 1-based line number for JSONL/CSV, or 0-based row index for JSON arrays and parquet.
        field: the JSON path of the offending field, e.g. ``messages[2].content``.
        reason: a short stable key used to count skipped records under ``--strict false``.
    """

    problem: str
    fix: str = ""
    source: str | None = None
    record: str | None = None
    field: str | None = None
    reason: str = "invalid"

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = ", ".join(
            part for part in (self.source, self.record, f"field {self.field}" if self.field else None) if part
        )
        text = f"{where}: {self.problem}" if where else self.problem
        return f"{text}\n  fix: {self.fix}" if self.fix else text

    def __str__(self) -> str:
        return self.message

    def located(self, source: str | None = None, record: str | None = None) -> "DataError":
        """Return a copy that also names where the record came from (keeps what is already set)."""
        return DataError(
            problem=self.problem,
            fix=self.fix,
            source=self.source or source,
            record=self.record or record,
            field=self.field,
            reason=self.reason,
        )
