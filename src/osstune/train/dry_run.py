"""``osstune sft --dry_run true``: what a run would take, without loading a weight.

It reads ``config.json``, the tokenizer and the data (rendered and length-filtered as training would), builds the
model and its LoRA adapter on the meta device (shapes only) to count parameters exactly, and prints the effective
batch size, steps per epoch, the activation checkpointing plan (:mod:`osstune.train.checkpointing`; ``auto`` plans
against this machine's first GPU, before anything is loaded) and the per-GPU memory estimate of
:func:`osstune.models.memory.estimate_training_memory` for the configured engine (DDP, ZeRO-2/3, FSDP2) and world
size (``NPROC_PER_NODE`` x ``NNODES``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from osstune.models.memory import (
    ADAMW_BYTES,
    ATTENTION_PROJECTIONS,
    MXFP4_BYTES,
    LoraLayout,
    MemoryEstimate,
    ModelCounts,
    TrainingShape,
    estimate_training_memory,
    format_bytes,
)
from osstune.train.args import TrainArgs
from osstune.train.checkpointing import SHARDED_AUTO_NOTE, CheckpointPlan, device_memory, plan_for_shape

MLP_PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
"""The linear layers of a dense gated MLP, by their usual module names."""


@dataclass(frozen=True)
class DryRunPlan:
    """What a training run would process and need.

    Args:
        model_type: ``config.json``'s model type.
        dtype: the weights' dtype.
        counts: frozen and trainable parameters, and the largest gathered unit.
        lora: where LoRA sits.
        engine: ``ddp``, ``zero2``, ``zero3``, ``zero3_offload``, ``fsdp`` or ``fsdp_offload``.
        world_size: processes training together.
        train_rows: training samples (or packed rows with ``--packing``).
        grad_accum: micro-steps per optimizer step.
        steps_per_epoch: optimizer steps per epoch, as the Trainer counts them.
        total_steps: optimizer steps of the run (``--max_steps``, else epochs x steps per epoch).
        effective_batch: rows per optimizer step over all processes.
        shape: the micro-batch the estimate assumes.
        seq_source: where ``shape.seq_len`` comes from (``--max_length`` or the longest sample).
        checkpointing: which decoder layers are checkpointed (``shape`` follows it).
        memory: the per-GPU estimate.
        host_optimizer: AdamW's moments live in host RAM (``--offload_optimizer true``).
    """

    model_type: str
    dtype: torch.dtype
    counts: ModelCounts
    lora: LoraLayout
    engine: str
    world_size: int
    train_rows: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    effective_batch: int
    shape: TrainingShape
    seq_source: str
    checkpointing: CheckpointPlan
    memory: MemoryEstimate
    host_optimizer: bool = False


def dry_run(cfg: Any, console: Console | None = None, world_size: int | None = None) -> int:
    """Print the plan of ``osstune sft`` (see :func:`plan_training`) and return exit code 0.

    Args:
        cfg: the :class:`~osstune.train.sft.SftConfig`.
        console: where to print (default stdout).
        world_size: processes training together (default ``NPROC_PER_NODE`` x ``NNODES``, else ``WORLD_SIZE``, else 1).
    """
    console = console or Console()
    plan = plan_training(cfg, world_size, console)
    for item in plan_tables(plan):
        console.print(item)
    return 0


def plan_training(cfg: Any, world_size: int | None = None, console: Console | None = None) -> DryRunPlan:
    """Work out a run's batches, steps and per-GPU memory from the config, tokenizer and data alone.

    Args:
        cfg: the :class:`~osstune.train.sft.SftConfig`.
        world_size: processes training together (default: as :func:`dry_run`).
        console: where the data report goes (default stdout).

    Raises:
        OsstuneError: a missing model folder, config or tokenizer, bad data, or inconsistent flags.
    """
    from transformers import AutoConfig

    from osstune.data.pipeline import prepare_dataset
    from osstune.data.report import report_table
    from osstune.errors import OsstuneError
    from osstune.models.loading import check_dequant_experts, resolve_dtype
    from osstune.models.local import is_gpt_oss, load_tokenizer, read_model_config, resolve_model_dir
    from osstune.train.dataset import PackedDataset
    from osstune.train.sft import check_embedding_offload, lora_spec

    console = console or Console()
    if cfg.train.fsdp and cfg.train.deepspeed:
        raise OsstuneError("--fsdp and --deepspeed are two ways to shard training; choose one.")
    model_dir = resolve_model_dir(cfg.load.model)
    config = read_model_config(model_dir)
    dtype = resolve_dtype(cfg.load.torch_dtype, config)
    engine = training_engine(cfg.train)
    check_dequant_experts(cfg.load.dequant_experts, cfg.load.expert_weights)
    if cfg.load.offload_embeddings:
        check_embedding_offload(cfg.train)
    world = world_size or planned_world_size()
    if not cfg.data.dataset:
        raise OsstuneError("--dataset is required: give one or more files, folders or dataset names.")
    if cfg.data.packing and not cfg.data.max_length:
        raise OsstuneError("--packing true needs --max_length: packed rows are at most that many tokens.")
    counts, layout = count_model(AutoConfig.from_pretrained(str(model_dir), local_files_only=True), dtype,
                                 lora_spec(cfg.lora), host_embedding=cfg.load.offload_embeddings,
                                 mxfp4_experts=cfg.load.expert_weights == "mxfp4" and is_gpt_oss(config),
                                 dequant_experts=cfg.load.dequant_experts)
    tokenizer = load_tokenizer(model_dir)
    prepared = prepare_dataset(cfg.data, cfg.template.render_options(), tokenizer, show_progress=False)
    console.print(report_table(prepared.report))
    if cfg.data.packing:
        rows, seq_len = len(PackedDataset(prepared.train, cfg.data.max_length)), cfg.data.max_length
        seq_source = "--max_length, packed rows"
    else:
        rows, seq_len = len(prepared.train), max(len(ids) for ids in prepared.train.input_ids)
        seq_source = "longest training sample"
    t = cfg.train
    per_epoch = steps_per_epoch(rows, t.per_device_train_batch_size, world, t.gradient_accumulation_steps)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    attn = cfg.load.attn_impl or ("flex_attention" if is_gpt_oss(config) else "sdpa")
    longest = TrainingShape(micro_batch=t.per_device_train_batch_size, seq_len=seq_len, checkpointing=True,
                            attn_impl=attn, fused_loss=t.use_liger_kernel, fused_norm=t.use_liger_kernel)
    before = estimate_training_memory(config, dtype=dtype, counts=counts, lora=layout, shape=longest, engine=engine,
                                      world_size=world, host_optimizer=t.offload_optimizer)
    if t.gradient_checkpointing == "auto" and engine != "ddp":
        console.print(SHARDED_AUTO_NOTE)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    checkpointing = plan_for_shape(t.gradient_checkpointing, config=config, lora=layout, shape=longest,
                                   dtype_bytes=dtype.itemsize,
                                   memory=device_memory(device) if engine == "ddp" else None,
                                   reserve_bytes=before.total - before.activations, offload=t.offload_activations)
    shape = shape_for(longest, checkpointing)
    memory = estimate_training_memory(config, dtype=dtype, counts=counts, lora=layout, shape=shape, engine=engine,
                                      world_size=world, host_optimizer=t.offload_optimizer)
    return DryRunPlan(model_type=str(config.get("model_type", "unknown")), dtype=dtype, counts=counts, lora=layout,
                      engine=engine, world_size=world, train_rows=rows, grad_accum=t.gradient_accumulation_steps,
                      steps_per_epoch=per_epoch, total_steps=total,
                      effective_batch=t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
                      shape=shape, seq_source=seq_source, checkpointing=checkpointing, memory=memory,
                      host_optimizer=t.offload_optimizer)


def shape_for(shape: TrainingShape, plan: CheckpointPlan) -> TrainingShape:
    """``shape`` with the checkpointed layers and offload of ``plan``.

    Args:
        shape: the micro-batch.
        plan: see :func:`osstune.train.checkpointing.plan_checkpointing`.
    """
    every = plan.every_layer or not plan.checkpointed
    return dataclasses.replace(shape, checkpointing=bool(plan.checkpointed), offload=plan.offload,
                               checkpointed_layers=None if every else frozenset(plan.checkpointed))


def steps_per_epoch(rows: int, per_device: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch as the Hugging Face Trainer counts them under accelerate.

    Batches of ``per_device`` rows are dealt round-robin to the processes (the last ones padded with rows from the
    start, so every process gets ``ceil(ceil(rows / per_device) / world_size)`` batches); every ``grad_accum``
    batches make one step, a partial group at the end included.

    Args:
        rows: training samples (or packed rows).
        per_device: ``--per_device_train_batch_size``.
        world_size: processes training together.
        grad_accum: ``--gradient_accumulation_steps``.
    """
    batches = math.ceil(math.ceil(rows / per_device) / world_size)
    return max(math.ceil(batches / grad_accum), 1)


