"""The README's third-party plugin, installed for real, used from a recipe."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import qframe
from qframe.plugins import build_registry
from qframe.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "clipped_rtn"


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", readme, re.S)
    plugin = (EXAMPLE / "qframe_clipped_rtn" / "plugin.py").read_text()
    body = plugin.split('"""', 2)[2].lstrip("\n")  # without the module docstring
    assert body in blocks


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(EXAMPLE)], check=True, capture_output=True)
    return site


def test_installed_plugin_validates_a_recipe(installed, tmp_path):
    recipe = tmp_path / "clip.toml"
    recipe.write_text('[[stage]]\nquantizer = "clipped-rtn"\nweights = { bits = 4 }\noptions = { ratio = 0.95 }\n')
    env = {"PYTHONPATH": str(installed), "PATH": ""}
    ok = subprocess.run([sys.executable, "-m", "qframe", "validate", str(recipe)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "qframe", "validate", str(recipe), "--set", "stage.0.options.ratio=1.5"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "stage[0].options.ratio: 1.5" in bad.stderr and "Traceback" not in bad.stderr


def test_plugin_quantizes_a_model(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    module = importlib.import_module("qframe_clipped_rtn.plugin")
    registry = build_registry(entry_points=False, plugins=[module])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, vocab_size=64))
    recipe = parse_recipe({"stage": [{"quantizer": "clipped-rtn", "weights": {"bits": 4}, "options": {"ratio": 0.5}}]})
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    qmodel = qframe.quantize(model, recipe, registry=registry, device="cpu")
    q = qmodel.quantized_modules()["model.layers.0.mlp.up_proj"]
    # ranges halved: int4 fitted scale max(hi/7, -lo/8) of half the row's extremes
    lo, hi = original.amin(dim=1), original.amax(dim=1)
    expected = torch.maximum(0.5 * hi / 7, 0.5 * lo / -8)
    assert torch.allclose(q.weight_scale.flatten(), expected, rtol=1e-6)
    with pytest.raises(qframe.RecipeError, match="quantizes weights only"):
        qframe.quantize(model, parse_recipe({"stage": [{"quantizer": "clipped-rtn", "activations": {"bits": 8, "dynamic": True}}]}),
                        registry=registry, device="cpu")
