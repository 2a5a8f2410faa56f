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

An FP8 KV cache adds ``k_proj.k_scale`` and ``v_proj.v_scale`` (f32 scalars, amax/448).
Unquantized tensors keep their names in the checkpoint dtype; ``exclude_modules`` lists every
unquantized linear and embedding. What the format cannot express is refused before
calibration (:meth:`HFExporter.check`) and again before anything is written.

Recipe::

    [export]
    backend = "hf"
    dtype = "auto"              # float16 | bfloat16 | float32 | auto (the model's own)
    max_shard_size = "10GB"     # safetensors shards, indexed as Hugging Face does

Command line (from a qframe output, no calibration)::

    qframe export out/awq_w4a16 --backend hf
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from qframe import BackendPlugin, hookimpl, numerics
from qframe.errors import ExportError, ModelError, RecipeError, shorten
from qframe.scheme import PROBE_FAMILIES, PROBE_LINEAR, QuantArgs, describe, first_claims, probe_names

HF_QUANT_CONFIG = "hf_quant_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = ("auto", "float16", "bfloat16", "float32")
ALGORITHMS = ("FP8", "NVFP4", "W4A16_AWQ", "W4A8_AWQ")
AWQ_ALGOS = ("W4A16_AWQ", "W4A8_AWQ")
# The group sizes of the int4 kernels that serve these checkpoints (TensorRT-LLM's too).
AWQ_GROUP_SIZES = {"W4A16_AWQ": (64, 128), "W4A8_AWQ": (128,)}
FP8_MAX = 448.0
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


# -- which algorithm a linear is, or why it cannot be written ----------------------------------------

def _is_static_fp8(args: QuantArgs | None) -> bool:
    return (args is not None and args.type == "float" and args.format == "e4m3" and args.granularity == "tensor"
            and not args.dynamic)


def quant_algo(weights: QuantArgs | None, acts: QuantArgs | None, where: str) -> str | None:
    """The unified checkpoint's ``quant_algo`` for a linear quantized with these args (None:
    not quantized), or an :class:`~qframe.ExportError` that says what to change.

    Example::

        >>> quant_algo(QuantArgs(bits=4, granularity="group", group_size=128), None, "q_proj")
        'W4A16_AWQ'
        >>> quant_algo(QuantArgs(bits=4, granularity="group", group_size=64, symmetric=False), None, "q_proj")
        Traceback (most recent call last):
        ...
        qframe.errors.ExportError: q_proj: weights int4 asymmetric group 64, activations none: the unified HF checkpoint's int4 (W4A16_AWQ, W4A8_AWQ) has no zero points (has_zero_point is false); set weights.symmetric = true
    """
    def refuse(why: str) -> ExportError:
        return ExportError(f"{where}: weights {describe(weights)}, activations {describe(acts)}: {why}")

    if weights is None:
        if acts is not None:
            raise refuse("the unified HF checkpoint has no activation-only quantization; quantize the weights too, "
                         "or neither")
        return None
    if weights.type == "int":
        if weights.bits != 4:
            raise refuse("the hf backend writes int4 weights (W4A16_AWQ, W4A8_AWQ), FP8 and NVFP4; export int8 "
                         "(SmoothQuant W8A8, W8A16) with --backend tensorrt-llm or qframe")
        if not weights.symmetric:
            raise refuse("the unified HF checkpoint's int4 (W4A16_AWQ, W4A8_AWQ) has no zero points "
                         "(has_zero_point is false); set weights.symmetric = true")
        if weights.granularity != "group":
            raise refuse("int4 weights are written as W4A16_AWQ/W4A8_AWQ, which scale groups of input channels; "
                         "set weights.group_size = 128 (or 64 for W4A16)")
        if acts is None:
            algo = "W4A16_AWQ"
        elif _is_static_fp8(acts):
            algo = "W4A8_AWQ"
        else:
            raise refuse("int4 weights go with no activation quantization (W4A16_AWQ) or static FP8 E4M3 "
                         "activations per tensor (W4A8_AWQ); set activations = { type = \"float\", bits = 8 } "
                         "or remove them")
        if weights.group_size not in AWQ_GROUP_SIZES[algo]:
            sizes = " or ".join(map(str, AWQ_GROUP_SIZES[algo]))
            raise refuse(f"the int4 kernels that serve {algo} take groups of {sizes} input channels; "
                         f"set weights.group_size = {sizes}")
        return algo
    if weights.format == "e4m3":
        if weights.granularity != "tensor":
            raise refuse("the unified checkpoint's FP8 scales each weight per tensor; "
                         "set weights.granularity = \"tensor\"")
        if not _is_static_fp8(acts):
            raise refuse("FP8 needs static FP8 E4M3 activations with one calibrated scale per tensor (input_scale); "
                         "set activations = { type = \"float\", bits = 8 } (not dynamic)")
        return "FP8"
    if weights.format == "nvfp4":
        if acts is None or acts.type != "float" or acts.format != "nvfp4" or acts.dynamic:
            raise refuse("NVFP4 quantizes activations to NVFP4 too, with a static global scale (input_scale); "
                         "set activations = { type = \"float\", bits = 4 } (not dynamic)")
        return "NVFP4"
    raise refuse("the hf backend writes FP8 E4M3, NVFP4 and int4 weights; use format e4m3 or nvfp4, or int4")


