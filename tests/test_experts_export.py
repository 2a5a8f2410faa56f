"""Quantized fused experts in the unified HF checkpoint (``--backend hf``): W4A16_AWQ, FP8 and
NVFP4 experts are written one linear an expert, named as the model's Hugging Face checkpoints name
them, validate, and unpack to exactly the weights the quantized model computes with (FP8 and
NVFP4 with the module's input scales). modelopt 0.47 writes the same tensors for FP8 and NVFP4
experts but cannot export transformers 5's fused experts with INT4_AWQ_CFG; the test asserts how
it fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qframe
from qframe import numerics
from qframe.errors import ExportError
from qframe.pipeline import check_plan
from qframe.recipe import parse_recipe, resolve
from qframe.testing import make_registry, random_tokens
from qframe_plugins.hf import HFExporter, hub_naming
from qframe_plugins.quant_algo import Writer, choose

from peer import run_peer_script

RTN_G64 = {"quantizer": "rtn", "targets": ["Linear", "Experts"], "weights": {"bits": 4, "group_size": 64}}
# Static inputs (one calibrated scale a fused weight, shared by its experts), as the quantizers make them.
FP8_W = {"type": "float", "bits": 8, "granularity": "tensor"}
FP8_A = {"type": "float", "bits": 8}
NVFP4_WA = {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16}
STATIC = {"FP8": {"quantizer": "fp8", "weights": FP8_W, "activations": FP8_A},
          "NVFP4": {"quantizer": "nvfp4", "weights": NVFP4_WA, "activations": NVFP4_WA}}
# Each family's experts as its Hugging Face checkpoints name them: (module, gate, up, down), router.
NAMES = {"qwen3_moe": (("mlp.experts", "gate_proj", "up_proj", "down_proj"), "mlp.gate"),
         "mixtral": (("block_sparse_moe.experts", "w1", "w3", "w2"), "block_sparse_moe.gate"),
         "qwen2_moe": (("mlp.experts", "gate_proj", "up_proj", "down_proj"), "mlp.gate")}
AWQ_FAMILIES = ("qwen3_moe", "mixtral")


def _config(family: str):
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128)
    if family == "qwen2_moe":  # with its shared expert and that expert's gate (a linear of one output)
        return transformers.Qwen2MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            vocab_size=128)
    return transformers.MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=128)


def _model(family: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
    model.config.use_cache = False
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def registry():
    return make_registry()


@pytest.fixture(scope="module", params=AWQ_FAMILIES)
def exported(request, registry, tmp_path_factory):
    family = request.param
    qmodel = qframe.quantize(_model(family), parse_recipe({"stage": [RTN_G64]}), device="cpu", registry=registry)
    directory = qframe.export(qmodel, "hf", tmp_path_factory.mktemp(family) / "hf", registry=registry)
    return family, qmodel, Path(directory)


def test_the_checkpoint_validates(exported):
    _, _, directory = exported
    assert HFExporter().validate(directory) == []


def test_experts_are_named_as_the_hub_checkpoints_and_the_router_is_excluded(exported):
    family, qmodel, directory = exported
    (module, gate, up, down), router = NAMES[family]
    tensors = load_file(str(directory / "model.safetensors"))
    quant = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 64
    for layer in range(2):
        prefix = f"model.layers.{layer}.{module}"
        assert not any(n.startswith(f"{prefix}.gate_up_proj") or n.startswith(f"{prefix}.down_proj") for n in tensors)
        for e in range(4):
            for leaf, shape in ((gate, (32, 64)), (up, (32, 64)), (down, (32, 64))):
                assert tensors[f"{prefix}.{e}.{leaf}.weight"].shape == shape  # [out/2, in] packed int4
                assert tensors[f"{prefix}.{e}.{leaf}.weight"].dtype == torch.uint8
                assert tensors[f"{prefix}.{e}.{leaf}.weight_scale"].shape == (64, 1)
                assert tensors[f"{prefix}.{e}.{leaf}.weight_scale"].dtype == torch.float32
        assert f"model.layers.{layer}.{router}" in quant["exclude_modules"]
        assert tensors[f"model.layers.{layer}.{router}.weight"].dtype == torch.bfloat16
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == quant["exclude_modules"]


def test_unpacking_every_expert_reproduces_the_quantized_weights_bit_for_bit(exported):
    family, qmodel, directory = exported
    (module, gate, up, down), _ = NAMES[family]
    tensors = load_file(str(directory / "model.safetensors"))
    for layer in range(2):
        experts = qmodel.model.model.layers[layer].mlp.experts
        fused = {"gate_up_proj": experts.dequantized("gate_up_proj"), "down_proj": experts.dequantized("down_proj")}
        for e in range(4):
            pieces = {}
            for leaf in (gate, up, down):
                name = f"model.layers.{layer}.{module}.{e}.{leaf}"
                codes = numerics.unpack_int4_rows(tensors[f"{name}.weight"]).float()
                pieces[leaf] = codes * tensors[f"{name}.weight_scale"].repeat_interleave(64, dim=1)
            assert torch.equal(torch.cat([pieces[gate], pieces[up]]), fused["gate_up_proj"][e])
            assert torch.equal(pieces[down], fused["down_proj"][e])
            # ... and the model computes with them (in its dtype)
            assert torch.equal(torch.cat([pieces[gate], pieces[up]]).to(torch.bfloat16), experts.gate_up_proj[e])


def test_the_validator_names_a_wrong_expert(exported, tmp_path):
    import shutil

    from safetensors.torch import save_file

    family, _, directory = exported
    (module, gate, _, _), _ = NAMES[family]
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = f"model.layers.1.{module}.2.{gate}"
    tensors[f"{name}.weight"] = tensors[f"{name}.weight"][:16].clone()
    del tensors[f"model.layers.0.{module}.3.{gate}.weight_scale"]
    tensors[f"model.layers.0.{module}.4.{gate}.weight"] = tensors[f"model.layers.0.{module}.0.{gate}.weight"].clone()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    problems = "\n".join(HFExporter().validate(broken))
    assert f"{name}.weight is [16, 64], not the packed weight of a [64, 64] linear" in problems
    assert f"model.layers.0.{module}.3.{gate}.weight is not quantized but exclude_modules does not list" in problems
    assert f"model.layers.0.{module}.4.{gate}.weight is not a tensor of the model config.json describes" in problems


def test_hub_naming_reverses_transformers_conversion_mapping():
    assert hub_naming("qwen3_moe") == ([], ("gate_proj", "up_proj", "down_proj"))
    assert hub_naming("mixtral") == ([(".mlp.", ".block_sparse_moe.")], ("w1", "w3", "w2"))


# -- FP8 and NVFP4 experts -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def static(registry, tmp_path_factory):
    """``static(family, algo)``: ``(qmodel, directory)``, the model with experts and linears
    quantized as FP8 or NVFP4 (static inputs, calibrated on a few random tokens) and its hf
    checkpoint, made once a module."""
    made = {}

    def get(family: str, algo: str):
        if (family, algo) not in made:
            ids = random_tokens(2, 16, vocab=128, seed=3)
            qmodel = qframe.quantize(_model(family), parse_recipe({"stage": [STATIC[algo]]}), calibration=ids,
                                     device="cpu", registry=registry)
            directory = qframe.export(qmodel, "hf", tmp_path_factory.mktemp(f"{family}-{algo}") / "hf",
                                      registry=registry)
            made[family, algo] = qmodel, Path(directory)
        return made[family, algo]

    return get


STATIC_CASES = pytest.mark.parametrize("family, algo", [(f, a) for f in NAMES for a in STATIC])
# Tensors of an expert (each 64 x 64 in these models) as dtype and shape, by suffix.
EXPERT_TENSORS = {
    "FP8": {"weight": (torch.float8_e4m3fn, (64, 64)), "weight_scale": (torch.float32, ()),
            "input_scale": (torch.float32, ())},
    "NVFP4": {"weight": (torch.uint8, (64, 32)), "weight_scale": (torch.float8_e4m3fn, (64, 4)),
              "weight_scale_2": (torch.float32, ()), "input_scale": (torch.float32, ())}}


def _dequantized(tensors: dict, name: str, algo: str) -> torch.Tensor:
    """A linear's float32 weight as a serving engine computes it from the checkpoint."""
    w, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
    if algo == "FP8":
        return w.float() * scale
    codes = numerics.unpack(w, 4, False, w.shape[1] * 2, "nvfp4")
    block = scale.float() * tensors[f"{name}.weight_scale_2"]
    return numerics.e2m1_decode(codes) * block.repeat_interleave(16, dim=1)


