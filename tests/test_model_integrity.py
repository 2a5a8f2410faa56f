"""A model is quantized only as its checkpoint holds it, and only when every stage has work.

Real tiny models saved with ``save_pretrained`` and damaged with real safetensors edits: a
missing tensor, a config.json with an extra layer, a qframe output passed as the model, NaN
and inf weights, float16 activations that overflow, and stages that would take nothing. Each is
refused through the Python API and through the CLI (exit 2, one paragraph, no traceback, no
transformers load report), and nothing is written to the output path.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

import qframe
from qframe import QuantizerPlugin, hookimpl
from qframe.cli import main
from qframe.errors import ModelError, QFrameError, RecipeError
from qframe.model import load_model, resolve_source
from qframe.pipeline import Quantizer
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.testing import make_registry, random_tokens, tiny_llama_model

WEIGHTS = "model.safetensors"
FAST = ["--set", "calibration.samples=2", "--set", "calibration.seq_len=16", "--device", "cpu"]
RTN = '[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 32 }\n'
W4 = {"bits": 4, "group_size": 32}


def tiny_tokenizer():
    """A real (word-level) fast tokenizer over the tiny model's 256 tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(255)} | {"<eos>": 255}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny Llama (embeddings tied to lm_head) and its tokenizer, as a hub folder holds them."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama_model(tie_word_embeddings=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def copy_of(saved: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the saved model whose weights ``edit(tensors)`` changes in place."""
    folder = shutil.copytree(saved, tmp_path / "model")
    if edit is not None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def refused(capfd, *argv: str) -> str:
    """Run the CLI in-process; it must exit 2 with one paragraph on stderr and nothing from
    transformers (its load report goes to the process's stderr, hence ``capfd``)."""
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert rc == 2, err
    assert "Traceback" not in err and "LOAD REPORT" not in err and "[transformers]" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"qframe {argv[0]}: error: "), err
    assert out == ""
    return errors[0]


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial*"))


def recipe_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


# -- weights the checkpoint does not hold ---------------------------------------------------


def test_a_tied_model_loads_silently(saved, capfd):
    loaded = load_model(resolve_source(str(saved)))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    out, err = capfd.readouterr()
    assert out == "" and "Loading weights" not in err and "LOAD REPORT" not in err


def test_a_missing_or_unknown_tensor_is_refused_by_name(saved, tmp_path, capfd):
    def edit(tensors):
        del tensors["model.layers.1.mlp.down_proj.weight"]
        tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2)

    model = copy_of(saved, tmp_path, edit)
    verbosity, stdout, stderr, filters = hf_logging.get_verbosity(), sys.stdout, sys.stderr, list(warnings.filters)
    with pytest.raises(ModelError) as caught:
        load_model(resolve_source(str(model)))
    # transformers was silenced while it loaded, and is as it was after the failure
    assert (hf_logging.get_verbosity(), sys.stdout, sys.stderr, warnings.filters) == (verbosity, stdout, stderr, filters)
    message = str(caught.value)
    assert "1 weight of LlamaForCausalLM is missing from the checkpoint (model.layers.1.mlp.down_proj.weight)" in message
    assert "no place in LlamaForCausalLM (model.layers.1.mlp.extra.weight)" in message
    assert "random values" in message and "\n" not in message
    assert "LOAD REPORT" not in capfd.readouterr().err

    out = tmp_path / "out"
    line = refused(capfd, "apply", recipe_file(tmp_path, RTN), "--model", model, "--output", out, *FAST)
    assert "model.layers.1.mlp.down_proj.weight" in line
    nothing_written(out)


def test_a_config_with_more_layers_than_the_weights_is_refused(saved, tmp_path, capfd):
    model = copy_of(saved, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelError, match=r"9 weights of LlamaForCausalLM are missing .*model\.layers\.2\.input_layernorm"
                                         r"\.weight.* and 4 more \(9 in all\).*num_hidden_layers = 3"):
        load_model(resolve_source(str(model)))
    out = tmp_path / "out"
    assert "model.layers.2." in refused(capfd, "apply", recipe_file(tmp_path, RTN), "--model", model, "--output", out)
    nothing_written(out)


