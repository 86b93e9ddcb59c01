"""Loading a model for inference, export and evaluation: a base or merged model, or a base plus a LoRA checkpoint.

``--adapters CKPT`` finds its base model through the run's ``args.json`` (``--model`` overrides it), and the
rendering options recorded there (date, reasoning effort, identity, default system message), so inference renders
prompts exactly as training did.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osstune.chat.options import RenderOptions
from osstune.errors import OsstuneError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RENDER_KEYS = ("current_date", "reasoning_effort", "model_identity", "system")


@dataclass
class InferenceModel:
    """A model ready to generate or score.

    Args:
        model: the model (a ``PeftModel`` with the grouped expert path when an adapter is loaded), in eval mode.
        tokenizer: its tokenizer.
        base_dir: the base (or merged) model folder.
        adapter_dir: the LoRA checkpoint, if any.
        run_args: the training run's ``args.json`` (empty without one).
        options: rendering options as training used them.
    """

    model: Any
    tokenizer: Any
    base_dir: Path
    adapter_dir: Path | None = None
    run_args: dict[str, Any] = field(default_factory=dict)
    options: RenderOptions = field(default_factory=RenderOptions)


def find_run_args(checkpoint: Path) -> dict[str, Any] | None:
    """The ``args.json`` of a checkpoint (a copy inside it, or its run folder's), or None."""
    for folder in (checkpoint, checkpoint.parent):
        path = folder / "args.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise OsstuneError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}).") from None
    return None


def check_safetensors(path: Path) -> None:
    """Open a safetensors file's header and every tensor's metadata; a corrupt file is a clear error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except Exception as exc:  # safetensors raises several types for damaged files
        raise OsstuneError(f"{path}: corrupt or truncated safetensors file ({exc}). Copy or save it again.") from None


def render_options(run_args: dict[str, Any], **overrides: Any) -> RenderOptions:
    """Rendering options recorded by training, with explicit overrides (None means keep)."""
    values = {k: run_args[k] for k in RENDER_KEYS if run_args.get(k) is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RenderOptions(**values)


def resolve_base(adapters: Path | None, model: str | None) -> tuple[str, dict[str, Any]]:
    """The base model folder and the run's args for ``--adapters``/``--model``."""
    if adapters is None:
        if not model:
            raise OsstuneError("Give --model DIR (a base or merged model) or --adapters CHECKPOINT.")
        merged = Path(model) / "args.json"  # `osstune export` copies the run's args.json into merged models
        return model, (find_run_args(Path(model)) or {}) if merged.is_file() else {}
    if not adapters.is_dir():
        raise OsstuneError(f"--adapters {adapters}: no such checkpoint folder.")
    missing = [name for name in ADAPTER_FILES if not (adapters / name).is_file()]
    if missing:
        raise OsstuneError(f"--adapters {adapters}: not a LoRA checkpoint ({', '.join(missing)} missing).")
    run_args = find_run_args(adapters) or {}
    base = model or run_args.get("model")
    if not base:
        raise OsstuneError(f"--adapters {adapters}: no args.json in the checkpoint or its run folder, so the base "
                           "model is unknown. Pass --model BASE_MODEL_DIR.")
    return str(base), run_args


def load_for_inference(
    *,
    model: str | None = None,
    adapters: str | None = None,
    torch_dtype: str = "auto",
    device: str | None = None,
    console: Any = None,
    **render_overrides: Any,
) -> InferenceModel:
    """Load ``--model`` and/or ``--adapters`` for generation or scoring.

    Args:
        model: base or merged model folder; with ``adapters``, overrides the base recorded in ``args.json``.
        adapters: a LoRA checkpoint folder written by ``osstune sft`` (or any PEFT adapter with ``--model``).
        torch_dtype: as ``osstune sft``'s flag; ``auto`` takes the dtype training used, else the config's.
        device: ``cpu`` or ``cuda[:N]``; default CUDA when available.
        console: where loading messages go.
        **render_overrides: ``current_date``, ``reasoning_effort``, ``model_identity``, ``system`` overrides.

    Raises:
        OsstuneError: a missing or corrupt file, a checkpoint without ``args.json`` and no ``--model``, or an
            adapter trained on another base (shapes that do not match).
    """
    from osstune.models.loading import load_model

    adapter_dir = Path(adapters) if adapters else None
    base, run_args = resolve_base(adapter_dir, model)
    if adapter_dir is not None:
        check_safetensors(adapter_dir / "adapter_model.safetensors")
    if torch_dtype == "auto" and run_args.get("torch_dtype"):
        torch_dtype = run_args["torch_dtype"]
    loaded = load_model(base, torch_dtype=torch_dtype, device=device, console=console)
    net = loaded.model
    if adapter_dir is not None:
        net = attach_adapter(net, adapter_dir, base)
    net.eval()
    return InferenceModel(model=net, tokenizer=loaded.tokenizer, base_dir=loaded.model_dir, adapter_dir=adapter_dir,
                          run_args=run_args, options=render_options(run_args, **render_overrides))


def attach_adapter(model: Any, adapter_dir: Path, base: str) -> Any:
    """Wrap ``model`` with the PEFT adapter in ``adapter_dir``; a shape mismatch names the base it was trained on."""
    from peft import PeftModel

    from osstune.models.gpt_oss.moe_lora import enable_grouped_expert_lora

    try:
        with warnings.catch_warnings():  # transformers' deprecation notice inside PEFT, not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            net = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")[:300]
        raise OsstuneError(f"--adapters {adapter_dir} does not fit the model {base}: it was trained on "
                           f"{trained_on or 'another base'} ({first}). Pass the matching --model.") from None
    enable_grouped_expert_lora(net)
    return net
