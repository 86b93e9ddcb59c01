"""The console script: version, help on every subcommand, clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from osstune import __version__
from osstune.cli import COMMANDS, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osstune", *args], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"osstune {__version__}"


def test_top_level_help_lists_every_subcommand() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in COMMANDS:
        assert cmd.name in out.stdout


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_help_on_each_subcommand(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"osstune {name}" in capsys.readouterr().out


def test_unknown_subcommand_exit_2() -> None:
    out = run_cli("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_user_error_has_no_traceback() -> None:
    out = run_cli("data", "--model", "/nonexistent/model", "--dataset", "x.jsonl")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--model /nonexistent/model: no such folder" in out.stderr
