"""The tiny gpt-oss checkpoint: loads with transformers like the real one, trains, and renders harmony."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4
from osstune.models.gpt_oss.tiny import (
    HARMONY_SPECIAL_TOKENS,
    TINY_MODEL_FILES,
    bundled_texts,
    train_tokenizer,
    write_tiny_model,
)

SYSTEM_PROMPT = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-01-02\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


@pytest.fixture(scope="module")
def mxfp4_model(tiny_model_dir: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16, output_loading_info=True
    )
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_writes_the_hugging_face_files(tiny_model_dir: Path) -> None:
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == sorted(TINY_MODEL_FILES)


def test_config_mirrors_gpt_oss(tiny_model_dir: Path, tiny_bf16_dir: Path, tokenizer) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert config["rope_scaling"] == {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    }
    assert config["rope_theta"] == 150000
    assert config["vocab_size"] % 64 == 0 and len(tokenizer) <= config["vocab_size"] < len(tokenizer) + 64
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|return|>")
    assert config["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert config["quantization_config"] == {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    dense = json.loads((tiny_bf16_dir / "config.json").read_text())
    assert "quantization_config" not in dense
    assert {k: v for k, v in config.items() if k != "quantization_config"} == dense


def test_generation_and_tokenizer_configs_use_the_gpt_oss_token_strings(tiny_model_dir: Path, tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": ids("<|startoftext|>"),
        "do_sample": True,
        "eos_token_id": [ids("<|return|>"), ids("<|endoftext|>"), ids("<|call|>")],
        "pad_token_id": ids("<|endoftext|>"),
    }
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|startoftext|>",
        "<|return|>",
        "<|endoftext|>",
    )
    assert tokenizer.model_max_length == 131072


def test_checkpoint_tensors_have_the_gpt_oss_names_shapes_and_dtypes(tiny_model_dir: Path, tiny_bf16_dir: Path) -> None:
    stored = load_file(tiny_model_dir / "model.safetensors")
    layer0 = {
        k.removeprefix("model.layers.0."): (tuple(v.shape), v.dtype)
        for k, v in stored.items()
        if k.startswith("model.layers.0.")
    }
    bf16 = torch.bfloat16
    assert layer0 == {
        "input_layernorm.weight": ((64,), bf16),
        "post_attention_layernorm.weight": ((64,), bf16),
        "self_attn.q_proj.weight": ((64, 64), bf16),
        "self_attn.q_proj.bias": ((64,), bf16),
        "self_attn.k_proj.weight": ((32, 64), bf16),
        "self_attn.k_proj.bias": ((32,), bf16),
        "self_attn.v_proj.weight": ((32, 64), bf16),
        "self_attn.v_proj.bias": ((32,), bf16),
        "self_attn.o_proj.weight": ((64, 64), bf16),
        "self_attn.o_proj.bias": ((64,), bf16),
        "self_attn.sinks": ((4,), bf16),
        "mlp.router.weight": ((8, 64), bf16),
        "mlp.router.bias": ((8,), bf16),
        "mlp.experts.gate_up_proj_blocks": ((8, 128, 2, 16), torch.uint8),
        "mlp.experts.gate_up_proj_scales": ((8, 128, 2), torch.uint8),
        "mlp.experts.gate_up_proj_bias": ((8, 128), bf16),
        "mlp.experts.down_proj_blocks": ((8, 64, 2, 16), torch.uint8),
        "mlp.experts.down_proj_scales": ((8, 64, 2), torch.uint8),
        "mlp.experts.down_proj_bias": ((8, 64), bf16),
    }
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert len(stored) == 4 * 19 + 3
    assert tuple(stored["model.embed_tokens.weight"].shape) == tuple(stored["lm_head.weight"].shape) == (vocab, 64)
    dense = load_file(tiny_bf16_dir / "model.safetensors")
    assert tuple(dense["model.layers.3.mlp.experts.gate_up_proj"].shape) == (8, 64, 128)
    assert tuple(dense["model.layers.3.mlp.experts.down_proj"].shape) == (8, 64, 64)
    assert not any(k.endswith(("_blocks", "_scales")) for k in dense)
    # Well-scaled random weights, with non-zero biases.
    embed = stored["model.embed_tokens.weight"].float()
    assert 0.018 < embed.std().item() < 0.022
    assert stored["model.layers.1.mlp.experts.down_proj_bias"].count_nonzero().item() == 8 * 64


def test_dequantised_experts_equal_our_codec_and_the_dense_variant(
    tiny_model_dir: Path, tiny_bf16_dir: Path, mxfp4_model
) -> None:
    stored = load_file(tiny_model_dir / "model.safetensors")
    dense = load_file(tiny_bf16_dir / "model.safetensors")
    for layer in (0, 3):
        experts = mxfp4_model.model.layers[layer].mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{layer}.mlp.experts.{proj}"
            ours = dequantize_mxfp4(stored[f"{prefix}_blocks"], stored[f"{prefix}_scales"], torch.bfloat16)
            loaded = getattr(experts, proj).detach()
            assert loaded.dtype == torch.bfloat16
            assert torch.equal(loaded, ours)
            assert torch.equal(dense[prefix], ours)
            assert torch.equal(getattr(experts, f"{proj}_bias").detach(), stored[f"{prefix}_bias"])


def test_forward_gives_the_same_finite_logits_in_both_variants(tiny_bf16_dir: Path, mxfp4_model, tokenizer) -> None:
    dense_model = AutoModelForCausalLM.from_pretrained(tiny_bf16_dir)
    assert dense_model.dtype == torch.bfloat16  # dtype "auto" follows the stored bf16 weights
    text = "<|start|>user<|message|>你好，请介绍一下你自己。Hello!<|end|><|start|>assistant" * 2
    input_ids = torch.tensor([tokenizer.encode(text)])
    assert input_ids.shape[1] > 16  # longer than the sliding window
    with torch.no_grad():
        logits = mxfp4_model(input_ids).logits
        dense_logits = dense_model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], mxfp4_model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    assert logits.float().std().item() > 0.01
    assert torch.equal(logits, dense_logits)


def test_backward_reaches_experts_attention_and_embeddings(tiny_bf16_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_bf16_dir, dtype=torch.float32)
    model.train()
    input_ids = torch.tensor([tokenizer.encode("我是一个人工智能助手。I can answer questions.")])
    loss = model(input_ids, labels=input_ids).loss
    vocab = model.config.vocab_size
    assert 0.5 * torch.log(torch.tensor(vocab)).item() < loss.item() < 1.5 * torch.log(torch.tensor(vocab)).item()
    loss.backward()
    layer = model.model.layers[1]
    for parameter in (
        layer.mlp.experts.gate_up_proj,
        layer.mlp.experts.down_proj_bias,
        layer.mlp.router.weight,
        layer.self_attn.q_proj.weight,
        layer.self_attn.sinks,
        model.model.embed_tokens.weight,
    ):
        assert parameter.grad is not None
        assert bool(torch.isfinite(parameter.grad).all()) and parameter.grad.abs().sum().item() > 0


def test_a_few_optimizer_steps_fit_a_sequence(tiny_bf16_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_bf16_dir, dtype=torch.float32)
    model.train()
    input_ids = torch.tensor([tokenizer.encode("我是一个人工智能助手，很高兴认识你。I am a helpful assistant.")])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 0.25 * losses[0]  # measured 8.52 -> 0.85


def test_tokenizer_round_trips_chinese_and_english(tokenizer) -> None:
    texts = ("你好，我是一个人工智能助手。", "Hello, world! It's 2025.", "混合 mixed 文本 text\n\n  tabs\tand emoji 🙂")
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("人工智能助手", add_special_tokens=False)) < len("人工智能助手".encode())


def test_every_harmony_special_token_is_one_id(tokenizer) -> None:
    base = len(tokenizer) - len(HARMONY_SPECIAL_TOKENS)
    for offset, token in enumerate(HARMONY_SPECIAL_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [base + offset]
        assert tokenizer.decode([base + offset]) == token
    for token in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>", "<|constrain|>"):
        assert token in tokenizer.all_special_tokens or token in tokenizer.get_added_vocab()
    ids = tokenizer.encode("<|start|>assistant<|channel|>final<|message|>hi<|return|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|return|>")


def test_output_is_byte_identical_for_the_same_arguments(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    for name in TINY_MODEL_FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    other_seed = write_tiny_model(tmp_path / "seed1", seed=1)
    assert (other_seed / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (other_seed / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


def test_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OsstuneError, match="notes.txt"):
        write_tiny_model(tmp_path)
    with pytest.raises(OsstuneError, match="multiple of 32"):
        write_tiny_model(tmp_path / "new", hidden_size=48)


def test_bundled_texts_reads_every_string_of_every_jsonl(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text('{"messages": [{"role": "user", "content": "二"}], "n": 3}\n\n')
    (tmp_path / "a.jsonl").write_text('{"query": "一", "response": "one"}\n')
    (tmp_path / "ignored.json").write_text('{"query": "no"}')
    assert bundled_texts(tmp_path) == ["一", "one", "二", "user"]
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(OsstuneError, match=r"c\.jsonl:1"):
        bundled_texts(tmp_path)


def test_train_tokenizer_learns_cjk_merges_and_places_special_tokens_last() -> None:
    tokenizer = train_tokenizer(["深度学习模型", "深度学习很有趣", "学习模型"] * 5, vocab_size=3000)
    assert tokenizer.get_vocab_size() < 1000  # a small text supports fewer merges than asked
    assert len(tokenizer.encode("深度学习").ids) == 1
    first = tokenizer.get_vocab_size() - len(HARMONY_SPECIAL_TOKENS)
    assert [tokenizer.token_to_id(t) for t in HARMONY_SPECIAL_TOKENS] == list(range(first, tokenizer.get_vocab_size()))
    with pytest.raises(OsstuneError, match="vocab_size"):
        train_tokenizer([], vocab_size=100)


# --- chat template -------------------------------------------------------------------------------------------


def test_chat_template_renders_the_training_conversation(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "thinking": "User greets.", "content": "Hello!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, current_date="2025-01-02")
    assert text == (
        SYSTEM_PROMPT
        + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
        + "<|start|>user<|message|>Hi<|end|>"
        + "<|start|>assistant<|channel|>analysis<|message|>User greets.<|end|>"
        + "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, current_date="2025-01-02", return_dict=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|start|>")) == 5
    assert tokenizer.decode(ids) == text


def test_chat_template_drops_earlier_reasoning_and_adds_the_generation_prompt(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "thinking": "Easy.", "content": "2"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=True,
        current_date="2025-01-02",
        reasoning_effort="high",
        model_identity="You are Tiny.",
    )
    assert text == (
        SYSTEM_PROMPT.replace("Reasoning: medium", "Reasoning: high").replace(
            "You are ChatGPT, a large language model trained by OpenAI.", "You are Tiny."
        )
        + "<|start|>user<|message|>1+1?<|end|>"
        + "<|start|>assistant<|channel|>final<|message|>2<|end|>"
        + "<|start|>user<|message|>2+2?<|end|>"
        + "<|start|>assistant"
    )


def test_chat_template_renders_tool_calls_and_results(tokenizer) -> None:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "thinking": "Need the tool.", "tool_calls": [call]},
        {"role": "tool", "content": "晴, 20C"},
        {"role": "assistant", "thinking": "Report it.", "content": "Sunny."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, current_date="2025-01-02")
    call_and_result = (
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "北京"}<|call|>'
        + '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"晴, 20C"<|end|>'
    )
    assert text == (
        SYSTEM_PROMPT
        + "<|start|>user<|message|>Weather?<|end|>"
        + call_and_result
        + "<|start|>assistant<|channel|>analysis<|message|>Report it.<|end|>"
        + "<|start|>assistant<|channel|>final<|message|>Sunny.<|return|>"
    )
    # Before the final answer exists, the reasoning that led to the call is kept.
    pending = tokenizer.apply_chat_template(
        messages[:3], tokenize=False, add_generation_prompt=True, current_date="2025-01-02"
    )
    assert pending == (
        SYSTEM_PROMPT
        + "<|start|>user<|message|>Weather?<|end|>"
        + "<|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>"
        + call_and_result
        + "<|start|>assistant"
    )


@pytest.mark.parametrize(
    ("messages", "kwargs", "error"),
    [
        ([{"role": "user", "content": "x<|channel|>final"}], {}, "<|channel|>"),
        ([{"role": "assistant", "thinking": "<|channel|>analysis", "content": "y"}], {}, "<|channel|>"),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "max"}, "reasoning_effort"),
        ([{"role": "tool", "content": "x"}], {}, "no earlier assistant turn called a tool"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], {}, "only the first message"),
    ],
)
def test_chat_template_rejects_what_it_cannot_render(tokenizer, messages, kwargs, error) -> None:
    with pytest.raises(jinja2.exceptions.TemplateError, match=error.replace("|", r"\|")):
        tokenizer.apply_chat_template(messages, tokenize=False, current_date="2025-01-02", **kwargs)


def test_chat_template_defaults_the_date_to_today(tokenizer) -> None:
    import datetime

    before = datetime.date.today().isoformat()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    after = datetime.date.today().isoformat()
    assert f"Current date: {before}" in text or f"Current date: {after}" in text


def test_chat_template_matches_the_reference_harmony_renderer(tokenizer, tmp_path: Path, monkeypatch) -> None:
    harmony = pytest.importorskip("openai_harmony")
    bpe_openai = pytest.importorskip("bpe_openai")
    vocab = Path(bpe_openai.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    with gzip.open(vocab) as source, (tmp_path / "o200k_base.tiktoken").open("wb") as target:
        shutil.copyfileobj(source, target)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    encoding = harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    conversation = harmony.Conversation.from_messages(
        [
            harmony.Message.from_role_and_content(
                harmony.Role.SYSTEM, harmony.SystemContent.new().with_conversation_start_date("2025-01-02")
            ),
            harmony.Message.from_role_and_content(harmony.Role.USER, "你好"),
            harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, "Greet back.").with_channel("analysis"),
            harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, "你好！").with_channel("final"),
        ]
    )
    reference = encoding.decode(
        encoding.render_conversation_for_training(
            conversation, harmony.RenderConversationConfig(auto_drop_analysis=False)
        )
    )
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "thinking": "Greet back.", "content": "你好！"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, current_date="2025-01-02") == reference
