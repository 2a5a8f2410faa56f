"""Check a TensorRT-LLM checkpoint directory the way ``trtllm-build`` will read it.

Written from TensorRT-LLM's own checkpoint loader (``tensorrt_llm/models/modeling_utils.py``,
``tensorrt_llm/quantization/mode.py``), not from qframe's writer, so
that it catches the writer's mistakes: ``config.json`` (required keys and their types, a known
architecture, the dtype, ``mapping`` and ``quantization``), one ``rank{N}.safetensors`` per
rank, and in every rank each tensor TensorRT-LLM will ask for, by name, with its exact shape on
that rank (tensor-parallel splits, key/value heads repeated when there are fewer than ranks,
pipeline stages numbering their layers from 0, ``lm_head`` padded to a multiple of ``tp_size``)
and its dtype for the ``quant_algo``; modules ``exclude_modules`` names must be unquantized;
tensors nobody asks for are reported; scales must be finite and positive. A mixture of experts
(Mixtral, Qwen2-MoE, Qwen3-MoE) has each layer's experts stacked in ``mlp.fc`` and ``mlp.proj``
(every expert's tensors, their scales' shapes per ``quant_algo``: 16-bit, W4A16_AWQ, FP8 or
NVFP4; expert parallelism is not checked), a float32 ``mlp.router``,
the ``moe`` keys of ``config.json`` checked, and its routers (and Qwen2-MoE's shared expert
gates) named in ``exclude_modules``. Anything else in the directory (an ``engine/`` folder) is
not looked at.

Which tensors a family has (names, unsplit shapes, biases, fused parts) comes from its layout
plugin (:mod:`.layout`), found in the registry by the config's ``architecture``; how they
split across ranks and what each ``quant_algo`` stores for a linear is TensorRT-LLM's, and
written here once for every family.

Example::

    >>> validate_checkpoint(Path("out/awq/tensorrt_llm"), registry)  # doctest: +SKIP
    ['rank1.safetensors: transformer.layers.0.attention.qkv.weight: shape [128, 256], expected [192, 256] ...']
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qframe.errors import ExportError, shorten

from .layout import BACKEND, ExpertsSpec, Layout, LinearSpec, Plain, Sizes, layout_class

# TensorRT-LLM's ``MODEL_MAP`` names (GPT2LMHeadModel only from v1.0 on): an architecture no
# installed layout reads is still one TensorRT-LLM builds, only its tensors go unchecked. A
# layout plugin may claim further names (a model registered into MODEL_MAP by its own package).
TRTLLM_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "InternLMForCausalLM", "SkyworkForCausalLM", "Qwen2ForCausalLM",
    "GPTForCausalLM", "GPT2LMHeadModel",
    "OPTForCausalLM", "BloomForCausalLM", "FalconForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "GPTNeoXForCausalLM", "GPTJForCausalLM", "MPTForCausalLM", "GemmaForCausalLM", "BaichuanForCausalLM",
    "ChatGLMForCausalLM", "MixtralForCausalLM", "QWenForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)

DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# The largest size, layer count or head count read from config.json: more is no model, and the
# validator would spend hours naming the tensors of 2**70 layers.
MAX_SIZE = 1 << 20
F32, I8, U8, FP8 = "F32", "I8", "U8", "F8_E4M3"

# quantization.mode.QuantAlgo across versions (TensorRT-LLM's tensorrt_llm/quantization/mode.py), and those checked here.
QUANT_ALGOS = (
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W8A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION",
    "NO_QUANT", "NVFP4", "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8", "W4A16_MXFP4",
)
CHECKED_ALGOS = (None, "NO_QUANT", "W8A16", "W4A16", "FP8", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "NVFP4")
KV_ALGOS = ("FP8", "INT8", "NVFP4")
# The keys QuantConfig takes (it raises on others; tensorrt_llm/models/modeling_utils.py); qframe writes only the first six.
QUANT_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale",
              "exclude_modules", "smoothquant_val", "clamp_val", "use_meta_recipe")
MAPPING_KEYS = ("world_size", "tp_size", "pp_size")
# Mapping's split of a mixture of experts (modelopt writes them; absent, they are tp_size and 1).
MOE_MAPPING_KEYS = ("moe_tp_size", "moe_ep_size")
# The algorithms whose experts this validator predicts (those qframe writes: TensorRT-LLM's
# tensorrt_llm/layers/moe.py MOEWeightWrapper, as modelopt's export stacks them).
EXPERT_ALGOS = (None, "NO_QUANT", "W8A16", "W4A16", "W4A16_AWQ", "FP8", "NVFP4")
# TensorRT-LLM quantizes a W8A16/W4A16 checkpoint's 16-bit weights itself: every weight whose name
# holds one of these, unless exclude_modules matches the *weight's* name
# (tensorrt_llm/models/convert_utils.py, weight_only_quantize_dict).
WEIGHT_ONLY_NAMES = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight", "gate.weight")
_RANK_FILE = re.compile(r"rank(\d+)\.safetensors")


def recognizes(directory: Path) -> bool:
    """Whether ``directory`` looks like a TensorRT-LLM checkpoint: a ``config.json`` with an
    ``architecture`` and a ``rank0.safetensors``.

    Example::

        >>> recognizes(Path("out/awq/tensorrt_llm"))  # doctest: +SKIP
        True
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return False
    return isinstance(config, dict) and "architecture" in config and (directory / "rank0.safetensors").is_file()


