"""Engine builds. TensorRT-LLM cannot be installed here, so a fake ``trtllm-build`` on PATH
(a real executable script) records its command line and fails on request; the tests that need
the real tensorrt_llm are at the end and skip where it is absent."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qframe
from qframe.errors import ExportError, RecipeError
from qframe_plugins.tensorrt_llm.build import parse_build
from qframe_plugins.tensorrt_llm.validate import validate_checkpoint
from qframe.output import RECORD
from qframe.plugins import build_registry

from test_trtllm_export import FP8, quantized, tiny

REGISTRY = build_registry(entry_points=False)

ROOT = Path(__file__).resolve().parents[1]
FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
print("[TRT-LLM] building the engine", flush=True)
status = int(os.environ.get("FAKE_TRTLLM_STATUS", "0"))
output = args[args.index("--output_dir") + 1]
os.makedirs(output, exist_ok=True)
open(os.path.join(output, "rank0.engine"), "w").write("half")  # what a crash leaves behind
if status:
    print("[TRT-LLM] [E] out of memory while building", flush=True)
    sys.exit(status)
open(os.path.join(output, "config.json"), "w").write("{{}}")
"""


@pytest.fixture
def fake_trtllm_build(tmp_path, monkeypatch):
    """A ``trtllm-build`` first on PATH; returns the file its command lines go to."""
    bin_dir, log = tmp_path / "bin", tmp_path / "trtllm-build.log"
    bin_dir.mkdir()
    script = bin_dir / "trtllm-build"
    script.write_text(FAKE.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    return quantized(tiny("llama", torch.float16), FP8, tmp_path_factory.mktemp("fp8"))


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def leftovers(directory: Path) -> list[str]:
    """Hidden entries other than qframe's record of what it wrote."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != RECORD)


def test_the_build_table_becomes_the_exact_command_line(fake_trtllm_build, qmodel, tmp_path, capfd):
    out = tmp_path / "trt"
    build = {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048, "gemm_plugin": "auto",
             "use_paged_context_fmha": True, "remove_input_padding": False, "reduce_fusion": True,
             "kv_cache_type": "paged", "fast_build": True, "strip_plan": False, "workers": 2,
             "extra_args": ["--log_level", "info"]}
    qframe.export(qmodel, "tensorrt-llm", out, options={"tp_size": 2, "build": build})
    (args,) = calls(fake_trtllm_build)
    partial = args[args.index("--output_dir") + 1]
    assert args == ["--checkpoint_dir", str(out.resolve()), "--output_dir", partial, "--max_batch_size", "8",
                    "--max_input_len", "1024", "--max_seq_len", "2048", "--gemm_plugin", "auto",
                    "--use_paged_context_fmha", "enable", "--remove_input_padding", "disable", "--reduce_fusion", "enable",
                    "--kv_cache_type", "paged", "--fast_build", "--workers", "2", "--log_level", "info"]
    assert Path(partial).parent == out.resolve() and Path(partial).name.startswith(".engine.partial-")
    assert sorted(p.name for p in (out / "engine").iterdir()) == [RECORD, "config.json", "rank0.engine"]
    assert leftovers(out) == []
    assert "[TRT-LLM] building the engine" in capfd.readouterr().err  # streamed to the user
    assert validate_checkpoint(out, REGISTRY) == []  # engine/ beside the ranks does not disturb the validator


def test_a_failed_build_says_why_and_leaves_no_engine(fake_trtllm_build, qmodel, tmp_path, monkeypatch):
    out = tmp_path / "trt"
    qframe.export(qmodel, "tensorrt-llm", out, options={"build": "auto"})
    assert (out / "engine" / "config.json").exists()
    monkeypatch.setenv("FAKE_TRTLLM_STATUS", "3")
    with pytest.raises(ExportError) as info:  # the rebuild of a new checkpoint fails
        qframe.export(qmodel, "tensorrt-llm", out, options={"build": {"max_batch_size": 4}})
    message = str(info.value)
    assert "failed with exit status 3" in message and "\n" not in message  # one paragraph
    assert "its last lines: [TRT-LLM] building the engine | [TRT-LLM] [E] out of memory while building." in message
    assert "is written and valid" in message and "--max_batch_size 4" in message
    assert not (out / "engine").exists()  # neither the half-built one nor the stale one
    assert leftovers(out) == []
    assert validate_checkpoint(out, REGISTRY) == []  # the checkpoint itself is kept


def native(qmodel, tmp_path: Path) -> Path:
    return qframe.export(qmodel, "qframe", tmp_path / "native")


def cli(*args, path: str):
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_build_true_without_trtllm_build_is_an_error_with_guidance(qmodel, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    directory = native(qmodel, tmp_path)
    proc = cli("export", str(directory), "--backend", "tensorrt-llm", "--set", "build=true", path=str(empty))
    assert proc.returncode == 2, proc.stderr
    assert "trtllm-build is not on PATH" in proc.stderr
    assert "pip install tensorrt-llm" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert validate_checkpoint(directory / "tensorrt_llm", REGISTRY) == []  # the checkpoint is not lost


def test_build_auto_without_trtllm_build_says_so_and_succeeds(qmodel, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtllm-build anywhere
    out = qframe.export(qmodel, "tensorrt-llm", tmp_path / "trt", options={"build": "auto"})
    err = capfd.readouterr().err
    assert "trtllm-build is not on PATH, so no engine was built" in err and len(err.strip().splitlines()) == 1
    assert not (out / "engine").exists() and validate_checkpoint(out, REGISTRY) == []


def test_the_cli_surfaces_a_failed_build(fake_trtllm_build, qmodel, tmp_path):
    directory = native(qmodel, tmp_path)
    failing = subprocess.run([sys.executable, "-m", "qframe", "export", str(directory), "--backend", "tensorrt-llm",
                              "--set", "build.enabled=true", "--set", "build.max_batch_size=2"], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "FAKE_TRTLLM_STATUS": "7"})
    assert failing.returncode == 2
    assert "[TRT-LLM] building the engine" in failing.stderr  # streamed as it ran
    assert "exit status 7" in failing.stderr and "Traceback" not in failing.stderr
    assert calls(fake_trtllm_build)[-1][-2:] == ["--max_batch_size", "2"]
    assert not (directory / "tensorrt_llm" / "engine").exists()
    assert validate_checkpoint(directory / "tensorrt_llm", REGISTRY) == []


def test_check_available_refuses_build_true_before_any_work(tmp_path, monkeypatch):
    from qframe.errors import QFrameError
    from qframe_plugins.tensorrt_llm.build import check_available

    monkeypatch.setenv("PATH", str(tmp_path))
    check_available(None)
    check_available(parse_build("auto"))
    with pytest.raises(QFrameError, match="build = true, but trtllm-build is not on PATH; install TensorRT-LLM"):
        check_available(parse_build({"enabled": True, "max_batch_size": 8}))


BAD = {
    "unknown option": ({"max_batchsize": 8}, "build.max_batchsize", "unknown trtllm-build option"),
    "wrong type": ({"max_batch_size": "8"}, "build.max_batch_size", "expected an integer"),
    "toggle": ({"context_fmha": "yes"}, "build.context_fmha", "expected true or false"),
    "enabled": ({"enabled": "always"}, "build.enabled", 'expected "auto" or true'),
    "switch": ({"fast_build": "on"}, "build.fast_build", "expected true or false"),
    "kv cache type": ({"kv_cache_type": "pagged"}, "build.kv_cache_type", "expected one of paged, continuous"),
    "scalar": ("sometimes", "build", 'expected false, "auto", true'),
}


@pytest.mark.parametrize("value, key, why", BAD.values(), ids=BAD.keys())
def test_bad_build_options_name_the_key(value, key, why):
    with pytest.raises(RecipeError) as info:
        parse_build(value)
    assert info.value.key == key and why in str(info.value)


def test_a_bad_build_option_fails_the_recipe_before_anything_loads(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 64 }\n'
                      '[export]\nbackend = "tensorrt-llm"\n[export.build]\nmax_seq_len = "long"\n')
    proc = cli("validate", str(recipe), path=os.environ["PATH"])
    assert proc.returncode == 2
    assert "export.build.max_seq_len: 'long' is not valid; expected an integer" in proc.stderr


def test_build_false_and_enabled_false_build_nothing():
    assert parse_build(False) is None and parse_build({"enabled": False, "max_batch_size": 8}) is None
    assert parse_build(True).required and not parse_build({"max_batch_size": 8}).required


# -- with the real TensorRT-LLM (not installable here: these skip) ---------------------------------

needs_tensorrt_llm = pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None,
                                        reason="tensorrt_llm is not installed (it cannot be, on these machines)")


LOADS = [*(("llama", algo, 1, 1) for algo in ("FP8", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL", "W4A8_AWQ", "NVFP4")),
         ("llama", "FP8", 2, 2), ("qwen2", "W4A16_AWQ", 2, 1), ("qwen2", "W8A8_SQ_PER_CHANNEL", 1, 2),
         ("gpt2", "FP8", 2, 1)]


@needs_tensorrt_llm
@pytest.mark.parametrize("family,algo,tp,pp", LOADS)
def test_tensorrt_llm_loads_the_checkpoint(family, algo, tp, pp, tmp_path):
    """TensorRT-LLM's own loader (preprocessing, names, shapes) takes every rank qframe writes."""
    from tensorrt_llm.models import MODEL_MAP, PretrainedConfig

    from test_trtllm_export import AWQ, NVFP4, RECIPES

    text = {**RECIPES, "W4A16_AWQ": AWQ.replace("GROUP", "64"), "NVFP4": NVFP4}[algo]
    if family == "gpt2":  # no key/value projections in GPT-2's adapter: no KV cache stage
        text = text.split('[[stage]]\nquantizer = "kv_cache"')[0]
    qmodel = quantized(tiny(family, torch.float16), text, tmp_path)
    out = qframe.export(qmodel, "tensorrt-llm", tmp_path / "trt", options={"tp_size": tp, "pp_size": pp})
    config = PretrainedConfig.from_json_file(str(out / "config.json"))
    for rank in range(config.mapping.world_size):
        config.set_rank(rank)
        MODEL_MAP[config.architecture].from_checkpoint(str(out), rank=rank, config=config)


@needs_tensorrt_llm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="building an engine needs a GPU")
def test_the_real_trtllm_build_builds_an_engine(qmodel, tmp_path):
    out = qframe.export(qmodel, "tensorrt-llm", tmp_path / "trt",
                        options={"build": {"enabled": True, "max_batch_size": 1, "max_input_len": 16, "max_seq_len": 32}})
    assert any((out / "engine").glob("rank0.engine"))

