"""``osstune sft``: LoRA fine-tuning on the Hugging Face Trainer, in a self-describing run folder.

Pipeline: run folder and ``args.json`` -> model (MXFP4 dequantised) -> data (harmony-rendered, cached) -> LoRA on
attention and experts -> Trainer (atomic checkpoints, guards, tracking) -> report.

Several processes: ``NPROC_PER_NODE=N`` relaunches the command under torchrun (:mod:`osstune.train.launch`); the
workers train with DDP (default), FSDP2 (``--fsdp``) or DeepSpeed (``--deepspeed``), and rank 0 alone writes the
run folder's files, the trackers and the checkpoints. ``--dry_run true`` prints the plan (:mod:`osstune.train.dry_run`)
and trains nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

import osstune
from osstune.config import FALSE_WORDS, TRUE_WORDS, TemplateArgs
from osstune.errors import OsstuneError
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.launch import (
    RankInfo,
    barrier,
    config_flags,
    init_distributed,
    launch_plan,
    local_main_first,
    rank_info,
    relaunch,
    shared_run_dir,
    single_process_rendezvous,
    torchrun_arguments,
    torchrun_command,
)
from osstune.train.run_dir import redact, write_json_atomic

if TYPE_CHECKING:
    from osstune.train.checkpointing import CheckpointPlan

DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")

FSDP_WORDS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
"""Words of ``--fsdp`` (Hugging Face's spelling); FSDP2 always wraps each decoder layer, so auto_wrap is implied."""


@dataclass
class SftConfig:
    """Every flag of ``osstune sft``, grouped; also the Python API's training configuration."""

    load: LoadArgs
    data: SftDataArgs
    template: TemplateArgs
    lora: LoraArgs
    train: TrainArgs
    track: TrackArgs

    @classmethod
    def from_groups(cls, groups: dict[type, Any]) -> "SftConfig":
        """Build from the parsed CLI groups."""
        return cls(groups[LoadArgs], groups[SftDataArgs], groups[TemplateArgs], groups[LoraArgs],
                   groups[TrainArgs], groups[TrackArgs])

    def to_json(self) -> dict[str, Any]:
        """One flat dict of flag: value (secrets redacted), as saved in ``args.json``."""
        flat: dict[str, Any] = {}
        for group in dataclasses.fields(self):
            flat.update(dataclasses.asdict(getattr(self, group.name)))
        return redact(flat)

    def groups(self) -> list[Any]:
        """The flag groups, in command-line order."""
        return [getattr(self, group.name) for group in dataclasses.fields(self)]


SFT_GROUPS: tuple[type, ...] = (LoadArgs, SftDataArgs, TemplateArgs, LoraArgs, TrainArgs, TrackArgs)


def run(groups: dict[type, Any]) -> int:
    """CLI entry point of ``osstune sft``; returns the exit code.

    ``--dry_run true`` prints the plan and exits. With ``NPROC_PER_NODE`` > 1 (or ``NNODES`` > 1) outside torchrun,
    the command relaunches itself under torchrun after checking its flags once; otherwise this process trains.
    """
    cfg = SftConfig.from_groups(groups)
    if cfg.train.dry_run:
        from osstune.train.dry_run import dry_run

        return dry_run(cfg)
    plan = launch_plan()
    if plan is not None:
        _check_flags(cfg, plan.world_size)
        arguments = torchrun_arguments(plan, config_flags(cfg.groups()))
        Console(stderr=True).print(f"{plan.nproc_per_node} processes on node {plan.node_rank} of {plan.nnodes} "
                                   f"(world size {plan.world_size}): {shlex.join(torchrun_command(arguments))}",
                                   markup=False, highlight=False, soft_wrap=True)
        return relaunch(arguments)
    info = rank_info()
    result = train(cfg)
    if info.distributed:
        import torch.distributed as dist

        barrier(info)
        dist.destroy_process_group()
    return result.exit_code


@dataclass
class TrainResult:
    """What a training run produced.

    Args:
        run_dir: the run folder.
        last_checkpoint: the newest complete checkpoint, if any.
        exit_code: 0 done; 130/143 stopped by SIGINT/SIGTERM after saving; 1 stopped on a non-finite loss.
        global_step: optimizer steps completed.
    """

    run_dir: Path
    last_checkpoint: Path | None
    exit_code: int
    global_step: int


def _check_flags(cfg: SftConfig, world_size: int = 1) -> None:
    """Reject flag combinations that cannot work, before anything is written or loaded.

    Args:
        cfg: the configuration.
        world_size: how many processes will train together.
    """
    from osstune.models.local import resolve_model_dir

    resolve_model_dir(cfg.load.model)
    if not cfg.data.dataset:
        raise OsstuneError("--dataset is required: give one or more files, folders or dataset names.")
    if cfg.train.fsdp and cfg.train.deepspeed:
        raise OsstuneError("--fsdp and --deepspeed are two ways to shard training; choose one.")
    from osstune.models.loading import check_dequant_experts
    from osstune.train.checkpointing import check_offload

    check_offload(cfg.train.gradient_checkpointing, cfg.train.offload_activations)
    check_dequant_experts(cfg.load.dequant_experts, cfg.load.expert_weights)
    if cfg.load.offload_embeddings:
        check_embedding_offload(cfg.train)
        check_one_gpu_per_process(world_size)
    if cfg.train.offload_optimizer and sharded_engine(cfg.train):
        raise OsstuneError("--offload_optimizer true cannot be combined with --deepspeed or --fsdp: they shard the "
                           "optimizer state themselves. Use --deepspeed zero3_offload (or zero2_offload) to keep it "
                           "in host RAM there, or leave --offload_optimizer out.")
    if fsdp_config(cfg.train.fsdp) is not None:
        _check_fsdp(world_size)
    _check_deepspeed(cfg.train.deepspeed)
    if cfg.data.packing and not cfg.data.max_length:
        raise OsstuneError("--packing true needs --max_length: packed rows are at most that many tokens.")
    if cfg.train.lr_scheduler_kwargs:
        try:
            value = json.loads(cfg.train.lr_scheduler_kwargs)
        except json.JSONDecodeError as exc:
            raise OsstuneError(f"--lr_scheduler_kwargs: not valid JSON ({exc.msg}); write e.g. "
                               "'{\"min_lr_rate\": 0.1}'.") from None
        if not isinstance(value, dict):
            raise OsstuneError("--lr_scheduler_kwargs: expected a JSON object such as '{\"min_lr_rate\": 0.1}'.")
    if cfg.train.lr_scheduler_type == "cosine_with_min_lr" and not cfg.train.lr_scheduler_kwargs:
        raise OsstuneError("--lr_scheduler_type cosine_with_min_lr needs --lr_scheduler_kwargs "
                           "'{\"min_lr_rate\": 0.1}' (or min_lr).")
    if cfg.train.resume_from_checkpoint and not Path(cfg.train.resume_from_checkpoint).is_dir():
        raise OsstuneError(f"--resume_from_checkpoint {cfg.train.resume_from_checkpoint}: no such checkpoint folder.")


def check_embedding_offload(training: TrainArgs) -> None:
    """A host-RAM input embedding (``--offload_embeddings true``) trains on one device per process, under DDP at most.

    Args:
        training: the training flags (``--deepspeed``, ``--fsdp``).

    Raises:
        OsstuneError: DeepSpeed or FSDP, which place and shard every parameter themselves.
    """
    if sharded_engine(training):
        raise OsstuneError("--offload_embeddings true cannot be combined with --deepspeed or --fsdp: they place and "
                           "shard every weight themselves (the embedding included). Use --offload_embeddings false.")


def check_one_gpu_per_process(world_size: int) -> None:
    """With a host-RAM input embedding, a lone process must see one GPU: with several, the Trainer would replicate
    the model over them with ``nn.DataParallel``, which cannot replicate a table in host RAM.

    Args:
        world_size: how many processes will train together.

    Raises:
        OsstuneError: one process that sees several GPUs, saying how to pick one or use them all.
    """
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world_size == 1 and visible > 1:
        raise OsstuneError(f"--offload_embeddings true trains on one GPU per process, but this process sees {visible} "
                           "GPUs and would replicate the model over them with nn.DataParallel. Choose one GPU "
                           "(CUDA_VISIBLE_DEVICES=0), or train on all of them with NPROC_PER_NODE=N.")


def _check_deepspeed(value: str | None) -> None:
    """``--deepspeed`` needs the deepspeed package and a readable config.

    Args:
        value: ``--deepspeed``.

    Raises:
        OsstuneError: DeepSpeed is not installed (saying how to install it), or the config is unreadable.
    """
    if not value:
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise OsstuneError(
            f"--deepspeed {value}: DeepSpeed is not installed. Install it with `pip install \"osstune[deepspeed]\"` "
            "(on a machine with CUDA), or leave --deepspeed out: several processes then train with DDP, or shard "
            "with --fsdp.") from None
    deepspeed_stage(value)


def _check_fsdp(world_size: int) -> None:
    """FSDP needs several processes and GPUs.

    Args:
        world_size: how many processes will train together.

    Raises:
        OsstuneError: a single process, or no CUDA device (accelerate turns FSDP on only for GPU-like devices; on
            CPU the Trainer would silently train with DDP instead).
    """
    import torch

    if not torch.cuda.is_available():
        raise OsstuneError("--fsdp: FSDP shards over GPUs; accelerate enables it only for CUDA (and other "
                           "accelerator) devices, so on CPU the run would silently fall back to DDP. Leave --fsdp "
                           "out on CPU: several processes then train with DDP.")
    if world_size < 2:
        raise OsstuneError("--fsdp shards the model over several processes: launch with NPROC_PER_NODE=N "
                           "(N GPUs), e.g. `NPROC_PER_NODE=4 osstune sft --fsdp full_shard ...`.")


def fsdp_config(value: str | None) -> dict[str, Any] | None:
    """The Trainer's ``fsdp_config`` (FSDP2) for ``--fsdp``, or None when FSDP is off.

    Args:
        value: ``true``/``full_shard`` (parameters resharded after each layer's forward), ``shard_grad_op``
            (kept gathered until the backward), either plus ``offload`` (shards and optimizer state on the CPU);
            Hugging Face's ``"full_shard auto_wrap"`` spelling is accepted (each decoder layer is always its own
            FSDP unit). A ``.json`` file is read as the ``fsdp_config`` itself (``fsdp_`` key prefixes dropped,
            ``version`` 2 unless it says otherwise). ``false``/``none``/empty: off. Activation checkpointing stays
            the Trainer's (``--gradient_checkpointing``), which recomputes each layer after gathering its weights
            again; FSDP's own would save less traffic but hides the LoRA layers from PEFT's adapter saving.

    Raises:
        OsstuneError: unknown words, both sharding strategies, a JSON file that is missing or not an object, or
            one that turns on FSDP's activation checkpointing.
    """
    text = (value or "").strip()
    if not text or text.lower() in FALSE_WORDS:
        return None
    if text.lower().endswith(".json") or Path(text).is_file():
        try:
            loaded = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OsstuneError(f"--fsdp {text}: cannot read it as a JSON fsdp_config ({exc}).") from None
        if not isinstance(loaded, dict):
            raise OsstuneError(f"--fsdp {text}: expected a JSON object of fsdp_config keys.")
        config = {str(k).removeprefix("fsdp_"): v for k, v in loaded.items()}
        config.setdefault("version", 2)
        if str(config.get("activation_checkpointing", False)).lower() in TRUE_WORDS:
            raise OsstuneError(f"--fsdp {text}: activation_checkpointing wraps each layer in a way PEFT does not see "
                               "through when it saves the adapter (the saved adapter would be empty). Remove it: "
                               "--gradient_checkpointing true checkpoints the layers instead.")
        return config
    words = text.lower().replace(",", " ").split()
    if words == [words[0]] and words[0] in TRUE_WORDS:
        words = ["full_shard"]
    unknown = [w for w in words if w not in FSDP_WORDS]
    if unknown:
        raise OsstuneError(f"--fsdp {text}: {' '.join(unknown)} is not supported; use full_shard (or true) or "
                           "shard_grad_op, optionally with offload (FSDP2; hybrid strategies are FSDP1-only).")
    if "full_shard" in words and "shard_grad_op" in words:
        raise OsstuneError(f"--fsdp {text}: full_shard and shard_grad_op exclude each other; give one.")
    return {"version": 2, "reshard_after_forward": "shard_grad_op" not in words, "cpu_offload": "offload" in words,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT"}


def load_device(training: TrainArgs, info: RankInfo) -> str | None:
    """Where each process loads the model: as ``load_model`` picks alone, its own GPU under DDP and ZeRO-2, the CPU
    when ZeRO-3 or FSDP shards it (they move the shards to the GPUs; the whole model never sits on one GPU).

    Loading on the CPU under sharding costs host RAM: each process of a node holds the whole model until it is
    sharded (the 20b in bf16 is about 42 GB per process).

    Args:
        training: the training flags (``--deepspeed``, ``--fsdp``).
        info: this process's rank.
    """
    import torch

    if deepspeed_stage(training.deepspeed) == 3 or fsdp_config(training.fsdp) is not None:
        return "cpu"
    if info.distributed:
        return f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return None


def deepspeed_settings(value: str | None) -> dict[str, Any] | None:
    """The parsed DeepSpeed JSON of ``--deepspeed`` (a preset or a file), None when DeepSpeed is off.

    Args:
        value: ``--deepspeed``.

    Raises:
        OsstuneError: neither a preset nor a readable JSON object with a ``zero_optimization.stage``.
    """
    path = _deepspeed_config(value)
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OsstuneError(f"--deepspeed {value}: cannot read it as a DeepSpeed JSON config ({exc}).") from None
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    if not isinstance(stage, int):
        raise OsstuneError(f"--deepspeed {value}: expected a JSON object with zero_optimization.stage.")
    return config


def deepspeed_stage(value: str | None) -> int | None:
    """The ZeRO stage of ``--deepspeed``, None when DeepSpeed is off (see :func:`deepspeed_settings`).

    Args:
        value: ``--deepspeed``.
    """
    settings = deepspeed_settings(value)
    return None if settings is None else int(settings["zero_optimization"]["stage"])


def zero3_external_parameters(model: Any) -> list[tuple[Any, Any]]:
    """``(module, parameter)`` pairs that ZeRO-3 must gather when ``module`` runs, for LoRA on parameters.

    ZeRO-3 gathers a module's own parameters just before its forward. The forward of a PEFT ``ParamWrapper`` (the
    expert and router LoRA; osstune's grouped expert forward included) reads the weights of modules whose forward
    never runs: the wrapped expert stacks and the ``lora_A``/``lora_B`` layers. Every parameter below an outermost
    wrapper is therefore registered on that wrapper (``deepspeed.zero.register_external_parameter``).

    Args:
        model: the PEFT model.
    """
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers if isinstance(w.base_layer, ParamWrapper)}
    return [(w, p) for w in wrappers if id(w) not in inner for p in w.parameters()]


def _deepspeed_config(value: str | None) -> str | None:
    """A preset name becomes the JSON shipped in the package; a path is used as is."""
    if not value:
        return None
    if value in DEEPSPEED_PRESETS:
        from importlib.resources import files

        return str(files("osstune") / "resources" / "deepspeed" / f"{value}.json")
    if not Path(value).is_file():
        raise OsstuneError(f"--deepspeed {value}: not a preset ({', '.join(DEEPSPEED_PRESETS)}) and no such file.")
    return value


def _liger_notice(training: TrainArgs, console: Console, cuda: bool) -> bool:
    """Whether to pass ``use_liger_kernel`` to the Trainer; explains when it cannot apply (never silent)."""
    if not training.use_liger_kernel:
        return False
    if not cuda:
        console.print("[yellow]--use_liger_kernel true: liger kernels need CUDA; on CPU the loss uses PyTorch's "
                      "cross-entropy.[/]")
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        raise OsstuneError("--use_liger_kernel true: liger-kernel is not installed; `pip install liger-kernel`, "
                           "or pass --use_liger_kernel false.") from None
    return True


def sharded_engine(training: TrainArgs) -> bool:
    """Whether DeepSpeed or FSDP runs the training. They wrap the model and allocate their buffers inside the
    Trainer, so activation checkpointing is then the Trainer's own: every decoder layer (``auto`` included).

    Args:
        training: the training flags (``--deepspeed``, ``--fsdp``).
    """
    return bool(training.deepspeed) or fsdp_config(training.fsdp) is not None


def training_arguments(t: TrainArgs, seed: int, run_dir: Path, has_eval: bool, use_liger: bool, bf16: bool,
                       own_loss: bool = False) -> Any:
    """The ``transformers.TrainingArguments`` for a run (checkpoint rotation is osstune's, not HF's).

    Several processes without CUDA train on the CPU with gloo (``use_cpu``); accelerate would otherwise run each
    process on its own. The Trainer checkpoints activations itself only under DeepSpeed/FSDP (see
    :func:`sharded_engine`); otherwise :func:`fit` applies osstune's plan and the Trainer's flag stays off, so no
    layer is wrapped twice. With ``own_loss`` (osstune's fused loss is installed, ``install_fused_loss``) liger
    applies its RMSNorm and RoPE but not its fused loss.
    """
    import torch
    from transformers import TrainingArguments

    eval_strategy = t.eval_strategy or (t.save_strategy if has_eval else "no")
    if eval_strategy != "no" and not has_eval:
        raise OsstuneError(f"--eval_strategy {eval_strategy} needs validation data: pass --val_dataset or "
                           "--split_dataset_ratio > 0.")
    return TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=json.loads(t.lr_scheduler_kwargs) if t.lr_scheduler_kwargs else {},
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps or t.save_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=None,
        dataloader_num_workers=t.dataloader_num_workers,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_liger_kernel=use_liger,
        liger_kernel_config={"rope": True, "rms_norm": True, "fused_linear_cross_entropy": False} if own_loss else None,
        deepspeed=_deepspeed_config(t.deepspeed),
        activation_checkpointing=sharded_engine(t) and t.gradient_checkpointing != "false",
        activation_checkpointing_kwargs={"use_reentrant": False,
                                         **({"offload": True} if t.offload_activations else {})},
        **_fsdp_arguments(t.fsdp),
        use_cpu=rank_info().distributed and not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every forward
        report_to="none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="no",
        save_only_model=False,
        disable_tqdm=False,
    )


