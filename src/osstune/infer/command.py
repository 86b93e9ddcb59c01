"""``osstune infer``: chat with a fine-tuned model in the terminal, or answer a whole dataset (ms-swift's flags).

Model selection: ``--adapters CKPT`` finds the base model through the run's ``args.json`` (``--model`` overrides
it); ``--model DIR`` alone takes a base or merged model. Without ``--val_dataset`` this is an interactive chat (lines
from the terminal, or from standard input when it is a pipe); with it, batch inference into ``--result_path``
(default ``CHECKPOINT/infer_result/{timestamp}.jsonl``, or ``MODEL/infer_result/...`` without adapters, as ms-swift).

Decoding is greedy by default (``--temperature 0``), so results are reproducible run to run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from osstune.chat.options import REASONING_EFFORTS
from osstune.config import flag
from osstune.errors import OsstuneError

INFER_BACKENDS: tuple[str, ...] = ("pt", "vllm", "sglang", "lmdeploy")
"""ms-swift's ``--infer_backend`` values; osstune runs ``pt`` (PyTorch) only and explains the others."""
DTYPE_CHOICES: tuple[str, ...] = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


@dataclass
class InferArgs:
    """Flags of ``osstune infer``."""

    model: str | None = flag(None, "Base or merged model folder; with --adapters it overrides the base model "
                                   "recorded in the run's args.json.")
    adapters: str | None = flag(None, "LoRA checkpoint folder written by osstune sft (its base model and rendering "
                                      "options come from the run's args.json).", aliases=("ckpt_dir",))
    torch_dtype: str = flag("auto", "Weights dtype; auto takes the dtype training used, else the model config's.",
                            choices=DTYPE_CHOICES)
    infer_backend: str = flag("pt", "Inference engine; osstune runs pt (PyTorch + transformers) only.",
                              choices=INFER_BACKENDS)
    stream: bool = flag(True, "Chat: show the reply token by token (reasoning dimmed, then the answer).")
    temperature: float = flag(0.0, "Sampling temperature; 0 is greedy decoding (deterministic).")
    top_p: float = flag(1.0, "Nucleus sampling threshold, used with --temperature > 0.")
    max_new_tokens: int = flag(2048, "Most tokens generated per reply, reasoning included.")
    reasoning_effort: str | None = flag(None, "Reasoning effort in the system message; default: as in training "
                                              "(args.json), else medium.", choices=REASONING_EFFORTS)
    system: str | None = flag(None, "Developer instructions for conversations without a system message; default: "
                                    "as in training.")
    model_identity: str | None = flag(None, "First line of the harmony system message; default: as in training.")
    current_date: str | None = flag(None, "Date in the harmony system message (YYYY-MM-DD); default: as in "
                                          "training, else today.")
    val_dataset: list[str] = flag([], "Datasets to answer (batch inference); same syntax as osstune sft "
                                      "--dataset. A closing assistant turn becomes the reference.")
    result_path: str | None = flag(None, "JSONL file for batch results; an existing file is resumed "
                                         "(answered records are skipped).")
    max_batch_size: int = flag(8, "Records generated together in batch inference.")


def check_flags(opts: InferArgs) -> None:
    """Reject flag values that cannot work, before any data or weights are read.

    Args:
        opts: the parsed flags.

    Raises:
        OsstuneError: an unsupported backend, or a value out of range.
    """
    if opts.infer_backend != "pt":
        raise OsstuneError(
            f"--infer_backend {opts.infer_backend}: osstune generates with PyTorch (transformers) only. Leave the flag "
            f"out (pt), or merge the adapter with `osstune export --adapters CKPT --merge_lora true` and serve the "
            f"merged folder with {opts.infer_backend} yourself.")
    if not opts.model and not opts.adapters:
        raise OsstuneError("Give --adapters CHECKPOINT (a LoRA checkpoint of osstune sft) or --model DIR (a base or "
                           "merged model).")
    if opts.temperature < 0:
        raise OsstuneError(f"--temperature {opts.temperature}: must be 0 (greedy) or positive.")
    if not 0 < opts.top_p <= 1:
        raise OsstuneError(f"--top_p {opts.top_p}: must be in (0, 1].")
    if opts.max_new_tokens < 1:
        raise OsstuneError(f"--max_new_tokens {opts.max_new_tokens}: must be at least 1.")
    if opts.max_batch_size < 1:
        raise OsstuneError(f"--max_batch_size {opts.max_batch_size}: must be at least 1.")
    if opts.result_path and not opts.val_dataset:
        raise OsstuneError("--result_path is where batch inference writes; give --val_dataset FILE with it (without "
                           "--val_dataset, osstune infer is an interactive chat).")


def context_length(model: Any) -> int | None:
    """The model's context length (``max_position_embeddings`` of its config), if it has one.

    Args:
        model: a transformers model (a PEFT model included).
    """
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def run(args: dict[type, Any]) -> int:
    """CLI entry point of ``osstune infer``; returns the exit code.

    Args:
        args: the parsed flag groups; only ``InferArgs`` is read.
    """
    from osstune.infer.batch import default_result_path, infer_dataset, read_requests
    from osstune.infer.chat import ChatSession, ChatSettings, chat_loop
    from osstune.infer.loading import load_for_inference

    opts: InferArgs = args[InferArgs]
    check_flags(opts)
    console = Console()
    requests = read_requests(opts.val_dataset) if opts.val_dataset else None
    loaded = load_for_inference(model=opts.model, adapters=opts.adapters, torch_dtype=opts.torch_dtype,
                                console=console, current_date=opts.current_date,
                                reasoning_effort=opts.reasoning_effort, model_identity=opts.model_identity,
                                system=opts.system)
    max_context = context_length(loaded.model)
    if requests is not None:
        path = Path(opts.result_path) if opts.result_path else default_result_path(loaded.adapter_dir,
                                                                                  loaded.base_dir)
        infer_dataset(loaded.model, loaded.tokenizer, loaded.options, requests, path,
                      max_batch_size=opts.max_batch_size, max_new_tokens=opts.max_new_tokens,
                      temperature=opts.temperature, top_p=opts.top_p, max_context=max_context, console=console)
        return 0
    adapter = f" + adapter {loaded.adapter_dir}" if loaded.adapter_dir else ""
    console.print(f"chatting with {loaded.base_dir}{adapter} (reasoning {loaded.options.reasoning_effort}, date "
                  f"{loaded.options.current_date}, temperature {opts.temperature:g})", markup=False,
                  highlight=False, soft_wrap=True)
    session = ChatSession(loaded.model, loaded.tokenizer, loaded.options,
                          ChatSettings(stream=opts.stream, max_new_tokens=opts.max_new_tokens,
                                       temperature=opts.temperature, top_p=opts.top_p, max_context=max_context),
                          console)
    return chat_loop(session, None if sys.stdin.isatty() else sys.stdin)