def validate_checkpoint(directory: Path, registry: Any) -> list[str]:
    """The problems of the TensorRT-LLM checkpoint in ``directory``, one readable line each
    (naming the file, the key or tensor, and what was expected); empty when it is valid.
    ``registry`` (a :class:`qframe.plugins.Registry`) provides the layout plugins.

    Example::

        >>> from qframe.plugins import build_registry
        >>> for line in validate_checkpoint(Path("out/fp8/tensorrt_llm"), build_registry()):  # doctest: +SKIP
        ...     print(line)
        rank0.safetensors: transformer.layers.1.mlp.proj.weights_scaling_factor: missing (expected float32 [1])
    """
    directory = Path(directory)
    problems: list[str] = []
    try:
        config = json.loads((directory / "config.json").read_text())
    except OSError:
        return [f"config.json: missing in {directory}"]
    except (ValueError, RecursionError) as exc:
        return [f"config.json: not valid JSON ({shorten(str(exc))})"]
    if not isinstance(config, dict):
        return ["config.json: expected a JSON object"]
    spec = _read_config(config, registry, problems)
    tp, pp = _read_mapping(config, [])
    if tp is not None:  # the rank files follow the mapping, whatever else is wrong
        problems += _check_rank_files(directory, tp * pp)
    if spec is None:
        return problems
    if spec.unchecked:
        return problems + [f"config.json: {spec.unchecked}; its tensors were not checked"]
    for rank in range(spec.world_size):
        path = directory / f"rank{rank}.safetensors"
        if path.is_file():
            problems += _check_rank(path, spec, rank)
    return problems


# -- config.json -----------------------------------------------------------------------------------

@dataclass
class Spec:
    """What config.json says: the family's layout (None when no installed layout reads the
    architecture), the mapping and the quantization."""

    layout: Layout | None
    dtype: str
    tp: int
    pp: int
    quant_algo: str | None
    kv_algo: str | None
    group_size: int
    pre_quant_scale: bool
    exclude: list[str] | None
    parallel_embedding: bool
    embedding_dim: int
    share_embedding: bool
    unchecked: str | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(config: dict, key: str, problems: list[str], default: int | None = None) -> int | None:
    value = config.get(key, default)
    if value is None and default is None and key not in config:
        return None
    if not _is_int(value) or not 1 <= value <= MAX_SIZE:  # the validator walks every layer and head
        problems.append(f"config.json: {key}: {shorten(value)}, expected a positive integer up to {MAX_SIZE}")
        return None
    return value


def _flag(config: dict, key: str, default: bool, problems: list[str], where: str = "") -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"config.json: {where}{key}: {value!r}, expected true or false")
        return default
    return value