def host_optimizer(targs: Any) -> tuple[type, dict[str, Any]]:
    """The Trainer's ``optimizer_cls_and_kwargs`` for ``--offload_optimizer true``: :class:`HostAdamW` with the
    AdamW hyperparameters of ``targs`` (the Trainer adds the learning rate and the weight-decay groups).

    Args:
        targs: the run's ``TrainingArguments``.
    """
    from osstune.train.host_optimizer import HostAdamW

    return HostAdamW, {"lr": targs.learning_rate, "betas": (targs.adam_beta1, targs.adam_beta2),
                       "eps": targs.adam_epsilon}


def _fsdp_arguments(value: str | None) -> dict[str, Any]:
    """``fsdp`` and ``fsdp_config`` keyword arguments of ``TrainingArguments`` for ``--fsdp`` (none when off)."""
    config = fsdp_config(value)
    return {} if config is None else {"fsdp": True, "fsdp_config": config}


def train(cfg: SftConfig, console: Console | None = None) -> TrainResult:
    """``osstune sft``: run folder, model, data, LoRA, then :func:`fit`.

    Returns:
        The run folder, the last checkpoint and an exit code (see :class:`TrainResult`).
    """
    import torch
    from transformers import set_seed

    from osstune.data.pipeline import prepare_dataset
    from osstune.data.report import report_table
    from osstune.models.loading import load_model
    from osstune.models.lora import apply_lora, trainable_summary

    info = rank_info()
    console = console or Console(quiet=not info.is_main)
    _check_flags(cfg, info.world_size)
    init_distributed(info)
    run_dir = shared_run_dir(info, Path(cfg.train.output_dir))
    record = cfg.to_json() | {"osstune_version": osstune.__version__, "run_dir": str(run_dir), "command": sys.argv,
                              "world_size": info.world_size}
    if info.is_main:
        write_json_atomic(run_dir / "args.json", record)
    console.print(f"[bold]run folder[/] {run_dir}")

    loaded = load_model(cfg.load.model, torch_dtype=cfg.load.torch_dtype, attn_impl=cfg.load.attn_impl,
                        device=load_device(cfg.train, info), console=console, expert_weights=cfg.load.expert_weights,
                        compute_device="cuda" if torch.cuda.is_available() else None,
                        offload_embeddings=cfg.load.offload_embeddings, dequant_experts=cfg.load.dequant_experts)
    with local_main_first(info) as first:  # one process per node fills the dataset cache, the others read it
        data_args = cfg.data if first else dataclasses.replace(cfg.data, load_from_cache_file=True)
        prepared = prepare_dataset(data_args, cfg.template.render_options(), loaded.tokenizer,
                                   show_progress=info.is_main)
    console.print(report_table(prepared.report))
    if info.is_main:
        write_json_atomic(run_dir / "data_report.json", prepared.report.to_json())
    set_seed(cfg.data.seed)  # LoRA's random init must not depend on what ran before in this process
    model = apply_lora(loaded.model, lora_spec(cfg.lora))
    console.print(trainable_summary(model))
    return fit(model, loaded.tokenizer, prepared, cfg.train, cfg.track, data_args=cfg.data, run_dir=run_dir,
               record=record, console=console)


