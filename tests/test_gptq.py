"""The ``gptq`` quantizer on tiny random Llama models: better than RTN in every weight format,
exact codes, act_order, robustness (Cholesky failures, NaN/inf tokens, dead channels), options
and true-sequential order."""

import math

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import RecipeError
from qframe.plugins import default_registry
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe, resolve
from qframe.scheme import QuantArgs
from qframe.testing import logits, make_registry, random_tokens, relative_error, tiny_llama_model
from qframe_plugins.gptq import Hessian, gptq_quantize
from qframe_plugins.rtn import RTN, check as rtn_check

INT4 = {"bits": 4, "group_size": 32}
LAYER0 = "model.layers.0"


class RTNOnData(RTN):
    """RTN that still runs on calibration data, so the pipeline measures its layer output errors."""

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True


class RTNOnDataPlugin:
    @qframe.hookimpl
    def qframe_quantizers(self):
        yield qframe.QuantizerPlugin(name="rtn-on-data", summary="rtn, measured on data", factory=RTNOnData,
                                     check=rtn_check)


REGISTRY = make_registry(RTNOnDataPlugin())


def tokens():
    return random_tokens(8, 32, vocab=256, seed=1)


def run(quantizer, weights, hooks=(), **options):
    """Quantize a fresh tiny Llama; return (qmodel, logits error vs float, model)."""
    model, ids = tiny_llama_model(), tokens()
    before = logits(model, ids)
    handles = [model.get_submodule(name).register_forward_pre_hook(hook) for name, hook in hooks]
    plan = parse_recipe({"calibration": {"batch_size": 4},
                         "stage": [{"quantizer": quantizer, "weights": weights, "options": options}]})
    qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu", registry=REGISTRY)
    for handle in handles:
        handle.remove()
    return qmodel, relative_error(logits(model, ids), before), model


def layer_errors(qmodel):
    return [layer["output_error"] for layer in qmodel.layers]


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_clearly(bits):
    weights = {"bits": bits, "group_size": 32}
    rtn, rtn_logits, _ = run("rtn-on-data", weights)
    gptq, gptq_logits, _ = run("gptq", weights)
    modules = gptq.quantized_modules()
    assert len(modules) == 2 * 7 and all(name.startswith("model.layers.") for name in modules)
    for ours, theirs in zip(layer_errors(gptq), layer_errors(rtn)):
        assert 0 < ours < 0.75 * theirs
    assert gptq_logits < 0.75 * rtn_logits
    figures = gptq.layers[0]["modules"][f"{LAYER0}.mlp.down_proj"]
    assert 0 < figures["gptq_loss"] < 0.1 and figures["damp"] == 0.01 and figures["dropped_tokens"] == 0
    assert 0 < figures["weight_error"] < 0.1 and "gptq_fallback" not in figures


@pytest.mark.parametrize("weights", [INT4, {"bits": 4, "group_size": 32, "symmetric": False}, {"format": "e4m3"},
                                     {"format": "e5m2", "granularity": "tensor"}, {"format": "nvfp4"}, {"format": "mxfp4"}],
                         ids=["int4", "uint4", "e4m3", "e5m2-tensor", "nvfp4", "mxfp4"])
def test_quant_linear_reproduces_the_gptq_result_exactly(weights):
    args = QuantArgs.from_table(weights, role="weights")
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    x = torch.randn(300, 64) * torch.linspace(0.1, 3, 64)
    result = gptq_quantize(linear.weight, 2 * x.T @ x / 300, args, block_size=16, act_order=True)
    holder = nn.Linear(64, 24)
    with torch.no_grad():
        holder.weight.copy_(result.weight)
    quantized = QuantLinear.from_linear(holder, args, weight_ranges=result.ranges, weight_global_scale=result.global_scale)
    assert torch.equal(quantized.weight, result.weight)
    rtn = QuantLinear.from_linear(linear, args)  # the same static scales as round-to-nearest
    assert torch.equal(quantized.weight_scale, rtn.weight_scale)


def test_native_export_reloads_with_identical_logits(tmp_path):
    qmodel, _, model = run("gptq", INT4, act_order=True)
    ids = tokens()
    expected = logits(model, ids)
    qframe.export(qmodel, "qframe", tmp_path / "out")
    reloaded = qframe.load_quantized(tmp_path / "out")
    assert torch.equal(logits(reloaded.model, ids), expected)