def _read_config(config: dict, registry: Any, problems: list[str]) -> Spec | None:
    """Check config.json's keys; the layout and the rest, or None when the tensors cannot be predicted."""
    start = len(problems)
    for key in ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in config:
            problems.append(f"config.json: {key}: missing (required by TensorRT-LLM's PretrainedConfig)")
    arch = config.get("architecture")
    entry = registry.layout(BACKEND, architecture=arch) if isinstance(arch, str) else None
    unchecked = None
    if "architecture" in config and entry is None:
        if arch in TRTLLM_ARCHITECTURES:
            unchecked = f"architecture {arch!r} is one TensorRT-LLM builds, but this validator has no tensor layout for it"
        else:
            problems.append(f"config.json: architecture: {shorten(arch)} is not a TensorRT-LLM architecture; known: "
                            + ", ".join(dict.fromkeys((*_layout_architectures(registry), *TRTLLM_ARCHITECTURES))))
    dtype = config.get("dtype")
    if "dtype" in config and (not isinstance(dtype, str) or dtype not in DTYPES):  # a list is unhashable
        problems.append(f"config.json: dtype: {shorten(dtype)}, expected one of {', '.join(DTYPES)}")
    logits = config.get("logits_dtype", "float32")
    if not isinstance(logits, str) or logits not in DTYPES:
        problems.append(f"config.json: logits_dtype: {shorten(logits)}, expected one of {', '.join(DTYPES)}")
    sizes = _read_sizes(config, problems)
    parallel_embedding = _flag(config, "use_parallel_embedding", False, problems)
    embedding_dim = config.get("embedding_sharding_dim", 0)
    if embedding_dim not in (0, 1) or isinstance(embedding_dim, bool):
        problems.append(f"config.json: embedding_sharding_dim: {embedding_dim!r}, expected 0 or 1")
        embedding_dim = 0
    share_embedding = _flag(config, "share_embedding_table", False, problems)
    tp, pp = _read_mapping(config, problems)
    quant = _read_quantization(config, problems)
    if sizes is not None:
        heads, kv_heads = sizes.heads, sizes.kv_heads
        if tp and heads % tp:
            problems.append(f"config.json: mapping.tp_size: {tp} does not divide num_attention_heads {heads}")
        if tp and kv_heads % tp and tp % kv_heads:
            problems.append(f"config.json: mapping.tp_size: {tp} and num_key_value_heads {kv_heads}: one must divide "
                            "the other (TensorRT-LLM splits or repeats whole key/value heads)")
        if pp and sizes.num_layers % pp:
            problems.append(f"config.json: mapping.pp_size: {pp} does not divide num_hidden_layers {sizes.num_layers} "
                            "(TensorRT-LLM before v1.0 drops the remainder; later versions give the first stages one "
                            "more)")
    layout = None
    if entry is not None and sizes is not None:
        try:
            layout = layout_class(entry).from_checkpoint(config)
        except ExportError as exc:  # the family needs a key this config lacks
            problems.append(f"config.json: {exc}")
    if sizes is not None and tp:
        # The MLP widths tensor parallelism splits: a mixture of experts' experts (and shared expert).
        widths = layout.mlp_widths() if layout is not None else {"intermediate_size": sizes.intermediate}
        problems += [f"config.json: mapping.tp_size: {tp} does not divide {key} {width}"
                     for key, width in widths.items() if width % tp]
    if len(problems) > start or quant is None:
        return None
    algo, kv_algo, group, pre_quant, exclude = quant
    if unchecked is None and algo not in CHECKED_ALGOS:
        unchecked = f"quant_algo {algo!r} is valid, but this validator has no tensor layout for it"
    experts = layout is not None and sizes.num_layers > 0 and bool(layout.experts(0))
    if unchecked is None and experts and algo not in EXPERT_ALGOS:
        unchecked = (f"quant_algo {algo!r} is valid, but this validator has no tensor layout for a mixture of experts "
                     f"quantized with it (only for {', '.join(str(a) for a in EXPERT_ALGOS[2:])})")
    ep = (config.get("mapping") or {}).get("moe_ep_size", 1)
    if unchecked is None and experts and ep != 1:
        unchecked = f"expert parallelism (mapping.moe_ep_size = {ep}) is valid, but this validator has no tensor layout for it"
    if layout is not None and algo not in (None, "NO_QUANT") and isinstance(exclude, list):
        problems += _exclusion_problems(layout, algo, exclude)
        if len(problems) > start:
            return None
    if unchecked is None and kv_algo not in (None, "FP8", "INT8"):
        unchecked = f"kv_cache_quant_algo {kv_algo!r} is valid, but this validator has no tensor layout for it"
    return Spec(
        layout=layout, dtype=dtype, tp=tp, pp=pp, quant_algo=None if algo == "NO_QUANT" else algo, kv_algo=kv_algo,
        group_size=group, pre_quant_scale=pre_quant, exclude=exclude, parallel_embedding=parallel_embedding,
        embedding_dim=embedding_dim, share_embedding=share_embedding, unchecked=unchecked)


def _layout_architectures(registry: Any) -> list[str]:
    return [a for e in registry.entries("layout") if e.record.backend == BACKEND for a in e.record.architectures]


def _read_sizes(config: dict, problems: list[str]) -> Sizes | None:
    """Check the size keys; the sizes (with TensorRT-LLM's defaults), or None when one is wrong."""
    start = len(problems)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size",
                "intermediate_size"):
        if key in config:
            _positive(config, key, problems)
    vocab = config.get("vocab_size")
    if not _is_int(vocab) or vocab < 1:
        problems.append(f"config.json: vocab_size: {vocab!r}, expected a positive integer (lm_head's rows follow it)")
    positions = config.get("max_position_embeddings")
    if positions is not None and (not _is_int(positions) or positions < 1):
        problems.append(f"config.json: max_position_embeddings: {positions!r}, expected a positive integer")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads")  # reported missing by the caller
    if len(problems) > start or not all(k in config for k in required):
        return None
    sizes = Sizes.from_checkpoint(config)
    if sizes.head_size < 1:  # derived: hidden_size // num_attention_heads
        problems.append(f"config.json: head_size: missing, and hidden_size {sizes.hidden} // num_attention_heads "
                        f"{sizes.heads} is 0; expected a positive integer")
        return None
    if sizes.heads % sizes.kv_heads:
        problems.append(f"config.json: num_key_value_heads: {sizes.kv_heads} does not divide num_attention_heads "
                        f"{sizes.heads}")
        return None
    return sizes


