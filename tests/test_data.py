"""Dataset specs to token windows, with a real tokenizer (SmolLM2's, from its GGUF)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from qframe.data import DataContext, calibration_windows, evaluation_windows, parse_spec
from qframe.errors import DataError, RecipeError
from qframe.plugins import build_registry

PROSE = "Give me the liberty to know, to utter, and to argue freely according to conscience, above all liberties. " * 20


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def ctx(tokenizer, **kw):
    return DataContext(tokenizer, **{"samples": 4, "seq_len": 16, **kw})


def test_text_file_and_folder(tmp_path, tokenizer, registry):
    (tmp_path / "a.txt").write_text(PROSE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(PROSE.upper())
    one = calibration_windows(f"text:{tmp_path / 'a.txt'}", ctx(tokenizer), registry)
    both = calibration_windows(f"text:{tmp_path}", ctx(tokenizer), registry)
    assert one.ids.shape == both.ids.shape == (4, 16)
    assert one.sha256 != both.sha256


def test_windows_are_seeded(tmp_path, tokenizer, registry):
    (tmp_path / "a.txt").write_text(PROSE)
    spec = f"text:{tmp_path / 'a.txt'}"
    first = calibration_windows(spec, ctx(tokenizer, seed=1), registry)
    again = calibration_windows(spec, ctx(tokenizer, seed=1), registry)
    other = calibration_windows(spec, ctx(tokenizer, seed=2), registry)
    assert torch.equal(first.ids, again.ids) and first.sha256 == again.sha256
    assert first.sha256 != other.sha256


def test_evaluation_windows_are_consecutive(tmp_path, tokenizer, registry):
    (tmp_path / "a.txt").write_text(PROSE)
    stream = tokenizer(PROSE, add_special_tokens=False)["input_ids"]
    windows = evaluation_windows(f"text:{tmp_path / 'a.txt'}", ctx(tokenizer), registry, samples=3)
    assert windows.ids.flatten().tolist() == stream[: 3 * 16]


def test_jsonl_field(tmp_path, tokenizer, registry):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"content": PROSE, "n": i}) for i in range(2)) + "\n")
    windows = calibration_windows(f"jsonl:{path}?field=content", ctx(tokenizer), registry)
    assert windows.ids.shape == (4, 16)
    with pytest.raises(DataError, match="no field 'text'"):
        calibration_windows(f"jsonl:{path}", ctx(tokenizer), registry)
    path.write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        calibration_windows(f"jsonl:{path}", ctx(tokenizer), registry)


def test_hf_local_folder(tmp_path, tokenizer, registry):
    pytest.importorskip("datasets")  # an optional extra; CI installs it with [test]
    (tmp_path / "train.jsonl").write_text(json.dumps({"body": PROSE}) + "\n")
    windows = calibration_windows(f"hf:{tmp_path}?split=train&field=body", ctx(tokenizer), registry)
    assert windows.ids.shape == (4, 16)
    with pytest.raises(DataError, match="no column 'text'"):
        calibration_windows(f"hf:{tmp_path}?split=train", ctx(tokenizer), registry)


def test_bad_specs(tmp_path, tokenizer, registry):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        calibration_windows(f"text:{empty}", ctx(tokenizer), registry)
    with pytest.raises(DataError, match="no such file"):
        calibration_windows(f"text:{tmp_path / 'missing.txt'}", ctx(tokenizer), registry)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(f"text:{short}", ctx(tokenizer), registry)
    with pytest.raises(RecipeError, match="unknown source 'parquet'"):
        parse_spec("parquet:x", registry)
    with pytest.raises(RecipeError, match="allowed: field"):
        parse_spec("jsonl:x.jsonl?column=a", registry)
    assert parse_spec("generated", registry).source == "generated"


def test_generated_needs_no_data(tokenizer, registry):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)).eval()
    first = calibration_windows("generated", ctx(tokenizer, model=model, samples=2, seq_len=8), registry)
    again = calibration_windows("generated", ctx(tokenizer, model=model, samples=2, seq_len=8), registry)
    assert first.ids.shape == (2, 8)
    assert first.sha256 == again.sha256  # seeded
