"""GPTQ and AWQ on fused experts: what every expert sees in calibration (every token through
every expert for statistics, or only its routed tokens), batched GPTQ, AWQ's sparse-block and
up → down smoothing, and the fallback for experts too few tokens reached."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qframe
from qframe.errors import ModelError, RecipeError
from qframe.expert_inputs import ExpertHessians, expert_hidden, expert_matrix, routing_mask
from qframe import numerics
from qframe.experts import QuantExperts, dequantize_experts, quantize_experts
from qframe.pipeline import check_plan
from qframe.recipe import parse_recipe, resolve
from qframe.scheme import QuantArgs
from qframe.testing import (TINY_MOE_FAMILIES, logits, make_registry, moe_from_dense, random_tokens,
                            tiny_llama_model, tiny_model)
from qframe_plugins.awq import clip_ranges, clip_ranges_batched, experts_candidate_loss
from qframe_plugins.gptq import gptq_batched, gptq_experts, gptq_quantize

INT4_G16 = {"bits": 4, "group_size": 16}


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def _ids(model, n: int = 4, length: int = 32) -> torch.Tensor:
    return random_tokens(n, length, vocab=model.get_input_embeddings().num_embeddings, seed=3)


def _quantize(model, stage: dict, registry, ids):
    stage = {"ignore": ["lm_head"], **stage}
    return qframe.quantize(model, parse_recipe({"stage": [stage]}), calibration=ids, device="cpu", registry=registry)


def _experts(model) -> list[torch.nn.Module]:
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def _error(model, reference, ids) -> float:
    got, want = logits(model, ids), logits(reference, ids)
    return float((got - want).pow(2).mean() / want.pow(2).mean())


# -- what each expert sees ---------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_expert_hidden_is_what_the_module_feeds_down_proj(family):
    """Routing every token to expert e with weight 1 through the module's own forward gives
    down_proj(expert_hidden[e]) (+ its bias): the hidden activations are the model's."""
    experts = _experts(tiny_model(family))[-1]
    x = torch.randn(6, expert_matrix(experts, "gate_up_proj").shape[2])
    hidden = expert_hidden(experts, x)
    down = expert_matrix(experts, "down_proj")
    for e in (0, hidden.shape[0] - 1):
        routed = experts(x, torch.full((6, 1), e), torch.ones(6, 1))
        expected = hidden[e] @ down[e].T
        if getattr(experts, "has_bias", False):
            expected = expected + experts.down_proj_bias[e]
        torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_hessians_every_token_or_routed_tokens():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    index = torch.tensor([[0, 1]] * 5 + [[1, 2]] * 5)
    shared = ExpertHessians(3, 4, shared=True, device=torch.device("cpu"))
    shared.observe(x, experts=slice(None), routed=None)
    clean = torch.cat([x[:3], x[4:]])
    torch.testing.assert_close(shared.matrices()[0], 2 * clean.T @ clean / 9)
    assert int(shared.dropped) == 1
    routed = ExpertHessians(3, 4, shared=False, device=torch.device("cpu"))
    routed.observe(x, experts=slice(None), routed=routing_mask(index, 3))
    for e in range(3):
        rows = [t for t in range(10) if e in index[t].tolist() and t != 3]
        xe = x[rows]
        assert int(routed.tokens[e]) == len(rows)
        torch.testing.assert_close(routed.matrices()[e], 2 * xe.T @ xe / len(rows))


