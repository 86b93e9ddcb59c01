"""SwanLab tracking: osstune starts the SwanLab run itself and logs its metrics, config and sample generations.

transformers' built-in ``report_to="swanlab"`` callback is never used: it crashes with swanlab >= 0.8.
osstune's modes and swanlab's own names:

- ``local`` (swanlab ``local``): the run is written under ``RUN_DIR/swanlog/`` with the dashboard database
  ``runs.swanlab``; ``osstune watch RUN_DIR`` serves it.
- ``offline`` (swanlab ``offline``): the run folder can only be uploaded later, with ``swanlab sync DIR``.
- ``cloud`` (swanlab ``online``): needs an API key (``SWANLAB_API_KEY`` or a saved ``swanlab login``).
- ``disabled`` (swanlab ``disabled``): nothing is written.

No mode ever prompts: SwanLab runs non-interactively, so training works without a TTY or network (CI).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from osstune.errors import OsstuneError

SWANLAB_MODES: dict[str, str] = {"local": "local", "offline": "offline", "cloud": "online", "disabled": "disabled"}
"""osstune's ``--swanlab_mode`` values and the swanlab 0.10 mode each one starts."""

SECRET_KEY_PATTERN = re.compile(r"key|token|secret|password", re.IGNORECASE)
"""Config keys whose (non-numeric) values are never logged."""