def fit(
    model: Any,
    tokenizer: Any,
    data: Any,
    training: TrainArgs,
    tracking: TrackArgs | None = None,
    *,
    data_args: SftDataArgs | None = None,
    run_dir: Path | None = None,
    record: dict[str, Any] | None = None,
    callbacks: tuple[Any, ...] = (),
    console: Console | None = None,
) -> TrainResult:
    """Train an already LoRA-wrapped model on prepared data; the Python API's counterpart of TRL's SFTTrainer.

    Args:
        model: a PEFT model (see :func:`osstune.models.lora.apply_lora`).
        tokenizer: its tokenizer.
        data: a :class:`~osstune.data.pipeline.PreparedDataset` (see :func:`osstune.data.pipeline.prepare_dataset`).
        training: optimisation, schedule, evaluation and checkpoint settings.
        tracking: trackers (default: SwanLab in local mode).
        data_args: packing, max_length and seed (default: ``SftDataArgs()``).
        run_dir: the run folder; default a new ``v{N}-{timestamp}`` under ``training.output_dir`` (created by rank 0
            and shared with the other ranks under torchrun).
        record: the configuration saved as ``args.json`` (by rank 0) and logged to the trackers.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        console: where progress and summaries are printed.
    """
    import torch

    from osstune.tracking.callbacks import MetricsCallback, make_trackers
    from osstune.tracking.report import summary_lines, write_report
    from osstune.train.callbacks import JsonlLogger, RunGuard, SampleGenerations, generation_prompts
    from osstune.train.trainer import OsstuneTrainer, list_checkpoints

    info = rank_info()
    console = console or Console(quiet=not info.is_main)
    tracking = tracking or TrackArgs()
    data_args = data_args or SftDataArgs()
    init_distributed(info)
    if run_dir is None:
        run_dir = shared_run_dir(info, Path(training.output_dir))
        console.print(f"[bold]run folder[/] {run_dir}")
    args_json = run_dir / "args.json"
    if record is None:
        record = redact({**dataclasses.asdict(training), **dataclasses.asdict(tracking),
                         "osstune_version": osstune.__version__, "run_dir": str(run_dir)})
    if info.is_main and not args_json.exists():
        write_json_atomic(args_json, record)

    if fsdp_config(training.fsdp) is not None:
        _check_fsdp(info.world_size)
    _check_deepspeed(training.deepspeed)
    if training.deepspeed:
        single_process_rendezvous()  # DeepSpeed starts a process group even alone; it probes MPI without these
    _exclude_host_embeddings(model, training)
    if deepspeed_stage(training.deepspeed) == 3:
        import deepspeed

        for module, parameter in zero3_external_parameters(model):
            deepspeed.zero.register_external_parameter(module, parameter)
    from osstune.models.gpt_oss.fused_loss import install_fused_loss

    cuda = torch.cuda.is_available()
    use_liger = _liger_notice(training, console, cuda)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    # With liger on, gpt-oss's loss is osstune's fused linear cross-entropy (larger chunks than liger's).
    # (Not under DeepSpeed/FSDP, whose sharded output embedding only its own forward gathers.)
    own_loss = use_liger and not sharded_engine(training) and install_fused_loss(
        model.get_base_model() if hasattr(model, "get_base_model") else model)
    targs = training_arguments(training, data_args.seed, run_dir, data.val is not None, use_liger, bf16, own_loss)
    plan = checkpoint_plan(model, data, training, data_args, liger=use_liger, console=console)
    if not sharded_engine(training):
        from osstune.train.checkpointing import apply_checkpointing

        apply_checkpointing(model, plan)
    if plan.checkpointed:
        model.enable_input_require_grads()
    console.print(plan.describe(), markup=False, highlight=False, soft_wrap=True)

    trackers = make_trackers(tracking.report_to, run_dir, project=tracking.swanlab_project,
                             experiment=tracking.swanlab_exp_name or run_dir.name, mode=tracking.swanlab_mode,
                             config=record)
    metrics = MetricsCallback(trackers)
    train_set, eval_set, collator = batching(model, tokenizer, data, data_args)
    trainer = OsstuneTrainer(
        model=model,
        args=targs,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[JsonlLogger(run_dir / "logging.jsonl"), metrics, *callbacks],
        keep_checkpoints=training.save_total_limit,
        extra_files=(args_json,),
        optimizer_cls_and_kwargs=host_optimizer(targs) if training.offload_optimizer else None,
    )
    guard = RunGuard(trainer)
    trainer.add_callback(guard)
    if data.val is not None and training.eval_generation_samples > 0:
        prompts = generation_prompts(data.val.input_ids, data.val.labels, training.eval_generation_samples)
        trainer.add_callback(SampleGenerations(tokenizer, prompts, _stop_ids(tokenizer), metrics,
                                               run_dir / "samples.jsonl"))
    try:
        with guard.handling_signals():
            trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    finally:
        metrics.finish()

    checkpoints = list_checkpoints(run_dir)
    last = checkpoints[-1] if checkpoints else None
    exit_code = 0
    if trainer.nonfinite_step is not None:
        exit_code = 1
        console.print(f"[red]stopped: the loss became NaN or infinite at step {trainer.nonfinite_step}.[/] "
                      f"The last good checkpoint is {last or '(none: no checkpoint was saved before)'}. "
                      "Lower --learning_rate, check the data, or use --torch_dtype bfloat16/float32.")
    elif guard.signal_name is not None:
        exit_code = 130 if guard.signal_name == "SIGINT" else 143
        console.print(f"[yellow]stopped by {guard.signal_name} at step {trainer.state.global_step}; checkpoint "
                      f"{last}. Continue with --resume_from_checkpoint {last}[/]")
    if info.is_main:
        write_report(run_dir)
        for line in summary_lines(run_dir):
            console.print(line)
    return TrainResult(run_dir, last, exit_code, trainer.state.global_step)


