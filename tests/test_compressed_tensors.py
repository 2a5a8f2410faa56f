"""The ``compressed-tensors`` backend: checkpoints that transformers' compressed-tensors
integration loads and decompresses to exactly qframe's dequantized weights (tiny Llama, Qwen2,
Qwen3-MoE and Mixtral experts), tensors equal to what the package's own compressor writes for
the same values, the package's config model accepting ``quantization_config``, the validator,
refusals before calibration, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qframe
from qframe.errors import ExportError
from qframe.pipeline import check_plan
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe, resolve
from qframe.testing import make_registry, random_tokens
from qframe_plugins.compressed_tensors import CompressedTensorsExporter, pack_int32, validate_checkpoint

from test_hf_export import tiny as hf_tiny

ct = pytest.importorskip("compressed_tensors")

FP8_W, FP8_A = {"type": "float", "bits": 8, "granularity": "tensor"}, {"type": "float", "bits": 8}
SCHEMES = {
    "w4a16-g32": {"weights": {"bits": 4, "group_size": 32}},
    "w4a16-g32-asym": {"weights": {"bits": 4, "group_size": 32, "symmetric": False}},
    "w3a16-g32": {"weights": {"bits": 3, "group_size": 32}},
    "w4a16-channel-asym": {"weights": {"bits": 4, "symmetric": False}},
    "w8a16": {"weights": {"bits": 8}},
    "w8a8-static": {"weights": {"bits": 8}, "activations": {"bits": 8}},
    "w8a8-dynamic": {"weights": {"bits": 8}, "activations": {"bits": 8, "dynamic": True}},
    "fp8": {"weights": FP8_W, "activations": FP8_A},
    "fp8-dynamic": {"weights": {"type": "float", "bits": 8, "granularity": "channel"},
                    "activations": {"type": "float", "bits": 8, "dynamic": True}},
    "nvfp4": {"weights": {"type": "float", "bits": 4}, "activations": {"type": "float", "bits": 4}},
    "nvfp4a16": {"weights": {"type": "float", "bits": 4}},
    "mxfp4a16": {"weights": {"type": "float", "bits": 4, "format": "mxfp4"}},
}
WEIGHT_ONLY = {n for n, s in SCHEMES.items() if "activations" not in s}
IDS = random_tokens(2, 16, vocab=256, seed=1)


def tiny(family: str, dtype=torch.float32):
    """The hf backend's tiny Llama or Qwen2 (hidden 128, grouped-query attention), in ``dtype``."""
    return hf_tiny(family).to(dtype)


def export(model, stage: dict, directory: Path, **options):
    qmodel = qframe.quantize(model, parse_recipe({"stage": [{"quantizer": "rtn", **stage}]}), calibration=IDS,
                             device="cpu")
    return qmodel, qframe.export(qmodel, "compressed-tensors", directory, options=options or None)


def load(directory: Path):
    """transformers' compressed-tensors integration, decompressing every linear to float."""
    import warnings

    config = transformers.utils.quantization_config.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # "the model's quantization_config will be used": it is
        warnings.filterwarnings("ignore", "You passed `quantization_config`")
        return transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config).eval()


def assert_same_weights(qmodel, loaded, rtol: float = 0.0) -> None:
    for name, module in qmodel.model.named_modules():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(loaded.get_submodule(name).weight.detach(), module.weight, rtol=rtol, atol=0,
                                       msg=name)


# Every scheme on Llama; on Qwen2 (bias on q/k/v) one of each format.
CASES = [("llama", s) for s in SCHEMES] + [("qwen2", s) for s in ("w4a16-g32-asym", "w8a8-static", "fp8-dynamic",
                                                                  "nvfp4", "mxfp4a16")]


@pytest.mark.parametrize("family, scheme", CASES)
def test_transformers_decompresses_every_scheme_to_qframes_weights(scheme, family, tmp_path):
    """float32 checkpoints (scales exact): every linear bit for bit; weight-only schemes also
    give qframe's logits (transformers' integration does not quantize activations)."""
    qmodel, directory = export(tiny(family), SCHEMES[scheme], tmp_path / "ct", dtype="float32")
    assert validate_checkpoint(directory) == []
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    ct.quantization.QuantizationConfig.model_validate(config)  # the package's own model of the config
    loaded = load(directory)
    # The package dequantizes NVFP4 in bfloat16 whatever the model's dtype (its unpack_fp4_from_uint8
    # default): a float32 model's weights come back rounded to bfloat16; a 16-bit one's are exact (below).
    assert_same_weights(qmodel, loaded, rtol=2**-8 if scheme.startswith("nvfp4") else 0.0)
    if scheme in WEIGHT_ONLY and not scheme.startswith("nvfp4"):
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, qmodel.model(IDS).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheme", ["w4a16-g32", "nvfp4", "mxfp4a16"])
def test_bf16_checkpoints_are_exact_where_the_scales_are(scheme, tmp_path):
    """In the model's own 16-bit dtype, group int scales (made exact in it), NVFP4 and MXFP4
    decompress bit for bit; a Qwen2 as well as a Llama."""
    qmodel, directory = export(tiny("qwen2", torch.bfloat16), SCHEMES[scheme], tmp_path / "ct")
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_weights(qmodel, load(directory))


