"""The TensorRT-LLM checkpoint validator: it accepts what modelopt's
``export_tensorrt_llm_checkpoint`` and qframe write (across algorithms, families, tensor and
pipeline splits), names each problem of a corrupted checkpoint on one line, and ``qframe
validate DIR`` exits 0 or 2 accordingly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qframe.testing import make_registry
from qframe_plugins.tensorrt_llm.validate import recognizes, validate_checkpoint

from peer import run_peer_script
from test_trtllm_export import AWQ, FP8, NVFP4, SMOOTHQUANT, W8A16, quantized, tiny, write

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = make_registry()  # built-ins only: the layouts the validator reads with

# modelopt's checkpoints of one tiny Llama (vocab 250: lm_head rows are padded at tp 4; 2 kv heads:
# repeated at tp 4), written by one peer process: (algorithm, tp, pp). test_trtllm_export.py
# validates modelopt's single-rank Llama/Qwen2/GPT-2 checkpoints of every algorithm; these add
# its tensor and pipeline splits.
MODELOPT_CASES = [("NONE", 2, 1), ("FP8", 4, 1), ("FP8", 2, 2), ("W4A16_AWQ", 1, 1), ("W8A8_SQ_PER_CHANNEL", 2, 1),
                  ("W4A16_AWQ", 2, 1)]
MODELOPT = """
import copy, json, warnings, contextlib, io
import torch
warnings.simplefilter("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_tensorrt_llm_checkpoint
from transformers import LlamaConfig, AutoModelForCausalLM

config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=250, max_position_embeddings=256)
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(config).eval()
fp8 = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
fp8["quant_cfg"] = list(fp8["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
configs = {"FP8": fp8, "W4A16_AWQ": mtq.INT4_AWQ_CFG, "W8A8_SQ_PER_CHANNEL": mtq.INT8_SMOOTHQUANT_CFG,
           "W4A8_AWQ": mtq.W4A8_AWQ_BETA_CFG, "NONE": None}
ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(1))
cases = json.loads((directory / "cases.json").read_text())
for name in dict.fromkeys(c[0] for c in cases):
    model = copy.deepcopy(base)
    with contextlib.redirect_stdout(io.StringIO()):
        if configs[name] is not None:
            model = mtq.quantize(model, copy.deepcopy(configs[name]), lambda m: m(input_ids=ids, use_cache=False))
        for algo, tp, pp in cases:
            if algo == name:
                export_tensorrt_llm_checkpoint(model, "llama", torch.float16, directory / f"{algo}-tp{tp}-pp{pp}",
                                               inference_tensor_parallel=tp, inference_pipeline_parallel=pp)
"""


@pytest.fixture(scope="module")
def modelopt_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modelopt-trt")
    (folder / "cases.json").write_text(json.dumps(MODELOPT_CASES))
    run_peer_script(MODELOPT, folder)
    return {case: folder / f"{case[0]}-tp{case[1]}-pp{case[2]}" for case in MODELOPT_CASES}


@pytest.mark.parametrize("case", [c for c in MODELOPT_CASES if c != ("W4A16_AWQ", 2, 1)], ids=str)
def test_modelopts_checkpoints_are_valid(modelopt_checkpoints, case):
    directory = modelopt_checkpoints[case]
    assert recognizes(directory)
    assert validate_checkpoint(directory, REGISTRY) == []


def test_modelopts_awq_split_of_an_odd_vocabulary_is_caught(modelopt_checkpoints):
    """modelopt 0.47 pads vocab_size to 256 in config.json for AWQ, but splits the unpadded 250
    rows across 2 ranks (125 each): TensorRT-LLM's loader asserts every parameter's shape, and
    its embedding and lm_head take ceil(256 / 2) = 128 rows per rank."""
    problems = validate_checkpoint(modelopt_checkpoints[("W4A16_AWQ", 2, 1)], REGISTRY)
    assert any(p.startswith("rank1.safetensors: lm_head.weight: shape [125, 256], expected [128, 256]")
               for p in problems), problems
    assert len(problems) == 4  # vocab_embedding and lm_head, on both ranks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """qframe's checkpoints of tiny fp16 models across algorithms, families and mappings."""
    folder = tmp_path_factory.mktemp("trt-valid")
    cases = {
        "llama-fp8-kv-tp2": ("llama", FP8, {"tp_size": 2}),
        "llama-awq64-pp2": ("llama", AWQ.replace("GROUP", "64"), {"pp_size": 2}),
        "qwen2-sq-int8kv-tp4": ("qwen2", SMOOTHQUANT, {"tp_size": 4}),
        "qwen2-w8a16-tp1": ("qwen2", W8A16, {}),
        "gpt2-nvfp4-tp2-pp2": ("gpt2", NVFP4, {"tp_size": 2, "pp_size": 2}),
    }
    return {name: write(quantized(tiny(family, torch.float16), text, folder), folder / name, **options)
            for name, (family, text, options) in cases.items()}


@pytest.mark.parametrize("name", ["llama-fp8-kv-tp2", "llama-awq64-pp2", "qwen2-sq-int8kv-tp4", "qwen2-w8a16-tp1",
                                  "gpt2-nvfp4-tp2-pp2"])
def test_qframes_checkpoints_are_valid(checkpoints, name):
    assert recognizes(checkpoints[name])
    assert validate_checkpoint(checkpoints[name], REGISTRY) == []


def test_an_engine_folder_beside_the_ranks_is_not_looked_at(checkpoints, tmp_path):
    directory = shutil.copytree(checkpoints["llama-fp8-kv-tp2"], tmp_path / "built")
    (directory / "engine").mkdir()
    (directory / "engine" / "rank0.engine").write_bytes(b"\0" * 16)
    (directory / "engine" / "config.json").write_text("{not json")
    assert validate_checkpoint(directory, REGISTRY) == []


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
KV = "transformer.layers.1.attention.kv_cache_scaling_factor"
# On llama-fp8-kv-tp2: hidden 128, 4 heads of 32, 2 key/value heads, vocab 256.
CORRUPTIONS = {
    "missing tensor": (edit_tensors("rank1.safetensors", lambda t: t.pop(f"{QKV}.weights_scaling_factor")),
                       f"rank1.safetensors: {QKV}.weights_scaling_factor: missing (expected float32 [1]"),
    "missing kv cache scale": (edit_tensors("rank0.safetensors", lambda t: t.pop(KV)),
                               f"rank0.safetensors: {KV}: missing (expected float32 [1], FP8 key/value cache)"),
    "wrong shape": (edit_tensors("rank0.safetensors", lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"][:-1]})),
                    f"rank0.safetensors: {QKV}.weight: shape [127, 128], expected [128, 128]"),
    "unsplit tensor": (edit_tensors("rank1.safetensors", lambda t: t.update(
        {"transformer.layers.0.mlp.proj.weight": torch.cat([t["transformer.layers.0.mlp.proj.weight"]] * 2, 1)})),
        "rank1.safetensors: transformer.layers.0.mlp.proj.weight: shape [128, 256], expected [128, 128]"),
    "wrong dtype": (edit_tensors("rank0.safetensors", lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"].half()})),
                    f"rank0.safetensors: {QKV}.weight: dtype float16, expected float8_e4m3fn"),
    "NaN scale": (edit_tensors("rank0.safetensors",
                               lambda t: t.update({f"{QKV}.activation_scaling_factor": torch.tensor([float("nan")])})),
                  f"rank0.safetensors: {QKV}.activation_scaling_factor: 1 of 1 values are NaN or infinite"),
    "inf kv scale": (edit_tensors("rank1.safetensors", lambda t: t.update({KV: torch.tensor([float("inf")])})),
                     f"rank1.safetensors: {KV}: 1 of 1 values are NaN or infinite"),
    "zero scale": (edit_tensors("rank0.safetensors",
                                lambda t: t.update({f"{QKV}.weights_scaling_factor": torch.tensor([0.0])})),
                   f"{QKV}.weights_scaling_factor: smallest value 0.0, expected every scale > 0"),
    "extra tensor": (edit_tensors("rank0.safetensors", lambda t: t.update({"transformer.extra": torch.ones(1)})),
                     "rank0.safetensors: transformer.extra: unexpected tensor"),
    "global layer index": (edit_tensors("rank0.safetensors", lambda t: t.update(
        {"transformer.layers.2.input_layernorm.weight": torch.ones(128, dtype=torch.float16)})),
        "transformer.layers.2.input_layernorm.weight: unexpected tensor (pipeline stage 0 holds 2 layers"),
    "k scale without v": (edit_tensors("rank0.safetensors", lambda t: t.pop(
        "transformer.layers.0.attention.v_cache_scaling_factor")),
        "k_cache_scaling_factor: present without v_cache_scaling_factor (they are read as a pair)"),
    "missing rank file": (lambda d: (d / "rank1.safetensors").unlink(), "rank1.safetensors: missing"),
    "leftover rank file": (lambda d: shutil.copy(d / "rank1.safetensors", d / "rank2.safetensors"),
                           "rank2.safetensors: unexpected (mapping.world_size is 2)"),
    "damaged rank file": (lambda d: (d / "rank1.safetensors").write_bytes(b"garbage"),
                          "rank1.safetensors: cannot be read as safetensors"),
    "world size": (edit_config(lambda c: c["mapping"].update(world_size=4)),
                   "config.json: mapping.world_size: 4, expected tp_size * pp_size = 2"),
    "mapping key": (edit_config(lambda c: c["mapping"].update(rank=0)),
                    "config.json: mapping.rank: unexpected; write exactly world_size, tp_size and pp_size"),
    "no mapping": (edit_config(lambda c: c.pop("mapping")), "config.json: mapping: None, expected"),
    "tp that does not divide": (edit_config(lambda c: c["mapping"].update(tp_size=3, world_size=3)),
                                "config.json: mapping.tp_size: 3 does not divide num_attention_heads 4"),
    "unknown quantization key": (edit_config(lambda c: c["quantization"].update(sq_alpha=0.5)),
                                 "config.json: quantization.sq_alpha: unknown key"),
    "unknown quant_algo": (edit_config(lambda c: c["quantization"].update(quant_algo="FP4")),
                           "config.json: quantization.quant_algo: 'FP4' is not a TensorRT-LLM QuantAlgo"),
    "INT8 weights": (edit_config(lambda c: c["quantization"].update(quant_algo="INT8")),
                     "quant_algo: 'INT8' is not a TensorRT-LLM QuantAlgo"),
    "bad kv algo": (edit_config(lambda c: c["quantization"].update(kv_cache_quant_algo="INT4")),
                    "config.json: quantization.kv_cache_quant_algo: 'INT4', expected null or one of FP8, INT8, NVFP4"),
    "exclude_modules missing": (edit_config(lambda c: c["quantization"].pop("exclude_modules")),
                                "config.json: quantization.exclude_modules: None, expected an explicit list"),
    "exclude_modules empty": (edit_config(lambda c: c["quantization"].update(exclude_modules=[])),
                              "config.json: quantization.exclude_modules: [], expected an explicit list"),
    "lm_head not excluded": (edit_config(lambda c: c["quantization"].update(exclude_modules=["*vocab_embedding"])),
                             "rank0.safetensors: lm_head.weight: dtype float16, expected float8_e4m3fn"),
    "excluded but quantized": (edit_config(lambda c: c["quantization"]["exclude_modules"].append("*.0.mlp.fc")),
                               "transformer.layers.0.mlp.fc.weight: dtype float8_e4m3fn, expected float16 "
                               "(unquantized (excluded by '*.0.mlp.fc'))"),
    "architecture": (edit_config(lambda c: c.update(architecture="LLaMAForCausalLM")),
                     "config.json: architecture: 'LLaMAForCausalLM' is not a TensorRT-LLM architecture"),
    "architecture not checked": (edit_config(lambda c: c.update(architecture="FalconForCausalLM")),
                                 "architecture 'FalconForCausalLM' is one TensorRT-LLM builds, but this validator has "
                                 "no tensor layout for it; its tensors were not checked"),
    "dtype": (edit_config(lambda c: c.update(dtype="fp16")), "config.json: dtype: 'fp16', expected one of float16"),
    "missing key": (edit_config(lambda c: c.pop("num_hidden_layers")), "config.json: num_hidden_layers: missing"),
    "wrong type": (edit_config(lambda c: c.update(hidden_size="128")),
                   "config.json: hidden_size: '128', expected a positive integer"),
    "vocab": (edit_config(lambda c: c.update(vocab_size=260)),
              "rank1.safetensors: lm_head.weight: shape [128, 128], expected [130, 128]"),
    "no config": (lambda d: (d / "config.json").unlink(), "config.json: missing in"),
}


@pytest.mark.parametrize("edit, needle", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_each_problem_is_named(checkpoints, tmp_path, edit, needle):
    broken = corrupt(checkpoints["llama-fp8-kv-tp2"], tmp_path / "broken", edit)
    problems = validate_checkpoint(broken, REGISTRY)
    assert any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_awq_group_size_must_be_one_tensorrt_llm_has(checkpoints, tmp_path):
    broken = corrupt(checkpoints["llama-awq64-pp2"], tmp_path / "g32",
                     edit_config(lambda c: c["quantization"].update(group_size=32)))
    problems = validate_checkpoint(broken, REGISTRY)
    assert "config.json: quantization.group_size: 32 for W4A16_AWQ, expected 64 or 128" in problems


def test_awq_prequant_scales_follow_pre_quant_scale(checkpoints, tmp_path):
    """AWQ under GQA keeps input prescales (v_proj cannot take o_proj's scale): pre_quant_scale
    is true and every linear has prequant_scaling_factor; saying false makes them unexpected."""
    source = checkpoints["llama-awq64-pp2"]
    assert json.loads((source / "config.json").read_text())["quantization"]["pre_quant_scale"] is True
    broken = corrupt(source, tmp_path / "nopre", edit_config(lambda c: c["quantization"].update(pre_quant_scale=False)))
    assert ("rank1.safetensors: transformer.layers.0.attention.dense.prequant_scaling_factor: unexpected tensor "
            "(not part of the W4A16_AWQ layout; TensorRT-LLM would ignore it)") in validate_checkpoint(broken, REGISTRY)


def test_pipeline_stages_hold_embedding_first_and_head_last(checkpoints, tmp_path):
    def move_head(d: Path) -> None:  # lm_head written on the first stage instead of the last
        first, last = load_file(str(d / "rank0.safetensors")), load_file(str(d / "rank2.safetensors"))
        first["lm_head.weight"] = last.pop("lm_head.weight")
        save_file(first, str(d / "rank0.safetensors"))
        save_file(last, str(d / "rank2.safetensors"))

    problems = validate_checkpoint(corrupt(checkpoints["gpt2-nvfp4-tp2-pp2"], tmp_path / "moved", move_head), REGISTRY)
    assert "rank0.safetensors: lm_head.weight: unexpected tensor (only the last pipeline stage holds it)" in problems
    assert any(p.startswith("rank2.safetensors: lm_head.weight: missing") for p in problems), problems


def test_a_scalar_scale_is_taken_for_a_one_element_one(checkpoints, tmp_path):
    """TensorRT-LLM's Parameter takes a 0-d value for a [1] parameter."""
    name = f"{QKV}.activation_scaling_factor"
    fine = corrupt(checkpoints["llama-fp8-kv-tp2"], tmp_path / "scalar",
                   edit_tensors("rank0.safetensors", lambda t: t.update({name: t[name].reshape(())})))
    assert validate_checkpoint(fine, REGISTRY) == []


def test_recognizes_only_checkpoints(checkpoints, tmp_path):
    assert not recognizes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))  # a Hugging Face one
    shutil.copy(checkpoints["qwen2-w8a16-tp1"] / "rank0.safetensors", tmp_path)
    assert not recognizes(tmp_path)


def qframe(*args):
    return subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=ROOT)


def test_qframe_validate_on_the_command_line(checkpoints, tmp_path):
    good = qframe("validate", str(checkpoints["gpt2-nvfp4-tp2-pp2"]))
    assert good.returncode == 0, good.stderr
    assert "valid tensorrt-llm checkpoint" in good.stdout

    broken = corrupt(checkpoints["llama-fp8-kv-tp2"], tmp_path / "broken", lambda d: (
        (d / "rank1.safetensors").unlink(), edit_config(lambda c: c["quantization"].update(sq_alpha=0.5))(d)))
    bad = qframe("validate", str(broken), "--backend", "tensorrt-llm")
    assert bad.returncode == 2
    lines = bad.stdout.splitlines()
    assert any(line.endswith("rank1.safetensors: missing (mapping.world_size is 2: expected rank0 to rank1)")
               for line in lines), bad.stdout
    assert any("quantization.sq_alpha: unknown key" in line for line in lines), bad.stdout
    assert "NOT a valid tensorrt-llm checkpoint (2 problems)" in bad.stderr
    assert "Traceback" not in bad.stderr

    unknown = qframe("validate", str(tmp_path))
    assert unknown.returncode == 2
    assert "no installed backend recognizes" in unknown.stderr