@STATIC_CASES
def test_fp8_and_nvfp4_experts_validate_one_linear_an_expert(static, family, algo):
    _, directory = static(family, algo)
    assert HFExporter().validate(directory) == []
    (module, gate, up, down), router = NAMES[family]
    quant = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo and quant.get("group_size") == (16 if algo == "NVFP4" else None)
    tensors = load_file(str(directory / "model.safetensors"))
    for layer in range(2):
        prefix = f"model.layers.{layer}.{module}"
        assert not any(n.startswith((f"{prefix}.gate_up_proj", f"{prefix}.down_proj")) for n in tensors)
        for e in range(4):
            for leaf in (gate, up, down):
                name = f"{prefix}.{e}.{leaf}."
                found = {n[len(name):]: (t.dtype, tuple(t.shape)) for n, t in tensors.items() if n.startswith(name)}
                assert found == EXPERT_TENSORS[algo], name
        assert f"model.layers.{layer}.{router}" in quant["exclude_modules"]
        assert tensors[f"model.layers.{layer}.{router}.weight"].dtype == torch.bfloat16


@STATIC_CASES
def test_fp8_and_nvfp4_experts_unpack_to_the_quantized_weights_with_the_modules_input_scales(static, family, algo):
    """Each expert's gate, up and down, dequantized from the checkpoint as a serving engine does,
    are the quantized model's weights bit for bit; gate and up carry their expert's one per-tensor
    scale (FP8 weight_scale, NVFP4 weight_scale_2: they were quantized as one matrix), and every
    expert the module's input scale of its fused weight."""
    qmodel, directory = static(family, algo)
    (module, gate, up, down), _ = NAMES[family]
    tensors = load_file(str(directory / "model.safetensors"))
    per_tensor, own = ("weight_scale", "scale") if algo == "FP8" else ("weight_scale_2", "global_scale")
    for layer in range(2):
        experts = qmodel.model.model.layers[layer].mlp.experts
        fused = {w: experts.dequantized(w) for w in ("gate_up_proj", "down_proj")}
        for e in range(4):
            name = {leaf: f"model.layers.{layer}.{module}.{e}.{leaf}" for leaf in (gate, up, down)}
            pieces = {leaf: _dequantized(tensors, n, algo) for leaf, n in name.items()}
            assert torch.equal(torch.cat([pieces[gate], pieces[up]]), fused["gate_up_proj"][e])
            assert torch.equal(pieces[down], fused["down_proj"][e])
            # ... and the model computes with them (in its dtype)
            assert torch.equal(torch.cat([pieces[gate], pieces[up]]).to(torch.bfloat16), experts.gate_up_proj[e])
            for leaf, w in ((gate, "gate_up_proj"), (up, "gate_up_proj"), (down, "down_proj")):
                expert_scale = experts.get_buffer(f"{w}_{own}")[e].reshape(())
                assert torch.equal(tensors[f"{name[leaf]}.{per_tensor}"], expert_scale)
                assert torch.equal(tensors[f"{name[leaf]}.input_scale"], experts.get_buffer(f"{w}_input_scale"))


