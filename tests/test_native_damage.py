"""A damaged native checkpoint is exit 2 naming what is wrong, for ``export`` and ``eval``,
and allocates nothing for sizes it does not hold (issue 10, defect 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qframe.cli import main

ROOT = Path(__file__).parents[1]
W4A16 = str(ROOT / "recipes" / "rtn_w4a16.toml")
LINEAR = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def native(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "out"
    assert main(["apply", W4A16, "--model", str(tiny_model_dir), "--output", str(out), "--device", "cpu",
                 "--set", "stage.0.weights.group_size=64"]) == 0
    return out


def _manifest(edit):
    def damage(directory: Path) -> None:
        path = directory / "qframe.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return damage


def _tensors(edit):
    def damage(directory: Path) -> None:
        tensors = load_file(str(directory / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(directory / "model.safetensors"))
    return damage


def _config(key, value):
    def damage(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config[key] = value
        (directory / "config.json").write_text(json.dumps(config))
    return damage


DAMAGE = {
    "no modules": (_manifest(lambda m: m.pop("modules")), "modules: expected a table"),
    "no dtype": (_manifest(lambda m: m.pop("dtype")), "dtype: expected float32"),
    "modules is a list": (_manifest(lambda m: m.update(modules=[1])), "modules: expected a table"),
    "in_features a string": (_manifest(lambda m: m["modules"][LINEAR].update(in_features="64")),
                             "in_features: expected a positive integer"),
    "absurd in_features": (_manifest(lambda m: m["modules"][LINEAR].update(in_features=10**12)),
                           "the model's config has no such linear there"),
    "unknown module": (_manifest(lambda m: m["modules"].update({"model.nowhere": m["modules"][LINEAR]})),
                       "modules['model.nowhere']"),
    "weights a number": (_manifest(lambda m: m["modules"][LINEAR].update(weights=5)), "expected a table of QuantArgs"),
    "bits 9": (_manifest(lambda m: m["modules"][LINEAR]["weights"].update(bits=9)), "weights: bits: 9 is not valid"),
    "unknown QuantArgs key": (_manifest(lambda m: m["modules"][LINEAR]["weights"].update(colour=1)), "colour"),
    "tied a list": (_manifest(lambda m: m.update(tied=["x"])), "tied: expected a table"),
    "NaN literal": (lambda d: (d / "qframe.json").write_text('{"format": NaN}'), "NaN is not JSON"),
    "nested 100000 deep": (lambda d: (d / "qframe.json").write_text("[" * 100_000 + "]" * 100_000),
                           "unreadable manifest"),
    "not UTF-8": (lambda d: (d / "qframe.json").write_bytes(b"\xff\xfe{"), "unreadable manifest"),
    "absurd hidden size": (_config("hidden_size", 10**9), "config.json"),
    "codes cut short": (_tensors(lambda t: t.update({f"{LINEAR}.weight_packed": t[f"{LINEAR}.weight_packed"][:3]})),
                        f"{LINEAR}.weight_packed"),
    "codes missing": (_tensors(lambda t: t.pop(f"{LINEAR}.weight_packed")), f"missing {LINEAR}.weight_packed"),
    "a NaN scale": (_tensors(lambda t: t[f"{LINEAR}.weight_scale"].view(-1)[0].fill_(float("nan"))),
                    "hold NaN or infinity"),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 9), "not a readable safetensors"),
    "an extra tensor": (_tensors(lambda t: t.update(stray=torch.zeros(2))), "unexpected ['stray']"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_native_checkpoint_exits_2_naming_it(case, native, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(native, damaged)
    damage, expected = DAMAGE[case]
    damage(damaged)
    capsys.readouterr()
    out = tmp_path / "hf"
    for argv, command in ((["export", str(damaged), "--backend", "hf", "--output", str(out)], "export"),
                          (["eval", str(damaged), "--samples", "1", "--seq-len", "8"], "eval")):
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert "Traceback" not in err
        message = err[err.index(f"qframe {command}: error: "):].strip()
        assert "\n" not in message and len(message) < 1500, message
        assert expected in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]