def test_act_order_keeps_scales_contiguous_and_beats_rtn():
    rtn, rtn_logits, rtn_model = run("rtn-on-data", INT4)
    gptq, gptq_logits, _ = run("gptq", INT4, act_order=True)
    q = gptq.quantized_modules()[f"{LAYER0}.self_attn.q_proj"]
    assert q.weight_scale.shape == (64, 2)  # [out, groups], groups in input order
    assert torch.equal(q.weight_scale, rtn.quantized_modules()[f"{LAYER0}.self_attn.q_proj"].weight_scale)
    assert all(ours <= theirs for ours, theirs in zip(layer_errors(gptq), layer_errors(rtn)))
    assert gptq_logits <= rtn_logits


@pytest.mark.parametrize("weights", [{"bits": 4, "group_size": 32, "symmetric": False}, {"format": "e4m3"},
                                     {"format": "nvfp4"}, {"format": "mxfp4"}],
                         ids=["uint4-g32", "e4m3-channel", "nvfp4", "mxfp4"])
def test_every_weight_format_beats_rtn(weights):
    rtn, rtn_logits, _ = run("rtn-on-data", weights)
    gptq, gptq_logits, _ = run("gptq", weights)
    assert len(gptq.quantized_modules()) == 14
    assert all(ours <= theirs for ours, theirs in zip(layer_errors(gptq), layer_errors(rtn)))
    assert gptq_logits <= rtn_logits


def test_hessian_is_the_mean_over_finite_tokens():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8), torch.randn(3, 4, 8)]
    batches[1][0, 2, 3] = float("nan")
    batches[1][2, 0, 0] = float("inf")
    h = Hessian(8, torch.device("cpu"))
    for b in batches:
        h.observe(b)
    rows = torch.cat([b.reshape(-1, 8) for b in batches])
    rows = rows[torch.isfinite(rows).all(dim=1)]
    assert (h.tokens, h.dropped) == (20, 2)
    torch.testing.assert_close(h.matrix, 2 * rows.T @ rows / 20)


def test_indefinite_hessian_is_retried_with_more_dampening():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    h = torch.eye(16) + torch.ones(16, 16) * 0.5
    h[0, 1] = h[1, 0] = 3.0  # an indefinite 2x2 block: eigenvalue about -1.5
    result = gptq_quantize(w, h, QuantArgs(bits=4), dampening=0.01)
    assert not result.fallback and result.damp > 0.01 and torch.isfinite(result.weight).all()


def test_hopeless_hessian_falls_back_to_rtn():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    with pytest.warns(UserWarning, match="rounding to nearest"):
        result = gptq_quantize(w, -torch.eye(16), QuantArgs(bits=4))
    assert result.fallback and math.isnan(result.damp)
    assert torch.equal(result.weight, QuantLinear.from_linear(_linear(w), QuantArgs(bits=4)).weight)