_SCALES = (".weight_scale", ".weight_scale_2", ".input_scale")


@pytest.mark.parametrize("family", list(NAMES))
def test_transformers_names_and_loads_the_experts_as_written(static, family, tmp_path):
    """The checkpoint's tensors are those transformers 5 itself saves for the float model (its
    conversion mapping reversed) plus the scales; and its dequantized weights, loaded through that
    mapping, are fused back into exactly the quantized model's experts and linears."""
    qmodel, directory = static(family, "NVFP4")
    tensors = load_file(str(directory / "model.safetensors"))
    float_model = _model(family)
    float_model.save_pretrained(tmp_path / "float")
    hub = set(load_file(str(tmp_path / "float" / "model.safetensors")))
    assert {n for n in tensors if not n.endswith(_SCALES)} == hub
    dequantized = {n: (_dequantized(tensors, n[:-len(".weight")], "NVFP4").to(torch.bfloat16)
                       if f"{n[:-len('.weight')]}.weight_scale" in tensors else t)
                   for n, t in tensors.items() if not n.endswith(_SCALES)}
    save_file(dequantized, str(tmp_path / "float" / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", output_loading_info=True)
    assert not any(info.values()), info
    assert any(n.endswith("experts.gate_up_proj") for n in loaded.state_dict())
    for name, tensor in loaded.state_dict().items():  # the quantized model's weights: dequantized ones where quantized
        owner, _, leaf = name.rpartition(".")
        assert torch.equal(tensor, getattr(qmodel.model.get_submodule(owner), leaf)), name


@pytest.mark.parametrize("algo", list(STATIC))
def test_the_validator_names_a_wrong_fp8_or_nvfp4_expert(static, algo, tmp_path):
    import shutil

    _, directory = static("mixtral", algo)
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    prefix = "model.layers.1.block_sparse_moe.experts"
    del tensors[f"{prefix}.2.w3.input_scale"]
    tensors[f"{prefix}.0.w2.weight_scale"] = tensors[f"{prefix}.0.w2.weight_scale"].to(torch.bfloat16)
    tensors[f"{prefix}.3.w1.weight"] = tensors[f"{prefix}.3.w1.weight"][:, :16].clone()
    if algo == "NVFP4":
        tensors[f"{prefix}.1.w1.weight_scale_2"] = tensors[f"{prefix}.1.w1.weight_scale_2"].reshape(1)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    problems = "\n".join(HFExporter().validate(broken))
    assert f"{prefix}.2.w3.input_scale is missing ({algo})" in problems
    assert f"{prefix}.0.w2.weight_scale is bfloat16" in problems
    assert f"{prefix}.3.w1.weight is [64, 16], not the packed weight of a [64, 64] linear" in problems
    if algo == "NVFP4":
        assert f"{prefix}.1.w1.weight_scale_2 is float32 [1], expected float32 [] (NVFP4)" in problems


def _description(recipe: dict, registry, family: str = "qwen3_moe"):
    return check_plan(_model(family), resolve(parse_recipe(recipe), registry), registry).description


# The unified HF checkpoint's quantized experts, as its refusals list them.
HF_EXPERTS = ("the unified HF checkpoint holds quantized experts as W4A16_AWQ, FP8 or NVFP4 only (W4A16_AWQ: "
              "symmetric int4 weights per group of 64 or 128, activations in float; FP8: FP8 E4M3 weights per tensor, "
              "static FP8 E4M3 activations per tensor; NVFP4: NVFP4 weights and activations, with a static input "
              "global scale); export with --backend qframe")


@pytest.mark.parametrize("stage, needle", [
    ({"quantizer": "fp8", "targets": ["Experts"], "weights": FP8_W},
     "activations none: FP8 needs static FP8 E4M3 activations with one calibrated scale per tensor (input_scale)"),
    ({"quantizer": "nvfp4", "targets": ["Experts"], "weights": NVFP4_WA},
     "activations none: NVFP4 quantizes activations to NVFP4 too, with a static global scale (input_scale)"),
    ({"quantizer": "fp8", "targets": ["Experts"], "weights": FP8_W,
      "activations": {**FP8_A, "dynamic": True, "granularity": "token"}},
     "holds static activation scales only (dynamic per-token or per-block scales need kernels whose tensors it does "
     "not name); calibrate them: set activations.dynamic = false (not dynamic), or export with --backend qframe"),
    ({"quantizer": "rtn", "targets": ["Experts"], "weights": {"bits": 8}}, f"activations none: {HF_EXPERTS}"),
    ({"quantizer": "rtn", "targets": ["Experts"], "weights": {"bits": 4, "group_size": 64}, "activations": FP8_A},
     f"experts with weights int4 group 64, activations e4m3 per tensor: {HF_EXPERTS}"),
    ({"quantizer": "rtn", "targets": ["Experts"], "weights": {"bits": 4, "group_size": 32}}, "groups of 64 or 128"),
], ids=["fp8-weights-only", "nvfp4-weights-only", "fp8-dynamic", "int8", "w4a8", "int4-group-32"])
def test_what_hf_cannot_hold_for_experts_is_refused_before_calibration(stage, needle, registry):
    with pytest.raises(ExportError, match=re.escape(needle)):
        HFExporter().check(_description({"stage": [stage]}, registry))


W4A16_AWQ = {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 64}}


@pytest.mark.parametrize("linears, experts", [
    (STATIC["FP8"], STATIC["NVFP4"]), (W4A16_AWQ, STATIC["FP8"]), (STATIC["NVFP4"], W4A16_AWQ)],
    ids=["fp8-nvfp4", "w4a16_awq-fp8", "nvfp4-w4a16_awq"])
def test_fp8_and_nvfp4_experts_and_linears_must_share_one_algorithm(linears, experts, registry):
    description = _description({"stage": [{**linears, "targets": ["Linear"]}, {**experts, "targets": ["Experts"]}]},
                               registry)
    with pytest.raises(ExportError, match="experts and linears would be quantized with different algorithms"):
        HFExporter().check(description)


@pytest.mark.parametrize("stages", [[{**STATIC["FP8"], "targets": ["Experts"]}], [STATIC["FP8"]], [STATIC["NVFP4"]],
                                    [RTN_G64]], ids=["fp8-experts-float-linears", "fp8", "nvfp4", "w4a16_awq"])
def test_experts_the_checkpoint_holds_pass_the_check_before_calibration(stages, registry):
    description = _description({"stage": stages}, registry)
    assert not description.calibrated and description.experts
    HFExporter().check(description)


def test_experts_and_linears_must_share_one_algorithm(registry):
    stages = [{"quantizer": "rtn", "targets": ["Linear"], "weights": {"bits": 4, "group_size": 64}},
              {"quantizer": "rtn", "targets": ["Experts"], "weights": {"bits": 4, "group_size": 128}}]
    config = transformers.MixtralConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, vocab_size=128)
    model = transformers.AutoModelForCausalLM.from_config(config)
    description = check_plan(model, resolve(parse_recipe({"stage": stages}), registry), registry).description
    with pytest.raises(ExportError, match="experts and linears would be quantized with different algorithms"):
        HFExporter().check(description)


