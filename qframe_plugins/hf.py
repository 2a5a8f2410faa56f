"""``hf``: the unified Hugging Face checkpoint (safetensors + ``hf_quant_config.json``).

What TensorRT-LLM's PyTorch flow, vLLM and SGLang load as a ``modelopt`` checkpoint, laid out
as nvidia-modelopt's ``export_hf_checkpoint`` writes it: the model's own module names, each
quantized linear's packed ``weight`` beside its scales, ``hf_quant_config.json``, and the same
quantization in ``config.json``'s ``quantization_config``. Four algorithms, one a model:

=========  ================================================================================
quant_algo tensors of a quantized linear ``<name>`` (md: the checkpoint's dtype)
=========  ================================================================================
FP8        ``weight`` float8_e4m3fn [out, in]; ``weight_scale``, ``input_scale`` f32 scalars
NVFP4      ``weight`` uint8 [out, in/2] (E2M1, low nibble = even input); ``weight_scale``
           float8_e4m3fn [out, in/16]; ``weight_scale_2``, ``input_scale`` f32 scalars
W4A16_AWQ  ``weight`` uint8 [out/2, in] (int4, low nibble = even output row); ``weight_scale``
           f32 [out, in/group]; ``pre_quant_scale`` md [in] where the input is not a norm's
W4A8_AWQ   as W4A16_AWQ plus ``weight_scale_2`` (amax/448, one for linears that share an
           input) and ``input_scale`` (FP8) f32 scalars
=========  ================================================================================

An FP8 KV cache adds each layer's ``k_proj.k_scale`` and ``v_proj.v_scale`` (f32 scalars,
amax/448 of the keys after RoPE and of the values, as the cache holds them; on the attention
module itself where q/k/v are one fused projection).
Quantized fused experts (W4A16_AWQ, FP8 or NVFP4; transformers 5's ``experts.gate_up_proj
[E, 2I, H]`` and ``experts.down_proj [E, H, I]``) are written one linear an expert, as modelopt's
exporter splits them and as the model's Hugging Face checkpoints name them (the reverse of
transformers' conversion mapping): ``mlp.experts.<e>.gate_proj``/``up_proj``/``down_proj`` on
Qwen-MoE and DeepSeek, ``block_sparse_moe.experts.<e>.w1``/``w3``/``w2`` on Mixtral (whose other
tensors then take its checkpoints' ``block_sparse_moe`` too), each with the tensors of a linear
of the model's algorithm above. The gate and up halves of an expert's ``gate_up_proj`` were
quantized as one matrix, so they share its FP8 ``weight_scale`` and NVFP4 ``weight_scale_2``
(what engines that fuse gate and up again need); every expert's ``input_scale`` is the module's
one for that fused weight, as modelopt writes its one input quantizer a fused weight.
Experts and linears are quantized alike (or left in float): one algorithm a model.

Unquantized tensors keep their names in the checkpoint dtype; ``exclude_modules`` lists every
unquantized linear and embedding. What the format cannot express is refused before
calibration (:meth:`HFExporter.check`) and again before anything is written.

Recipe::

    [export]
    backend = "hf"
    dtype = "auto"              # float16 | bfloat16 | float32 | auto (the model's 16-bit dtype, else float16)
    max_shard_size = "10GB"     # safetensors shards, indexed as Hugging Face does

Command line (from a qframe output, no calibration)::

    qframe export out/awq_w4a16 --backend hf
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from qframe import BackendPlugin, formats, hookimpl, numerics
from qframe.description import CacheState, ExpertsState, LinearState, ModelDescription
from qframe.experts import OUT_IN, expert_layouts, is_fused_experts
from qframe.errors import ExportError, RecipeError, shorten
from qframe.parts import Part, in_part, part_of, tied_names, write_in_parts

from .quant_algo import (AWQ_ALGOS, NVFP4_BLOCK, Quantization, Writer, choose, in_order, inexact_group_scales,
                         w4a8_weight_scale_2, warn_inexact_group_scales)

HF_QUANT_CONFIG = "hf_quant_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
STREAM = "model"  # the one stream of parts the safetensors are assembled from
DTYPES = ("auto", "float16", "bfloat16", "float32")
ALGORITHMS = ("FP8", "NVFP4", "W4A16_AWQ", "W4A8_AWQ")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from ``10GB``, ``500MiB`` or an integer.

    Example::

        >>> parse_size("10GB"), parse_size("2KiB"), parse_size(7)
        (10000000000, 2048, 7)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    found = _SIZE.match(value) if isinstance(value, str) else None
    size = float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()] if found else 0.0
    if not 1 <= size < 2**63:  # also a number of so many digits that it is infinite
        raise RecipeError("max_shard_size", value, "expected a positive size such as \"10GB\", \"500MB\" or bytes")
    return int(size)


@dataclass(frozen=True)
class HFOptions:
    """The ``[export]`` keys of the ``hf`` backend.

    Example::

        >>> HFOptions(dtype="bfloat16").shard_bytes
        10000000000
    """

    dtype: str = "auto"
    max_shard_size: int | str = "10GB"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise RecipeError("dtype", self.dtype, f"allowed: {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


# -- what the checkpoint holds -------------------------------------------------------------------------

WRITER = Writer("the unified HF checkpoint", ALGORITHMS, ("FP8",), elsewhere="--backend tensorrt-llm or qframe",
                experts=True, expert_algorithms=("W4A16_AWQ", "FP8", "NVFP4"),
                kv_note="stores FP8 caches only (its k_scale/v_scale are FP8 E4M3 cache scales, amax/448; export INT8 "
                        "caches with --backend tensorrt-llm)")


def hf_quant_config(quantization: Quantization, prescaled: bool) -> dict[str, Any]:
    """``hf_quant_config.json`` for one model's :class:`~qframe_plugins.quant_algo.Quantization`,
    keys in modelopt's order; ``exclude_modules`` lists the linears left in float and the
    embeddings.

    Example::

        >>> hf_quant_config(Quantization("W4A16_AWQ", 128, None, excluded=["lm_head"]), False)["quantization"]
        {'quant_algo': 'W4A16_AWQ', 'kv_cache_quant_algo': None, 'group_size': 128, 'has_zero_point': False, 'pre_quant_scale': False, 'exclude_modules': ['lm_head']}
    """
    table: dict[str, Any] = {"quant_algo": quantization.quant_algo,
                             "kv_cache_quant_algo": quantization.kv_cache_quant_algo}
    if quantization.awq:
        table.update(group_size=quantization.group_size, has_zero_point=False, pre_quant_scale=prescaled)
    elif quantization.quant_algo == "NVFP4":
        table["group_size"] = NVFP4_BLOCK
    table["exclude_modules"] = sorted(quantization.excluded)
    return {"producer": _producer(), "quantization": table}


def _producer() -> dict[str, str]:
    try:
        version = metadata.version("qframe")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": "qframe", "version": version}


def quantization_config(hf_quant_config: dict[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for an ``hf_quant_config.json``, as the loaders
    of modelopt checkpoints read it (``quant_method = "modelopt"``; compressed-tensors-style
    ``config_groups`` for FP8 and NVFP4, as modelopt writes them).

    Example::

        >>> quantization_config({"producer": {"name": "qframe"}, "quantization": {
        ...     "quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}})
        {'ignore': ['lm_head'], 'quant_algo': 'W4A16_AWQ', 'producer': {'name': 'qframe'}, 'quant_method': 'modelopt'}
    """
    quant = hf_quant_config["quantization"]
    algo, out = quant.get("quant_algo"), {}
    if algo == "FP8":
        scheme = {"dynamic": False, "num_bits": 8, "type": "float"}
        out["config_groups"] = {"group_0": {"input_activations": dict(scheme), "weights": dict(scheme),
                                            "targets": ["Linear"]}}
    elif algo == "NVFP4":
        scheme = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": quant.get("group_size", NVFP4_BLOCK)}
        out["config_groups"] = {"group_0": {"input_activations": dict(scheme), "weights": dict(scheme),
                                            "targets": ["Linear"]}}
    out["ignore"] = list(quant.get("exclude_modules") or [])
    if algo:
        out["quant_algo"] = algo
    if quant.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hf_quant_config["producer"]
    out["quant_method"] = "modelopt"
    return out