def _read_mapping(config: dict, problems: list[str]) -> tuple[int | None, int | None]:
    mapping = config.get("mapping")
    if not isinstance(mapping, dict):
        problems.append(f"config.json: mapping: {mapping!r}, expected {{\"world_size\", \"tp_size\", \"pp_size\"}}")
        return None, None
    moe = isinstance(config.get("moe"), dict)
    for key in mapping:
        if key not in MAPPING_KEYS and not (moe and key in MOE_MAPPING_KEYS):
            problems.append(f"config.json: mapping.{key}: unexpected; write exactly world_size, tp_size and pp_size "
                            "(TensorRT-LLM's Mapping raises on keys it lacks, and others change what each rank holds)")
    sizes = {}
    for key in MAPPING_KEYS:
        value = mapping.get(key)
        if not _is_int(value) or value < 1:
            problems.append(f"config.json: mapping.{key}: {value!r}, expected a positive integer")
        else:
            sizes[key] = value
    if len(sizes) < 3:
        return None, None
    if sizes["world_size"] != sizes["tp_size"] * sizes["pp_size"]:
        problems.append(f"config.json: mapping.world_size: {sizes['world_size']}, expected tp_size * pp_size = "
                        f"{sizes['tp_size'] * sizes['pp_size']}")
        return None, None
    if moe and any(k in mapping for k in MOE_MAPPING_KEYS):
        split = {k: mapping.get(k, sizes["tp_size"] if k == "moe_tp_size" else 1) for k in MOE_MAPPING_KEYS}
        bad = [k for k, v in split.items() if not _is_int(v) or v < 1]
        if bad:
            problems.append(f"config.json: mapping.{bad[0]}: {split[bad[0]]!r}, expected a positive integer")
            return None, None
        if split["moe_tp_size"] * split["moe_ep_size"] != sizes["tp_size"]:
            problems.append(f"config.json: mapping.moe_tp_size * moe_ep_size: {split['moe_tp_size']} * "
                            f"{split['moe_ep_size']}, expected tp_size = {sizes['tp_size']} (the tensor-parallel "
                            "ranks split the experts between them)")
            return None, None
    return sizes["tp_size"], sizes["pp_size"]