def test_scales_the_dtype_rounds_are_warned_about(tmp_path):
    with pytest.warns(UserWarning, match="not exact in bfloat16"):
        export(tiny("llama", torch.bfloat16), SCHEMES["fp8-dynamic"], tmp_path / "ct")
    experts_only = {"quantizer": "rtn", "targets": ["Experts"], **SCHEMES["w4a16-g32"]}
    qmodel = qframe.quantize(tiny_moe("mixtral"), parse_recipe({"stage": [experts_only]}), device="cpu")
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts and 1 more modules: weight scales are "
                                         "not exact in float16"):
        qframe.export(qmodel, "compressed-tensors", tmp_path / "moe")


# The package's compressor, per linear, fed the same values: the float32 dequantized weight and
# the scales as written (its documented way to compress known parameters).
def package_tensors(fmt: str, group: dict, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> dict:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"],
                                input_activations=group["input_activations"])
    state = {"weight": weight.float()}
    for key in ("weight_scale", "weight_zero_point", "weight_global_scale", "input_scale", "input_global_scale"):
        if key in tensors:
            state[key] = tensors[key]
    if fmt == "pack-quantized" and "weight_zero_point" in state and state["weight_zero_point"].dtype == torch.int32:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        rows = tensors["weight_shape"][0].item()
        state["weight_zero_point"] = unpack_from_int32(state["weight_zero_point"], group["weights"]["num_bits"],
                                                       torch.Size([rows, state["weight_scale"].shape[1]]), packed_dim=0)
    if fmt == "nvfp4-pack-quantized":  # the package reads the E4M3 block scales as floats
        state["weight_scale"] = tensors["weight_scale"].float()
    if fmt == "mxfp4-pack-quantized":  # the package reads the float scale, 2^(e-127)
        state["weight_scale"] = torch.exp2(tensors["weight_scale"].float() - 127)
    out = BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)
    return {k: v for k, v in out.items()}


@pytest.mark.parametrize("scheme", ["w4a16-g32", "w4a16-g32-asym", "w3a16-g32", "w8a8-static", "fp8", "nvfp4",
                                    "mxfp4a16"])
def test_tensors_equal_the_package_compressors(scheme, tmp_path):
    qmodel, directory = export(tiny("llama"), SCHEMES[scheme], tmp_path / "ct", dtype="float32")
    group = json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    ours = load_file(str(directory / "model.safetensors"))
    for name, module in qmodel.quantized_modules().items():
        mine = {k.removeprefix(f"{name}."): v for k, v in ours.items() if k.startswith(f"{name}.")}
        theirs = package_tensors(group["format"], group, mine, module.weight)
        for key, tensor in theirs.items():
            assert torch.equal(tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor,
                               mine[key].view(torch.uint8) if mine[key].dtype == torch.float8_e4m3fn else mine[key]), \
                f"{name}.{key}"


def test_pack_int32_is_the_packages():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(-4, 4, (6, 70), dtype=torch.int8)
    for bits in (3, 4, 8):
        c = codes.clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        assert torch.equal(pack_int32(c, bits), pack_to_int32(c, bits))
        assert torch.equal(pack_int32(c, bits, dim=0), pack_to_int32(c, bits, packed_dim=0))


def test_fp8_kv_cache_is_declared_and_its_scales_sit_on_the_attention(tmp_path):
    recipe = {"stage": [{"quantizer": "fp8", "weights": FP8_W, "activations": FP8_A},
                        {"quantizer": "kv_cache", "activations": {"type": "float", "bits": 8}}]}
    qmodel = qframe.quantize(tiny("llama"), parse_recipe(recipe), calibration=IDS, device="cpu")
    directory = qframe.export(qmodel, "compressed-tensors", tmp_path / "ct", options={"dtype": "float32"})
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": "tensor",
                                         "symmetric": True, "type": "float"}
    tensors = load_file(str(directory / "model.safetensors"))
    caches = qmodel.describe().caches
    for i in range(2):
        for role, expected in zip("kv", caches[i].scales()):
            scale = tensors[f"model.layers.{i}.self_attn.{role}_scale"]
            assert scale.shape == (1,) and scale.dtype == torch.float32
            assert scale.item() == expected.item()  # amax/448 of what the cache holds
    assert validate_checkpoint(directory) == []
    # transformers 5.24 does not apply kv_cache_scheme (its attention signature is not the one
    # compressed-tensors looks for) and drops k_scale/v_scale: the weights still load.
    assert_same_weights(qmodel, load(directory))


