"""The layer-wise pipeline on tiny random Llama, Mistral and Qwen2 models."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import qframe
from qframe.checkpoint import load_native, save_native
from qframe.plugins import build_registry
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.testing import logits, make_registry, random_tokens, relative_error, tiny_llama_model

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[kind](hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config).eval()


def recipe(**stage):
    return parse_recipe({"calibration": {"batch_size": 3}, "stage": [{"quantizer": "rtn", **stage}]})


def tokens(n=6, length=16):
    return random_tokens(n, length, vocab=128, seed=1)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_weight_only_int4_quantizes_every_decoder_linear(kind):
    model, ids = tiny(kind), tokens()
    before = logits(model, ids)
    qmodel = qframe.quantize(model, recipe(weights={"bits": 4, "group_size": 48}), device="cpu")
    modules = qmodel.quantized_modules()
    assert len(modules) == 2 * 7
    assert all(name.startswith("model.layers.") for name in modules)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    # 64 input channels in groups of 48: a full group and a partial one
    assert modules["model.layers.0.self_attn.q_proj"].weight_scale.shape == (64, 2)
    assert 0 < relative_error(logits(model, ids), before) < 0.05
    assert qmodel.manifest["dataset"] is None  # weight-only RTN reads no data
    figures = qmodel.layers[0]["modules"]["model.layers.0.mlp.down_proj"]
    assert 0 < figures["weight_error"] < 0.05


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_native_checkpoint_reloads_exactly(kind, tmp_path):
    model, ids = tiny(kind), tokens()
    qmodel = qframe.quantize(model, recipe(weights={"bits": 4, "group_size": 32, "symmetric": False},
                                           activations={"bits": 8}), calibration=ids, device="cpu")
    expected = logits(model, ids)
    save_native(qmodel, tmp_path)
    reloaded = load_native(tmp_path, build_registry(entry_points=False))
    assert torch.equal(logits(reloaded.model, ids), expected)
    assert set(reloaded.quantized_modules()) == set(qmodel.quantized_modules())


def test_static_activation_scale_is_the_observed_range():
    model, ids = tiny("llama"), tokens()
    seen = []
    layer0 = model.model.layers[0]
    hook = layer0.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    logits(model, ids)
    hook.remove()
    x = torch.cat([s.flatten() for s in seen])
    expected = max(x.max().item() / 127, x.min().item() / -128)
    qframe.quantize(model, recipe(weights={"bits": 8}, activations={"bits": 8}), calibration=ids, device="cpu")
    assert layer0.self_attn.q_proj.input_scale.item() == pytest.approx(expected, rel=1e-5)


def test_later_layers_calibrate_on_quantized_inputs():
    # layer 1's input range must come from layer 0 *after* quantization
    model, ids = tiny("llama"), tokens()
    qmodel = qframe.quantize(model, recipe(weights={"bits": 2}, activations={"bits": 8}), calibration=ids, device="cpu")
    seen = []
    q1 = model.model.layers[1].self_attn.q_proj
    hook = q1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    for batch in ids.split(3):  # the recipe's batch size
        logits(model, batch)
    hook.remove()
    x = torch.cat([s.flatten() for s in seen])
    # inputs recomputed through the quantized model reproduce the calibrated scale
    assert q1.input_scale.item() == pytest.approx(max(x.max().item() / 127, x.min().item() / -128), rel=1e-4)
    assert qmodel.layers[1]["output_error"] > 0


def test_float_propagation_calibrates_on_the_unquantized_model():
    # with propagate = "float" layer 1's range comes from the float model's activations
    model, ids = tiny("llama"), tokens()
    seen = []
    q1 = model.model.layers[1].self_attn.q_proj
    hook = q1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    logits(model, ids)
    hook.remove()
    x = torch.cat([s.flatten() for s in seen])
    plan = parse_recipe({"calibration": {"batch_size": 3, "propagate": "float"},
                         "stage": [{"quantizer": "rtn", "weights": {"bits": 2}, "activations": {"bits": 8}}]})
    qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu")
    q1 = model.model.layers[1].self_attn.q_proj
    assert q1.input_scale.item() == pytest.approx(max(x.max().item() / 127, x.min().item() / -128), rel=1e-5)
    assert qmodel.manifest["recipe"]["calibration"]["propagate"] == "float"
    assert qmodel.layers[1]["output_error"] > 0


def test_spilled_activations_give_the_same_model():
    ids = tokens()
    results = {}
    for offload in ("device", "cpu"):
        model = tiny("llama")
        plan = parse_recipe({"calibration": {"batch_size": 3, "offload": offload},
                             "stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}, "activations": {"bits": 8}}]})
        qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu")
        results[offload] = (logits(model, ids), [layer["output_error"] for layer in qmodel.layers])
    assert torch.equal(results["cpu"][0], results["device"][0]) and results["cpu"][1] == results["device"][1]


def test_every_stage_records_its_error():
    model, ids = tiny("llama"), tokens()
    plan = parse_recipe({"calibration": {"batch_size": 3}, "stage": [
        {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}},
        {"quantizer": "kv_cache", "activations": {"bits": 8}}]})
    qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu")
    for layer in qmodel.layers:
        first, second = layer["stages"]
        assert (first["quantizer"], second["quantizer"]) == ("rtn", "kv_cache")
        # Each stage's figure is the layer's error after it: the KV stage changes it (usually
        # upwards; quantization noise can also cancel a little of the weights' error).
        assert 0 < first["output_error"] != second["output_error"] == layer["output_error"]
        assert all("weight_error" in v for v in first["modules"].values())
        assert set(second["modules"]) == {f"{layer['layer']}.self_attn"}  # the attention's cache


def test_dynamic_activations_need_no_data():
    model, ids = tiny("qwen2"), tokens()
    before = logits(model, ids)
    qmodel = qframe.quantize(model, recipe(weights={"bits": 8}, activations={"bits": 8, "dynamic": True}), device="cpu")
    assert qmodel.manifest["dataset"] is None
    assert relative_error(logits(model, ids), before) < 1e-3


def test_targets_and_ignore_select_modules():
    model = tiny("llama")
    qmodel = qframe.quantize(model, recipe(weights={"bits": 4}, targets=["re:self_attn"], ignore=["*.o_proj"]), device="cpu")
    names = {n.split(".", 3)[-1] for n in qmodel.quantized_modules()}
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}


def test_layers_end_on_the_cpu_and_unchanged_elsewhere():
    model, ids = tiny("mistral"), tokens()
    embed = model.model.embed_tokens.weight.clone()
    qframe.quantize(model, recipe(weights={"bits": 8}, activations={"bits": 8}), calibration=ids, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.model.embed_tokens.weight, embed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_matches_cpu():
    ids = tokens()
    cpu, gpu = tiny("llama"), tiny("llama")
    r = recipe(weights={"bits": 4, "group_size": 32}, activations={"bits": 8})
    qframe.quantize(cpu, r, calibration=ids, device="cpu")
    qframe.quantize(gpu, r, calibration=ids, device="cuda")
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        if name.endswith("weight_codes"):
            assert (a.int() - b.int()).abs().max() <= 1, name


class _SecondCalibrator:
    """An inline plugin: a calibrator other than minmax, for rtn to refuse on weights."""

    @qframe.hookimpl
    def qframe_calibrators(self):
        from qframe_plugins.minmax import MinMax

        yield qframe.CalibratorPlugin(name="other", summary="minmax under another name", factory=MinMax)


def test_rtn_refuses_a_weight_calibrator_it_would_ignore():
    from qframe.plugins import build_registry

    registry = build_registry(entry_points=False, plugins=[_SecondCalibrator()])
    with pytest.raises(qframe.RecipeError, match=r"stage\[0\]\.weights\.calibrator: 'other'.*allowed: minmax, mse"):
        qframe.quantize(tiny("llama"), recipe(weights={"bits": 4, "calibrator": "other"}), registry=registry, device="cpu")
    # activations do honour any calibrator
    model, ids = tiny("llama"), tokens()
    qframe.quantize(model, recipe(weights={"bits": 8}, activations={"bits": 8, "calibrator": "other"}),
                    calibration=ids, registry=registry, device="cpu")


def test_rtn_weights_with_mse_ranges_reduce_weight_error():
    plain, searched = tiny("llama"), tiny("llama")
    a = qframe.quantize(plain, recipe(weights={"bits": 3, "group_size": 32}), device="cpu")
    b = qframe.quantize(searched, recipe(weights={"bits": 3, "group_size": 32, "calibrator": "mse"}), device="cpu")
    errors = lambda q: [m["weight_error"] for layer in q.layers for m in layer["modules"].values()]
    assert all(e_b <= e_a * (1 + 1e-6) for e_a, e_b in zip(errors(a), errors(b)))
    assert sum(errors(b)) < 0.97 * sum(errors(a))
    with pytest.raises(qframe.RecipeError, match=r"weights\.calibrator_options\.bins: 64.*take no options"):
        qframe.quantize(tiny("llama"), recipe(weights={"bits": 4, "calibrator": "mse", "calibrator_options": {"bins": 64}}),
                        device="cpu")


def _work_on_tiny_llama(batches: int = 3):
    from qframe.model import find_architecture
    from qframe.pipeline import LayerWork, capture_inputs

    model = tiny_llama_model()
    arch = find_architecture(model, make_registry())
    inputs = capture_inputs(model, arch, random_tokens(2 * batches, 8, model.config.vocab_size), 2, torch.device("cpu"))
    layer = model.model.layers[0]
    return LayerWork(0, "model.layers.0", layer, inputs, torch.device("cpu"), arch=arch), layer


class _Rows:
    def __init__(self):
        self.rows = []

    def observe(self, x):
        self.rows.append(x.detach().reshape(-1, x.shape[-1]).clone())


def test_observing_the_attention_inputs_stops_each_batch_after_the_first_before_the_mlp():
    work, layer = _work_on_tiny_llama(batches=3)
    calls = {"down": 0}
    layer.mlp.down_proj.register_forward_pre_hook(lambda *_: calls.__setitem__("down", calls["down"] + 1))
    seen = work.observe_inputs(["model.layers.0.self_attn.q_proj"], lambda _n: _Rows())
    assert calls["down"] == 1  # the first batch runs whole, the two others stop at q_proj
    assert len(seen["model.layers.0.self_attn.q_proj"].rows) == 3
    outputs = work.observe_outputs(["model.layers.0.mlp.up_proj"], lambda _n: _Rows())
    assert calls["down"] == 2 and len(outputs["model.layers.0.mlp.up_proj"].rows) == 3


class _Twice(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0 * self.inner(x)


def test_a_module_run_twice_per_forward_never_stops_a_batch_early():
    work, layer = _work_on_tiny_llama(batches=3)
    layer.self_attn.q_proj = _Twice(layer.self_attn.q_proj)
    calls = {"down": 0}
    layer.mlp.down_proj.register_forward_pre_hook(lambda *_: calls.__setitem__("down", calls["down"] + 1))
    seen = work.observe_inputs(["model.layers.0.self_attn.q_proj.inner"], lambda _n: _Rows())
    assert calls["down"] == 3 and len(seen["model.layers.0.self_attn.q_proj.inner"].rows) == 6


def test_auto_offload_spills_when_the_working_set_passes_the_headroom():
    from qframe.pipeline import HEADROOM, over_bound

    gib = 1 << 30
    assert HEADROOM == 2 * gib
    assert not over_bound(2 * gib, gib // 2, 2 * gib, 100 * gib)  # layer + activations + 2 GiB: allowed
    assert over_bound(2 * gib, gib // 2, 2 * gib + 1, 100 * gib)  # one byte more
    assert over_bound(60 * gib, gib // 2, gib, 60 * gib)  # small working set, but it does not fit


def _llama_8b_layer() -> nn.Module:
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=1, vocab_size=128)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).model.layers[0]


@pytest.mark.parametrize("stage, spills", [
    ({"quantizer": "rtn", "weights": {"bits": 4, "group_size": 128}}, False),
    ({"quantizer": "gptq", "weights": {"bits": 4, "group_size": 128}}, True),
    ({"quantizer": "awq", "weights": {"bits": 4, "group_size": 128}}, True),
])
def test_working_sets_of_a_llama_8b_layer(stage, spills):
    from qframe.pipeline import HEADROOM, forward_bytes, tensor_bytes
    from qframe.recipe import resolve

    registry = make_registry()
    spec = resolve(parse_recipe({"stage": [stage]}), registry).stages[0]
    quantizer = spec.record.factory(spec.spec, spec.options, registry)
    layer, tokens = _llama_8b_layer(), 8 * 2048
    assert tensor_bytes(layer) == 218_112_000 * 2  # shapes alone: the layer is on the meta device
    assert forward_bytes(layer, tokens) == 3 * tokens * 14336 * 2  # the MLP's intermediates
    working_set = quantizer.working_set(layer, tokens)
    assert working_set >= forward_bytes(layer, tokens)
    assert (working_set > HEADROOM) == spills
    if stage["quantizer"] == "gptq":  # down_proj's Hessian and its factor, float32
        assert working_set >= 2 * 4 * 14336**2


def test_the_unquantized_copy_shares_tensors_and_survives_the_move():
    from qframe.pipeline import unquantized_copy

    layer = tiny("llama").model.layers[0]
    before = layer.mlp.up_proj.weight.detach().clone()
    same_device = unquantized_copy(layer, torch.device("cpu"))  # the layer is quantized where it is: a copy
    assert same_device.mlp.up_proj.weight.data_ptr() != layer.mlp.up_proj.weight.data_ptr()
    reference = unquantized_copy(layer, torch.device("meta"))  # the layer moves: shared, no copy
    assert reference.mlp.up_proj.weight.data_ptr() == layer.mlp.up_proj.weight.data_ptr()
    layer.to("meta")
    assert torch.equal(reference.mlp.up_proj.weight, before) and layer.mlp.up_proj.weight.is_meta


def test_replaced_linears_are_released_after_their_layer():
    model = tiny("llama")
    original = model.model.layers[0].mlp.up_proj  # replaced by a QuantLinear; the model no longer holds it
    qframe.quantize(model, recipe(weights={"bits": 4, "group_size": 32}), device="cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert original.weight.is_meta  # its memory (on the accelerator, when there is one) is released
