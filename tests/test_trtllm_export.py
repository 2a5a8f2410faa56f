"""The ``tensorrt-llm`` backend: checkpoints against modelopt's ``export_tensorrt_llm_checkpoint``
(names, shapes, dtypes, quantization config), bit-exact unpacking, tensor/pipeline-parallel
shards, refusals before anything is written, and the command line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qframe
from qframe import numerics
from qframe.checkpoint import save_native
from qframe.errors import ExportError
from qframe.recipe import load_recipe
from qframe.testing import random_tokens, tiny_llama_model, tiny_model
from qframe_plugins.tensorrt_llm import TensorRTLLMExporter, TensorRTLLMOptions
from qframe_plugins.tensorrt_llm.validate import validate_checkpoint
from qframe.output import RECORD
from qframe.plugins import build_registry

from peer import run_peer_script

REGISTRY = build_registry(entry_points=False)

FP8 = """
[[stage]]
quantizer = "fp8"
weights = { type = "float", bits = 8, granularity = "tensor" }
activations = { type = "float", bits = 8 }
[[stage]]
quantizer = "kv_cache"
activations = { type = "float", bits = 8 }
"""
AWQ = """
[[stage]]
quantizer = "awq"
weights = { bits = 4, group_size = GROUP }
"""
W4A8 = """
[[stage]]
quantizer = "awq"
weights = { bits = 4, group_size = 128 }
activations = { type = "float", bits = 8 }
"""
SMOOTHQUANT = """
[[stage]]
quantizer = "smoothquant"
weights = { bits = 8 }
activations = { bits = 8 }
[[stage]]
quantizer = "kv_cache"
activations = { bits = 8 }
"""
NVFP4 = """
[[stage]]
quantizer = "nvfp4"
weights = { type = "float", bits = 4 }
activations = { type = "float", bits = 4 }
"""
W8A16 = """
[[stage]]
quantizer = "rtn"
weights = { bits = 8 }
"""
# modelopt 0.47 has no INT8 KV cache config to compare with: SmoothQuant alone there.
RECIPES = {"FP8": FP8, "W4A16_AWQ": AWQ.replace("GROUP", "128"),
           "W8A8_SQ_PER_CHANNEL": SMOOTHQUANT.split('[[stage]]\nquantizer = "kv_cache"')[0], "W4A8_AWQ": W4A8}
CONFIG_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale")


def recipe_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"recipe{abs(hash(text))}.toml"
    path.write_text(text)
    return path


def quantized(model, text: str, tmp_path: Path):
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1)
    return qframe.quantize(model, load_recipe(recipe_file(tmp_path, text)), calibration=ids, device="cpu")


def write(qmodel, directory: Path, **options) -> Path:
    return TensorRTLLMExporter(TensorRTLLMOptions(**options)).export(qmodel, directory)


def signature(directory: Path, rank: int = 0) -> set[tuple[str, tuple[int, ...], str]]:
    return {(k, tuple(v.shape), str(v.dtype)) for k, v in load_file(str(directory / f"rank{rank}.safetensors")).items()}


def config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


# -- the tiny models modelopt and qframe quantize, with the very same weights ---------------------

def tiny(family: str, dtype: torch.dtype = torch.float32):
    """Two layers, hidden size 128 (AWQ's group 128 divides every width), 4 heads; Llama and
    Qwen2 with 2 key/value heads (grouped-query attention, as SmolLM2)."""
    import transformers as tf

    if family == "llama":
        model = tiny_llama_model(hidden_size=128, intermediate_size=256)
    else:
        config = {
            "qwen2": lambda: tf.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            max_position_embeddings=256, tie_word_embeddings=False),
            "gpt2": lambda: tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                                          bos_token_id=0, eos_token_id=0),
        }[family]()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(config)
        model.config.use_cache = False
    return model.to(dtype).eval()


MODELOPT = """
import copy, json, warnings, contextlib, io
import torch
warnings.simplefilter("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_tensorrt_llm_checkpoint
from transformers import AutoModelForCausalLM

fp8 = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
fp8["quant_cfg"] = list(fp8["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
configs = {"FP8": fp8, "W4A16_AWQ": mtq.INT4_AWQ_CFG, "W8A8_SQ_PER_CHANNEL": mtq.INT8_SMOOTHQUANT_CFG,
           "W4A8_AWQ": mtq.W4A8_AWQ_BETA_CFG}
ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
for name in json.loads((directory / "algorithms.json").read_text()):
    model = AutoModelForCausalLM.from_pretrained(directory / "model").eval()
    with contextlib.redirect_stdout(io.StringIO()):
        model = mtq.quantize(model, copy.deepcopy(configs[name]), lambda m: m(input_ids=ids, use_cache=False))
        export_tensorrt_llm_checkpoint(model, DECODER, torch.float16, directory / name, inference_tensor_parallel=1)
"""
DECODERS = {"llama": "llama", "qwen2": "qwen", "gpt2": "gpt"}


def save_plain(model, folder: Path) -> None:
    """A model folder the peer loads (a GGUF-loaded model refuses save_pretrained)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def modelopt_checkpoints(family: str, algorithms, folder: Path, model) -> Path:
    """modelopt's checkpoints of ``model`` for every algorithm, written by one peer process."""
    model.save_pretrained(folder / "model")
    (folder / "algorithms.json").write_text(json.dumps(list(algorithms)))
    run_peer_script(MODELOPT.replace("DECODER", repr(DECODERS[family])), folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def both(request, tmp_path_factory):
    """(family, {algorithm: (qframe's directory, modelopt's directory)}) for the four algorithms."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"trt-{family}")
    theirs = modelopt_checkpoints(family, RECIPES, folder, tiny(family))
    pairs = {}
    for algo, text in RECIPES.items():
        if family == "gpt2" and "kv_cache" in text:  # the GPT-2 adapter has no key/value projections
            text = text.split("[[stage]]\nquantizer = \"kv_cache\"")[0]
        ours = write(quantized(tiny(family), text, folder), folder / f"qframe-{algo}")
        pairs[algo] = (ours, theirs / algo)
    return family, pairs


@pytest.mark.parametrize("algo", list(RECIPES))
def test_tensors_and_quantization_config_equal_modelopts(both, algo):
    """The same names, shapes and dtypes in rank0 as modelopt 0.47's export of the same weights,
    and the same quantization keys; exclude_modules covers modelopt's.

    Where qframe differs on purpose, the test says so:
    - GPT-2 keeps its key/value cache unquantized (its adapter names no key/value projections:
      c_attn is fused), so its FP8 run has no KV cache stage;
    - W4A16_AWQ/W4A8_AWQ write ``pre_quant_scale`` true (and prequantization scales for every
      linear, ones where none was kept) only when AWQ kept some input prescale: under GQA it
      does (v_proj cannot take o_proj's scale), so Llama and Qwen2 match modelopt, which always
      writes them; GPT-2 has nothing to keep, so qframe writes none.
    """
    family, pairs = both
    ours, theirs = pairs[algo]
    mine, reference = config(ours)["quantization"], config(theirs)["quantization"]
    expected, expected_keys = signature(theirs), {k: reference.get(k) for k in CONFIG_KEYS}
    if family == "gpt2":
        if algo == "FP8":
            expected = {t for t in expected if "_cache_scaling_factor" not in t[0]}
            expected_keys["kv_cache_quant_algo"] = None
        if algo in ("W4A16_AWQ", "W4A8_AWQ"):
            expected = {t for t in expected if not t[0].endswith("prequant_scaling_factor")}
            expected_keys["pre_quant_scale"] = False
    assert signature(ours) == expected
    assert {k: mine.get(k) for k in CONFIG_KEYS} == expected_keys
    assert set(mine["exclude_modules"]) >= set(reference["exclude_modules"])
    assert config(ours)["architecture"] == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                            "gpt2": "GPTForCausalLM"}[family]
    # The validator, written from the format's description, accepts both tools' checkpoints.
    assert validate_checkpoint(ours, REGISTRY) == []
    assert validate_checkpoint(theirs, REGISTRY) == []


# -- bit-exact unpacking ---------------------------------------------------------------------------

def dequantized(tensors: dict, prefix: str, algo: str, dtype: torch.dtype) -> torch.Tensor:
    """A linear's weight as TensorRT-LLM computes it from the checkpoint, in ``dtype``."""
    w = tensors[f"{prefix}.weight"]
    scale = tensors.get(f"{prefix}.weights_scaling_factor")
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = numerics.unpack_int4_rows(w).float()
        group = codes.shape[1] // scale.shape[1]
        # The group-wise kernels take their scales in the model's dtype.
        return (codes * scale.to(dtype).float().repeat_interleave(group, dim=1)).to(dtype)
    if algo == "FP8":
        return (w.float() * scale.float()).to(dtype)
    if algo == "W8A8_SQ_PER_CHANNEL":
        return (w.float() * scale.float()[:, None]).to(dtype)
    if algo == "NVFP4":

        codes = numerics.unpack(w, 4, False, w.shape[1] * 2, "nvfp4")
        block = scale.float() * tensors[f"{prefix}.weights_scaling_factor_2"].float()
        return (numerics.e2m1_decode(codes) * block.repeat_interleave(16, dim=1)).to(dtype)
    return w


def fused_weight(model, names) -> torch.Tensor:
    return torch.cat([model.get_submodule(n).weight for n in names])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("algo,text", [("FP8", FP8), ("W4A16_AWQ", AWQ.replace("GROUP", "64")), ("W4A8_AWQ", W4A8),
                                       ("W8A8_SQ_PER_CHANNEL", SMOOTHQUANT), ("NVFP4", NVFP4)])
def test_unpacking_reproduces_the_fake_quantized_weights_bit_for_bit(algo, text, dtype, tmp_path):
    qmodel = quantized(tiny("llama", dtype), text, tmp_path)
    out = write(qmodel, tmp_path / "trt")
    assert config(out)["dtype"] == str(dtype).removeprefix("torch.")
    tensors = load_file(str(out / "rank0.safetensors"))
    model = qmodel.model
    for i in range(2):
        layer, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        linears = {f"{trt}.attention.qkv": [f"{layer}.self_attn.{p}_proj" for p in "qkv"],
                   f"{trt}.attention.dense": [f"{layer}.self_attn.o_proj"], f"{trt}.mlp.fc": [f"{layer}.mlp.gate_proj"],
                   f"{trt}.mlp.gate": [f"{layer}.mlp.up_proj"], f"{trt}.mlp.proj": [f"{layer}.mlp.down_proj"]}
        for prefix, names in linears.items():
            ours = dequantized(tensors, prefix, algo, dtype)
            assert ours.dtype == dtype and torch.equal(ours, fused_weight(model, names)), prefix
            prescale = tensors.get(f"{prefix}.prequant_scaling_factor")
            module = model.get_submodule(names[0])
            if prescale is not None:  # what the forward multiplies inputs by, in the model's dtype
                kept = module.input_prescale.to(dtype) if module.has_prescale else torch.ones(module.in_features, dtype=dtype)
                assert torch.equal(prescale, kept), prefix
            if f"{prefix}.activation_scaling_factor" in tensors:
                assert torch.equal(tensors[f"{prefix}.activation_scaling_factor"], module.input_scale.reshape(1)), prefix
        kv = tensors.get(f"{trt}.attention.kv_cache_scaling_factor")
        if kv is not None:  # the one scale TensorRT-LLM keeps: the larger of K's and V's
            cache = model.get_submodule(f"{layer}.self_attn").kv_cache_quant
            k, v = cache.k_scale.reshape(1), cache.v_scale.reshape(1)
            assert torch.equal(kv, torch.maximum(k, v))
            assert torch.equal(tensors[f"{trt}.attention.k_cache_scaling_factor"], k)
            assert torch.equal(tensors[f"{trt}.attention.v_cache_scaling_factor"], v)


def test_awq_scales_are_exact_in_the_models_16bit_dtype(tmp_path):
    model = quantized(tiny("llama", torch.bfloat16), AWQ.replace("GROUP", "64"), tmp_path).model
    scale = model.model.layers[0].mlp.down_proj.weight_scale
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.to(torch.bfloat16).float())


def test_w8a16_writes_the_dequantized_weight(tmp_path):
    """W8A16's builder quantizes 16-bit weights itself (the spec): the checkpoint holds the
    quantized model's weights in its dtype, and the builder's own rounding may move them."""
    qmodel = quantized(tiny("llama", torch.float16), W8A16, tmp_path)
    tensors = load_file(str(write(qmodel, tmp_path / "trt") / "rank0.safetensors"))
    assert config(tmp_path / "trt")["quantization"]["quant_algo"] == "W8A16"
    assert torch.equal(tensors["transformer.layers.0.mlp.proj.weight"], qmodel.model.model.layers[0].mlp.down_proj.weight)


# -- tensor and pipeline parallelism --------------------------------------------------------------

@pytest.mark.parametrize("algo,text,tp", [("W4A16_AWQ", AWQ.replace("GROUP", "64"), 2), ("FP8", FP8, 2),
                                          ("FP8", FP8, 4), ("W8A8_SQ_PER_CHANNEL", SMOOTHQUANT, 2)])
def test_tensor_parallel_shards_put_back_together_equal_one_rank(algo, text, tp, tmp_path):
    """Column-parallel tensors join along dim 0 (qkv per part: each rank holds its own q, k and v
    rows; at tp = 4 each of the 2 key/value heads is on two ranks), row-parallel ones along the
    input dimension; per-row scales and biases of row-parallel linears, per-tensor scales and
    norms are the same on every rank; lm_head is padded to a multiple of tp and split by rows."""
    qmodel = quantized(tiny("llama"), text, tmp_path)
    one = load_file(str(write(qmodel, tmp_path / "tp1") / "rank0.safetensors"))
    out = write(qmodel, tmp_path / "tpN", tp_size=tp)
    assert config(out)["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(tp)]
    assert all(set(r) == set(one) for r in ranks)
    hd, nq, nkv = 32, 4, 2
    packed = 2 if algo == "W4A16_AWQ" else 1  # int4 rows are packed two a byte
    for name, full in one.items():
        shards = [r[name] for r in ranks]
        per_row = full.dim() > 0 and full.shape[0] > 1 and not name.endswith("prequant_scaling_factor")
        if ".attention.qkv." in name and per_row:
            packed = 2 if algo == "W4A16_AWQ" and name.endswith(".weight") else 1  # int4 rows, two a byte
            rows = (nq * hd // packed, nkv * hd // packed, nkv * hd // packed)
            parts = [list(s.split([rows[0] // tp, rows[1] // min(tp, nkv), rows[2] // min(tp, nkv)])) for s in shards]
            step = max(1, tp // nkv)  # ranks that hold the same key/value head
            q = torch.cat([p[0] for p in parts])
            k, v = (torch.cat([p[j] for p in parts[::step]]) for j in (1, 2))
            assert torch.equal(torch.cat([q, k, v]).view(torch.uint8), full.view(torch.uint8)), name
            assert all(torch.equal(parts[r][1].view(torch.uint8), parts[r - r % step][1].view(torch.uint8))
                       for r in range(tp)), name
        elif any(f".{m}." in name for m in ("mlp.fc", "mlp.gate")) and per_row:
            assert torch.equal(torch.cat(shards).view(torch.uint8), full.view(torch.uint8)), name
        elif any(f".{m}." in name for m in ("attention.dense", "mlp.proj")) and (
                name.endswith((".weight", "prequant_scaling_factor")) or full.dim() == 2):
            assert torch.equal(torch.cat(shards, dim=full.dim() - 1).view(torch.uint8), full.view(torch.uint8)), name
        elif name == "lm_head.weight":
            assert torch.equal(torch.cat(shards)[:full.shape[0]], full)
        else:
            assert all(torch.equal(s.view(torch.uint8), full.view(torch.uint8)) for s in shards), name


def test_pipeline_stages_hold_their_own_layers_renumbered(tmp_path):
    qmodel = quantized(tiny("llama"), FP8, tmp_path)
    one = load_file(str(write(qmodel, tmp_path / "pp1") / "rank0.safetensors"))
    out = write(qmodel, tmp_path / "pp2", tp_size=2, pp_size=2)
    assert config(out)["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    stage0, stage1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank2.safetensors"))
    assert "transformer.vocab_embedding.weight" in stage0 and "lm_head.weight" not in stage0
    assert "transformer.ln_f.weight" in stage1 and "transformer.vocab_embedding.weight" not in stage1
    assert not any(".layers.1." in n for n in (*stage0, *stage1))
    for local, (stage, layer) in enumerate([(stage0, 0), (stage1, 1)]):
        name = "transformer.layers.0.input_layernorm.weight"
        assert torch.equal(stage[name], one[f"transformer.layers.{layer}.input_layernorm.weight"])


# -- refusals before anything is written -----------------------------------------------------------

@pytest.mark.parametrize("text,options,needle", [
    ("[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 4, group_size = 64, symmetric = false }", {}, "symmetric = true"),
    ("[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 4, group_size = 32 }", {}, "group_size = 64 or 128"),
    ("[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 8 }\nactivations = { bits = 8, dynamic = true, granularity = \"token\" }",
     {}, "dynamic = false"),
    ("[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 4, group_size = 128 }\nignore = [\"lm_head\", \"*k_proj\"]",
     {}, "model.layers.0.self_attn.k_proj"),
    (FP8, {"tp_size": 3}, "tp_size = 3"),
    (AWQ.replace("GROUP", "128"), {"tp_size": 2}, "not a multiple of 256"),
    (FP8, {"pp_size": 3}, "pp_size = 3"),
    (FP8.replace('quantizer = "fp8"', 'quantizer = "fp8"\nignore = ["lm_head", "model.layers.1.mlp.down_proj"]', 1),
     {"pp_size": 2}, "transformer.layers.1.mlp.proj is left unquantized"),
])
def test_what_the_format_cannot_express_is_refused_before_calibration_and_before_writing(text, options, needle, tmp_path):
    model = tiny("llama")
    exporter = TensorRTLLMExporter(TensorRTLLMOptions(**options))
    with pytest.raises(ExportError, match=None) as before:
        exporter.check(qframe.describe(model, load_recipe(recipe_file(tmp_path, text))))
    assert needle in str(before.value)
    with pytest.raises(ExportError) as after:
        exporter.export(quantized(model, text, tmp_path), tmp_path / "trt")
    assert needle in str(after.value)
    assert not (tmp_path / "trt").exists()


def test_gpt2_conv1d_projections_are_checked_before_they_become_linears(tmp_path):
    text = "[[stage]]\nquantizer = \"awq\"\nweights = { bits = 4, group_size = 128 }\nignore = [\"lm_head\", \"*c_fc\"]"
    model = tiny("gpt2")
    TensorRTLLMExporter().check(qframe.describe(model, load_recipe(recipe_file(tmp_path, text))))
    with pytest.raises(ExportError, match="hidden size 128 is not a multiple of 256"):
        TensorRTLLMExporter(TensorRTLLMOptions(tp_size=2)).check(qframe.describe(model, load_recipe(recipe_file(tmp_path, text))))


def test_mixed_algorithms_across_layers_are_refused(tmp_path):
    text = AWQ.replace("GROUP", "128") + '[[stage]]\nquantizer = "rtn"\nweights = { bits = 8 }\ntargets = ["re:layers\\\\.1\\\\."]\n'
    text = text.replace('weights = { bits = 4, group_size = 128 }',
                        'weights = { bits = 4, group_size = 128 }\ntargets = ["re:layers\\\\.0\\\\."]')
    with pytest.raises(ExportError, match="one quantization algorithm|one$|holds one"):
        write(quantized(tiny("llama"), text, tmp_path), tmp_path / "trt")


def test_a_family_tensorrt_llm_lacks_here_is_refused_naming_what_to_do(tmp_path):
    with pytest.raises(ExportError, match="no layout for model_type 'gpt_neox'.*--backend.*qframe_layouts"):
        TensorRTLLMExporter().check(qframe.describe(tiny_model("gpt_neox"), load_recipe(recipe_file(tmp_path, FP8))))


def test_unquantized_linears_are_listed_in_exclude_modules(tmp_path):
    text = '[[stage]]\nquantizer = "fp8"\nweights = { type = "float", bits = 8, granularity = "tensor" }\n' \
           'activations = { type = "float", bits = 8 }\nignore = ["lm_head", "*down_proj"]\n'
    out = write(quantized(tiny("llama"), text, tmp_path), tmp_path / "trt")
    excluded = config(out)["quantization"]["exclude_modules"]
    assert {"transformer.layers.0.mlp.proj", "transformer.layers.1.mlp.proj", "*lm_head", "*vocab_embedding"} <= set(excluded)
    tensors = load_file(str(out / "rank0.safetensors"))
    assert tensors["transformer.layers.0.mlp.proj.weight"].dtype == torch.float16
    assert "transformer.layers.0.mlp.proj.weights_scaling_factor" not in tensors


def test_an_unquantized_model_has_no_quant_algo(tmp_path):
    from qframe.quantized import QuantizedModel

    out = write(QuantizedModel(tiny("gpt2")), tmp_path / "trt")
    quant = config(out)["quantization"]
    assert quant["quant_algo"] is None and "*position_embedding" in quant["exclude_modules"]
    assert "transformer.position_embedding.weight" in load_file(str(out / "rank0.safetensors"))


# -- command line and apply -------------------------------------------------------------------------

def test_qframe_export_writes_a_sharded_checkpoint_from_a_native_one_without_calibrating(tmp_path):
    qmodel = quantized(tiny("llama", torch.float16), AWQ.replace("GROUP", "64"), tmp_path)
    save_native(qmodel, tmp_path / "native")
    target = tmp_path / "trt"
    proc = subprocess.run([sys.executable, "-m", "qframe", "export", str(tmp_path / "native"), "--backend", "tensorrt-llm",
                           "--output", str(target), "--set", "tp_size=2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert config(target)["mapping"]["tp_size"] == 2
    assert sorted(p.name for p in target.iterdir()) == [RECORD, "config.json", "rank0.safetensors", "rank1.safetensors"]
    direct = load_file(str(write(qmodel, tmp_path / "direct", tp_size=2) / "rank1.safetensors"))
    again = load_file(str(target / "rank1.safetensors"))
    assert set(direct) == set(again) and all(torch.equal(direct[k].view(torch.uint8), again[k].view(torch.uint8))
                                             for k in direct if direct[k].dtype.itemsize == 1)


def test_apply_writes_the_checkpoint_into_its_tensorrt_llm_folder(tokenizer, tmp_path):
    folder = tmp_path / "model"
    tiny_llama_model(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = textwrap.dedent("""
        [calibration]
        dataset = "generated"
        samples = 2
        seq_len = 16
        [[stage]]
        quantizer = "fp8"
        weights = { type = "float", bits = 8, granularity = "tensor" }
        activations = { type = "float", bits = 8 }
        [export]
        backend = "tensorrt-llm"
        """)
    result = qframe.apply(recipe_file(tmp_path, text), model=str(folder), output=tmp_path / "out", device="cpu")
    assert config(result.output / "tensorrt_llm")["quantization"]["quant_algo"] == "FP8"


# -- the real model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_matches_modelopt_for_awq_group_64_and_fp8(smollm2_float32, tmp_path):
    """SmolLM2-135M (hidden 576: group 64, since 128 does not divide it), quantized by qframe
    and by modelopt on the same weights, a few short calibration windows each."""
    model = smollm2_float32.model  # the session's one load; each algorithm quantizes its own copy
    group64 = AWQ.replace("GROUP", "64") + "options = { n_grid = 4, clip = false }\n"
    peer_code = MODELOPT.replace("mtq.INT4_AWQ_CFG", "awq64").replace(
        "configs = {", "awq64 = copy.deepcopy(mtq.INT4_AWQ_CFG)\n"
        "for e in awq64['quant_cfg']:\n"
        "    if isinstance(e, dict) and e.get('quantizer_name') == '*weight_quantizer':\n"
        "        e['cfg']['block_sizes'][-1] = 64\n"
        # A short search on both sides: this test is about the checkpoint's layout and packing.
        "awq64['algorithm'] = {'method': 'awq_lite', 'alpha_step': 0.5}\n"
        "configs = {").replace("(4, 16)", "(2, 32)").replace("0, 256", "0, 49152")
    save_plain(model, tmp_path / "model")
    (tmp_path / "algorithms.json").write_text(json.dumps(["W4A16_AWQ", "FP8"]))
    run_peer_script(peer_code.replace("DECODER", "'llama'"), tmp_path)
    for algo, text in (("W4A16_AWQ", group64), ("FP8", FP8)):
        fresh = copy.deepcopy(model)
        ids = random_tokens(2, 32, vocab=49152, seed=1)
        qmodel = qframe.quantize(fresh, load_recipe(recipe_file(tmp_path, text)), calibration=ids, device="cpu")
        ours = write(qmodel, tmp_path / f"qframe-{algo}")
        assert signature(ours) == signature(tmp_path / algo), algo
        mine, reference = config(ours)["quantization"], config(tmp_path / algo)["quantization"]
        assert {k: mine.get(k) for k in CONFIG_KEYS} == {k: reference.get(k) for k in CONFIG_KEYS}, algo
        assert set(mine["exclude_modules"]) >= set(reference["exclude_modules"])
