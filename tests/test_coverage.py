"""Nothing is skipped silently (issue 12): the share of decoder weights a run quantized, what
it left in float and why (qframe.coverage), and stages whose targets miss some layers."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import qframe
from qframe.coverage import measure
from qframe.errors import RecipeError
from qframe.model import find_architecture
from qframe.pipeline import check_plan
from qframe.recipe import parse_recipe, resolve
from qframe.testing import make_registry, tiny_llama_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_qwen3_moe(vocab_size: int = 256, layers: int = 2, **config):
    """The issue's tiny random Qwen3-MoE: fused experts ``mlp.experts.gate_up_proj [8, 64, 64]``
    and ``mlp.experts.down_proj [8, 64, 32]``, a router ``mlp.gate [8, 64]``."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=8, num_experts_per_tok=2, vocab_size=vocab_size,
                                      **config)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        torch.random.set_rng_state(state)


@pytest.fixture(scope="module")
def moe_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe")
    tiny_qwen3_moe(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def qframe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qframe", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("qframe: warning: ")]


def rtn(**stage) -> dict:
    return {"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}, **stage}]}


def quantized(model: nn.Module, recipe: dict) -> tuple[dict, list[str]]:
    """``model`` quantized by ``recipe`` (no calibration data): its manifest's coverage, and the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = qframe.quantize(model, parse_recipe(recipe), device="cpu", registry=make_registry())
    return qmodel.manifest["coverage"], [str(w.message) for w in caught]


# -- the case: fused experts left in float are named -----------------------------------------


def test_silent_skip_of_fused_experts_is_named(moe_dir, tmp_path):
    # Linear targets alone never reach fused 3-D experts, whatever qframe.experts offers.
    out = tmp_path / "out"
    done = qframe_cli("apply", "recipes/rtn_w4a16.toml", "--model", str(moe_dir), "--output", str(out),
                      "--device", "cpu", "--set", 'stage.0.targets=["Linear"]')
    assert done.returncode == 0, done.stderr
    [warning] = [w for w in warnings_of(done.stderr) if "stay in float" in w]
    assert "mlp.experts.gate_up_proj (layers 0-1)" in warning and "mlp.experts.down_proj (layers 0-1)" in warning
    assert "router mlp.gate stays in float by default" in warning
    assert "self_attn" not in warning
    summary = [line for line in done.stderr.splitlines() if line.startswith("wrote ")][-1]
    assert "(8 quantized modules, 20 % of decoder weights; not quantized: mlp.experts.gate_up_proj, " \
           "mlp.experts.down_proj)" in summary, summary
    coverage = json.loads((out / "qframe.json").read_text())["coverage"]
    attention = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)
    experts = 2 * (8 * 64 * 64 + 8 * 64 * 32)
    router = 2 * 8 * 64
    assert coverage["quantized_params"] == attention
    assert coverage["decoder_params"] == attention + experts + router
    assert coverage["quantized_share"] == round(attention / (attention + experts + router), 4)
    assert coverage["not_quantized"] == ["mlp.experts.gate_up_proj (layers 0-1)", "mlp.experts.down_proj (layers 0-1)"]
    assert coverage["routers"] == ["mlp.gate (layers 0-1)"] and coverage["ignored"] == []


def test_default_recipe_on_moe_quantizes_and_counts_the_experts(moe_dir, tmp_path):
    """The recipe as shipped reaches the fused experts (default targets): nothing is named, only
    the router stays in float, and the summary counts the experts modules."""
    out = tmp_path / "o"
    done = qframe_cli("apply", "recipes/rtn_w4a16.toml", "--model", str(moe_dir), "--output", str(out),
                      "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert not [w for w in warnings_of(done.stderr) if "stay in float" in w]
    summary = [line for line in done.stderr.splitlines() if line.startswith("wrote ")][-1]
    assert "(10 quantized modules, 2 of them fused experts, 99 % of decoder weights)" in summary, summary
    coverage = json.loads((out / "qframe.json").read_text())["coverage"]
    assert coverage["not_quantized"] == [] and coverage["routers"] == ["mlp.gate (layers 0-1)"]


def test_quantized_experts_are_not_named():
    """With fused-expert targets (``Experts``) only the router stays in float."""
    coverage, caught = quantized(tiny_qwen3_moe(), rtn(targets=["Linear", "Experts"]))
    assert coverage["not_quantized"] == [] and coverage["routers"] == ["mlp.gate (layers 0-1)"]
    assert coverage["decoder_params"] - coverage["quantized_params"] == 2 * 8 * 64  # the routers
    assert coverage["quantized_share"] > 0.99
    assert not [m for m in caught if "stay in float" in m]


def test_dense_model_fully_quantized(tiny_model_dir, tmp_path):
    done = qframe_cli("apply", "recipes/rtn_w4a16.toml", "--model", str(tiny_model_dir), "--output",
                      str(tmp_path / "o"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert warnings_of(done.stderr) == []
    summary = [line for line in done.stderr.splitlines() if line.startswith("wrote ")][-1]
    assert summary.endswith("(14 quantized modules, 100 % of decoder weights)"), summary


def test_dense_coverage_counts_weights_not_norms():
    model = tiny_llama_model()
    arch = find_architecture(model, make_registry())
    expected = sum(p.numel() for n, p in arch.decoder_layers(model).named_parameters() if p.dim() >= 2)
    coverage, caught = quantized(model, rtn())
    assert caught == []
    assert coverage["quantized_params"] == coverage["decoder_params"] == expected
    assert coverage["quantized_share"] == 1.0 and coverage["not_quantized"] == []


def test_ignored_weights_are_listed_not_warned():
    coverage, caught = quantized(tiny_llama_model(), rtn(ignore=["lm_head", "*down_proj"]))
    assert coverage["ignored"] == ["mlp.down_proj (layers 0-1)"] and coverage["not_quantized"] == []
    assert 0 < coverage["quantized_share"] < 1
    assert not [m for m in caught if "stay in float" in m]


def test_linears_a_stage_does_not_target_are_warned():
    coverage, caught = quantized(tiny_llama_model(), rtn(targets=["*.mlp.*"]))
    assert [g.split(" (")[0] for g in coverage["not_quantized"]] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    [warning] = caught
    assert "self_attn.q_proj (layers 0-1)" in warning and "mlp." not in warning


def test_quantized_weights_of_other_modules_count_by_their_codes():
    """A quantized-experts module (qframe.experts, or a plugin's) is recognised by ``NAME_codes``
    beside its weights, counted at the dequantized size, or by ``quantized_weights()``."""

    class PackedExperts(nn.Module):  # codes packed two per byte, a dequantized copy kept
        def __init__(self):
            super().__init__()
            self.register_buffer("gate_up_proj_codes", torch.zeros(8, 64, 32, dtype=torch.uint8))
            self.register_buffer("gate_up_proj", torch.zeros(8, 64, 64), persistent=False)
            self.register_buffer("down_proj_codes", torch.zeros(8, 64, 32, dtype=torch.int8))

    class Declared(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.zeros(10, dtype=torch.uint8))

        def quantized_weights(self):
            return {"weight": 100}

    model = tiny_qwen3_moe()
    layer = model.model.layers[0]
    layer.mlp.experts = PackedExperts()
    layer.self_attn.q_proj = Declared()
    found = measure(model, find_architecture(model, make_registry()))
    assert {g.label for g in found.not_quantized} == {
        "self_attn.q_proj (layer 1)", "self_attn.k_proj (layers 0-1)", "self_attn.v_proj (layers 0-1)",
        "self_attn.o_proj (layers 0-1)", "mlp.experts.gate_up_proj (layer 1)", "mlp.experts.down_proj (layer 1)"}
    assert found.quantized_params == 8 * 64 * 64 + 8 * 64 * 32 + 100
    assert [g.label for g in found.routers] == ["mlp.gate (layers 0-1)"]


# -- targets that match nothing in some layers, or anywhere ------------------------------------------


def checked_warnings(model: nn.Module, recipe: dict) -> list[str]:
    registry = make_registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_plan(model, resolve(parse_recipe(recipe), registry), registry)
    return [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def dense_then_moe():
    """Four layers: the first dense (mlp.gate_proj ...), the rest experts."""
    return tiny_qwen3_moe(layers=4, mlp_only_layers=[0])


def test_targets_missing_some_layers_warn_naming_them(dense_then_moe):
    [warning] = checked_warnings(dense_then_moe, rtn(targets=["*.mlp.gate_proj"]))
    assert warning.startswith("stage[0] (rtn): its targets ['*.mlp.gate_proj'] match nothing in decoder layers 1-3 "
                              "of 4 (model.layers.1, model.layers.2, model.layers.3)"), warning
    assert "mlp.gate_proj" in warning


def test_targets_leaving_layers_out_on_purpose_are_quiet(dense_then_moe):
    # by layer index: the layers left out hold the same modules
    assert checked_warnings(dense_then_moe, rtn(targets=[r"re:layers\.[0-1]\.self_attn\."])) == []
    # by the stage's own ignore: counted before ignore, so nothing to say
    assert checked_warnings(dense_then_moe, rtn(targets=["Linear"], ignore=["re:layers\\.[1-3]\\."])) == []
    assert checked_warnings(dense_then_moe, rtn()) == []


def test_kv_cache_stage_warns_once_at_most(dense_then_moe):
    recipe = rtn()
    recipe["stage"].append({"quantizer": "kv_cache", "activations": {"bits": 8}})
    assert checked_warnings(dense_then_moe, recipe) == []
    recipe["stage"][1]["targets"] = ["*.mlp.gate_proj", "*.self_attn.q_proj"]
    assert checked_warnings(dense_then_moe, recipe) == []  # every layer's attention is reached


def test_targets_matching_nothing_anywhere_exit_2(moe_dir, tmp_path):
    with pytest.raises(RecipeError, match="match no linear of the decoder layers"):
        checked_warnings(tiny_qwen3_moe(), rtn(targets=["*.mlp.gate_proj"]))
    done = qframe_cli("apply", "recipes/rtn_w4a16.toml", "--model", str(moe_dir), "--output", str(tmp_path / "o"),
                      "--device", "cpu", "--set", 'stage.0.targets=["*.mlp.gate_proj"]')
    assert done.returncode == 2, done.stderr
    assert "would quantize nothing" in done.stderr and "Traceback" not in done.stderr