def _refuse_transposed_layouts(description: ModelDescription) -> None:
    # qframe turns GPT-2's Conv1D projections ([in, out] weights) into nn.Linear ([out, in]);
    # under Hugging Face's names those tensors would load transposed.
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(description.model.config)
    for name, module in reference.named_modules():
        if isinstance(module, Conv1D) and name in description.linears:
            raise ExportError(
                f"{name}: {type(reference).__name__} keeps this projection as a transposed Conv1D, which qframe "
                "quantizes as an nn.Linear; the unified HF checkpoint would hold it under Hugging Face's name in the "
                "other orientation, so it is not written; export this model with --backend tensorrt-llm or qframe")


def check_description(description: ModelDescription) -> Quantization:
    """What the checkpoint of ``description`` holds, or an :class:`~qframe.ExportError` for what
    the format cannot express (a transposed layout, a format it lacks, different algorithms, a
    partial group, caches that differ, experts it cannot name), before calibration and again
    before writing."""
    _refuse_transposed_layouts(description)
    quantization = choose(description, WRITER)
    if quantization.experts:
        hub_naming(getattr(description.model.config, "model_type", None), next(iter(quantization.experts)))
    for state in quantization.experts.values():
        refuse_unsplittable_experts(state, "the unified HF checkpoint")
    return quantization


def refuse_unsplittable_experts(state: ExpertsState, title: str) -> None:
    """Refuse quantized experts that cannot be written one linear an expert: any but fused
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` used as ``F.linear``, or with more
    parameters (biases)."""
    found = {(n, layout) for n, _, _, layout in state.matrices}
    # Parameters besides the weights (which are parameters still before calibration): biases.
    params = state.module.named_parameters(recurse=False) if state.module is not None else ()
    extra = sorted(n for n, _ in params if n not in {name for name, _ in found})
    if found != {("gate_up_proj", OUT_IN), ("down_proj", OUT_IN)} or extra:
        raise ExportError(f"{state.where}: {title} writes quantized experts whose weights are "
                          "gate_up_proj [E, 2I, H] and down_proj [E, H, I] (used as F.linear) and nothing else; "
                          f"these are {sorted(found)}{f' with {extra}' if extra else ''}; export them with "
                          "--backend qframe, or keep the experts in float with targets = [\"Linear\"]")


# Per-expert linears of a fused gate_up_proj / down_proj where transformers names no others.
_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")
_EXPERT_BUFFERS = {f"{w}_{s}" for w in ("gate_up_proj", "down_proj")
                   for s in ("codes", "scale", "zero", "global_scale", "input_scale", "input_zero")}
_LITERAL = re.compile(r"^[\w.]+$")


