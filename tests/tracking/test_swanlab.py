"""Real SwanLab runs (local and offline mode) started by osstune, and the dashboard that `osstune watch` serves.

Every test runs with a fresh HOME and no SWANLAB_* variables, in its own folder, so the user's SwanLab
configuration is never read or written; nothing touches the network.
"""

from __future__ import annotations

import os
import socket
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import yaml

from osstune.errors import OsstuneError
from osstune.tracking.callbacks import MetricsCallback, make_trackers
from osstune.tracking.swanlab_tracker import SwanLabTracker, strip_secrets
from osstune.tracking.watch import api_get, find_swanlogs, watch

SECRET = "hf_do_not_log_this"
CONFIG = {"learning_rate": 1e-4, "lora_rank": 8, "max_new_tokens": 2048, "hub_token": SECRET,
          "nested": {"swanlab_api_key": SECRET, "keep": "yes"}, "list": [{"password": SECRET, "n": 1}]}


@pytest.fixture
def swanlab_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean SwanLab environment: fresh HOME, no SWANLAB_* variables, cwd in the test folder."""
    for key in list(os.environ):
        if key.startswith("SWANLAB_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SWANLAB_ROOT", str(home / ".swanlab"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_run(run_dir: Path, losses: list[float], eval_loss: float, sample: tuple[str, str]) -> None:
    """Log a short training run through make_trackers + MetricsCallback, as `osstune sft` does."""
    run_dir.mkdir(parents=True)
    trackers = make_trackers(["swanlab"], run_dir, project="osstune-test", experiment=None, mode="local",
                             config=CONFIG)
    callback = MetricsCallback(trackers)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    for step, loss in enumerate(losses, 1):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": loss, "learning_rate": 1e-4, "grad_norm": 0.5})
    callback.on_log(None, state, None, logs={"eval_loss": eval_loss, "eval_runtime": 1.0})
    callback.log_samples([sample], step=state.global_step)
    callback.on_train_end(None, state, None)


def series(url: str, experiment_id: int, tag: str) -> list[tuple[int, object]]:
    data = api_get(f"{url}/api/v1/experiment/{experiment_id}/tag/{quote(tag, safe='')}")
    return [(point["index"], point["data"]) for point in data["list"]]


def test_strip_secrets() -> None:
    assert strip_secrets(CONFIG) == {"learning_rate": 1e-4, "lora_rank": 8, "max_new_tokens": 2048,
                                     "nested": {"keep": "yes"}, "list": [{"n": 1}]}
    assert strip_secrets({"API_KEY": "x", "Secrets": {"a": 1}, "pad_token": "<pad>", "eos_token_id": 2}) == {
        "eos_token_id": 2}


def test_local_run_is_served_by_watch(swanlab_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = swanlab_env / "output" / "v0-20250101-000000"
    losses = [round(2.0 - 0.1 * i, 2) for i in range(10)]
    train_run(run_dir, losses, eval_loss=1.25, sample=("What is 2+2?", "4"))
    assert f"osstune watch {run_dir}" in capsys.readouterr().out
    assert "SWANLAB_LOG_DIR" not in os.environ  # swanlab's local mode sets it; the tracker puts it back

    # the config SwanLab stored has no secret, and no file of the run holds one
    (config_file,) = (run_dir / "swanlog").glob("run-*/files/config.yaml")
    assert set(yaml.safe_load(config_file.read_text())) == {"learning_rate", "lora_rank", "max_new_tokens",
                                                             "nested", "list"}
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    with watch(run_dir, port=free_port()) as dashboard:
        project = api_get(f"{dashboard.url}/api/v1/project")
        assert project["name"] == "osstune-test"
        (experiment,) = project["experiments"]
        assert experiment["name"] == "v0-20250101-000000"
        assert experiment["config"]["lora_rank"]["value"] == 8
        charts = api_get(f"{dashboard.url}/api/v1/experiment/{experiment['id']}/chart")["charts"]
        assert {c["name"] for c in charts} == {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/ppl",
                                              "eval/samples"}
        assert series(dashboard.url, experiment["id"], "train/loss") == list(zip(range(1, 11), losses))
        assert series(dashboard.url, experiment["id"], "eval/loss") == [(10, 1.25)]
        assert series(dashboard.url, experiment["id"], "eval/samples") == [(10, ["What is 2+2?\n\n---\n\n4"])]
    assert dashboard.process.poll() is not None
    assert not dashboard.workdir.exists()
    assert (run_dir / "swanlog" / "runs.swanlab").is_file()


def test_watch_output_folder_combines_runs(swanlab_env: Path) -> None:
    output = swanlab_env / "output"
    train_run(output / "v0-20250101-000000", [3.0, 2.5], eval_loss=2.25, sample=("a", "b"))
    train_run(output / "v1-20250102-000000", [1.5, 1.0, 0.5], eval_loss=0.75, sample=("c", "d"))
    (output / "v2-20250103-000000").mkdir()  # a run without SwanLab: ignored

    with watch(output, port=free_port()) as dashboard:
        assert dashboard.swanlogs == [output.resolve() / f"v{i}-2025010{i + 1}-000000" / "swanlog" for i in (0, 1)]
        experiments = api_get(f"{dashboard.url}/api/v1/project")["experiments"]
        assert [e["name"] for e in experiments] == ["v0-20250101-000000", "v1-20250102-000000"]
        assert [e["status"] for e in experiments] == [1, 1]
        assert series(dashboard.url, experiments[0]["id"], "train/loss") == [(1, 3.0), (2, 2.5)]
        assert series(dashboard.url, experiments[1]["id"], "train/loss") == [(1, 1.5), (2, 1.0), (3, 0.5)]
        assert series(dashboard.url, experiments[1]["id"], "eval/loss") == [(3, 0.75)]
        compare = {c["name"]: c for c in api_get(f"{dashboard.url}/api/v1/project/charts")["charts"]}
        assert compare["train/loss"]["multi"] is True
        assert compare["train/loss"]["source"] == ["v0-20250101-000000", "v1-20250102-000000"]
        workdir = dashboard.workdir
    assert not workdir.exists()
    assert len(list((output / "v0-20250101-000000" / "swanlog").glob("run-*/logs"))) == 1  # data left intact


def test_offline_run_prints_sync_command(swanlab_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = swanlab_env / "v0-20250101-000000"
    run_dir.mkdir()
    tracker = SwanLabTracker.start(run_dir, project="osstune-test", experiment="offline-exp", mode="offline",
                                   config=CONFIG)
    tracker.log({"train/loss": 1.0}, 1)
    capsys.readouterr()
    tracker.finish()
    tracker.finish()
    (folder,) = (run_dir / "swanlog").glob("run-*")
    assert list(folder.glob("*.swanlab"))
    out = capsys.readouterr().out
    assert f"upload it with: swanlab sync {folder}\n" in out
    with pytest.raises(OsstuneError) as exc:
        find_swanlogs(run_dir)
    assert "offline mode" in str(exc.value)
    assert f"swanlab sync {folder}" in str(exc.value)


def test_cloud_without_api_key_is_a_clear_error(swanlab_env: Path) -> None:
    run_dir = swanlab_env / "run"
    run_dir.mkdir()
    with pytest.raises(OsstuneError) as exc:
        make_trackers(["swanlab"], run_dir, project="p", experiment=None, mode="cloud", config={})
    assert "SWANLAB_API_KEY" in str(exc.value)
    assert "--swanlab_mode local" in str(exc.value)
    assert list(run_dir.iterdir()) == []


def test_disabled_mode_writes_nothing(swanlab_env: Path) -> None:
    run_dir = swanlab_env / "run"
    run_dir.mkdir()
    (tracker,) = make_trackers(["swanlab"], run_dir, project="p", experiment=None, mode="disabled", config=CONFIG)
    tracker.log({"train/loss": 1.0}, 1)
    tracker.log_text("eval/samples", ["x"], 1)
    tracker.finish()
    assert list(run_dir.iterdir()) == []
