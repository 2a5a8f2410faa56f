"""The command line: exit codes, one-paragraph errors without tracebacks, atomic outputs.

Most cases run ``qframe.cli.main(argv)`` in this process (an exception other than the
project's own would surface here as a test error, which is what a traceback is); a few run
the real ``qframe`` console script and ``python -m qframe`` for the process contract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qframe.cli import main

ROOT = Path(__file__).parents[1]
W4A16 = str(ROOT / "recipes" / "rtn_w4a16.toml")
W8A8 = str(ROOT / "recipes" / "rtn_w8a8.toml")


def qframe(*args: str, console_script: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real command in a fresh process."""
    command = [str(Path(sys.executable).with_name("qframe"))] if console_script else [sys.executable, "-m", "qframe"]
    env = {k: v for k, v in os.environ.items() if k != "QFRAME_DISABLE_PLUGINS"}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def error_paragraph(stderr: str, command: str) -> str:
    """The error message qframe printed: asserts it is there, alone in its paragraph, and
    that no traceback was printed."""
    assert "Traceback" not in stderr, stderr
    prefix = f"qframe {command}: error: "
    assert prefix in stderr, stderr
    message = stderr[stderr.index(prefix):].strip()
    assert "\n" not in message, message
    return message[len(prefix):]


def assert_no_output(output: Path) -> None:
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == [], leftovers


@pytest.fixture(autouse=True)
def builtins_only(qframe_registry, monkeypatch):
    """In-process runs see the built-in plugins only, whatever is installed or in $QFRAME_DISABLE_PLUGINS."""
    registry = qframe_registry()
    for module in ("qframe.plugins", "qframe.api"):
        monkeypatch.setattr(f"{module}.default_registry", lambda: registry)


# -- a tiny model on disk with a real tokenizer (tiny_model_dir comes from conftest.py) -----------

