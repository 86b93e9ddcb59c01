"""Random-weight gpt-oss checkpoints: released sizes computed, a scaled-down model written and loaded every way."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4
from osstune.models.gpt_oss.random_model import (
    DEFAULT_SHARD_BYTES,
    GptOssSizes,
    TensorSpec,
    build_config,
    checkpoint_bytes,
    checkpoint_layout,
    gpt_oss_config,
    o200k_harmony_config,
    random_tensors,
    write_random_checkpoint,
    write_weights,
)
from osstune.models.loading import load_model
from osstune.models.safetensors_shards import INDEX_FILE, shard_plan

VOCAB = 201088
SMALL = GptOssSizes(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_experts=4, experts_per_token=2, intermediate_size=64, sliding_window=16, vocab_size=VOCAB)
SHARD_BYTES = 20 * 2**20  # the 25.7 MB embedding and unembedding each get a shard; the layers share the middle one
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
CHAT = "<|start|>user<|message|>你好, how are you?<|end|><|start|>assistant<|channel|>final<|message|>Fine.<|return|>"


def small_config() -> dict[str, Any]:
    """The scaled-down gpt-oss: 2 layers, width 64, 4 experts top-2, the real vocabulary and special token ids."""
    return o200k_harmony_config(SMALL)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scaled-down model written by the same writer as the 20b, in three shards."""
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "model", small_config(), seed=0,
                                   shard_bytes=SHARD_BYTES)


