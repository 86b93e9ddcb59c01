"""The shipped examples: the TRL recipe runs on the tiny model, every YAML config validates, the seed script parses."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from osstune.cli import build_parser
from osstune.config import parse_flags
from osstune.train.sft import SftConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def sft_parser() -> tuple[argparse.ArgumentParser, list[type]]:
    _, parsers = build_parser("sft")
    _, parser, groups = parsers["sft"]
    return parser, groups


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_config_validates(path: Path) -> None:
    parser, groups = sft_parser()
    cfg = SftConfig.from_groups(parse_flags("sft", ["--config", str(path), "--model", "M", "--dataset", "d.jsonl"],
                                            groups, parser))
    assert cfg.lora.target_experts == "all" and cfg.template.loss_scale in ("default", "ignore_empty_think")


def test_seed_script_flags_parse() -> None:
    script = (EXAMPLES / "seed_swift.sh").read_text()
    command = script[script.index("osstune sft") + len("osstune sft"):].replace("\\\n", " ")
    argv = [a.replace('"$MODEL"', "M").replace('"$DATA"', "d.json") for a in shlex.split(command, posix=False)]
    argv = [a.strip('"') for a in argv]
    parser, groups = sft_parser()
    cfg = SftConfig.from_groups(parse_flags("sft", argv, groups, parser))
    assert cfg.train.deepspeed == "zero3" and cfg.track.swanlab_project == "swift-robot"


def test_trl_recipe_runs_on_the_tiny_model(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "trl_recipe.py"), "--max_steps", "2", "--report_to", "none",
                          "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "adapter:" in out.stdout and "checkpoint-2" in out.stdout
    adapter = Path(out.stdout.split("adapter:")[1].split()[0])
    assert (adapter / "adapter_model.safetensors").is_file()