def _linear(w: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def test_rank_one_inputs_with_tiny_dampening_are_retried():
    def rank_one(_module, args):  # every token the same direction: H has rank 1
        x = args[0]
        return (x[..., :1] * torch.linspace(-1, 1, x.shape[-1]),)

    qmodel, _, model = run("gptq", INT4, hooks=[(f"{LAYER0}.self_attn.q_proj", rank_one)], dampening=1e-9)
    figures = qmodel.layers[0]["modules"][f"{LAYER0}.self_attn.q_proj"]
    assert figures["damp"] > 1e-9 and "gptq_fallback" not in figures
    assert torch.isfinite(model.get_submodule(f"{LAYER0}.self_attn.q_proj").weight).all()


def test_nan_and_inf_activations_are_refused():
    # The Hessian drops such rows (its doctest); the pipeline refuses a float model that makes them.
    def poison(_module, args):
        x = args[0].clone()
        x[:, -1, 0] = float("nan")
        x[0, -2, 1] = float("inf")
        return (x,)

    with pytest.raises(qframe.ModelError, match=rf"{LAYER0}: the unquantized layer's outputs hold NaN or inf"):
        run("gptq", INT4, hooks=[(f"{LAYER0}.mlp.down_proj", poison)])


def test_all_zero_input_channel_gives_a_zero_column():
    def silence(_module, args):
        x = args[0].clone()
        x[..., 5] = 0
        return (x,)

    qmodel, _, model = run("gptq", INT4, hooks=[(f"{LAYER0}.mlp.down_proj", silence)])
    weight = model.get_submodule(f"{LAYER0}.mlp.down_proj").weight
    assert torch.isfinite(weight).all() and weight[:, 5].eq(0).all() and weight[:, 4].ne(0).any()
    assert math.isfinite(qmodel.layers[0]["modules"][f"{LAYER0}.mlp.down_proj"]["gptq_loss"])


@pytest.mark.parametrize("stage, key", [
    ({"weights": INT4, "options": {"block_size": 0}}, "stage[0].options.block_size"),
    ({"weights": INT4, "options": {"dampening": -0.1}}, "stage[0].options.dampening"),
    ({"weights": INT4, "options": {"blocksize": 64}}, "stage[0].options.blocksize"),
    ({"weights": INT4, "options": {"act_order": "yes"}}, "stage[0].options.act_order"),
    ({"weights": {**INT4, "calibrator": "mse"}}, "stage[0].weights.calibrator"),
    ({"activations": {"bits": 8, "dynamic": True}}, "stage[0].weights"),
    ({"weights": INT4, "options": {"range_search": True}}, "stage[0].options.range_search"),  # no static groups
    ({"weights": {"type": "float", "bits": 8, "granularity": "tensor"}, "options": {"range_search": True}},
     "stage[0].options.range_search"),
])
def test_bad_options_name_their_key(stage, key):
    recipe = parse_recipe({"stage": [{"quantizer": "gptq", **stage}]})
    with pytest.raises(RecipeError) as caught:
        resolve(recipe, default_registry())
    assert caught.value.key == key


def test_true_sequential_observes_inputs_after_earlier_groups():
    sequential, seq_logits, seq_model = run("gptq", INT4, true_sequential=True)
    together, tog_logits, tog_model = run("gptq", INT4, true_sequential=False)
    codes = lambda model, name: model.get_submodule(f"{LAYER0}.{name}").weight_codes
    # q/k/v see the float layer's inputs either way; o_proj's Hessian differs only because
    # its inputs come from quantized q/k/v when sequential.
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(codes(seq_model, name), codes(tog_model, name))
    assert not torch.equal(codes(seq_model, "self_attn.o_proj"), codes(tog_model, "self_attn.o_proj"))
    rtn, rtn_logits, _ = run("rtn-on-data", INT4)
    assert seq_logits < rtn_logits and tog_logits < rtn_logits


def test_static_activations_are_calibrated_after_the_weights():
    model, ids = tiny_llama_model(), tokens()
    plan = parse_recipe({"calibration": {"batch_size": 4}, "stage": [
        {"quantizer": "gptq", "weights": {"bits": 8}, "activations": {"bits": 8}}]})
    qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu")
    o_proj = qmodel.quantized_modules()[f"{LAYER0}.self_attn.o_proj"]
    assert o_proj.input_scale.item() > 0 and o_proj.input_args is not None
    assert all(0 < e < 0.01 for e in layer_errors(qmodel))


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, granularity="group", group_size=8),
    QuantArgs(bits=4, granularity="group", group_size=8, symmetric=False),
    QuantArgs(bits=8, granularity="channel"),
    QuantArgs(type="float", bits=8, granularity="tensor"),  # each linear keeps its own per-tensor range
    QuantArgs(type="float", bits=4, format="nvfp4", granularity="group", group_size=16),  # and global scale
], ids=["int4-g8", "int4-g8-asym", "int8-channel", "fp8-tensor", "nvfp4"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("joint", [False, True], ids=["own-scales", "joint-scales"])
def test_linears_reading_one_input_round_together_as_each_alone(args, act_order, joint):
    """q/k/v (and gate/up) share one Hessian and one column loop: each linear's result is what
    rounding it alone gives, with its own per-tensor range and NVFP4 global scale, or (``joint``,
    as fused linears are served) with the group's joint range and largest global scale."""
    from qframe_plugins.gptq import gptq_batched, gptq_shared

    torch.manual_seed(0)
    x = torch.randn(512, 32) * torch.linspace(0.1, 3, 32)
    h = 2 * x.T @ x / 512
    weights = [torch.randn(16, 32), torch.randn(8, 32) * 5, torch.randn(8, 32) * 0.1]
    together = gptq_shared(weights, h.clone(), args, block_size=8, act_order=act_order, joint=joint)
    per_tensor = args.granularity == "tensor" or args.format == "nvfp4"
    if joint and per_tensor:  # one scale for the group: the joint range, the largest global scale
        ranges = (torch.stack([w.min() for w in weights]).min().reshape(1, 1, 1),
                  torch.stack([w.max() for w in weights]).max().reshape(1, 1, 1)) if args.format != "nvfp4" else None
        glob = together[0].global_scale
        if glob is not None:
            assert all(torch.equal(r.global_scale, glob) for r in together)
            assert torch.equal(glob, torch.stack([gptq_quantize(w, h.clone(), args, block_size=8).global_scale
                                                  for w in weights]).amax())
        for w, shared in zip(weights, together):
            alone = gptq_batched(w.unsqueeze(0), h.clone().unsqueeze(0), args, block_size=8, act_order=act_order,
                                 ranges=ranges, global_scale=None if glob is None else glob.reshape(1, 1, 1))
            torch.testing.assert_close(shared.weight, alone.weight[0], rtol=0, atol=1e-6)
        return
    for w, shared in zip(weights, together):
        alone = gptq_quantize(w, h.clone(), args, block_size=8, act_order=act_order)
        torch.testing.assert_close(shared.weight, alone.weight, rtol=0, atol=1e-6)
        for ours, theirs in zip(shared.ranges, alone.ranges):
            torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=0, atol=1e-6)
        assert (shared.global_scale is None) == (alone.global_scale is None)
        if alone.global_scale is not None:
            assert torch.equal(shared.global_scale, alone.global_scale)
        assert shared.loss == pytest.approx(alone.loss, rel=1e-5)


