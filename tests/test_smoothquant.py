"""The ``smoothquant`` quantizer on tiny random Llama models, against ``rtn`` on the same data."""

import pytest
import torch

import qframe
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.testing import tiny_llama_with_outliers, logits, random_tokens, relative_error, tiny_llama_model
from qframe_plugins.smoothing import ChannelStats, smoothquant_scale

W8 = {"bits": 8}
A8 = {"bits": 8}
GRID = [0.3, 0.5, 0.7, 0.85]


outlier_model = tiny_llama_with_outliers


def recipe(quantizer="smoothquant", weights=W8, activations=A8, **options):
    stage = {"quantizer": quantizer, "weights": weights, "activations": activations}
    if options:
        stage["options"] = options
    return parse_recipe({"calibration": {"batch_size": 4}, "stage": [stage]})


def tokens():
    return random_tokens(8, 32, vocab=256, seed=1)


def quantized_error(stage, ids=None, **config):
    """(relative logits error, QuantizedModel) of ``stage`` on a fresh outlier model."""
    model, ids = outlier_model(**config), tokens() if ids is None else ids
    before = logits(model, ids)
    qmodel = qframe.quantize(model, stage, calibration=ids, device="cpu")
    return relative_error(logits(model, ids), before), qmodel


def test_smoothing_alone_preserves_the_function():
    model, ids = outlier_model(), tokens()
    before = logits(model, ids)
    norm = model.model.layers[0].input_layernorm.weight.clone()
    o_proj = model.model.layers[0].self_attn.o_proj.weight.clone()
    qframe.quantize(model, recipe(quantize=False), calibration=ids, device="cpu")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.allclose(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)  # smoothed, and folded
    # GQA: v_proj is narrower than o_proj's input, so that group cannot fold and is skipped
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, o_proj)


def test_static_w8a8_beats_rtn_on_outlier_channels():
    rtn, _ = quantized_error(recipe("rtn"))
    smooth, qmodel = quantized_error(recipe())
    assert smooth < 0.5 * rtn
    q_proj = qmodel.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.input_scale.numel() == 1
    figures = qmodel.layers[0]["modules"]["model.layers.0.self_attn.q_proj"]
    assert figures["smoothquant_alpha"] == 0.5 and figures["smoothquant_scale_max"] > 1
    assert figures["smoothquant_folded"] == 1.0
    # GQA: v_proj -> o_proj cannot fold; by default o_proj is not smoothed
    assert "smoothquant_folded" not in qmodel.layers[0]["modules"]["model.layers.0.self_attn.o_proj"]
    assert not qmodel.model.model.layers[0].self_attn.o_proj.has_prescale
    # with prescale = true it keeps the scale as its input prescale
    _, qmodel = quantized_error(recipe(prescale=True))
    o_proj = qmodel.model.model.layers[0].self_attn.o_proj
    assert qmodel.layers[0]["modules"]["model.layers.0.self_attn.o_proj"]["smoothquant_folded"] == 0.0
    assert o_proj.has_prescale and not torch.equal(o_proj.input_prescale, torch.ones_like(o_proj.input_prescale))


def test_prescaled_smoothing_is_exact_and_survives_the_checkpoint(tmp_path):
    # W8A8 with per-token activations stays close; the prescaled o_proj reloads exactly
    model, ids = outlier_model(), tokens()
    before = logits(model, ids)
    qmodel = qframe.quantize(model, recipe(activations={"bits": 8, "dynamic": True}, prescale=True), calibration=ids,
                             device="cpu")
    after = logits(model, ids)
    assert model.model.layers[1].self_attn.o_proj.has_prescale
    assert relative_error(after, before) < 5e-3
    qframe.export(qmodel, backend="qframe", output=tmp_path / "out")
    assert torch.equal(logits(qframe.load_quantized(tmp_path / "out").model, ids), after)


def test_alpha_grid_picks_from_the_grid_and_is_no_worse_than_its_alpha():
    fixed, fixed_q = quantized_error(recipe(alpha_grid=[0.5]))
    searched, searched_q = quantized_error(recipe(alpha_grid=GRID))
    modules = searched_q.layers[0]["modules"]
    picked = {m["smoothquant_alpha"] for m in modules.values() if "smoothquant_alpha" in m}
    assert picked and picked <= set(GRID)
    # layer 0 sees the same inputs in both runs: the search's objective can only improve
    for name, figures in modules.items():
        if "smoothquant_search_loss" in figures:
            assert figures["smoothquant_search_loss"] <= fixed_q.layers[0]["modules"][name]["smoothquant_search_loss"] + 1e-12
    plain, _ = quantized_error(recipe(alpha=0.5))
    assert fixed == pytest.approx(plain, rel=1e-5)  # a grid of one alpha is that alpha
    assert searched < 1.5 * plain


def test_dynamic_per_token_activations():
    rtn, _ = quantized_error(recipe("rtn", activations={"bits": 8, "dynamic": True}))
    smooth, qmodel = quantized_error(recipe(activations={"bits": 8, "dynamic": True}))
    assert smooth < rtn
    assert not hasattr(qmodel.model.model.layers[0].self_attn.q_proj, "input_scale")


def test_dead_channels_stay_finite_and_nan_weights_are_refused():
    model, ids = outlier_model(), tokens()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[7] = 0.0  # q, k, v see an all-zero channel
    qframe.quantize(model, recipe(), calibration=ids, device="cpu")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            assert torch.isfinite(module.weight).all() and torch.isfinite(module.input_scale).all()
    assert torch.isfinite(model.model.layers[0].input_layernorm.weight).all()
    assert torch.isfinite(logits(model, ids)).all()

    poisoned = outlier_model()
    with torch.no_grad():
        poisoned.model.embed_tokens.weight[3] = float("nan")  # token 3 would poison its sequences
    with pytest.raises(qframe.ModelError, match=r"model\.embed_tokens\.weight \(64 of"):
        qframe.quantize(poisoned, recipe(), calibration=ids, device="cpu")

    stats = ChannelStats()
    stats.observe(torch.tensor([[1.0, float("nan"), 0.0], [-4.0, 2.0, float("inf")]]))
    assert stats.amax.tolist() == [4.0, 2.0, 0.0]
    assert smoothquant_scale(stats.amax, torch.ones(3), 0.5).tolist() == [2.0, pytest.approx(2**0.5), 1.0]


@pytest.mark.parametrize("options, key", [
    ({"alpha": 1.0}, "options.alpha"),
    ({"alpha_grid": [0.5, 2]}, "options.alpha_grid"),
    ({"alpha_grid": "0.5"}, "options.alpha_grid"),
    ({"beta": 1}, "options.beta"),
])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(qframe.RecipeError, match=rf"stage\[0\]\.{key}"):
        qframe.quantize(tiny_llama_model(), recipe(**options), calibration=tokens(), device="cpu")
