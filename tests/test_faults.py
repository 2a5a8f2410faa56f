"""Kills and races with real processes and real signals (issue 10): SIGKILL and SIGTERM at
each moment of a run into an output that already holds a previous result, and two runs into
one output. Whatever happens, the previous output survives whole or the new one is in place
complete, nothing partial looks finished, and the next run cleans what a kill left (a run
stopped by SIGTERM after it finished a layer keeps its hidden partial output, to be resumed).

A run stops at a named moment through ``QFRAME_PAUSE_AT`` (:mod:`qframe.faults`): it says so on
stderr and waits for a signal. All processes of the matrix run at once to save time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qframe
from qframe import output
from qframe.cli import main
from qframe.run import RECORD as RESUME_RECORD

ROOT = Path(__file__).parents[1]
W4A16 = str(ROOT / "recipes" / "rtn_w4a16.toml")
GROUP = "stage.0.weights.group_size=64"
MOMENTS = ("load", "calibrate", "write", "rename", "after-rename")
SIGNALS = (signal.SIGKILL, signal.SIGTERM)


def snapshot(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass
class Run:
    """A real ``python -m qframe apply`` process, paused at ``moment``."""

    moment: str
    out: Path
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    paused: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, model: Path, out: Path, moment: str) -> "Run":
        env = {**os.environ, "QFRAME_PAUSE_AT": moment, "PYTHONUNBUFFERED": "1"}
        env.pop("QFRAME_DISABLE_PLUGINS", None)
        args = [sys.executable, "-m", "qframe", "apply", W4A16, "--model", str(model), "--output", str(out),
                "--device", "cpu", "--set", GROUP]
        run = cls(moment, out, subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                                env=env))
        threading.Thread(target=run._read, daemon=True).start()
        return run

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith(f"qframe: paused at {self.moment}"):
                self.paused.set()

    def wait_paused(self, timeout: float = 240) -> None:
        if not self.paused.wait(timeout):
            self.process.kill()
            pytest.fail(f"never reached {self.moment}: {''.join(self.lines)[-2000:]}")

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        time.sleep(0.05)  # let the reader take the last lines
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def previous(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("previous") / "out"
    assert main(["apply", W4A16, "--model", str(tiny_model_dir), "--output", str(out), "--device", "cpu",
                 "--set", GROUP]) == 0
    return out


def test_kills_at_every_moment_and_two_runs_into_one_output(tiny_model_dir, previous, tmp_path, capsys):
    before = snapshot(previous)
    cases = {}
    for moment in MOMENTS:
        for sig in SIGNALS:
            folder = tmp_path / f"{moment}-{sig.name}"
            folder.mkdir()
            shutil.copytree(previous, folder / "out")
            cases[(moment, sig)] = Run.start(tiny_model_dir, folder / "out", moment)
    (tmp_path / "race").mkdir()
    shutil.copytree(previous, tmp_path / "race" / "out")
    first = Run.start(tiny_model_dir, tmp_path / "race" / "out", "rename")

    # Two runs into one output: the second is refused while the first holds the path.
    first.wait_paused()
    capsys.readouterr()
    assert main(["apply", W4A16, "--model", str(tiny_model_dir), "--output", str(first.out), "--device", "cpu",
                 "--set", GROUP]) == 2
    err = capsys.readouterr().err
    assert f"another qframe run (process {first.process.pid}) is writing" in err and "Traceback" not in err
    first.process.send_signal(signal.SIGUSR1)
    assert first.finish() == 0, first.stderr
    assert output.unproven(first.out) == [] and snapshot(first.out) != before
    assert sorted(p.name for p in first.out.parent.iterdir()) == ["out"]

    matrix = {}
    for (moment, sig), run in cases.items():
        run.wait_paused()
        run.process.send_signal(sig)
        code = run.finish()
        assert "Traceback" not in run.stderr, run.stderr
        if sig == signal.SIGTERM:
            assert code == 143 and "qframe: terminated" in run.stderr, (moment, code, run.stderr)
        else:
            assert code == -signal.SIGKILL
        # The path holds a whole output: the previous one, or (killed once it was in place) the new one.
        replaced = moment == "after-rename"
        assert output.unproven(run.out) == [], (moment, sig.name)
        assert (snapshot(run.out) != before) if replaced else (snapshot(run.out) == before), (moment, sig.name)
        qframe.load_quantized(run.out)
        # Nothing partial looks finished: beside it, only hidden, marked leftovers of a SIGKILL.
        beside = [p for p in run.out.parent.iterdir() if p != run.out]
        assert all(p.name.startswith(".out.") for p in beside), beside
        if sig == signal.SIGTERM and moment in ("calibrate", "write"):
            # Layers were finished: the partial output stays, resumable (qframe apply --resume).
            assert len(beside) == 1 and (beside[0] / RESUME_RECORD).is_file(), (moment, beside)
            assert "the same command with --resume continues" in run.stderr
        elif sig == signal.SIGTERM:
            assert beside == [], (moment, beside)
        matrix[(moment, sig.name)] = ("new" if replaced else "previous", len(beside))
        # The next run cleans what a kill left and replaces the output.
        assert main(["apply", W4A16, "--model", str(tiny_model_dir), "--output", str(run.out), "--device", "cpu",
                     "--set", GROUP]) == 0
        assert sorted(p.name for p in run.out.parent.iterdir()) == ["out"]
    print("fault matrix (moment, signal) -> (what the path holds, leftovers beside it):", matrix)
