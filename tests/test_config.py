"""Flag parsing: types, aliases, YAML config precedence, unknown and unsupported flags."""

from __future__ import annotations

import argparse

import pytest

from osstune.config import DataArgs, ModelArgs, TemplateArgs, add_group, parse_bool, parse_flags
from osstune.errors import OsstuneError

GROUPS = (ModelArgs, DataArgs, TemplateArgs)


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="osstune data", allow_abbrev=False)
    for g in GROUPS:
        add_group(parser, g)
    parser.add_argument("--config", default=None)
    return parse_flags("data", argv, GROUPS, parser)


def test_types_lists_and_bools() -> None:
    out = parse(["--model", "m", "--dataset", "a.jsonl", "b.json#5", "--max_length", "8192",
                 "--load_from_cache_file", "false", "--split_dataset_ratio", "0.1", "--strict", "TRUE",
                 "--model_name", "小黄", "Xiao Huang"])
    data = out[DataArgs]
    assert out[ModelArgs].model == "m"
    assert data.dataset == ["a.jsonl", "b.json#5"]
    assert data.max_length == 8192
    assert data.load_from_cache_file is False
    assert data.strict is True
    assert data.split_dataset_ratio == pytest.approx(0.1)
    assert data.model_name == ["小黄", "Xiao Huang"]
    assert out[TemplateArgs].loss_scale == "default"


def test_defaults_are_fresh_lists() -> None:
    a, b = parse([])[DataArgs], parse([])[DataArgs]
    a.dataset.append("x")
    assert b.dataset == []


@pytest.mark.parametrize("word,value", [("true", True), ("False", False), ("1", True), ("no", False)])
def test_parse_bool(word: str, value: bool) -> None:
    assert parse_bool(word) is value


def test_bad_bool_and_choice_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--strict", "maybe"])
    assert exc.value.code == 2
    assert "expected true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--loss_scale", "everything"])


def test_unknown_flag_names_closest() -> None:
    with pytest.raises(OsstuneError, match=r"unknown flag '--datset'.*Did you mean --dataset\?"):
        parse(["--datset", "x.jsonl"])


def test_unsupported_swift_flag_is_explicit() -> None:
    with pytest.raises(OsstuneError, match=r"--streaming is an ms-swift flag that osstune does not support"):
        parse(["--streaming", "true"])


def test_yaml_config_then_cli_override(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: [a.jsonl, b.jsonl]\nmax_length: 512\nloss_scale: last_round\nstrict: false\n")
    out = parse(["--config", str(cfg), "--max_length", "1024"])
    assert out[DataArgs].dataset == ["a.jsonl", "b.jsonl"]
    assert out[DataArgs].max_length == 1024  # command line wins
    assert out[DataArgs].strict is False
    assert out[TemplateArgs].loss_scale == "last_round"


def test_yaml_unknown_key(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_lenght: 512\n")
    with pytest.raises(OsstuneError, match=r"max_lenght.*Did you mean --max_length\?"):
        parse(["--config", str(cfg)])


def test_yaml_missing_file() -> None:
    with pytest.raises(OsstuneError, match="no such file"):
        parse(["--config", "/nonexistent/c.yaml"])
