"""The ``hf`` and ``tensorrt-llm`` exporters written a model part at a time
(:func:`qframe.parts.write_in_parts`: ``begin`` from the structure, ``part`` per part, ``finish``):
a model whose parts are loaded one at a time from the meta device gives byte for byte the files
of one held in memory, ``begin`` reads no tensor value, shards are packed in model order, and the
warnings about values are gathered over the parts and given once."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import qframe
from qframe.description import describe_model
from qframe.errors import ExportError
from qframe.parts import Part, model_parts, part_of, write_in_parts
from qframe.recipe import parse_recipe
from qframe.testing import make_registry, random_tokens, tiny_llama_model
from qframe_plugins.hf import INDEX, HFExporter, HFOptions
from qframe_plugins.tensorrt_llm import TensorRTLLMExporter, TensorRTLLMOptions

REGISTRY = make_registry()
EXPERTS = ["Linear", "Experts"]
FP8_W, FP8_A = {"type": "float", "bits": 8, "granularity": "tensor"}, {"type": "float", "bits": 8}
KV_FP8 = {"quantizer": "kv_cache", "activations": FP8_A}  # K and V each their own scale
AWQ = {"quantizer": "awq", "weights": {"bits": 4, "group_size": 64}}
RTN4 = {"quantizer": "rtn", "targets": EXPERTS, "ignore": ["lm_head"], "weights": {"bits": 4, "group_size": 64}}
FP8 = {"quantizer": "fp8", "targets": EXPERTS, "ignore": ["lm_head"], "weights": FP8_W, "activations": FP8_A}
W4A16 = {"quantizer": "rtn", "targets": EXPERTS, "ignore": ["lm_head"],
         "weights": {"bits": 4, "granularity": "channel"}}
SMALL_SHARDS = {"max_shard_size": 40000}  # a few layers' worth: several shards


def llama(**config) -> torch.nn.Module:
    """Two layers, hidden size 128 (every tp_size 2 split is whole), float32."""
    return tiny_llama_model(hidden_size=128, intermediate_size=256, **config)


def mixtral(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Two layers of 4 experts, hidden size and expert width 128, 4 heads of 32."""
    config = transformers.MixtralConfig(
        hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_local_experts=4, num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.to(dtype).eval()


MODELS = {"llama": llama, "llama-tied": lambda: llama(tie_word_embeddings=True), "mixtral": mixtral,
          "mixtral-f32": lambda: mixtral(torch.float32)}


def quantize(model_name: str, *stages: dict):
    model = MODELS[model_name]()
    ids = random_tokens(4, 16, vocab=model.config.vocab_size, seed=1)
    return qframe.quantize(model, parse_recipe({"stage": list(stages)}), calibration=ids, device="cpu",
                           registry=REGISTRY)


class MetaLoader:
    """Keeps a model on the meta device but for the part being written, as a model too large for
    memory is: every parameter and buffer is saved aside, then sent to meta; ``load_part`` puts
    one part's back, ``free_part`` sends them to meta again (a tied tensor, held by modules of two
    parts, is loaded with either, and stays tied). Records the parts loaded, in order."""

    def __init__(self, model: torch.nn.Module, arch) -> None:
        self.parts: dict[Part, list[int]] = {}
        self.holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        self.saved: dict[int, torch.Tensor] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for leaf, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is not None:
                    key = id(tensor)
                    self.parts.setdefault(part_of(f"{prefix}.{leaf}" if prefix else leaf, arch), []).append(key)
                    self.holders.setdefault(key, []).append((module, leaf))
                    self.saved.setdefault(key, tensor.detach().clone())
        self.loaded: list[Part] = []
        self.holding: set = set()
        for part in list(self.parts):
            self._move(part, "meta")

    def _move(self, part: Part, device: str) -> None:
        for key in dict.fromkeys(self.parts.get(part, [])):
            saved = self.saved[key]
            value = saved.clone() if device == "cpu" else torch.empty_like(saved, device="meta")
            for module, leaf in self.holders[key]:
                if leaf in module._parameters:
                    module._parameters[leaf] = value if isinstance(value, torch.nn.Parameter) else \
                        (value := torch.nn.Parameter(value, requires_grad=False))
                else:
                    module._buffers[leaf] = value

    def load_part(self, part: Part) -> None:
        assert not self.holding, f"part {part!r} loaded while {self.holding} still is"
        self.holding.add(part)
        self.loaded.append(part)
        self._move(part, "cpu")

    def free_part(self, part: Part) -> None:
        self.holding.discard(part)
        self._move(part, "meta")


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def streamed(exporter, qmodel, directory: Path, loader: MetaLoader | None = None) -> tuple[list[Part], list[str]]:
    """Write ``exporter``'s files for ``qmodel`` into ``directory`` from the meta device a part at
    a time (with ``loader``, or one made here); the parts loaded in order, and the warnings given."""
    description = qmodel.describe()
    loader = loader or MetaLoader(qmodel.model, description.arch)
    loader.loaded = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_in_parts(exporter, description, directory, loader=loader, tokenizer=qmodel.tokenizer)
    return loader.loaded, [str(w.message) for w in caught]


def in_memory(exporter, qmodel, directory: Path) -> tuple[Path, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exporter.export(qmodel, directory)
    return directory, [str(w.message) for w in caught]


CASES = {  # name -> (model, stages, exporters)
    "llama-awq-kv": ("llama", [AWQ, KV_FP8], ["hf", "trt-tp1-pp2", "trt-tp2-pp2"]),
    "llama-tied-fp8": ("llama-tied", [{**FP8, "targets": ["Linear"]}, KV_FP8], ["hf", "hf-one", "trt-tp2-pp2"]),
    "mixtral-rtn4-kv": ("mixtral", [RTN4, KV_FP8], ["hf", "trt-tp1-pp2", "trt-tp2-pp2"]),
    "mixtral-fp8": ("mixtral", [FP8], ["hf", "trt-tp2-pp2"]),
    "mixtral-w4a16": ("mixtral", [W4A16], ["trt-tp1-pp2"]),
}


def make_exporter(kind: str):
    if kind == "hf":
        return HFExporter(HFOptions(**SMALL_SHARDS))
    if kind == "hf-one":
        return HFExporter(HFOptions())
    tp, pp = (int(x[2:]) for x in kind.split("-")[1:])
    return TensorRTLLMExporter(TensorRTLLMOptions(tp_size=tp, pp_size=pp), registry=REGISTRY)


@pytest.mark.parametrize("case", list(CASES))
def test_written_from_meta_a_part_at_a_time_the_files_are_those_of_the_model_in_memory(case, tmp_path):
    model, stages, kinds = CASES[case]
    qmodel = quantize(model, *stages)
    memory = {kind: in_memory(make_exporter(kind), qmodel, tmp_path / "memory" / kind) for kind in kinds}
    loader = MetaLoader(qmodel.model, qmodel.describe().arch)  # from here on the model is on meta but a part
    for kind in kinds:
        directory = tmp_path / "parts" / kind
        loaded, warned = streamed(make_exporter(kind), qmodel, directory, loader)
        assert loaded == model_parts(2)
        assert files(directory) == files(memory[kind][0]), kind
        assert warned == memory[kind][1], kind
        assert not (directory / ".qframe-spool").exists()
        if kind == "hf":  # the small shard size made several shards
            assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1


def test_hf_shards_are_packed_in_model_order_within_the_size(tmp_path):
    qmodel = quantize("mixtral", RTN4, KV_FP8)
    directory = HFExporter(HFOptions(**SMALL_SHARDS)).export(qmodel, tmp_path / "hf")
    arch = qmodel.describe().arch
    order = {part: i for i, part in enumerate(model_parts(2))}
    index = json.loads((directory / INDEX).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    spans, total = [], 0
    for file in shard_files:
        with safe_open(str(directory / file), "pt") as handle:
            names = list(handle.keys())
            sizes = [handle.get_tensor(n).nbytes for n in names]
        assert all(index["weight_map"][n] == file for n in names)
        assert sum(sizes) <= SMALL_SHARDS["max_shard_size"] or len(names) == 1
        spans.append(sorted(order[part_of(n, arch)] for n in names))
        total += sum(sizes)
    assert total == index["metadata"]["total_size"]
    assert all(a[-1] <= b[0] for a, b in zip(spans, spans[1:]))  # no part comes back after a later one began


@pytest.mark.parametrize("model, stages", [("llama", [AWQ, KV_FP8]), ("llama-tied", [{**FP8, "targets": ["Linear"]}]),
                                           ("mixtral", [RTN4, KV_FP8]), ("mixtral", [FP8])],
                         ids=["llama-awq", "llama-tied-fp8", "mixtral-rtn4", "mixtral-fp8"])
def test_begin_reads_no_values_a_model_all_on_meta_is_planned(model, stages):
    qmodel = quantize(model, *stages)
    qmodel.model.to("meta")
    description = describe_model(qmodel.model, REGISTRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does it warn: what values say is said by finish
        assert HFExporter().begin(description).quantization.quant_algo is not None
        session = TensorRTLLMExporter(TensorRTLLMOptions(tp_size=2, pp_size=2), registry=REGISTRY).begin(description)
    assert session.plan.quant_algo is not None


def test_a_part_left_on_meta_is_named_rather_than_written(tmp_path):
    qmodel = quantize("llama", {**RTN4, "targets": ["Linear"]})
    description = qmodel.describe()
    loader = MetaLoader(qmodel.model, description.arch)
    loader.load_part = lambda part: None  # loads nothing
    with pytest.raises(ExportError, match="meta device while model part 'first'"):
        write_in_parts(HFExporter(), description, tmp_path / "hf", loader=loader)
    with pytest.raises(ExportError, match="meta device while model part 'first'"):
        write_in_parts(TensorRTLLMExporter(registry=REGISTRY), description, tmp_path / "trt", loader=loader)


def test_value_warnings_are_gathered_over_the_parts_and_given_once(tmp_path):
    """float32 int4 scales are inexact in float16 (every quantized linear: the count is a
    whole-model one), W4A16 channels TensorRT-LLM requantizes are summed over the layers, and K/V
    caches with two scales are counted over all layers."""
    qmodel = quantize("mixtral-f32", RTN4, KV_FP8)
    description = qmodel.describe()
    quantized = list(description.quantized())
    loader = MetaLoader(qmodel.model, description.arch)
    _, warned = streamed(HFExporter(), qmodel, tmp_path / "hf", loader)
    assert warned == [f"{quantized[0]} and {len(quantized) - 1} more linears: int4 group scales are not exact in "
                      "float16, in which vLLM's and TensorRT-LLM's kernels take them, so the served weights differ "
                      "slightly from the evaluated ones; quantize the model in its serving dtype ([model] dtype = "
                      "\"bfloat16\" or \"float16\")"]
    _, warned = streamed(TensorRTLLMExporter(TensorRTLLMOptions(pp_size=2), registry=REGISTRY), qmodel,
                         tmp_path / "trt", loader)
    firsts = [n for n in quantized if not re.search(r"\.(k_proj|v_proj)$", n)]  # q/k/v are one linear there
    assert [w.split(":")[0] for w in warned] == [f"{firsts[0]} and {len(firsts) - 1} more linears",
                                                 "model.layers.0.mlp.experts", "model.layers.0.self_attn and 1 more"]

    qmodel = quantize("mixtral", W4A16)
    # TensorRT-LLM's q/k/v are one linear, which q_proj's state stands for (as for the scales above).
    codes = [m.weight_codes for n, m in qmodel.quantized_modules().items() if not re.search(r"\.(k_proj|v_proj)$", n)]
    codes += [m._buffers[f"{w}_codes"] for _, m in qmodel.model.named_modules() if hasattr(m, "gate_up_proj_codes")
              for w in ("gate_up_proj", "down_proj")]
    moved = sum(int(((c != 0).any(-1) & ~(c == -8).any(-1)).sum()) for c in codes)
    total = sum(c[..., 0].numel() for c in codes)
    _, warned = streamed(TensorRTLLMExporter(TensorRTLLMOptions(pp_size=2), registry=REGISTRY), qmodel,
                         tmp_path / "trt-w4a16")
    assert len(warned) == 1 and f": {moved} of {total} output channels never reach the code -8" in warned[0]