SEARCHED = [
    QuantArgs(bits=4, granularity="group", group_size=8),
    QuantArgs(bits=3, granularity="group", group_size=8, symmetric=False),
    QuantArgs(bits=4, granularity="channel"),
    QuantArgs(type="float", bits=4, format="nvfp4", granularity="group", group_size=16),
]


@pytest.mark.parametrize("args", SEARCHED, ids=["int4-g8", "int3-g8-asym", "int4-channel", "nvfp4"])
def test_range_search_lowers_the_output_error_and_its_scales_reproduce_the_codes(args, monkeypatch):
    """``range_search`` picks each static group's range among 0.6-1.5x its min/max (rows scored in
    chunks: ``SEARCH_ELEMENTS`` made small here); GPTQ's output error ``tr(ΔW H ΔWᵀ)`` drops, and
    the ranges it returns re-round its weight to itself (they are what the checkpoint stores)."""
    import qframe_plugins.gptq as gptq

    monkeypatch.setattr(gptq, "SEARCH_ELEMENTS", 5 * 64)
    torch.manual_seed(0)
    x = torch.randn(1024, 64) * torch.linspace(0.05, 4, 64)
    h = 2 * x.T @ x / 1024
    w = torch.randn(24, 64)
    w[3, 7] = 6.0  # an outlier in a channel whose input is small: worth clipping
    plain, searched = (gptq_quantize(w, h.clone(), args, act_order=True, block_size=16, range_search=s) for s in (False, True))

    def output_error(q):
        return float(torch.trace((q - w) @ h @ (q - w).T))

    assert output_error(searched.weight) < 0.9 * output_error(plain.weight)
    lo, hi = gptq._static_ranges(w.unsqueeze(0).float(), args)
    ratio = torch.where(hi[0] != 0, searched.ranges[1].reshape(hi[0].shape) / hi[0], 1.0)
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.5 + 1e-6 and ratio.ne(1).any()
    holder = nn.Linear(64, 24, bias=False)
    holder.weight.data = searched.weight.clone()
    quantized = QuantLinear.from_linear(holder, args, weight_ranges=searched.ranges,
                                        weight_global_scale=searched.global_scale)
    assert torch.equal(quantized.weight, searched.weight)


def test_range_search_with_shared_inputs_and_experts_is_each_alone():
    """Linears rounded together (joint NVFP4 global scale, spread over their rows) and experts
    search each row's scales as rounding each alone does."""
    from qframe.expert_inputs import ExpertHessians
    from qframe_plugins.gptq import gptq_batched, gptq_experts, gptq_shared

    args = SEARCHED[-1]
    torch.manual_seed(1)
    x = torch.randn(512, 32) * torch.linspace(0.1, 3, 32)
    h = 2 * x.T @ x / 512
    weights = [torch.randn(16, 32), torch.randn(8, 32) * 5]
    together = gptq_shared(weights, h.clone(), args, block_size=8, act_order=True, range_search=True)
    for w, shared in zip(weights, together):
        alone = gptq_batched(w.unsqueeze(0), h.clone().unsqueeze(0), args, block_size=8, act_order=True,
                             range_search=True, global_scale=together[0].global_scale.reshape(1, 1, 1))
        torch.testing.assert_close(shared.weight, alone.weight[0], rtol=0, atol=1e-6)
    hessians = ExpertHessians(2, 32, shared=True, device=torch.device("cpu"))
    hessians.observe(x, experts=slice(None), routed=None)
    experts = torch.stack(weights[:1] * 2) * torch.tensor([1.0, 3.0]).view(2, 1, 1)
    result = gptq_experts(experts, hessians, args, act_order=True, block_size=8, range_search=True)
    for e in range(2):
        alone = gptq_quantize(experts[e], 2 * x.T @ x / 512, args, act_order=True, block_size=8, range_search=True)
        torch.testing.assert_close(result.weight[e], alone.weight, rtol=0, atol=1e-5)
