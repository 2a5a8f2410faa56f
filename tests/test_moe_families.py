"""Mixture-of-experts families (qframe_plugins/moe.py): Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3 and gpt-oss adapters on tiny random models; the MoE built from a dense model
(qframe.testing.moe_from_dense) computes exactly what the dense model does; tiny MoEs quantize
end to end once fused experts are quantization targets (qframe.experts)."""

import copy

import pytest
import torch
from torch import nn

import qframe
from qframe.model import SmoothingGroup, find_architecture
from qframe.recipe import parse_recipe
from qframe.testing import (MOE_FROM_DENSE, TINY_MOE_FAMILIES, assert_smoothing_groups_exact, logits, make_registry,
                            moe_from_dense, random_tokens, relative_error, tiny_llama_model, tiny_model)
from qframe_plugins.moe import V_TO_O

REGISTRY = make_registry()
ADAPTED = {"mixtral": "MixtralFamily", "qwen2_moe": "Qwen2MoeFamily", "qwen3_moe": "Qwen3MoeFamily",
           "deepseek_v3": "DeepseekV3Family", "gpt_oss": "GptOssFamily"}


def tokens(n=4, length=16):
    return random_tokens(n, length, vocab=128, seed=1)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_adapter_is_chosen_by_model_type_not_the_structural_fallback(family):
    model = tiny_model(family)
    assert type(find_architecture(model, REGISTRY)).__name__ == ADAPTED[family]
    assert REGISTRY.adapter(model.config.model_type).provider == "qframe_plugins.moe"


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_smoothing_groups_are_exact_on_every_layer(family):
    model = tiny_model(family)
    arch = find_architecture(model, REGISTRY)
    assert_smoothing_groups_exact(model, arch)
    # The attention group applies in every layer; the others only where their modules are (dense or sparse MLPs).
    attention = arch.smoothing_groups[0]
    assert attention.producer == "input_layernorm"
    assert all(all(_has(layer, n) for n in attention.consumers) for layer in arch.decoder_layers(model))


def _has(module, name):
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


def test_v_to_o_only_without_grouped_query_attention():
    assert V_TO_O in find_architecture(tiny_model("qwen2_moe"), REGISTRY).smoothing_groups  # 4 heads, 4 KV
    for family in ("mixtral", "qwen3_moe", "gpt_oss"):  # 4 heads, 2 KV
        assert V_TO_O not in find_architecture(tiny_model(family), REGISTRY).smoothing_groups


def test_the_norm_feeding_the_router_is_no_group_of_the_shared_expert():
    """Why the adapter leaves it out: scaling the norm and only the shared expert's gate/up moves
    the router's logits and every routed expert's input."""
    model = tiny_model("qwen2_moe")
    arch = find_architecture(model, REGISTRY)
    wrong = SmoothingGroup("post_attention_layernorm", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"))
    assert wrong not in arch.smoothing_groups
    arch.smoothing_groups = (wrong,)
    with pytest.raises(AssertionError, match="is not exact"):
        assert_smoothing_groups_exact(model, arch)


def test_deepseek_v3_without_query_lora_uses_q_proj():
    model = tiny_model("deepseek_v3")
    config = copy.deepcopy(model.config)
    config.q_lora_rank = None
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(config).eval()
    arch = find_architecture(plain, REGISTRY)
    assert ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa") in [g.consumers for g in arch.smoothing_groups]
    assert not any("self_attn.q_a_proj" in g.consumers for g in arch.smoothing_groups)
    assert_smoothing_groups_exact(plain, arch)


@pytest.mark.parametrize("family", MOE_FROM_DENSE)
@pytest.mark.parametrize("tied", [False, True])
def test_moe_from_dense_computes_the_dense_model(family, tied):
    dense = tiny_llama_model(tie_word_embeddings=tied)
    before = {n: t.clone() for n, t in dense.state_dict().items()}
    moe = moe_from_dense(dense, family, num_experts=4, top_k=2)
    ids = random_tokens(3, 24, vocab=256, seed=2)
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[n], t) for n, t in dense.state_dict().items())  # the source is left alone
    experts = moe.model.layers[1].mlp.experts
    mlp = dense.model.layers[1].mlp
    assert experts.gate_up_proj.shape == (4, 2 * 128, 64) and experts.down_proj.shape == (4, 64, 128)
    assert torch.equal(experts.gate_up_proj[3, :128], mlp.gate_proj.weight)  # gate first: the model chunks it so
    # The router really routes: different tokens choose different experts.
    hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    _, weights, chosen = moe.model.layers[0].mlp.gate(hidden)
    assert chosen.unique().numel() == 4 and torch.allclose(weights.sum(-1), torch.ones(64))


