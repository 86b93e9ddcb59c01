"""Loading model folders: the gpt-oss path (MXFP4 dequantised on load), the generic path, clear errors, memory."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from osstune.errors import OsstuneError
from osstune.models import loading, memory
from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4
from osstune.models.loading import (
    check_weight_files,
    load_model,
    resolve_attn_impl,
    resolve_device,
    resolve_dtype,
)
from osstune.models.memory import count_parameters, estimate_load_bytes, free_memory_bytes

GPT_OSS_20B = {
    "model_type": "gpt_oss",
    "num_hidden_layers": 24,
    "hidden_size": 2880,
    "num_attention_heads": 64,
    "head_dim": 64,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "intermediate_size": 2880,
    "vocab_size": 201088,
    "attention_bias": True,
    "tie_word_embeddings": False,
}
"""gpt-oss-20b's sizes (DESIGN section 3)."""

CPU = torch.device("cpu")


def recording_console() -> tuple[Console, io.StringIO]:
    """A console writing plain text to a buffer."""
    buffer = io.StringIO()
    return Console(file=buffer, width=300, color_system=None), buffer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, LlamaForCausalLM]:
    """A 2-layer random Llama saved with save_pretrained, with the tiny model's tokenizer; and the model itself."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=3072, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama") / "llama"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path, model


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    """Copy a model folder leaving some files out."""
    shutil.copytree(src, dst, ignore=lambda _dir, files: [f for f in files if f in names])
    return dst


def test_mxfp4_loads_dequantised_in_fp32_with_eager_attention(tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]):
    console, text = recording_console()
    loaded = load_model(tiny_model_dir, torch_dtype="float32", console=console)

    assert loaded.is_gpt_oss and loaded.attn_impl == "eager"
    assert loaded.dtype == torch.float32 and loaded.device == CPU
    assert loaded.model_dir == tiny_model_dir.resolve()
    assert loaded.model.config._attn_implementation == "eager"
    assert not loaded.model.training
    assert loaded.tokenizer.convert_tokens_to_ids("<|return|>") == loaded.config["eos_token_id"]
    stored = load_file(tiny_model_dir / "model.safetensors")
    for layer, block in enumerate(loaded.model.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{layer}.mlp.experts.{name}"
            expected = dequantize_mxfp4(stored[f"{prefix}_blocks"], stored[f"{prefix}_scales"], torch.float32)
            weight = getattr(block.mlp.experts, name)
            assert weight.dtype == torch.float32
            assert torch.equal(weight, expected)
            assert torch.equal(getattr(block.mlp.experts, f"{name}_bias"), stored[f"{prefix}_bias"].float())
    assert torch.equal(loaded.model.lm_head.weight, stored["lm_head.weight"].float())

    lines = text.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("memory: weights need ~3.2 MiB; ") and lines[0].endswith(" free on host RAM")
    assert lines[1].startswith(f"loaded {tiny_model_dir.resolve()}: dtype float32, attn eager, 845.17K params, cpu, ")
    peak = lines[1].rpartition("; peak host RAM ")[2]  # this process's high-water mark, at least the weights
    assert peak.endswith(("MiB", "GiB")) and float(peak.split()[0]) > 0
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no transformers warnings or progress bars


def test_bf16_checkpoint_loads_as_it_is(tiny_bf16_dir: Path, tiny_model_dir: Path):
    console, _ = recording_console()
    loaded = load_model(tiny_bf16_dir, torch_dtype="bf16", console=console)

    assert loaded.dtype == torch.bfloat16 and loaded.attn_impl == "eager"
    assert "quantization_config" not in loaded.config
    stored = load_file(tiny_model_dir / "model.safetensors")
    experts = loaded.model.model.layers[2].mlp.experts
    assert experts.down_proj.dtype == torch.bfloat16
    expected = dequantize_mxfp4(
        stored["model.layers.2.mlp.experts.down_proj_blocks"], stored["model.layers.2.mlp.experts.down_proj_scales"],
        torch.bfloat16,
    )
    assert torch.equal(experts.down_proj, expected)


def test_missing_weights_config_and_shards_are_clear_errors(tiny_model_dir: Path, tmp_path: Path):
    no_weights = copy_without(tiny_model_dir, tmp_path / "no_weights", "model.safetensors")
    with pytest.raises(OsstuneError, match="model.safetensors is missing"):
        load_model(no_weights, torch_dtype="float32")

    no_config = copy_without(tiny_model_dir, tmp_path / "no_config", "config.json")
    with pytest.raises(OsstuneError, match="config.json is missing"):
        load_model(no_config, torch_dtype="float32")

    with pytest.raises(OsstuneError, match="no such folder"):
        load_model(tmp_path / "absent")

    sharded = copy_without(tiny_model_dir, tmp_path / "sharded", "model.safetensors")
    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for shard, shard_names in halves.items():
        save_file({name: tensors[name] for name in shard_names}, str(sharded / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: shard for shard, group in halves.items() for name in group}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    assert check_weight_files(sharded) == [sharded / shard for shard in halves]
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(OsstuneError, match=r"model-00002-of-00002.safetensors is missing \(1 of 2 shards"):
        load_model(sharded)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_gpt_oss_refuses_attention_without_sinks(tiny_model_dir: Path, attn: str):
    with pytest.raises(OsstuneError, match=f"--attn_impl {attn}: gpt-oss's attention has learned sinks") as error:
        load_model(tiny_model_dir, torch_dtype="float32", attn_impl=attn)
    assert "Use flex_attention (CUDA) or eager" in str(error.value)


def test_attention_choice():
    cuda = torch.device("cuda", 0)
    assert resolve_attn_impl(None, gpt_oss=True, device=cuda) == "flex_attention"
    assert resolve_attn_impl("auto", gpt_oss=True, device=CPU) == "eager"
    assert resolve_attn_impl("eager", gpt_oss=True, device=cuda) == "eager"
    assert resolve_attn_impl(None, gpt_oss=False, device=cuda) == "sdpa"
    assert resolve_attn_impl("eager", gpt_oss=False, device=CPU) == "eager"
    with pytest.raises(OsstuneError, match="flex_attention on CUDA only"):
        resolve_attn_impl("flex_attention", gpt_oss=True, device=CPU)


def test_dtype_and_device_names():
    assert [resolve_dtype(name, {}) for name in ("bfloat16", "BF16", "float16", "fp16", "float32", "fp32")] == [
        torch.bfloat16, torch.bfloat16, torch.float16, torch.float16, torch.float32, torch.float32,
    ]
    assert resolve_dtype("auto", {"torch_dtype": "float32"}) == torch.float32
    assert resolve_dtype("auto", {"dtype": "float16", "torch_dtype": "float32"}) == torch.float16
    assert resolve_dtype("auto", {}) == torch.bfloat16
    with pytest.raises(OsstuneError, match="--torch_dtype int8: unknown dtype"):
        resolve_dtype("int8", {})
    assert resolve_device("cpu") == CPU
    with pytest.raises(OsstuneError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device(None) == CPU
        with pytest.raises(OsstuneError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_generic_model_loads_on_the_generic_path(llama_dir: tuple[Path, LlamaForCausalLM]):
    path, reference = llama_dir
    console, text = recording_console()
    loaded = load_model(path, torch_dtype="fp32", console=console)

    assert not loaded.is_gpt_oss and loaded.attn_impl == "sdpa"
    assert loaded.model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    lines = text.getvalue().splitlines()
    assert lines[0] == "generic path: llama; harmony-specific features are off"
    assert lines[2].startswith(f"loaded {path.resolve()}: dtype float32, attn sdpa, 212.13K params, cpu, ")


def test_memory_warning_when_short(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 2**20)
    console, text = recording_console()
    load_model(tiny_model_dir, torch_dtype="float32", console=console)
    lines = text.getvalue().splitlines()
    assert lines[:2] == [
        "memory: weights need ~3.2 MiB; 1.0 MiB free on host RAM",
        "warning: the weights alone need more than the 1.0 MiB free on host RAM; loading may fail or swap",
    ]


def test_estimate_is_exact_for_the_tiny_model(tiny_model_dir: Path, llama_dir: tuple[Path, LlamaForCausalLM]):
    console, _ = recording_console()
    loaded = load_model(tiny_model_dir, torch_dtype="float32", console=console)
    real = sum(param.numel() for param in loaded.model.parameters())
    assert count_parameters(loaded.config) == real == 845_168
    assert estimate_load_bytes(loaded.config, torch.float32) == 4 * real
    assert estimate_load_bytes(loaded.config, torch.bfloat16) == 2 * real

    path, llama = llama_dir
    llama_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert count_parameters(llama_config) == sum(param.numel() for param in llama.parameters())


def test_estimate_for_gpt_oss_20b():
    assert abs(count_parameters(GPT_OSS_20B) - 20.9e9) / 20.9e9 < 0.01
    assert estimate_load_bytes(GPT_OSS_20B, torch.bfloat16) == 2 * count_parameters(GPT_OSS_20B)
    with pytest.raises(OsstuneError, match="no usable hidden_size"):
        count_parameters({"model_type": "gpt_oss"})


def test_free_host_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    free = free_memory_bytes(CPU)
    assert free is None or free > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:     512 kB\n", encoding="ascii")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert memory._meminfo_available() == 512 * 1024
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "absent")
    assert memory._meminfo_available() is None


def test_attention_is_chosen_for_the_compute_device(tiny_model_dir: Path) -> None:
    # ZeRO-3/FSDP load on the CPU and run on the GPUs: the attention follows where the model runs.
    loaded = load_model(tiny_model_dir, torch_dtype="float32", device="cpu", compute_device="cpu",
                        console=Console(file=io.StringIO()))
    assert loaded.model.config._attn_implementation == "eager"
    with pytest.raises(OsstuneError, match="CUDA"):
        load_model(tiny_model_dir, torch_dtype="float32", device="cpu", compute_device="cuda",
                   console=Console(file=io.StringIO()))
