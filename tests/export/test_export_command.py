"""``osstune export``: the folder it writes from an ms-swift-style run folder, the model card, sharding in bounded
memory, and a clear error for every way the input can be wrong."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import osstune
from osstune.config import add_group, parse_flags
from osstune.errors import OsstuneError
from osstune.export.command import ExportArgs, export_merged, run
from osstune.models.gpt_oss.moe_lora import expert_target_parameters
from osstune.models.gpt_oss.tiny import write_tiny_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
RUN_ARGS = {"current_date": "2026-01-01", "reasoning_effort": "low", "model_identity": "You are Tiny.",
            "system": None, "dataset": ["data/train.jsonl", "self-cognition#100"], "val_dataset": ["data/val.jsonl"],
            "model_name": ["小猫", "tiny-cat"], "model_author": ["osstune tests"], "torch_dtype": "bfloat16",
            "osstune_version": "0.0.9"}


def write_adapter(model_dir: Path, out: Path, *, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter for ``model_dir`` with seeded random weights, as ``save_pretrained`` writes it.

    The keys and shapes come from PEFT itself (``get_peft_model_state_dict`` of the model built empty on the meta
    device), so no weights are loaded; the values are N(0, 0.05)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    lora_config = LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=str(model_dir), **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(empty, lora_config, low_cpu_mem_usage=True)
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(value.shape, generator=generator) * 0.05
             for key, value in sorted(get_peft_model_state_dict(peft_model).items())}
    peft_model.peft_config["default"].save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def gpt_oss_lora(model_dir: Path) -> dict[str, Any]:
    """LoRA on attention and every expert stack, as ``osstune sft`` configures it by default."""
    from transformers import AutoConfig

    return {"r": 4, "lora_alpha": 8, "target_modules": ATTENTION,
            "target_parameters": expert_target_parameters(AutoConfig.from_pretrained(model_dir))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """``output/v0-{ts}/checkpoint-2`` laid out as ``osstune sft`` writes it (args.json in the run folder and the
    checkpoint)."""
    run_dir = tmp_path_factory.mktemp("run") / "output" / "v0-20260101-120000"
    ckpt = run_dir / "checkpoint-2"
    ckpt.mkdir(parents=True)
    write_adapter(tiny_model_dir, ckpt, **gpt_oss_lora(tiny_model_dir))
    args = json.dumps({"model": str(tiny_model_dir), **RUN_ARGS}, ensure_ascii=False)
    for folder in (run_dir, ckpt):
        (folder / "args.json").write_text(args, encoding="utf-8")
    return ckpt


def cli(*argv: str) -> dict[type, Any]:
    """Parse ``osstune export`` flags the way the CLI does."""
    parser = argparse.ArgumentParser(prog="osstune export")
    add_group(parser, ExportArgs)
    parser.add_argument("--config", default=None)
    return parse_flags("export", list(argv), [ExportArgs], parser)


def test_export_writes_a_complete_model_folder(checkpoint: Path, tiny_model_dir: Path) -> None:
    assert run(cli("--adapters", str(checkpoint), "--merge_lora", "true")) == 0
    out = checkpoint.parent / "checkpoint-2-merged"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "args.json", "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["args.json", "checkpoint-2", "checkpoint-2-merged"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((tiny_model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config.pop("dtype") == "bfloat16"
    base_config.pop("quantization_config")
    assert config == base_config
    assert json.loads((out / "args.json").read_text()) == json.loads((checkpoint / "args.json").read_text())
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 128)  # [E, H, 2I] as transformers
    assert tensors["model.layers.0.mlp.experts.down_proj"].shape == (8, 64, 64)


def test_model_card_describes_the_model(checkpoint: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = export_merged(checkpoint, output_dir=tmp_path / "merged", quant_method="mxfp4").output_dir
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- osstune\n")
    assert "\n# 小猫 / tiny-cat\n" in card
    assert "小猫 / tiny-cat by osstune tests:" in card
    expected_rows = [
        f"| Base model | `{tiny_model_dir.resolve()}` |",
        f"| Adapter | `{checkpoint}` |",
        "| Training data | `data/train.jsonl`, `self-cognition#100` |",
        "| Validation data | `data/val.jsonl` |",
        "| Author | osstune tests |",
        "| LoRA | rank 4, alpha 8 (scaling 2 = alpha / rank) |",
        "| LoRA targets | modules k_proj, o_proj, q_proj, v_proj; mlp.experts.down_proj of layers 0-3; "
        "mlp.experts.gate_up_proj of layers 0-3 |",
        f"| osstune | trained with 0.0.9, exported with {osstune.__version__} |",
    ]
    for row in expected_rows:
        assert row in card, row
    assert "experts in MXFP4 (as the original gpt-oss checkpoint)" in card
    assert "- current date: `2026-01-01`\n- reasoning effort: `low`\n- model identity: `You are Tiny.`\n" in card
    assert f"osstune infer --model {out}" in card


def test_sharded_export_streams_in_bounded_memory(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A 100 MiB model exported with 16MB shards: several shards with an index, and the export's peak resident
    memory (VmHWM, measured in a fresh process after a warm-up export) stays below 2 x the largest shard + 32 MiB.

    The merge streams tensor by tensor, so the process grows by about the largest tensor's input and output, float32
    temporaries of one expert and ~10 MiB of bookkeeping (measured 20 MiB, for an 8 MiB largest tensor); holding the
    model (100 MiB) or several shards would exceed the bound."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak resident memory")
    small = write_wide_model(tiny_model_dir, tmp_path / "small", hidden=64, intermediate=64, experts=4, layers=2)
    wide = write_wide_model(tiny_model_dir, tmp_path / "wide", hidden=256, intermediate=256, experts=32, layers=8)
    for model in (small, wide):
        write_adapter(model, model.with_name(f"{model.name}-adapter"), **gpt_oss_lora(model))
    script = textwrap.dedent("""
        import json, re, sys
        from pathlib import Path
        from osstune.export.command import export_merged

        def status(key):
            return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

        small, wide, out = (Path(p) for p in sys.argv[1:4])
        export_merged(f"{small}-adapter", model=str(small), output_dir=out / "warm-up", max_shard_size="16MB")
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        export_merged(f"{wide}-adapter", model=str(wide), output_dir=out / "wide", max_shard_size="16MB")
        print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(small), str(wide), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])

    out = tmp_path / "out" / "wide"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 4 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    data_sizes = [p.stat().st_size for p in shards]
    assert max(data_sizes) <= 16 * 10**6 + 10**5  # 16MB of tensor data plus the header
    assert index["metadata"]["total_size"] > 100 * 2**20
    grown = memory["peak"] - memory["before"]
    bound = 2 * max(data_sizes) + 32 * 2**20
    assert grown < bound, f"peak grew by {grown / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB"
    assert bound < index["metadata"]["total_size"]  # a merge holding the model would fail


