"""The TensorRT-LLM checkpoint validator: it accepts what qframe and modelopt write (the
modelopt side is in test_trtllm_export.py, beside the comparison) and names each problem of a
corrupted checkpoint; ``qframe validate DIR`` exits 0 or 2 accordingly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qframe_plugins.tensorrt_llm.validate import expected_tensors, recognizes, validate_checkpoint

from test_trtllm_export import AWQ, FP8, NVFP4, SMOOTHQUANT, quantized, tiny, write

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """qframe's checkpoints of tiny fp16 models across algorithms, families and mappings."""
    folder = tmp_path_factory.mktemp("trt-valid")
    cases = {
        "llama-fp8-kv-tp2": ("llama", FP8, {"tp_size": 2}),
        "llama-awq64-pp2": ("llama", AWQ.replace("GROUP", "64"), {"pp_size": 2}),
        "qwen2-sq-int8kv-tp4": ("qwen2", SMOOTHQUANT, {"tp_size": 4}),
        "gpt2-nvfp4-tp2": ("gpt2", NVFP4, {"tp_size": 2}),
    }
    return {name: write(quantized(tiny(family, torch.float16), text, folder), folder / name, **options)
            for name, (family, text, options) in cases.items()}


def test_qframes_checkpoints_are_valid(checkpoints):
    for name, directory in checkpoints.items():
        assert recognizes(directory)
        assert validate_checkpoint(directory) == [], name


def test_kv_heads_are_repeated_when_fewer_than_ranks():
    config = {"architecture": "Qwen2ForCausalLM", "dtype": "bfloat16", "hidden_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 250,
              "mapping": {"world_size": 4, "tp_size": 4, "pp_size": 1}, "quantization": None}
    expected = expected_tensors(config, 3)
    assert expected["transformer.layers.0.attention.qkv.weight"][0] == ((1 + 2) * 32, 128)  # one q, one k, one v head
    assert expected["transformer.layers.0.attention.qkv.bias"][0] == (96,)
    assert expected["lm_head.weight"][0] == (63, 128)  # 250 rows padded to 252, split four ways
    assert "transformer.layers.0.attention.dense.bias" not in expected


def corrupt(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    edit(target)
    return target


def edit_tensors(rank: str, change):
    def edit(directory: Path) -> None:
        path = directory / rank
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
    return edit


def edit_config(change):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
    return edit


QKV = "transformer.layers.0.attention.qkv"
CORRUPTIONS = {
    "missing tensor": (edit_tensors("rank1.safetensors", lambda t: t.pop(f"{QKV}.weights_scaling_factor")),
                       f"rank1.safetensors: {QKV}.weights_scaling_factor: missing"),
    "wrong shape": (edit_tensors("rank0.safetensors", lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"][:-1]})),
                    f"rank0.safetensors: {QKV}.weight: shape"),
    "wrong dtype": (edit_tensors("rank0.safetensors", lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"].half()})),
                    f"{QKV}.weight: dtype float16, expected float8_e4m3fn"),
    "NaN scale": (edit_tensors("rank0.safetensors",
                               lambda t: t.update({f"{QKV}.activation_scaling_factor": torch.tensor([float("nan")])})),
                  f"{QKV}.activation_scaling_factor: holds NaN or inf"),
    "zero scale": (edit_tensors("rank0.safetensors",
                                lambda t: t.update({f"{QKV}.weights_scaling_factor": torch.tensor([0.0])})),
                   "holds scales that are not positive"),
    "extra tensor": (edit_tensors("rank0.safetensors", lambda t: t.update({"transformer.extra": torch.ones(1)})),
                     "transformer.extra: unexpected tensor"),
    "missing rank file": (lambda d: (d / "rank1.safetensors").unlink(), "rank1.safetensors: missing"),
    "world size": (edit_config(lambda c: c["mapping"].update(world_size=4)), "world_size 4 is not tp_size x pp_size"),
    "mapping key": (edit_config(lambda c: c["mapping"].update(rank=0)), "takes exactly world_size, tp_size and pp_size"),
    "unknown quantization key": (edit_config(lambda c: c["quantization"].update(sq_alpha=0.5)),
                                 "quantization.sq_alpha: unknown key"),
    "exclude_modules missing": (edit_config(lambda c: c["quantization"].pop("exclude_modules")),
                                "write an explicit list"),
    "lm_head not excluded": (edit_config(lambda c: c["quantization"].update(exclude_modules=[])),
                             "exclude_modules does not cover lm_head"),
    "architecture": (edit_config(lambda c: c.update(architecture="FalconForCausalLM")), "architecture 'FalconForCausalLM'"),
    "heads": (edit_config(lambda c: c.update(num_attention_heads=3)), "3 attention heads do not split across tp_size 2"),
}


@pytest.mark.parametrize("edit, needle", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_each_problem_is_named(checkpoints, tmp_path, edit, needle):
    broken = corrupt(checkpoints["llama-fp8-kv-tp2"], tmp_path / "broken", edit)
    problems = validate_checkpoint(broken)
    assert any(needle in p for p in problems), problems


def test_awq_group_size_must_be_one_tensorrt_llm_has(checkpoints, tmp_path):
    broken = corrupt(checkpoints["llama-awq64-pp2"], tmp_path / "g32",
                     edit_config(lambda c: c["quantization"].update(group_size=32)))
    assert any("group_size 32 for W4A16_AWQ, expected 64 or 128" in p for p in validate_checkpoint(broken))


def qframe(*args):
    return subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=ROOT)


def test_qframe_validate_on_the_command_line(checkpoints, tmp_path):
    good = qframe("validate", str(checkpoints["gpt2-nvfp4-tp2"]))
    assert good.returncode == 0, good.stderr
    assert "valid tensorrt-llm checkpoint" in good.stdout

    broken = corrupt(checkpoints["llama-fp8-kv-tp2"], tmp_path / "broken",
                     lambda d: (d / "rank1.safetensors").unlink())
    bad = qframe("validate", str(broken))
    assert bad.returncode == 2
    assert "rank1.safetensors: missing" in bad.stdout
    assert "NOT a valid tensorrt-llm checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr

    unknown = qframe("validate", str(tmp_path))
    assert unknown.returncode == 2
    assert "no installed backend recognizes" in unknown.stderr
