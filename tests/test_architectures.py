"""Architecture adapters (GPT-2, GPT-NeoX, OPT, Phi-3, Gemma 1/2/3) and the structural fallback,
on tiny random models of each family."""


import pytest
import torch
from torch import nn

import qframe
from qframe.model import Architecture, SmoothingGroup, find_architecture
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.testing import assert_smoothing_groups_exact, logits, make_registry, random_tokens, relative_error, tiny_model
from qframe_plugins.gemma import Gemma2Family, V_TO_O
from qframe_plugins.gpt2 import conv1d_to_linear

ADAPTED = {"gpt2": "GPT2Family", "gpt_neox": "NeoXFamily", "opt": "OPTFamily", "phi3": "Phi3Family",
           "gemma": "GemmaFamily", "gemma2": "Gemma2Family", "gemma3_text": "Gemma2Family", "gemma3": "Gemma3Multimodal"}
FAMILIES = sorted(ADAPTED) + ["falcon", "bloom"]  # the last two have no adapter: the structural fallback
REGISTRY = make_registry()


def recipe():
    return parse_recipe({"calibration": {"batch_size": 3}, "stage": [
        {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}, "activations": {"bits": 8}}]})


def tokens(n=6, length=16):
    return random_tokens(n, length, vocab=128, seed=1)


def prepared(family):
    model = tiny_model(family)
    arch = find_architecture(model, REGISTRY)
    arch.prepare(model)
    return model, arch


