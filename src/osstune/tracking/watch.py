"""``osstune watch``: serve the SwanLab dashboard (swanboard) for runs logged in SwanLab's local mode.

The path may be a run folder (its ``swanlog/`` is served), a ``swanlog`` folder, or an output folder holding
several runs. Each local run has its own dashboard database (``swanlog/runs.swanlab``); for several runs the
server builds a combined view in a temporary folder (links to the run data plus a fresh database) so that all runs
appear as experiments of one project, with comparison charts. The server is swanboard's, started in a child
process so that it can be stopped cleanly (:meth:`Dashboard.stop`, or Ctrl+C).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osstune.errors import OsstuneError

DB_NAME = "runs.swanlab"
"""The dashboard database that SwanLab's local mode writes in each ``swanlog`` folder."""


@dataclass
class WatchArgs:
    """Flags of ``osstune watch``."""

    path: str = field(metadata={"positional": True, "help": "A run folder (OUTPUT_DIR/vN-...), an output folder "
                                "holding several runs, or a swanlog folder."})
    port: int = field(default=5092, metadata={"help": "Port of the dashboard."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on; 0.0.0.0 exposes the dashboard "
                                                     "(which can rename and delete runs) to the network."})


def _run_order(path: Path) -> tuple[int, str]:
    """Sort runs ``v2-...`` before ``v10-...``; other names after, alphabetically."""
    match = re.match(r"v(\d+)-", path.name)
    return (int(match.group(1)) if match else sys.maxsize, path.name)


def find_swanlogs(path: Path) -> list[Path]:
    """The SwanLab local-mode log folders to serve for ``path``.

    Args:
        path: a ``swanlog`` folder, a run folder holding ``swanlog/``, a SwanLab run folder (``swanlog/run-...``),
            or an output folder whose run folders hold ``swanlog/``.

    Returns:
        One or more folders, each holding a ``runs.swanlab`` database; runs in version order (v0, v1, ... v10).

    Raises:
        OsstuneError: when ``path`` is not a folder, or holds no local SwanLab log (saying why when it can tell:
            offline runs must be uploaded with ``swanlab sync``).
    """
    if not path.is_dir():
        raise OsstuneError(f"{path}: no such folder. Give a run folder (OUTPUT_DIR/vN-...) or an output folder.")
    for candidate in (path, path / "swanlog", path.parent):
        if (candidate / DB_NAME).is_file():
            return [candidate]
    found = sorted((db.parent for db in path.glob(f"*/swanlog/{DB_NAME}")), key=lambda p: _run_order(p.parent))
    if found:
        return found
    offline = sorted(d for log in (path / "swanlog", *path.glob("*/swanlog")) for d in log.glob("run-*")
                     if d.is_dir())
    if offline:
        listed = "\n".join(f"  swanlab sync {d}" for d in offline)
        raise OsstuneError(f"{path}: the SwanLab logs here were written in offline mode, which the dashboard cannot "
                           f"show. Upload them to SwanLab cloud with:\n{listed}")
    raise OsstuneError(f"{path}: no local SwanLab log (no swanlog/{DB_NAME}). The run was trained with "
                       "--swanlab_mode offline/cloud/disabled or without --report_to swanlab; train with "
                       "--report_to swanlab --swanlab_mode local to watch it, or use `osstune report RUN_DIR` "
                       "for charts from logging.jsonl.")


def _check_port_free(host: str, port: int) -> None:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OsstuneError(f"cannot listen on {host}:{port} ({exc.strerror}); another program (or dashboard) "
                               "may be using it. Pick another port with --port.") from None


