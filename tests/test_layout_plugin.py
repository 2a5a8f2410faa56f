"""Checkpoint layouts as plugins: one layout object serves the TensorRT-LLM writer and the
validator, and a third-party distribution (``examples/renamed_llama``: a Llama under another
model_type and architecture name, installed for real with pip) exports and validates with no
change to ``qframe_plugins``."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import qframe
from qframe.errors import ExportError, PluginError
from qframe.plugins import build_registry
from qframe.recipe import parse_recipe
from qframe.testing import make_registry, random_tokens, tiny_llama_model, tiny_model
from qframe_plugins.tensorrt_llm.layout import LlamaLayout, Plain, layout_class, layout_for
from qframe_plugins.tensorrt_llm.validate import validate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "renamed_llama"
BUILTINS = make_registry()
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=250, max_position_embeddings=128, tie_word_embeddings=False)
FP8_KV = {"stage": [
    {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
     "activations": {"type": "float", "bits": 8}},
    {"quantizer": "kv_cache", "activations": {"type": "float", "bits": 8}},
]}


# -- one layout object for the writer and the validator -------------------------------------------

def _families() -> dict[str, torch.nn.Module]:
    return {
        "llama": tiny_llama_model(attention_bias=True, mlp_bias=True),
        "mistral": tf.AutoModelForCausalLM.from_config(tf.MistralConfig(**SIZES)),
        "qwen2": tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(**SIZES)),
        "gpt2": tiny_model("gpt2"),
    }


def _checkpoint_config(layout) -> dict:
    """The model part of the config.json the writer derives from a layout."""
    return {"architecture": layout.architecture, "vocab_size": layout.vocab, "hidden_size": layout.hidden,
            "num_hidden_layers": layout.num_layers, "num_attention_heads": layout.heads,
            "num_key_value_heads": layout.kv_heads, "head_size": layout.head_size, **layout.config()}


def _tensors(layout) -> list:
    linears = [(s.name, s.shape, s.bias, s.parallel, [(p.heads, p.width) for p in s.parts])
               for i in range(layout.num_layers) for s in layout.linears(i)]
    layers = [t for i in range(layout.num_layers) for t in layout.layer_tensors(i)]
    plains = [(p.name, p.shape, p.split, p.parallel_embedding)
              for p in [*layout.first_tensors(), *layers, *layout.last_tensors()]]
    return linears + plains


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_a_layout_read_back_from_its_config_has_the_same_tensors(family):
    model = _families()[family]
    written = layout_for(model, BUILTINS)
    entry = BUILTINS.layout("tensorrt-llm", architecture=written.architecture)
    assert entry is not None and entry.provider == "qframe_plugins.tensorrt_llm.layout"
    read = layout_class(entry).from_checkpoint(_checkpoint_config(written))
    assert type(read) is type(written) and read.architecture == written.architecture
    assert read.sizes == written.sizes
    assert _tensors(read) == _tensors(written)
    # ... and the shapes are the model's own (GPT-2's transposed Conv1D weights aside)
    params = dict(model.named_parameters(remove_duplicate=False))
    plains = [*written.first_tensors(), *written.layer_tensors(1), *written.last_tensors()]
    assert all(tuple(params[p.source].shape) == p.shape for p in plains)
    if family != "gpt2":
        modules = dict(model.named_modules())
        for spec in written.linears(1):
            weights = [modules[p.module].weight for p in spec.parts]
            assert (sum(w.shape[0] for w in weights), weights[0].shape[1]) == spec.shape
            assert (modules[spec.parts[0].module].bias is not None) == spec.bias, spec.name


def test_no_layout_for_a_model_type_names_it_and_the_installed_ones():
    with pytest.raises(ExportError) as info:
        layout_for(tiny_model("opt"), BUILTINS)
    message = str(info.value)
    assert "no layout for model_type 'opt' (OPTForCausalLM)" in message
    assert "the installed layouts write gpt2, llama, mistral, mixtral, qwen2, qwen2_moe, qwen3_moe" in message
    assert "qframe_layouts" in message and "layout.py" not in message  # no "edit qframe's source"


def test_an_inline_layout_serves_the_writer_and_the_validator(qframe_registry):
    class MyLlamaLayout(LlamaLayout):
        architecture = "MyLlamaForCausalLM"

    class Plugin:
        @qframe.hookimpl
        def qframe_layouts():
            yield qframe.LayoutPlugin(name="my-llama", summary="inline", factory=MyLlamaLayout,
                                      model_types=("my_llama",), architectures=("MyLlamaForCausalLM",))

    model = tiny_llama_model()
    model.config.model_type = "my_llama"
    registry = qframe_registry(Plugin)
    layout = layout_for(model, registry)
    assert type(layout) is MyLlamaLayout and layout.architecture == "MyLlamaForCausalLM"
    read = layout_class(registry.layout("tensorrt-llm", architecture="MyLlamaForCausalLM"))
    assert read.from_checkpoint(_checkpoint_config(layout)).sizes == layout.sizes


def test_a_layout_factory_that_is_no_layout_class_is_named(qframe_registry):
    class Plugin:
        @qframe.hookimpl
        def qframe_layouts():
            yield qframe.LayoutPlugin(name="broken", summary="inline", factory=dict, model_types=("opt",))

    with pytest.raises(PluginError, match=r"layout 'broken' \(plugin 'Plugin', inline\): its factory .* is not a "
                                          r"subclass of qframe_plugins\.tensorrt_llm\.layout\.Layout"):
        layout_for(tiny_model("opt"), qframe_registry(Plugin))


def test_the_head_and_the_embeddings_are_marked_for_the_validator():
    layout = layout_for(tiny_llama_model(), BUILTINS)
    [embedding], [norm, head] = layout.first_tensors(), layout.last_tensors()
    assert embedding.parallel_embedding and not embedding.head
    assert head.head and head.split == "vocab" and not norm.head
    assert not Plain("x.bias", "x.bias", "vocab", (4,)).head  # a vocab-split vector is no linear


# -- a real third-party distribution --------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``examples/renamed_llama`` installed with pip into a folder of its own (copied first, so
    that the build leaves nothing in the source tree)."""
    work = tmp_path_factory.mktemp("renamed-llama")
    source = shutil.copytree(EXAMPLE, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, f"pip could not install {EXAMPLE.name} (needs setuptools):\n{pip.stderr}"
    return target


@pytest.fixture(scope="module")
def installed(site):
    """The plugin's modules and a registry read from the installed distribution's entry point."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        registry = build_registry(disabled=())
        modeling = importlib.import_module("qframe_renamed_llama.modeling")
    return registry, modeling


def _qframe(site: Path, *args: str, disabled: str = "") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("QFRAME_DISABLE_PLUGINS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), QFRAME_DISABLE_PLUGINS=disabled)
    return subprocess.Popen([sys.executable, "-m", "qframe", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _quantized(model: torch.nn.Module, registry) -> qframe.QuantizedModel:
    ids = random_tokens(4, 16, vocab=SIZES["vocab_size"], seed=1)
    return qframe.quantize(model, parse_recipe(FP8_KV), calibration=ids, device="cpu", registry=registry)


@pytest.fixture(scope="module")
def exported(installed, tmp_path_factory) -> dict[str, Path]:
    """One random renamed_llama, and a plain Llama with the very same weights, quantized alike
    and exported at tp_size 2: the first through the plugin's layout, the second the built-in's."""
    registry, modeling = installed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        renamed = tf.AutoModelForCausalLM.from_config(modeling.RenamedLlamaConfig(**SIZES)).eval()
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES)).eval()
    llama.load_state_dict(renamed.state_dict())
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for name, model in (("renamed", renamed), ("llama", llama)):
        qmodel = _quantized(model, registry)
        out[name] = qframe.export(qmodel, "tensorrt-llm", folder / name, options={"tp_size": 2}, registry=registry)
    return out


def test_the_distribution_provides_an_adapter_and_a_layout(installed):
    registry, _ = installed
    for kind in ("architecture", "layout"):
        entry = registry.entry(kind, "renamed-llama")
        assert (entry.provider, entry.distribution) == ("renamed-llama", "qframe-renamed-llama 0.1.0")
    assert registry.adapter("renamed_llama").record.name == "renamed-llama"
    assert registry.layout("tensorrt-llm", model_type="renamed_llama").record.name == "renamed-llama"
    assert registry.layout("tensorrt-llm", architecture="RenamedLlamaForCausalLM").record.name == "renamed-llama"


def test_the_plugins_layout_writes_llamas_tensors_under_its_architecture(exported):
    renamed, llama = exported["renamed"], exported["llama"]
    ours, theirs = json.loads((renamed / "config.json").read_text()), json.loads((llama / "config.json").read_text())
    assert (ours.pop("architecture"), theirs.pop("architecture")) == ("RenamedLlamaForCausalLM", "LlamaForCausalLM")
    assert ours == theirs
    for rank in (0, 1):
        a, b = load_file(str(renamed / f"rank{rank}.safetensors")), load_file(str(llama / f"rank{rank}.safetensors"))
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_without_the_plugin_the_family_cannot_be_exported(installed):
    registry, modeling = installed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(modeling.RenamedLlamaConfig(**SIZES)).eval()
    qmodel = _quantized(model, registry)
    with pytest.raises(ExportError, match="no layout for model_type 'renamed_llama' \\(RenamedLlamaForCausalLM\\)"):
        qframe.export(qmodel, "tensorrt-llm", "unused", registry=BUILTINS)


def test_the_validator_checks_the_plugins_tensors(installed, exported, tmp_path):
    registry, _ = installed
    assert validate_checkpoint(exported["renamed"], registry) == []
    broken = shutil.copytree(exported["renamed"], tmp_path / "broken")
    tensors = load_file(str(broken / "rank1.safetensors"))
    del tensors["transformer.layers.1.mlp.gate.weights_scaling_factor"]
    save_file(tensors, str(broken / "rank1.safetensors"))
    assert validate_checkpoint(broken, registry) == [
        "rank1.safetensors: transformer.layers.1.mlp.gate.weights_scaling_factor: missing (expected float32 [1], "
        "per-tensor)"]


def test_qframe_validate_finds_the_layout_through_the_installed_plugin(site, exported):
    started = {
        "with": _qframe(site, "validate", str(exported["renamed"])),
        "without": _qframe(site, "validate", str(exported["renamed"]), disabled="renamed-llama"),
        "listing": _qframe(site, "plugins", "--json"),
    }
    done = {name: proc.communicate(timeout=300) + (proc.returncode,) for name, proc in started.items()}
    out, err, code = done["with"]
    assert code == 0, err
    assert "valid tensorrt-llm checkpoint" in out
    out, err, code = done["without"]
    assert code == 2 and "Traceback" not in err
    assert "config.json: architecture: 'RenamedLlamaForCausalLM' is not a TensorRT-LLM architecture" in out
    out, err, code = done["listing"]
    assert code == 0, err
    rows = {(r["kind"], r["name"]): (r["provider"], r["distribution"]) for r in json.loads(out)["plugins"]}
    assert rows[("layout", "renamed-llama")] == ("renamed-llama", "qframe-renamed-llama 0.1.0")
    assert rows[("architecture", "renamed-llama")] == ("renamed-llama", "qframe-renamed-llama 0.1.0")
    assert {n for (k, n), (p, _) in rows.items() if k == "layout" and p == "qframe_plugins.tensorrt_llm.layout"} == {
        "llama", "mistral", "qwen2", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "qwen"}
