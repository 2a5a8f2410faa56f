"""Output directories: qframe replaces only what it can prove it wrote, one run at a time, and
the path always holds a complete output (issue 10, defects 1, 3, 5, 6 and 7's output paths).

Runs are in process (``qframe.cli.main``); the kill and concurrency matrix with real
processes and signals is in test_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import qframe
from qframe import output
from qframe.cli import main

ROOT = Path(__file__).parents[1]
W4A16 = str(ROOT / "recipes" / "rtn_w4a16.toml")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` (hidden ones too) with its SHA-256."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_paragraph_error(capsys, command: str = "apply") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    prefix = f"qframe {command}: error: "
    assert prefix in err, err
    message = err[err.index(prefix) + len(prefix):].strip()
    assert "\n" not in message, message
    return message


def apply(model: Path, out: Path, *extra: str) -> int:
    return main(["apply", W4A16, "--model", str(model), "--output", str(out), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """A complete qframe output with an hf export beside it (written once; tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert apply(tiny_model_dir, out, "--set", "stage.0.weights.group_size=64") == 0
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "out"
    shutil.copytree(finished, target)
    return target


# -- defect 1: a marker file name is not proof -------------------------------------------------------

@pytest.mark.parametrize("marker", ["qframe.json", "hf_quant_config.json", "tensorrt-llm"])
def test_a_directory_that_only_looks_like_an_output_is_never_replaced(marker, tiny_model_dir, tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    if marker == "tensorrt-llm":
        (proj / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
        (proj / "rank0.safetensors").write_bytes(b"x")
    else:
        (proj / marker).write_text("{}")
    (proj / "thesis.tex").write_text("four years of work")
    before = snapshot(proj)
    assert apply(tiny_model_dir, proj) == 2
    message = one_paragraph_error(capsys)
    assert "thesis.tex (not written by qframe)" in message and "choose another --output" in message
    assert snapshot(proj) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no partial, no lock left


# -- defect 3: what a user added to, or changed in, a qframe output ---------------------------------

def test_a_qframe_output_is_replaced_with_its_sealed_exports(finished, tiny_model_dir, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert main(["export", str(out), "--backend", "hf"]) == 0  # DIR/hf: sealed on its own
    assert output.unproven(out) == []
    assert apply(tiny_model_dir, out) == 0
    assert (out / output.RECORD).is_file() and not (out / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("change", ["added note", "edited config", "removed tokenizer", "file in the export",
                                    "link"])
def test_a_changed_qframe_output_is_kept(change, finished, tiny_model_dir, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    if change == "added note":
        (out / "eval-notes.md").write_text("perplexity 12.3")
        expected = "eval-notes.md (not written by qframe)"
    elif change == "edited config":
        text = (out / "config.json").read_text()  # the same size: the hash tells
        (out / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": 65'))
        assert len(text) == len((out / "config.json").read_text()) and "65" in (out / "config.json").read_text()
        expected = "config.json (changed since qframe wrote it)"
    elif change == "removed tokenizer":
        (out / "tokenizer.json").unlink()
        expected = "tokenizer.json (listed by qframe but missing)"
    elif change == "file in the export":
        assert main(["export", str(out), "--backend", "hf"]) == 0
        (out / "hf" / "README.md").write_text("model card")
        expected = "hf/README.md (not written by qframe)"
    else:
        (out / "data").symlink_to(tmp_path)
        expected = "data (a link qframe did not make)"
    capsys.readouterr()
    before = snapshot(out)
    assert apply(tiny_model_dir, out) == 2
    assert expected in one_paragraph_error(capsys)
    assert snapshot(out) == before


def test_export_never_replaces_its_own_source(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    assert main(["export", str(out), "--backend", "hf", "--output", str(out)]) == 2
    assert "which this run reads" in one_paragraph_error(capsys, "export")
    assert main(["export", str(out), "--backend", "hf", "--output", str(tmp_path)]) == 2  # its parent
    assert "which this run reads" in one_paragraph_error(capsys, "export")
    assert snapshot(out) == before


def test_apply_never_writes_over_its_model(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = snapshot(model)
    for target in (model, tmp_path):
        assert apply(model, target) == 2
        assert "which this run reads" in one_paragraph_error(capsys)
    assert snapshot(model) == before


# -- defect 7: output paths that cannot be written ---------------------------------------------------

@pytest.mark.parametrize("case", ["through a file", "a file", "a root"])
def test_unwritable_output_paths_exit_2(case, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    target = {"through a file": tmp_path / "notes.txt" / "out", "a file": tmp_path / "notes.txt",
              "a root": Path("/")}[case]
    assert apply(tiny_model_dir, target) == 2
    message = one_paragraph_error(capsys)
    assert {"through a file": "which is a file", "a file": "is a file, not a directory",
            "a root": "file system root"}[case] in message
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_exits_2(tiny_model_dir, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    assert apply(tiny_model_dir, parent / "out") == 2
    assert "choose another --output" in one_paragraph_error(capsys)


def test_export_output_through_a_file_exits_2(finished, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["export", str(finished), "--backend", "hf", "--output", str(tmp_path / "f" / "hf")]) == 2
    assert "which is a file" in one_paragraph_error(capsys, "export")


# -- defect 5: one writer per path -------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_holds_the_path(tmp_path):
    target = tmp_path / "out"
    with output.writing(target) as first:
        (first / "a.txt").write_text("first")
        with pytest.raises(qframe.QFrameError, match=r"another qframe run \(process \d+\) is writing"):
            with output.writing(target):
                pass
    assert (target / "a.txt").read_text() == "first"
    with output.writing(target) as second:  # the lock was let go
        (second / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- defect 6: the path is never empty; leftovers of dead runs ----------------------------------------

def test_a_failed_run_leaves_the_previous_output_whole(tmp_path):
    target = tmp_path / "out"
    with output.writing(target) as tmp:
        (tmp / "a.txt").write_text("old")
    before = snapshot(target)
    with pytest.raises(RuntimeError):
        with output.writing(target) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise RuntimeError("died mid-write")
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_dead_runs_are_cleaned_and_foreign_look_alikes_kept(tmp_path, capsys):
    target = tmp_path / "out"
    dead = tmp_path / ".out.partial-999999"  # what SIGKILL leaves
    dead.mkdir()
    (dead / output.MARKER).write_text(f"{output.SIGNATURE}\n999999\n")
    (dead / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / ".out.partial-123"  # the user's own, by coincidence of name: no marker
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with output.writing(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert not dead.exists() and (mine / "keep.txt").read_text() == "mine"
    assert "removed 1 partial output(s) of interrupted runs" in capsys.readouterr().err


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_repaired(tmp_path, monkeypatch):
    """Where the file system cannot exchange two directories, the replace takes two renames; a
    run killed between them leaves the old output aside, marked, and the next run puts it back
    before it does anything else."""
    target = tmp_path / "out"
    with output.writing(target) as tmp:
        (tmp / "a.txt").write_text("old")
    before = snapshot(target)

    class Killed(BaseException):
        pass

    def reach(moment: str) -> None:
        if moment == "between-renames":
            raise Killed

    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    monkeypatch.setattr("qframe.faults.reach", reach)
    with pytest.raises(Killed):
        with output.writing(target) as tmp:
            (tmp / "a.txt").write_text("new")
    assert not target.exists()  # the window the atomic exchange closes
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        with output.writing(target):
            assert snapshot(target) == {**before, output.RECORD: snapshot(target)[output.RECORD]}
            raise RuntimeError("only looking")
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_exchange_swaps_directories_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not output._exchange(a, b):
        pytest.skip("this file system cannot exchange directories; the two-rename fallback is tested above")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# -- strict JSON ---------------------------------------------------------------------------------------

def test_json_is_strict():
    with pytest.raises(qframe.QFrameError, match=r"not finite at layers\[1\]\.output_error"):
        output.strict_dumps({"layers": [{"output_error": 0.1}, {"output_error": float("nan")}]}, "the manifest")
    assert json.loads(output.strict_dumps({"x": [1.5, None]}, "x")) == {"x": [1.5, None]}


def test_the_manifest_and_record_are_strict_json(finished):
    for name in ("qframe.json", output.RECORD):
        json.loads((finished / name).read_text(), parse_constant=lambda c: pytest.fail(f"{name} holds {c}"))