def tiny_moe(family: str):
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128)
    else:
        config = transformers.MixtralConfig(
            hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, vocab_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.eval()


def quantized_moe(family: str, scheme: str, dtype=torch.float32):
    stage = {"quantizer": "rtn", "targets": ["Linear", "Experts"], **SCHEMES[scheme]}
    return qframe.quantize(tiny_moe(family).to(dtype), parse_recipe({"stage": [stage]}), calibration=IDS % 128,
                           device="cpu")


@pytest.mark.parametrize("family, leaves, scheme", [
    ("qwen3_moe", "mlp.experts.0.gate_proj", "w4a16-g32"), ("mixtral", "block_sparse_moe.experts.0.w1", "w4a16-g32"),
    ("qwen3_moe", "mlp.experts.0.gate_proj", "fp8-dynamic"), ("mixtral", "block_sparse_moe.experts.0.w1", "mxfp4a16")])
def test_experts_are_written_per_expert_and_transformers_loads_them(family, leaves, scheme, tmp_path):
    """Fused experts one linear an expert, under the hub checkpoints' names; transformers merges
    them back into fused weights equal to qframe's (the schemes its expert path decompresses:
    symmetric int, FP8 per channel, MXFP4); the router is in ignore."""
    qmodel = quantized_moe(family, scheme)
    directory = qframe.export(qmodel, "compressed-tensors", tmp_path / "ct", options={"dtype": "float32"})
    assert validate_checkpoint(directory) == []
    tensors = load_file(str(directory / "model.safetensors"))
    assert f"model.layers.0.{leaves}.weight_scale" in tensors
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert f"model.layers.0.{leaves.split('.experts')[0]}.gate" in config["ignore"]
    loaded = load(directory)
    assert_same_weights(qmodel, loaded)
    for layer in range(2):
        experts = qmodel.model.get_submodule(f"model.layers.{layer}.mlp.experts")
        for weight in ("gate_up_proj", "down_proj"):
            merged = getattr(loaded.get_submodule(f"model.layers.{layer}.mlp.experts"), weight)
            assert torch.equal(merged.detach(), experts.dequantized(weight)), (layer, weight)


@pytest.mark.parametrize("family, leaves, scheme", [("mixtral", "block_sparse_moe.experts.0.w1", "nvfp4"),
                                                    ("qwen3_moe", "mlp.experts.0.gate_proj", "w4a16-g32-asym")])
def test_experts_transformers_cannot_load_decompress_with_the_package(family, leaves, scheme, tmp_path):
    """transformers 5.24's expert path mis-reads NVFP4 (it drops the global scale) and refuses
    asymmetric int; the package's own decompressor, per expert, gives qframe's experts: exactly
    for int (float32 scales), within one bfloat16 rounding for NVFP4 (a bfloat16 model; the
    package multiplies in bfloat16, qframe in float32 and then rounds)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    nvfp4 = scheme == "nvfp4"
    qmodel = quantized_moe(family, scheme, torch.bfloat16 if nvfp4 else torch.float32)
    directory = qframe.export(qmodel, "compressed-tensors", tmp_path / "ct",
                              options={"dtype": "auto" if nvfp4 else "float32"})
    assert validate_checkpoint(directory) == []
    group = json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    spec = QuantizationScheme(targets=["Linear"], weights=group["weights"], input_activations=group["input_activations"])
    tensors = load_file(str(directory / "model.safetensors"))
    hub, gate, up, down = (leaves.rsplit(".0.", 1)[0], *(("gate_proj", "up_proj", "down_proj")
                                                         if family == "qwen3_moe" else ("w1", "w3", "w2")))
    experts = qmodel.model.get_submodule("model.layers.1.mlp.experts")
    gate_up, down_proj = experts.dequantized("gate_up_proj"), experts.dequantized("down_proj")
    rows = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        for leaf, want in ((gate, gate_up[e, :rows]), (up, gate_up[e, rows:]), (down, down_proj[e])):
            prefix = f"model.layers.1.{hub}.{e}.{leaf}."
            local = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            got = compressor.decompress(local, spec)["weight"]
            if nvfp4:
                torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=0, msg=f"{e} {leaf}")
            else:
                assert torch.equal(got, want), (e, leaf)


def refusal(stage: dict, kv: dict | None = None) -> str:
    registry = make_registry()
    stages = [{"quantizer": "rtn", **stage}] + ([{"quantizer": "kv_cache", "activations": kv}] if kv else [])
    plan = resolve(parse_recipe({"stage": stages}), registry)
    description = check_plan(tiny("llama").to("meta"), plan, registry).description
    with pytest.raises(ExportError) as caught:
        CompressedTensorsExporter().check(description)
    return str(caught.value)


@pytest.mark.parametrize("stage, kv, needle", [
    ({"weights": {"type": "float", "bits": 8, "format": "e5m2", "granularity": "tensor"}}, None, "E4M3"),
    ({"weights": {"type": "float", "bits": 8, "granularity": "group", "group_size": 32}}, None, "per tensor or per"),
    ({"weights": {"bits": 4, "group_size": 32}, "activations": FP8_A}, None, "int8 activations"),
    ({"weights": {"type": "float", "bits": 4}, "activations": {"type": "float", "bits": 4, "dynamic": True}}, None,
     "static global scale"),
    ({"weights": {"bits": 4, "group_size": 48}}, None, "whole number of groups"),
    ({"weights": {"bits": 4, "group_size": 32}}, {"bits": 8}, "FP8 E4M3"),
])
def test_what_the_format_cannot_hold_is_refused_before_calibration(stage, kv, needle):
    message = refusal(stage, kv)
    assert needle in message and "model.layers.0" in message


def test_the_validator_names_a_wrong_tensor(tmp_path):
    _, directory = export(tiny("llama"), SCHEMES["w4a16-g32"], tmp_path / "ct")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = tensors["model.layers.0.mlp.up_proj.weight_scale"].float()
    del tensors["model.layers.1.mlp.down_proj.weight_shape"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    problems = validate_checkpoint(directory)
    assert any("up_proj.weight_scale is float32" in p for p in problems)
    assert any("down_proj.weight_shape is missing" in p for p in problems)


def test_a_recipes_export_table_writes_it(tiny_model_dir, tmp_path):
    recipe = tmp_path / "w4.toml"
    recipe.write_text(f'[model]\nid = "{tiny_model_dir}"\n[calibration]\ndataset = "generated"\nsamples = 2\n'
                      'seq_len = 16\n[[stage]]\nquantizer = "rtn"\nweights = { bits = 4, group_size = 32 }\n'
                      '[export]\nbackend = "compressed-tensors"\ndtype = "bfloat16"\n')
    result = qframe.apply(str(recipe), output=tmp_path / "out")
    written = Path(result.directory if hasattr(result, "directory") else tmp_path / "out") / "compressed-tensors"
    assert validate_checkpoint(written) == []
    assert json.loads((written / "config.json").read_text())["dtype"] == "bfloat16"


def test_command_line_exports_and_validates(tmp_path, capsys):
    from qframe.cli import main as cli_main

    qmodel = qframe.quantize(tiny("llama"), parse_recipe({"stage": [{"quantizer": "rtn", **SCHEMES["w4a16-g32"]}]}),
                             calibration=IDS, device="cpu")
    qframe.export(qmodel, "qframe", tmp_path / "native")
    assert cli_main(["export", str(tmp_path / "native"), "--backend", "compressed-tensors"]) == 0
    written = tmp_path / "native" / "compressed-tensors"
    assert cli_main(["validate", str(written)]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    config = json.loads((written / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["format"] == "pack-quantized"


def test_linears_quantized_differently_go_in_groups_of_their_own(tmp_path):
    """Attention int4, MLP FP8 per channel: two groups naming their modules, top-level format
    mixed-precision; the package accepts it and transformers loads it (in its compressed mode:
    its dequantize path handles one group only) to qframe's logits."""
    recipe = {"stage": [{"quantizer": "rtn", "targets": ["*.self_attn.*"], **SCHEMES["w4a16-g32"]},
                        {"quantizer": "rtn", "targets": ["*.mlp.*"],
                         "weights": {"type": "float", "bits": 8, "granularity": "channel"}}]}
    qmodel = qframe.quantize(tiny("llama"), parse_recipe(recipe), calibration=IDS, device="cpu")
    directory = qframe.export(qmodel, "compressed-tensors", tmp_path / "ct", options={"dtype": "float32"})
    assert validate_checkpoint(directory) == []
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    ct.quantization.QuantizationConfig.model_validate(config)
    assert config["format"] == "mixed-precision"
    groups = config["config_groups"]
    assert [g["format"] for g in groups.values()] == ["pack-quantized", "float-quantized"]
    assert "model.layers.1.self_attn.o_proj" in groups["group_0"]["targets"]
    assert "model.layers.0.mlp.down_proj" in groups["group_1"]["targets"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, qmodel.model(IDS).logits, rtol=0, atol=1e-4)
