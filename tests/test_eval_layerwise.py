"""Layer-wise evaluation (``qframe.evaluate.perplexity_layerwise``): the very same perplexity as
the whole model gives, one decoder layer on the device at a time, for every tiny family, for
quantized and lazily loaded models, through ``qframe.evaluate`` and ``qframe eval --layerwise``."""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch

import qframe
from qframe.cli import main
from qframe.data import TokenWindows
from qframe.errors import QFrameError
from qframe.lazy import LazyModel
from qframe.model import find_architecture
from qframe.recipe import parse_recipe
from qframe.testing import TINY_FAMILIES, make_registry, random_tokens, tiny_llama_model, tiny_model

# The module, not the function qframe.evaluate that shadows it on the package.
evaluate_module = sys.modules["qframe.evaluate"]
perplexity, perplexity_layerwise = evaluate_module.perplexity, evaluate_module.perplexity_layerwise

CPU = torch.device("cpu")
ROOT = Path(__file__).parents[1]
W4A16 = str(ROOT / "recipes" / "rtn_w4a16.toml")


@pytest.fixture(scope="module")
def registry():
    return make_registry()


@pytest.fixture(scope="module")
def windows() -> TokenWindows:
    # 7 windows in batches of 3: the last batch is smaller, as it often is.
    return TokenWindows(random_tokens(7, 24, 128, seed=1), "0" * 64, "test")


def build(family: str):
    return tiny_llama_model() if family == "llama" else tiny_model(family)


def same_numbers(model, registry, windows, **options) -> tuple[float, float]:
    arch = find_architecture(model, registry)
    whole = perplexity(model, windows, CPU, 3)
    layerwise = perplexity_layerwise(model, arch, windows, CPU, 3, **options)
    assert layerwise.to_dict() | {"seconds": 0} == whole.to_dict() | {"seconds": 0}
    return whole.perplexity, layerwise.perplexity


@pytest.mark.parametrize("family", ("llama",) + TINY_FAMILIES)
def test_layerwise_perplexity_is_exactly_the_whole_models(family, registry, windows):
    model = build(family)
    layers = find_architecture(model, registry).decoder_layers(model)
    whole, layerwise = same_numbers(model, registry, windows)
    assert layerwise == whole  # equal, not close: the same operations in the same order
    assert find_architecture(model, registry).decoder_layers(model) is layers  # the list is back in place


