"""fp8, nvfp4, mxfp4 and kv_cache quantizers, and rtn in every format, on tiny random models."""

import pytest
import torch

import qframe
from qframe import numerics
from qframe.checkpoint import load_native, save_native
from qframe.plugins import build_registry
from qframe.cli import main
from qframe.kvcache import cache_quantizers
from qframe.testing import logits, random_tokens, relative_error, tiny_llama_model

ROOT_RECIPES = ["fp8", "fp8_kv", "int8_kv", "nvfp4", "mxfp4", "w8a8_int8"]


def tokens(n=4, length=32):
    return random_tokens(n, length, vocab=256, seed=3)


@pytest.mark.parametrize("name", ROOT_RECIPES)
def test_ready_recipes_quantize_and_reload_exactly(name, tmp_path):
    model = tiny_llama_model(hidden_size=64, intermediate_size=128, vocab_size=256)
    ids = tokens()
    before = logits(model, ids)
    recipe = qframe.load_recipe(f"recipes/{name}.toml", overrides={"calibration.batch_size": 2})
    qmodel = qframe.quantize(model, recipe, calibration=ids, device="cpu")
    after = logits(model, ids)
    assert 0 < relative_error(after, before) < 0.5
    save_native(qmodel, tmp_path)
    assert torch.equal(logits(load_native(tmp_path, build_registry(entry_points=False)).model, ids), after)


def test_fp8_weights_sit_on_the_e4m3_grid():
    model = tiny_llama_model(hidden_size=64, intermediate_size=128, vocab_size=256)
    recipe = qframe.load_recipe("recipes/fp8.toml")
    qmodel = qframe.quantize(model, recipe, calibration=tokens(), device="cpu")
    q = qmodel.quantized_modules()["model.layers.0.mlp.up_proj"]
    scale = q.weight_scale.float().reshape(-1)[0]
    on_grid = (q.weight.float() / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.allclose(q.weight.float(), on_grid, rtol=0, atol=0)
    assert q.input_scale.item() > 0


def test_kv_cache_quantizes_the_cache_and_leaves_the_linears():
    model = tiny_llama_model(hidden_size=64, intermediate_size=128, vocab_size=256)
    ids = tokens()
    before = logits(model, ids)
    recipe = qframe.recipe.parse_recipe({"stage": [{"quantizer": "kv_cache", "activations": {"bits": 8}}]})
    qmodel = qframe.quantize(model, recipe, calibration=ids, device="cpu")
    assert qmodel.quantized_modules() == {}  # the weights stay as they were: only the cache is quantized
    caches = cache_quantizers(model)
    assert list(caches) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    cache = caches["model.layers.0.self_attn"]
    assert cache.args.name == "int8" and not cache.shared
    figures = qmodel.layers[0]["modules"]["model.layers.0.self_attn"]
    assert figures == {"k_scale": pytest.approx(float(cache.k_scale)), "v_scale": pytest.approx(float(cache.v_scale))}
    assert 0 < relative_error(logits(model, ids), before) < 0.01


def test_kv_cache_composes_with_a_weight_stage():
    model = tiny_llama_model(hidden_size=64, intermediate_size=128, vocab_size=256)
    recipe = qframe.load_recipe("recipes/int8_kv.toml")
    qmodel = qframe.quantize(model, recipe, calibration=tokens(), device="cpu")
    k = qmodel.quantized_modules()["model.layers.1.self_attn.k_proj"]
    assert k.weight_args.bits == 4 and cache_quantizers(model)["model.layers.1.self_attn"].args.bits == 8


@pytest.mark.parametrize("override, key, allowed", [
    ("stage.0.weights.symmetric=false", "stage[0].weights.symmetric", "allowed: true"),
    ("stage.0.activations.calibrator=magic", "stage[0].activations.calibrator", "installed:"),
])
def test_fp8_bad_input_exits_2(override, key, allowed, capsys):
    assert main(["validate", "recipes/fp8.toml", "--set", override]) == 2
    err = capsys.readouterr().err
    assert key in err and allowed in err and "Traceback" not in err


def test_nvfp4_block_size_must_be_16(capsys):
    assert main(["validate", "recipes/nvfp4.toml", "--set", "stage.0.weights.group_size=32"]) == 2
    err = capsys.readouterr().err
    assert "stage[0].weights.group_size: 32" in err and "16" in err


def test_fp4_quantizer_refuses_another_format(capsys):
    assert main(["validate", "recipes/mxfp4.toml", "--set", 'stage.0.weights.format="nvfp4"',
                 "--set", "stage.0.weights.group_size=16"]) == 2
    assert "stage[0].weights.type" in capsys.readouterr().err


def test_kv_cache_refuses_weights_and_fp4(capsys):
    assert main(["validate", "recipes/int8_kv.toml", "--set", "stage.1.weights.bits=4"]) == 2
    assert "stage[1].weights" in capsys.readouterr().err
    assert main(["validate", "recipes/int8_kv.toml", "--set", "stage.1.activations.dynamic=true"]) == 2
    assert "stage[1].activations" in capsys.readouterr().err


def test_fp8_shared_scale_search_never_loses_to_the_joint_maximum():
    from qframe.scheme import QuantArgs
    from qframe_plugins.fp import search_shared_range

    args = QuantArgs(type="float", bits=8, granularity="tensor")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g) * torch.linspace(0.1, 3, 32)
    gram = x.T @ x
    weights = [torch.randn(16, 32, generator=g) * 0.02, torch.randn(8, 32, generator=g) * 0.02]
    weights[0][3, 5] = 1.0  # one outlier sets the joint maximum

    def loss(lo, hi):
        return sum(float((((d := numerics.quantize_weight(w, args, (lo, hi)).dequantize() - w) @ gram) * d).sum())
                   for w in weights)

    (lo, hi), ratio = search_shared_range(weights, gram, args, grid=10, min_ratio=0.5)
    joint = (torch.tensor([[min(float(w.min()) for w in weights)]]), torch.tensor([[max(float(w.max()) for w in weights)]]))
    assert 0.5 <= ratio <= 1.0 and torch.equal(hi, joint[1] * ratio)
    assert loss(lo, hi) <= loss(*joint)


def test_fp8_searched_shared_scale_is_one_scale_per_fused_group():
    model = tiny_llama_model(hidden_size=64, intermediate_size=128, vocab_size=256)
    recipe = qframe.load_recipe("recipes/fp8.toml", ["stage.0.options.shared_scale=\"search\""])
    qmodel = qframe.quantize(model, recipe, calibration=tokens(), device="cpu")
    q = qmodel.quantized_modules()
    for layer in ("model.layers.0", "model.layers.1"):
        qkv = {float(q[f"{layer}.self_attn.{p}_proj"].weight_scale) for p in "qkv"}
        gate_up = {float(q[f"{layer}.mlp.{p}_proj"].weight_scale) for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
        ratio = qmodel.layers[int(layer[-1])]["modules"][f"{layer}.self_attn.q_proj"]["shared_scale_ratio"]
        assert 0.5 <= ratio <= 1.0


def test_fp8_shared_scale_option_is_checked(capsys):
    assert main(["validate", "recipes/fp8.toml", "--set", "stage.0.options.shared_scale=\"mean\""]) == 2
    err = capsys.readouterr().err
    assert "shared_scale" in err and "allowed: max, search" in err and "Traceback" not in err
