"""Merging a trained LoRA checkpoint into the tiny gpt-oss: the merged model is the adapter model (weights, logits,
greedy tokens), the expert updates count, and MXFP4 re-quantisation stays within its stated error bound."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Mxfp4Config

from osstune.config import TemplateArgs
from osstune.errors import OsstuneError
from osstune.export.command import export_merged
from osstune.export.merge import parse_size
from osstune.models.safetensors_shards import shard_names
from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.sft import SftConfig, train

IDS = torch.tensor([[5, 17, 99, 250, 7, 42, 1000, 3, 64, 900, 12, 31]])
LAYERS = 4
"""Decoder layers of the tiny gpt-oss."""


def quiet_load(path: Path | str, **kwargs: Any) -> Any:
    """``from_pretrained`` in eval mode, without transformers' notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def base_model(model_dir: Path) -> Any:
    """The base model as training saw it: MXFP4 experts dequantised, float32."""
    return quiet_load(model_dir, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True),
                      attn_implementation="eager")


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[0].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance of ``a`` from the reference ``b``."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real ``osstune sft`` checkpoint (3 steps; LoRA on attention, router and every expert stack; rsLoRA).

    Its lora_B weights are then set to seeded random values: three steps move them by ~1e-3, and the tests below
    must see each update clearly (a merge that drops one must fail)."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "thinking": f"Add {i} and {i}.", "content": f"{2 * i}, nya~"}]}) + "\n"
        for i in range(12)))
    result = train(SftConfig(
        load=LoadArgs(model=str(tiny_model_dir), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date="2026-01-01"),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, target_modules=["all-router"]),
        train=TrainArgs(output_dir=str(root / "output"), max_steps=3, save_steps=3, learning_rate=2e-3,
                        logging_steps=1, per_device_train_batch_size=4, eval_generation_samples=0),
        track=TrackArgs(report_to=["none"]),
    ))
    assert result.exit_code == 0 and result.last_checkpoint is not None
    ckpt = result.last_checkpoint
    weights = load_file(ckpt / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(3)
    for key in sorted(weights):
        if ".lora_B." in key:
            weights[key] = torch.randn(weights[key].shape, generator=generator) * 0.02
    save_file(weights, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ckpt


@pytest.fixture(scope="module")
def peft_model(checkpoint: Path, tiny_model_dir: Path) -> Any:
    """Base + adapter as plain PEFT runs it (PEFT's own forward, float32)."""
    return PeftModel.from_pretrained(base_model(tiny_model_dir), str(checkpoint)).eval()


@pytest.fixture(scope="module")
def exports(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checkpoint exported as float32 (in several shards), bfloat16, and bfloat16 with MXFP4 experts."""
    root = tmp_path_factory.mktemp("exports")
    return {
        "fp32": export_merged(checkpoint, output_dir=root / "fp32", torch_dtype="float32",
                              max_shard_size="200KB").output_dir,
        "bf16": export_merged(checkpoint, output_dir=root / "bf16").output_dir,
        "mxfp4": export_merged(checkpoint, output_dir=root / "mxfp4", quant_method="mxfp4").output_dir,
    }


def test_fp32_export_is_peft_merge_and_unload(exports: dict[str, Path], checkpoint: Path,
                                              tiny_model_dir: Path) -> None:
    """Every tensor equals PEFT's own merge (attention, router, expert stacks, rsLoRA scaling), across shards."""
    folder = exports["fp32"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == shard_names(len(files))
    got = read_folder(folder)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    expected = PeftModel.from_pretrained(base_model(tiny_model_dir), str(checkpoint)).merge_and_unload().state_dict()
    base = base_model(tiny_model_dir).state_dict()
    assert sorted(got) == sorted(expected) and sorted(index["weight_map"]) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32
        assert torch.allclose(got[key], value, rtol=0, atol=1e-7), key
    changed = {key for key in expected if not torch.equal(got[key], base[key])}
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.router.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert changed == {f"model.layers.{layer}.{name}" for layer in range(LAYERS) for name in per_layer}


def test_merged_logits_equal_base_plus_adapter(exports: dict[str, Path], peft_model: Any,
                                               tiny_model_dir: Path) -> None:
    reference = logits(peft_model)
    merged = logits(quiet_load(exports["fp32"], attn_implementation="eager"))
    assert rel(merged, reference) < 1e-5  # measured 2e-7: the same float32 sums in another order
    assert rel(logits(base_model(tiny_model_dir)), reference) > 0.1  # the adapter changes the logits by 92%


def test_bf16_export_is_the_fp32_merge_rounded_once(exports: dict[str, Path], peft_model: Any) -> None:
    """bfloat16 output is the float32 merge rounded once; its logits are within 1e-2 of base + adapter."""
    fp32, bf16 = read_folder(exports["fp32"]), read_folder(exports["bf16"])
    assert (exports["bf16"] / "model.safetensors").is_file()  # 1.6 MiB fits one 5GB shard: no index
    assert not (exports["bf16"] / "model.safetensors.index.json").exists()
    assert sorted(bf16) == sorted(fp32)
    for key, value in fp32.items():
        assert bf16[key].dtype == torch.bfloat16 and torch.equal(bf16[key], value.to(torch.bfloat16)), key
    error = rel(logits(quiet_load(exports["bf16"], dtype=torch.float32, attn_implementation="eager")),
                logits(peft_model))
    assert error < 1e-2, error  # bfloat16 weights (8-bit significand): measured 2.1e-3


def test_plain_transformers_generates_like_peft(exports: dict[str, Path], peft_model: Any) -> None:
    """The merged folder needs neither PEFT nor osstune: plain from_pretrained, same greedy tokens."""
    merged = quiet_load(exports["fp32"])
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = peft_model.generate(input_ids=IDS, **settings)
        got = merged.generate(input_ids=IDS, **settings)
    assert got.shape == (1, IDS.shape[1] + 8)
    assert got.tolist() == expected.tolist()


def test_expert_updates_are_in_the_merge(exports: dict[str, Path], checkpoint: Path, peft_model: Any,
                                         tiny_model_dir: Path, tmp_path: Path) -> None:
    """The expert stacks changed, and the same adapter merged without its expert LoRA no longer matches."""
    merged = read_folder(exports["fp32"])
    base = load_file(tiny_model_dir / "model.safetensors")
    for layer in range(LAYERS):
        for stack in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{stack}"
            dense = dequantize_mxfp4(base[f"{name}_blocks"], base[f"{name}_scales"], torch.float32)
            assert rel(merged[name], dense) > 0.05, name

    no_experts = tmp_path / "checkpoint-no-experts"
    no_experts.mkdir()
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["target_parameters"] = [name for name in config["target_parameters"] if ".experts." not in name]
    (no_experts / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(checkpoint / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".experts." not in k}, str(no_experts /
              "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(checkpoint / "args.json", no_experts / "args.json")
    partial = export_merged(no_experts, torch_dtype="float32").output_dir
    error = rel(logits(quiet_load(partial, attn_implementation="eager")), logits(peft_model))
    assert error > 0.1, error  # measured 0.41; a correct merge is within 1e-5


def test_mxfp4_export_requantises_experts_within_bound(exports: dict[str, Path], peft_model: Any,
                                                       tiny_model_dir: Path) -> None:
    """Expert stacks are re-quantised from the float32 merge into the original MXFP4 layout and names.

    Error bound: MXFP4 (E2M1 values, one power-of-two scale per 32 inputs, round to nearest) has a relative Frobenius
    error of 11.6% on Gaussian weights, and less on weights that stay near the original MXFP4 grid (small updates).
    This adapter's updates are as large as the weights (random lora_B), so its stacks are Gaussian-like: measured
    11.6-11.8%; we assert < 12.5% for every stack. The logits of the re-quantised model are within 25% of the bfloat16
    merge's (measured 15%) and much closer to base + adapter than the base model is (15% against 92%)."""
    folder, original = exports["mxfp4"], tiny_model_dir / "model.safetensors"
    config, base_config = (json.loads((p / "config.json").read_text()) for p in (folder, tiny_model_dir))
    assert config["quantization_config"] == base_config["quantization_config"]
    got, base, fp32, bf16 = (read_folder(folder), load_file(original), read_folder(exports["fp32"]),
                             read_folder(exports["bf16"]))
    assert sorted(got) == sorted(base)
    for layer in range(LAYERS):
        for stack in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{stack}"
            blocks, scales = quantize_mxfp4(fp32[name])
            assert torch.equal(got[f"{name}_blocks"], blocks) and torch.equal(got[f"{name}_scales"], scales), name
            error = rel(dequantize_mxfp4(blocks, scales, torch.float32), bf16[name])
            assert 0 < error < 0.125, (name, error)
    for key, value in got.items():
        if not key.endswith(("_blocks", "_scales")):
            assert torch.equal(value, bf16[key]), key
    size_ratio = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / original.stat().st_size
    assert 0.99 < size_ratio < 1.01, size_ratio

    requantised = logits(quiet_load(folder, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True),
                                    attn_implementation="eager"))
    merged_bf16 = logits(quiet_load(exports["bf16"], dtype=torch.float32, attn_implementation="eager"))
    reference = logits(peft_model)
    assert rel(requantised, merged_bf16) < 0.25
    assert rel(requantised, reference) < 0.5 * rel(logits(base_model(tiny_model_dir)), reference)


def test_generic_causal_lm_merge(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A model that is not gpt-oss merges the same way (Linear LoRA with lora_bias, a modules_to_save head)."""
    base_dir = tmp_path / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=3072, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attention_bias=True, mlp_bias=True)
    LlamaForCausalLM(config).save_pretrained(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model_dir / name, base_dir / name)
    peft = get_peft_model(quiet_load(base_dir), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                          lora_bias=True, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT mistakes the 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        peft.save_pretrained(tmp_path / "adapter")
    expected = peft.merge_and_unload().state_dict()

    out = export_merged(tmp_path / "adapter", model=str(base_dir), torch_dtype="float32").output_dir
    got = read_folder(out)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=0, atol=1e-6), key
    assert not (out / "chat_template.jinja").exists()  # the base has no template to carry over
    with pytest.raises(OsstuneError, match="mxfp4 stores gpt-oss experts"):
        export_merged(tmp_path / "adapter", model=str(base_dir), output_dir=tmp_path / "q", quant_method="mxfp4")


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 mb") == 1_500_000
    assert parse_size("200KB") == 200_000
    assert parse_size(1000) == 1000
    for bad in ("5 GBs", "", "-1MB", "0"):
        with pytest.raises(OsstuneError, match="max_shard_size"):
            parse_size(bad)
