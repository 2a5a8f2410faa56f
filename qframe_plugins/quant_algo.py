"""The quantization algorithms of NVIDIA's checkpoints (``quant_algo``), for every backend
that writes one: TensorRT-LLM's checkpoint and the unified Hugging Face checkpoint share
Model Optimizer's vocabulary, so the rules live here once and each backend names which
algorithms it writes (a :class:`Writer`).

=====================  ==========================================================  ===========
quant_algo             weights / activations                                       group sizes
=====================  ==========================================================  ===========
FP8                    FP8 E4M3 per tensor / static FP8 E4M3 per tensor             —
NVFP4                  NVFP4 / NVFP4 with a static global scale                     16
W4A16_AWQ              symmetric int4 per group / none                              64, 128
W4A8_AWQ               symmetric int4 per group / static FP8 E4M3 per tensor        128
W4A16                  symmetric int4 per channel / none (TensorRT-LLM only)        —
W8A16                  symmetric int8 per channel / none                            —
W8A8_SQ_PER_CHANNEL    symmetric int8 per channel / static int8 per tensor          —
=====================  ==========================================================  ===========

KV caches (``kv_cache_quant_algo``): ``FP8`` (E4M3) and ``INT8`` (symmetric), one static
scale per tensor.

Example::

    >>> from qframe.scheme import QuantArgs
    >>> HF = Writer("the unified HF checkpoint", ("FP8", "NVFP4", "W4A16_AWQ", "W4A8_AWQ"), ("FP8",),
    ...             elsewhere="--backend tensorrt-llm or qframe")
    >>> quant_algo(QuantArgs(bits=4, granularity="group", group_size=128), None, "q_proj", HF)
    'W4A16_AWQ'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch

from qframe import formats
from qframe.description import CacheState, ExpertsState, LinearState, ModelDescription
from qframe.errors import ExportError
from qframe.scheme import QuantArgs, describe

# Group sizes of the group-wise int4 kernels that serve these checkpoints.
AWQ_GROUP_SIZES = {"W4A16_AWQ": (64, 128), "W4A8_AWQ": (128,)}
AWQ_ALGOS = tuple(AWQ_GROUP_SIZES)
NVFP4_BLOCK = formats.NVFP4.block


@dataclass(frozen=True)
class Writer:
    """A backend's share of the vocabulary: its ``title`` in messages, the ``algorithms`` and
    ``kv_algorithms`` it writes, where to export what it cannot (``elsewhere``), what its
    KV cache scales are (``kv_note``), whether it writes quantized fused experts
    (``experts``) and in which of its algorithms (``expert_algorithms``: weight-only ones, or FP8
    and NVFP4 with the experts' static input scales, one a fused weight shared by its experts)."""

    title: str
    algorithms: tuple[str, ...]
    kv_algorithms: tuple[str, ...]
    elsewhere: str
    kv_note: str = "stores FP8 E4M3 or symmetric INT8 caches"
    experts: bool = False
    expert_algorithms: tuple[str, ...] = ("W4A16_AWQ",)


def _static_fp8(args: QuantArgs | None) -> bool:
    return (args is not None and formats.of(args) is formats.E4M3 and args.granularity == "tensor"
            and not args.dynamic)


def quant_algo(weights: QuantArgs | None, acts: QuantArgs | None, where: str, writer: Writer) -> str | None:
    """The ``quant_algo`` of a linear quantized with these args (``None``: not quantized), or an
    :class:`~qframe.ExportError` naming ``where`` and what to change.

    Example::

        >>> TRT = Writer("TensorRT-LLM", ("FP8", "W4A16_AWQ"), ("FP8",), elsewhere="--backend hf or qframe")
        >>> quant_algo(QuantArgs(bits=4, granularity="group", group_size=32), None, "q_proj", TRT)
        Traceback (most recent call last):
        ...
        qframe.errors.ExportError: q_proj: weights int4 group 32, activations none: the int4 kernels that serve W4A16_AWQ take groups of 64 or 128 input channels; set weights.group_size = 64 or 128
    """
    def refuse(why: str) -> ExportError:
        return ExportError(f"{where}: weights {describe(weights)}, activations {describe(acts)}: {why}")

    if weights is None:
        if acts is not None:
            raise refuse(f"{writer.title} has no activation-only quantization; quantize the weights too, or neither")
        return None
    fmt = formats.of(weights)
    if isinstance(fmt, formats.IntFormat):
        if fmt.bits == 8 and "W8A16" not in writer.algorithms:
            raise refuse(f"{writer.title} holds no int8 weights (W8A16, W8A8_SQ_PER_CHANNEL); export them with "
                         f"{writer.elsewhere}")
        if not weights.symmetric:
            raise refuse(f"the int4/int8 kernels that serve {writer.title} take symmetric weights (no zero points, "
                         "has_zero_point is false); set weights.symmetric = true")
    if acts is not None and acts.dynamic:
        raise refuse(f"{writer.title} holds static activation scales only (dynamic per-token or per-block scales "
                     f"need kernels whose tensors it does not name); calibrate them: set activations.dynamic = false "
                     f"(not dynamic), or export with {writer.elsewhere}")
    algo = _algorithm(weights, acts, fmt, refuse, per_channel_int4="W4A16" in writer.algorithms)
    if algo not in writer.algorithms:
        raise refuse(f"{writer.title} does not hold {algo}; export it with {writer.elsewhere}")
    return algo


def _algorithm(weights: QuantArgs, acts: QuantArgs | None, fmt: formats.NumberFormat, refuse,
               per_channel_int4: bool = False) -> str:
    if isinstance(fmt, formats.IntFormat) and fmt.bits == 4:
        # TensorRT-LLM's W4A16 (weight-only int4, one scale per output channel); the unified HF
        # checkpoint has no per-channel int4.
        if per_channel_int4 and weights.granularity == "channel" and acts is None:
            return "W4A16"
        if weights.granularity != "group":
            also = ", or as W4A16 per output channel without activations" if per_channel_int4 else ""
            raise refuse(f"int4 weights are written as W4A16_AWQ/W4A8_AWQ, which scale groups of input channels{also}; "
                         "set weights.group_size = 64 or 128")
        if acts is None:
            algo = "W4A16_AWQ"
        elif _static_fp8(acts):
            algo = "W4A8_AWQ"
        else:
            raise refuse("int4 weights go with no activation quantization (W4A16_AWQ) or static FP8 E4M3 activations "
                         "per tensor (W4A8_AWQ); set activations = { type = \"float\", bits = 8 } or remove them")
        if weights.group_size not in AWQ_GROUP_SIZES[algo]:
            sizes = " or ".join(map(str, AWQ_GROUP_SIZES[algo]))
            raise refuse(f"the int4 kernels that serve {algo} take groups of {sizes} input channels; "
                         f"set weights.group_size = {sizes}")
        return algo
    if isinstance(fmt, formats.IntFormat) and fmt.bits == 8:
        if weights.granularity != "channel":
            raise refuse("int8 weights are scaled per output channel (W8A16, W8A8_SQ_PER_CHANNEL); "
                         "set weights.granularity = \"channel\"")
        if acts is None:
            return "W8A16"
        if formats.of(acts) == formats.INT8 and acts.granularity == "tensor":
            return "W8A8_SQ_PER_CHANNEL"
        raise refuse("int8 weights go with no activation quantization (W8A16) or static symmetric int8 activations "
                     "per tensor (W8A8_SQ_PER_CHANNEL)")
    if isinstance(fmt, formats.IntFormat):
        raise refuse("the checkpoint holds int4 or int8 weights; set weights.bits = 4 or 8")
    if fmt is formats.E4M3:
        if weights.granularity != "tensor":
            raise refuse("FP8 scales each weight per tensor; set weights.granularity = \"tensor\"")
        if not _static_fp8(acts):
            raise refuse("FP8 needs static FP8 E4M3 activations with one calibrated scale per tensor (input_scale); "
                         "set activations = { type = \"float\", bits = 8 }")
        return "FP8"
    if fmt is formats.NVFP4:
        if acts is None or formats.of(acts) is not formats.NVFP4:
            raise refuse("NVFP4 quantizes activations to NVFP4 too, with a static global scale (input_scale); "
                         "set activations = { type = \"float\", bits = 4 }")
        return "NVFP4"
    raise refuse("the checkpoint holds FP8 E4M3 or NVFP4 floats; use format e4m3 or nvfp4")


def kv_algo(cache: CacheState, writer: Writer) -> str:
    """The ``kv_cache_quant_algo`` of a layer's cache, or an :class:`~qframe.ExportError`.

    Example::

        >>> TRT = Writer("TensorRT-LLM", ("FP8",), ("FP8", "INT8"), elsewhere="--backend qframe")
        >>> kv_algo(CacheState(0, "model.layers.0.self_attn", QuantArgs(bits=8, granularity="tensor")), TRT)
        'INT8'
    """
    fmt = formats.of(cache.args)
    algo = "FP8" if fmt is formats.E4M3 else "INT8" if fmt == formats.INT8 else None
    if algo is None or algo not in writer.kv_algorithms or cache.args.dynamic or cache.args.granularity != "tensor":
        kinds = " or ".join(writer.kv_algorithms)
        raise ExportError(f"{cache.where}: a {describe(cache.args)} KV cache cannot be written for {writer.title}, "
                          f"which {writer.kv_note}; give the kv_cache stage a {kinds} cache format "
                          "(activations = { type = \"float\", bits = 8 } for FP8)")
    return algo


@dataclass
class Quantization:
    """One algorithm for a whole model, as NVIDIA's checkpoints hold it: ``quant_algo`` (None:
    nothing quantized) and its ``group_size``, the caches' ``kv_cache_quant_algo``, the
    quantized linears and those left in float (``excluded``), by Hugging Face name, and the
    quantized fused-experts modules (``experts``, where the writer holds them)."""

    quant_algo: str | None
    group_size: int | None
    kv_cache_quant_algo: str | None
    quantized: dict[str, LinearState] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    experts: dict[str, ExpertsState] = field(default_factory=dict)

    @property
    def awq(self) -> bool:
        return self.quant_algo in AWQ_ALGOS


def _group(size: int | None) -> str:
    return f" (group {size})" if size else ""


def choose(description: ModelDescription, writer: Writer, linears: list[str] | None = None) -> Quantization:
    """The one algorithm of ``description``'s linears (``linears``: those the checkpoint holds,
    default all) and its cache, refusing what ``writer`` cannot hold: a format it lacks,
    different algorithms, a group that does not divide a linear's input, layers whose caches
    differ. Errors name the module (and, before calibration, the stage that makes it).

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> from qframe.plugins import build_registry
        >>> from qframe.description import describe_model
        >>> TRT = Writer("TensorRT-LLM", ("FP8",), ("FP8",), elsewhere="--backend qframe")
        >>> choose(describe_model(tiny_llama_model(), build_registry(entry_points=False)), TRT).quant_algo is None
        True
    """
    experts = [s for s in getattr(description, "experts", {}).values() if s.quantized]
    if experts and not writer.experts:
        raise ExportError(f"{experts[0].where}: quantized experts are not written by {writer.title} yet "
                          f"({len(experts)} fused-experts module(s) quantized); export with --backend qframe (the "
                          "native checkpoint), or keep the experts in float with targets = [\"Linear\"]")
    names = list(description.linears) if linears is None else linears
    chosen: tuple[str | None, int | None, LinearState] | None = None
    result = Quantization(None, None, None)
    for name in names:
        state = description.linears[name]
        algo = quant_algo(state.weights, state.activations, state.where, writer)
        if algo is None:
            result.excluded.append(name)
            continue
        chosen = _one_algorithm(chosen, algo, state.weights.group_size if algo in AWQ_ALGOS else None, state, writer,
                                "linears")
        size = state.weights.group_size
        if description.shapes_known and state.weights.granularity == "group" and state.in_features % size:
            raise ExportError(f"{state.where}: its {state.in_features} input channels are not a whole number of groups "
                              f"of {size}, which the packed format needs; choose a group size that divides "
                              f"{state.in_features}")
        result.quantized[name] = state
    for state in experts:
        algo = _experts_algo(state, writer, description.shapes_known)
        chosen = _one_algorithm(chosen, algo, state.weights.group_size if algo in AWQ_ALGOS else None, state, writer,
                                "experts and linears")
        result.experts[state.name] = state
    if chosen is not None:
        result.quant_algo, result.group_size = chosen[0], chosen[1]
    result.kv_cache_quant_algo = _kv_choice(description, writer)
    return result


def _one_algorithm(chosen: tuple | None, algo: str, group: int | None, state: LinearState | ExpertsState,
                   writer: Writer, what: str) -> tuple:
    """The model's one ``(algorithm, group, first state)``: the first seen, or a refusal naming
    both modules when ``state`` is quantized otherwise."""
    if chosen is None:
        return algo, group, state
    if (algo, group) != chosen[:2]:
        raise ExportError(
            f"the model's {what} would be quantized with different algorithms ({state.where}: {algo}{_group(group)}; "
            f"{chosen[2].where}: {chosen[0]}{_group(chosen[1])}), but {writer.title} holds one quantization algorithm "
            "for the whole model; quantize them alike (or leave some in float through the recipe's ignore list)")
    return chosen


# What each algorithm quantized experts can be written in holds, for messages about them.
_EXPERT_FORMS = {"W4A16_AWQ": "symmetric int4 weights per group of 64 or 128",
                 "W4A16": "symmetric int4 weights per output channel",
                 "W8A16": "symmetric int8 weights per output channel",
                 "FP8": "FP8 E4M3 weights per tensor, static FP8 E4M3 activations per tensor",
                 "NVFP4": "NVFP4 weights and activations, with a static input global scale"}
# The number format of each one's weights (whatever their grouping), and which ones are weight-only.
_EXPERT_WEIGHTS = {"W4A16_AWQ": "int4", "W4A16": "int4", "W8A16": "int8", "FP8": "e4m3", "NVFP4": "nvfp4"}
_WEIGHT_ONLY = ("W4A16_AWQ", "W4A16", "W8A16")


def _weight_kind(fmt: formats.NumberFormat) -> str:
    return f"int{fmt.bits}" if isinstance(fmt, formats.IntFormat) else fmt.name


def _expert_choices(writer: Writer) -> str:
    """``writer``'s expert algorithms and what each holds, for a refusal."""
    algos = writer.expert_algorithms
    if all(a in _WEIGHT_ONLY for a in algos):
        return f"{' or '.join(algos)} only ({', or '.join(_EXPERT_FORMS[a] for a in algos)}, activations in float)"
    forms = "; ".join(f"{a}: {_EXPERT_FORMS[a]}{', activations in float' if a in _WEIGHT_ONLY else ''}" for a in algos)
    return f"{' or '.join([', '.join(algos[:-1]), algos[-1]] if len(algos) > 2 else algos)} only ({forms})"


def _experts_algo(state: ExpertsState, writer: Writer, shapes_known: bool) -> str:
    """The ``quant_algo`` of quantized experts ``writer`` can hold (one of its
    ``expert_algorithms``), or an :class:`~qframe.ExportError`."""
    weights, acts = state.weights, state.activations
    kind = _weight_kind(formats.of(weights))
    held = [a for a in writer.expert_algorithms if _EXPERT_WEIGHTS[a] == kind]
    if not held or (acts is not None and all(a in _WEIGHT_ONLY for a in held)):
        floats = kind in ("e4m3", "nvfp4") and not {"FP8", "NVFP4"} & set(writer.expert_algorithms)
        why = (f"; FP8 and NVFP4 experts need activation scales beside their weights, which qframe writes for "
               f"experts in the unified HF checkpoint but not for {writer.title} yet; export with --backend hf or "
               "qframe" if floats else "; export with --backend qframe")
        raise ExportError(f"{state.where}: experts with weights {describe(weights)}, activations {describe(acts)}: "
                          f"{writer.title} holds quantized experts as {_expert_choices(writer)}{why}, or keep the "
                          "experts in float with targets = [\"Linear\"]")
    # The linears' rules (group sizes, symmetry, the activations FP8 and NVFP4 need) hold for experts too;
    # where they send what they refuse elsewhere (dynamic inputs), only the native checkpoint takes experts.
    algo = quant_algo(weights, acts, state.where, replace(writer, elsewhere="--backend qframe"))
    if algo not in writer.expert_algorithms:
        raise ExportError(f"{state.where}: experts with weights {describe(weights)}, activations {describe(acts)}: "
                          f"{writer.title} holds quantized experts as {_expert_choices(writer)}, not {algo}; export "
                          "with --backend qframe, or keep the experts in float with targets = [\"Linear\"]")
    size = weights.group_size if weights.granularity == "group" else None
    for name, _, inp, _ in state.matrices if shapes_known and size else ():
        if inp % size:
            raise ExportError(f"{state.where}: {name}'s {inp} input channels per expert are not a whole number of "
                              f"groups of {size}, which the packed format needs; choose a group size that divides {inp}")
    return algo


def _kv_choice(description: ModelDescription, writer: Writer) -> str | None:
    caches = description.caches
    if not caches:
        return None
    algos = {layer: kv_algo(cache, writer) for layer, cache in caches.items()}
    missing = [i for i in range(description.num_layers) if i not in caches]
    if missing and description.shapes_known:
        first = caches[min(caches)]
        raise ExportError(f"{first.where} quantizes its KV cache but decoder layer(s) {missing[:5]} keep theirs in float; "
                          f"{writer.title} quantizes every layer's cache alike; quantize all of them, or none")
    if len(set(algos.values())) > 1:
        described = "; ".join(f"{caches[i].where}: {a}" for i, a in sorted(algos.items())[:4])
        raise ExportError(f"the layers' KV caches have different formats ({described}); {writer.title} quantizes every "
                          "layer's cache alike")
    return next(iter(algos.values()))


def w4a8_weight_scale_2(weights: list[torch.Tensor]) -> torch.Tensor:
    """W4A8_AWQ's per-tensor FP8 factor of linears served as one (their dequantized weights):
    the largest magnitude over all of them, divided by E4M3's 448, as a float32 scalar.

    Example::

        >>> w4a8_weight_scale_2([torch.tensor([[-896.0]]), torch.tensor([[448.0]])]).item()
        2.0
    """
    amax = torch.stack([w.detach().float().abs().amax() for w in weights]).amax()
    return (amax / torch.full((), formats.E4M3.max, device=amax.device)).reshape(()).cpu()


def inexact_group_scales(quantization: Quantization, dtype: torch.dtype, names: Iterable[str] | None = None
                         ) -> list[str]:
    """The quantized linears (of ``names``, by default all; in ``quantization``'s order) whose int4
    group scales are not exact in the serving ``dtype``: what :func:`warn_inexact_group_scales`
    reports. Reads the scales, so a streaming writer asks it one model part at a time (``names``:
    that part's linears) and warns once over what the parts found.

    Example::

        >>> inexact_group_scales(Quantization("FP8", None, None), torch.float16)
        []
    """
    if not quantization.awq:
        return []
    chosen = quantization.quantized if names is None else \
        {n: quantization.quantized[n] for n in names if n in quantization.quantized}
    return [n for n, s in chosen.items()
            if not torch.equal(s.module.weight_scale.to(dtype).float(), s.module.weight_scale.float())]


def warn_inexact_group_scales(inexact: list[str], dtype: torch.dtype, title: str) -> None:
    """Warn when int4 group scales are not exact in the serving ``dtype`` (``inexact``: the
    linears :func:`inexact_group_scales` found, in model order): the group-wise int4 kernels take
    their scales in the model's dtype and round them, so the served weights would differ from the
    evaluated ones (a model quantized in float32, or cast after quantizing).

    Example::

        >>> warn_inexact_group_scales([], torch.float16, "TensorRT-LLM")  # nothing to say
    """
    if inexact:
        warnings.warn(f"{inexact[0]}{f' and {len(inexact) - 1} more linears' if len(inexact) > 1 else ''}: int4 group "
                      f"scales are not exact in {str(dtype).removeprefix('torch.')}, in which {title}'s kernels take "
                      "them, so the served weights differ slightly from the evaluated ones; quantize the model in its "
                      "serving dtype ([model] dtype = \"bfloat16\" or \"float16\")", stacklevel=3)


def in_order(found: Iterable, order: dict[str, int], key: Callable[[Any], str] = lambda item: item) -> list:
    """``found`` (names, or records whose ``key`` is a name) sorted by ``order`` (name -> place):
    findings gathered part by part put back in the order a whole-model pass would report them
    (a linear before the decoder layers, such as OPT's ``project_in``, comes after them there).

    Example::

        >>> in_order(["b", "a"], {"a": 0, "b": 1})
        ['a', 'b']
    """
    return sorted(found, key=lambda item: order[key(item)])
