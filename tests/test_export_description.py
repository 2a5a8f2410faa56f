"""The one description of a quantized model that every backend reads: computed from the
modules after calibration, and from the recipe's quantizers before it (so ``qframe validate
RECIPE --model M`` refuses, before any weight is read, every export the backend would refuse)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qframe
from qframe import QuantizerPlugin
from qframe.errors import ExportError
from qframe.pipeline import Quantizer
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.testing import make_registry, random_tokens, tiny_llama_model, tiny_model

RTN4 = {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 64}}
FP8 = {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
       "activations": {"type": "float", "bits": 8}}
AWQ_W4A8 = {"quantizer": "awq", "weights": {"bits": 4, "group_size": 128}, "activations": {"type": "float", "bits": 8}}
SQ = {"quantizer": "smoothquant", "weights": {"bits": 8}, "activations": {"bits": 8}}
NVFP4 = {"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4}, "activations": {"type": "float", "bits": 4}}


def formats_of(description) -> dict:
    return {n: (s.weights, s.activations) for n, s in description.linears.items()}


@pytest.mark.parametrize("stages", [[RTN4], [FP8], [AWQ_W4A8], [SQ], [NVFP4],
                                   [{**RTN4, "ignore": ["lm_head", "*down_proj"]}, {**FP8, "targets": ["*down_proj"]}]],
                         ids=["rtn", "fp8", "w4a8", "smoothquant", "nvfp4", "two-stages"])
def test_the_plan_before_calibration_says_what_the_quantized_model_holds(stages):
    registry = make_registry()
    model = tiny_llama_model(hidden_size=128, intermediate_size=256)
    recipe = parse_recipe({"stage": stages})
    planned = qframe.describe(model, recipe, registry=registry)
    assert not planned.calibrated and planned.shapes_known
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1)
    qmodel = qframe.quantize(model, recipe, calibration=ids, device="cpu", registry=registry)
    after = qmodel.describe()
    assert after.calibrated and formats_of(planned) == formats_of(after)
    assert all(isinstance(s.module, QuantLinear) for s in after.quantized().values())
    assert all(s.stage and s.stage.startswith("stage[") for s in planned.quantized().values())


class NotQuiteRTN(Quantizer):
    """A third-party quantizer with its own name and options: the backends must still see what
    it makes (today they matched quantizer names and read option names)."""

    def quantize_layer(self, work, targets):
        for name, linear in targets:
            work.replace(name, QuantLinear.from_linear(linear, self.scheme.weights, self.scheme.activations))


class ThirdParty:
    @qframe.hookimpl
    def qframe_quantizers():
        yield QuantizerPlugin(name="my-round", summary="round to nearest, by a third party", factory=NotQuiteRTN)


@pytest.mark.parametrize("backend", ["hf", "tensorrt-llm"])
def test_a_third_party_quantizer_is_checked_like_a_built_in(backend, tmp_path):
    registry = make_registry(ThirdParty)
    recipe = parse_recipe({"stage": [{"quantizer": "my-round", "weights": {"bits": 4, "group_size": 32}}],
                           "export": {"backend": backend}})
    plan = qframe.recipe.resolve(recipe, registry)
    with pytest.raises(ExportError, match="stage\\[0\\] \\(my-round\\): model.layers.0.self_attn.q_proj.*group_size = 64 or 128"):
        qframe.api.check_export(plan, registry=registry)


def model_dir(tmp_path: Path, hidden: int, name: str = "model") -> Path:
    """A model folder holding only its config: validate reads no weights."""
    from transformers import LlamaConfig

    folder = tmp_path / name
    folder.mkdir()
    LlamaConfig(hidden_size=hidden, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=1000).save_pretrained(folder)
    return folder


def validate(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qframe", "validate", str(recipe), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("stages,needle", [
    ('[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 128, symmetric = false }\n',
     "stage[0] (rtn): model.layers.0.self_attn.q_proj: weights int4 asymmetric group 128"),
    ('[[stage]]\nquantizer = "awq"\nweights = { bits = 4, group_size = 128 }\n',
     "stage[0] (awq): model.layers.0.self_attn.q_proj: its 576 input channels are not a whole number of groups of 128"),
    ('[[stage]]\nquantizer = "awq"\nweights = { bits = 4, group_size = 64 }\ntargets = ["*self_attn*"]\n'
     '[[stage]]\nquantizer = "rtn"\nweights = { bits = 8 }\n',
     "stage[1] (rtn): model.layers.0.mlp.gate_proj: W8A16; stage[0] (awq): model.layers.0.self_attn.q_proj: W4A16_AWQ"),
], ids=["asymmetric-int4", "group-128-on-576", "mixed-algorithms"])
def test_validate_with_a_model_refuses_before_calibration_what_tensorrt_llm_would_refuse(stages, needle, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(stages + '[export]\nbackend = "tensorrt-llm"\n')
    done = validate(recipe, "--model", str(model_dir(tmp_path, 576)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_validate_with_a_model_passes_what_the_backend_writes(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nquantizer = "awq"\nweights = { bits = 4, group_size = 64 }\n'
                      '[export]\nbackend = "tensorrt-llm"\n')
    done = validate(recipe, "--model", str(model_dir(tmp_path, 576)))
    assert done.returncode == 0, done.stderr
    assert "checked against" in done.stdout


def test_without_a_model_validate_checks_formats_on_a_stand_in(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 32 }\n[export]\nbackend = "hf"\n')
    done = validate(recipe)
    assert done.returncode == 2 and "set weights.group_size = 64 or 128" in done.stderr
    recipe.write_text('[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 128 }\n[export]\nbackend = "hf"\n')
    done = validate(recipe)
    assert done.returncode == 0 and "checked against" not in done.stdout


def test_dry_run_refuses_what_the_backend_cannot_write(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nquantizer = "awq"\nweights = { bits = 4, group_size = 128 }\n'
                      '[export]\nbackend = "hf"\n')
    done = subprocess.run([sys.executable, "-m", "qframe", "apply", str(recipe), "--model", str(model_dir(tmp_path, 576)),
                           "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 2 and "576 input channels" in done.stderr, done.stderr


def test_the_registry_given_to_the_api_is_the_one_export_and_reload_use(tmp_path):
    """An adapter passed inline (not installed) must hold at export and at reload."""
    from qframe import ArchitecturePlugin
    from qframe.model import Architecture

    class Renamed(Architecture):
        layers_path = "model.layers"
        pre_layer_paths = ("model.embed_tokens", "model.rotary_emb")

    class Inline:
        @qframe.hookimpl
        def qframe_architectures():
            yield ArchitecturePlugin(name="inline-llama", summary="Llama, by an inline adapter", factory=Renamed,
                                     model_types=("llama",))

    registry = make_registry(Inline, disabled=["qframe_plugins.llama"])
    model = tiny_llama_model(hidden_size=128, intermediate_size=256)
    qmodel = qframe.quantize(model, parse_recipe({"stage": [RTN4]}), device="cpu", registry=registry)
    assert type(qmodel.describe().arch) is Renamed
    out = qframe.export(qmodel, "qframe", tmp_path / "native", registry=registry)
    assert type(qframe.load_quantized(out, registry=registry).describe().arch) is Renamed
    with pytest.raises(qframe.ModelError, match="no architecture adapter serves model_type .llama."):
        qframe.load_quantized(out, registry=make_registry(builtins=False))


def test_describe_a_fused_qkv_family_and_gpt2():
    registry = make_registry()
    for family in ("phi3", "gpt2"):
        model = tiny_model(family)
        description = qframe.describe(model, parse_recipe({"stage": [{**RTN4, "weights": {"bits": 8}}]}), registry=registry)
        assert description.quantized() and all(s.weights.bits == 8 for s in description.quantized().values())
        assert "lm_head" in description.unquantized()


def test_auto_dtype_is_one_policy_for_both_backends(tmp_path):
    registry = make_registry()
    model = tiny_llama_model(hidden_size=128, intermediate_size=256)  # float32
    qmodel = qframe.quantize(model, parse_recipe({"stage": [{**RTN4, "weights": {"bits": 4, "group_size": 128}}]}),
                             device="cpu", registry=registry)
    hf = qframe.export(qmodel, "hf", tmp_path / "hf", registry=registry)
    trt = qframe.export(qmodel, "tensorrt-llm", tmp_path / "trt", registry=registry)
    assert json.loads((hf / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((trt / "config.json").read_text())["dtype"] == "float16"
    assert qmodel.describe().serving_dtype() == torch.float16


@pytest.mark.parametrize("backend", ["hf", "tensorrt-llm"])
def test_a_cache_alone_exports_with_every_weight_in_float(backend, tmp_path):
    """Only the KV cache quantized: the float weights of the attention holding it are all written."""
    from safetensors.torch import load_file

    registry = make_registry()
    model = tiny_llama_model(hidden_size=128, intermediate_size=256)
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1)
    recipe = parse_recipe({"stage": [{"quantizer": "kv_cache", "activations": {"type": "float", "bits": 8},
                                      "options": {"shared": True}}]})
    qmodel = qframe.quantize(model, recipe, calibration=ids, device="cpu", registry=registry)
    out = qframe.export(qmodel, backend, tmp_path / backend, registry=registry)  # validated on the way
    tensors = load_file(str(out / ("model.safetensors" if backend == "hf" else "rank0.safetensors")))
    if backend == "hf":
        assert {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} <= set(tensors)
        assert torch.equal(tensors["model.layers.0.self_attn.k_proj.k_scale"],
                           qmodel.model.model.layers[0].self_attn.kv_cache_quant.k_scale)
    else:
        assert "transformer.layers.0.attention.qkv.weight" in tensors
        assert "transformer.layers.0.attention.kv_cache_scaling_factor" in tensors
