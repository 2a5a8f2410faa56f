"""TensorRT-LLM checkpoints of mixtures of experts (Mixtral, Qwen2-MoE with its shared expert,
Qwen3-MoE) with weight-only int, FP8 and NVFP4 experts: the layout against modelopt's
``export_tensorrt_llm_checkpoint`` (tensor names, shapes, dtypes, the quantization section; FP8
and NVFP4 experts' tensors bit for bit), bit-exact unpacking of every expert, tensor/pipeline-
parallel shards, the validator naming what a broken checkpoint lacks, and what TensorRT-LLM
cannot take refused before calibration.

modelopt 0.47 cannot export transformers 5's fused experts (``len()`` of the experts module:
pinned below). It exports the same weights once each MoE block is rebuilt the way transformers
4 held it (a ``ModuleList`` of per-expert linears), which is what the comparison uses.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qframe
from qframe import numerics
from qframe.errors import ExportError
from qframe.recipe import parse_recipe
from qframe.testing import make_registry, tiny_model
from qframe_plugins.tensorrt_llm import TensorRTLLMExporter, TensorRTLLMOptions
from qframe_plugins.tensorrt_llm.validate import validate_checkpoint

from peer import run_peer_script

REGISTRY = make_registry()
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}


def moe_config(family: str, hidden: int = 64, inter: int = 64):
    """Two layers of 4 experts (top 2) ``inter`` wide; 4 heads of 16, grouped-query attention but
    in Qwen2-MoE (with a q/k/v bias and a shared expert ``inter`` wide). Qwen2-MoE weighs its
    experts without renormalizing (Qwen1.5-MoE's default), the others renormalize."""
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                  max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, num_key_value_heads=2, head_dim=16, intermediate_size=inter,
                                          num_local_experts=4)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_key_value_heads=4, intermediate_size=96,
                                           moe_intermediate_size=inter, shared_expert_intermediate_size=inter,
                                           num_experts=4, norm_topk_prob=False, mlp_only_layers=[])
    return transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                       moe_intermediate_size=inter, num_experts=4, norm_topk_prob=True)


def moe_model(family: str, dtype: torch.dtype = torch.bfloat16, **sizes):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(moe_config(family, **sizes))
    model.config.use_cache = False
    return model.to(dtype).eval()


def stage(targets=("Linear", "Experts"), **weights) -> dict:
    return {"quantizer": "rtn", "targets": list(targets), "ignore": ["lm_head"], "weights": weights}


# The weight-only algorithms TensorRT-LLM's MoE takes, as qframe's RTN produces them.
ALGOS = {"W4A16_AWQ": stage(bits=4, group_size=64), "W4A16": stage(bits=4, granularity="channel"),
         "W8A16": stage(bits=8)}
# FP8 and NVFP4 with static inputs (one calibrated scale a fused weight, shared by its experts).
FP8_W, FP8_A = {"type": "float", "bits": 8, "granularity": "tensor"}, {"type": "float", "bits": 8}
NVFP4_WA = {"type": "float", "bits": 4, "format": "nvfp4", "group_size": 16}
STATIC = {"FP8": {**stage(), "quantizer": "fp8", "weights": FP8_W, "activations": FP8_A},
          "NVFP4": {**stage(), "quantizer": "nvfp4", "weights": NVFP4_WA, "activations": NVFP4_WA}}


def quantize(model, *stages: dict):
    return qframe.quantize(model, parse_recipe({"stage": list(stages)}), device="cpu", registry=REGISTRY)