def test_tensorrt_llm_still_refuses_experts(registry):
    description = _description({"stage": [RTN_G64]}, registry)
    trt = Writer("TensorRT-LLM", ("W4A16_AWQ",), ("FP8",), elsewhere="--backend qframe")
    with pytest.raises(ExportError, match="quantized experts are not written by TensorRT-LLM yet"):
        choose(description, trt)


@pytest.mark.parametrize("algo", list(STATIC))
def test_tensorrt_llm_takes_the_same_fp8_and_nvfp4_experts(algo, registry):
    """The experts this backend writes are TensorRT-LLM's too (stacked there: tests/test_trtllm_moe.py)."""
    from qframe_plugins.tensorrt_llm import TensorRTLLMExporter

    TensorRTLLMExporter(registry=registry).check(_description({"stage": [STATIC[algo]]}, registry))


MODELOPT = """
import copy, contextlib, io, json, warnings
import torch
warnings.simplefilter("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM

awq = copy.deepcopy(mtq.INT4_AWQ_CFG)
for entry in awq["quant_cfg"]:
    if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
        entry["cfg"]["block_sizes"][-1] = 64
awq["algorithm"] = {"method": "awq_lite", "alpha_step": 0.5}
configs = {"W4A16_AWQ": awq, "FP8": mtq.FP8_DEFAULT_CFG, "NVFP4": mtq.NVFP4_DEFAULT_CFG}
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
results = {}
for family in ("qwen3_moe", "mixtral"):
    for algo, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(directory / family).eval()
        with contextlib.redirect_stdout(io.StringIO()):
            model = mtq.quantize(model, copy.deepcopy(config), lambda m: m(input_ids=ids, use_cache=False))
            try:
                export_hf_checkpoint(model, export_dir=directory / f"{family}-{algo}")
                results[f"{family} {algo}"] = "exported"
            except Exception as exc:
                results[f"{family} {algo}"] = f"{type(exc).__name__}: {exc}"
(directory / "results.json").write_text(json.dumps(results))
"""


