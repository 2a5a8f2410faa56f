"""The Python API as the README shows it, on a tiny model with SmolLM2's real tokenizer."""

import json

import pytest
import torch

import qframe
from qframe.testing import tiny_llama_model

PROSE = "Lords, knights and gentlemen, what I was wont to say of my own mind is yet my mind. " * 40


@pytest.fixture
def model(tokenizer):
    return tiny_llama_model(vocab_size=len(tokenizer), tie_word_embeddings=True)


def test_quantize_evaluate_export_reload(model, tokenizer, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(PROSE)
    recipe = qframe.load_recipe("recipes/rtn_w8a8.toml", overrides={
        "calibration.dataset": f"text:{text}", "calibration.samples": 4, "calibration.seq_len": 32})
    qmodel = qframe.quantize(model, recipe, tokenizer=tokenizer, device="cpu")
    assert qmodel.manifest["dataset"]["samples"] == 4 and len(qmodel.manifest["dataset"]["sha256"]) == 64
    assert qmodel.layers[0]["output_error"] > 0

    before = qframe.evaluate(qmodel, dataset=f"text:{text}", seq_len=32, device="cpu")
    assert before.perplexity > 1 and before.windows >= 4 and before.layers == qmodel.layers

    out = qframe.export(qmodel, backend="qframe", output=tmp_path / "w8a8")
    manifest = json.loads((out / "qframe.json").read_text())
    assert manifest["recipe"]["calibration"]["samples"] == 4
    assert set(manifest["modules"]) == set(qmodel.quantized_modules())
    assert not list(tmp_path.glob(".w8a8.*"))

    same = qframe.load_quantized(out)
    after = qframe.evaluate(same, dataset=f"text:{text}", seq_len=32, device="cpu")
    assert after.perplexity == before.perplexity and after.sha256 == before.sha256


def test_any_plugin_by_kind_and_name():
    calibrator = qframe.calibrators.get("minmax")(qframe.QuantArgs(granularity="tensor"))
    calibrator.observe(torch.tensor([[-3.0, 1.0]]))
    assert [t.item() for t in calibrator.compute()] == [-3.0, 1.0]
    assert "rtn" in qframe.quantizers.names() and "qframe" in qframe.backends.names()
    with pytest.raises(qframe.PluginError, match="unknown quantizer 'nope'; installed: .*rtn"):
        qframe.quantizers.get("nope")


def test_export_refuses_a_foreign_directory(model, tmp_path):
    qmodel = qframe.quantize(model, qframe.load_recipe("recipes/rtn_w4a16.toml"), device="cpu")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(qframe.QFrameError, match="holds what qframe did not write"):
        qframe.export(qmodel, backend="qframe", output=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