def sliding_and_full(family: str):
    """A two-layer model whose layers see different masks (a 5-token window, then full
    attention) and, for Gemma 3, different rotary tables."""
    import transformers as tf

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, num_key_value_heads=2,
                 head_dim=16, intermediate_size=96, sliding_window=5, layer_types=["sliding_attention", "full_attention"])
    config = {"gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig}[family](**shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_each_layer_gets_its_own_mask_and_rotary_table(family, registry, windows):
    model = sliding_and_full(family)
    whole, layerwise = same_numbers(model, registry, windows)
    assert layerwise == whole
    # The first layer's arguments for every layer would be wrong here: the check above means something.
    arch = find_architecture(model, registry)
    calls = evaluate_module._capture(model, arch, windows, 3, CPU, "auto").calls
    first, second = calls[0][0][1], calls[0][1][1]
    assert first["attention_mask"] is not second["attention_mask"]  # a sliding window's, then causal (or None)
    if family == "gemma3_text":  # local and global layers rotate with different bases
        assert not torch.equal(first["position_embeddings"][0], second["position_embeddings"][0])
    # Batches of one size get equal masks and tables: those are kept once, not once a batch.
    assert calls[1][0][1]["attention_mask"] is first["attention_mask"]
    assert calls[1][1][1]["position_embeddings"][0] is second["position_embeddings"][0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_activations_spilled_to_cpu_memory_give_the_same_numbers(family, registry, windows):
    whole, layerwise = same_numbers(build(family), registry, windows, offload="cpu")
    assert layerwise == whole


STAGES = {
    "w8a8 static": [{"quantizer": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8, "calibrator": "minmax"}}],
    "fp8 with an fp8 KV cache": [
        {"quantizer": "kv_cache", "activations": {"type": "float", "bits": 8, "calibrator": "minmax"}},
        {"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "granularity": "tensor"},
         "activations": {"type": "float", "bits": 8, "calibrator": "minmax"}}],
    "w4a16 experts": [{"quantizer": "rtn", "targets": ["Linear", "Experts"], "ignore": ["lm_head"],
                       "weights": {"bits": 4, "group_size": 16}}],
}


@pytest.mark.parametrize("family, stages", [("llama", "w8a8 static"), ("gemma2", "fp8 with an fp8 KV cache"),
                                            ("mixtral", "w4a16 experts")])
def test_a_quantized_model_gives_the_same_numbers(family, stages, registry, windows):
    recipe = parse_recipe({"calibration": {"batch_size": 4, "propagate": "float"}, "stage": STAGES[stages]})
    qmodel = qframe.quantize(build(family), recipe, calibration=random_tokens(8, 24, 128, seed=2), device="cpu",
                             registry=registry)
    whole, layerwise = same_numbers(qmodel.model, registry, windows)
    assert layerwise == whole
    through_api = qframe.evaluate(qmodel, windows, device="cpu", batch_size=3, layerwise=True, registry=registry)
    assert through_api.perplexity == whole and through_api.layers == qmodel.layers


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral"])
def test_a_lazy_model_is_read_one_layer_at_a_time(family, registry, windows, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path)
    whole = perplexity(model, windows, CPU, 3).perplexity
    lazy = LazyModel(tmp_path, "float32")
    lazy.load_rest()
    calls: list[tuple[str, int]] = []

    def load(i: int):
        # One layer in memory at a time: the one before was freed.
        assert all(p.is_meta for j in range(lazy.num_layers) for p in lazy.layer(j).parameters())
        calls.append(("load", i))
        return lazy.load_layer(i)

    def free(i: int) -> None:
        calls.append(("free", i))
        lazy.free_layer(i)

    arch = find_architecture(lazy.model, registry)
    result = perplexity_layerwise(lazy.model, arch, windows, CPU, 3, load_layer=load, free_layer=free)
    assert result.perplexity == whole
    assert calls == [(what, i) for i in range(lazy.num_layers) for what in ("load", "free")]
    assert all(p.is_meta for i in range(lazy.num_layers) for p in lazy.layer(i).parameters())  # all freed again
    # qframe.evaluate takes the LazyModel itself (layer-wise, loading what lies outside the layers).
    fresh = LazyModel(tmp_path, "float32")
    assert qframe.evaluate(fresh, windows, device="cpu", batch_size=3, registry=registry).perplexity == whole


def test_what_is_not_loaded_is_refused_by_name(registry, windows, tmp_path):
    tiny_llama_model().save_pretrained(tmp_path)
    lazy = LazyModel(tmp_path, "float32")
    arch = find_architecture(lazy.model, registry)
    with pytest.raises(QFrameError, match=r"model\.embed_tokens\.weight.*meta device.*load_rest"):
        perplexity_layerwise(lazy.model, arch, windows, CPU)
    lazy.load_rest()
    with pytest.raises(QFrameError, match=r"decoder layer 0 \(model\.layers\.0\) is on the meta device.*load_layer"):
        perplexity_layerwise(lazy.model, arch, windows, CPU)
    assert arch.decoder_layers(lazy.model) is lazy.model.model.layers
    with pytest.raises(QFrameError, match="layer-wise only"):
        qframe.evaluate(lazy, windows, device="cpu", layerwise=False, registry=registry)
    with pytest.raises(QFrameError, match="generated"):
        qframe.evaluate(lazy, "generated", tokenizer=object(), device="cpu", registry=registry)


def test_the_model_is_restored_when_its_head_fails(registry, windows):
    model = tiny_llama_model()
    layers = model.model.layers

    def broken(*args, **kwargs):
        raise RuntimeError("head broke")

    model.lm_head.forward = broken
    with pytest.raises(RuntimeError, match="head broke"):
        perplexity_layerwise(model, find_architecture(model, registry), windows, CPU)
    assert model.model.layers is layers
    del model.lm_head.forward
    assert perplexity(model, windows, CPU, 3).perplexity == perplexity(tiny_llama_model(), windows, CPU, 3).perplexity


@pytest.fixture
def spy(monkeypatch) -> list[str]:
    """Which evaluation ``qframe.evaluate`` ran, in order."""
    ran: list[str] = []
    layerwise, whole = perplexity_layerwise, perplexity
    monkeypatch.setattr(evaluate_module, "perplexity_layerwise",
                        lambda *a, **k: (ran.append("layerwise"), layerwise(*a, **k))[1])
    monkeypatch.setattr("qframe.api.perplexity", lambda *a, **k: (ran.append("whole"), whole(*a, **k))[1])
    return ran


def test_evaluate_is_whole_on_the_cpu_unless_asked(registry, windows, spy):
    model = tiny_llama_model()
    default = qframe.evaluate(model, windows, device="cpu", batch_size=3, registry=registry)
    asked = qframe.evaluate(model, windows, device="cpu", batch_size=3, registry=registry, layerwise=True)
    assert spy == ["whole", "layerwise"]
    assert asked.perplexity == default.perplexity


def test_layerwise_is_chosen_on_cuda_when_the_weights_take_over_half_its_free_memory(monkeypatch):
    model = tiny_llama_model()
    size = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    cuda = torch.device("cuda")
    for free, expected in ((2 * size + 2, False), (2 * size - 2, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10 * free))
        assert evaluate_module.should_evaluate_layerwise(model, cuda) is expected
    assert evaluate_module.should_evaluate_layerwise(model, CPU) is False


# -- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer of its 128 tokens (no download, no GGUF to
    read), and 400 words of text in those tokens beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(126)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("layerwise") / "model"
    tiny_llama_model().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    rng = random.Random(0)
    (folder.parent / "text.txt").write_text(" ".join(rng.choice(words[2:]) for _ in range(400)))
    return folder


def eval_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", *argv, "--seq-len", "16", "--samples", "6", "--batch-size", "4", "--device", "cpu",
                     "--json"]) == 0
    return json.loads(out.getvalue())


def test_qframe_eval_layerwise_reports_the_same_perplexities(model_dir, tmp_path, spy, qframe_registry, monkeypatch):
    registry = qframe_registry()
    for module in ("qframe.plugins", "qframe.api"):  # the built-in plugins only, whatever is installed
        monkeypatch.setattr(f"{module}.default_registry", lambda: registry)
    dataset = f"text:{model_dir.parent / 'text.txt'}"
    out = tmp_path / "out"
    assert main(["apply", W4A16, "--model", str(model_dir), "--output", str(out), "--device", "cpu",
                 "--set", "stage.0.weights.group_size=16"]) == 0
    spy.clear()
    whole = eval_json(str(out), "--dataset", dataset)
    assert spy == ["whole", "whole"]  # the quantized model, then the unquantized one
    layerwise = eval_json(str(out), "--dataset", dataset, "--layerwise")
    assert spy[2:] == ["layerwise", "layerwise"]
    for report in (whole, layerwise):
        report.pop("seconds"), report["baseline"].pop("seconds")
    assert layerwise == whole
