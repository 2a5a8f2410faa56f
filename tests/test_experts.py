"""Fused mixture-of-experts modules as quantization targets (qframe.experts): rtn, fp8, nvfp4
and mxfp4 quantize every expert with its own scales, the model's own forward runs on exactly
the dequantized weights, and the native checkpoint rebuilds them bit-exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import qframe
from qframe import numerics
from qframe.checkpoint import load_native, save_native
from qframe.description import describe_model
from qframe.errors import ExportError, ModelError, RecipeError
from qframe.experts import (
    IN_OUT, OUT_IN, QuantExperts, check_expert_inputs, dequantize_experts, expert_layouts, is_fused_experts,
    quantize_experts, quantized_experts,
)
from qframe.pipeline import check_plan
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe, resolve
from qframe.scheme import QuantArgs, QuantScheme
from qframe.testing import make_registry

RECIPES = {
    "rtn-int4-g32": {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}},
    "rtn-int4-asym-mse": {"quantizer": "rtn", "weights": {"bits": 4, "symmetric": False, "group_size": 16,
                                                          "calibrator": "mse"}},
    "fp8": {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"}},
    "nvfp4": {"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4}},
    "nvfp4-mse": {"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4, "calibrator": "mse"}},
    "mxfp4": {"quantizer": "mxfp4", "weights": {"type": "float", "bits": 4, "format": "mxfp4"}},
}


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=128)


def _mixtral():
    return transformers.MixtralConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=128)


FAMILIES = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def _quantize(model, stage: dict, registry):
    return qframe.quantize(model, parse_recipe({"stage": [stage]}), device="cpu", registry=registry)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=_ids(), use_cache=False).logits


def _args(stage: dict) -> QuantArgs:
    return QuantArgs.from_table(stage["weights"], role="weights")


@pytest.fixture(scope="module", params=[(f, r) for f in FAMILIES for r in RECIPES], ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request, registry):
    family, recipe = request.param
    original = _model(family)
    qmodel = _quantize(copy.deepcopy(original), RECIPES[recipe], registry)
    return family, recipe, original, qmodel


def test_every_expert_has_its_own_scales(quantized):
    """Expert e's codes and scales are those of quantize_weight on expert e's matrix alone."""
    _family, recipe, original, qmodel = quantized
    args = _args(RECIPES[recipe])
    experts = quantized_experts(qmodel.model)
    assert len(experts) == 2  # one a layer
    for name, module in experts.items():
        source = original.get_submodule(name)
        assert module.expert_layouts == {"gate_up_proj": OUT_IN, "down_proj": OUT_IN}
        for weight in ("gate_up_proj", "down_proj"):
            w = getattr(source, weight).detach()
            assert not isinstance(module._parameters.get(weight), torch.nn.Parameter)
            for e in range(w.shape[0]):
                ranges = numerics.mse_ranges(w[e], args) if args.calibrator == "mse" else None
                q = numerics.quantize_weight(w[e], args, ranges)
                assert torch.equal(module._buffers[f"{weight}_codes"][e], q.codes)
                assert torch.equal(module._buffers[f"{weight}_scale"][e].float(), q.scale.float().reshape(
                    module._buffers[f"{weight}_scale"][e].shape))
                if q.global_scale is not None:
                    assert torch.equal(module._buffers[f"{weight}_global_scale"][e], q.global_scale.reshape(()))
                if q.zero is not None:
                    assert torch.equal(module._buffers[f"{weight}_zero"][e], q.zero)
                assert torch.equal(getattr(module, weight)[e], q.dequantize().to(w.dtype))
        scales = module.gate_up_proj_scale.float().flatten(1)
        assert not torch.equal(scales[0], scales[1])  # experts do not share scales


def test_forward_runs_on_the_dequantized_weights(quantized):
    """The model with quantized experts computes what the float model computes with every
    quantized weight replaced by its dequantized value (its own forward and routing)."""
    _family, _recipe, original, qmodel = quantized
    reference = copy.deepcopy(original)
    for name, module in qmodel.model.named_modules():
        if isinstance(module, QuantExperts):
            target = reference.get_submodule(name)
            for weight in module.expert_layouts:
                getattr(target, weight).data.copy_(getattr(module, weight))
        elif isinstance(module, QuantLinear):
            reference.get_submodule(name).weight.data.copy_(module.weight)
    assert torch.equal(_logits(qmodel.model), _logits(reference))
    assert not torch.equal(_logits(qmodel.model), _logits(original))


def test_native_checkpoint_reloads_bit_exactly(quantized, registry, tmp_path):
    _family, _recipe, _original, qmodel = quantized
    save_native(qmodel, tmp_path)
    assert set(qmodel.manifest["experts"]) == set(quantized_experts(qmodel.model))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj_packed" in saved
    assert not any(k.endswith(("experts.gate_up_proj", "experts.gate_up_proj_codes")) for k in saved)
    loaded = load_native(tmp_path, registry)
    for name, module in quantized_experts(qmodel.model).items():
        again = loaded.model.get_submodule(name)
        assert isinstance(again, QuantExperts)
        for key, tensor in module.state_dict().items():
            assert torch.equal(again.state_dict()[key], tensor), key
    assert torch.equal(_logits(loaded.model), _logits(qmodel.model))


def test_casts_keep_codes_and_scales(quantized):
    _family, _recipe, _original, qmodel = quantized
    model = copy.deepcopy(qmodel.model)
    before = {n: {k: t.clone() for k, t in m.state_dict().items()} for n, m in quantized_experts(model).items()}
    model.half()
    model.to(torch.bfloat16)
    model.float()
    for name, module in quantized_experts(model).items():
        for key, tensor in module.state_dict().items():
            assert tensor.dtype == before[name][key].dtype and torch.equal(tensor, before[name][key]), key
        assert module.gate_up_proj.dtype == torch.float32
        expected = module.matrix("gate_up_proj", module.dequantized("gate_up_proj"))
        assert torch.equal(module.gate_up_proj, expected)
    model.half()
    module = next(iter(quantized_experts(model).values()))
    assert module.down_proj.dtype == torch.float16


def test_description_lists_quantized_experts(quantized):
    _family, recipe, _original, qmodel = quantized
    description = qmodel.describe()
    assert set(description.experts) == set(quantized_experts(qmodel.model))
    state = description.experts["model.layers.0.mlp.experts"]
    assert state.quantized and state.num_experts == 8 and state.weights == _args(RECIPES[recipe])
    assert dict((n, (o, i)) for n, o, i, _ in state.matrices) == {"gate_up_proj": (64, 64), "down_proj": (64, 32)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_linear_targets_leave_experts_alone(family, registry):
    model = _quantize(_model(family), {**RECIPES["rtn-int4-g32"], "targets": ["Linear"]}, registry).model
    assert quantized_experts(model) == {}
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)
    described = describe_model(model, registry).experts
    assert described and not any(s.quantized for s in described.values())


def test_experts_only_targets(registry):
    model = _quantize(_model("qwen3_moe"), {**RECIPES["nvfp4"], "targets": ["Experts"]}, registry).model
    assert len(quantized_experts(model)) == 2
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_default_targets_include_experts():
    assert QuantScheme().targets == ("Linear", "Experts")
    assert parse_recipe({"stage": [RECIPES["rtn-int4-g32"]]}).stages[0].scheme.targets == ("Linear", "Experts")
    model = _model("mixtral")
    experts = model.model.layers[0].mlp.experts
    assert QuantScheme().matches("model.layers.0.mlp.experts", experts)
    assert not QuantScheme(targets=("Linear",)).matches("model.layers.0.mlp.experts", experts)


def test_expert_inputs_take_one_scale_per_weight_or_dynamic(registry):
    experts = _model("qwen3_moe").model.layers[0].mlp.experts
    with pytest.raises(RecipeError, match=r"activations\.granularity.*fused experts.*allowed: tensor"):
        check_expert_inputs(experts, QuantArgs(bits=8, granularity="channel"))
    with pytest.raises(ModelError, match="gate_up_proj or up_proj"):
        check_expert_inputs(_MatmulExperts3(), QuantArgs(bits=8, granularity="tensor"))
    for activations in ({"bits": 8, "granularity": "tensor"},
                        {"type": "float", "bits": 8, "dynamic": True, "granularity": "token"}):
        recipe = parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 8}, "activations": activations}]})
        description = check_plan(_model("mixtral"), resolve(recipe, registry), registry).description
        assert all(state.activations is not None for state in description.experts.values())


def test_plan_describes_experts_and_nvidia_backends_refuse(registry):
    from qframe_plugins.quant_algo import Writer, choose

    recipe = parse_recipe({"stage": [RECIPES["fp8"]]})
    description = check_plan(_model("mixtral"), resolve(recipe, registry), registry).description
    state = description.experts["model.layers.1.mlp.experts"]
    assert state.quantized and state.stage == "stage[0] (fp8)"
    writer = Writer("TensorRT-LLM", ("FP8",), ("FP8",), elsewhere="--backend qframe")
    with pytest.raises(ExportError, match="quantized experts are not written by TensorRT-LLM yet"):
        choose(description, writer)


# -- the module on its own --------------------------------------------------------------------

class _MatmulExperts(torch.nn.Module):
    """gpt-oss-like: [E, in, out] weights used as x @ W[e] + b[e]."""

    def __init__(self, experts=4, hidden=32, inner=16):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, hidden, 2 * inner))
        self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(experts, 2 * inner))
        self.down_proj = torch.nn.Parameter(torch.randn(experts, inner, hidden))

    def forward(self, x, e):
        h = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate, up = h.chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ self.down_proj[e]


class _MatmulExperts3(_MatmulExperts):
    """Three fused weights: a computation the experts interface does not describe."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        self.extra_proj = torch.nn.Parameter(torch.randn(4, 32, 32))

    def forward(self, x, e):
        return super().forward(x, e) @ self.extra_proj[e]