def test_a_qframe_output_is_not_a_model_to_quantize(saved, tmp_path, capfd):
    qmodel = qframe.quantize(tiny_llama_model(), parse_recipe({"stage": [{"quantizer": "rtn", "weights": W4}]}),
                             device="cpu")
    output = qframe.export(qmodel, "qframe", tmp_path / "quantized")
    assert any(name.endswith(".weight_packed") for name in load_file(output / WEIGHTS))
    with pytest.raises(ModelError, match=r"is a qframe output .*qframe eval .*qframe export .*--backend NAME.*original model"):
        resolve_source(str(output))
    out = tmp_path / "out"
    line = refused(capfd, "apply", recipe_file(tmp_path, RTN), "--model", output, "--output", out, "--dry-run")
    assert "is a qframe output" in line
    nothing_written(out)
    # Without its manifest it is still no float model: the packed codes have no place in one.
    (output / "qframe.json").unlink()
    with pytest.raises(ModelError, match=r"weight_packed.*already quantized checkpoint"):
        load_model(resolve_source(str(output)))


# -- NaN and inf ---------------------------------------------------------------------------


def poisoned(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    tensors["model.layers.1.self_attn.q_proj.weight"][0] = float("inf")


def test_nan_and_inf_weights_are_refused_or_zeroed(saved, tmp_path, capfd):
    model = copy_of(saved, tmp_path, poisoned)
    with pytest.raises(ModelError, match=r"NaN or infinite values in 2 weight tensors: model\.layers\.0\.mlp\.up_proj\."
                                         r"weight \(1 of 8192 values\), model\.layers\.1\.self_attn\.q_proj\.weight "
                                         r"\(64 of 4096 values\).*nonfinite = \"zero\""):
        load_model(resolve_source(str(model)))
    with pytest.warns(UserWarning, match=r"to 0 .*model\.layers\.0\.mlp\.up_proj\.weight"):
        loaded = load_model(resolve_source(str(model)), nonfinite="zero")
    layers = loaded.model.model.layers
    assert layers[0].mlp.up_proj.weight[3, 4] == 0 and layers[1].self_attn.q_proj.weight[0].eq(0).all()
    assert layers[0].mlp.up_proj.weight.ne(0).sum() == 8192 - 1  # the rest is intact
    with pytest.raises(RecipeError, match="model.nonfinite"):
        load_model(resolve_source(str(model)), nonfinite="ignore")

    out = tmp_path / "out"
    line = refused(capfd, "apply", "recipes/awq_w4a16.toml", "--model", model, "--output", out, *FAST)
    # Streamed, a layer at a time: refused as the first layer that holds one is read, naming it.
    assert "model.layers.0.mlp.up_proj.weight (1 of 8192 values)" in line
    nothing_written(out)


def test_an_inf_weight_in_memory_is_refused_before_awq_uses_it():
    model = tiny_llama_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[2, 5] = float("inf")
    before = model.model.layers[0].input_layernorm.weight.clone()
    recipe = qframe.load_recipe("recipes/awq_w4a16.toml")
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.down_proj\.weight \(1 of 8192 values\)"):
        qframe.quantize(model, recipe, calibration=random_tokens(2, 16, vocab=256), device="cpu")
    assert torch.equal(model.model.layers[0].input_layernorm.weight, before)  # AWQ folded nothing into it
    with torch.no_grad():  # outside the decoder layers: refused before anything runs
        model.model.embed_tokens.weight[7, 0] = float("nan")
    with pytest.raises(ModelError, match=r"model\.embed_tokens\.weight"):
        qframe.quantize(model, recipe, calibration=random_tokens(2, 16, vocab=256), device="cpu")


def overflowing(tensors):
    """Layer 1's MLP computes far beyond float16's 65504 (its weights stay finite in float16)."""
    tensors["model.layers.1.post_attention_layernorm.weight"] *= 1000
    tensors["model.layers.1.mlp.up_proj.weight"] *= 10


def test_float16_activations_that_overflow_are_refused(saved, tmp_path, capfd):
    model = copy_of(saved, tmp_path, overflowing)
    half = load_model(resolve_source(str(model)), "float16").model
    with pytest.raises(ModelError, match=r"model\.layers\.1: the unquantized layer's outputs hold NaN or inf .*float16 "
                                         r".*dtype = \"bfloat16\""):
        qframe.quantize(half, parse_recipe({"stage": [{"quantizer": "rtn", "weights": W4, "activations": {"bits": 8}}]}),
                        calibration=random_tokens(2, 16, vocab=256), device="cpu")

    text = tmp_path / "text.txt"  # the model cannot write its own calibration text: it overflows
    text.write_text(" ".join(f"w{random.Random(0).randrange(255)}" for _ in range(200)))
    out = tmp_path / "out"
    static = recipe_file(tmp_path, RTN + "activations = { bits = 8 }\n")
    line = refused(capfd, "apply", static, "--model", model, "--output", out, *FAST,
                   "--set", "model.dtype=float16", "--set", f"calibration.dataset=text:{text}")
    assert "model.layers.1" in line and "bfloat16" in line
    nothing_written(out)


class Boost(Quantizer):
    """Quantizes like a float copy whose weight overflows the layer's outputs (finite itself)."""

    def quantize_layer(self, work, targets):
        for name, linear in targets:
            module = QuantLinear.from_linear(linear, None)
            module.weight.data.fill_(1e38)
            work.replace(name, module)


class Corrupt(Quantizer):
    """Round to nearest, then lose one scale: what a broken algorithm would leave."""

    def quantize_layer(self, work, targets):
        for name, linear in targets:
            module = QuantLinear.from_linear(linear, self.scheme.weights)
            module.weight_scale[0, 0] = float("nan")
            module.refresh()
            work.replace(name, module)


class Faulty:
    @hookimpl
    def qframe_quantizers():
        yield QuantizerPlugin(name="boost", summary="overflows the layer", factory=Boost)
        yield QuantizerPlugin(name="corrupt", summary="loses a scale", factory=Corrupt)


def test_a_quantized_layer_that_overflows_names_its_stage_and_module():
    registry = make_registry(Faulty)
    plan = parse_recipe({"stage": [{"quantizer": "rtn", "weights": W4, "targets": ["*.self_attn.*"]},
                                   {"quantizer": "boost", "targets": ["up_proj"], "activations": {"bits": 8}}]})
    with pytest.raises(QFrameError, match=r"model\.layers\.0: after stage\[1\] \(boost\), the quantized layer's outputs "
                                          r"hold NaN or inf .* first in model\.layers\.0\.mlp\.up_proj, while the "
                                          r"unquantized layer's are finite"):
        qframe.quantize(tiny_llama_model(), plan, calibration=random_tokens(2, 16, vocab=256), device="cpu",
                        registry=registry)


def test_non_finite_scales_after_a_stage_are_refused():
    registry = make_registry(Faulty)
    plan = parse_recipe({"stage": [{"quantizer": "corrupt", "weights": W4, "targets": ["down_proj"]}]})
    with pytest.raises(QFrameError, match=r"model\.layers\.0: stage\[0\] \(corrupt\) produced NaN or inf in "
                                          r"model\.layers\.0\.mlp\.down_proj\.weight_scale, "
                                          r"model\.layers\.0\.mlp\.down_proj\.weight "):
        qframe.quantize(tiny_llama_model(), plan, device="cpu", registry=registry)


# -- stages that would take nothing ----------------------------------------------------------


class SmoothOnly(Quantizer):
    """Transforms its targets and leaves them float, as smoothing with ``quantize = false`` does."""

    def quantize_layer(self, work, targets):
        for name, _ in targets:
            work.record(name, touched=1.0)

    def replaces_targets(self) -> bool:
        return False


class Smoothing:
    @hookimpl
    def qframe_quantizers():
        yield QuantizerPlugin(name="smooth-only", summary="leaves its targets float", factory=SmoothOnly)


@pytest.mark.parametrize("stages, message", [
    ([{"targets": ["no_such_module"]}],
     r"stage\[0\]\.targets: \['no_such_module'\] is not valid; stage\[0\] \(rtn\) would quantize nothing: its "
     r"targets match no linear of the decoder layers \(model\.layers\.N\)\. Targets are"),
    ([{"targets": ["lm_head"], "ignore": []}],
     r"stage\[0\]\.targets: .*decoder layers \(model\.layers\.N\), only lm_head \(Linear\): qframe quantizes the "
     r"linears of the decoder layers"),
    ([{"targets": ["LlamaMLP"]}],
     r"only model\.layers\.0\.mlp \(LlamaMLP\), model\.layers\.1\.mlp \(LlamaMLP\): qframe quantizes the linears"),
    ([{"ignore": ["*_proj"]}],  # all of Llama's linears; not GPT-2's (c_attn, c_fc), so only the model tells
     r"stage\[0\]\.ignore: \['\*_proj'\] is not valid; stage\[0\] \(rtn\) would quantize nothing: its ignore "
     r"excludes all 14 modules its targets \['Linear', 'Experts'\] match"),
    ([{"targets": ["*.mlp.*"]}, {"targets": ["*.mlp.*", "*.self_attn.*"]}, {"targets": ["gate_proj", "o_proj"]}],
     r"stage\[2\]\.targets: .*stage\[2\] \(rtn\) would quantize nothing: stage\[0\] \(rtn\), stage\[1\] \(rtn\) "
     r"quantize all 4 modules it targets first"),
])
def test_a_stage_that_takes_nothing_is_refused_before_calibration(stages, message):
    model, seen = tiny_llama_model(), []
    model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(1))
    plan = parse_recipe({"stage": [{"quantizer": "rtn", "weights": W4, "activations": {"bits": 8}, **s} for s in stages]})
    with pytest.raises(RecipeError, match=message):
        qframe.quantize(model, plan, calibration=random_tokens(2, 16, vocab=256), device="cpu")
    assert seen == [] and not any(isinstance(m, QuantLinear) for m in model.modules())