def training_engine(training: TrainArgs) -> str:
    """The memory estimate's engine for the flags: ``zero2``, ``zero3`` or ``zero3_offload`` from ``--deepspeed``,
    ``fsdp`` or ``fsdp_offload`` from ``--fsdp``, else ``ddp``.

    Args:
        training: the training flags.

    Raises:
        OsstuneError: an unreadable ``--deepspeed``/``--fsdp`` value, or a ZeRO stage other than 2 or 3.
    """
    from osstune.errors import OsstuneError
    from osstune.train.sft import deepspeed_settings, fsdp_config

    settings = deepspeed_settings(training.deepspeed)
    if settings is not None:
        zero = settings["zero_optimization"]
        if zero["stage"] not in (2, 3):
            raise OsstuneError(f"--deepspeed {training.deepspeed}: ZeRO stage {zero['stage']}; the estimate knows "
                               "stages 2 and 3.")
        offload = (zero.get("offload_param") or {}).get("device") == "cpu"
        return "zero2" if zero["stage"] == 2 else "zero3_offload" if offload else "zero3"
    fsdp = fsdp_config(training.fsdp)
    if fsdp is not None:
        return "fsdp_offload" if fsdp.get("cpu_offload") else "fsdp"
    return "ddp"


def planned_world_size() -> int:
    """Processes a launch from this environment would start: ``NPROC_PER_NODE`` x ``NNODES`` when set, else the
    running torchrun's ``WORLD_SIZE``, else 1."""
    from osstune.train.launch import launch_plan, rank_info

    plan = launch_plan()
    return plan.world_size if plan is not None else rank_info().world_size


