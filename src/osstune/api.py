"""The Python API: the steps of the Hugging Face TRL gpt-oss recipe, done the osstune way.

=====================================================  ==========================================================
TRL recipe                                             osstune
=====================================================  ==========================================================
``AutoModelForCausalLM(..., Mxfp4Config(dequantize``   ``load_model(path, torch_dtype="bfloat16")``
``=True), bf16)`` and ``AutoTokenizer``
``tokenizer.apply_chat_template`` over the dataset     ``prepare_dataset(DataArgs(...), RenderOptions(...),
                                                       tokenizer)`` (harmony masks, exact to the token)
``LoraConfig(r, lora_alpha, target_modules,``          ``apply_lora(model, LoraSpec(rank, alpha, ...,
``target_parameters)`` + ``get_peft_model``            target_parameters=...))`` (experts on the grouped path)
``SFTConfig(...)`` + ``SFTTrainer(...).train()``       ``train(model, tokenizer, data, TrainArgs(...))``
``model.generate`` on ``apply_chat_template``          ``generate(model, tokenizer, messages, RenderOptions(...))``
=====================================================  ==========================================================

Example::

    from osstune.api import (DataArgs, LoraSpec, RenderOptions, TrainArgs, apply_lora, load_model,
                             prepare_dataset, train)

    loaded = load_model("/models/gpt-oss-20b", torch_dtype="bfloat16")
    data = prepare_dataset(DataArgs(dataset=["train.jsonl"], max_length=4096), RenderOptions(), loaded.tokenizer)
    model = apply_lora(loaded.model, LoraSpec(rank=8, alpha=16))
    result = train(model, loaded.tokenizer, data, TrainArgs(learning_rate=2e-4, num_train_epochs=1))
"""

from __future__ import annotations

from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.chat.options import RenderOptions
from osstune.chat.render import render_prompt, render_training_samples
from osstune.data.pipeline import PreparedDataset, prepare_dataset
from osstune.infer.generate import Reply, generate
from osstune.models.loading import LoadedModel, load_model
from osstune.models.lora import LoraSpec, apply_lora, trainable_summary
from osstune.train.args import SftDataArgs as DataArgs
from osstune.train.args import TrackArgs, TrainArgs
from osstune.train.sft import TrainResult
from osstune.train.sft import fit as train

__all__ = [
    "Conversation", "DataArgs", "LoadedModel", "LoraSpec", "Message", "PreparedDataset", "RenderOptions", "Reply",
    "ToolCall", "TrackArgs", "TrainArgs", "TrainResult", "apply_lora", "generate", "load_model", "prepare_dataset",
    "render_prompt", "render_training_samples", "train", "trainable_summary",
]