def decoder_linears(model, arch):
    layers = arch.decoder_layers(model)
    return {f"{arch.layers_path}.{i}.{n}" for i, layer in enumerate(layers)
            for n, m in layer.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_is_chosen_by_model_type(family):
    arch = find_architecture(tiny_model(family), REGISTRY)
    assert type(arch).__name__ == ADAPTED.get(family, "Structural")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizes_every_decoder_linear_and_keeps_logits_close(family):
    model, arch = prepared(family)
    ids = tokens()
    before = logits(model, ids)
    expected = decoder_linears(model, arch)
    qmodel = qframe.quantize(model, recipe(), calibration=ids, device="cpu")
    assert set(qmodel.quantized_modules()) == expected and len(expected) >= 8
    # int4 on random weights: Gemma 2/3's extra norms amplify it to about 0.06, the rest stay under 0.02
    assert 0 < relative_error(logits(model, ids), before) < 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_groups_are_exact(family):
    model, arch = prepared(family)
    assert arch.smoothing_groups
    assert_smoothing_groups_exact(model, arch)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_checkpoint_round_trip(family, tmp_path):
    model, ids = prepared(family)[0], tokens()
    qmodel = qframe.quantize(model, recipe(), calibration=ids, device="cpu")
    expected = logits(model, ids)
    qframe.export(qmodel, backend="qframe", output=tmp_path)
    reloaded = qframe.load_quantized(tmp_path)
    assert torch.equal(logits(reloaded.model, ids), expected)
    assert set(reloaded.quantized_modules()) == set(qmodel.quantized_modules())


def test_gpt2_conv1d_becomes_an_equivalent_linear():
    model, ids = tiny_model("gpt2"), tokens()
    before = logits(model, ids)
    arch = find_architecture(model, REGISTRY)
    arch.prepare(model)
    arch.prepare(model)  # idempotent
    block = model.transformer.h[0]
    assert type(block.attn.c_attn) is nn.Linear and block.attn.c_attn.weight.shape == (3 * 64, 64)
    assert torch.allclose(logits(model, ids), before, atol=1e-5)
    assert conv1d_to_linear(model) == 0


def test_fused_projections_get_a_kv_cache_too():
    plan = parse_recipe({"calibration": {"batch_size": 3}, "stage": [{"quantizer": "kv_cache", "activations": {"bits": 8}}]})
    for family in ("phi3", "gemma2"):
        qmodel = qframe.quantize(tiny_model(family), plan, calibration=tokens(), device="cpu")
        caches = qmodel.describe().caches
        assert sorted(caches) == list(range(qmodel.model.config.num_hidden_layers)), family
        assert all(float(c.module.k_scale) > 0 and float(c.module.v_scale) > 0 for c in caches.values()), family
        assert not qmodel.quantized_modules()  # the cache only: no linear is replaced


def test_exactness_check_catches_inexact_groups():
    model, arch = prepared("gemma2")  # 4 heads over 2 key/value heads: v -> o is not exact
    assert V_TO_O not in arch.smoothing_groups
    wrong = Gemma2Family()
    wrong.smoothing_groups = (V_TO_O,)
    with pytest.raises(qframe.ModelError, match="cannot fold a scale of 64 channels"):  # v_proj has 32
        assert_smoothing_groups_exact(model, wrong)
    plain = Architecture()  # folds into weight, not 1 + weight: wrong for Gemma's norms
    plain.layers_path, plain.smoothing_groups = arch.layers_path, arch.smoothing_groups[:1]
    with pytest.raises(AssertionError, match="not exact"):
        assert_smoothing_groups_exact(model, plain)


def test_opt_post_norm_drops_norm_groups():
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    arch = find_architecture(model, REGISTRY)
    assert [g.producer for g in arch.smoothing_groups] == ["self_attn.v_proj"]


def test_structural_fallback_traces_groups():
    # Falcon runs attention and MLP in parallel off one norm: a single group of both
    arch = find_architecture(tiny_model("falcon"), REGISTRY)
    assert arch.layers_path == "transformer.h"
    assert {"transformer.word_embeddings", "transformer.rotary_emb"} <= set(arch.pre_layer_paths)
    assert "lm_head" not in arch.pre_layer_paths and arch.attention_path is None
    assert arch.smoothing_groups == (
        SmoothingGroup("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),)


def test_structural_fallback_handles_conv1d():
    model = tiny_model("gpt2")
    model.config.model_type = "gpt2-unknown"
    arch = find_architecture(model, REGISTRY)
    assert type(arch).__name__ == "Structural"
    assert [g.producer for g in arch.smoothing_groups] == ["ln_1", "ln_2"]
    arch.prepare(model)
    assert_smoothing_groups_exact(model, arch)


def test_registered_adapters_win_and_fallback_can_be_disabled():
    model = tiny_model("bloom")
    with pytest.raises(qframe.ModelError, match="no architecture adapter serves model_type 'bloom'"):
        find_architecture(model, make_registry(disabled=["qframe_plugins.structural"]))
    llama = tiny_model("gemma")
    assert type(find_architecture(llama, REGISTRY)).__name__ == "GemmaFamily"


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


def test_model_without_layer_list_is_a_model_error():
    with pytest.raises(qframe.ModelError, match=r"no architecture adapter.*NoLayers has no decoder layers.*nn\.ModuleList"):
        find_architecture(NoLayers(), REGISTRY)


def test_the_pipeline_prepares_gpt2_itself():
    model = tiny_model("gpt2")
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=2)
    plan = parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}}]})
    qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu")
    layers = model.config.n_layer
    assert len(qmodel.quantized_modules()) == 4 * layers  # c_attn, c_proj, c_fc, mlp.c_proj per block


def test_phi3_smoothing_folds_into_the_up_half_of_gate_up():
    model = tiny_model("phi3")
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=3)
    before = logits(model, ids)
    plan = parse_recipe({"stage": [{"quantizer": "smoothquant", "weights": {"bits": 8}, "activations": {"bits": 8},
                                    "options": {"quantize": False}}]})
    qmodel = qframe.quantize(model, plan, calibration=ids, device="cpu")
    # down_proj reads up * act(gate): its scale folds into gate_up_proj's up rows, exactly
    assert qmodel.layers[0]["modules"]["model.layers.0.mlp.down_proj"]["smoothquant_folded"] == 1.0
    assert relative_error(logits(model, ids), before) < 1e-4
