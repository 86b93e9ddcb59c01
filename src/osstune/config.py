"""Typed argument groups and the flag parser shared by every ``osstune`` subcommand.

Each group is a dataclass whose fields are flags with ms-swift's names and meanings. A field's ``metadata`` holds
its ``help`` text, optional ``choices`` and optional ``aliases`` (TRL names). :func:`parse_flags` turns a command
line (plus an optional ``--config FILE.yaml``) into one instance per group, with clear errors for unknown flags
(naming the closest flag) and for ms-swift flags that osstune does not support.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osstune.chat.options import DEFAULT_MODEL_IDENTITY, LOSS_SCALES, REASONING_EFFORTS, RenderOptions, today
from osstune.errors import OsstuneError

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")

# ms-swift flags that osstune deliberately does not implement. Passing one is an error, never silently ignored.
UNSUPPORTED_SWIFT_FLAGS: dict[str, str] = {
    "streaming": "streaming datasets are not supported; osstune preprocesses and caches the whole dataset",
    "lazy_tokenize": "osstune always tokenizes ahead of training (cached on disk)",
    "interleave_prob": "dataset interleaving is not supported; list several --dataset values to concatenate them",
    "dataset_shuffle": "osstune shuffles in the data loader; use --seed to change the order",
    "template": "osstune picks the renderer from the model (harmony for gpt-oss, the chat template otherwise)",
    "template_backend": "osstune has a single template backend",
    "custom_register_path": "custom registration is not supported; use the Python API instead",
}


def flag(default: Any, help: str, *, choices: Sequence[str] | None = None, aliases: Sequence[str] = ()) -> Any:
    """Declare a flag field: a dataclass field with help text, optional choices and alias names."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    """Which model (or tokenizer) to use."""

    model: str | None = flag(None, "Local Hugging Face model folder (config.json, tokenizer, weights).")


@dataclass
class TemplateArgs:
    """How conversations are rendered into tokens (see ``osstune.chat``)."""

    current_date: str = flag(today(), "Date in the harmony system message (YYYY-MM-DD); default today, recorded.")
    reasoning_effort: str = flag("medium", "Reasoning effort in the system message.", choices=REASONING_EFFORTS)
    model_identity: str = flag(DEFAULT_MODEL_IDENTITY, "First line of the harmony system message.")
    system: str | None = flag(None, "Developer instructions for conversations that have no system message.")
    loss_scale: str = flag("default", "Which tokens are trained.", choices=LOSS_SCALES)

    def render_options(self) -> RenderOptions:
        """The renderer's view of these flags."""
        return RenderOptions(
            current_date=self.current_date,
            reasoning_effort=self.reasoning_effort,
            model_identity=self.model_identity,
            system=self.system,
            loss_scale=self.loss_scale,  # type: ignore[arg-type]
        )


@dataclass
class DataArgs:
    """Which data, how it is split, filtered by length and cached."""

    dataset: list[str] = flag([], "Datasets: files (.json/.jsonl/.csv/.parquet), folders, hub names, "
                               "'self-cognition'; NAME#N samples N rows.")
    val_dataset: list[str] = flag([], "Validation datasets (same syntax as --dataset).")
    split_dataset_ratio: float = flag(0.0, "Fraction of --dataset held out for validation when no --val_dataset.")
    seed: int = flag(42, "Random seed for sampling, splitting and training.")
    max_length: int | None = flag(None, "Maximum tokens per sample.", aliases=("max_seq_length",))
    truncation_strategy: str = flag("delete", "What to do with samples over --max_length.",
                                     choices=("delete", "left", "right"))
    dataset_num_proc: int = flag(1, "Worker processes for preprocessing.")
    load_from_cache_file: bool = flag(True, "Reuse the on-disk preprocessing cache.")
    strict: bool = flag(True, "Stop at the first bad record; false skips bad records and reports a count per reason.")
    model_name: list[str] = flag([], "Model name for self-cognition data: one value, or Chinese then English.")
    model_author: list[str] = flag([], "Model author for self-cognition data: one value, or Chinese then English.")


def parse_bool(text: str) -> bool:
    """Parse ``true/false`` (also 1/0, yes/no, on/off), as ms-swift accepts them."""
    low = str(text).strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any) -> Any:
    """The argparse ``type=`` for a field's base type."""
    if tp is bool:
        return parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported flag type {tp!r}")


def _optional(conv: Any) -> Any:
    def convert(text: str) -> Any:
        return None if str(text).strip().lower() in ("none", "null", "") else conv(text)

    return convert