def hub_naming(model_type: str | None, where: str = "the model") -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """How the Hugging Face checkpoints of ``model_type`` name what transformers 5 fuses:
    module-name renames (in memory -> checkpoint) and the per-expert linears of
    ``gate_up_proj`` (gate, up) and ``down_proj``, read from transformers' conversion mapping
    (whose reverse modelopt's exporter applies); an :class:`~qframe.ExportError` for a mapping
    this cannot reverse.

    Example::

        >>> hub_naming("mixtral")
        ([('.mlp.', '.block_sparse_moe.')], ('w1', 'w3', 'w2'))
        >>> hub_naming("llama")
        ([], ('gate_proj', 'up_proj', 'down_proj'))
    """
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping

    renames, leaves = [], list(_EXPERT_LEAVES)
    for rule in (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        expert = [re.fullmatch(r"\.?(?:mlp\.)?experts\.\*\.(\w+)\.weight", x) for x in sources]
        if (type(rule) is WeightRenaming and len(sources) == len(targets) == 1
                and all(_LITERAL.match(x) for x in sources + targets)):
            renames.append((targets[0], sources[0]))
        elif type(rule) is WeightConverter and len(targets) == 1 and all(expert) and (
                (targets[0].endswith("experts.gate_up_proj") and len(sources) == 2)
                or (targets[0].endswith("experts.down_proj") and len(sources) == 1)):
            if len(sources) == 2:
                leaves[0], leaves[1] = (m.group(1) for m in expert)
            else:
                leaves[2] = expert[0].group(1)
        else:
            raise ExportError(f"{where}: {model_type}'s Hugging Face checkpoints are converted by transformers with "
                              f"{rule!r}, which qframe cannot reverse to name the quantized experts as those "
                              "checkpoints do; export with --backend qframe, or keep the experts in float with "
                              "targets = [\"Linear\"]")
    return renames, tuple(leaves)


def _hub_name(name: str, renames: list[tuple[str, str]]) -> str:
    for memory, hub in renames:
        name = name.replace(memory, hub)
    return name


# -- tensors -------------------------------------------------------------------------------------------

def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(()).cpu().clone()  # distinct tensors: safetensors refuses shared memory


def _weight_scale_2(quantization: Quantization, names: list[str], groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """W4A8's per-tensor FP8 factor of the quantized linears ``names`` (one model part's): one
    for linears that read one input (``groups``: those of the part; the serving engines fuse
    them and keep one), else each its own. A group lies in one decoder layer, so a part has all
    it needs."""
    out = {n: w4a8_weight_scale_2([quantization.quantized[n].module.weight]) for n in names}
    for group in groups:
        joint = w4a8_weight_scale_2([quantization.quantized[n].module.weight for n in group])
        out.update({n: joint.clone() for n in group})
    return out


def weight_tensors(algo: str, codes: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A quantized linear's ``weight`` and the scales ``algo`` stores beside it (but W4A8's
    ``weight_scale_2`` and ``input_scale``), from its codes ``[out, in]`` and scales as qframe
    holds them: FP8 ``weight`` E4M3 and ``weight_scale``, ``input_scale`` scalars; NVFP4 packed
    ``weight``, E4M3 block ``weight_scale``, ``weight_scale_2`` (the global scale) and
    ``input_scale`` (the input's global scale) scalars; int4 rows packed and f32 group scales.

    Example::

        >>> out = weight_tensors("FP8", torch.ones(2, 4).to(torch.float8_e4m3fn), torch.full((1, 1), 0.5),
        ...                      input_scale=torch.tensor(0.25))
        >>> {k: tuple(t.shape) for k, t in out.items()}
        {'weight': (2, 4), 'weight_scale': (), 'input_scale': ()}
    """
    if algo == "FP8":
        return {"weight": codes.to(formats.E4M3.code_dtype), "weight_scale": _scalar(scale),
                "input_scale": _scalar(input_scale)}
    if algo == "NVFP4":
        return {"weight": formats.NVFP4.pack(codes), "weight_scale": scale.to(formats.NVFP4.scale_dtype),
                "weight_scale_2": _scalar(global_scale), "input_scale": _scalar(input_scale)}
    return {"weight": numerics.pack_int4_rows(codes), "weight_scale": scale.float()}


def linear_tensors(state: LinearState, quantization: Quantization, dtype: torch.dtype, prescaled: set[str],
                   scale_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, keyed by full name."""
    name, module, algo = state.name, state.module, quantization.quant_algo
    out = weight_tensors(algo, module.weight_codes, module.weight_scale, getattr(module, "weight_global_scale", None),
                         getattr(module, "input_scale", None))
    if algo in AWQ_ALGOS:
        if algo == "W4A8_AWQ":
            out["weight_scale_2"] = scale_2[name]
            out["input_scale"] = _scalar(module.input_scale)
        if name in prescaled:
            kept = module.input_prescale if module.has_prescale else torch.ones(module.in_features)
            out["pre_quant_scale"] = kept.to(dtype)
    if module.bias is not None:
        out["bias"] = module.bias.detach().to(dtype)
    return {f"{name}.{suffix}": t.detach().contiguous().cpu() for suffix, t in out.items()}


def expert_tensors(state: ExpertsState, algo: str, leaves: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized fused-experts module, one ``algo`` linear an
    expert (:func:`weight_tensors` under ``<name>.<e>.<leaf>``), keyed by full in-memory name:
    gate_up_proj's first half of rows is the gate, the second the up projection. Per-tensor
    scales (FP8's ``weight_scale``, NVFP4's ``weight_scale_2``) are the expert's, for both
    halves; ``input_scale`` is the module's, for every expert."""
    buffers, out = state.module._buffers, {}
    per_tensor = state.module.weight_args.granularity == "tensor"  # scales [E, 1, 1]: the expert's, whole
    for fused, halves in (("gate_up_proj", leaves[:2]), ("down_proj", leaves[2:])):
        codes, scale = buffers[f"{fused}_codes"], buffers[f"{fused}_scale"]
        global_scale, input_scale = buffers.get(f"{fused}_global_scale"), buffers.get(f"{fused}_input_scale")
        rows = codes.shape[1] // len(halves)
        for e in range(codes.shape[0]):
            for i, leaf in enumerate(halves):
                part = slice(i * rows, (i + 1) * rows)
                tensors = weight_tensors(algo, codes[e, part], scale[e] if per_tensor else scale[e, part],
                                         None if global_scale is None else global_scale[e], input_scale)
                out.update({f"{state.name}.{e}.{leaf}.{suffix}": t for suffix, t in tensors.items()})
    # Copies: a slice kept as it is would share its buffer's memory, which safetensors refuses.
    return {n: t.detach().clone().contiguous().cpu() for n, t in out.items()}


def kv_scale_names(description: ModelDescription, cache) -> dict[str, torch.Tensor]:
    """A layer's cache scales under the names loaders read: ``k_proj.k_scale`` and
    ``v_proj.v_scale`` where the attention has those projections (modelopt's names), else
    ``k_scale`` and ``v_scale`` on the attention itself (fused q/k/v)."""
    k, v = cache.scales()
    names = {}
    for role, scale in (("k", k), ("v", v)):
        projection = f"{cache.attention}.{role}_proj"
        owner = projection if projection in description.linears else cache.attention
        names[f"{owner}.{role}_scale"] = scale.clone()
    return names


def _routers(description: ModelDescription, quantization: Quantization) -> list[str]:
    """The float modules with a 2-D ``weight`` beside fused experts (the routers, ``mlp.gate``),
    which loaders must not read as quantized."""
    found = []
    for name in description.experts:
        parent = description.model.get_submodule(name.rpartition(".")[0])
        for child, module in parent.named_modules(prefix=name.rpartition(".")[0]):
            weight = getattr(module, "weight", None)
            if (child != name and child not in quantization.quantized and child not in quantization.excluded
                    and isinstance(weight, torch.Tensor) and weight.dim() == 2):
                found.append(child)
    return found


def prescaled_linears(quantization: Quantization, description: ModelDescription) -> set[str]:
    """The linears that get a ``pre_quant_scale``: with AWQ, where qframe kept one, and (as
    modelopt's layout has it) every linear fed by another linear, where the scale was folded
    into that linear and is ones."""
    if not quantization.awq or not any(s.prescale for s in quantization.quantized.values()):
        return set()
    return {n for n, s in quantization.quantized.items() if s.prescale} | description.fed_by_linears()


@dataclass
class HFSession:
    """What :meth:`HFExporter.begin` works out from a model's structure for its parts and its
    ``finish``: the checked ``quantization``, the checkpoint ``dtype``, the linears that get a
    ``pre_quant_scale``, the hub names, the tied aliases (written once, under the first name), and
    by part the quantized linears, W4A8 groups, caches and experts; ``inexact`` gathers the
    linears whose group scales the parts found inexact, warned about once at the end."""

    description: ModelDescription
    quantization: Quantization
    dtype: torch.dtype
    shard_bytes: int
    prescaled: set[str]
    renames: list[tuple[str, str]]
    leaves: tuple[str, ...]
    tied: dict[str, str]
    caches: set[str]  # the KV cache quantizers' module names: their state becomes k_scale/v_scale
    linears: dict[Part, list[str]]  # part -> its quantized linears, in model order
    groups: dict[Part, list[list[str]]]  # part -> its W4A8 groups of linears that read one input
    cache_states: dict[Part, list[CacheState]]  # part -> its caches (CacheState)
    experts: dict[Part, list[ExpertsState]]  # part -> its quantized fused experts
    inexact: list[str] = field(default_factory=list)

    @property
    def order(self) -> dict[str, int]:
        """Each quantized linear's place in the model's order (for the warnings)."""
        return {n: i for i, n in enumerate(self.quantization.quantized)}


def _by_part(items: Iterable, arch: Any, name: Callable[[Any], str] = lambda item: item) -> dict[Part, list]:
    """``items`` grouped by the model part their ``name`` is in, each group in ``items``' order."""
    out: dict[Part, list] = {}
    for item in items:
        out.setdefault(part_of(name(item), arch), []).append(item)
    return out


def plan_checkpoint(description: ModelDescription, options: HFOptions) -> HFSession:
    """Everything :meth:`HFExporter.export` checks and decides before a tensor is read, from the
    description's module structure alone (a model whose parts are on the meta device will do).

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> session = plan_checkpoint(describe_model(tiny_llama_model().to("meta"), make_registry()), HFOptions())
        >>> session.quantization.quant_algo, session.dtype, sorted(session.linears)
        (None, torch.float16, [])
    """
    quantization = check_description(description)
    model, arch = description.model, description.arch
    renames, leaves = hub_naming(getattr(model.config, "model_type", None)) if quantization.experts else ([], ())
    quantizers = {id(c.module) for c in description.caches.values() if c.module is not None}
    caches = {name for name, module in model.named_modules() if id(module) in quantizers}
    groups = list(description.shared_inputs()) if quantization.quant_algo == "W4A8_AWQ" else []
    return HFSession(description, quantization, description.serving_dtype(options.dtype), options.shard_bytes,
                     prescaled_linears(quantization, description), renames, leaves, tied_names(model), caches,
                     _by_part(quantization.quantized, arch), _by_part(groups, arch, lambda g: g[0]),
                     _by_part(description.caches.values(), arch, lambda c: c.attention),
                     _by_part(quantization.experts.values(), arch, lambda e: e.name))


def _part_state(model: torch.nn.Module, arch: Any, part: Part) -> dict[str, torch.Tensor]:
    """The state-dict entries of one model part, in the model's state-dict order: a decoder
    layer's from that layer alone, so a model of many layers is not walked once per layer."""
    if isinstance(part, int):
        prefix = f"{arch.layers_path}.{part}."
        return arch.decoder_layers(model)[part].state_dict(prefix=prefix)
    return dict(in_part(model.state_dict().items(), part, arch))


def checkpoint_tensors(session: HFSession, part: Part) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of one model ``part`` (``"first"``, a decoder layer's index or
    ``"last"``): its quantized linears' packed state, its cache scales, and the rest of its state
    in the checkpoint dtype (a tied weight once, under its first name), under the checkpoint's
    names. Reads the values of that part's modules only.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> session = plan_checkpoint(describe_model(tiny_llama_model(), make_registry()), HFOptions())
        >>> sorted(checkpoint_tensors(session, "last"))
        ['lm_head.weight', 'model.norm.weight']
    """
    quantization, dtype = session.quantization, session.dtype
    linears = session.linears.get(part, [])
    scale_2 = _weight_scale_2(quantization, linears, session.groups.get(part, [])) \
        if quantization.quant_algo == "W4A8_AWQ" else {}
    return model_tensors(
        session, part,
        lambda name: linear_tensors(quantization.quantized[name], quantization, dtype, session.prescaled, scale_2),
        lambda cache: kv_scale_names(session.description, cache),
        lambda state: expert_tensors(state, quantization.quant_algo, session.leaves))


def model_tensors(session: HFSession, part: Part, linear: Callable[[str], dict[str, torch.Tensor]],
                  cache: Callable[[CacheState], dict[str, torch.Tensor]],
                  experts: Callable[[ExpertsState], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One model part's tensors for a checkpoint with the model's Hugging Face names (this one
    and compressed-tensors'): its state in the checkpoint dtype, but the quantized linears,
    caches and experts, which ``linear(name)``, ``cache(state)`` and ``experts(state)`` write
    (keyed by in-memory name); a tied weight once, under its first name; then renamed as the
    hub's checkpoints name them."""
    description, quantization, dtype = session.description, session.quantization, session.dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in _part_state(description.model, description.arch, part).items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantization.quantized or owner in session.caches:
            continue  # written below, packed (a cache quantizer's state becomes k_scale/v_scale)
        if owner in quantization.experts and leaf in _EXPERT_BUFFERS:
            continue  # the experts' codes and scales, written below one linear an expert
        if name in session.tied:
            continue  # tied (lm_head.weight is embed_tokens.weight): loaders tie it again
        if tensor.is_meta:  # the loader left this part unloaded: there is nothing to write but its shape
            raise ExportError(f"{name}: still on the meta device while model part {part!r} is written")
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().contiguous().cpu()
    for name in session.linears.get(part, []):
        tensors.update(linear(name))
    for state in session.cache_states.get(part, []):
        tensors.update(cache(state))
    for state in session.experts.get(part, []):
        tensors.update(experts(state))
    if session.renames:
        tensors = {_hub_name(n, session.renames): t for n, t in tensors.items()}
    return tensors


def shards(items: list, limit: int) -> list[list]:
    """``items`` (anything with ``nbytes``: tensors, or a spool's entries) split, in order, into
    shards of at most ``limit`` bytes (a larger item alone).

    Example::

        >>> [len(s) for s in shards([torch.ones(4), torch.ones(4), torch.ones(1)], 20)]
        [1, 2]
    """
    out: list[list] = [[]]
    size = 0
    for item in items:
        if out[-1] and size + item.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.nbytes
    return out


def write_model_files(session: HFSession, directory: Path, spool: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Assemble ``directory``'s safetensors from the parts in ``spool`` (one ``model.safetensors``,
    or shards of at most ``session.shard_bytes`` in model order with their index), write the
    generation config and the tokenizer, and return the model's ``config.json`` (its ``dtype``
    the checkpoint's) for the caller to complete and write.

    Example::

        >>> config = write_model_files(session, Path("out/hf"), spool, tokenizer)  # doctest: +SKIP
    """
    model = session.description.model
    entries = spool.entries(STREAM)
    parts = shards(entries, session.shard_bytes)
    if len(parts) == 1:
        spool.assemble(STREAM, directory / WEIGHTS, {"format": "pt"}, entries=parts[0])
    else:
        weight_map = {}
        for i, part in enumerate(parts, 1):
            file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            spool.assemble(STREAM, directory / file, {"format": "pt"}, entries=part)
            weight_map.update(dict.fromkeys((e.name for e in part), file))
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = str(session.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return config


# -- the exporter ----------------------------------------------------------------------------------------

class HFExporter:
    """Writes, checks and validates unified Hugging Face checkpoints (see the module docstring).

    Example::

        >>> exporter = HFExporter(HFOptions(dtype="bfloat16"))
        >>> exporter.subdirectory
        'hf'
    """

    subdirectory = "hf"

    def __init__(self, options: HFOptions | None = None):
        self.options = options or HFOptions()

    def check(self, description: ModelDescription) -> None:
        """Refuse what the checkpoint could not hold, from what the recipe will produce on the
        model (before any calibration); raises :class:`qframe.ExportError` naming the module."""
        check_description(description)

    def export(self, qmodel: Any, directory: str | Path) -> Path:
        """Write ``config.json`` (with ``quantization_config``), ``hf_quant_config.json``, the
        safetensors, the generation config and the tokenizer into ``directory``, a model part at
        a time (:func:`qframe.parts.write_in_parts`). Everything is checked before the first
        part is converted."""
        return write_in_parts(self, qmodel.describe(), Path(directory), tokenizer=qmodel.tokenizer)

    def begin(self, description: ModelDescription) -> HFSession:
        """Check ``description`` and plan its checkpoint from the modules' structure alone (no
        tensor value is read: the parts may be on the meta device).

        Example::

            >>> session = HFExporter().begin(qmodel.describe())  # doctest: +SKIP
        """
        return plan_checkpoint(description, self.options)

    def part(self, session: HFSession, part: Part) -> dict[str, dict[str, torch.Tensor]]:
        """The checkpoint tensors of one model part, as stream ``"model"``; notes the part's
        inexact group scales for :meth:`finish`.

        Example::

            >>> sorted(HFExporter().part(session, "last")["model"])  # doctest: +SKIP
            ['lm_head.weight', 'model.norm.weight']
        """
        session.inexact += inexact_group_scales(session.quantization, session.dtype, session.linears.get(part, []))
        return {STREAM: checkpoint_tensors(session, part)}

    def finish(self, session: HFSession, directory: Path, spool: Any, tokenizer: Any = None) -> None:
        """Assemble the safetensors (one ``model.safetensors``, or shards of at most
        ``max_shard_size`` packed in model order with their index) from the parts in ``spool``,
        and write the configs, the generation config and the tokenizer.

        Example::

            >>> HFExporter().finish(session, Path("out/hf"), spool, tokenizer)  # doctest: +SKIP
        """
        description, quantization, dtype = session.description, session.quantization, session.dtype
        warn_inexact_group_scales(in_order(session.inexact, session.order), dtype, "vLLM's and TensorRT-LLM")
        config = write_model_files(session, Path(directory), spool, tokenizer)
        excluded = quantization.excluded + description.embeddings() + _routers(description, quantization)
        if quantization.experts:  # named as the checkpoint's tensors are
            excluded = [_hub_name(n, session.renames) for n in excluded]
        hf_quant = hf_quant_config(replace(quantization, excluded=excluded), bool(session.prescaled))
        # Written even for an unquantized model (quant_algo null), so the directory is recognized
        # and validated; config.json then claims no quantization, as modelopt's does.
        (Path(directory) / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=4) + "\n")
        if quantization.quant_algo or quantization.kv_cache_quant_algo:
            config["quantization_config"] = quantization_config(hf_quant)
        else:
            config.pop("quantization_config", None)
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def validate(self, directory: str | Path) -> list[str]:
        """The problems of a written checkpoint directory (empty when it is valid)."""
        return validate_checkpoint(Path(directory))

    def recognizes(self, directory: str | Path) -> bool:
        """Whether ``directory`` looks like a unified HF checkpoint (it has ``hf_quant_config.json``)."""
        return (Path(directory) / HF_QUANT_CONFIG).is_file()


# -- the validator -----------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F8_E4M3": "float8_e4m3fn", "U8": "uint8", "I8": "int8", "F32": "float32",
                       "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
                       "BOOL": "bool", "F8_E5M2": "float8_e5m2", "I16": "int16"}


def _tensor_specs(directory: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """Names -> (shape, dtype) of every tensor in the checkpoint, read from the headers only."""
    from safetensors import safe_open

    problems: list[str] = []
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            return {}, [f"{INDEX}: unreadable ({shorten(str(exc))})"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            return {}, [f"{INDEX}: weight_map is not a table of tensor names to file names"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, [WEIGHTS]
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(directory / file), "pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    dtype = piece.get_dtype()
                    specs[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype))
                    if weight_map is not None and weight_map.get(name) != file:
                        problems.append(f"{name} is in {file} but the index says {weight_map.get(name)}")
        except Exception as exc:  # safetensors raises its own error types for a bad header
            problems.append(f"{file}: not a readable safetensors file ({exc})")
    if weight_map is not None:
        problems += [f"{INDEX} lists {n}, which no shard holds" for n in sorted(set(weight_map) - set(specs))]
    return specs, problems


def _linear_problems(prefix: str, specs: dict, quant: dict) -> list[str]:
    algo, group = quant.get("quant_algo"), quant.get("group_size")
    weight = specs.get(f"{prefix}.weight")
    if weight is None:
        return [f"{prefix}: has scales but no weight"]
    shape, dtype = weight

    def expect(suffix: str, want_shape: tuple | None, want_dtype: str, required: bool = True) -> list[str]:
        found = specs.get(f"{prefix}.{suffix}")
        if found is None:
            return [f"{prefix}.{suffix} is missing ({algo})"] if required else []
        if (want_shape is not None and found[0] != want_shape) or found[1] != want_dtype:
            return [f"{prefix}.{suffix} is {found[1]} {list(found[0])}, expected {want_dtype} "
                    f"{list(want_shape) if want_shape is not None else ''} ({algo})"]
        return []

    if len(shape) != 2:
        return [f"{prefix}.weight has {len(shape)} dimensions, expected 2"]
    rows, cols = shape
    if algo == "FP8":
        problems = [] if dtype == "float8_e4m3fn" else [f"{prefix}.weight is {dtype}, expected float8_e4m3fn (FP8)"]
        return problems + expect("weight_scale", (), "float32") + expect("input_scale", (), "float32")
    if algo == "NVFP4":
        problems = [] if dtype == "uint8" else [f"{prefix}.weight is {dtype}, expected uint8 (packed E2M1)"]
        if (cols * 2) % 16:
            problems.append(f"{prefix}.weight has {cols * 2} input channels, not a multiple of 16 (NVFP4)")
        return (problems + expect("weight_scale", (rows, cols * 2 // 16), "float8_e4m3fn")
                + expect("weight_scale_2", (), "float32") + expect("input_scale", (), "float32"))
    if algo in AWQ_ALGOS:
        problems = [] if dtype == "uint8" else [f"{prefix}.weight is {dtype}, expected uint8 (packed int4)"]
        if not isinstance(group, int) or group < 1 or cols % group:
            problems.append(f"{prefix}.weight: {cols} input channels are not whole groups of {group}")
            return problems
        problems += expect("weight_scale", (rows * 2, cols // group), "float32")
        prescale = specs.get(f"{prefix}.pre_quant_scale")
        if prescale is not None:
            if not quant.get("pre_quant_scale"):
                problems.append(f"{prefix}.pre_quant_scale is written but pre_quant_scale is false")
            if prescale[0] != (cols,):
                problems.append(f"{prefix}.pre_quant_scale has shape {list(prescale[0])}, expected [{cols}]")
        if algo == "W4A8_AWQ":
            problems += expect("weight_scale_2", (), "float32") + expect("input_scale", (), "float32")
        return problems
    return [f"{prefix}: quantized, but quant_algo is {algo!r}"]


def validate_checkpoint(directory: Path) -> list[str]:
    """Check a unified HF checkpoint directory: ``config.json`` and ``hf_quant_config.json`` agree,
    every quantized linear (each expert's, where fused experts are written one linear an expert)
    has its tensors with the right dtypes and shapes for ``quant_algo`` (FP8 and NVFP4: its
    ``input_scale`` too), every other linear weight is excluded, and the KV cache has its scales.

    Example::

        >>> validate_checkpoint(Path("/nonexistent"))
        ['config.json is missing', 'hf_quant_config.json is missing', 'model.safetensors is missing']
    """
    problems: list[str] = []
    configs = {}
    for file in ("config.json", HF_QUANT_CONFIG):
        try:
            configs[file] = json.loads((directory / file).read_text())
        except FileNotFoundError:
            problems.append(f"{file} is missing")
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
            problems.append(f"{file}: unreadable ({shorten(str(exc))})")
        else:
            if not isinstance(configs[file], dict):
                problems.append(f"{file} is not a JSON object")
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        problems.append(f"{WEIGHTS} is missing")
    if problems:
        return problems
    quant = configs[HF_QUANT_CONFIG].get("quantization")
    if not isinstance(quant, dict):
        return [f"{HF_QUANT_CONFIG} has no \"quantization\" table"]
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo not in (*ALGORITHMS, None):
        problems.append(f"{HF_QUANT_CONFIG}: quant_algo {shorten(algo)} is not one of {', '.join(ALGORITHMS)}")
    if kv not in ("FP8", None):
        problems.append(f"{HF_QUANT_CONFIG}: kv_cache_quant_algo {shorten(kv)} is not FP8 or null")
    if problems:  # what follows reads them as names
        return problems
    required = {"W4A16_AWQ": ("group_size", "has_zero_point", "pre_quant_scale"), "NVFP4": ("group_size",)}
    required["W4A8_AWQ"] = required["W4A16_AWQ"]
    problems += [f"{HF_QUANT_CONFIG}: {algo} needs {key}" for key in required.get(algo, ()) if key not in quant]
    if algo == "NVFP4" and quant.get("group_size") != 16:
        problems.append(f"{HF_QUANT_CONFIG}: NVFP4's group_size is 16, not {quant.get('group_size')}")
    if algo in AWQ_ALGOS and quant.get("has_zero_point") is not False:
        problems.append(f"{HF_QUANT_CONFIG}: has_zero_point must be false")
    excluded = quant.get("exclude_modules")
    if not isinstance(excluded, list) or not all(isinstance(e, str) for e in excluded):
        return problems + [f"{HF_QUANT_CONFIG}: exclude_modules must be a list of module names"]
    expected = quantization_config(configs[HF_QUANT_CONFIG]) if "producer" in configs[HF_QUANT_CONFIG] else None
    if algo is None and kv is None:
        expected = None  # an unquantized model: config.json claims nothing
    if "producer" not in configs[HF_QUANT_CONFIG]:
        problems.append(f"{HF_QUANT_CONFIG} has no producer")
    elif configs["config.json"].get("quantization_config") != expected:
        problems.append(f"config.json's quantization_config does not match {HF_QUANT_CONFIG} "
                        f"(found {configs['config.json'].get('quantization_config')}, expected {expected})")
    specs, more = _tensor_specs(directory)
    problems += more
    quantized = sorted(n[:-len(".weight_scale")] for n in specs if n.endswith(".weight_scale"))
    if algo is not None and not quantized:
        problems.append(f"quant_algo is {algo} but no linear has a weight_scale")
    for prefix in quantized:
        if any(fnmatch.fnmatchcase(prefix, pattern) for pattern in excluded):
            problems.append(f"{prefix} is quantized but exclude_modules lists it")
        problems += _linear_problems(prefix, specs, quant)
    for name, (shape, _) in specs.items():
        prefix = name[:-len(".weight")] if name.endswith(".weight") else None
        if prefix is None or len(shape) != 2 or prefix in quantized or algo is None:
            continue
        if not any(fnmatch.fnmatchcase(prefix, pattern) for pattern in excluded):
            problems.append(f"{name} is not quantized but exclude_modules does not list {prefix}, so loaders would "
                            f"read it as {algo}")
    for role in ("k_scale", "v_scale"):
        scales = {n: s for n, s in specs.items() if n.endswith(f".{role}")}
        if kv is not None and not scales:
            problems.append(f"kv_cache_quant_algo is {kv} but no {role} is written")
        if kv is None and scales:
            problems.append(f"{role} tensors are written but kv_cache_quant_algo is null")
        problems += [f"{n} is {s[1]} {list(s[0])}, expected a float32 scalar" for n, s in scales.items()
                     if s != ((), "float32")]
    return problems + _model_problems(directory, specs, algo, set(quantized), kv)


# Tensors a quantized linear (or the KV cache) adds beside the model's own.
_QUANT_LEAVES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")


def _model_problems(directory: Path, specs: dict, algo: str | None, quantized: set[str], kv: str | None) -> list[str]:
    """The tensors against the model ``config.json`` describes, built on the meta device: each of
    its weights present with its shape and the config's dtype (a quantized linear's packed weight
    with the shape its algorithm packs it to), no other tensors but quantization scales of its modules, and one cache scale
    of each kind per layer when the cache is quantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for a damaged config
        return [f"config.json: not a usable model config ({shorten(' '.join(str(exc).split()))})"]
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    dtype = str(getattr(config, "dtype", None) or "").removeprefix("torch.")  # every unquantized tensor's
    modules = {name for name, _ in skeleton.named_modules()}
    try:
        expected, modules = _unfused_experts(skeleton, config, specs, expected, modules)
    except ExportError as exc:
        return [str(exc)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    problems = []
    for name, shape in expected.items():
        owner = name.rpartition(".")[0]
        found = specs.get(name)
        if owner in quantized and name.endswith(".weight"):  # packed: FP8 whole, NVFP4 columns and int4 rows halved
            rows, cols = shape
            packed = {"NVFP4": (rows, cols // 2), "W4A16_AWQ": (rows // 2, cols), "W4A8_AWQ": (rows // 2, cols)}
            if found is not None and found[0] != packed.get(algo, (rows, cols)):
                problems.append(f"{name} is {list(found[0])}, not the packed weight of a {list(shape)} linear "
                                "as config.json describes it")
            continue
        if found is None:
            if not (tied and name == "lm_head.weight"):
                problems.append(f"{name} is missing (config.json's model has it, {list(shape)})")
        elif found[0] != shape or found[1] != dtype:
            problems.append(f"{name} is {found[1]} {list(found[0])}, expected {dtype} {list(shape)} as config.json "
                            "describes it")
    for name in specs:
        owner, _, leaf = name.rpartition(".")
        if name not in expected and not (owner in modules and leaf in _QUANT_LEAVES):
            problems.append(f"{name} is not a tensor of the model config.json describes")
    if kv is not None:
        layers = getattr(config, "num_hidden_layers", None)
        for role in ("k_scale", "v_scale"):
            count = sum(1 for n in specs if n.endswith(f".{role}"))
            if count != layers:
                problems.append(f"{count} {role} tensors for {layers} layers with a quantized KV cache")
    return problems[:20] + ([f"and {len(problems) - 20} more problems"] if len(problems) > 20 else [])


def _unfused_experts(skeleton, config, specs: dict, expected: dict, modules: set[str]) -> tuple[dict, set[str]]:
    """``expected`` and ``modules`` as the checkpoint names them where it holds the fused experts
    one linear an expert (:func:`expert_tensors`): every name as the Hugging Face checkpoints
    have it, and each such module's ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` as
    ``<e>.<gate>.weight [I, H]``, ``<e>.<up>.weight [I, H]``, ``<e>.<down>.weight [H, I]``, each
    then checked as a linear of ``quant_algo`` is (its packed weight, scales and input scale)."""
    fused = {n: m for n, m in skeleton.named_modules() if n and is_fused_experts(m)}
    if not fused:
        return expected, modules
    renames, leaves = hub_naming(getattr(config, "model_type", None))
    unfused = [n for n in fused if f"{_hub_name(n, renames)}.0.{leaves[2]}.weight" in specs]
    if not unfused:
        return expected, modules
    expected = {_hub_name(n, renames): shape for n, shape in expected.items()}
    modules = {_hub_name(n, renames) for n in modules}
    for name in unfused:
        module, hub = fused[name], _hub_name(name, renames)
        if expert_layouts(module) != {"gate_up_proj": OUT_IN, "down_proj": OUT_IN}:
            raise ExportError(f"{hub}: experts written one linear an expert, but config.json's model has "
                              f"{sorted(expert_layouts(module).items())} rather than gate_up_proj and down_proj used "
                              "as F.linear")
        e, rows, cols = expected.pop(f"{hub}.gate_up_proj")
        _, out, inner = expected.pop(f"{hub}.down_proj")
        for i in range(e):
            for leaf, shape in zip(leaves, ((rows // 2, cols), (rows // 2, cols), (out, inner))):
                expected[f"{hub}.{i}.{leaf}.weight"] = shape
                modules.add(f"{hub}.{i}.{leaf}")
    return expected, modules


@hookimpl
def qframe_backends():
    summary = "unified Hugging Face checkpoint (safetensors + hf_quant_config.json) for TensorRT-LLM, vLLM, SGLang"
    yield BackendPlugin(name="hf", summary=summary, factory=HFExporter, options=HFOptions)
