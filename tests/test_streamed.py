"""The streamed ``qframe apply`` (issue 13) writes exactly what the in-memory path writes.

``qframe apply`` on a local folder reads the model a decoder layer at a time and writes each
layer as it finishes (:mod:`qframe.run`); the Python API quantizes a model held in memory and
saves it whole. For every algorithm and backend, and tiny models of every family, the files the
two write are the same bytes, and so is the manifest but for its timings.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import qframe
from qframe.testing import TINY_FAMILIES, streamed_and_in_memory, tiny_llama_model, tiny_model

ROOT = Path(__file__).parents[1]
WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(126)]
RECIPES = {  # recipe -> overrides that fit a tiny model (widths of 64 and 128)
    "rtn_w4a16": ["stage.0.weights.group_size=64"],
    "awq_w4a16": [],
    "gptq_w4a16": [],
    "fp8": [],
    "nvfp4": [],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with calibration text in the tiny models' 128 words."""
    folder = tmp_path_factory.mktemp("streamed")
    rng = random.Random(0)
    (folder / "text.txt").write_text(" ".join(rng.choice(WORDS[2:]) for _ in range(2000)))
    return folder


def save_with_tokenizer(model, folder: Path) -> Path:
    """``model`` saved like a hub folder, with a word-level tokenizer of its 128 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


def both_paths(model_dir: Path, out: Path, recipe: str, backend: str, overrides: list[str], text: Path) -> None:
    """Run ``recipe`` streamed and in memory; their outputs are the same bytes."""
    sets = [f'calibration.dataset="text:{text}"', "calibration.samples=4", "calibration.seq_len=16", *overrides]
    assert streamed_and_in_memory(str(model_dir), str(ROOT / "recipes" / f"{recipe}.toml"), out, sets, backend) == []


@pytest.fixture(scope="module")
def llama_dir(root) -> Path:
    return save_with_tokenizer(tiny_llama_model(), root / "llama")


@pytest.mark.parametrize("backend", ["qframe", "tensorrt-llm", "hf"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_algorithm_and_backend(llama_dir, root, tmp_path, recipe, backend):
    both_paths(llama_dir, tmp_path, recipe, backend, RECIPES[recipe], root / "text.txt")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family(root, tmp_path, family):
    """GPT-2 (whose adapter rebuilds Conv1D as nn.Linear) and models only the structural fallback
    serves are loaded whole; the others stream. Their outputs are the same either way."""
    model_dir = save_with_tokenizer(tiny_model(family), tmp_path / "model")
    both_paths(model_dir, tmp_path, "rtn_w4a16", "qframe", ["stage.0.weights.group_size=16"], root / "text.txt")


@pytest.mark.parametrize("family, recipe, backend", [
    (family, recipe, backend) for family in ("mixtral", "qwen2_moe", "qwen3_moe")
    for recipe, backend in (("fp8", "tensorrt-llm"), ("nvfp4", "hf"), ("gptq_w4a16_moe", "qframe"),
                            ("awq_w4a16_moe", "qframe"))
    if not (family == "qwen2_moe" and backend == "tensorrt-llm")])  # its tiny model's dense first layer: refused
def test_mixtures_of_experts_export_alike(root, tmp_path, family, recipe, backend):
    model_dir = save_with_tokenizer(tiny_model(family), tmp_path / "model")
    overrides = ["stage.0.weights.group_size=16"] if recipe.endswith("_moe") else []
    both_paths(model_dir, tmp_path, recipe, backend, overrides, root / "text.txt")


def test_a_streamed_model_is_read_a_layer_at_a_time(llama_dir, root, tmp_path, monkeypatch):
    """No more than one decoder layer is ever off the meta device while a model streams."""
    from qframe import run

    seen: list[int] = []
    original = run.LazyParts.load_layer

    def load_layer(self, index):
        real = [i for i in range(self.lazy.num_layers)
                if not any(t.is_meta for t in self.lazy.layer(i).parameters())]
        assert real == [], f"layers {real} still loaded when layer {index} is read"
        seen.append(index)
        return original(self, index)

    monkeypatch.setattr(run.LazyParts, "load_layer", load_layer)
    qframe.apply(str(ROOT / "recipes" / "gptq_w4a16.toml"), model=str(llama_dir), output=tmp_path / "out",
                 overrides=[f'calibration.dataset="text:{root / "text.txt"}"', "calibration.samples=4",
                            "calibration.seq_len=16", 'export.backend="qframe"'], device="cpu")
    assert seen == [0, 1]