def test_moe_from_dense_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="not 'deepseek_v3'"):
        moe_from_dense(tiny_llama_model(), "deepseek_v3")
    with pytest.raises(ValueError, match="top_k"):
        moe_from_dense(tiny_llama_model(), "mixtral", num_experts=2, top_k=3)


RTN_W4A16 = {"quantizer": "rtn", "targets": ["Linear", "Experts"], "ignore": ["lm_head"],
             "weights": {"bits": 4, "group_size": 32, "symmetric": True}}


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_tiny_moe_quantizes_every_expert_end_to_end(family):
    from qframe.experts import QuantExperts

    model = tiny_model(family)
    ids = tokens()
    before = logits(model, ids)
    qframe.quantize(model, parse_recipe({"stage": [RTN_W4A16]}), calibration=ids, device="cpu", registry=REGISTRY)
    sparse = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert sparse and all(isinstance(e, QuantExperts) for e in sparse), "every layer's fused experts are quantized"
    assert 0 < relative_error(logits(model, ids), before) < 0.1


@pytest.mark.parametrize("family", MOE_FROM_DENSE)
def test_moe_from_dense_quantizes_like_its_dense_source(family):
    """Experts holding the dense MLP, quantized with one scale set per expert, lose what the dense model loses."""
    dense = tiny_llama_model()
    moe = moe_from_dense(dense, family)
    ids = random_tokens(2, 16, vocab=256, seed=3)
    reference = logits(dense, ids)
    recipe = parse_recipe({"stage": [RTN_W4A16]})
    qframe.quantize(moe, recipe, calibration=ids, device="cpu", registry=REGISTRY)
    qframe.quantize(dense, recipe, calibration=ids, device="cpu", registry=REGISTRY)
    # The same weights rounded the same way: the MoE computes the quantized dense model.
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=1e-4, atol=1e-4)
    assert relative_error(logits(moe, ids), reference) > 0


def test_smollm2_moe_perplexity_equals_smollm2(smollm2_float32):
    from qframe.data import DataContext, evaluation_windows
    from qframe.evaluate import perplexity

    loaded = smollm2_float32  # moe_from_dense leaves its source unchanged
    windows = evaluation_windows("generated", DataContext(loaded.tokenizer, loaded.model, samples=2, seq_len=128),
                                 REGISTRY, 2)
    dense = perplexity(loaded.model, windows, torch.device("cpu")).perplexity
    for family in MOE_FROM_DENSE:
        moe = perplexity(moe_from_dense(loaded.model, family), windows, torch.device("cpu")).perplexity
        assert moe == pytest.approx(dense, rel=1e-4), family


@pytest.mark.parametrize("family", [f for f in TINY_MOE_FAMILIES if f != "deepseek_v3"])
def test_every_moe_layer_gets_a_kv_cache_beside_its_quantized_experts(family):
    """kv_cache composes with expert quantization; DeepSeek-V3 caches compressed latents and is
    refused on its own (test_kv_cache)."""
    model = tiny_model(family)
    recipe = parse_recipe({"stage": [RTN_W4A16, {"quantizer": "kv_cache", "activations": {"type": "float", "bits": 8}}]})
    qmodel = qframe.quantize(model, recipe, calibration=tokens(), device="cpu", registry=REGISTRY)
    description = qmodel.describe()
    assert sorted(description.caches) == list(range(model.config.num_hidden_layers))
    assert all(float(c.module.k_scale) > 0 < float(c.module.v_scale) for c in description.caches.values())
    assert description.experts, "the experts are quantized too"