# -- batched GPTQ --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [QuantArgs(bits=4, granularity="group", group_size=8),
                                  QuantArgs(bits=4, symmetric=False, granularity="channel"),
                                  QuantArgs(type="float", bits=8, granularity="tensor"),
                                  QuantArgs(type="float", bits=4, granularity="group", group_size=16)],
                         ids=["int4-g8", "int4-asym", "fp8-tensor", "nvfp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_batched_gptq_equals_one_matrix_at_a_time(args, act_order):
    torch.manual_seed(0)
    w = torch.randn(3, 6, 32) * torch.tensor([1.0, 3.0, 0.2]).view(3, 1, 1)
    x = torch.randn(3, 80, 32) * torch.linspace(0.1, 3, 32)
    h = 2 * x.transpose(1, 2) @ x / 80
    batched = gptq_batched(w, h.clone(), args, block_size=8, act_order=act_order)
    for b in range(3):
        one = gptq_quantize(w[b], h[b], args, block_size=8, act_order=act_order)
        torch.testing.assert_close(batched.weight[b], one.weight, rtol=1e-5, atol=1e-5)
        assert abs(float(batched.loss[b]) - one.loss) < 1e-4 * max(one.loss, 1e-6)


def test_experts_sharing_a_hessian_equal_experts_with_copies_of_it():
    """Every token through every expert: one Hessian, experts rounded as the rows of one matrix,
    each with its own per-tensor range and NVFP4 global scale."""
    torch.manual_seed(0)
    w = torch.randn(4, 8, 32) * torch.tensor([1.0, 4.0, 0.5, 2.0]).view(4, 1, 1)
    x = torch.randn(100, 32)
    for args in (QuantArgs(type="float", bits=8, granularity="tensor"),
                 QuantArgs(type="float", bits=4, granularity="group", group_size=16)):
        shared = ExpertHessians(4, 32, shared=True, device=torch.device("cpu"))
        shared.observe(x, experts=slice(None), routed=None)
        copies = ExpertHessians(4, 32, shared=False, device=torch.device("cpu"))
        copies.observe(x, experts=slice(None), routed=None)
        one, many = gptq_experts(w, shared, args, block_size=8), gptq_experts(w, copies, args, block_size=8)
        torch.testing.assert_close(one.weight, many.weight, rtol=1e-5, atol=1e-5)
        if args.number_format.has_global_scale:
            torch.testing.assert_close(one.global_scale, many.global_scale)
        # the ranges let quantize_experts reproduce GPTQ's rounding exactly
        q = quantize_experts(one.weight, args, ranges=one.ranges, global_scale=one.global_scale,
                             served_dtype=torch.float32)
        torch.testing.assert_close(dequantize_experts(q.codes, q.scale, q.zero, args, q.global_scale), one.weight)


@pytest.mark.parametrize("shared", [True, False])
def test_chunks_of_experts_equal_all_at_once(shared, monkeypatch):
    torch.manual_seed(0)
    w, x = torch.randn(5, 8, 32), torch.randn(60, 32)
    args = QuantArgs(type="float", bits=4, granularity="group", group_size=16)

    def run():
        h = ExpertHessians(5, 32, shared=shared, device=torch.device("cpu"))
        h.observe(x, experts=slice(None), routed=None if shared else torch.rand(5, 60) > 0.2)
        return gptq_experts(w, h, args, block_size=8)

    torch.manual_seed(1)
    whole = run()
    monkeypatch.setattr("qframe_plugins.gptq.EXPERT_CHUNK_ELEMENTS", 2 * 8 * 32)  # two experts a chunk
    torch.manual_seed(1)
    chunked = run()
    for a, b in [(whole.weight, chunked.weight), *zip(whole.ranges, chunked.ranges), (whole.global_scale,
                                                                                      chunked.global_scale)]:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_starved_experts_are_rounded_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 16)
    x = torch.randn(40, 16)
    h = ExpertHessians(3, 16, shared=False, device=torch.device("cpu"))
    h.observe(x, experts=slice(None), routed=torch.tensor([[True] * 40, [True] * 3 + [False] * 37, [False] * 40]))
    args = QuantArgs(bits=4, granularity="group", group_size=8)
    r = gptq_experts(w, h, args, min_tokens=4)
    assert r.starved == [1, 2]
    nearest = quantize_experts(w, args, served_dtype=torch.float32)
    rtn = dequantize_experts(nearest.codes, nearest.scale, nearest.zero, args)
    assert torch.equal(r.weight[1:], rtn[1:]) and not torch.equal(r.weight[0], rtn[0])


# -- AWQ pieces ----------------------------------------------------------------------------------

def test_batched_clip_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    w, x = torch.randn(3, 6, 32), torch.randn(3, 20, 32)
    args = QuantArgs(bits=4, granularity="group", group_size=8)
    (lo, hi), _ = clip_ranges_batched(w, x, args, 10, 0.5)
    for b in range(3):
        (lo_b, hi_b), _ = clip_ranges(w[b], x[b], args, 10, 0.5)
        torch.testing.assert_close(lo[b], lo_b)
        torch.testing.assert_close(hi[b], hi_b)


def test_candidate_loss_per_expert_by_hand():
    torch.manual_seed(0)
    w, x = torch.randn(2, 4, 8), torch.randn(2, 10, 8)
    scales = torch.rand(3, 2, 8) + 0.5
    routed = torch.rand(2, 10) > 0.3
    args = QuantArgs(bits=4)
    loss, energy = experts_candidate_loss(w, x, scales, args, routed)
    for e in range(2):
        xe = x[e][routed[e]]
        assert float(energy[e]) == pytest.approx(float((xe @ w[e].T).square().sum()), rel=1e-5)
        for k in range(3):
            q = numerics.quantize_weight(w[e] * scales[k, e], args, served_dtype=torch.float32).dequantize()
            want = ((xe / scales[k, e]) @ q.T - xe @ w[e].T).square().sum()
            assert float(loss[k, e]) == pytest.approx(float(want), rel=1e-4)