def count_model(config: Any, dtype: torch.dtype, spec: Any, *, host_embedding: bool = False,
                mxfp4_experts: bool = False, dequant_experts: int = 0) -> tuple[ModelCounts, LoraLayout]:
    """Count a model's parameters and locate its LoRA, on the meta device (no memory, no weights read).

    Args:
        config: the ``transformers`` config of the model.
        dtype: the weights' dtype.
        spec: the :class:`~osstune.models.lora.LoraSpec`.
        host_embedding: the input embedding table stays in host RAM (``--offload_embeddings true``): its
            parameters count as ``host``, not as ``frozen`` device weights.
        mxfp4_experts: gpt-oss experts stay MXFP4 (``--expert_weights mxfp4``): their weight stacks count as
            ``packed``, and one layer's largest stack (``dequant_experts`` experts of it when > 0) as ``scratch``.
        dequant_experts: ``--dequant_experts``.
    """
    from transformers import AutoModelForCausalLM

    from osstune.models.host_embedding import offloadable_embedding
    from osstune.models.lora import apply_lora

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    units = [module for module in base.modules() if type(module).__name__ in (base._no_split_modules or [])]
    units += [m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None]
    largest = max((sum(p.numel() for p in unit.parameters()) for unit in units), default=0)
    host = offloadable_embedding(base).weight.numel() if host_embedding else 0
    model = apply_lora(base, spec, console=Console(quiet=True))
    stacks = [param for name, param in base.named_parameters() if mxfp4_experts and param.dim() == 3
              and ".experts." in name and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")]
    packed = sum(param.numel() for param in stacks)
    largest_stack = max(stacks, key=lambda param: param.numel(), default=None)
    scratch = 0
    if largest_stack is not None:
        experts = largest_stack.shape[0]
        scratch = largest_stack.numel() * min(dequant_experts or experts, experts) // experts
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) - host - packed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = ModelCounts(frozen=frozen, trainable=trainable, largest_unit=largest, host=host, packed=packed,
                         scratch=scratch)
    return counts, lora_layout(model)


