"""The ``hf`` backend: unified Hugging Face checkpoints against modelopt's ``export_hf_checkpoint``
(names, shapes, dtypes, hf_quant_config.json, config.json's quantization_config), bit-exact
unpacking, the validator, refusals before anything is written, and the command line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qframe
from qframe import numerics
from qframe.checkpoint import save_native
from qframe.cli import main as cli_main
from qframe.errors import ExportError
from qframe.recipe import load_recipe
from qframe.testing import random_tokens, tiny_llama_model, tiny_model
from qframe_plugins.hf import HFExporter, HFOptions

from peer import run_peer_script
from test_trtllm_export import AWQ, FP8, NVFP4, W4A8  # the same stages for both backends

RECIPES = {"FP8": FP8, "NVFP4": NVFP4, "W4A16_AWQ": AWQ.replace("GROUP", "128"), "W4A8_AWQ": W4A8}
QUANT_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale")

# modelopt quantizes and exports every algorithm of one model in one process (each costs ~10 s).
MODELOPT = """
import copy, contextlib, io, json, warnings
import torch
warnings.simplefilter("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM

fp8 = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
fp8["quant_cfg"] = list(fp8["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
awq = copy.deepcopy(mtq.INT4_AWQ_CFG)
for entry in awq["quant_cfg"]:
    if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
        entry["cfg"]["block_sizes"][-1] = AWQ_GROUP
awq["algorithm"] = {"method": "awq_lite", "alpha_step": 0.5}  # a short search: the layout is what is compared
configs = {"FP8": fp8, "NVFP4": mtq.NVFP4_DEFAULT_CFG, "W4A16_AWQ": awq, "W4A8_AWQ": mtq.W4A8_AWQ_BETA_CFG}
ids = torch.tensor(json.loads((directory / "ids.json").read_text()))
for name in json.loads((directory / "algorithms.json").read_text()):
    model = AutoModelForCausalLM.from_pretrained(directory / "model").eval()
    with contextlib.redirect_stdout(io.StringIO()):
        model = mtq.quantize(model, copy.deepcopy(configs[name]), lambda m: m(input_ids=ids, use_cache=False))
        export_hf_checkpoint(model, export_dir=directory / name)
"""


def recipe_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"recipe{abs(hash(text))}.toml"
    path.write_text(text)
    return path


def quantized(model, text: str, tmp_path: Path, ids: torch.Tensor | None = None):
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1) if ids is None else ids
    return qframe.quantize(model, load_recipe(recipe_file(tmp_path, text)), calibration=ids, device="cpu")


def signature(directory: Path) -> set[tuple[str, tuple[int, ...], str]]:
    return {(k, tuple(v.shape), str(v.dtype)) for k, v in load_file(str(directory / "model.safetensors")).items()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tiny(family: str):
    """Two layers, hidden 128 (group 128 divides every width), 4 heads over 2 key/value heads
    (grouped-query attention, as SmolLM2), in bfloat16 as such models are served."""
    import transformers as tf

    if family == "llama":
        model = tiny_llama_model(hidden_size=128, intermediate_size=256)
    else:
        config = tf.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                                tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(config)
        model.config.use_cache = False
    return model.to(torch.bfloat16).eval()


def save_plain(model, folder: Path) -> None:
    """A model folder the peer loads (a GGUF-loaded model refuses save_pretrained)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # modelopt's export reads it
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def modelopt_exports(model, algorithms, folder: Path, ids: torch.Tensor, awq_group: int = 128) -> Path:
    """modelopt's unified checkpoints of ``model`` for ``algorithms``, from one peer process."""
    save_plain(model, folder / "model")
    (folder / "algorithms.json").write_text(json.dumps(list(algorithms)))
    (folder / "ids.json").write_text(json.dumps(ids.tolist()))
    run_peer_script(MODELOPT.replace("AWQ_GROUP", str(awq_group)), folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def both(request, tmp_path_factory):
    """(family, {algorithm: (qframe's QuantizedModel, its directory, modelopt's directory)})."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"hf-{family}")
    ids = random_tokens(4, 16, vocab=256, seed=1)
    theirs = modelopt_exports(tiny(family), RECIPES, folder, ids)
    pairs = {}
    for algo, text in RECIPES.items():
        qmodel = quantized(tiny(family), text, folder, ids)
        pairs[algo] = (qmodel, HFExporter().export(qmodel, folder / f"qframe-{algo}"), theirs / algo)
    return family, pairs


def assert_same_as_modelopt(ours: Path, theirs: Path) -> None:
    assert signature(ours) == signature(theirs)
    mine, reference = (read_json(d / "hf_quant_config.json")["quantization"] for d in (ours, theirs))
    assert {k: mine.get(k) for k in QUANT_KEYS} == {k: reference.get(k) for k in QUANT_KEYS}
    assert set(mine["exclude_modules"]) >= set(reference["exclude_modules"])
    mine, reference = (read_json(d / "config.json")["quantization_config"] for d in (ours, theirs))
    assert mine.pop("producer")["name"] == "qframe" and reference.pop("producer")["name"] == "modelopt"
    assert set(mine.pop("ignore")) >= set(reference.pop("ignore"))
    assert mine == reference


@pytest.mark.parametrize("algo", list(RECIPES))
def test_tensors_and_quantization_config_equal_modelopts(both, algo):
    """The same tensor names, shapes and dtypes as modelopt 0.47's export_hf_checkpoint of the
    same bfloat16 weights; the same hf_quant_config.json fields and config.json quantization_config
    (but the producer); and the validator accepts both checkpoints."""
    _, pairs = both
    _, ours, theirs = pairs[algo]
    assert_same_as_modelopt(ours, theirs)
    assert HFExporter().validate(ours) == []
    assert HFExporter().validate(theirs) == []


def dequantized(tensors: dict, prefix: str, algo: str, dtype: torch.dtype) -> torch.Tensor:
    """A linear's weight as a serving engine computes it from the checkpoint, in ``dtype``."""
    w, scale = tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"]
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = numerics.unpack_int4_rows(w).float()
        group = codes.shape[1] // scale.shape[1]
        return (codes * scale.float().repeat_interleave(group, dim=1)).to(dtype)
    if algo == "FP8":
        return (w.float() * scale.float()).to(dtype)
    codes = numerics.unpack(w, 4, False, w.shape[1] * 2, "nvfp4")
    block = scale.float() * tensors[f"{prefix}.weight_scale_2"].float()
    return (numerics.e2m1_decode(codes) * block.repeat_interleave(16, dim=1)).to(dtype)


@pytest.mark.parametrize("algo", list(RECIPES))
def test_unpacking_reproduces_the_fake_quantized_weights_bit_for_bit(both, algo):
    """Every quantized linear's exported weight, unpacked and scaled, is QuantLinear.weight bit
    for bit; pre_quant_scale is what the forward multiplies inputs by (ones where AWQ folded the
    scale into the linear before); input and KV cache scales are the module's own."""
    _, pairs = both
    qmodel, ours, _ = pairs[algo]
    tensors = load_file(str(ours / "model.safetensors"))
    modules = qmodel.quantized_modules()
    assert len(modules) == 14
    for name, module in modules.items():
        assert torch.equal(dequantized(tensors, name, algo, torch.bfloat16), module.weight), name
        if f"{name}.pre_quant_scale" in tensors:
            kept = module.input_prescale if module.has_prescale else torch.ones(module.in_features)
            assert torch.equal(tensors[f"{name}.pre_quant_scale"], kept.to(torch.bfloat16)), name
        else:
            assert not module.has_prescale, name
        if module.input_args is not None:
            assert torch.equal(tensors[f"{name}.input_scale"], module.input_scale.float()), name
        if name.endswith(("k_proj", "v_proj")) and algo == "FP8":  # the attention's cache scales
            cache = qmodel.model.get_submodule(name.rpartition(".")[0]).kv_cache_quant
            role = name[-6]
            assert torch.equal(tensors[f"{name}.{role}_scale"], getattr(cache, f"{role}_scale").float()), name
    if algo == "W4A8_AWQ":  # one FP8 factor for linears that read one input (engines fuse them)
        for layer in ("model.layers.0", "model.layers.1"):
            qkv = [tensors[f"{layer}.self_attn.{p}_proj.weight_scale_2"] for p in "qkv"]
            assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
            amax = max(modules[f"{layer}.self_attn.{p}_proj"].weight.float().abs().amax() for p in "qkv")
            assert torch.equal(qkv[0], amax / 448)


def test_awq_keeps_pre_quant_scales_only_where_modelopt_has_them(both):
    """Scales in front of q/k/v and gate/up are folded into the norms; o_proj keeps AWQ's
    (grouped-query attention: v_proj cannot take it), down_proj gets ones (folded into up_proj)."""
    _, pairs = both
    qmodel, ours, _ = pairs["W4A16_AWQ"]
    tensors = load_file(str(ours / "model.safetensors"))
    prescaled = {n.removesuffix(".pre_quant_scale").split(".", 3)[-1] for n in tensors if n.endswith("pre_quant_scale")}
    assert prescaled == {"self_attn.o_proj", "mlp.down_proj"}
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.pre_quant_scale"], torch.ones(256, dtype=torch.bfloat16))
    assert qmodel.model.model.layers[0].self_attn.o_proj.has_prescale


# -- the validator, shards, what is left unquantized ---------------------------------------------------

def test_the_validator_names_what_is_wrong(tmp_path):
    qmodel = quantized(tiny("llama"), W4A8, tmp_path)
    out = HFExporter().export(qmodel, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.input_scale"]
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = tensors["model.layers.0.mlp.down_proj.weight_scale"].half()
    save_file(tensors, str(out / "model.safetensors"))
    quant = read_json(out / "hf_quant_config.json")
    quant["quantization"]["exclude_modules"].remove("lm_head")
    (out / "hf_quant_config.json").write_text(json.dumps(quant))
    problems = HFExporter().validate(out)
    assert any("model.layers.1.mlp.up_proj.input_scale is missing" in p for p in problems)
    assert any("model.layers.0.mlp.down_proj.weight_scale is float16" in p for p in problems)
    assert any("lm_head.weight is not quantized but exclude_modules does not list lm_head" in p for p in problems)
    assert any("quantization_config does not match" in p for p in problems)
    assert cli_main(["validate", str(out), "--backend", "hf"]) == 2


def test_shards_and_the_index_hold_the_same_tensors(tmp_path):
    qmodel = quantized(tiny("llama"), NVFP4, tmp_path)
    one = HFExporter().export(qmodel, tmp_path / "one")
    many = HFExporter(HFOptions(max_shard_size="40KB")).export(qmodel, tmp_path / "many")
    index = read_json(many / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (many / "model.safetensors").exists()
    joined = {}
    for file in files:
        joined.update(load_file(str(many / file)))
    single = load_file(str(one / "model.safetensors"))
    assert set(joined) == set(single) == set(index["weight_map"])
    assert all(torch.equal(joined[k].reshape(-1).view(torch.uint8), single[k].reshape(-1).view(torch.uint8)) for k in single)
    assert HFExporter().validate(many) == []


def test_unquantized_linears_are_excluded_and_written_in_the_export_dtype(tmp_path):
    text = FP8.replace('activations = { type = "float", bits = 8 }\n[[stage]]',
                       'activations = { type = "float", bits = 8 }\nignore = ["lm_head", "*down_proj"]\n[[stage]]', 1)
    out = HFExporter(HFOptions(dtype="float16")).export(quantized(tiny("llama"), text, tmp_path), tmp_path / "hf")
    excluded = read_json(out / "hf_quant_config.json")["quantization"]["exclude_modules"]
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head", "model.embed_tokens"} <= set(excluded)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    assert "model.layers.0.mlp.down_proj.weight_scale" not in tensors
    assert tensors["model.norm.weight"].dtype == torch.float16
    assert read_json(out / "config.json")["dtype"] == "float16"
    assert HFExporter().validate(out) == []


# -- refusals before anything is written --------------------------------------------------------------------

INT = '[[stage]]\nquantizer = "rtn"\nweights = { bits = BITS }\n'


@pytest.mark.parametrize("text,needle", [
    (INT.replace("BITS", "4, group_size = 128, symmetric = false"), "set weights.symmetric = true"),
    (INT.replace("BITS", "4, group_size = 32"), "set weights.group_size = 64 or 128"),
    (W4A8.replace("128", "64"), "take groups of 128 input channels"),
    (INT.replace("BITS", "8") + 'activations = { bits = 8, dynamic = true, granularity = "token" }',
     "--backend tensorrt-llm or qframe"),
    (FP8.replace("bits = 8 }\n[[stage]]", "bits = 8, dynamic = true, granularity = \"token\" }\n[[stage]]", 1),
     "(not dynamic)"),
    (AWQ.replace("GROUP", "128") + '[[stage]]\nquantizer = "kv_cache"\nactivations = { bits = 8 }\n',
     "k_scale/v_scale are FP8 E4M3 cache scales"),
    (AWQ.replace("GROUP", "128").replace("group_size = 128 }", "group_size = 128 }\ntargets = [\"re:layers\\\\.0\\\\.\"]")
     + INT.replace("BITS", "4, group_size = 64") + 'targets = ["re:layers\\\\.1\\\\."]\n', "different algorithms"),
])
def test_what_the_format_cannot_express_is_refused_before_calibration_and_before_writing(text, needle, tmp_path):
    model = tiny("llama")
    with pytest.raises(ExportError) as before:
        HFExporter().check(qframe.describe(model, load_recipe(recipe_file(tmp_path, text))))
    assert needle in str(before.value)
    with pytest.raises(ExportError) as after:
        qframe.export(quantized(model, text, tmp_path), "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    if "different algorithms" not in needle:
        assert needle in str(after.value)


def test_gpt2_conv1d_projections_are_refused_rather_than_written_transposed(tmp_path):
    with pytest.raises(ExportError, match="Conv1D.*--backend tensorrt-llm"):
        HFExporter().check(qframe.describe(tiny_model("gpt2"), load_recipe(recipe_file(tmp_path, FP8.split("[[stage]]\nquantizer = \"kv")[0]))))


# -- command line ----------------------------------------------------------------------------------------------

def test_qframe_export_writes_the_hf_folder_from_a_native_checkpoint_without_calibrating(tokenizer, tmp_path):
    model = tiny_llama_model(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256).to(torch.bfloat16)
    qmodel = quantized(model, AWQ.replace("GROUP", "64"), tmp_path)
    qmodel.tokenizer = tokenizer
    native = save_native(qmodel, tmp_path / "native")
    proc = subprocess.run([sys.executable, "-m", "qframe", "export", str(native), "--backend", "hf"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = native / "hf"
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    direct = load_file(str(HFExporter().export(qmodel, tmp_path / "direct") / "model.safetensors"))
    again = load_file(str(out / "model.safetensors"))
    assert set(direct) == set(again)
    assert all(torch.equal(direct[k].reshape(-1).view(torch.uint8), again[k].reshape(-1).view(torch.uint8)) for k in direct)
    assert cli_main(["validate", str(out), "--backend", "hf"]) == 0

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.quantization_config["quant_method"] == "modelopt"
    assert config.quantization_config["quant_algo"] == "W4A16_AWQ"
    assert config.model_type == "llama" and config.hidden_size == 128


# -- the real model --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_matches_modelopt_and_unpacks_bit_for_bit(smollm2_float32, tmp_path):
    """SmolLM2-135M (hidden 576, tied embeddings) in bfloat16, quantized by qframe and by modelopt
    on the same weights and one short window: FP8 + FP8 KV cache, NVFP4 and W4A16_AWQ at group
    64 (128 does not divide 576). W4A8_AWQ takes groups of 128 only, so the backend refuses it
    for this model before calibration."""
    model = copy.deepcopy(smollm2_float32.model).to(torch.bfloat16)  # the session's one load, as served
    model.config.dtype = torch.bfloat16  # what the peer loads it in
    ids = random_tokens(1, 32, vocab=49152, seed=1)
    # A short AWQ search: this test is about the checkpoint's layout and packing, not AWQ's quality.
    awq = AWQ.replace("GROUP", "64") + "options = { n_grid = 4, clip = false }\n"
    algorithms = {"FP8": FP8, "NVFP4": NVFP4, "W4A16_AWQ": awq}
    theirs = modelopt_exports(model, algorithms, tmp_path, ids, awq_group=64)
    for algo, text in algorithms.items():
        qmodel = quantized(copy.deepcopy(model), text, tmp_path, ids)
        ours = HFExporter().export(qmodel, tmp_path / f"qframe-{algo}")
        assert_same_as_modelopt(ours, theirs / algo)
        assert "lm_head.weight" not in load_file(str(ours / "model.safetensors"))  # tied, as modelopt writes it
        assert HFExporter().validate(ours) == []
        tensors = load_file(str(ours / "model.safetensors"))
        for name, module in qmodel.quantized_modules().items():
            assert torch.equal(dequantized(tensors, name, algo, torch.bfloat16), module.weight), (algo, name)
    with pytest.raises(ExportError, match="groups of 128"):
        HFExporter().check(qframe.describe(model, load_recipe(recipe_file(tmp_path, W4A8.replace("128", "64")))))