def _read_quantization(config: dict, problems: list[str]):
    """(quant_algo, kv_cache_quant_algo, group_size, pre_quant_scale, exclude_modules), or None."""
    quant = config.get("quantization")
    if quant is None:  # TensorRT-LLM reads a missing table as no quantization at all
        return None, None, 128, False, None
    if not isinstance(quant, dict):
        problems.append(f"config.json: quantization: {quant!r}, expected an object")
        return None
    start = len(problems)
    for key in quant:
        if key not in QUANT_KEYS:
            problems.append(f"config.json: quantization.{key}: unknown key (TensorRT-LLM's QuantConfig raises on it); "
                            f"allowed: {', '.join(QUANT_KEYS[:6])}")
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        problems.append(f"config.json: quantization.quant_algo: {algo!r} is not a TensorRT-LLM QuantAlgo; "
                        f"expected null or one of {', '.join(QUANT_ALGOS)}")
    if kv_algo is not None and kv_algo not in KV_ALGOS:
        problems.append(f"config.json: quantization.kv_cache_quant_algo: {kv_algo!r}, expected null or one of "
                        f"{', '.join(KV_ALGOS)}")
    group = quant.get("group_size", 128)
    if not _is_int(group) or group < 1:
        problems.append(f"config.json: quantization.group_size: {group!r}, expected a positive integer")
    elif algo in ("W4A16_AWQ",) and group not in (64, 128):
        problems.append(f"config.json: quantization.group_size: {group} for {algo}, expected 64 or 128")
    elif algo == "W4A8_AWQ" and group != 128:
        problems.append(f"config.json: quantization.group_size: {group} for W4A8_AWQ, expected 128")
    elif algo == "NVFP4" and group != 16:
        problems.append(f"config.json: quantization.group_size: {group} for NVFP4, expected 16")
    zero = _flag(quant, "has_zero_point", False, problems, "quantization.")
    if zero and algo in ("W4A16_AWQ", "W4A8_AWQ"):
        problems.append(f"config.json: quantization.has_zero_point: true for {algo}, expected false (symmetric int4)")
    pre_quant = _flag(quant, "pre_quant_scale", False, problems, "quantization.")
    exclude = quant.get("exclude_modules")
    if algo not in (None, "NO_QUANT") or kv_algo is not None:
        # Absent or empty means "the defaults" before v1.0 and "nothing" after: only a list is the same everywhere.
        if not isinstance(exclude, list) or not exclude:
            problems.append(f"config.json: quantization.exclude_modules: {exclude!r}, expected an explicit list of "
                            "patterns (e.g. [\"*lm_head\"]); TensorRT-LLM versions disagree on what a missing one means")
    if exclude is not None and not (isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
        if isinstance(exclude, list):
            problems.append(f"config.json: quantization.exclude_modules: {exclude!r}, expected strings only")
        exclude = None
    if len(problems) > start:
        return None
    return algo, kv_algo, group, pre_quant, exclude


def _exclusion_problems(layout: Layout, algo: str, exclude: list[str]) -> list[str]:
    """What ``exclude_modules`` must name for a quantized checkpoint and does not: each layer's
    always-float modules (MoE routers, Qwen2-MoE's shared expert gates: TensorRT-LLM's own
    defaults exclude them only when the list is empty); for W8A16/W4A16, the weights of every
    excluded module by their own names (TensorRT-LLM quantizes those weights by name); and no
    Qwen2-MoE experts (TensorRT-LLM rebuilds an excluded SharedMoE without its shared expert).
    At most five lines, and how many more."""
    def named(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)

    def weight_unnamed(name: str) -> bool:  # TensorRT-LLM would quantize this excluded module's weight
        weight = f"{name}.weight"
        return algo in ("W8A16", "W4A16") and any(part in weight for part in WEIGHT_ONLY_NAMES) and not named(weight)

    def by_weight(module: str, weight_of: str) -> str:
        return (f"does not name {weight_of}.weight (it names {module}, but TensorRT-LLM quantizes {algo} weights by "
                "their own names)")

    problems = []
    for i in range(layout.num_layers):
        for module in layout.float_modules(i):
            if not named(module):
                problems.append(f"does not name {module}, which TensorRT-LLM would then quantize with {algo} (its "
                                "defaults exclude MoE routers and shared expert gates only when the list is empty)")
            elif weight_unnamed(module):
                problems.append(by_weight(module, module))
        problems += [by_weight(linear.name, linear.name) for linear in layout.linears(i)
                     if named(linear.name) and weight_unnamed(linear.name)]
        for experts in layout.experts(i):
            if not named(experts.name):
                continue
            if layout.shared_expert:
                problems.append(f"names {experts.name}, and TensorRT-LLM rebuilds an excluded Qwen2-MoE mixture of "
                                "experts without its shared expert, whose weights would then not load")
            problems += [by_weight(experts.name, w) for w in (experts.fc, experts.proj) if weight_unnamed(w)]
    prefix = "config.json: quantization.exclude_modules: "
    more = [f"{prefix}and {len(problems) - 5} more like these"] if len(problems) > 5 else []
    return [prefix + p for p in problems[:5]] + more


def _check_rank_files(directory: Path, world_size: int) -> list[str]:
    problems = [f"rank{r}.safetensors: missing (mapping.world_size is {world_size}: expected rank0 to "
                f"rank{world_size - 1})" for r in range(world_size) if not (directory / f"rank{r}.safetensors").is_file()]
    for path in sorted(directory.glob("rank*.safetensors")):
        match = _RANK_FILE.fullmatch(path.name)
        if match and int(match.group(1)) >= world_size:
            problems.append(f"{path.name}: unexpected (mapping.world_size is {world_size}); a leftover of another export?")
    return problems


# -- the tensors of one rank -----------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """One tensor TensorRT-LLM asks for: its shape on this rank, the dtypes it may have, why."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    why: str = ""
    optional: bool = False
    scale: bool = False  # values must be finite and (per tensor) positive
    per_block: bool = False  # a per-group/block weight scale: zero allowed (an all-zero block)


_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "I8": "int8", "U8": "uint8",
                FP8: "float8_e4m3fn"}


def _describe(dtypes: tuple[str, ...]) -> str:
    return " or ".join(_DTYPE_NAMES.get(d, d) for d in dtypes)


def _excluded(spec: Spec, module: str) -> str | None:
    for pattern in spec.exclude or ():
        # fnmatch as TensorRT-LLM >= v1.0 matches; older ones take exact names and "prefix*", a subset
        if fnmatch.fnmatchcase(module, pattern):
            return pattern
    return None