def test_matmul_layout_from_forward_and_biases_stay_float():
    torch.manual_seed(0)
    module = _MatmulExperts()
    assert expert_layouts(module) == {"gate_up_proj": IN_OUT, "down_proj": IN_OUT}
    reference = copy.deepcopy(module)
    args = QuantArgs(bits=4, granularity="group", group_size=16)
    q = QuantExperts.quantize(module, args)
    assert q.gate_up_proj_codes.shape == (4, 32, 32) and q.down_proj_codes.shape == (4, 32, 16)
    assert isinstance(q.gate_up_proj_bias, torch.nn.Parameter)
    expected = numerics.quantize_weight(reference.gate_up_proj[2].detach().T, args).dequantize()
    assert torch.equal(q.gate_up_proj[2], expected.T)
    reference.gate_up_proj.data.copy_(q.gate_up_proj)
    reference.down_proj.data.copy_(q.down_proj)
    x = torch.randn(5, 32)
    assert torch.equal(q(x, 1), reference(x, 1))


def test_gpt_oss_layout_is_read_from_the_class():
    config = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(config)
    assert is_fused_experts(experts)
    assert expert_layouts(experts) == {"gate_up_proj": IN_OUT, "down_proj": IN_OUT}


def test_unreadable_experts_are_refused():
    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 8, 8))

        def forward(self, x, e):
            return torch.einsum("ti,io->to", x, self.w[e])

    assert is_fused_experts(Opaque())
    with pytest.raises(ModelError, match="cannot tell"):
        expert_layouts(Opaque())
    assert not is_fused_experts(torch.nn.Conv1d(4, 4, 3))


