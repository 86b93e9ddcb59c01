"""Which log folders `osstune watch` serves for a path, and its errors (no server needed except for the last)."""

from __future__ import annotations

import socket
from contextlib import closing
from pathlib import Path

import pytest

from osstune.errors import OsstuneError
from osstune.tracking.watch import DB_NAME, WatchArgs, find_swanlogs, watch


def local_log(swanlog: Path) -> Path:
    """A folder that looks like a local-mode SwanLab log (the database file is enough to be found)."""
    swanlog.mkdir(parents=True)
    (swanlog / DB_NAME).write_bytes(b"")
    (swanlog / "run-20250101_000000-abc").mkdir()
    return swanlog


def test_run_folder_swanlog_folder_and_swanlab_run_folder(tmp_path: Path) -> None:
    swanlog = local_log(tmp_path / "v0-20250101-000000" / "swanlog")
    assert find_swanlogs(tmp_path / "v0-20250101-000000") == [swanlog]
    assert find_swanlogs(swanlog) == [swanlog]
    assert find_swanlogs(swanlog / "run-20250101_000000-abc") == [swanlog]


def test_output_folder_lists_runs_in_version_order(tmp_path: Path) -> None:
    logs = [local_log(tmp_path / f"v{n}-2025010{n % 10}-000000" / "swanlog") for n in (10, 2, 0)]
    (tmp_path / "v3-20250103-000000").mkdir()
    assert find_swanlogs(tmp_path) == [logs[2], logs[1], logs[0]]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OsstuneError, match="no such folder"):
        find_swanlogs(tmp_path / "nope")


def test_no_local_log_explains_why(tmp_path: Path) -> None:
    (tmp_path / "v0-20250101-000000").mkdir()
    (tmp_path / "v0-20250101-000000" / "logging.jsonl").write_text("{}\n")
    with pytest.raises(OsstuneError) as exc:
        find_swanlogs(tmp_path / "v0-20250101-000000")
    assert "no local SwanLab log" in str(exc.value)
    assert "--swanlab_mode local" in str(exc.value)
    assert "osstune report" in str(exc.value)


def test_port_in_use(tmp_path: Path) -> None:
    local_log(tmp_path / "swanlog")
    with closing(socket.socket()) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OsstuneError, match="Pick another port with --port"):
            watch(tmp_path, port=port)


def test_server_failure_reports_its_output(tmp_path: Path) -> None:
    swanlog = local_log(tmp_path / "swanlog")
    (swanlog / DB_NAME).write_bytes(b"this is not a database")
    with closing(socket.socket()) as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(OsstuneError) as exc:
        watch(tmp_path, port=port, timeout_s=30)
    assert "the SwanLab dashboard did not start" in str(exc.value)
    assert "file is not a database" in str(exc.value)


def test_watch_args_defaults() -> None:
    args = WatchArgs(path="output")
    assert (args.path, args.port, args.host) == ("output", 5092, "127.0.0.1")
