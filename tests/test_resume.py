"""Resuming an interrupted ``qframe apply`` (issue 13): a real process running GPTQ is killed
with SIGKILL at three points — during layer 0 (quantized, not yet written), in the middle (layer
0 written, layer 1 not begun), and while the export backend writes — and ``--resume`` then
finishes the run with the bytes an uninterrupted run writes. A resume with another recipe,
model or data is refused, naming what differs, and loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qframe.cli import main
from qframe.run import RECORD

ROOT = Path(__file__).parents[1]
GPTQ = str(ROOT / "recipes" / "gptq_w4a16.toml")
DATA = ['calibration.dataset="text:' + str(ROOT / "README.md") + '"', "calibration.samples=4", "calibration.seq_len=48",
        'export.backend="tensorrt-llm"']


def args(model: Path, out: Path, *extra: str) -> list[str]:
    sets = [x for item in DATA for x in ("--set", item)]
    return ["apply", GPTQ, "--model", str(model), "--output", str(out), "--device", "cpu", *sets, *extra]


def files(directory: Path) -> dict[str, str]:
    """Every file's SHA-256, but the manifest (its timings differ from run to run) and the seal."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in ("qframe.json", ".qframe-files.json")}


def manifest(directory: Path) -> dict:
    """The manifest without what depends on the clock (timings, seconds anywhere)."""
    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k not in ("timings", "seconds")}
        return [timeless(v) for v in value] if isinstance(value, list) else value

    return timeless(json.loads((directory / "qframe.json").read_text()))


def killed_at(moment: str, model: Path, out: Path) -> None:
    """Run ``qframe apply`` in a process of its own until it reaches ``moment``; SIGKILL it there."""
    env = {**os.environ, "QFRAME_PAUSE_AT": moment, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "qframe", *args(model, out)], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, env=env)
    paused, lines = threading.Event(), []

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if line.startswith(f"qframe: paused at {moment}"):
                paused.set()

    threading.Thread(target=read, daemon=True).start()
    if not paused.wait(240):
        process.kill()
        pytest.fail(f"never reached {moment}: {''.join(lines)[-2000:]}")
    process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(args(tiny_model_dir, out)) == 0
    return out


@pytest.mark.parametrize("moment, done", [("layer", 0), ("calibrate", 1), ("export", 2)])
def test_kill_9_then_resume_is_byte_identical(tiny_model_dir, uninterrupted, tmp_path, moment, done, capsys):
    out = tmp_path / "out"
    killed_at(moment, tiny_model_dir, out)
    assert not out.exists()  # nothing partial looks finished
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    record = partial / RECORD
    assert (json.loads(record.read_text())["done"] if record.is_file() else 0) == done
    assert main(args(tiny_model_dir, out, "--resume")) == 0
    assert files(out) == files(uninterrupted)
    assert manifest(out) == manifest(uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / RECORD).exists() and not (out / ".qframe-spool").exists()


def test_resume_with_another_recipe_is_refused_and_loses_nothing(tiny_model_dir, uninterrupted, tmp_path, capsys):
    out = tmp_path / "out"
    killed_at("calibrate", tiny_model_dir, out)
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    capsys.readouterr()
    assert main(args(tiny_model_dir, out, "--resume", "--set", "stage.0.options.dampening=0.02")) == 2
    err = capsys.readouterr().err
    assert "the recipe differs from the interrupted run's" in err and "Traceback" not in err
    assert not out.exists()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert json.loads((kept / RECORD).read_text())["done"] == 1
    assert main(args(tiny_model_dir, out, "--resume")) == 0  # the right command still continues it
    assert files(out) == files(uninterrupted)


def test_resume_with_nothing_to_resume_starts_afresh(tiny_model_dir, uninterrupted, tmp_path):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, out, "--resume")) == 0
    assert files(out) == files(uninterrupted)