@pytest.mark.parametrize("args", [QuantArgs(bits=8, granularity="tensor"),
                                  QuantArgs(type="float", bits=8, granularity="channel"),
                                  QuantArgs(type="float", bits=4, granularity="group", group_size=16),
                                  QuantArgs(bits=3, symmetric=False, granularity="group", group_size=12)],
                         ids=["int8-tensor", "fp8-channel", "nvfp4", "int3-asym-g12"])
def test_batched_equals_one_expert_at_a_time(args):
    w = torch.randn(5, 6, 40, dtype=torch.bfloat16) * torch.arange(1, 6).reshape(5, 1, 1)
    q = quantize_experts(w, args)
    for e in range(5):
        one = numerics.quantize_weight(w[e], args)
        assert torch.equal(q.codes[e], one.codes)
        assert torch.equal(q.scale[e].float().flatten(), one.scale.float().flatten())
    back = dequantize_experts(q.codes, q.scale, q.zero, args, q.global_scale)
    assert torch.equal(back[3], numerics.quantize_weight(w[3], args).dequantize())


@pytest.mark.parametrize("calibrator", ["minmax", "mse"])
def test_chunks_of_experts_equal_all_at_once(calibrator, monkeypatch):
    """Large fused weights are rounded (and served weights rebuilt) a chunk of experts at a time."""
    torch.manual_seed(0)
    w = torch.randn(5, 6, 40) * torch.arange(1, 6).reshape(5, 1, 1)
    for args in (QuantArgs(type="float", bits=4, granularity="group", group_size=16),
                 QuantArgs(bits=4, symmetric=False, granularity="tensor")):
        whole = quantize_experts(w, args, calibrator)
        monkeypatch.setattr("qframe.experts.CHUNK_ELEMENTS", 2 * 6 * 40)  # two experts a chunk
        chunked = quantize_experts(w, args, calibrator)
        monkeypatch.undo()
        for key in ("codes", "scale", "zero", "global_scale"):
            a, b = getattr(whole, key), getattr(chunked, key)
            assert (a is None and b is None) or torch.equal(a, b), key
    module = QuantExperts.quantize(_MatmulExperts(), QuantArgs(bits=4, granularity="group", group_size=16))
    served = module.gate_up_proj.clone()
    monkeypatch.setattr("qframe.experts.CHUNK_ELEMENTS", 32 * 32)
    module.refresh()
    assert torch.equal(module.gate_up_proj, served)