class Dashboard:
    """A running dashboard server (a child process). Stop it with :meth:`stop` or by leaving a ``with`` block.

    Args:
        process: the server process.
        url: where the dashboard answers, e.g. ``http://127.0.0.1:5092``.
        swanlogs: the log folders it serves.
        workdir: a temporary folder owned by this dashboard (server log, combined view); removed on stop.
    """

    def __init__(self, process: subprocess.Popen[bytes], url: str, swanlogs: list[Path], workdir: Path) -> None:
        self.process = process
        self.url = url
        self.swanlogs = swanlogs
        self.workdir = workdir

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def server_log(self) -> str:
        """What the server printed so far (empty once stopped)."""
        log = self.workdir / "server.log"
        return log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        return self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (terminate, then kill after ``timeout_s``) and remove the temporary folder.

        Args:
            timeout_s: seconds to wait for a clean exit before killing.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def api_get(url: str, timeout_s: float = 5.0) -> Any:
    """GET a dashboard API path and return the ``data`` of its JSON answer (proxies are bypassed).

    Args:
        url: full URL, e.g. ``http://127.0.0.1:5092/api/v1/project``.
        timeout_s: socket timeout.

    Raises:
        OsstuneError: when the answer is not a success (``code`` 0).
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as resp:
        body = json.loads(resp.read().decode("utf-8"))
    if body.get("code") != 0:
        raise OsstuneError(f"dashboard answered {url} with {body.get('code')}: {body.get('message')}")
    return body["data"]


def watch(path: Path, host: str = "127.0.0.1", port: int = 5092, *, timeout_s: float = 60.0) -> Dashboard:
    """Start the SwanLab dashboard for the runs under ``path`` and return once it answers.

    Args:
        path: a run folder, an output folder holding several runs, or a swanlog folder (see :func:`find_swanlogs`).
        host: address to listen on.
        port: port to listen on; it must be free.
        timeout_s: how long to wait for the server to answer.

    Returns:
        The running :class:`Dashboard`; the caller stops it.

    Raises:
        OsstuneError: no local SwanLab log under ``path``, the port is taken, or the server failed to start
            (with its output).
    """
    swanlogs = [p.resolve() for p in find_swanlogs(Path(path))]
    _check_port_free(host, port)
    workdir = Path(tempfile.mkdtemp(prefix="osstune-watch-"))
    serve_dir = swanlogs[0] if len(swanlogs) == 1 else workdir / "swanlog"
    env = {**os.environ, "SWANLAB_LOG_DIR": str(serve_dir)}
    cmd = [sys.executable, "-m", "osstune.tracking.watch", host, str(port), str(serve_dir), *map(str, swanlogs)]
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    dashboard = Dashboard(process, f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}", swanlogs, workdir)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            api_get(f"{dashboard.url}/api/v1/project", timeout_s=2.0)
            return dashboard
        except OsstuneError as exc:  # it answers, with an error: the log folder is unusable
            problem = str(exc)
        except (OSError, ValueError) as exc:  # not listening yet, or not answering in full
            problem = "" if process.poll() is None and time.monotonic() < deadline else str(exc)
        if problem:
            output = "\n".join(dashboard.server_log().strip().splitlines()[-20:])
            dashboard.stop()
            raise OsstuneError(f"the SwanLab dashboard did not start ({problem}).\n{output}".rstrip())
        time.sleep(0.1)


def _read_experiments(swanlog: Path) -> tuple[str, list[dict[str, Any]]]:
    """Project name and experiments (with their tags) of a local-mode database, read without swanboard."""
    with closing(sqlite3.connect(swanlog / DB_NAME)) as db:
        db.row_factory = sqlite3.Row
        project = db.execute("SELECT name FROM project ORDER BY id LIMIT 1").fetchone()
        experiments = [dict(row) for row in db.execute("SELECT * FROM experiment ORDER BY id")]
        for exp in experiments:
            exp["tags"] = [dict(row) for row in db.execute(
                "SELECT tag.name, tag.folder, tag.type, chart.reference FROM tag "
                "JOIN source ON source.tag_id = tag.id JOIN chart ON chart.id = source.chart_id "
                "WHERE tag.experiment_id = ? AND chart.experiment_id = ? ORDER BY tag.sort, tag.id",
                (exp["id"], exp["id"]))]
    return (project["name"] if project else swanlog.parent.name), experiments


def combine_swanlogs(swanlogs: Sequence[Path], target: Path) -> None:
    """Build one dashboard folder showing the runs of several local-mode log folders.

    Each SwanLab run folder is linked (not copied) into ``target``, and a new ``runs.swanlab`` there lists every
    experiment under one project, with its charts and the project's comparison charts. Runs in progress keep
    updating their existing charts. This binds swanboard's database models to ``target``: call it in the server
    process only.

    Args:
        swanlogs: folders holding ``runs.swanlab`` and ``run-*`` folders.
        target: the folder to create (must not exist).
    """
    from swanboard.db import ChartTypeError, ExistedError, add_multi_chart, connect
    from swanboard.db.models import Chart, Display, Experiment, Namespace, Project, Source, Tag

    sources = [(swanlog, *_read_experiments(swanlog)) for swanlog in swanlogs]
    projects = {name for _, name, _ in sources}
    target.mkdir(parents=True)
    connect(path=str(target), autocreate=True)
    Project.init(name=projects.pop() if len(projects) == 1 else target.parent.name)
    names: set[str] = set()
    for swanlog, _, experiments in sources:
        for exp in experiments:
            link = target / exp["run_id"]
            if link.exists():
                continue
            link.symlink_to(swanlog / exp["run_id"], target_is_directory=True)
            name, n = exp["name"], 1
            while name in names:
                n += 1
                name = f"{exp['name']}-{n}"
            names.add(name)
            created = Experiment.create(name=name, run_id=exp["run_id"], colors=(exp["light"], exp["dark"]),
                                        description=exp["description"] or "")
            created.status, created.finish_time = exp["status"], exp["finish_time"]
            created.save()
            for tag in exp["tags"]:
                chart = Chart.create(tag["name"], experiment_id=created, type=tag["type"], reference=tag["reference"])
                try:
                    namespace = Namespace.create(name="default", experiment_id=created.id, sort=0)
                except ExistedError:
                    namespace = Namespace.get(name="default", experiment_id=created.id)
                Display.create(chart_id=chart.id, namespace_id=namespace.id)
                new_tag = Tag.create(experiment_id=created.id, name=tag["name"], type=tag["type"],
                                     folder=tag["folder"])
                Source.create(tag_id=new_tag.id, chart_id=chart.id, error=None)
                try:
                    add_multi_chart(tag_id=new_tag.id, chart_id=chart.id)
                except ChartTypeError:  # same name, other type in another run: no comparison chart for it
                    pass


def serve(host: str, port: int, serve_dir: Path, swanlogs: Sequence[Path]) -> None:
    """Serve the dashboard until interrupted (runs in the child process started by :func:`watch`).

    Args:
        host: address to listen on.
        port: port to listen on.
        serve_dir: the folder to serve; for several ``swanlogs`` it is first built by :func:`combine_swanlogs`.
            ``SWANLAB_LOG_DIR`` must already name it (swanboard reads it on import).
        swanlogs: the local-mode log folders to show.
    """
    if len(swanlogs) > 1:
        combine_swanlogs(swanlogs, serve_dir)
    from swanboard import SwanBoardRun

    SwanBoardRun.run(path=str(serve_dir), host=host, port=port)


def run(args: dict[type, Any]) -> int:
    """Run ``osstune watch`` with parsed flag groups: serve until Ctrl+C; returns the exit code."""
    flags: WatchArgs = args[WatchArgs]
    with watch(Path(flags.path), host=flags.host, port=flags.port) as dashboard:
        runs = len(dashboard.swanlogs)
        print(f"SwanLab dashboard for {runs} run{'s' if runs > 1 else ''} of {flags.path}: {dashboard.url}"
              "  (Ctrl+C to stop)", flush=True)
        try:
            code = dashboard.wait()
        except KeyboardInterrupt:
            return 0
        output = "\n".join(dashboard.server_log().strip().splitlines()[-20:])
    if code == 0:  # the server was stopped by a signal and shut down cleanly
        return 0
    raise OsstuneError(f"the SwanLab dashboard stopped unexpectedly (exit code {code}).\n{output}".rstrip())


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]])
