"""Expert LoRA computed grouped as (X @ A) @ B, checked against PEFT's ParamWrapper and a per-expert loop."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file
from torch import nn
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.experts import (
    ClampSwiGLUGate,
    LoraFactors,
    Rebuild,
    expert_weight_grad,
    experts_forward,
    gather_rows,
    gathered_rows,
    grouped_matmul,
    grouped_mm_applies,
    lora_input_matmul,
    route_by_expert,
)
from osstune.models.gpt_oss.moe_lora import (
    GroupedExpertLoraForward,
    disable_grouped_expert_lora,
    enable_grouped_expert_lora,
    expert_target_parameters,
    peft_lora_factors,
)

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, RANK, ALPHA = 32, 48, 4, 2, 2, 6
SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702  # gpt-oss's activation constants


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.detach() - b.detach()).norm() / b.detach().norm()).item()


def tiny_config() -> GptOssConfig:
    """Two layers, hidden 32, intermediate 48 (so in/out mix-ups change shapes), 4 experts top-2."""
    return GptOssConfig(
        num_hidden_layers=2,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        attn_implementation="eager",
        experts_implementation="eager",
    )


def tiny_model() -> GptOssForCausalLM:
    """The same random base model on every call."""
    torch.manual_seed(0)
    model = GptOssForCausalLM(tiny_config())
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def tiny_peft_model(use_rslora: bool = False, expert_layers: str | list[int] = "all",
                    dtype: torch.dtype = torch.float32) -> PeftModel:
    """PEFT LoRA on attention and on the experts of ``expert_layers`` (default both), with random non-zero A and B."""
    model = tiny_model().to(dtype)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["q_proj", "v_proj"],
        target_parameters=expert_target_parameters(model.config, layers=expert_layers),
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    return peft_model


def input_ids() -> torch.Tensor:
    """A fixed batch of 2 sequences of 9 tokens."""
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def logits_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and the gradients of the LM loss for every trainable parameter."""
    model.zero_grad(set_to_none=True)
    ids = input_ids()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return out.logits.detach(), grads


def expert_wrappers(model: nn.Module) -> list[ParamWrapper]:
    """The outermost PEFT wrappers of the experts modules."""
    return [module.mlp.experts for module in model.base_model.model.model.layers]


def test_expert_target_parameters_names_layers_and_stacks():
    config = tiny_config()
    assert expert_target_parameters(config) == [
        "0.mlp.experts.gate_up_proj",
        "0.mlp.experts.down_proj",
        "1.mlp.experts.gate_up_proj",
        "1.mlp.experts.down_proj",
    ]
    assert expert_target_parameters(config, layers=[1, 1], parameters=["down_proj"]) == ["1.mlp.experts.down_proj"]
    with pytest.raises(OsstuneError, match=r"layers \[2\] do not exist: the model has layers 0 to 1"):
        expert_target_parameters(config, layers=[0, 2])
    with pytest.raises(OsstuneError, match="cannot target"):
        expert_target_parameters(config, parameters=["gate_up_proj_bias"])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_grouped_forward_and_grads_match_peft(use_rslora: bool, monkeypatch: pytest.MonkeyPatch):
    peft_model = tiny_peft_model(use_rslora)
    ref_logits, ref_grads = logits_and_grads(peft_model)
    with peft_model.disable_adapter():
        base_logits = peft_model(input_ids=input_ids()).logits.detach()
    assert rel_err(ref_logits, base_logits) > 0.05  # the adapter matters

    assert enable_grouped_expert_lora(peft_model) == 4
    assert enable_grouped_expert_lora(peft_model) == 4  # idempotent
    for wrapper in expert_wrappers(peft_model):
        assert isinstance(wrapper.__dict__["forward"], GroupedExpertLoraForward)
        factors = peft_lora_factors(wrapper, "default")
        assert factors.scaling == (ALPHA / math.sqrt(RANK) if use_rslora else ALPHA / RANK)

    def materialise(*args, **kwargs):
        raise AssertionError("the grouped forward must not build W + BA")

    monkeypatch.setattr(ParamWrapper, "get_delta_weight", materialise)
    monkeypatch.setattr(ParamWrapper, "get_delta_factors", materialise)
    logits, grads = logits_and_grads(peft_model)

    assert rel_err(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys()
    assert sum("experts" in name for name in grads) == 8  # lora_A and lora_B of 2 stacks in 2 layers
    for name, grad in grads.items():
        assert ref_grads[name].norm() > 0, name
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    for wrapper in expert_wrappers(peft_model):
        experts = wrapper.get_base_layer()
        for param in (experts.gate_up_proj, experts.down_proj, experts.gate_up_proj_bias, experts.down_proj_bias):
            assert not param.requires_grad
            assert param.grad is None


def test_adapters_disabled_or_merged_defer_to_peft():
    peft_model = tiny_peft_model()
    with torch.no_grad():
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=input_ids()).logits
        ref_logits = peft_model(input_ids=input_ids()).logits
        enable_grouped_expert_lora(peft_model)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(input_ids=input_ids()).logits, base_logits)
        peft_model.merge_adapter()
        assert rel_err(peft_model(input_ids=input_ids()).logits, ref_logits) < 1e-5
        peft_model.unmerge_adapter()
        assert rel_err(peft_model(input_ids=input_ids()).logits, ref_logits) < 1e-5

    assert disable_grouped_expert_lora(peft_model) == 4
    assert disable_grouped_expert_lora(peft_model) == 0
    assert all("forward" not in wrapper.__dict__ for wrapper in expert_wrappers(peft_model))