def _is_plain_number(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def strip_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` without anything that could be a credential.

    A key matching ``key|token|secret|password`` (any case, anywhere in the name) is dropped with its value unless
    the value is a number, a bool or None (``max_new_tokens: 2048`` stays; ``hub_token: "hf_..."`` and a nested
    ``secrets: {...}`` go). Nested mappings, and mappings inside lists, are cleaned the same way.

    Args:
        config: the configuration to clean (e.g. the content of ``args.json``); it is not modified.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if SECRET_KEY_PATTERN.search(str(key)) and not _is_plain_number(value):
            continue
        out[key] = _strip_value(value)
    return out


def _strip_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return strip_secrets(value)
    if isinstance(value, (list, tuple)):
        return [_strip_value(v) for v in value]
    return value


def swanlab_mode(mode: str) -> str:
    """Check ``--swanlab_mode`` and return the swanlab mode name to start.

    Args:
        mode: one of ``local``, ``offline``, ``cloud``, ``disabled``.

    Raises:
        OsstuneError: for an unknown mode, or for ``cloud`` when no SwanLab API key is configured.
    """
    if mode not in SWANLAB_MODES:
        raise OsstuneError(f"--swanlab_mode {mode!r} is not a mode; choose one of {', '.join(SWANLAB_MODES)}.")
    if mode == "cloud" and not _api_key_configured():
        raise OsstuneError(
            "--swanlab_mode cloud needs a SwanLab API key, and none is set. Set SWANLAB_API_KEY in the environment "
            "(or run `swanlab login` once), or use --swanlab_mode local to log to the run folder and view it with "
            "`osstune watch`."
        )
    return SWANLAB_MODES[mode]


def _api_key_configured() -> bool:
    if os.environ.get("SWANLAB_API_KEY", "").strip():
        return True
    import swanlab

    # Reads the environment, swanlab config files and a key saved by `swanlab login`; no network.
    return bool(swanlab.Settings().api_key)


def _restore_log_dir_env(saved: str | None) -> None:
    """Put ``SWANLAB_LOG_DIR`` back as it was before swanlab's local mode set it."""
    if saved is None:
        os.environ.pop("SWANLAB_LOG_DIR", None)
    else:
        os.environ["SWANLAB_LOG_DIR"] = saved


class SwanLabTracker:
    """A SwanLab run that receives osstune's metrics (``train/loss``, ``eval/loss``...) and sample generations.

    Create it with :meth:`start`; call :meth:`finish` once training ends (calling it again does nothing).

    Args:
        run: the started ``swanlab`` run.
        mode: the osstune mode it was started in (``local``, ``offline``, ``cloud`` or ``disabled``).
        run_dir: the training run folder.
        saved_log_dir_env: ``SWANLAB_LOG_DIR`` as it was before the run started (swanlab's local mode sets it);
            restored by :meth:`finish`. None when it was unset.
    """

    def __init__(self, run: Any, mode: str, run_dir: Path, saved_log_dir_env: str | None) -> None:
        self._run = run
        self.mode = mode
        self.run_dir = run_dir
        self._saved_log_dir_env = saved_log_dir_env
        self._finished = False

    @classmethod
    def start(
        cls, run_dir: Path, *, project: str, experiment: str | None, mode: str, config: Mapping[str, Any]
    ) -> SwanLabTracker:
        """Start a SwanLab run for a training run and log its configuration.

        Args:
            run_dir: the training run folder (``OUTPUT_DIR/vN-YYYYMMDD-HHMMSS``); local and offline modes write
                under ``run_dir/swanlog/``.
            project: the SwanLab project (``--swanlab_project``).
            experiment: the experiment name (``--swanlab_exp_name``); None uses the run folder's name.
            mode: ``local``, ``offline``, ``cloud`` or ``disabled`` (``--swanlab_mode``).
            config: the resolved configuration; secrets are stripped again here (see :func:`strip_secrets`).

        Raises:
            OsstuneError: for a bad mode, a missing cloud API key, a run already active in this process, or when
                SwanLab refuses to start (e.g. an invalid project name, or no network in cloud mode).
        """
        target = swanlab_mode(mode)
        import swanlab

        if swanlab.has_run():
            raise OsstuneError("A SwanLab run is already active in this process; finish it before training again.")
        log_dir = run_dir / "swanlog"
        saved = os.environ.get("SWANLAB_LOG_DIR")
        try:
            run = swanlab.init(
                mode=target,  # type: ignore[arg-type]
                project=project,
                name=experiment or run_dir.name,
                log_dir=str(log_dir),
                config=strip_secrets(config),
                settings=swanlab.Settings(interactive=False),
            )
        except Exception as exc:  # swanlab raises ValueError, RuntimeError or its own errors; all mean "not started"
            _restore_log_dir_env(saved)
            hint = (" Check the network and SWANLAB_API_KEY, or use --swanlab_mode local." if mode == "cloud"
                    else " Check --swanlab_project and --swanlab_exp_name.")
            raise OsstuneError(f"SwanLab could not start the run in {mode} mode: {exc}.{hint}") from exc
        tracker = cls(run, mode, run_dir, saved)
        if mode == "local":
            print(f"SwanLab: logging locally to {log_dir}; view it with `osstune watch {shlex.quote(str(run_dir))}`",
                  flush=True)
        return tracker

    @property
    def swanlab_dir(self) -> Path:
        """The folder of this SwanLab run (``run_dir/swanlog/run-...``), the one ``swanlab sync`` takes."""
        return Path(self._run.dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at a training step.

        Args:
            metrics: metric name (``train/loss``...) to value.
            step: the optimizer step.
        """
        self._run.log(dict(metrics), step=step)

    def log_text(self, key: str, texts: Sequence[str], step: int) -> None:
        """Log texts (sample generations) as ``swanlab.Text`` at a training step.

        Args:
            key: chart name, e.g. ``eval/samples``.
            texts: one text per sample.
            step: the optimizer step.
        """
        import swanlab

        self._run.log({key: [swanlab.Text(t) for t in texts]}, step=step)

    def finish(self) -> None:
        """Close the run (flushing everything); in offline mode, print the ``swanlab sync`` command to upload it."""
        if self._finished:
            return
        self._finished = True
        self._run.finish()
        _restore_log_dir_env(self._saved_log_dir_env)
        if self.mode == "offline":
            print(f"SwanLab: offline run saved; upload it with: swanlab sync {shlex.quote(str(self.swanlab_dir))}",
                  flush=True)