def add_group(parser: argparse.ArgumentParser, group_cls: type) -> None:
    """Add every field of ``group_cls`` as a ``--flag`` (plus aliases) to ``parser``.

    A field whose metadata has ``positional: True`` becomes a required positional argument instead.
    """
    hints = typing.get_type_hints(group_cls)
    section = parser.add_argument_group(group_cls.__name__.removesuffix("Args").lower() or "options",
                                        (group_cls.__doc__ or "").strip())
    for f in dataclasses.fields(group_cls):
        tp, optional = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            section.add_argument(f.name, type=_converter(tp), help=help_text, metavar=f.name.upper())
            continue
        names = [f"--{f.name}", *(f"--{a}" for a in f.metadata.get("aliases", ()))]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs.update(nargs="+", type=_converter(item), metavar=f.name.upper())
        else:
            conv = _converter(tp)
            kwargs.update(type=_optional(conv) if optional else conv, metavar=f.name.upper())
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"]) + ([None] if optional else [])
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        section.add_argument(*names, help=f"{help_text} (default: {default})", **kwargs)


def known_flags(groups: Sequence[type]) -> dict[str, str]:
    """Map every accepted flag name (aliases included, without dashes) to its field name."""
    out: dict[str, str] = {}
    for g in groups:
        for f in dataclasses.fields(g):
            out[f.name] = f.name
            for a in f.metadata.get("aliases", ()):
                out[a] = f.name
    return out


def _flag_error(command: str, flag: str, groups: Sequence[type], where: str = "") -> OsstuneError:
    name = flag.lstrip("-").split("=", 1)[0]
    flag = f"{flag}{where}"
    if name in UNSUPPORTED_SWIFT_FLAGS:
        return OsstuneError(f"osstune {command}: --{name} is an ms-swift flag that osstune does not support: "
                            f"{UNSUPPORTED_SWIFT_FLAGS[name]}. Remove it from the command.")
    close = difflib.get_close_matches(name, list(known_flags(groups)), n=1, cutoff=0.6)
    hint = f" Did you mean --{close[0]}?" if close else f" See `osstune {command} --help` for the flags."
    return OsstuneError(f"osstune {command}: unknown flag {flag!r}.{hint}")


def load_yaml_config(path: str, groups: Sequence[type], command: str) -> dict[str, Any]:
    """Read ``--config FILE.yaml`` into field values, checking every key like a command-line flag."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise OsstuneError(f"--config {path}: no such file. Give the path to a YAML file of flag: value pairs.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise OsstuneError(f"--config {path}: not valid YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise OsstuneError(f"--config {path}: expected a mapping of flag: value pairs at the top level.")
    names = known_flags(groups)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if str(key) not in names:
            raise _flag_error(command, str(key), groups, f" (in {path})")
        out[names[str(key)]] = value
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the field's type (YAML already gives numbers, bools and lists)."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    try:
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            items = value if isinstance(value, list) else [value]
            return [_converter(item)(v) if not isinstance(v, item) else v for v in items]
        if base is bool and isinstance(value, bool):
            return value
        return _converter(base)(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise OsstuneError(f"{where}: {exc}") from None


def parse_flags(
    command: str, argv: Sequence[str], groups: Sequence[type], parser: argparse.ArgumentParser
) -> dict[type, Any]:
    """Parse ``argv`` for ``command`` into one instance per group.

    Args:
        command: the subcommand name, for messages.
        argv: the flags after the subcommand.
        groups: dataclass types whose fields are the accepted flags.
        parser: the subcommand's parser, already holding the groups (see :func:`add_group`) and ``--config``.

    Returns:
        ``{group_cls: instance}``. Precedence: field default < ``--config`` file < command line.
    """
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        if not flag.startswith("-"):
            raise OsstuneError(f"osstune {command}: unexpected argument {flag!r}; flags take the form --name value.")
        raise _flag_error(command, flag, groups)
    values = vars(ns)
    from_yaml = load_yaml_config(values.pop("config"), groups, command) if values.get("config") else {}
    values.pop("config", None)
    out: dict[type, Any] = {}
    for g in groups:
        hints = typing.get_type_hints(g)
        kwargs = {}
        for f in dataclasses.fields(g):
            if f.name in values:
                kwargs[f.name] = values[f.name]
            elif f.name in from_yaml:
                kwargs[f.name] = _coerce(from_yaml[f.name], hints[f.name], f"--config key {f.name}")
        out[g] = g(**kwargs)
    return out