def write_wide_model(tiny: Path, out: Path, *, hidden: int, intermediate: int, experts: int, layers: int) -> Path:
    """A gpt-oss checkpoint of any size, written fast: the tiny model's tokenizer and config with other sizes, random
    bfloat16 weights and random MXFP4 codes for the experts, in one shard per two layers with an index."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copyfile(tiny / name, out / name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                  num_hidden_layers=layers, layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    (out / "config.json").write_text(json.dumps(config))
    model_config = AutoConfig.from_pretrained(out)
    del model_config.quantization_config
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(model_config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -2
        tensors = files.setdefault(f"model-{layer // 2 + 1}.safetensors", {})
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            count, rows, cols = shape[0], shape[2], shape[1]
            tensors[f"{name}_blocks"] = torch.randint(0, 256, (count, rows, cols // 32, 16), dtype=torch.uint8,
                                                      generator=generator)
            tensors[f"{name}_scales"] = torch.randint(118, 123, (count, rows, cols // 32), dtype=torch.uint8,
                                                      generator=generator)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    weight_map = {}
    for file, tensors in files.items():
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_dense_gpt_oss_base_exports_like_the_mxfp4_one(checkpoint: Path, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """A bf16 gpt-oss base (experts stored dense) merges to the same tensors as the MXFP4 release of the same weights,
    and --quant_method mxfp4 gives it the released layout and quantization_config."""
    dense = write_tiny_model(tmp_path / "dense", mxfp4=False)  # the same model, experts dequantised
    for quant in ("none", "mxfp4"):
        from_dense = export_merged(checkpoint, model=str(dense), output_dir=tmp_path / f"dense-{quant}",
                                   quant_method=quant).output_dir
        from_mxfp4 = export_merged(checkpoint, output_dir=tmp_path / f"mxfp4-{quant}", quant_method=quant).output_dir
        got, expected = load_file(from_dense / "model.safetensors"), load_file(from_mxfp4 / "model.safetensors")
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[key], expected[key]) for key in expected)
        config, reference = (json.loads((folder / "config.json").read_text()) for folder in (from_dense, from_mxfp4))
        assert config == reference
    assert config["quantization_config"] == json.loads((tiny_model_dir / "config.json").read_text())[
        "quantization_config"]


def test_merge_lora_false_explains_there_is_nothing_to_do(checkpoint: Path) -> None:
    with pytest.raises(OsstuneError, match=r"nothing to do.*--merge_lora true"):
        run(cli("--adapters", str(checkpoint)))
    with pytest.raises(OsstuneError, match="give --adapters CHECKPOINT"):
        run(cli("--merge_lora", "true"))


@pytest.mark.parametrize(("size", "message"), [
    ({"hidden_size": 96},
     "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 64] but the base tensor "
     "model.layers.0.self_attn.q_proj.weight [64, 96] needs [4, 96]"),
    # gpt-oss-20b and -120b differ like this: same widths, other expert count; r * E rows must not pass as rank 2r
    ({"num_experts": 16},
     "base_model.model.model.layers.0.mlp.experts.lora_A.weight has shape [32, 64] but the base tensor "
     "model.layers.0.mlp.experts.down_proj [16, 64, 64] needs [64, 64]"),
])
def test_adapter_for_another_base_names_tensor_and_shapes(checkpoint: Path, tiny_model_dir: Path, tmp_path: Path,
                                                          size: dict[str, int], message: str) -> None:
    other = write_tiny_model(tmp_path / "other", **size)
    with pytest.raises(OsstuneError) as caught:
        export_merged(checkpoint, model=str(other), output_dir=tmp_path / "merged")
    assert message in str(caught.value)
    assert f"trained on {tiny_model_dir}" in str(caught.value) and "--model" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # nothing written


def test_checkpoint_without_args_json_needs_model(checkpoint: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "checkpoint-7"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(checkpoint / name, bare / name)
    with pytest.raises(OsstuneError, match=r"no args\.json .* Pass --model BASE_MODEL_DIR"):
        run(cli("--adapters", str(bare), "--merge_lora", "true"))
    assert run(cli("--adapters", str(bare), "--merge_lora", "true", "--model", str(tiny_model_dir))) == 0
    assert (tmp_path / "checkpoint-7-merged" / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-7-merged" / "args.json").exists()


def test_corrupt_adapter_and_base_files(checkpoint: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "checkpoint-broken"
    shutil.copytree(checkpoint, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OsstuneError, match="adapter_model.safetensors: corrupt or truncated"):
        export_merged(broken)

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(OsstuneError, match="model.safetensors: corrupt or truncated"):
        export_merged(checkpoint, model=str(base), output_dir=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_nonfinite_adapter_is_refused_and_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "checkpoint-nan"
    shutil.copytree(checkpoint, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.2.mlp.experts.lora_A.weight"
    weights[key][0, 0] = float("nan")
    save_file(weights, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OsstuneError, match=f"{key} holds inf or NaN"):
        export_merged(broken, max_shard_size="100KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-nan"]  # no partial folder left


def test_output_dir_in_the_way_and_bad_flags(checkpoint: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(OsstuneError, match="already exists and is not empty"):
        run(cli("--adapters", str(checkpoint), "--merge_lora", "true", "--output_dir", str(taken)))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(OsstuneError, match="max_shard_size 5 gigs: not a size"):
        run(cli("--adapters", str(checkpoint), "--merge_lora", "true", "--max_shard_size", "5 gigs"))
    with pytest.raises(OsstuneError, match="no such checkpoint folder"):
        run(cli("--adapters", str(tmp_path / "nope"), "--merge_lora", "true"))
    with pytest.raises(SystemExit):  # argparse rejects a value outside the choices
        cli("--adapters", str(checkpoint), "--merge_lora", "true", "--quant_method", "gptq")