def kv_cache_algo(outputs: QuantArgs, where: str) -> str:
    """``kv_cache_quant_algo`` for a key/value projection quantized with ``outputs``.

    Example::

        >>> kv_cache_algo(QuantArgs(type="float", bits=8, granularity="tensor"), "k_proj")
        'FP8'
    """
    if _is_static_fp8(outputs):
        return "FP8"
    raise ExportError(f"{where}: a {describe(outputs)} KV cache cannot be written in the unified HF checkpoint, "
                      "whose k_scale/v_scale are FP8 E4M3 cache scales (amax/448); use "
                      "activations = { type = \"float\", bits = 8 } in the kv_cache stage (or export INT8 caches "
                      "with --backend tensorrt-llm)")


# Algorithm and group size of a stage, and the stage as messages name it.
Format = tuple[str | None, int | None, str]


def stage_formats(recipe: Any) -> dict[int, Format]:
    """Each weight-quantizing stage's ``quant_algo``, by stage index, refusing (with an
    :class:`~qframe.ExportError` naming the stage) formats the unified checkpoint lacks, a
    kv_cache stage's included.

    Example::

        >>> from qframe.recipe import parse_recipe
        >>> stage_formats(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 48}}]}))
        Traceback (most recent call last):
        ...
        qframe.errors.ExportError: stage[0] (rtn): weights int4 group 48, activations none: the int4 kernels that serve W4A16_AWQ take groups of 64 or 128 input channels; set weights.group_size = 64 or 128
    """
    formats = {}
    for index, stage in enumerate(recipe.stages):
        where = f"stage[{index}] ({stage.quantizer})"
        if stage.quantizer == "kv_cache" and stage.scheme.activations is not None:
            kv_cache_algo(stage.scheme.activations, where)
        elif stage.scheme.weights is not None and stage.options.get("quantize", True) is not False:
            weights = stage.scheme.weights
            formats[index] = (quant_algo(weights, stage.scheme.activations, where), weights.group_size, where)
    return formats


def _refuse_mixed(chosen: Iterable[Format]) -> None:
    found: dict[tuple[str | None, int | None], str] = {}
    for algo, group, where in chosen:
        found.setdefault((algo, group), where)
    if len(found) > 1:
        described = "; ".join(f"{where}: {algo}{_group(group)}" for (algo, group), where in found.items())
        raise ExportError(f"the recipe quantizes linears with different algorithms ({described}), but the hf "
                          "backend writes one for the whole model; quantize every linear alike")


# -- the model as the checkpoint sees it -------------------------------------------------------------