def lora_layout(model: Any) -> LoraLayout:
    """Where a PEFT model carries LoRA, as the activation estimate needs it (rank: the largest of its adapters).

    Args:
        model: the LoRA-wrapped model (on any device, the meta device included).
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    rank = 0
    attention: set[str] = set()
    experts: set[int] = set()
    router = mlp = False
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        rank = max([rank, *module.r.values()])
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, ParamWrapper):
            router = router or leaf == "router"
            if leaf == "experts":
                experts.add(_layer_index(name))
        elif leaf in ATTENTION_PROJECTIONS:
            attention.add(leaf)
        elif leaf in MLP_PROJECTIONS:
            mlp = True
    return LoraLayout(rank=rank, attention=tuple(p for p in ATTENTION_PROJECTIONS if p in attention),
                      expert_layers=frozenset(experts), router=router, mlp=mlp)


def plan_tables(plan: DryRunPlan) -> list[Any]:
    """The printed plan: a summary table and the per-GPU memory table.

    Args:
        plan: see :func:`plan_training`.
    """
    dtype = str(plan.dtype).removeprefix("torch.")
    summary = Table(title="dry run: nothing is loaded or trained", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("model", f"{plan.model_type}, {plan.counts.frozen:,} frozen params ({dtype})")
    if plan.counts.packed:
        summary.add_row("MXFP4 experts", f"{plan.counts.packed:,} params "
                                         f"({format_bytes(math.ceil(plan.counts.packed * MXFP4_BYTES))}); "
                                         f"{plan.counts.scratch:,} dequantised at once")
    host = []
    if plan.counts.host:
        host.append(f"input embedding, {plan.counts.host:,} params "
                    f"({format_bytes(plan.counts.host * plan.dtype.itemsize)})")
    if plan.host_optimizer:
        host.append(f"AdamW moments ({format_bytes(plan.counts.trainable * ADAMW_BYTES)})")
    if host:
        summary.add_row("host RAM", "; ".join(host))
    summary.add_row("LoRA", f"r={plan.lora.rank}: {plan.counts.trainable:,} trainable params")
    summary.add_row("processes", f"{plan.world_size} ({plan.engine})")
    summary.add_row("effective batch", f"{plan.effective_batch} = {plan.shape.micro_batch} per device x "
                                       f"{plan.grad_accum} accumulation x {plan.world_size} processes")
    summary.add_row("training rows", f"{plan.train_rows:,}")
    summary.add_row("steps per epoch", f"{plan.steps_per_epoch:,}")
    summary.add_row("total steps", f"{plan.total_steps:,}")
    summary.add_row("sequence", f"{plan.shape.seq_len:,} tokens ({plan.seq_source}); attention {plan.shape.attn_impl}")
    summary.add_row("checkpointing", plan.checkpointing.describe().removeprefix("checkpointing "))
    memory = Table(title="per-GPU memory estimate")
    memory.add_column("component")
    memory.add_column("memory", justify="right")
    for name, size in plan.memory.rows():
        memory.add_row(name, format_bytes(size))
    memory.add_row("total", format_bytes(plan.memory.total), style="bold")
    return [summary, memory]


def _layer_index(name: str) -> int:
    """The decoder layer index in a module name such as ``base_model.model.model.layers.7.mlp.experts``."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])
