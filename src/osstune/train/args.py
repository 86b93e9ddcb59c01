"""Flags of ``osstune sft``: ms-swift's names and meanings, with TRL's names as aliases."""

from __future__ import annotations

from dataclasses import dataclass

from osstune.config import FALSE_WORDS, TRUE_WORDS, DataArgs, flag
from osstune.errors import OsstuneError

SWANLAB_MODES = ("local", "offline", "cloud", "disabled")
REPORT_TO = ("swanlab", "tensorboard", "none")
SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "warmup_stable_decay")
CHECKPOINT_MODES = ("true", "false", "auto")
"""Values of ``--gradient_checkpointing``: every decoder layer, none, or as few as the free memory requires."""


def checkpoint_mode(value: object) -> str:
    """The ``--gradient_checkpointing`` mode of a flag, YAML or Python value: ``true``, ``false`` or ``auto``.

    Args:
        value: ``auto``, or a boolean in any spelling ms-swift accepts (``true``/``false``, ``True``, ``1``/``0``,
            ``yes``/``no``, ``on``/``off``, or a Python bool).

    Raises:
        OsstuneError: anything else.
    """
    text = str(value).strip().lower()
    if text in CHECKPOINT_MODES:
        return text
    if text in TRUE_WORDS:
        return "true"
    if text in FALSE_WORDS:
        return "false"
    raise OsstuneError(f"--gradient_checkpointing {value}: expected true, false or auto.")