def test_stages_that_leave_their_targets_float_or_share_them_are_fine():
    registry = make_registry(Smoothing)
    plan = parse_recipe({"stage": [{"quantizer": "smooth-only", "weights": W4}, {"quantizer": "rtn", "weights": W4},
                                   {"quantizer": "kv_cache", "activations": {"bits": 8}}]})
    qmodel = qframe.quantize(tiny_llama_model(), plan, calibration=random_tokens(2, 16, vocab=256), device="cpu",
                             registry=registry)
    assert len(qmodel.quantized_modules()) == 14
    assert qmodel.layers[0]["modules"]["model.layers.0.mlp.up_proj"]["touched"] == 1.0
    assert all(math.isfinite(layer["output_error"]) for layer in qmodel.layers)


def test_a_second_stage_on_quantized_linears_fails_through_the_cli(saved, tmp_path, capfd):
    out = tmp_path / "out"
    line = refused(capfd, "apply", recipe_file(tmp_path, RTN + RTN), "--model", saved, "--output", out)
    assert "stage[1].targets" in line and "stage[0] (rtn) quantizes all 14 modules it targets first" in line
    nothing_written(out)
    line = refused(capfd, "apply", recipe_file(tmp_path, RTN + 'ignore = ["*_proj"]\n'), "--model", saved, "--output", out)
    assert "stage[0].ignore" in line and "excludes all 14 modules" in line
    nothing_written(out)


def test_nonfinite_zero_through_the_cli(saved, tmp_path, capfd):
    model, out = copy_of(saved, tmp_path, poisoned), tmp_path / "out"
    with pytest.warns(UserWarning) as caught:  # the console prints it as one "qframe: warning:" line
        assert main(["apply", str(recipe_file(tmp_path, RTN)), "--model", str(model), "--output", str(out),
                     "--set", "model.nonfinite=zero"]) == 0
    assert "qframe: warning: " in warnings.formatwarning(caught[0].message, UserWarning, "", 0)
    assert (out / "qframe.json").is_file()


def test_gguf_name_map_built_once_per_architecture_and_restored():
    """transformers asks gguf for its tensor-name map once per module while it reads a .gguf;
    within ``gguf_name_map_once`` the map is built once and the same object returned, and gguf's
    own function is back afterwards (SmolLM2's weights through it: tests/test_e2e_smollm2.py)."""
    import gguf

    from qframe.model import gguf_name_map_once

    original = gguf.get_tensor_name_map
    with gguf_name_map_once():
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not first
    assert gguf.get_tensor_name_map is original
    assert original(gguf.MODEL_ARCH.LLAMA, 30).mapping == first.mapping
