"""The ``awq`` quantizer on tiny random Llama models, against ``rtn`` on the same data."""

import pytest
import torch

import qframe
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.testing import tiny_llama_with_outliers, logits, random_tokens, relative_error, tiny_llama_model

W4 = {"bits": 4, "group_size": 32}
E4M3 = {"type": "float", "bits": 8}


outlier_model = tiny_llama_with_outliers


def recipe(quantizer="awq", weights=W4, activations=None, **options):
    stage = {"quantizer": quantizer, "weights": weights}
    if activations is not None:
        stage["activations"] = activations
    if options:
        stage["options"] = options
    return parse_recipe({"calibration": {"batch_size": 4}, "stage": [stage]})


def tokens():
    return random_tokens(8, 32, vocab=256, seed=1)


def quantized(stage, **config):
    """(relative logits error, QuantizedModel) of ``stage`` on a fresh outlier model."""
    model, ids = outlier_model(**config), tokens()
    before = logits(model, ids)
    qmodel = qframe.quantize(model, stage, calibration=ids, device="cpu")
    return relative_error(logits(model, ids), before), qmodel


def test_int4_group32_clearly_beats_rtn():
    rtn, _ = quantized(recipe("rtn"))
    awq, qmodel = quantized(recipe())
    assert awq < 0.7 * rtn
    figures = qmodel.layers[0]["modules"]
    q_proj = figures["model.layers.0.self_attn.q_proj"]
    assert 0 < q_proj["awq_ratio"] < 1 and q_proj["awq_folded"] == 1.0
    assert 0.5 <= q_proj["awq_clip_ratio"] <= 1 and 0 < q_proj["weight_error"] < 0.1
    assert all(m["awq_loss"] <= m["awq_rtn_loss"] for m in figures.values() if "awq_loss" in m)


def test_asymmetric_weights():
    rtn, _ = quantized(recipe("rtn", weights={**W4, "symmetric": False}))
    awq, qmodel = quantized(recipe(weights={**W4, "symmetric": False}))
    assert awq < rtn
    assert qmodel.model.model.layers[0].mlp.down_proj.weight_zero.shape == (64, 4)


def test_group_64_on_hidden_128():
    config = dict(hidden_size=128, intermediate_size=256)
    rtn, _ = quantized(recipe("rtn", weights={"bits": 4, "group_size": 64}), **config)
    awq, qmodel = quantized(recipe(weights={"bits": 4, "group_size": 64}), **config)
    assert awq < rtn
    assert qmodel.model.model.layers[0].self_attn.q_proj.weight_scale.shape == (128, 2)


def test_identity_candidate_makes_awq_never_worse_than_rtn():
    # n_grid = 1 leaves only r = 0 (s = 1); without clipping that is exactly RTN
    _, plain = quantized(recipe("rtn"))
    _, only_identity = quantized(recipe(n_grid=1, clip=False))
    for name, module in plain.quantized_modules().items():
        assert torch.equal(only_identity.quantized_modules()[name].weight_codes, module.weight_codes), name
    _, searched = quantized(recipe(clip=False))
    for layer in searched.layers:
        for figures in layer["modules"].values():
            if "awq_loss" in figures:
                assert figures["awq_loss"] <= figures["awq_rtn_loss"]


def test_w4a8_with_fp8_static_activations():
    rtn, _ = quantized(recipe("rtn", activations=E4M3))
    awq, qmodel = quantized(recipe(activations=E4M3))
    assert awq < rtn
    for module in qmodel.quantized_modules().values():
        assert module.input_args.format == "e4m3" and module.input_scale.item() > 0


def test_smoothing_alone_preserves_the_function():
    model, ids = outlier_model(), tokens()
    before = logits(model, ids)
    o_proj = model.model.layers[0].self_attn.o_proj.weight.clone()
    qmodel = qframe.quantize(model, recipe(quantize=False), calibration=ids, device="cpu")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.allclose(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    # GQA's v -> o group could only be kept as a prescale, which a float linear cannot hold
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, o_proj)
    assert qmodel.layers[0]["modules"]["model.layers.0.mlp.down_proj"]["awq_folded"] == 1.0


def test_gqa_value_output_group_keeps_a_prescale_through_export(tmp_path):
    model = outlier_model()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = tokens()
    qmodel = qframe.quantize(model, recipe(activations=E4M3), calibration=ids, device="cpu")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.has_prescale and not model.model.layers[0].self_attn.q_proj.has_prescale
    assert qmodel.layers[0]["modules"]["model.layers.0.self_attn.o_proj"]["awq_folded"] == 0.0
    expected = logits(model, ids)
    qframe.export(qmodel, backend="qframe", output=tmp_path / "native")
    reloaded = qframe.load_quantized(tmp_path / "native")
    assert torch.equal(reloaded.model.model.layers[0].self_attn.o_proj.input_prescale, o_proj.input_prescale)
    assert torch.equal(logits(reloaded.model, ids), expected)


@pytest.mark.parametrize("stage, key", [
    (dict(n_grid=0), r"options\.n_grid"),
    (dict(max_shrink=1.5), r"options\.max_shrink"),
    (dict(clip_tokens=0), r"options\.clip_tokens"),
    (dict(clip="yes"), r"options\.clip"),
    (dict(weights={"type": "float", "bits": 8}), r"weights\.type"),
    (dict(weights={"bits": 4, "granularity": "tensor"}), r"weights\.granularity"),
    (dict(weights={"bits": 4, "calibrator": "mse"}), r"weights\.calibrator"),
    (dict(weights=None, activations={"bits": 8}), r"weights"),
])
def test_bad_recipes_name_their_key(stage, key):
    stage = dict(stage)
    weights, activations = stage.pop("weights", W4), stage.pop("activations", None)
    bad = parse_recipe({"stage": [{"quantizer": "awq", **({"weights": weights} if weights else {}),
                                   **({"activations": activations} if activations else {}), "options": stage}]})
    with pytest.raises(qframe.RecipeError, match=rf"stage\[0\]\.{key}"):
        qframe.quantize(tiny_llama_model(), bad, calibration=tokens(), device="cpu")