# -- calibration tokens per expert ----------------------------------------------------------------

CALIBRATED = {"stage": [RECIPES["rtn-int4-g32"],
                        {"quantizer": "kv_cache", "activations": {"bits": 8}}],
              "calibration": {"propagate": "float", "batch_size": 2}}


def _routed_by_hand(model, ids: torch.Tensor) -> list[list[int]]:
    """Tokens per expert of each layer, from the float model's routers: top-k of their logits."""
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_pre_hook(lambda m, args: seen.append(
        torch.topk(torch.nn.functional.linear(args[0].reshape(-1, m.weight.shape[1]), m.weight), m.top_k).indices))
        for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.bincount(s.flatten(), minlength=8).tolist() for s in seen]


def _never_routed_to(model, expert: int) -> None:
    """Expert ``expert`` never makes any layer's top 2: its router row is zero (logit 0), while
    rows 0/1 and 2/3 are opposite pairs, so two experts always have a logit of at least 0."""
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1], w[3], w[expert] = -w[0], -w[2], 0.0


def _many_ids() -> torch.Tensor:
    """Enough tokens for the tiny model's routing to reach every expert."""
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))


def test_manifest_records_tokens_per_expert(registry, recwarn):
    model, ids = _model("qwen3_moe"), _many_ids()
    expected = _routed_by_hand(model, ids)
    qmodel = qframe.quantize(model, parse_recipe(CALIBRATED), calibration=ids, device="cpu", registry=registry)
    for index, layer in enumerate(qmodel.manifest["layers"]):
        counts = layer["modules"][f"model.layers.{index}.mlp.experts"]["tokens_per_expert"]
        assert sum(counts) == ids.numel() * 2
        assert counts == expected[index]
    assert not [w for w in recwarn if "saw no calibration token" in str(w.message)]


def test_experts_no_token_reached_are_named(registry):
    model, ids = _model("qwen3_moe"), _many_ids()
    _never_routed_to(model, 7)
    assert all(counts[7] == 0 for counts in _routed_by_hand(model, ids))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts: expert 7 \(of 8\); "
                                         r"model\.layers\.1\.mlp\.experts: expert 7 \(of 8\) saw no calibration token"):
        qmodel = qframe.quantize(model, parse_recipe(CALIBRATED), calibration=ids, device="cpu", registry=registry)
    assert qmodel.manifest["layers"][1]["modules"]["model.layers.1.mlp.experts"]["tokens_per_expert"][7] == 0


def test_no_calibration_data_records_no_tokens(registry, recwarn):
    model = _model("qwen3_moe")
    _never_routed_to(model, 7)
    qmodel = _quantize(model, RECIPES["rtn-int4-g32"], registry)
    assert not any("tokens_per_expert" in values for layer in qmodel.manifest["layers"]
                   for values in layer["modules"].values())
    assert not [w for w in recwarn if "saw no calibration token" in str(w.message)]