@dataclass
class Plan:
    """What is written: one ``quant_algo`` (None: nothing quantized), its group size, the KV
    cache's algorithm, the quantized linears, the k/v projections that carry cache scales, the
    linears that get a ``pre_quant_scale``, the groups of linears that read one input, and the
    modules left unquantized (``exclude_modules``)."""

    quant_algo: str | None
    group_size: int | None
    kv_cache_quant_algo: str | None
    quantized: dict[str, nn.Module]
    kv_scales: dict[str, str]  # module name -> "k_scale" | "v_scale"
    prescaled: set[str]
    shared_input: list[list[str]]
    excluded: list[str]

    def hf_quant_config(self) -> dict[str, Any]:
        """``hf_quant_config.json``, keys in modelopt's order."""
        quantization: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.quant_algo in AWQ_ALGOS:
            quantization.update(group_size=self.group_size, has_zero_point=False, pre_quant_scale=bool(self.prescaled))
        elif self.quant_algo == "NVFP4":
            quantization["group_size"] = 16
        quantization["exclude_modules"] = sorted(self.excluded)
        return {"producer": _producer(), "quantization": quantization}


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
        scheme = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": quant.get("group_size", 16)}
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


def _architecture(model: nn.Module):
    from qframe.model import find_architecture
    from qframe.plugins import default_registry

    return find_architecture(model, default_registry())


def _per_layer(model: nn.Module, arch) -> Iterable[str]:
    """Each decoder layer's name prefix (``model.layers.3.``)."""
    try:
        layers = arch.decoder_layers(model)
    except ModelError:  # a model the adapter cannot walk has no groups to share scales over
        return []
    return [f"{arch.layers_path}.{i}." for i in range(len(layers))]


def _refuse_transposed_layouts(model: nn.Module) -> None:
    # qframe turns GPT-2's Conv1D projections ([in, out] weights) into nn.Linear ([out, in]);
    # under Hugging Face's names those tensors would load transposed.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.config)
    for name, module in reference.named_modules():
        if type(module).__name__ == "Conv1D":
            raise ExportError(
                f"{name}: {type(reference).__name__} keeps this projection as a transposed Conv1D, which qframe "
                "quantizes as an nn.Linear; the unified HF checkpoint would hold it under Hugging Face's name in the "
                "other orientation, so it is not written; export this model with --backend tensorrt-llm or qframe")


def make_plan(model: nn.Module) -> Plan:
    """Read the quantized model into a :class:`Plan`, refusing what the unified checkpoint
    cannot express (an unsupported format, mixed algorithms, a partial group)."""
    from qframe.qlinear import QuantLinear

    _refuse_transposed_layouts(model)
    algo, group, first = None, None, None
    quantized: dict[str, nn.Module] = {}
    excluded: list[str] = []
    kv_algo, kv_first = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            excluded.append(name)
            continue
        if not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        weights, acts = (module.weight_args, module.input_args) if isinstance(module, QuantLinear) else (None, None)
        here = quant_algo(weights, acts, name)
        if here is None:
            excluded.append(name)
            continue
        if weights.granularity == "group" and module.in_features % weights.group_size:
            raise ExportError(f"{name}: its {module.in_features} input channels are not a whole number of groups of "
                              f"{weights.group_size}, which the packed format needs; choose a group size that divides "
                              f"{module.in_features}")
        if algo is None:
            algo, group, first = here, weights.group_size, name
        elif (here, weights.group_size) != (algo, group):
            raise ExportError(f"{name} is {here}{_group(weights.group_size)} but {first} is {algo}{_group(group)}: the hf "
                              "backend writes one quantization algorithm for the whole model; quantize every linear "
                              "alike (or leave some unquantized through the recipe's ignore list)")
        quantized[name] = module
    arch = _architecture(model)
    kv_scales: dict[str, str] = {}
    names = dict(model.named_modules())
    for prefix in _per_layer(model, arch):
        for role, relative in zip(("k_scale", "v_scale"), arch.kv_projections):
            module = names.get(prefix + relative)
            outputs = getattr(module, "output_args", None)
            here = kv_cache_algo(outputs, prefix + relative) if outputs is not None else None
            if kv_first is None:
                kv_algo, kv_first = here, prefix + relative
            elif here != kv_algo:
                raise ExportError(f"{prefix + relative}: its KV cache is {here or 'not quantized'} but {kv_first}'s is "
                                  f"{kv_algo or 'not quantized'}; quantize every layer's cache alike")
            if here is not None:
                kv_scales[prefix + relative] = role
    for name, module in names.items():
        if getattr(module, "output_args", None) is not None and name not in kv_scales:
            raise ExportError(f"{name}: its output is quantized, but the unified HF checkpoint stores cache scales "
                              f"only on a layer's key and value projections ({', '.join(arch.kv_projections) or 'none known for this family'}); "
                              "target those with the kv_cache stage")
    shared_input, fed_by_linear = [], set()
    for prefix in _per_layer(model, arch):
        for group_spec in arch.smoothing_groups:
            consumers = [prefix + c for c in group_spec.consumers if prefix + c in quantized]
            if consumers:
                shared_input.append(consumers)
            producer = names.get(prefix + group_spec.producer)
            if isinstance(producer, (nn.Linear, QuantLinear)):
                fed_by_linear.update(consumers)
    prescaled: set[str] = set()
    if algo in AWQ_ALGOS and any(m.has_prescale for m in quantized.values()):
        # modelopt's layout: smoothing scales fold into norms, and a linear fed by another linear
        # (o_proj, down_proj) keeps a pre_quant_scale; where qframe folded it, that scale is ones.
        prescaled = {n for n, m in quantized.items() if m.has_prescale} | fed_by_linear
    return Plan(algo, group, kv_algo, quantized, kv_scales, prescaled, shared_input, excluded)