def _exclude_host_embeddings(model: Any, training: TrainArgs) -> None:
    """Keep host-RAM embedding tables (``--offload_embeddings true``) frozen and out of DDP's reach.

    DDP wants every parameter on the device it replicates and broadcasts them all at start; the frozen tables are
    identical in every process (loaded from the same checkpoint), so they are registered as parameters DDP ignores.

    Args:
        model: the PEFT model.
        training: the training flags.

    Raises:
        OsstuneError: a trained table, or DeepSpeed/FSDP (see :func:`check_embedding_offload`).
    """
    from torch.nn.parallel import DistributedDataParallel

    from osstune.models.host_embedding import frozen_host_embeddings

    names = frozen_host_embeddings(model)
    if not names:
        return
    check_embedding_offload(training)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [*ignored, *names])


def checkpoint_plan(model: Any, data: Any, training: TrainArgs, data_args: SftDataArgs, *, liger: bool,
                    console: Console) -> CheckpointPlan:
    """The activation checkpointing plan of a run (:class:`~osstune.train.checkpointing.CheckpointPlan`) for
    ``--gradient_checkpointing`` and ``--offload_activations``, sized for the longest micro-batch of ``data``.

    ``auto`` measures the free memory of the device the model sits on, now that its weights and adapter are there,
    and reserves the LoRA gradients, AdamW state and logits still to come; on the CPU and under DeepSpeed/FSDP
    (printing why) it checkpoints every layer.

    Args:
        model: the PEFT model, on its training device.
        data: the :class:`~osstune.data.pipeline.PreparedDataset`.
        training: the training flags.
        data_args: ``--packing`` and ``--max_length``.
        liger: the Trainer applies liger's kernels: the loss never materialises the logits, and RMSNorm saves its
            input in the compute dtype.
        console: where the fallback under DeepSpeed/FSDP is explained.
    """
    from osstune.models.host_embedding import input_device
    from osstune.models.memory import ModelCounts, TrainingShape, estimate_training_memory
    from osstune.train.checkpointing import SHARDED_AUTO_NOTE, device_memory, plan_for_shape
    from osstune.train.dry_run import lora_layout

    weight = model.get_input_embeddings().weight
    device = input_device(model)
    config = model.config.to_dict()
    seq_len = data_args.max_length if data_args.packing else max(len(ids) for ids in data.train.input_ids)
    shape = TrainingShape(micro_batch=training.per_device_train_batch_size, seq_len=seq_len, checkpointing=True,
                          attn_impl=model.config._attn_implementation or "eager", fused_loss=liger,
                          fused_norm=liger)
    layout = lora_layout(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    coming = estimate_training_memory(config, dtype=weight.dtype, lora=layout, shape=shape,
                                      counts=ModelCounts(frozen=0, trainable=trainable, largest_unit=0),
                                      host_optimizer=training.offload_optimizer)
    sharded = sharded_engine(training)
    if sharded and training.gradient_checkpointing == "auto":
        console.print(SHARDED_AUTO_NOTE, markup=False, highlight=False, soft_wrap=True)
    return plan_for_shape(training.gradient_checkpointing, config=config, lora=layout, shape=shape,
                          dtype_bytes=weight.dtype.itemsize, memory=None if sharded else device_memory(device),
                          reserve_bytes=coming.gradients + coming.optimizer + coming.logits,
                          offload=training.offload_activations)


def batching(model: Any, tokenizer: Any, data: Any, data_args: SftDataArgs) -> tuple[Any, Any, Any]:
    """Train and eval datasets and the collator: padded batches, or packed rows with per-sample attention."""
    from osstune.train.collator import PackingCollator, PaddingCollator, install_attention_masks
    from osstune.train.dataset import PackedDataset, SampleDataset

    eval_set = SampleDataset(data.val) if data.val is not None else None
    if data_args.packing:
        if not data_args.max_length:
            raise OsstuneError("--packing true needs --max_length: packed rows are at most that many tokens.")
        install_attention_masks(model)
        return PackedDataset(data.train, data_args.max_length), eval_set, PackingCollator()
    install_attention_masks(model, required=False)  # gpt-oss under flex_attention reuses unpadded batches' masks
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SampleDataset(data.train), eval_set, PaddingCollator(pad)


def lora_spec(lora: LoraArgs) -> Any:
    """The :class:`~osstune.models.lora.LoraSpec` of the LoRA flags."""
    from osstune.models.lora import LoraSpec

    return LoraSpec(rank=lora.lora_rank, alpha=lora.lora_alpha, dropout=lora.lora_dropout, use_rslora=lora.use_rslora,
                    target_modules=tuple(lora.target_modules), target_experts=lora.target_experts,
                    target_parameters=tuple(lora.target_parameters))


def _stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: harmony's <|return|>, <|end|>, <|call|>, else the EOS token."""
    from osstune.chat.tokenizer import harmony_tokens

    tok = harmony_tokens(tokenizer)
    if tok is not None:
        return [tok.return_, tok.end, tok.call]
    return [tokenizer.eos_token_id]