def _signature(directory: Path) -> dict[str, tuple]:
    tensors = load_file(str(directory / "model.safetensors"))
    return {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}


def test_modelopt_writes_fp8_and_nvfp4_experts_as_qframe_does_and_cannot_export_int4_awq_ones(static, tmp_path):
    """modelopt 0.47 quantizes transformers 5's fused experts (one weight quantizer an expert)
    and exports FP8 and NVFP4 ones one linear an expert (``moe_utils._export_fused_experts``),
    every expert's ``input_scale`` that of the module's one input quantizer, under the hub
    checkpoint's names (``quant_aware_conversion`` reverses transformers' conversion mapping of a
    model loaded through it: the float models are saved here as transformers writes them, one
    linear an expert). Its checkpoints hold the tensors qframe writes — names, shapes, dtypes —
    and the same hf_quant_config.json and quantization_config but the producer. Its INT4_AWQ
    export fails on them: the AWQ resmoothing step takes ``len()`` of the experts module, which
    transformers 5 no longer makes a ModuleList. When a later modelopt exports them, this test
    fails: compare the checkpoints then."""
    for family in AWQ_FAMILIES:
        _model(family).save_pretrained(tmp_path / family)
    run_peer_script(MODELOPT, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    for family in AWQ_FAMILIES:
        awq = results[f"{family} W4A16_AWQ"]
        assert awq.startswith("TypeError") and "has no len()" in awq, awq
        for algo in STATIC:
            assert results[f"{family} {algo}"] == "exported", results[f"{family} {algo}"]
            ours, theirs = static(family, algo)[1], tmp_path / f"{family}-{algo}"
            assert _signature(ours) == _signature(theirs), (family, algo)
            mine, reference = (json.loads((d / "hf_quant_config.json").read_text()) for d in (ours, theirs))
            assert mine["quantization"] == reference["quantization"]
            mine, reference = (json.loads((d / "config.json").read_text())["quantization_config"]
                               for d in (ours, theirs))
            assert mine.pop("producer")["name"] == "qframe" and reference.pop("producer")["name"] == "modelopt"
            assert mine == reference
            assert HFExporter().validate(theirs) == []