@pytest.fixture(params=["truncated", "garbage"])
def corrupt_model_dir(request, tiny_model_dir, tmp_path) -> Path:
    """The tiny model with its weights cut off mid-tensor, or replaced by text."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, folder)
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3] if request.param == "truncated" else b"garbage" * 9)
    return folder


@pytest.fixture
def empty_text(tmp_path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("")
    return path


# -- real processes -----------------------------------------------------------------------------

def test_validate_ok_with_python_m_qframe():
    proc = qframe("validate", W4A16)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{W4A16}: valid (1 stage: rtn; export: qframe)"


def test_bad_recipe_through_the_console_script(tmp_path):
    proc = qframe("validate", W4A16, "--set", "stage.0.weights.bits=9", console_script=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    message = error_paragraph(proc.stderr, "validate")
    assert proc.stderr.strip() == f"qframe validate: error: {message}"
    assert message.startswith(f"{W4A16}: stage[0].weights.bits: 9 is not valid; allowed for int: 2, 3")


def test_apply_with_an_empty_dataset_leaves_nothing_behind(tiny_model_dir, empty_text, tmp_path):
    output = tmp_path / "out"
    proc = qframe("apply", W8A8, "--model", str(tiny_model_dir), "--output", str(output), "--device", "cpu",
                  "--set", f"calibration.dataset=text:{empty_text}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert error_paragraph(proc.stderr, "apply") == f"dataset 'text:{empty_text}' holds no text"
    assert "quantizing" not in proc.stderr  # no progress bar left over from a run that never started
    assert_no_output(output)


# -- in process: qframe validate ---------------------------------------------------------------

@pytest.fixture
def recipe_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "recipe.toml"
        path.write_text(text)
        return str(path)

    return write


VALIDATE_ERRORS = {
    # case: (recipe text, --set overrides, what the message says after the file name)
    "unknown quantizer": ("[[stage]]\nquantizer = 'hqq'\nweights = { bits = 4 }\n", [],
                          ": stage[0].quantizer: 'hqq' is not valid; unknown quantizer; installed: "),
    "bits=9": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4 }\n", ["stage.0.weights.bits=9"],
               ": stage[0].weights.bits: 9 is not valid; allowed for int: 2, 3, 4, 5, 6, 7, 8"),
    "malformed TOML": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = \n", [], ": malformed TOML: "),
    "bad --set index": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4 }\n", ["stage.3.weights.bits=4"],
                        " (--set): stage.3: '3' is not valid; no such stage; the recipe has 1"),
    "unknown dataset param": ("[calibration]\ndataset = 'text:x?foo=1'\n[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4 }\n",
                              [], ": calibration.dataset: 'text:x?foo=1' is not valid; source 'text' takes no parameter 'foo'"),
}


@pytest.mark.parametrize("text, overrides, expected", VALIDATE_ERRORS.values(), ids=VALIDATE_ERRORS.keys())
def test_validate_errors_exit_2_with_one_paragraph(recipe_file, capsys, text, overrides, expected):
    path = recipe_file(text)
    assert main(["validate", path] + [arg for o in overrides for arg in ("--set", o)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    message = error_paragraph(err, "validate")
    assert message.startswith(f"{path}{expected}"), message


def test_set_without_equals(recipe_file, capsys):
    path = recipe_file("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4 }\n")
    assert main(["validate", path, "--set", "stage.0.weights.bits"]) == 2
    assert error_paragraph(capsys.readouterr().err, "validate") == (
        "--set 'stage.0.weights.bits': expected KEY=VALUE, e.g. stage.0.weights.group_size=64")


def test_validate_missing_recipe(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.toml")]) == 2
    assert error_paragraph(capsys.readouterr().err, "validate") == f"recipe {str(tmp_path / 'nope.toml')!r} does not exist"


def test_bad_arguments_exit_2_through_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["apply"])
    assert info.value.code == 2
    assert "the following arguments are required: recipe" in capsys.readouterr().err


# -- in process: qframe apply --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["unknown quantizer", "bits=9", "missing model", "malformed TOML",
                                  "output is someone else's folder"])
def test_apply_bad_input_exits_2_and_writes_nothing(case, tiny_model_dir, tmp_path, recipe_file, capsys):
    output = tmp_path / "out"
    recipe, model, overrides = W4A16, str(tiny_model_dir), []
    if case == "unknown quantizer":
        overrides, expected = ["stage.0.quantizer=hqq"], "stage[0].quantizer: 'hqq' is not valid; unknown quantizer"
    elif case == "bits=9":
        overrides, expected = ["stage.0.weights.bits=9"], "stage[0].weights.bits: 9 is not valid"
    elif case == "missing model":
        model = str(tmp_path / "no-such-model")
        expected = f"model path {model!r} does not exist"
    elif case == "malformed TOML":
        recipe, expected = recipe_file("[[stage]\n"), "malformed TOML"
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine")
        expected = "holds what qframe did not write"
    argv = ["apply", recipe, "--model", model, "--output", str(output), "--device", "cpu"]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 2
    assert expected in error_paragraph(capsys.readouterr().err, "apply")
    if case == "output is someone else's folder":
        assert [p.name for p in output.iterdir()] == ["notes.txt"]
        output = tmp_path / "never-created"
    assert_no_output(output)


def test_apply_corrupt_safetensors(corrupt_model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(["apply", W4A16, "--model", str(corrupt_model_dir), "--output", str(output), "--device", "cpu"])
    assert code == 2
    message = error_paragraph(capsys.readouterr().err, "apply")
    # Streamed (a local folder is read a layer at a time): the file it cannot read is named.
    assert message.startswith(f"cannot read {str(corrupt_model_dir / 'model.safetensors')!r}: "), message
    assert "Error while deserializing header" in message
    assert_no_output(output)


def test_apply_model_without_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert main(["apply", W4A16, "--model", str(tmp_path / "model"), "--output", str(tmp_path / "out")]) == 2
    assert "has no config.json" in error_paragraph(capsys.readouterr().err, "apply")
    assert_no_output(tmp_path / "out")


def test_dry_run_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["apply", W8A8, "--model", str(tiny_model_dir), "--dry-run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dry_run"] is True and summary["needs_calibration_data"] is True
    assert summary["recipe"]["stage"][0]["quantizer"] == "rtn"
    assert main(["apply", W4A16, "--model", str(tiny_model_dir), "--output", "elsewhere", "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_apply_writes_the_output_atomically(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["apply", W4A16, "--model", str(tiny_model_dir), "--output", str(output), "--device", "cpu", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(output) and summary["modules"] == 14
    assert (output / "qframe.json").is_file() and (output / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- in process: qframe plugins -------------------------------------------------------------------

def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"plugins", "failures"}
    rows = {(r["kind"], r["name"]): r for r in listing["plugins"]}
    assert rows[("quantizer", "rtn")]["provider"] == "qframe_plugins.rtn"
    assert all(set(r) == {"kind", "name", "summary", "provider", "distribution"} for r in listing["plugins"])


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "minmax" in out and "rtn" in out


def test_plugin_text_is_printed_verbatim_not_as_markup(qframe_registry, monkeypatch, capsys):
    import qframe

    class Odd:
        @qframe.hookimpl
        def qframe_quantizers():
            yield qframe.QuantizerPlugin(name="odd", summary="int4 [beta]", factory=dict)

        @qframe.hookimpl
        def qframe_backends():
            raise RuntimeError("no engine at /opt/[/trt]")
            yield  # pragma: no cover

    registry = qframe_registry(Odd, builtins=False, strict=False)
    monkeypatch.setattr("qframe.plugins.default_registry", lambda: registry)
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "int4 [beta]" in out
    assert ('warning: Error importing plugin "Odd" (from inline): qframe_backends: RuntimeError: no engine at /opt/[/trt]'
            in " ".join(err.split()))  # rich wraps long lines