def _linear(spec: Spec, name: str, out: int, inp: int, bias: bool, parallel: str, out_full: int) -> dict[str, Expect]:
    """A linear's tensors on one rank: ``out`` x ``inp`` is its weight on this rank; ``out_full``
    its output width before the split (row-parallel per-channel scales keep it whole)."""
    md = DTYPES[spec.dtype]
    pattern = _excluded(spec, name)
    algo = None if pattern else spec.quant_algo
    note = f" (excluded by {pattern!r})" if pattern and spec.quant_algo else ""
    out_tensors: dict[str, Expect] = {}
    if bias:
        out_tensors[f"{name}.bias"] = Expect((out,), (md,), "bias")
    one = (1,)
    if algo in (None, "W8A16", "W4A16"):  # weight-only: the builder quantizes 16-bit weights itself
        out_tensors[f"{name}.weight"] = Expect((out, inp), (md,), f"unquantized{note}")
    elif algo == "FP8":
        out_tensors[f"{name}.weight"] = Expect((out, inp), (FP8,), "FP8 weight")
        out_tensors[f"{name}.weights_scaling_factor"] = Expect(one, (F32,), "per-tensor", scale=True)
        out_tensors[f"{name}.activation_scaling_factor"] = Expect(one, (F32,), "per-tensor", scale=True)
    elif algo == "W8A8_SQ_PER_CHANNEL":
        rows = out if parallel == "column" else out_full
        out_tensors[f"{name}.weight"] = Expect((out, inp), (I8,), "int8 weight")
        out_tensors[f"{name}.weights_scaling_factor"] = Expect((rows,), (F32,), "per output channel", scale=True)
        out_tensors[f"{name}.activation_scaling_factor"] = Expect(one, (F32,), "per-tensor", scale=True)
        out_tensors[f"{name}.prequant_scaling_factor"] = Expect((inp,), (md,), "per input channel", scale=True)
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):
        g = spec.group_size
        out_tensors[f"{name}.weight"] = Expect((out // 2, inp), (I8,), "int4 packed two a byte along the output")
        out_tensors[f"{name}.weights_scaling_factor"] = Expect(
            (out, inp // g), (F32, md), f"one per group of {g} inputs", scale=True, per_block=True)
        if spec.pre_quant_scale:
            out_tensors[f"{name}.prequant_scaling_factor"] = Expect((inp,), (md,), "pre_quant_scale is true", scale=True)
        if algo == "W4A8_AWQ":
            out_tensors[f"{name}.weights_scaling_factor_2"] = Expect(one, (F32,), "per-tensor", scale=True)
            out_tensors[f"{name}.activation_scaling_factor"] = Expect(one, (F32,), "per-tensor", scale=True)
    elif algo == "NVFP4":
        out_tensors[f"{name}.weight"] = Expect((out, inp // 2), (U8,), "E2M1 codes, two a byte along the input")
        out_tensors[f"{name}.weights_scaling_factor"] = Expect(
            (out, inp // 16), (FP8,), "one per block of 16 inputs", scale=True, per_block=True)
        out_tensors[f"{name}.weights_scaling_factor_2"] = Expect(one, (F32,), "per-tensor", scale=True)
        out_tensors[f"{name}.activation_scaling_factor"] = Expect(one, (F32,), "per-tensor", scale=True)
    return out_tensors


def _shape_problems(spec: Spec, name: str, out: int, inp: int) -> list[str]:
    """Widths a quantized linear's layout cannot take on this rank (said once, by config.json)."""
    algo = None if _excluded(spec, name) else spec.quant_algo
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        bad = [f"{inp} inputs not divisible by group_size {spec.group_size}"] if inp % spec.group_size else []
        return bad + ([f"{out} outputs not even (int4 rows are packed two a byte)"] if out % 2 else [])
    if algo == "NVFP4":
        return [f"{inp} inputs not divisible by the block of 16"] if inp % 16 else []
    return []


def expected_tensors(spec: Spec, rank: int) -> tuple[dict[str, Expect], list[str]]:
    """Every tensor ``rank{rank}.safetensors`` must hold, and widths its layout cannot take."""
    layout = spec.layout
    assert layout is not None, "the tensors of an architecture without a layout are not predicted"
    pp_rank = rank // spec.tp
    first, last = pp_rank == 0, pp_rank == spec.pp - 1
    expect: dict[str, Expect] = {}
    impossible: list[str] = []
    if first:
        for plain in layout.first_tensors():
            expect.update(_plain(spec, plain, first, impossible))
    # Layers are numbered from 0 on every pipeline stage; TensorRT-LLM >= v1.0 splits like tensor_split.
    for i in range(_stage_layers(spec, pp_rank)):
        for plain in layout.layer_tensors(i):
            expect.update(_plain(spec, plain, first, impossible))
        for linear in layout.linears(i):
            expect.update(_linear_spec(spec, linear, impossible))
        for experts in layout.experts(i):
            expect.update(_experts(spec, experts, impossible))
        if spec.kv_algo is not None:
            prefix = f"transformer.layers.{i}"
            why = f"{spec.kv_algo} key/value cache"
            expect[f"{prefix}.attention.kv_cache_scaling_factor"] = Expect((1,), (F32,), why, scale=True)
            # modelopt also writes K's and V's own (TensorRT-LLM >= v1.0 takes their max); optional, as a pair
            for part in ("k", "v"):
                expect[f"{prefix}.attention.{part}_cache_scaling_factor"] = Expect(
                    (1,), (F32,), why, optional=True, scale=True)
            expect[f"{prefix}.attention.kv_cache_rcp_scaling_factor"] = Expect((1,), (F32,), why, optional=True, scale=True)
    if last:
        for plain in layout.last_tensors():
            expect.update(_plain(spec, plain, first, impossible))
    return expect, impossible


def _linear_spec(spec: Spec, linear: LinearSpec, impossible: list[str]) -> dict[str, Expect]:
    """A layout's linear on this rank: split by TensorRT-LLM's rules (column: output rows, by
    head where the parts hold heads; row: input columns, per-row tensors kept whole)."""
    out, inp = linear.rank_shape(spec.tp)
    impossible += [f"{linear.name}: {p}" for p in _shape_problems(spec, linear.name, out, inp)]
    return _linear(spec, linear.name, out, inp, linear.bias, linear.parallel, linear.out_features)


def _experts(spec: Spec, experts: ExpertsSpec, impossible: list[str]) -> dict[str, Expect]:
    """A layer's stacked experts on this rank (``fc``: each expert's up and gate rows, split by
    rank; ``proj``: its input columns, split by rank), as the ``quant_algo`` stores them; an
    excluded MoE holds 16-bit weights."""
    md = DTYPES[spec.dtype]
    pattern = _excluded(spec, experts.name)
    algo = None if pattern else spec.quant_algo
    note = f" (excluded by {pattern!r})" if pattern and spec.quant_algo else ""
    e, rows, h = experts.fc_shape(spec.tp)
    inner = experts.proj_shape(spec.tp)[2]
    fc, proj = experts.fc, experts.proj
    if algo in ("FP8", "NVFP4"):
        return _float_experts(algo, e, rows, h, inner, fc, proj, impossible)
    if algo != "W4A16_AWQ":  # unquantized, or weight-only: the builder quantizes 16-bit weights itself
        kind = f"{algo}: 16-bit, the builder quantizes them" if algo else f"unquantized{note}"
        return {f"{fc}.weight": Expect((e, rows, h), (md,), f"experts' up and gate rows, {kind}"),
                f"{proj}.weight": Expect((e, h, inner), (md,), f"experts' down projections, {kind}")}
    g = spec.group_size
    impossible += [f"{name}: {width} inputs not divisible by group_size {g}"
                   for name, width in ((fc, h), (proj, inner)) if width % g]
    out = {
        f"{fc}.weight": Expect((e, rows // 2, h), (I8,), "int4 packed two a byte along each expert's rows"),
        f"{fc}.weights_scaling_factor": Expect((e, rows, h // g), (F32, md), f"per expert, row and group of {g} inputs",
                                               scale=True, per_block=True),
        f"{proj}.weight": Expect((e, h // 2, inner), (I8,), "int4 packed two a byte along each expert's rows"),
        f"{proj}.weights_scaling_factor": Expect((e, h, inner // g), (F32, md),
                                                 f"per expert, row and group of {g} inputs", scale=True, per_block=True),
    }
    if spec.pre_quant_scale:
        out[f"{fc}.prequant_scaling_factor"] = Expect((e, h), (md,), "pre_quant_scale is true (a row an expert)",
                                                      scale=True)
        out[f"{proj}.prequant_scaling_factor"] = Expect((e, inner), (md,), "pre_quant_scale is true (a row an expert)",
                                                        scale=True)
    return out


def _float_experts(algo: str, e: int, rows: int, h: int, inner: int, fc: str, proj: str,
                   impossible: list[str]) -> dict[str, Expect]:
    """FP8 or NVFP4 experts on this rank, as TensorRT-LLM's ``MOEWeightWrapper`` declares them:
    one activation scale for all experts (``[1]``); FP8 one weight scale an expert (``[E, 1]``);
    NVFP4 block scales per expert, row and 16 inputs, and one global scale an expert (``[E]``,
    from which the loader makes the per-expert ``alpha``)."""
    out: dict[str, Expect] = {}
    for name, out_rows, inp, what in ((fc, rows, h, "up and gate rows"), (proj, h, inner, "down projections")):
        if algo == "FP8":
            out[f"{name}.weight"] = Expect((e, out_rows, inp), (FP8,), f"FP8 experts' {what}")
            out[f"{name}.weights_scaling_factor"] = Expect((e, 1), (F32,), "one per expert", scale=True)
        else:
            if inp % 16:
                impossible.append(f"{name}: {inp} inputs not divisible by the block of 16")
            out[f"{name}.weight"] = Expect((e, out_rows, inp // 2), (U8,),
                                           f"NVFP4 experts' {what}, E2M1 codes two a byte along the input")
            out[f"{name}.weights_scaling_factor"] = Expect(
                (e, out_rows, inp // 16), (FP8,), "per expert, row and block of 16 inputs", scale=True, per_block=True)
            out[f"{name}.weights_scaling_factor_2"] = Expect((e,), (F32,), "one global scale per expert", scale=True)
        out[f"{name}.activation_scaling_factor"] = Expect((1,), (F32,), "one for all experts", scale=True)
    return out


def _plain(spec: Spec, plain: Plain, first: bool, impossible: list[str]) -> dict[str, Expect]:
    """A layout's plain tensor on this rank (an output head: a linear, which may be quantized)."""
    md, tp = DTYPES[plain.dtype or spec.dtype], spec.tp
    rows, *rest = plain.shape or (0,)
    if plain.head:
        prefix = plain.name.removesuffix(".weight")
        rows = math.ceil(rows / tp)  # pad(vocab, tp) / tp: the padding rows are zeros
        inp = rest[0]
        impossible += [f"{prefix}: {p}" for p in _shape_problems(spec, prefix, rows, inp)]
        head = _linear(spec, prefix, rows, inp, False, "column", rows)
        if spec.share_embedding and first:  # the loader takes vocab_embedding for a missing lm_head
            head = {k: Expect(v.shape, v.dtypes, v.why, True, v.scale, v.per_block) for k, v in head.items()}
        return head
    shape = plain.shape
    if plain.split == "vocab":
        shape = (math.ceil(rows / tp), *rest)
    elif plain.parallel_embedding and spec.parallel_embedding and tp > 1:
        shape = (math.ceil(rows / tp), *rest) if spec.embedding_dim == 0 else (rows, rest[0] // tp)
    return {plain.name: Expect(tuple(shape), (md,), plain.what or "plain tensor")}


def _stage_layers(spec: Spec, pp_rank: int) -> int:
    assert spec.layout is not None
    base, extra = divmod(spec.layout.num_layers, spec.pp)
    return base + (1 if pp_rank < extra else 0)


def _check_rank(path: Path, spec: Spec, rank: int) -> list[str]:
    from safetensors import safe_open

    where = f"{path.name}: "
    expect, impossible = expected_tensors(spec, rank)
    problems = [where + line + " (this rank's shapes cannot hold the quantized layout)" for line in impossible]
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        return [f"{where}cannot be read as safetensors ({exc})"]
    with handle as f:
        names = set(f.keys())
        for name, want in expect.items():
            if name not in names:
                if not want.optional:
                    problems.append(f"{where}{name}: missing (expected {_describe(want.dtypes[:1])} "
                                    f"{list(want.shape)}, {want.why})")
                continue
            piece = f.get_slice(name)
            shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
            # the loader takes a 0-d scalar for a [1] (or [1, 1]) parameter
            if shape != want.shape and not (shape == () and all(d == 1 for d in want.shape)):
                problems.append(f"{where}{name}: shape {list(shape)}, expected {list(want.shape)} ({want.why}; "
                                f"rank {rank} is tp_rank {rank % spec.tp}, pp_rank {rank // spec.tp})")
            if dtype not in want.dtypes:
                problems.append(f"{where}{name}: dtype {_DTYPE_NAMES.get(dtype, dtype)}, expected "
                                f"{_describe(want.dtypes)} ({want.why})")
            elif want.scale:
                problems += [where + p for p in _scale_problems(name, f.get_tensor(name), want)]
        pairs = [n for n in names if n.endswith((".k_cache_scaling_factor", ".v_cache_scaling_factor"))]
        for name in pairs:
            other = name.replace(".k_cache", ".v_cache") if ".k_cache" in name else name.replace(".v_cache", ".k_cache")
            if other not in names:
                problems.append(f"{where}{name}: present without {other.rsplit('.', 1)[-1]} (they are read as a pair)")
        for name in sorted(names - set(expect)):
            problems.append(f"{where}{name}: unexpected tensor ({_unexpected_hint(spec, name, rank)})")
    return problems


def _scale_problems(name: str, tensor, want: Expect) -> list[str]:
    import torch

    values = tensor.float()
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        return [f"{name}: {bad} of {values.numel()} values are NaN or infinite"]
    smallest = float(values.min()) if values.numel() else 1.0
    if smallest < 0 or (smallest == 0 and not want.per_block):
        return [f"{name}: smallest value {smallest}, expected every scale {'>= 0' if want.per_block else '> 0'}"]
    return []


def _unexpected_hint(spec: Spec, name: str, rank: int) -> str:
    assert spec.layout is not None
    layer = re.match(r"transformer\.layers\.(\d+)\.", name)
    if layer:
        count = _stage_layers(spec, rank // spec.tp)
        if int(layer.group(1)) >= count:
            return f"pipeline stage {rank // spec.tp} holds {count} layers, numbered from 0"
        return f"not part of the {spec.quant_algo or 'unquantized'} layout; TensorRT-LLM would ignore it"
    if _held_by(spec.layout.last_tensors(), name) and rank // spec.tp != spec.pp - 1:
        return "only the last pipeline stage holds it"
    if _held_by(spec.layout.first_tensors(), name) and rank >= spec.tp:
        return "only the first pipeline stage holds it"
    head = _held_by([p for p in spec.layout.last_tensors() if p.head], name)
    if head is not None and _excluded(spec, head):
        return f"{head} is excluded by {_excluded(spec, head)!r}, so it takes no scales"
    return "TensorRT-LLM does not ask for it and would ignore it"


def _held_by(plains: list[Plain], name: str) -> str | None:
    """The tensor (an output head: its linear's prefix) among ``plains`` that ``name`` belongs to."""
    for plain in plains:
        if name == plain.name:
            return plain.name.removesuffix(".weight") if plain.head else plain.name
        if plain.head and name.startswith(plain.name.removesuffix("weight")):
            return plain.name.removesuffix(".weight")
    return None