@dataclass
class LoadArgs:
    """Which model to fine-tune and how to load it."""

    model: str | None = flag(None, "Local Hugging Face model folder (gpt-oss MXFP4 or bf16, or any causal LM).")
    torch_dtype: str = flag("bfloat16", "Compute dtype; MXFP4 experts are dequantised to it.",
                             choices=("bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "auto"))
    attn_impl: str | None = flag(None, "Attention kernel: flex_attention (CUDA) or eager; default picks per device.")
    expert_weights: str = flag("bf16", "gpt-oss MXFP4 experts: bf16 dequantises them on load, mxfp4 keeps them as "
                               "MXFP4 and dequantises on the fly, auto picks mxfp4 when bf16 would not fit.",
                               choices=("mxfp4", "bf16", "auto"))
    offload_embeddings: bool = flag(False, "Keep the frozen input embedding table in pinned host RAM; each step "
                                    "gathers its tokens' rows on the CPU and sends only those to the GPU.")
    dequant_experts: int = flag(0, "With --expert_weights mxfp4: bound the dequantisation scratch to N experts' "
                                "worth of a layer's weights (each expert matmul dequantises all experts in "
                                "ceil(E/N) slices, no host sync); 0 = a whole layer at once.")


@dataclass
class SftDataArgs(DataArgs):
    """Which data, how it is split, filtered by length and cached (as ``osstune data``, plus packing)."""

    split_dataset_ratio: float = flag(0.01, "Fraction of --dataset held out for validation when no --val_dataset.")
    packing: bool = flag(False, "Padding-free packing of samples into rows of --max_length tokens; attention "
                          "never crosses sample boundaries.")


@dataclass
class LoraArgs:
    """Which weights take LoRA, and its shape."""

    train_type: str = flag("lora", "Only lora: osstune trains LoRA adapters.", choices=("lora",))
    lora_rank: int = flag(8, "LoRA rank r.", aliases=("lora_r",))
    lora_alpha: int = flag(32, "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with --use_rslora).")
    lora_dropout: float = flag(0.05, "Dropout on the LoRA input of attention projections (experts take none).")
    use_rslora: bool = flag(False, "Rank-stabilised scaling alpha/sqrt(r).")
    target_modules: list[str] = flag(["all-linear"], "all-linear (attention q/k/v/o), all-router (adds the "
                                      "router), or module names.", aliases=("lora_target_modules",))
    target_experts: str = flag("all", "Expert LoRA: all, none, or layer indices such as 7,15,23.")
    target_parameters: list[str] = flag([], "PEFT/TRL syntax, e.g. 7.mlp.experts.gate_up_proj (overrides "
                                         "--target_experts).")


@dataclass
class TrainArgs:
    """Optimisation, schedule, evaluation, checkpoints (Hugging Face Trainer semantics)."""

    output_dir: str = flag("output", "Runs go to OUTPUT_DIR/v{N}-{YYYYMMDD-HHMMSS}/.")
    num_train_epochs: float = flag(3.0, "Epochs over the training split.")
    max_steps: int = flag(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    per_device_train_batch_size: int = flag(1, "Samples (or packed rows) per device per micro-step.")
    per_device_eval_batch_size: int = flag(1, "Samples per device per evaluation step.")
    gradient_accumulation_steps: int = flag(1, "Micro-steps per optimizer step.")
    learning_rate: float = flag(1e-4, "Peak learning rate.")
    weight_decay: float = flag(0.1, "AdamW weight decay.")
    max_grad_norm: float = flag(1.0, "Gradient clipping norm.")
    lr_scheduler_type: str = flag("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    lr_scheduler_kwargs: str | None = flag(None, "JSON object of schedule options, e.g. '{\"min_lr_rate\": 0.1}'.")
    warmup_ratio: float = flag(0.0, "Fraction of steps spent warming up.")
    warmup_steps: int = flag(0, "Warm-up steps (overrides --warmup_ratio when > 0).")
    gradient_checkpointing: str = flag("true", "Recompute activations in the backward pass to save memory: true "
                                       "(every decoder layer), false, or auto (only as many layers as the free GPU "
                                       "memory requires; every layer on the CPU and under --deepspeed/--fsdp).")
    offload_activations: bool = flag(False, "Keep the inputs that checkpointed layers save in pinned host RAM "
                                     "instead of GPU memory (long sequences; each step copies them out and back).")
    offload_optimizer: bool = flag(False, "Keep AdamW's two moments in pinned host RAM; each optimizer step streams "
                                   "them to the GPU in buckets, updates there and sends them back (8 bytes per "
                                   "trained parameter off the GPU; not with --deepspeed/--fsdp, which offload "
                                   "their own way).")
    logging_steps: int = flag(5, "Log every N optimizer steps.")
    eval_strategy: str | None = flag(None, "no, steps or epoch; default follows --save_strategy when there is a "
                                      "validation split.", choices=("no", "steps", "epoch"),
                                     aliases=("evaluation_strategy",))
    eval_steps: int | None = flag(None, "Evaluate every N steps (default: --save_steps).")
    save_strategy: str = flag("steps", "When to save checkpoints.", choices=("no", "steps", "epoch"))
    save_steps: int = flag(500, "Save every N steps (with --save_strategy steps).")
    save_total_limit: int | None = flag(None, "Keep at most N checkpoints; the newest is never deleted.")
    resume_from_checkpoint: str | None = flag(None, "Continue from this checkpoint folder.")
    dataloader_num_workers: int = flag(0, "Data loader worker processes.")
    use_liger_kernel: bool = flag(False, "Fused linear cross-entropy and kernels from liger-kernel (CUDA).")
    deepspeed: str | None = flag(None, "DeepSpeed preset (zero2, zero3, zero3_offload) or a JSON file; needs the "
                                 "deepspeed package (CUDA).")
    fsdp: str | None = flag(None, "FSDP2 sharding over the processes (GPUs): full_shard or true, shard_grad_op, with "
                            "offload to keep shards on CPU; HF's 'full_shard auto_wrap' also works; or a JSON file "
                            "of fsdp_config.")
    dry_run: bool = flag(False, "Print the per-GPU memory estimate, steps per epoch and effective batch size, then "
                         "exit without loading weights.")
    eval_generation_samples: int = flag(3, "Validation prompts answered and logged as text at each evaluation.")

    def __post_init__(self) -> None:
        self.gradient_checkpointing = checkpoint_mode(self.gradient_checkpointing)


@dataclass
class TrackArgs:
    """Experiment tracking."""

    report_to: list[str] = flag(["swanlab"], "Trackers: swanlab, tensorboard, none (several allowed).")
    swanlab_project: str = flag("osstune", "SwanLab project name.")
    swanlab_exp_name: str | None = flag(None, "SwanLab experiment name (default: the run folder name).")
    swanlab_mode: str = flag("local", "local (served by `osstune watch`), offline (sync later), cloud "
                              "(SWANLAB_API_KEY), disabled.", choices=SWANLAB_MODES)