@pytest.fixture(scope="module")
def small_tokenizer(small_dir: Path) -> Any:
    """The tokenizer written into ``small_dir``, loaded once (a 28 MB tokenizer.json takes seconds to load)."""
    return AutoTokenizer.from_pretrained(small_dir)


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, read through its index."""
    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


# --- released sizes (computed, never written) -----------------------------------------------------------------


def test_presets_carry_the_released_config_values() -> None:
    config = gpt_oss_config("20b")
    assert {k: config[k] for k in ("num_hidden_layers", "num_local_experts", "experts_per_token", "hidden_size",
                                   "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "sliding_window", "vocab_size", "eos_token_id", "pad_token_id", "swiglu_limit",
                                   "rope_theta", "max_position_embeddings", "initial_context_length")} == {
        "num_hidden_layers": 24, "num_local_experts": 32, "experts_per_token": 4, "hidden_size": 2880,
        "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "sliding_window": 128, "vocab_size": 201088, "eos_token_id": 200002, "pad_token_id": 199999,
        "swiglu_limit": 7.0, "rope_theta": 150000, "max_position_embeddings": 131072, "initial_context_length": 4096}
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 12
    assert config["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                      "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                      "truncate": False}
    assert config["quantization_config"] == {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
        "quant_method": "mxfp4"}
    big = gpt_oss_config("120b")
    assert (big["num_hidden_layers"], big["num_local_experts"], big["experts_per_token"]) == (36, 128, 4)
    assert {k: v for k, v in big.items() if k not in ("num_hidden_layers", "num_local_experts", "layer_types")} == {
        k: v for k, v in config.items() if k not in ("num_hidden_layers", "num_local_experts", "layer_types")}
    with pytest.raises(OsstuneError, match="unknown gpt-oss preset '7b'"):
        gpt_oss_config("7b")


def test_released_sizes_match_the_published_checkpoints() -> None:
    layout = checkpoint_layout(gpt_oss_config("20b"))
    # openai/gpt-oss-20b's model.safetensors.index.json: total_size 13761264768 over 459 tensors.
    assert (len(layout), checkpoint_bytes(gpt_oss_config("20b"))) == (459, 13_761_264_768)
    assert (len(checkpoint_layout(gpt_oss_config("120b"))), checkpoint_bytes(gpt_oss_config("120b"))) == (
        687, 65_248_815_744)
    specs = {spec.name: spec for spec in layout}
    assert specs["model.layers.5.mlp.experts.gate_up_proj_blocks"] == TensorSpec(
        "model.layers.5.mlp.experts.gate_up_proj_blocks", (32, 5760, 90, 16), torch.uint8, "expert_blocks")
    assert specs["model.layers.5.mlp.experts.down_proj_scales"].shape == (32, 2880, 90)
    assert specs["model.layers.5.self_attn.k_proj.weight"].shape == (512, 2880)
    assert specs["lm_head.weight"].nbytes == 201088 * 2880 * 2
    shards = shard_plan(layout, DEFAULT_SHARD_BYTES)
    assert [len(shard) for shard in shards] == [128, 171, 159, 1]  # the last shard is the unembedding
    assert all(sum(spec.nbytes for spec in shard) <= DEFAULT_SHARD_BYTES for shard in shards)
    assert [spec for shard in shards for spec in shard] == layout


# --- a scaled-down model through the same writer --------------------------------------------------------------


def test_shards_and_index_are_consistent(small_dir: Path) -> None:
    assert sorted(p.name for p in small_dir.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", INDEX_FILE, "tokenizer.json",
         "tokenizer_config.json", *SHARDS])
    assert not (small_dir.parent / ".model.partial").exists()
    config = json.loads((small_dir / "config.json").read_text())
    assert config == small_config()
    assert (config["eos_token_id"], config["pad_token_id"], config["vocab_size"]) == (200002, 199999, VOCAB)
    layout = checkpoint_layout(config)
    index = json.loads((small_dir / INDEX_FILE).read_text())
    assert index["metadata"] == {"total_size": checkpoint_bytes(config)}
    assert list(index["weight_map"]) == sorted(spec.name for spec in layout)
    assert index["weight_map"]["model.embed_tokens.weight"] == SHARDS[0]
    assert index["weight_map"]["model.layers.1.mlp.experts.down_proj_scales"] == SHARDS[1]
    assert index["weight_map"]["lm_head.weight"] == SHARDS[2]
    for shard in SHARDS:
        specs = [spec for spec in layout if index["weight_map"][spec.name] == shard]
        data = (small_dir / shard).read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        assert header_len % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        assert len(data) == 8 + header_len + sum(spec.nbytes for spec in specs)
        with safe_open(str(small_dir / shard), framework="pt") as f:
            assert sorted(f.keys()) == sorted(spec.name for spec in specs)
            for spec in specs:
                tensor = f.get_tensor(spec.name)
                assert (tuple(tensor.shape), tensor.dtype) == (spec.shape, spec.dtype), spec.name
    assert json.loads((small_dir / "generation_config.json").read_text()) == {
        "bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}


def test_random_values_have_the_intended_scales(small_dir: Path) -> None:
    tensors = stored(small_dir)
    assert len(tensors) == 2 * 19 + 3
    assert 0.0199 < tensors["model.embed_tokens.weight"].float().std().item() < 0.0201  # 12.9M draws
    assert 0.1245 < tensors["lm_head.weight"].float().std().item() < 0.1255  # 1/sqrt(64)
    assert torch.equal(tensors["model.layers.1.post_attention_layernorm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert 0.018 < tensors["model.layers.0.self_attn.q_proj.bias"].float().std().item() < 0.022
    for proj in ("gate_up_proj", "down_proj"):
        prefix = f"model.layers.1.mlp.experts.{proj}"
        dense = dequantize_mxfp4(tensors[f"{prefix}_blocks"], tensors[f"{prefix}_scales"], torch.float32)
        assert abs(dense.mean().item()) < 0.001
        assert 0.0195 < dense.std().item() < 0.0210, proj  # quantisation keeps the N(0, 0.02) spread


def test_loads_with_transformers_dequantised(small_dir: Path, small_tokenizer: Any) -> None:
    model = AutoModelForCausalLM.from_pretrained(small_dir, quantization_config=Mxfp4Config(dequantize=True))
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == VOCAB
    tensors = stored(small_dir)
    experts = model.model.layers[1].mlp.experts
    for proj in ("gate_up_proj", "down_proj"):
        prefix = f"model.layers.1.mlp.experts.{proj}"
        expected = dequantize_mxfp4(tensors[f"{prefix}_blocks"], tensors[f"{prefix}_scales"], torch.bfloat16)
        assert torch.equal(getattr(experts, proj).detach(), expected)
    assert torch.equal(model.lm_head.weight.detach(), tensors["lm_head.weight"])
    ids = torch.tensor([small_tokenizer.encode(CHAT)])
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert bool(torch.isfinite(out.logits).all())
    # Unit-scale random logits: the loss sits a little above log(vocab) = 12.21.
    assert math.log(VOCAB) < out.loss.item() < math.log(VOCAB) + 1.5


def test_loads_with_osstune_in_both_expert_modes(small_dir: Path, small_tokenizer: Any) -> None:
    ids = torch.tensor([small_tokenizer.encode(CHAT)])
    logits = {}
    for mode in ("bf16", "mxfp4"):
        loaded = load_model(small_dir, torch_dtype="float32", device="cpu", console=Console(quiet=True),
                            expert_weights=mode)
        assert loaded.expert_weights == mode and loaded.is_gpt_oss and loaded.attn_impl == "eager"
        assert loaded.tokenizer.convert_tokens_to_ids("<|return|>") == loaded.config["eos_token_id"]
        with torch.no_grad():
            logits[mode] = loaded.model(ids).logits
    assert bool(torch.isfinite(logits["bf16"]).all())
    error = (logits["mxfp4"] - logits["bf16"]).norm() / logits["bf16"].norm()
    assert error.item() < 1e-5


def test_tokenizer_is_the_real_o200k_harmony(small_tokenizer: Any, o200k_tokenizer: Any) -> None:
    tokenizer = small_tokenizer
    assert len(tokenizer) == VOCAB
    assert tokenizer.encode("<|start|>", add_special_tokens=False) == [200006]
    assert tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>", "<|message|>"]) == [200002, 200012, 200008]
    text = "Hello, world! 你好，世界。 It's 2025."
    assert tokenizer.encode(text, add_special_tokens=False) == o200k_tokenizer.encode(text, add_special_tokens=False)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|startoftext|>", "<|return|>", "<|endoftext|>")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True, current_date="2025-01-02")
    assert rendered.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_same_seed_same_tensors_other_seed_other_tensors() -> None:
    config = build_config(dataclasses.replace(SMALL, vocab_size=512), eos_token_id=1, pad_token_id=0)
    first = dict(random_tensors(config, seed=3))
    again = dict(random_tensors(config, seed=3))
    other = dict(random_tensors(config, seed=4))
    assert list(first) == [spec.name for spec in checkpoint_layout(config)]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                           other["model.layers.0.mlp.experts.gate_up_proj_blocks"])
    dense_config = build_config(dataclasses.replace(SMALL, vocab_size=512), eos_token_id=1,
                                pad_token_id=0, mxfp4=False)
    dense = dict(random_tensors(dense_config, seed=3))
    # The dense variant holds the same model: the dequantised MXFP4 experts, [E, in, out].
    expected = dequantize_mxfp4(first["model.layers.1.mlp.experts.down_proj_blocks"],
                                first["model.layers.1.mlp.experts.down_proj_scales"], torch.bfloat16)
    assert torch.equal(dense["model.layers.1.mlp.experts.down_proj"], expected)
    assert tuple(dense["model.layers.1.mlp.experts.gate_up_proj"].shape) == (4, 64, 128)


def test_write_weights_refuses_tensors_that_do_not_match_the_layout(tmp_path: Path) -> None:
    layout = [TensorSpec("a", (2, 3), torch.bfloat16, "normal"), TensorSpec("b", (4,), torch.uint8, "ones")]
    good = [("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.ones(4, dtype=torch.uint8))]
    assert write_weights(tmp_path, layout, good, shard_bytes=100) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("b").tolist() == [1, 1, 1, 1]
    with pytest.raises(OsstuneError, match=r"expected b torch.uint8 \[4\], got b torch.uint8 \[5\]"):
        write_weights(tmp_path, layout, [good[0], ("b", torch.ones(5, dtype=torch.uint8))])
    with pytest.raises(OsstuneError, match="ended before the layout"):
        write_weights(tmp_path, layout, good[:1])
    with pytest.raises(OsstuneError, match="go on after the last tensor"):
        write_weights(tmp_path, layout, [*good, ("c", torch.zeros(1))])
    assert write_weights(tmp_path, layout, good, shard_bytes=12) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_FILE]


def test_refuses_a_used_folder_and_a_vocabulary_smaller_than_the_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(OsstuneError, match="not an empty folder"):
        write_random_checkpoint(tmp_path / "used", small_config())
    small_vocab = o200k_harmony_config(dataclasses.replace(SMALL, vocab_size=1024))
    with pytest.raises(OsstuneError, match="vocab_size is 1024; the o200k_harmony tokenizer needs at least 201088"):
        write_random_checkpoint(tmp_path / "new", small_vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # nothing half-written is left
    with pytest.raises(OsstuneError, match="multiple of 32"):
        build_config(dataclasses.replace(SMALL, hidden_size=48), eos_token_id=1, pad_token_id=0)


def test_write_checkpoint_needs_the_harmony_tokens_within_the_vocabulary(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    from osstune.models.gpt_oss.random_model import write_checkpoint
    from osstune.models.gpt_oss.tiny import train_tokenizer

    tokenizer = train_tokenizer(["abc abd"] * 3, vocab_size=300)
    small = build_config(dataclasses.replace(SMALL, vocab_size=256), eos_token_id=1, pad_token_id=0)
    with pytest.raises(OsstuneError, match=f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the config's "
                                           "vocab_size is 256"):
        write_checkpoint(tmp_path, small, tokenizer)
    with pytest.raises(OsstuneError, match=r"no <\|startoftext\|> token"):
        write_checkpoint(tmp_path, small, Tokenizer(models.BPE()))
    assert list(tmp_path.iterdir()) == []