def export(qmodel, directory: Path, **options) -> Path:
    """qframe.export: write, then validate (a checkpoint that fails validation raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # W4A16/W8A16's requantization warning has its own test
        return qframe.export(qmodel, "tensorrt-llm", directory, options=options, registry=REGISTRY)


def rank(directory: Path, r: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(directory / f"rank{r}.safetensors"))


def config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def signature(directory: Path) -> set[tuple[str, tuple[int, ...], str]]:
    return {(k, tuple(v.shape), str(v.dtype)) for k, v in rank(directory).items()}


def unpack_experts(tensors: dict, prefix: str, algo: str) -> torch.Tensor:
    """``fc`` or ``proj`` of a layer's experts as TensorRT-LLM computes with them, ``[E, out, in]``:
    int4 codes times their group scales for W4A16_AWQ (float32); FP8 codes times each expert's
    scale; NVFP4 E2M1 codes times their block scales times each expert's global scale; else the
    stored 16-bit weights."""
    w = tensors[f"{prefix}.weight"]
    if algo == "FP8":
        return w.float() * tensors[f"{prefix}.weights_scaling_factor"].unsqueeze(-1)  # [E, 1] -> [E, 1, 1]
    if algo == "NVFP4":
        e, out, half = w.shape
        codes = numerics.unpack(w.reshape(e * out, half), 4, False, 2 * half, "nvfp4").reshape(e, out, 2 * half)
        global_scale = tensors[f"{prefix}.weights_scaling_factor_2"][:, None, None]
        block = tensors[f"{prefix}.weights_scaling_factor"].float() * global_scale
        return numerics.e2m1_decode(codes) * block.repeat_interleave(16, dim=-1)
    if algo != "W4A16_AWQ":
        return w
    codes = torch.stack([numerics.unpack_int4_rows(w[e]) for e in range(w.shape[0])]).float()
    scale = tensors[f"{prefix}.weights_scaling_factor"]
    return codes * scale.repeat_interleave(codes.shape[-1] // scale.shape[-1], dim=-1)


def up_then_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``gate_up_proj [E, 2I, H]`` (gate rows first) in TensorRT-LLM's order."""
    gate, up = gate_up.chunk(2, dim=1)
    return torch.cat([up, gate], dim=1)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` compared bit for bit (float8 has no equality of its own everywhere)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# -- modelopt ---------------------------------------------------------------------------------------

MODELOPT = """
import copy, contextlib, io, json, warnings
import torch
import torch.nn.functional as F
from torch import nn
warnings.simplefilter("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_tensorrt_llm_checkpoint
from transformers import AutoModelForCausalLM

awq = copy.deepcopy(mtq.INT4_AWQ_CFG)
for entry in awq["quant_cfg"]:
    if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
        entry["cfg"]["block_sizes"][-1] = 64
CONFIGS = {"W4A16_AWQ": awq, "FP8": mtq.FP8_DEFAULT_CFG, "NVFP4": mtq.NVFP4_DEFAULT_CFG}
ids = torch.load(directory / "ids.pt")
# decoder type, the per-expert linears (gate, up, down), the MoE block's class name modelopt knows
FAMILIES = {"mixtral": ("llama", ("w1", "w3", "w2"), "MixtralSparseMoeBlock"),
            "qwen2_moe": ("qwen", ("gate_proj", "up_proj", "down_proj"), "Qwen2MoeSparseMoeBlock"),
            "qwen3_moe": ("qwen", ("gate_proj", "up_proj", "down_proj"), "Qwen3MoeSparseMoeBlock")}


class Expert(nn.Module):
    def __init__(self, names, gate, up, down):
        super().__init__()
        self.names = names
        for name, weight in zip(names, (gate, up, down)):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data.copy_(weight)
            setattr(self, name, linear)

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


def unfused(mlp, names, class_name, renormalize):
    # transformers 4's block: a router and a ModuleList of experts (the same weights)
    block = type(class_name, (nn.Module,), {})()
    experts, (e, h) = mlp.experts, mlp.gate.weight.shape
    block.gate = nn.Linear(h, e, bias=False)
    block.gate.weight.data.copy_(mlp.gate.weight.data)
    gate, up = experts.gate_up_proj.data.chunk(2, dim=1)
    block.experts = nn.ModuleList(Expert(names, gate[k], up[k], experts.down_proj.data[k]) for k in range(e))
    for name in ("shared_expert", "shared_expert_gate"):
        if hasattr(mlp, name):
            setattr(block, name, getattr(mlp, name))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = F.softmax(self.gate(flat).float(), -1).topk(2, -1)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for k, expert in enumerate(self.experts):
            rows = (chosen == k).any(-1)
            if rows.any():
                out[rows] += (weights[rows] * (chosen[rows] == k)).sum(-1, keepdim=True).to(x.dtype) * expert(flat[rows])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(x.shape)

    type(block).forward = forward
    return block


results = {}
for family, (decoder, names, class_name) in FAMILIES.items():
    for algo, config in CONFIGS.items():
        # transformers 5's fused experts, as they are
        model = AutoModelForCausalLM.from_pretrained(directory / family).eval()
        with contextlib.redirect_stdout(io.StringIO()):
            model = mtq.quantize(model, copy.deepcopy(config), lambda m: m(input_ids=ids, use_cache=False))
            try:
                export_tensorrt_llm_checkpoint(model, decoder, torch.float16, directory / f"{family}-{algo}-fused",
                                               inference_tensor_parallel=1)
                results[f"{family} {algo}"] = "exported"
            except Exception as exc:
                results[f"{family} {algo}"] = f"{type(exc).__name__}: {exc}"
        # the same weights, each MoE block held as transformers 4 did
        model = AutoModelForCausalLM.from_pretrained(directory / family).eval()
        for layer in model.model.layers:
            layer.mlp = unfused(layer.mlp, names, class_name, getattr(model.config, "norm_topk_prob", True))
        with contextlib.redirect_stdout(io.StringIO()):
            model = mtq.quantize(model, copy.deepcopy(config), lambda m: m(input_ids=ids, use_cache=False))
            export_tensorrt_llm_checkpoint(model, decoder, torch.float16, directory / family / algo,
                                           inference_tensor_parallel=1)
(directory / "results.json").write_text(json.dumps(results))
"""
CONFIG_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale")


# The tokens modelopt calibrates on, and qframe's FP8/NVFP4 runs too (on the float model's activations).
CALIBRATION = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def modelopt(tmp_path_factory) -> Path:
    """modelopt's checkpoints of the three families (``<family>/<algo>``: INT4_AWQ_CFG with groups
    of 64, FP8_DEFAULT_CFG, NVFP4_DEFAULT_CFG), float32 weights exported in float16, and how its
    export of the fused experts ended for each: one peer process."""
    folder = tmp_path_factory.mktemp("modelopt-moe")
    for family in FAMILIES:
        model = moe_model(family, torch.float32)
        model.config.architectures = [ARCHITECTURES[family]]
        model.save_pretrained(folder / family)
    torch.save(CALIBRATION, folder / "ids.pt")
    run_peer_script(MODELOPT, folder)
    return folder


@pytest.fixture(scope="module")
def qframe_awq(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """qframe's W4A16_AWQ (RTN, groups of 64) checkpoints of the same float32 weights, in float16:
    as RTN leaves them (no input prescale: ``pre_quant_scale`` false), and with one input prescale
    kept on the first layer's ``o_proj`` as AWQ keeps one where it cannot fold it (then every
    linear and every expert carries ``prequant_scaling_factor``, ones where none was kept)."""
    folder, out = tmp_path_factory.mktemp("qframe-moe"), {}
    for family in FAMILIES:
        qmodel = quantize(moe_model(family, torch.float32), ALGOS["W4A16_AWQ"])
        plain = export(qmodel, folder / f"{family}-plain", dtype="float16")
        o_proj = qmodel.model.model.layers[0].self_attn.o_proj
        o_proj.set_input_prescale(torch.linspace(0.5, 2.0, o_proj.in_features))
        out[family] = (plain, export(qmodel, folder / f"{family}-prescaled", dtype="float16"))
    return out


def test_modelopt_cannot_export_transformers5_fused_experts(modelopt):
    """modelopt 0.47 quantizes the fused experts (one weight quantizer an expert) but its
    TensorRT-LLM export takes ``len()`` of the experts module, which transformers 5 no longer
    makes a ModuleList, with INT4_AWQ_CFG, FP8_DEFAULT_CFG and NVFP4_DEFAULT_CFG alike. When a later
    modelopt exports them, this test fails: compare its checkpoint of the fused model directly then."""
    results = json.loads((modelopt / "results.json").read_text())
    for family in FAMILIES:
        for algo in ("W4A16_AWQ", *STATIC):
            found = results[f"{family} {algo}"]
            assert found.startswith("TypeError") and "has no len()" in found, (family, algo, found)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_and_quantization_config_equal_modelopts(modelopt, qframe_awq, family):
    """Names, shapes and dtypes in rank0 and the quantization keys equal modelopt's for the same
    weights (its per-expert ModuleList export); exclude_modules covers modelopt's (the routers,
    Qwen2-MoE's shared expert gates, lm_head). modelopt always writes prequantization scales:
    qframe writes them where an input prescale was kept (``pre_quant_scale``), so the plain RTN
    checkpoint equals modelopt's without them."""
    plain, prescaled = qframe_awq[family]
    theirs = modelopt / family / "W4A16_AWQ"
    reference = config(theirs)["quantization"]
    assert signature(prescaled) == signature(theirs)
    assert {k: config(prescaled)["quantization"].get(k) for k in CONFIG_KEYS} == {k: reference.get(k) for k in CONFIG_KEYS}
    assert signature(plain) == {t for t in signature(theirs) if not t[0].endswith("prequant_scaling_factor")}
    assert config(plain)["quantization"]["pre_quant_scale"] is False
    for ours in (plain, prescaled):
        mine = config(ours)
        assert set(mine["quantization"]["exclude_modules"]) >= set(reference["exclude_modules"])
        assert mine["architecture"] == config(theirs)["architecture"] == ARCHITECTURES[family]
        assert mine["hidden_act"] == config(theirs)["hidden_act"] == "swiglu"
    if "moe" in config(theirs):  # modelopt 0.47 writes no moe table for Qwen2-MoE (see the next test)
        assert config(plain)["moe"] == config(theirs)["moe"]


def test_the_validator_accepts_modelopts_mixtral_and_names_what_its_qwen_configs_lack(modelopt):
    """modelopt's Mixtral checkpoints validate as they are (INT4_AWQ, FP8 and NVFP4; its
    moe_tp_size/moe_ep_size mapping keys too). Its Qwen-MoE configs lack what TensorRT-LLM's QWen
    model builds the layers from: ``qwen_type`` (Qwen3-MoE; then TensorRT-LLM builds no query/key
    norms) and the whole ``moe`` table (Qwen2-MoE; then it builds dense MLPs). The validator names
    them."""
    for algo in ("W4A16_AWQ", *STATIC):
        assert validate_checkpoint(modelopt / "mixtral" / algo, REGISTRY) == [], algo
    qwen3 = "\n".join(validate_checkpoint(modelopt / "qwen3_moe" / "W4A16_AWQ", REGISTRY))
    assert "moe_intermediate_size: None, expected a positive integer" in qwen3, qwen3
    assert "qwen_type: None, expected 'qwen3_moe'" in qwen3, qwen3
    qwen2 = "\n".join(validate_checkpoint(modelopt / "qwen2_moe" / "W4A16_AWQ", REGISTRY))
    assert "config.json: moe: None, expected a table with num_experts, top_k and normalization_mode" in qwen2, qwen2
    assert "qwen_type: None, expected 'qwen2_moe'" in qwen2, qwen2


# -- FP8 and NVFP4 experts ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qframe_float(tmp_path_factory) -> dict[tuple[str, str], tuple]:
    """``{(family, algo): (qmodel, directory)}``: qframe's FP8 and NVFP4 checkpoints (the ``fp8`` and
    ``nvfp4`` quantizers, experts and linears, static inputs) of the same float32 weights as
    modelopt's, exported in float16, calibrated on the same tokens and, as modelopt calibrates, on
    the float model's activations."""
    folder, out = tmp_path_factory.mktemp("qframe-moe-float"), {}
    for family in FAMILIES:
        for algo, static in STATIC.items():
            recipe = parse_recipe({"calibration": {"propagate": "float"}, "stage": [static]})
            qmodel = qframe.quantize(moe_model(family, torch.float32), recipe, calibration=CALIBRATION, device="cpu",
                                     registry=REGISTRY)
            out[family, algo] = qmodel, export(qmodel, folder / f"{family}-{algo}", dtype="float16")
    return out


@pytest.mark.parametrize("algo", list(STATIC))
def test_shared_expert_gate_and_up_share_the_scale_fc_holds(qframe_float, algo, tmp_path):
    """TensorRT-LLM fuses Qwen2-MoE's shared-expert gate and up into ``shared_expert.fc`` with
    one per-tensor scale (FP8) or global scale (NVFP4): the quantizer gives them that one scale,
    so the checkpoint is written without requantizing them (no warning) and serves the evaluated
    weights."""
    qmodel, _ = qframe_float["qwen2_moe", algo]
    buffer = "weight_scale" if algo == "FP8" else "weight_global_scale"
    for layer in qmodel.model.model.layers:
        shared = layer.mlp.shared_expert
        assert torch.equal(shared.gate_proj.get_buffer(buffer), shared.up_proj.get_buffer(buffer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qframe.export(qmodel, "tensorrt-llm", tmp_path / "trt", registry=REGISTRY)
    assert not [w for w in caught if "different per-tensor weight" in str(w.message)], [str(w.message) for w in caught]


FLOAT_CASES = pytest.mark.parametrize("family, algo", [(f, a) for f in FAMILIES for a in STATIC])


def _one_for_scalar(found: set[tuple[str, tuple[int, ...], str]]) -> set[tuple[str, tuple[int, ...], str]]:
    return {(name, shape or (1,), dtype) for name, shape, dtype in found}


@FLOAT_CASES
def test_fp8_and_nvfp4_experts_equal_modelopts(modelopt, qframe_float, family, algo):
    """Against modelopt's export of the same weights (its per-expert ModuleList): the same names,
    shapes and dtypes in rank0 and the same quantization keys (modelopt writes NVFP4's per-tensor
    scales of ordinary linears 0-d where qframe writes ``[1]``: TensorRT-LLM's Parameter takes a
    0-d value for a shape of ones). The experts' tensors are modelopt's bit for bit — FP8 ``fc``/
    ``proj`` E4M3 ``[E, out, in]`` with one f32 scale an expert ``[E, 1]``; NVFP4 packed uint8
    ``[E, out, in/2]``, E4M3 block scales ``[E, out, in/16]`` and one global scale an expert
    ``[E]``; each expert's up rows before its gate rows — since modelopt requantizes an expert's
    gate and up to the larger of their scales, which is the one scale qframe's fused
    ``gate_up_proj`` has. The one activation scale ``[1]`` of ``fc`` is modelopt's (both calibrate
    the experts' input over every token); ``proj``'s is at least modelopt's: qframe sends every
    token through every expert to calibrate it, modelopt each expert's routed tokens."""
    _, ours = qframe_float[family, algo]
    theirs = modelopt / family / algo
    assert _one_for_scalar(signature(ours)) == _one_for_scalar(signature(theirs))
    mine, reference = config(ours), config(theirs)
    assert {k: mine["quantization"].get(k) for k in CONFIG_KEYS} == \
        {k: reference["quantization"].get(k) for k in CONFIG_KEYS}
    assert mine["quantization"]["quant_algo"] == algo
    assert set(mine["quantization"]["exclude_modules"]) >= set(reference["quantization"]["exclude_modules"])
    if "moe" in reference:
        assert mine["moe"] == reference["moe"]
    mine, reference = rank(ours), rank(theirs)
    experts = [n for n in mine if n.split(".")[3:5] in (["mlp", "fc"], ["mlp", "proj"])]
    assert len(experts) == 2 * 2 * (3 if algo == "FP8" else 4)
    for name in experts:
        if name.endswith("activation_scaling_factor"):
            assert mine[name].shape == (1,)
            if ".fc." in name:
                torch.testing.assert_close(mine[name], reference[name], rtol=1e-6, atol=0)
            else:
                assert mine[name].item() >= reference[name].item() * (1 - 1e-6), name
        else:
            assert torch.equal(bits(mine[name]), bits(reference[name])), name


@FLOAT_CASES
def test_fp8_and_nvfp4_experts_unpack_to_the_quantized_model_exactly(qframe_float, family, algo):
    """Every expert dequantized from the checkpoint as TensorRT-LLM computes it (``fc``: up rows,
    then gate rows) is the quantized model's expert bit for bit, and the checkpoint holds the
    experts' own numbers: codes, scales per expert (FP8 ``[E, 1, 1]`` as ``[E, 1]``, NVFP4 block
    scales and ``[E]`` global scales) and each fused weight's one static input scale."""
    qmodel, directory = qframe_float[family, algo]
    tensors = rank(directory)
    for i, layer in enumerate(qmodel.model.model.layers):
        experts, trt = layer.mlp.experts, f"transformer.layers.{i}.mlp"
        for part, weight, order in (("fc", "gate_up_proj", up_then_gate), ("proj", "down_proj", lambda t: t)):
            prefix, buffer = f"{trt}.{part}", lambda what: experts.get_buffer(f"{weight}_{what}")
            unpacked = unpack_experts(tensors, prefix, algo)
            assert torch.equal(unpacked, order(experts.dequantized(weight))), prefix
            assert torch.equal(unpacked, order(getattr(experts, weight))), prefix  # what the model computes with
            scales = tensors[f"{prefix}.weights_scaling_factor"]
            if algo == "FP8":
                assert torch.equal(bits(tensors[f"{prefix}.weight"]), bits(order(buffer("codes"))))
                assert torch.equal(scales, buffer("scale").reshape(-1, 1))
            else:
                assert torch.equal(bits(scales), bits(order(buffer("scale"))))
                assert torch.equal(tensors[f"{prefix}.weights_scaling_factor_2"], buffer("global_scale"))
            assert torch.equal(tensors[f"{prefix}.activation_scaling_factor"], buffer("input_scale").reshape(1))


@pytest.mark.parametrize("algo", list(STATIC))
def test_tensor_parallel_shards_split_fp8_and_nvfp4_experts(qframe_float, algo, tmp_path):
    """At tp_size 2 each rank holds every expert's share: ``fc`` its own up rows and gate rows
    (with NVFP4's block scales), ``proj`` its input columns (NVFP4's packed bytes and block
    scales alike); each expert's weight scale (FP8 ``[E, 1]``, NVFP4 ``[E]``) and the one
    activation scale ``[1]`` are replicated. No expert parallelism: the mapping holds no
    ``moe_tp_size``/``moe_ep_size`` (TensorRT-LLM then splits every expert by tp_size), and the
    validator says it cannot check an expert-parallel mapping rather than pass one."""
    qmodel, one_dir = qframe_float["qwen2_moe", algo]
    one, two = rank(one_dir), export(qmodel, tmp_path / "tp2", tp_size=2, dtype="float16")
    assert config(two)["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    ranks = [rank(two, r) for r in range(2)]
    assert all(set(r) == set(one) for r in ranks)
    experts = [n for n in one if n.split(".")[3:5] in (["mlp", "fc"], ["mlp", "proj"])]
    for name in experts:
        full, shards = bits(one[name]), [bits(r[name]) for r in ranks]
        if full.dim() < 3:  # per expert or per layer: replicated
            assert all(torch.equal(s, full) for s in shards), name
        elif ".fc." in name:  # [E, up | gate, ...]: each half split by rank
            halves = [s.chunk(2, 1) for s in shards]
            whole = torch.cat([torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)], 1)
            assert torch.equal(whole, full), name
        else:  # proj: input columns
            assert torch.equal(torch.cat(shards, 2), full), name
    expert_parallel = tmp_path / "ep"
    shutil.copytree(two, expert_parallel)
    edit_config(lambda c: c["mapping"].update(moe_tp_size=1, moe_ep_size=2))(expert_parallel)
    assert validate_checkpoint(expert_parallel, REGISTRY) == [
        "config.json: expert parallelism (mapping.moe_ep_size = 2) is valid, but this validator has no tensor layout "
        "for it; its tensors were not checked"]


# On the Mixtral checkpoints: hidden 64, 4 experts 64 wide.
FC1, PROJ0 = "transformer.layers.1.mlp.fc", "transformer.layers.0.mlp.proj"
FLOAT_CORRUPTIONS = {
    "FP8 activation scale missing": (
        "FP8", lambda t: t.pop(f"{FC1}.activation_scaling_factor"),
        f"{FC1}.activation_scaling_factor: missing (expected float32 [1], one for all experts)"),
    "FP8 activation scale per expert": (
        "FP8", lambda t: t.update({f"{FC1}.activation_scaling_factor": torch.ones(4)}),
        f"{FC1}.activation_scaling_factor: shape [4], expected [1] (one for all experts"),
    "FP8 weight scales flat": (
        "FP8", lambda t: t.update({f"{PROJ0}.weights_scaling_factor": t[f"{PROJ0}.weights_scaling_factor"].reshape(4)}),
        f"{PROJ0}.weights_scaling_factor: shape [4], expected [4, 1] (one per expert"),
    "FP8 experts in float16": (
        "FP8", lambda t: t.update({f"{FC1}.weight": t[f"{FC1}.weight"].half()}),
        f"{FC1}.weight: dtype float16, expected float8_e4m3fn (FP8 experts' up and gate rows)"),
    "NVFP4 global scales [E, 1]": (
        "NVFP4", lambda t: t.update({f"{PROJ0}.weights_scaling_factor_2": torch.ones(4, 1)}),
        f"{PROJ0}.weights_scaling_factor_2: shape [4, 1], expected [4] (one global scale per expert"),
    "NVFP4 global scales missing": (
        "NVFP4", lambda t: t.pop(f"{FC1}.weights_scaling_factor_2"),
        f"{FC1}.weights_scaling_factor_2: missing (expected float32 [4], one global scale per expert)"),
    "NVFP4 codes unpacked": (
        "NVFP4", lambda t: t.update({f"{FC1}.weight": torch.zeros(4, 128, 64, dtype=torch.uint8)}),
        f"{FC1}.weight: shape [4, 128, 64], expected [4, 128, 32]"),
    "NVFP4 block scales in float32": (
        "NVFP4", lambda t: t.update({f"{PROJ0}.weights_scaling_factor": t[f"{PROJ0}.weights_scaling_factor"].float()}),
        f"{PROJ0}.weights_scaling_factor: dtype float32, expected float8_e4m3fn (per expert, row and block of 16 "
        "inputs)"),
    "NVFP4 activation scale zero": (
        "NVFP4", lambda t: t.update({f"{FC1}.activation_scaling_factor": torch.zeros(1)}),
        f"{FC1}.activation_scaling_factor: smallest value 0.0, expected every scale > 0"),
}


@pytest.mark.parametrize("algo, change, needle", FLOAT_CORRUPTIONS.values(), ids=FLOAT_CORRUPTIONS.keys())
def test_the_validator_names_what_fp8_and_nvfp4_experts_lack(qframe_float, tmp_path, algo, change, needle):
    """qframe's FP8/NVFP4 MoE checkpoints validate (every family, checked on export); a broken one
    is named tensor by tensor, with the shape and dtype TensorRT-LLM's MoE loads."""
    _, directory = qframe_float["mixtral", algo]
    assert validate_checkpoint(directory, REGISTRY) == []
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    edit_tensors(change)(broken)
    problems = validate_checkpoint(broken, REGISTRY)
    assert any(needle in p for p in problems), problems


# -- qframe's checkpoints, unpacked ----------------------------------------------------------------

@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ALGOS], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    family, algo = request.param
    qmodel = quantize(moe_model(family), ALGOS[algo])
    return family, algo, qmodel, export(qmodel, tmp_path_factory.mktemp(f"{family}-{algo}") / "trt")


def test_unpacking_every_expert_gives_back_qframes_weights_exactly(exported):
    """``mlp.fc`` is each expert's up rows then its gate rows and ``mlp.proj`` its down
    projection, stacked over the experts: W4A16_AWQ's codes times their scales are the experts'
    dequantized weights bit for bit; W4A16/W8A16 hold the 16-bit weights the model computes with
    (TensorRT-LLM's builder quantizes them itself); in the model's dtype both are exactly what the
    model serves. The router is the model's, in float32."""
    family, algo, qmodel, directory = exported
    tensors = rank(directory)
    assert config(directory)["quantization"]["quant_algo"] == algo
    for i, layer in enumerate(qmodel.model.model.layers):
        experts, trt = layer.mlp.experts, f"transformer.layers.{i}.mlp"
        fc, proj = unpack_experts(tensors, f"{trt}.fc", algo), unpack_experts(tensors, f"{trt}.proj", algo)
        if algo == "W4A16_AWQ":
            assert torch.equal(fc, up_then_gate(experts.dequantized("gate_up_proj")))
            assert torch.equal(proj, experts.dequantized("down_proj"))
        assert fc.to(torch.bfloat16).equal(up_then_gate(experts.gate_up_proj))
        assert proj.to(torch.bfloat16).equal(experts.down_proj)
        router = tensors[f"{trt}.router.weight"]
        assert router.dtype == torch.float32 and torch.equal(router, layer.mlp.gate.weight.float())


@pytest.mark.parametrize("exported", [("qwen2_moe", a) for a in ALGOS], indirect=True, ids=list(ALGOS))
def test_shared_expert_is_fused_like_the_experts_and_its_gate_stays_float(exported):
    """Qwen2-MoE's shared expert is an ordinary quantized MLP, its up and gate rows fused in
    ``mlp.shared_expert.fc`` in the experts' order; its sigmoid gate is written in float (the
    weight the model computes with) and excluded from quantization."""
    family, algo, qmodel, directory = exported
    tensors, excluded = rank(directory), config(directory)["quantization"]["exclude_modules"]
    for i, layer in enumerate(qmodel.model.model.layers):
        shared, trt = layer.mlp.shared_expert, f"transformer.layers.{i}.mlp"
        fc = unpack_experts({k: v.unsqueeze(0) for k, v in tensors.items() if k.startswith(f"{trt}.shared_expert.fc")},
                            f"{trt}.shared_expert.fc", algo)[0]
        assert fc.to(torch.bfloat16).equal(torch.cat([shared.up_proj.weight, shared.gate_proj.weight]))
        assert tensors[f"{trt}.shared_expert_gate.weight"].equal(layer.mlp.shared_expert_gate.weight)
        assert f"{trt}.shared_expert_gate" in excluded and f"{trt}.router" in excluded
        if algo in ("W4A16", "W8A16"):  # TensorRT-LLM matches these weights by their own names
            assert f"{trt}.shared_expert_gate.weight" in excluded


def test_config_describes_the_mixture_of_experts(exported):
    family, algo, qmodel, directory = exported
    written, hf = config(directory), qmodel.model.config
    assert written["architecture"] == ARCHITECTURES[family] and written["hidden_act"] == "swiglu"
    assert written["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": 0 if family == "qwen2_moe" else 1}
    assert written["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    if family == "mixtral":
        assert written["intermediate_size"] == hf.intermediate_size
    else:
        assert written["qwen_type"] == family and written["moe_intermediate_size"] == hf.moe_intermediate_size
        assert written["moe_shared_expert_intermediate_size"] == (64 if family == "qwen2_moe" else 0)
        assert written["attn_bias"] is (family == "qwen2_moe")
    if family == "qwen3_moe":
        tensors = rank(directory)
        norm = qmodel.model.model.layers[1].self_attn.q_norm.weight
        assert tensors["transformer.layers.1.attention.q_layernorm.weight"].equal(norm)


def test_weight_only_int_is_requantized_by_tensorrt_llm_and_says_so(tmp_path):
    """TensorRT-LLM's builder quantizes W4A16/W8A16 16-bit weights again with scale = amax / 8
    (amax / 128): qframe's fitted scales survive only where a channel reaches -8 (-128)."""
    qmodel = quantize(moe_model("mixtral"), ALGOS["W4A16"])
    with pytest.warns(UserWarning, match=r"output channels never reach the code -8, .* scale = amax / 8"):
        TensorRTLLMExporter().export(qmodel, tmp_path / "trt")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layout_read_back_from_its_config_has_the_same_tensors(family):
    """The validator's layout (from the written config.json, by architecture, and through the
    generic QWenForCausalLM by qwen_type) names the tensors the writer's (from the Hugging Face
    config) does, with the model's own shapes."""
    from qframe_plugins.tensorrt_llm.layout import layout_class, layout_for

    model = moe_model(family)
    written = layout_for(model, REGISTRY)
    checkpoint = {"architecture": written.architecture, "vocab_size": written.vocab, "hidden_size": written.hidden,
                  "num_hidden_layers": written.num_layers, "num_attention_heads": written.heads,
                  "num_key_value_heads": written.kv_heads, "head_size": written.head_size, **written.config()}
    generic = {**checkpoint, "architecture": "QWenForCausalLM"}
    for config_json in [checkpoint] + ([generic] if family != "mixtral" else []):
        read = layout_class(REGISTRY.layout("tensorrt-llm", architecture=config_json["architecture"])).from_checkpoint(
            config_json)
        assert type(read) is type(written) and read.sizes == written.sizes
        for i in range(written.num_layers):
            assert read.linears(i) == written.linears(i) and read.experts(i) == written.experts(i)
            assert read.layer_tensors(i) == written.layer_tensors(i) and read.float_modules(i) == written.float_modules(i)
    params = dict(model.named_parameters())
    for i in range(written.num_layers):
        for plain in written.layer_tensors(i):
            assert tuple(params[plain.source].shape) == plain.shape, plain.name
        (experts,) = written.experts(i)
        assert (tuple(params[f"{experts.module}.gate_up_proj"].shape), tuple(params[f"{experts.module}.down_proj"].shape)) \
            == (experts.fc_shape(1), experts.proj_shape(1))


# -- tensor and pipeline parallelism ---------------------------------------------------------------

def test_tensor_parallel_shards_split_each_expert_and_put_back_together(tmp_path):
    """At tp_size 2 each rank holds every expert's share: ``fc`` its own up rows and its own gate
    rows (each half split apart, as TensorRT-LLM's swiglu pairs them per rank), ``proj`` and its
    group scales its input columns; routers, norms and the shared expert gate are replicated;
    the shared expert splits like any gated MLP. At pp_size 2 each stage holds its own layers'
    experts and routers, and the routers' exclusion holds on every stage."""
    qmodel = quantize(moe_model("qwen2_moe", hidden=128, inter=128), ALGOS["W4A16_AWQ"])
    one = rank(export(qmodel, tmp_path / "tp1"))
    two = export(qmodel, tmp_path / "tp2", tp_size=2)
    ranks = [rank(two, r) for r in range(2)]
    assert all(set(r) == set(one) for r in ranks)
    for name, full in one.items():
        shards = [r[name] for r in ranks]
        if ".fc." in name and full.dim() >= 2:  # [E, up | gate, ...] or the shared expert's [up | gate, ...]
            dim = full.dim() - 2
            halves = [s.chunk(2, dim) for s in shards]
            whole = torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
            assert torch.equal(whole.view(torch.uint8), full.view(torch.uint8)), name
        elif ".proj." in name and full.dim() >= 2 or name.endswith("proj.prequant_scaling_factor"):
            assert torch.equal(torch.cat(shards, -1).view(torch.uint8), full.view(torch.uint8)), name
        elif "attention" not in name and "lm_head" not in name and "vocab" not in name:
            assert all(torch.equal(s, full) for s in shards), name
    staged = export(qmodel, tmp_path / "pp2", pp_size=2)
    assert {n for n in rank(staged, 1) if ".mlp." in n} == {n for n in one if n.startswith("transformer.layers.0.mlp")}


# -- the validator ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe-validate")
    out = {"qwen2-awq": export(quantize(moe_model("qwen2_moe"), ALGOS["W4A16_AWQ"]), folder / "qwen2-awq"),
           "qwen2-w8": export(quantize(moe_model("qwen2_moe"), ALGOS["W8A16"]), folder / "qwen2-w8")}
    return out


def edit_tensors(change):
    def edit(directory: Path) -> None:
        tensors = rank(directory)
        change(tensors)
        save_file(tensors, str(directory / "rank0.safetensors"))
    return edit


def edit_config(change):
    def edit(directory: Path) -> None:
        written = config(directory)
        change(written)
        (directory / "config.json").write_text(json.dumps(written))
    return edit


def _exclude_without(name: str):
    return edit_config(lambda c: c["quantization"].update(
        exclude_modules=[p for p in c["quantization"]["exclude_modules"] if p != name]))


FC, PROJ = "transformer.layers.1.mlp.fc", "transformer.layers.0.mlp.proj"
# On the Qwen2-MoE W4A16_AWQ checkpoint: hidden 64, 4 experts 64 wide, groups of 64.
CORRUPTIONS = {
    "missing expert scales": (edit_tensors(lambda t: t.pop(f"{FC}.weights_scaling_factor")),
                              f"rank0.safetensors: {FC}.weights_scaling_factor: missing (expected float32 [4, 128, 1]"),
    "missing expert weight": (edit_tensors(lambda t: t.pop(f"{PROJ}.weight")),
                              f"rank0.safetensors: {PROJ}.weight: missing (expected int8 [4, 32, 64]"),
    "an expert short": (edit_tensors(lambda t: t.update({f"{FC}.weight": t[f"{FC}.weight"][:3].clone()})),
                        f"rank0.safetensors: {FC}.weight: shape [3, 64, 64], expected [4, 64, 64]"),
    "scales per tensor": (edit_tensors(lambda t: t.update({f"{PROJ}.weights_scaling_factor": torch.ones(4, 1, 1)})),
                          f"{PROJ}.weights_scaling_factor: shape [4, 1, 1], expected [4, 64, 1]"),
    "unpacked experts": (edit_tensors(lambda t: t.update({f"{FC}.weight": torch.zeros(4, 128, 64, dtype=torch.int8)})),
                         f"{FC}.weight: shape [4, 128, 64], expected [4, 64, 64]"),
    "router in bfloat16": (edit_tensors(lambda t: t.update({"transformer.layers.0.mlp.router.weight":
                                                            t["transformer.layers.0.mlp.router.weight"].bfloat16()})),
                           "transformer.layers.0.mlp.router.weight: dtype bfloat16, expected float32 (MoE router)"),
    "router missing": (edit_tensors(lambda t: t.pop("transformer.layers.1.mlp.router.weight")),
                       "transformer.layers.1.mlp.router.weight: missing (expected float32 [4, 64], MoE router)"),
    "shared gate missing": (edit_tensors(lambda t: t.pop("transformer.layers.0.mlp.shared_expert_gate.weight")),
                            "transformer.layers.0.mlp.shared_expert_gate.weight: missing (expected bfloat16 [1, 64]"),
    "no moe table": (edit_config(lambda c: c.pop("moe")), "config.json: moe: None, expected a table with num_experts"),
    "one expert": (edit_config(lambda c: c["moe"].update(num_experts=1)),
                   "config.json: moe.num_experts: 1, expected an integer of at least 2"),
    "top_k": (edit_config(lambda c: c["moe"].update(top_k=5)),
              "config.json: moe.top_k: 5, expected an integer from 1 to num_experts (4)"),
    "unknown moe key": (edit_config(lambda c: c["moe"].update(num_shared_experts=1)),
                        "config.json: moe.num_shared_experts: unknown key"),
    "normalization mode": (edit_config(lambda c: c["moe"].update(normalization_mode=7)),
                           "config.json: moe.normalization_mode: 7, expected one of 0 (NONE), 1 (RENORMALIZE)"),
    "silu": (edit_config(lambda c: c.update(hidden_act="silu")), "config.json: hidden_act: 'silu', expected \"swiglu\""),
    "qwen_type": (edit_config(lambda c: c.update(qwen_type="qwen2")),
                  "config.json: qwen_type: 'qwen2', expected 'qwen2_moe'"),
    "experts not dividing tp": (edit_config(lambda c: (c.update(moe_intermediate_size=65),
                                                       c["mapping"].update(tp_size=2, world_size=2))),
                                "config.json: mapping.tp_size: 2 does not divide moe_intermediate_size 65"),
    "router quantized": (_exclude_without("transformer.layers.1.mlp.router"),
                         "config.json: quantization.exclude_modules: does not name transformer.layers.1.mlp.router, "
                         "which TensorRT-LLM would then quantize with W4A16_AWQ"),
    "shared expert dropped": (edit_config(lambda c: c["quantization"]["exclude_modules"].append("*.0.mlp")),
                              "TensorRT-LLM rebuilds an excluded Qwen2-MoE mixture of experts without its shared expert"),
    "moe mapping keys taken": (edit_config(lambda c: c["mapping"].update(moe_tp_size=1, moe_ep_size=1)), None),
    "generic QWen architecture": (edit_config(lambda c: c.update(architecture="QWenForCausalLM")), None),
    "generic QWen of no known type": (edit_config(lambda c: c.update(architecture="QWenForCausalLM", qwen_type="qwen")),
                                      "config.json: qwen_type: 'qwen'; this validator reads qwen2, qwen2_moe, qwen3_moe "
                                      "under QWenForCausalLM"),
    "moe mapping": (edit_config(lambda c: c["mapping"].update(moe_tp_size=2, moe_ep_size=1)),
                    "config.json: mapping.moe_tp_size * moe_ep_size: 2 * 1, expected tp_size = 1"),
}


@pytest.mark.parametrize("edit, needle", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_each_problem_of_a_moe_checkpoint_is_named(checkpoints, tmp_path, edit, needle):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen2-awq"], broken)
    edit(broken)
    problems = validate_checkpoint(broken, REGISTRY)
    if needle is None:  # an edit TensorRT-LLM takes: nothing to report
        assert problems == []
    else:
        assert any(needle in p for p in problems), problems


def test_weight_only_exclusions_must_name_the_weights_too(checkpoints, tmp_path):
    """W8A16/W4A16: TensorRT-LLM quantizes a weight unless exclude_modules matches the weight's
    own name, so a shared expert gate excluded only by its module name would be quantized."""
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen2-w8"], broken)
    _exclude_without("transformer.layers.0.mlp.shared_expert_gate.weight")(broken)
    problems = validate_checkpoint(broken, REGISTRY)
    assert ("config.json: quantization.exclude_modules: does not name transformer.layers.0.mlp.shared_expert_gate.weight"
            " (it names transformer.layers.0.mlp.shared_expert_gate, but TensorRT-LLM quantizes W8A16 weights by their "
            "own names)") in problems


def test_float_experts_beside_quantized_linears_are_excluded_with_their_weights(tmp_path):
    """Experts left in float (targets = ["Linear"]) are the excluded MoE module
    (``transformer.layers.N.mlp``): TensorRT-LLM builds it unquantized from 16-bit weights; at
    W8A16 their weights are excluded by name too."""
    for algo in ("W4A16_AWQ", "W8A16"):
        qmodel = quantize(moe_model("qwen3_moe"), {**ALGOS[algo], "targets": ["Linear"], "ignore": ["lm_head", "*experts"]})
        directory = export(qmodel, tmp_path / algo)
        excluded, tensors = config(directory)["quantization"]["exclude_modules"], rank(directory)
        assert "transformer.layers.0.mlp" in excluded
        assert tensors["transformer.layers.0.mlp.fc.weight"].equal(
            up_then_gate(qmodel.model.model.layers[0].mlp.experts.gate_up_proj))
        assert ("transformer.layers.0.mlp.fc.weight" in excluded) is (algo == "W8A16")


# -- refused before calibration ----------------------------------------------------------------------

def _check(model, *stages: dict, **options) -> str:
    description = qframe.describe(model, parse_recipe({"stage": list(stages)}), registry=REGISTRY)
    assert not description.calibrated  # nothing was read: the plan alone is refused
    with pytest.raises(ExportError) as info:
        TensorRTLLMExporter(TensorRTLLMOptions(**options)).check(description)
    return str(info.value)


@pytest.mark.parametrize("experts, needle", [
    ({"quantizer": "fp8", "weights": FP8_W},
     "activations none: FP8 needs static FP8 E4M3 activations with one calibrated scale per tensor (input_scale)"),
    ({"quantizer": "nvfp4", "weights": NVFP4_WA},
     "activations none: NVFP4 quantizes activations to NVFP4 too, with a static global scale (input_scale)"),
    ({"quantizer": "fp8", "weights": FP8_W, "activations": {**FP8_A, "dynamic": True, "granularity": "token"}},
     "TensorRT-LLM holds static activation scales only"),
    ({"quantizer": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}},
     "TensorRT-LLM holds quantized experts as W4A16_AWQ, W4A16, W8A16, FP8 or NVFP4 only (W4A16_AWQ: symmetric int4 "
     "weights per group of 64 or 128, activations in float; W4A16: symmetric int4 weights per output channel, "
     "activations in float; W8A16: symmetric int8 weights per output channel, activations in float; FP8: FP8 E4M3 "
     "weights per tensor, static FP8 E4M3 activations per tensor; NVFP4: NVFP4 weights and activations, with a static "
     "input global scale)"),
    ({"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}}, "take groups of 64 or 128 input channels"),
    ({"quantizer": "rtn", "weights": {"bits": 4, "group_size": 64, "symmetric": False}}, "set weights.symmetric = true"),
], ids=["fp8-weights-only", "nvfp4-weights-only", "fp8-dynamic", "int8-w8a8", "int4-group-32", "int4-asymmetric"])
def test_experts_tensorrt_llm_cannot_hold_are_refused(experts, needle):
    message = _check(moe_model("mixtral"), {**experts, "targets": ["Experts"]})
    assert "model.layers.0.mlp.experts" in message and needle in message, message


@pytest.mark.parametrize("algo", list(STATIC))
def test_fp8_and_nvfp4_experts_pass_the_check_before_calibration(algo):
    description = qframe.describe(moe_model("qwen2_moe"), parse_recipe({"stage": [STATIC[algo]]}), registry=REGISTRY)
    assert not description.calibrated and description.experts
    TensorRTLLMExporter(TensorRTLLMOptions(tp_size=2)).check(description)


def test_nvfp4_experts_whose_share_of_a_rank_splits_a_block_are_refused():
    """NVFP4 ``proj`` holds block scales per 16 input columns of each rank: an expert 48 wide
    splits into 24 columns at tp_size 2."""
    message = _check(moe_model("qwen3_moe", inter=48), STATIC["NVFP4"], tp_size=2)
    assert ("NVFP4 at tp_size = 2: each rank's share of the model's moe_intermediate_size 48 must be a whole number "
            "of 16-channel blocks") in message, message


def test_experts_with_quantized_activations_are_refused():
    model = moe_model("qwen3_moe")
    description = qframe.describe(model, parse_recipe({"stage": [ALGOS["W8A16"]]}), registry=REGISTRY)
    name = "model.layers.1.mlp.experts"
    description.experts[name] = dataclasses.replace(description.experts[name], activations=description.experts[
        name].weights)  # what a stage quantizing experts' inputs would plan
    with pytest.raises(ExportError, match=f"{name}: experts with weights int8 .* activations int8 .* activations in float"):
        TensorRTLLMExporter().check(description)


def test_experts_and_linears_quantized_differently_are_refused():
    message = _check(moe_model("mixtral"), ALGOS["W4A16_AWQ"] | {"targets": ["Linear"]},
                     ALGOS["W8A16"] | {"targets": ["Experts"]})
    assert "would be quantized with different algorithms" in message and "W8A16" in message and "W4A16_AWQ" in message


@pytest.mark.parametrize("family, needle", [
    ("gpt_oss", "gpt_oss (GptOssForCausalLM): TensorRT-LLM builds gpt-oss in its PyTorch flow only"),
    ("deepseek_v3", "deepseek_v3 (DeepseekV3ForCausalLM): TensorRT-LLM's engine flow builds DeepSeek-V2 but not V3"),
    ("qwen2_moe", "qwen2_moe: decoder layer(s) [0] have a dense MLP (mlp_only_layers = [0]"),
])
def test_mixtures_of_experts_tensorrt_llm_has_no_model_for_are_refused(family, needle):
    message = _check(tiny_model(family), ALGOS["W8A16"])
    assert message.startswith(needle) and "--backend hf" in message, message


def test_float_experts_cannot_stay_beside_a_quantized_qwen2_moe():
    message = _check(moe_model("qwen2_moe"), ALGOS["W4A16_AWQ"] | {"targets": ["Linear"]})
    assert "rebuilds an excluded Qwen2-MoE mixture of experts without its shared expert" in message


def test_a_kept_input_prescale_cannot_be_written_weight_only(tmp_path):
    """W8A16/W4A16 checkpoints hold 16-bit weights and no prequant_scaling_factor: an input
    prescale AWQ kept would be lost, so the export is refused (after calibration: only then is
    it known) before anything is written."""
    qmodel = quantize(moe_model("mixtral"), ALGOS["W8A16"])
    o_proj = qmodel.model.model.layers[1].self_attn.o_proj
    o_proj.set_input_prescale(torch.full((o_proj.in_features,), 2.0))
    with pytest.raises(ExportError, match="model.layers.1.self_attn.o_proj: keeps an input prescale .* a W8A16 "
                                          "checkpoint holds 16-bit weights"):
        export(qmodel, tmp_path / "trt")
    assert not (tmp_path / "trt").exists()


def test_groups_that_tensor_parallelism_would_split_are_refused():
    message = _check(moe_model("qwen3_moe"), ALGOS["W4A16_AWQ"], tp_size=2)
    assert "W4A16_AWQ group 64 at tp_size = 2" in message and "not a multiple of 128" in message