def test_saved_adapter_is_peft_format_and_reloads(tmp_path):
    peft_model = tiny_peft_model(use_rslora=True)
    enable_grouped_expert_lora(peft_model)
    with torch.no_grad():
        logits = peft_model(input_ids=input_ids()).logits
    peft_model.save_pretrained(tmp_path)

    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_parameters"]) == sorted(expert_target_parameters(tiny_config()))
    assert adapter_config["use_rslora"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.experts"
    expert_shapes = {key: tuple(value.shape) for key, value in tensors.items() if key.startswith(prefix)}
    assert expert_shapes == {
        f"{prefix}.base_layer.lora_A.weight": (RANK * EXPERTS, HIDDEN),  # gate_up_proj [E, H, 2I]
        f"{prefix}.base_layer.lora_B.weight": (2 * INTERMEDIATE, RANK * EXPERTS),
        f"{prefix}.lora_A.weight": (RANK * EXPERTS, INTERMEDIATE),  # down_proj [E, I, H]
        f"{prefix}.lora_B.weight": (HIDDEN, RANK * EXPERTS),
    }
    assert len(tensors) == 16

    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=input_ids()).logits, logits) < 1e-5


def peft_layer() -> nn.Module:
    """One float64 gpt-oss MoE layer with PEFT LoRA (r=3) on both expert stacks, all weights random."""
    config = GptOssConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        experts_implementation="eager",
    )
    holder = nn.Module()
    torch.manual_seed(3)
    holder.mlp = GptOssMLP(config)
    holder = inject_adapter_in_model(
        LoraConfig(r=3, lora_alpha=5, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        holder.double(),
    )
    with torch.no_grad():
        for param in holder.parameters():
            param.normal_(0.0, 0.3)
    return holder


def per_expert_reference(
    x_TH: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    experts: nn.Module,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """Each expert on its own tokens with W_e + scaling * A_e^T @ B_e^T built from PEFT's raw lora_A / lora_B."""

    def weight(name: str) -> torch.Tensor:
        stack = getattr(experts, name)
        lora_a, lora_b, scaling = adapters[name]
        r = lora_a.shape[0] // EXPERTS
        return torch.stack(
            [stack[e] + scaling * lora_a[e * r : (e + 1) * r].T @ lora_b[:, e::EXPERTS].T for e in range(EXPERTS)]
        )

    gate_up, down = weight("gate_up_proj"), weight("down_proj")
    out = torch.zeros_like(x_TH)
    for e in range(EXPERTS):
        token, slot = (indices_TK == e).nonzero(as_tuple=True)
        h = x_TH[token] @ gate_up[e] + experts.gate_up_proj_bias[e]
        gate = h[:, ::2].clamp(max=SWIGLU_LIMIT)
        up = h[:, 1::2].clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        act = (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)
        y = act @ down[e] + experts.down_proj_bias[e]
        out = out.index_add(0, token, y * weights_TK[token, slot, None])
    return out


def test_float64_layer_matches_per_expert_loop():
    holder = peft_layer()
    wrapper = holder.mlp.experts
    assert enable_grouped_expert_lora(holder) == 2
    chain = {"down_proj": wrapper, "gate_up_proj": wrapper.base_layer}
    adapters = {
        name: (link.lora_A["default"].weight, link.lora_B["default"].weight, link.scaling["default"])
        for name, link in chain.items()
    }
    assert adapters["down_proj"][2] == 5 / 3
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    x.requires_grad_(True)
    probe = torch.randn(2, 11, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    lora_params = [param for param in holder.parameters() if param.requires_grad]
    assert len(lora_params) == 4

    out, _ = holder.mlp(x)
    grads = torch.autograd.grad((out * probe).sum(), [x, *lora_params])

    x_TH = x.reshape(-1, HIDDEN)
    _, scores_TK, indices_TK = holder.mlp.router(x_TH)
    assert torch.unique(indices_TK).tolist() == [0, 1, 2, 3]
    ref = per_expert_reference(x_TH, indices_TK, scores_TK, wrapper.get_base_layer(), adapters)
    clamped = (x_TH @ wrapper.get_base_layer().gate_up_proj[0]).abs() > SWIGLU_LIMIT
    assert clamped.any()  # the activation's clamps are exercised
    ref_grads = torch.autograd.grad((ref.view_as(probe) * probe).sum(), [x, *lora_params])

    assert rel_err(out.reshape(-1, HIDDEN), ref) < 1e-12
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref_grad) < 1e-12


def random_layer(
    dtype: torch.dtype, device: str, rank: int
) -> tuple[dict[str, torch.Tensor], tuple[LoraFactors, LoraFactors]]:
    """Random expert weights, LoRA factors (requiring grad) and routing; expert 2 gets no token."""
    gen = torch.Generator().manual_seed(6)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    tokens = 13
    indices = torch.tensor([[0, 1], [3, 0], [1, 3]] * 4 + [[3, 1]], device=device)
    layer = {
        "hidden_TH": rand(tokens, HIDDEN, scale=2.0),
        "router_indices_TK": indices,
        "routing_weights_TK": torch.softmax(rand(tokens, TOP_K, scale=1.0), dim=-1),
        "gate_up_EHF": rand(EXPERTS, HIDDEN, 2 * INTERMEDIATE),
        "gate_up_bias_EF": rand(EXPERTS, 2 * INTERMEDIATE),
        "down_EIH": rand(EXPERTS, INTERMEDIATE, HIDDEN),
        "down_bias_EH": rand(EXPERTS, HIDDEN),
    }
    loras = (
        LoraFactors(rand(EXPERTS, HIDDEN, rank), rand(EXPERTS, rank, 2 * INTERMEDIATE), 2.0),
        LoraFactors(rand(EXPERTS, INTERMEDIATE, rank), rand(EXPERTS, rank, HIDDEN), 0.5),
    )
    for factors in loras:
        factors.a_EIR.requires_grad_(True)
        factors.b_ERO.requires_grad_(True)
    return layer, loras


def run_layer(
    layer: dict[str, torch.Tensor], loras: tuple[LoraFactors, LoraFactors], grouped: bool | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of ``experts_forward`` and gradients of a fixed projection of it wrt the LoRA factors."""

    def apply_gate(h: torch.Tensor) -> torch.Tensor:
        gate, up = h[:, ::2].clamp(max=SWIGLU_LIMIT), h[:, 1::2].clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        return (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)

    out = experts_forward(
        **layer, apply_gate=apply_gate, gate_up_loras=[loras[0]], down_loras=[loras[1]], grouped=grouped
    )
    probe = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out).to(out.dtype)
    params = [loras[0].a_EIR, loras[0].b_ERO, loras[1].a_EIR, loras[1].b_ERO]
    return out.detach(), list(torch.autograd.grad((out * probe).sum(), params))


@pytest.mark.parametrize("rank", [3, 8])
def test_grouped_kernel_and_loop_compute_the_same_function(rank: int):
    layer, loras = random_layer(torch.float32, "cpu", rank)
    assert not grouped_mm_applies(layer["hidden_TH"], layer["gate_up_EHF"])  # CPU runs the loop by default
    loop_out, loop_grads = run_layer(layer, loras, grouped=None)
    grouped_out, grouped_grads = run_layer(layer, loras, grouped=True)
    assert rel_err(grouped_out, loop_out) < 1e-5
    for grad, loop_grad in zip(grouped_grads, loop_grads, strict=True):
        assert rel_err(grad, loop_grad) < 1e-5
    assert loop_grads[0][2].abs().max() == 0  # expert 2 got no token, so no gradient
    assert loop_grads[0][0].abs().max() > 0


@pytest.mark.parametrize("grouped", [False, True])
def test_rebuilt_input_matmul_gives_autograds_gradients(grouped: bool):
    # x @ A[e] per expert block keeping only the tensor x is gathered from; expert 2 owns no row.
    gen = torch.Generator().manual_seed(12)
    routing = route_by_expert(torch.tensor([[0, 1], [3, 0], [1, 3], [0, 3], [3, 1]]), EXPERTS)
    hidden_TH = torch.randn(5, HIDDEN, generator=gen).requires_grad_(True)
    a_EIR = torch.randn(EXPERTS, HIDDEN, 8, generator=gen).requires_grad_(True)
    probe = torch.randn(10, 8, generator=gen)
    rebuild = Rebuild(partial(gathered_rows, top_k=TOP_K), (hidden_TH, routing.pair_S))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lora_input_matmul(gather_rows(hidden_TH, routing, TOP_K), a_EIR, routing, grouped, rebuild)
    grads = torch.autograd.grad((out * probe).sum(), [hidden_TH, a_EIR])
    ref_out = grouped_matmul(hidden_TH[routing.token_S], a_EIR, routing.ends_E, grouped=False)
    ref_grads = torch.autograd.grad((ref_out * probe).sum(), [hidden_TH, a_EIR])
    assert torch.allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref_grad) < 1e-6
    assert grads[1][2].abs().max() == 0 and grads[1][0].abs().max() > 0
    assert not any(t.shape == (10, HIDDEN) for t in saved)  # the gathered rows are not kept
    assert any(t is hidden_TH for t in saved)
    assert rel_err(expert_weight_grad(hidden_TH[routing.token_S].detach(), probe, routing.ends_E, grouped),
                   grads[1]) < 1e-6


@pytest.mark.parametrize("grouped", [False, True])
def test_lora_products_keep_no_copy_of_their_inputs(grouped: bool):
    # The fused gate: the LoRA factors' gradients gather the rows again from the layer's input and rebuild the
    # activation from the kept pre-activation; nothing [S, H] or [S, I] is kept (the routing weights need no grad).
    layer, loras = random_layer(torch.float32, "cpu", rank=8)
    layer["hidden_TH"].requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = experts_forward(**layer, apply_gate=ClampSwiGLUGate(alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT),
                              gate_up_loras=[loras[0]], down_loras=[loras[1]], grouped=grouped)
    pairs = layer["router_indices_TK"].numel()
    assert not any(t.shape in {(pairs, HIDDEN), (pairs, INTERMEDIATE)} for t in saved)
    assert any(t is layer["hidden_TH"] for t in saved)
    assert sum(t.shape == (pairs, 2 * INTERMEDIATE) for t in saved) >= 1
    assert len({t.data_ptr() for t in saved if t.shape == (pairs, 2 * INTERMEDIATE)}) == 1  # one pre-activation
    params = [layer["hidden_TH"], loras[0].a_EIR, loras[0].b_ERO, loras[1].a_EIR, loras[1].b_ERO]
    probe = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * probe).sum(), params)
    # The same layer with transformers' activation (unfused gate, both inputs kept) in float64.
    layer64, loras64 = to_float64_cpu(layer, loras)
    layer64["hidden_TH"].requires_grad_(True)
    params64 = [layer64["hidden_TH"], loras64[0].a_EIR, loras64[0].b_ERO, loras64[1].a_EIR, loras64[1].b_ERO]
    ref = experts_forward(**layer64, apply_gate=GptOssExpertsGate(), gate_up_loras=[loras64[0]],
                          down_loras=[loras64[1]], grouped=False)
    ref_grads = torch.autograd.grad((ref * probe.double()).sum(), params64)
    assert rel_err(out.double(), ref) < 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert ref_grad.abs().max() > 0
        assert rel_err(grad.double(), ref_grad) < 1e-5


class GptOssExpertsGate:
    """transformers' activation, unfused (``experts_forward`` then keeps the inputs of its LoRA products)."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h[:, ::2].clamp(max=SWIGLU_LIMIT), h[:, 1::2].clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        return (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)


def to_float64_cpu(
    layer: dict[str, torch.Tensor], loras: tuple[LoraFactors, LoraFactors]
) -> tuple[dict[str, torch.Tensor], tuple[LoraFactors, LoraFactors]]:
    """The same layer and LoRA factors as float64 CPU tensors, the factors requiring grad."""
    layer64 = {
        name: value.cpu().double() if value.is_floating_point() else value.cpu() for name, value in layer.items()
    }
    loras64 = tuple(
        LoraFactors(
            factors.a_EIR.detach().cpu().double().requires_grad_(True),
            factors.b_ERO.detach().cpu().double().requires_grad_(True),
            factors.scaling,
        )
        for factors in loras
    )
    return layer64, loras64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [4, 8])
def test_cuda_grouped_kernel_matches_references(rank: int):
    # float16 against float64: the kernel path, rank padding (rank 4) and an expert without tokens.
    layer, loras = random_layer(torch.float16, "cuda", rank)
    assert grouped_mm_applies(layer["hidden_TH"], layer["gate_up_EHF"])
    out, grads = run_layer(layer, loras, grouped=None)
    ref_out, ref_grads = run_layer(*to_float64_cpu(layer, loras), grouped=False)
    assert rel_err(out.cpu().double(), ref_out) < 5e-3
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad.cpu().double(), ref_grad) < 5e-3
        assert grad[2].abs().max() == 0
    # bfloat16 (the training dtype) against the loop in bfloat16; bfloat16 itself is ~10% off float64 here.
    layer, loras = random_layer(torch.bfloat16, "cuda", rank)
    out, grads = run_layer(layer, loras, grouped=None)
    loop_out, loop_grads = run_layer(layer, loras, grouped=False)
    assert rel_err(out, loop_out) < 2e-2
    for grad, loop_grad in zip(grads, loop_grads, strict=True):
        assert rel_err(grad, loop_grad) < 2e-2


def test_experts_without_lora_take_the_fused_forward_with_the_same_function():
    # LoRA on the experts of layer 1 only: layer 0's dense experts get the fused pass; logits and every gradient
    # (attention LoRA, layer 1's expert LoRA, through layer 0's experts) stay transformers' in float64.
    from osstune.models.gpt_oss.moe_lora import enable_fused_experts, is_fused_experts_forward

    def model() -> PeftModel:
        return tiny_peft_model(expert_layers=[1], dtype=torch.float64)

    reference = model()
    ref_logits, ref_grads = logits_and_grads(reference)
    fused = model()
    assert enable_grouped_expert_lora(fused) == 2
    assert enable_fused_experts(fused) == 1
    assert enable_fused_experts(fused) == 1  # idempotent
    layers = fused.get_base_model().model.layers
    assert is_fused_experts_forward(layers[0].mlp.experts)
    assert "forward" not in layers[1].mlp.experts.get_base_layer().__dict__  # the LoRA'd experts: PEFT's wrapper
    logits, grads = logits_and_grads(fused)
    assert rel_err(logits, ref_logits) < 1e-12
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-10, name
