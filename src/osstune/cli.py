"""The ``osstune`` command line: one subcommand per stage of the pipeline.

Each subcommand names its flag groups (dataclasses from :mod:`osstune.config` or the stage's own module) and a
``run(args)`` function, imported only when the subcommand runs so that ``osstune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from osstune import __version__
from osstune.config import DataArgs, ModelArgs, TemplateArgs, add_group, parse_flags
from osstune.errors import OsstuneError


@dataclass(frozen=True)
class Command:
    """A subcommand.

    Args:
        name: as typed after ``osstune``.
        summary: one line for ``osstune --help``.
        groups: flag groups, as ``module:Class`` strings for stage-specific groups or classes for shared ones.
        run: ``module:function`` taking ``{group_cls: instance}`` and returning an exit code.
    """

    name: str
    summary: str
    groups: tuple[type | str, ...]
    run: str


COMMANDS: tuple[Command, ...] = (
    Command("sft", "LoRA fine-tuning (ms-swift flags; TRL names as aliases).",
            ("osstune.train.args:LoadArgs", "osstune.train.args:SftDataArgs", TemplateArgs,
             "osstune.train.args:LoraArgs", "osstune.train.args:TrainArgs", "osstune.train.args:TrackArgs"),
            "osstune.train.sft:run"),
    Command("data", "Validate, render and inspect datasets with a model's tokenizer (no weights are read).",
            (ModelArgs, DataArgs, TemplateArgs, "osstune.data.command:DataCommandArgs"),
            "osstune.data.command:run"),
    Command("infer", "Chat with a model in the terminal, or answer a dataset (ms-swift's swift infer flags).",
            ("osstune.infer.command:InferArgs",), "osstune.infer.command:run"),
    Command("export", "Merge a LoRA checkpoint into its base model (sharded safetensors; optional MXFP4 experts).",
            ("osstune.export.command:ExportArgs",), "osstune.export.command:run"),
    Command("eval", "Loss, perplexity and generation metrics; base vs fine-tuned side by side.",
            ("osstune.eval.command:EvalArgs",), "osstune.eval.command:run"),
    Command("demo", "Fine-tune a tiny gpt-oss on the bundled demo data, on CPU, in minutes.",
            ("osstune.demo:DemoArgs",), "osstune.demo:run"),
    Command("tiny-model", "Write a tiny random gpt-oss (real HF layout, MXFP4 experts) for tests and demos.",
            ("osstune.models.gpt_oss.tiny:TinyModelArgs",), "osstune.models.gpt_oss.tiny:run"),
    Command("watch", "Serve the SwanLab dashboard of local runs on 127.0.0.1.",
            ("osstune.tracking.watch:WatchArgs",), "osstune.tracking.watch:run"),
    Command("report", "Write report.html and PNG charts for a run folder, and print its summary.",
            ("osstune.tracking.report:ReportArgs",), "osstune.tracking.report:run"),
)


def _resolve(ref: type | str) -> object:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _parser_for(cmd: Command, sub: argparse._SubParsersAction) -> tuple[argparse.ArgumentParser, list[type]]:
    parser = sub.add_parser(cmd.name, help=cmd.summary, description=cmd.summary, allow_abbrev=False)
    groups = [_resolve(g) for g in cmd.groups]
    for g in groups:
        add_group(parser, g)  # type: ignore[arg-type]
    if groups:
        parser.add_argument("--config", default=None, metavar="FILE.yaml",
                            help="YAML file of flag: value pairs; command-line flags override it.")
    return parser, groups  # type: ignore[return-value]


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, tuple]]:
    """Build the top-level parser; only the subcommand ``only`` gets its flags (the others import nothing)."""
    parser = argparse.ArgumentParser(
        prog="osstune", description="LoRA fine-tuning for OpenAI's gpt-oss models, end to end.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"osstune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for cmd in COMMANDS:
        if only == cmd.name:
            parsers[cmd.name] = (cmd, *_parser_for(cmd, sub))
        else:
            sub.add_parser(cmd.name, help=cmd.summary)
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``osstune`` console script. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    known = {c.name for c in COMMANDS}
    parser, parsers = build_parser(name if name in known else None)
    if name is None or name not in known:
        parser.parse_args(argv)  # prints help/version, or the "invalid choice" error (exit 2)
        parser.print_help()
        return 2
    cmd, sub_parser, groups = parsers[name]
    rest = argv[argv.index(name) + 1:]
    try:
        args = parse_flags(name, rest, groups, sub_parser)
        return int(_resolve(cmd.run)(args) or 0)  # type: ignore[operator]
    except OsstuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