def _group(size: int | None) -> str:
    return f" (group {size})" if size else ""


# -- tensors -------------------------------------------------------------------------------------------

def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(()).cpu()


def _weight_scale_2(plan: Plan) -> dict[str, torch.Tensor]:
    """W4A8's per-tensor FP8 factor, amax/448 of the quantized weight, one for linears that
    read one input (the serving engines fuse them and keep one)."""
    amax = {n: m.weight.detach().float().abs().amax() for n, m in plan.quantized.items()}
    out = {n: a / FP8_MAX for n, a in amax.items()}
    for group in plan.shared_input:
        joint = torch.stack([amax[n] for n in group]).amax() / FP8_MAX
        out.update({n: joint for n in group})
    return {n: _scalar(v).clone() for n, v in out.items()}  # distinct tensors: safetensors refuses shared memory


def linear_tensors(name: str, module: nn.Module, plan: Plan, dtype: torch.dtype,
                   scale_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, keyed by full name."""
    algo, out = plan.quant_algo, {}
    if algo == "FP8":
        out["weight"] = module.weight_codes.to(torch.float8_e4m3fn)
        out["weight_scale"] = _scalar(module.weight_scale)
        out["input_scale"] = _scalar(module.input_scale)
    elif algo == "NVFP4":
        out["weight"] = numerics.pack(module.weight_codes, 4, format="nvfp4")
        out["weight_scale"] = module.weight_scale.to(torch.float8_e4m3fn)
        out["weight_scale_2"] = _scalar(module.weight_global_scale)
        out["input_scale"] = _scalar(module.input_scale)
    else:
        out["weight"] = numerics.pack_int4_rows(module.weight_codes)
        out["weight_scale"] = module.weight_scale.float()
        if algo == "W4A8_AWQ":
            out["weight_scale_2"] = scale_2[name]
            out["input_scale"] = _scalar(module.input_scale)
        if name in plan.prescaled:
            kept = module.input_prescale if module.has_prescale else torch.ones(module.in_features)
            out["pre_quant_scale"] = kept.to(dtype)
    if module.bias is not None:
        out["bias"] = module.bias.detach().to(dtype)
    return {f"{name}.{suffix}": t.detach().contiguous().cpu() for suffix, t in out.items()}


def checkpoint_tensors(model: nn.Module, plan: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: the quantized linears' packed state, the cache scales, and
    the rest of the model's state in ``dtype`` (a tied weight once, under its first name)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in plan.quantized or (owner in plan.kv_scales and name.endswith(("output_scale", "output_zero"))):
            continue
        view = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if view in seen and tensor.numel():
            continue  # tied (lm_head.weight is embed_tokens.weight): loaders tie it again
        seen.add(view)
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().contiguous().cpu()
    scale_2 = _weight_scale_2(plan) if plan.quant_algo == "W4A8_AWQ" else {}
    for name, module in plan.quantized.items():
        tensors.update(linear_tensors(name, module, plan, dtype, scale_2))
    for name, role in plan.kv_scales.items():
        tensors[f"{name}.{role}"] = _scalar(model.get_submodule(name).output_scale)
    return tensors


def shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Tensors split, in order, into shards of at most ``limit`` bytes (a larger tensor alone).

    Example::

        >>> [len(s) for s in shards({"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(1)}, 20)]
        [1, 2]
    """
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if out[-1] and size + nbytes > limit:
            out.append({})
            size = 0
        out[-1][name] = tensor
        size += nbytes
    return out


# -- the exporter ----------------------------------------------------------------------------------------

def export_dtype(model: nn.Module, dtype: str) -> torch.dtype:
    """The dtype unquantized tensors and ``pre_quant_scale`` are written in: the one asked
    for, or for ``auto`` the model's own."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return next(model.parameters()).dtype


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

    def check_recipe(self, recipe: Any) -> None:
        """Refuse, from the recipe alone (``qframe validate``), what the checkpoint could not
        hold: each stage's formats, and different algorithms across stages (probed on module
        names of every family); raises :class:`qframe.ExportError` naming the stage."""
        formats = stage_formats(recipe)
        schemes = {i: recipe.stages[i].scheme for i in formats}
        for family in PROBE_FAMILIES:
            probes = [(name, PROBE_LINEAR) for name in (*probe_names(family), "lm_head")]
            _refuse_mixed(formats[i] for i in first_claims(schemes, probes).values())

    def check(self, model: nn.Module, recipe: Any) -> None:
        """Refuse, from the recipe and the model's shapes, what the checkpoint could not hold
        (before any calibration); raises :class:`qframe.ExportError`."""
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            _refuse_transposed_layouts(model)
        formats = stage_formats(recipe)
        linears = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        claims = first_claims({i: recipe.stages[i].scheme for i in formats}, linears)
        _refuse_mixed(formats[i] for i in claims.values())
        for name, module in linears:
            if name not in claims:
                continue
            weights, where = recipe.stages[claims[name]].scheme.weights, formats[claims[name]][2]
            if weights.granularity == "group" and module.in_features % weights.group_size:
                raise ExportError(f"{where}: {name} has {module.in_features} input channels, not a whole number "
                                  f"of groups of {weights.group_size}, which the packed format needs; choose a "
                                  f"group size that divides {module.in_features}")

    def export(self, qmodel: Any, directory: str | Path) -> Path:
        """Write ``config.json`` (with ``quantization_config``), ``hf_quant_config.json``, the
        safetensors, the generation config and the tokenizer into ``directory``. Everything is
        checked and converted before the first file is written."""
        from safetensors.torch import save_file

        model = qmodel.model
        plan = make_plan(model)
        dtype = export_dtype(model, self.options.dtype)
        tensors = checkpoint_tensors(model, plan, dtype)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        parts = shards(tensors, self.options.shard_bytes)
        if len(parts) == 1:
            save_file(parts[0], str(directory / WEIGHTS), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, part in enumerate(parts, 1):
                file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, str(directory / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(part, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        hf_quant = plan.hf_quant_config()
        # Written even for an unquantized model (quant_algo null), so the directory is recognized
        # and validated; config.json then claims no quantization, as modelopt's does.
        (directory / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=4) + "\n")
        if plan.quant_algo or plan.kv_cache_quant_algo:
            config["quantization_config"] = quantization_config(hf_quant)
        else:
            config.pop("quantization_config", None)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(directory)
        if qmodel.tokenizer is not None:
            qmodel.tokenizer.save_pretrained(directory)
        return directory

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
    every quantized linear has its tensors with the right dtypes and shapes for ``quant_algo``,
    every other linear weight is excluded, and the KV cache has its scales.

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


@hookimpl
def qframe_backends():
    yield BackendPlugin(
        name="hf",
        summary="unified Hugging Face checkpoint (safetensors + hf_quant_config.json) for TensorRT-LLM, vLLM, SGLang",
        factory=HFExporter,
        options=HFOptions,
    )