W8A8 = {"weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "tensor"}}


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize("stage", [{"quantizer": "awq", "weights": INT4_G16},
                                   {"quantizer": "smoothquant", **W8A8}], ids=["awq", "smoothquant"])
def test_smoothing_alone_keeps_the_function(family, stage, registry):
    """awq and smoothquant with quantize = false fold the sparse block's norm scale (router,
    experts, shared expert compensated) and each expert's up → down scale: the model computes
    what it did."""
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    ids = _ids(model)
    _quantize(model, {**stage, "options": {"quantize": False}}, registry, ids)
    assert _error(model, reference, ids) < 1e-10
    changed = [not torch.equal(a.post_attention_layernorm.weight, b.post_attention_layernorm.weight)
               for a, b in zip(model.model.layers, reference.model.layers)]
    assert any(changed)  # a scale was actually folded somewhere


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize("quantizer", ["gptq", "awq", "smoothquant"])
def test_every_expert_quantized_and_searches_beat_nearest(family, quantizer, registry):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    ids = _ids(model)
    stage = {"quantizer": quantizer, **(W8A8 if quantizer == "smoothquant" else {"weights": INT4_G16})}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in float, no expert starved
        qmodel = _quantize(model, stage, registry, ids)
    experts = _experts(model)
    assert experts and all(isinstance(e, QuantExperts) for e in experts)
    figures = {n: f for layer in qmodel.layers for n, f in layer["modules"].items() if n.endswith(".experts")}
    assert len(figures) == len(experts)
    for f in figures.values():
        assert 0 < f["weight_error"] < 0.05 and sum(f["tokens_per_expert"]) > 0
        if quantizer == "gptq":
            assert f["gptq_loss"] > 0 and f["rtn_experts"] == 0 and f["gptq_fallback"] == 0
        elif quantizer == "smoothquant":
            assert f["smoothquant_folded"] == 1.0 and f.get("smoothquant_up_down", 0.0) == float(family != "gpt_oss")
        else:
            assert f["awq_loss"] <= f["awq_rtn_loss"]
            if "awq_expert_loss" in f:  # not gpt-oss: its clamped GLU cannot take an up → down scale
                assert f["awq_expert_loss"] <= f["awq_expert_rtn_loss"]
            else:
                assert family == "gpt_oss"
    if quantizer != "awq":  # GPTQ minimizes the output error measured here; SmoothQuant flattens the inputs
        rtn = _quantize(copy.deepcopy(reference), {**stage, "quantizer": "rtn"}, registry, ids)
        assert _error(model, reference, ids) < _error(rtn.model, reference, ids)


def test_routed_statistics_name_starved_experts(registry):
    """With experts = "routed", experts below expert_min_tokens are named and rounded to
    nearest (here all of them: 32 tokens, top 2 of 4); above it, none is."""
    model = tiny_model("qwen3_moe")
    reference = copy.deepcopy(model)
    ids = _ids(model, n=2, length=16)
    stage = {"quantizer": "gptq", "weights": INT4_G16, "options": {"experts": "routed", "expert_min_tokens": 33}}
    with pytest.warns(UserWarning, match=r"experts 0, 1, 2, 3 \(of 4\) saw fewer than 33 routed calibration tokens"):
        qmodel = _quantize(model, stage, registry, ids)
    args = QuantArgs.from_table(INT4_G16, role="weights")
    for name, f in ((n, f) for layer in qmodel.layers for n, f in layer["modules"].items() if n.endswith(".experts")):
        assert f["rtn_experts"] == 4
        rtn = QuantExperts.quantize(copy.deepcopy(reference.get_submodule(name)), args)
        assert torch.equal(model.get_submodule(name).gate_up_proj_codes, rtn.gate_up_proj_codes)
    routed = {**stage, "options": {"experts": "routed", "expert_min_tokens": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = _quantize(copy.deepcopy(reference), routed, registry, ids)
    assert all(f.get("rtn_experts", 0) == 0 for layer in qmodel.layers for f in layer["modules"].values())


def test_options_and_layouts_refused_before_data(registry):
    with pytest.raises(RecipeError, match="experts"):
        resolve(parse_recipe({"stage": [{"quantizer": "gptq", "weights": INT4_G16,
                                         "options": {"experts": "some"}}]}), registry)
    with pytest.raises(RecipeError, match="expert_min_tokens"):
        resolve(parse_recipe({"stage": [{"quantizer": "awq", "weights": INT4_G16,
                                         "options": {"expert_min_tokens": 0}}]}), registry)

    class Single(torch.nn.Module):  # fused experts, but not gate_up + down
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 8, 8))

        def forward(self, x, e):
            return torch.nn.functional.linear(x, self.w[e])

    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts = Single()
    recipe = parse_recipe({"stage": [{"quantizer": "gptq", "weights": INT4_G16, "targets": ["Experts"]}]})
    with pytest.raises(ModelError, match="rtn"):
        check_plan(model, resolve(recipe, registry), registry)


def test_gptq_experts_reload_from_the_native_checkpoint(registry, tmp_path):
    model = tiny_model("mixtral")
    ids = _ids(model)
    qmodel = _quantize(model, {"quantizer": "gptq", "weights": INT4_G16}, registry, ids)
    qframe.export(qmodel, "qframe", tmp_path / "native", registry=registry)
    again = qframe.load_quantized(tmp_path / "native", registry=registry)
    assert torch.equal(logits(again.model, ids), logits(model, ids))



# -- quantized inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_quantized_input_forward_is_the_models_computation(family, monkeypatch):
    """With input quantization made the identity, the experts' own forward (used when inputs
    are quantized) computes what the model's implementation does, routing weights, biases and
    gates included."""
    experts = _experts(tiny_model(family))[-1]
    reference = copy.deepcopy(experts)
    hidden_size = expert_matrix(experts, "gate_up_proj").shape[2]
    quantized = QuantExperts.quantize(experts, QuantArgs(bits=8), activations=QuantArgs(bits=8, dynamic=True,
                                                                                     granularity="token"))
    for name in quantized.expert_layouts:  # the float reference computes with the same weights
        reference._parameters[name].data.copy_(quantized._buffers[name])
    monkeypatch.setattr(QuantExperts, "quantize_input", lambda self, name, x: x)
    x = torch.randn(7, hidden_size)
    index = torch.randint(0, quantized.gate_up_proj_codes.shape[0], (7, 2))
    weights = torch.rand(7, 2)
    torch.testing.assert_close(quantized(x, index, weights), reference(x, index, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("stage", [
    {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
     "activations": {"type": "float", "bits": 8}},
    {"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16},
     "activations": {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16}},
    {"quantizer": "gptq", "weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "tensor"}},
    {"quantizer": "awq", "weights": INT4_G16, "activations": {"type": "float", "bits": 8}},
], ids=["fp8", "nvfp4", "gptq-w8a8", "awq-w4a8"])
def test_static_expert_inputs_calibrated_and_reloaded(family, stage, registry, tmp_path):
    model = tiny_model(family)
    ids = _ids(model)
    qmodel = _quantize(model, stage, registry, ids)
    for experts in _experts(model):
        assert experts.input_args is not None
        scales = [experts.get_buffer(f"{n}_input_scale") for n in experts.expert_layouts]
        assert all(bool(torch.isfinite(s)) and float(s) > 0 for s in scales) and not torch.equal(*scales)
    qframe.export(qmodel, "qframe", tmp_path / "native", registry=registry)
    again = qframe.load_quantized(tmp_path / "native", registry=registry)
    assert torch.equal(logits(again.model, ids), logits(model, ids))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("stage", [
    {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
     "activations": {"type": "float", "bits": 8, "calibrator": "mse"}},
    {"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16},
     "activations": {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16}},
], ids=["fp8", "nvfp4"])
def test_expert_input_scales_equal_the_dense_linears(family, stage, registry):
    # Experts copied from a dense MLP read what its linears read, so their static input scales
    # are the linears' own: both calibrated on the float layer's activations (down_proj's
    # through the float gate and up, not through the rounded ones).
    dense = tiny_llama_model()
    moe = moe_from_dense(dense, family)
    ids = _ids(dense)
    recipe = parse_recipe({"calibration": {"propagate": "float"}, "stage": [{"ignore": ["lm_head"], **stage}]})
    for model in (dense, moe):
        qframe.quantize(model, recipe, calibration=ids, device="cpu", registry=registry)
    for linear, experts in zip([layer.mlp for layer in dense.model.layers], _experts(moe)):
        for fused, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            for part in parts:
                torch.testing.assert_close(experts.get_buffer(f"{fused}_input_scale"),
                                           getattr(linear, part).input_scale, rtol=1e-5, atol=0)
