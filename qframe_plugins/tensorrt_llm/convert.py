"""A quantized model's state in TensorRT-LLM's terms: which ``quant_algo`` its linears are,
what cannot be expressed (refused before anything is written), and the checkpoint's tensors
at tensor-parallel size 1 (:mod:`.shard` splits them across ranks).

The format is TensorRT-LLM's (its ``tensorrt_llm/models/modeling_utils.py`` loads it; docs/tensorrt_llm.md
says how qframe checks it). Per linear (``md`` is the checkpoint dtype):

=====================  =================================================================
quant_algo             tensors beside ``weight``
=====================  =================================================================
FP8                    float8 weight; ``weights_scaling_factor``, ``activation_scaling_factor`` f32 [1]
W4A16_AWQ              int4 codes packed along the output (int8 [out/2, in]); f32 group scales
                       ``weights_scaling_factor`` [out, in/g]; ``prequant_scaling_factor`` md [in]
W4A8_AWQ               as W4A16_AWQ plus ``weights_scaling_factor_2`` (amax/448) and FP8
                       ``activation_scaling_factor``
W8A8_SQ_PER_CHANNEL    int8 weight; f32 per-row ``weights_scaling_factor``; int8 per-tensor
                       ``activation_scaling_factor``; ``prequant_scaling_factor`` md [in]
W8A16, W4A16           the dequantized weight in md (the builder quantizes it again, per
                       output channel, int8 or int4)
NVFP4                  E2M1 codes packed along the input (uint8 [out, in/2]); E4M3 block
                       scales [out, in/16]; ``weights_scaling_factor_2`` and
                       ``activation_scaling_factor`` (the static global scales) f32 [1]
=====================  =================================================================

A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) keeps each layer's routed experts stacked
(:class:`~.layout.ExpertsSpec`): ``mlp.fc`` ``[E, 2I, H]`` (each expert's up rows, then its gate
rows) and ``mlp.proj`` ``[E, H, I]``:

=====================  =================================================================
experts' quant_algo    ``fc`` / ``proj`` tensors
=====================  =================================================================
none, W8A16, W4A16     md ``weight`` (the builder quantizes W8A16/W4A16 per channel itself)
W4A16_AWQ              int8 ``weight`` ``[E, I, H]`` / ``[E, H/2, I]`` (int4 rows packed per
                       expert); f32 group scales ``[E, 2I, H/g]`` / ``[E, H, I/g]``; with
                       ``pre_quant_scale``, md ``prequant_scaling_factor`` ``[E, H]`` / ``[E, I]``
                       (ones: TensorRT-LLM's MoE keeps one for all experts, qframe's experts none)
FP8                    E4M3 ``weight``; f32 ``weights_scaling_factor`` ``[E, 1]`` (one an expert,
                       gate and up rows sharing it); f32 ``activation_scaling_factor`` ``[1]``
NVFP4                  uint8 ``weight`` ``[E, 2I, H/2]`` / ``[E, H, I/2]``; E4M3 block scales
                       ``weights_scaling_factor`` ``[E, 2I, H/16]`` / ``[E, H, I/16]``; f32
                       ``weights_scaling_factor_2`` ``[E]`` (each expert's global scale); f32
                       ``activation_scaling_factor`` ``[1]`` (the input's global scale)
=====================  =================================================================

One activation scale per fused weight for all experts and one per-tensor (global) weight scale
per expert for gate and up together is what TensorRT-LLM's MoE loads and what qframe's experts
hold, so FP8 and NVFP4 experts are written as they are. The router ``mlp.router.weight`` is
float32 and, with Qwen2-MoE's ``shared_expert_gate``, always in ``exclude_modules``. Experts are
split by tensor parallelism (each expert's rows or columns), never by expert parallelism: the
mapping has no ``moe_tp_size``/``moe_ep_size``, which TensorRT-LLM then takes as ``tp_size``/1.

A layer's KV cache adds ``attention.kv_cache_scaling_factor`` (f32 [1]: amax/448 for FP8,
amax/127 for INT8, of the keys after RoPE and the values, as the cache holds them; one scale
for both, the larger), and ``k_``/``v_cache_scaling_factor`` each.

Example::

    >>> from qframe.scheme import QuantArgs
    >>> algorithm(LinearState("q_proj", 128, 128, False, QuantArgs(bits=4, granularity="group", group_size=128),
    ...                       QuantArgs(type="float", bits=8, granularity="tensor")))
    'W4A8_AWQ'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from qframe import formats, numerics
from qframe.description import ExpertsState, LinearState, ModelDescription
from qframe.errors import ExportError
from qframe.experts import OUT_IN
from qframe.parts import Part as ModelPart, part_of

from ..quant_algo import AWQ_ALGOS, NVFP4_BLOCK, Quantization, Writer, choose, quant_algo, w4a8_weight_scale_2
from .layout import ExpertsSpec, Layout, LinearSpec, Part

# Fused experts: weight-only int, or FP8/NVFP4 with their static input scales. TensorRT-LLM's MoE
# keeps one activation scale per fused weight for all experts and one per-tensor weight scale per
# expert for gate and up together (fc), which is what qframe's QuantExperts hold: no requantization.
# Not written for experts: W4A8_AWQ (its per-expert alpha and interleaved scales are not written
# yet) and W8A8_SQ_PER_CHANNEL (TensorRT-LLM's MoE plugin has no int8 activations).
WRITER = Writer("TensorRT-LLM", ("FP8", "NVFP4", "W4A16_AWQ", "W4A8_AWQ", "W4A16", "W8A16", "W8A8_SQ_PER_CHANNEL"),
                ("FP8", "INT8"), elsewhere="another backend (hf, qframe)", experts=True,
                expert_algorithms=("W4A16_AWQ", "W4A16", "W8A16", "FP8", "NVFP4"))
# Algorithms whose linears carry a smoother (ones where it was folded into the layer before).
PRESCALED_ALGOS = (*AWQ_ALGOS, "W8A8_SQ_PER_CHANNEL")
# Weight-only per channel: the checkpoint holds 16-bit weights, which the builder quantizes.
WEIGHT_ONLY = ("W4A16", "W8A16")


def algorithm(state: LinearState) -> str | None:
    """TensorRT-LLM's ``quant_algo`` for a linear (``None``: not quantized), or an
    :class:`~qframe.ExportError` that says what to change.

    Example::

        >>> from qframe.scheme import QuantArgs
        >>> algorithm(LinearState("q_proj", 128, 128, False, QuantArgs(bits=4, granularity="group", group_size=128)))
        'W4A16_AWQ'
    """
    return quant_algo(state.weights, state.activations, state.where, WRITER)


# -- the plan: one algorithm for the whole model, checked against the shapes ----------------------

@dataclass
class CheckpointPlan:
    """What is written: ``quant_algo`` (None: unquantized), its group size, whether
    prequantization scales are written, the KV cache's algorithm, the checkpoint dtype, the
    TensorRT-LLM linears and MoE modules left in float (``excluded``), the modules every layer
    keeps in float (``float_modules``: MoE routers, Qwen2-MoE's shared expert gates) and, for the
    weight-only algorithms, the weight names those float modules hold (``weight_patterns``)."""

    quant_algo: str | None
    group_size: int | None
    pre_quant_scale: bool
    kv_cache_quant_algo: str | None
    dtype: torch.dtype
    excluded: list[str] = field(default_factory=list)
    float_modules: list[str] = field(default_factory=list)
    weight_patterns: list[str] = field(default_factory=list)

    def quantization(self) -> dict:
        """``config.json``'s ``quantization`` table (explicit ``exclude_modules`` always)."""
        out = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.quant_algo in AWQ_ALGOS:
            out.update(group_size=self.group_size, has_zero_point=False, pre_quant_scale=self.pre_quant_scale)
        elif self.quant_algo == "NVFP4":
            out["group_size"] = NVFP4_BLOCK
        # An empty list means "defaults" in older TensorRT-LLM and "nothing" in newer: never empty.
        out["exclude_modules"] = ["lm_head", "*lm_head", "*vocab_embedding", "*position_embedding", *self.excluded,
                                  *self.float_modules, *self.weight_patterns]
        return out


def _state(description: ModelDescription, name: str) -> LinearState:
    try:
        return description.linears[name]
    except KeyError:
        raise ExportError(f"{name}: the model has no such linear, which TensorRT-LLM's layout needs") from None


def _fused_alike(description: ModelDescription, spec: LinearSpec) -> None:
    states = [_state(description, p.module) for p in spec.parts]
    kinds = {(s.weights, s.activations) for s in states}
    if len(kinds) > 1:
        first = states[0]
        odd = [s.where for s in states if (s.weights, s.activations) != (first.weights, first.activations)]
        raise ExportError(
            f"{', '.join(odd)} and {first.where}: TensorRT-LLM runs {', '.join(p.module for p in spec.parts)} as one "
            f"linear ({spec.name}), so they must be quantized alike; quantize all of them the same way, or none (a "
            "recipe's ignore list must name all or none of them)")


def _experts_state(description: ModelDescription, spec: ExpertsSpec) -> ExpertsState:
    """The fused experts ``spec`` names, checked to be what TensorRT-LLM's MoE holds:
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` used as ``F.linear``, no biases."""
    state = description.experts.get(spec.module)
    if state is None:
        raise ExportError(f"{spec.module}: the model has no fused experts module here, which TensorRT-LLM's mixture "
                          "of experts layout needs; export this model with --backend qframe")
    found = {(name, layout) for name, _, _, layout in state.matrices}
    shapes = {(name, out, inp) for name, out, inp, _ in state.matrices}
    want = {("gate_up_proj", 2 * spec.inter, spec.hidden), ("down_proj", spec.hidden, spec.inter)}
    module = state.module
    biases = sorted(n for n, _ in module.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj")) \
        if module is not None else []
    if found != {("gate_up_proj", OUT_IN), ("down_proj", OUT_IN)} or biases or description.shapes_known and (
            shapes != want or state.num_experts != spec.num_experts):
        raise ExportError(
            f"{state.where}: TensorRT-LLM's mixture of experts holds {spec.num_experts} experts as gate_up_proj "
            f"[E, {2 * spec.inter}, {spec.hidden}] and down_proj [E, {spec.hidden}, {spec.inter}] used as F.linear, "
            f"without biases, as the model's config describes them; this module has {state.num_experts} experts and "
            f"{sorted(state.matrices)}{f' with {biases}' if biases else ''}; export it with --backend qframe")
    return state


def _weight_only_prescales(chosen: Quantization, algo: str | None) -> None:
    """Refuse a linear that kept an input prescale in a weight-only (W8A16/W4A16) checkpoint."""
    kept = [s.where for s in chosen.quantized.values() if s.prescale]
    if algo in WEIGHT_ONLY and kept:
        raise ExportError(f"{kept[0]}: keeps an input prescale (AWQ's, where it could not fold it), but a {algo} "
                          "checkpoint holds 16-bit weights that TensorRT-LLM's builder quantizes again, and no "
                          "prequant_scaling_factor; quantize in groups of 64 or 128 (W4A16_AWQ holds it), or with a "
                          "quantizer that keeps none (rtn, gptq)")


def inexact_expert_scales(chosen: Quantization, dtype: torch.dtype, names: Iterable[str] | None = None) -> list[str]:
    """The quantized fused experts (of ``names``, by default all) whose int4 group scales are not
    exact in ``dtype``, once for each of gate_up_proj and down_proj that is not: what
    :func:`warn_inexact_expert_scales` reports. Reads the scales (so one model part at a time).

    Example::

        >>> inexact_expert_scales(Quantization("FP8", None, None), torch.float16)
        []
    """
    if not chosen.awq:
        return []
    experts = chosen.experts if names is None else {n: chosen.experts[n] for n in names if n in chosen.experts}
    return [n for n, s in experts.items() for w in ("gate_up_proj", "down_proj")
            for scale in [s.module._buffers[f"{w}_scale"]] if not torch.equal(scale.to(dtype).float(), scale.float())]


def warn_inexact_expert_scales(inexact: list[str], dtype: torch.dtype) -> None:
    """As :func:`~qframe_plugins.quant_algo.warn_inexact_group_scales`, for experts' group scales
    (``inexact``: what :func:`inexact_expert_scales` found, in model order).

    Example::

        >>> warn_inexact_expert_scales([], torch.float16)  # nothing to say
    """
    if inexact:
        warnings.warn(f"{inexact[0]}: int4 group scales are not exact in {str(dtype).removeprefix('torch.')}, in which "
                      "TensorRT-LLM's MoE kernels take them, so the served experts differ slightly from the evaluated "
                      "ones; quantize the model in its serving dtype ([model] dtype = \"bfloat16\" or \"float16\")",
                      stacklevel=3)


def requantized_channels(chosen: Quantization, algo: str | None, linears: Iterable[str] | None = None,
                         experts: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
    """For a W4A16/W8A16 checkpoint, each quantized linear's (of ``linears``, default all) and
    fused experts module's (of ``experts``) ``(name, channels TensorRT-LLM's builder moves,
    channels)``: what :func:`warn_weight_only_requantized` sums up. Reads the codes (so one model
    part at a time).

    Example::

        >>> requantized_channels(Quantization("W4A16_AWQ", 128, None), "W4A16_AWQ")
        []
    """
    if algo not in WEIGHT_ONLY:
        return []
    qmin = -8 if algo == "W4A16" else -128
    linears = chosen.quantized if linears is None else [n for n in linears if n in chosen.quantized]
    experts = chosen.experts if experts is None else [n for n in experts if n in chosen.experts]
    codes = [(n, chosen.quantized[n].module.weight_codes) for n in linears]
    codes += [(n, chosen.experts[n].module._buffers[f"{w}_codes"])
              for n in experts for w in ("gate_up_proj", "down_proj")]
    # All-zero channels stay zero.
    return [(name, int(((c != 0).any(-1) & ~(c == qmin).any(-1)).sum().item()), c[..., 0].numel()) for name, c in codes]


def warn_weight_only_requantized(found: list[tuple[str, int, int]], algo: str | None) -> None:
    """Warn where TensorRT-LLM's builder will not reproduce qframe's W4A16/W8A16 weights
    (``found``: what :func:`requantized_channels` found, linears then experts, in model order). It
    quantizes the checkpoint's 16-bit weights again per output channel with ``scale = amax /
    2^(bits-1)`` (8 or 128; the positive extreme clipped to 7 or 127: its
    ``symmetric_quantize``), while qframe fits ``scale = max(hi / 7, -lo / 8)``: the two agree
    only on a channel whose codes reach -8 (-128), and a channel's weights move elsewhere.

    Example::

        >>> warn_weight_only_requantized([("fc", 0, 8)], "W4A16")  # every channel reaches -8: nothing to say
    """
    if algo not in WEIGHT_ONLY:
        return
    qmin = -8 if algo == "W4A16" else -128
    moved, total = sum(f[1] for f in found), sum(f[2] for f in found)
    first = next((name for name, rows, _ in found if rows), None)
    if moved:
        warnings.warn(f"{first} and others: {moved} of {total} output channels never reach the code {qmin}, and "
                      f"TensorRT-LLM's builder quantizes a {algo} checkpoint's 16-bit weights again with scale = amax / "
                      f"{-qmin} per channel, so those channels are served on another grid than the one qframe "
                      "evaluated; for int4, quantize in groups of 64 or 128 (W4A16_AWQ keeps qframe's codes and "
                      "scales as they are)", stacklevel=3)


def make_plan(description: ModelDescription, layout: Layout, dtype: torch.dtype, tp_size: int = 1,
              pp_size: int = 1) -> CheckpointPlan:
    """Read the decoder layers' linears, fused experts and caches into a :class:`CheckpointPlan`,
    refusing what TensorRT-LLM's format cannot express (a format it lacks, mixed algorithms, fused
    parts quantized differently, experts it cannot hold, shapes that do not split). Works on a
    planned description (before calibration) and on a quantized model's alike.

    Example::

        >>> from qframe.testing import make_registry, tiny_model
        >>> from qframe.description import describe_model
        >>> from .layout import layout_for
        >>> model, registry = tiny_model("mixtral"), make_registry()
        >>> plan = make_plan(describe_model(model, registry), layout_for(model, registry), torch.float16)
        >>> plan.quant_algo, plan.float_modules
        (None, ['transformer.layers.0.mlp.router', 'transformer.layers.1.mlp.router'])
    """
    return plan_and_choice(description, layout, dtype, tp_size, pp_size)[0]


def plan_and_choice(description: ModelDescription, layout: Layout, dtype: torch.dtype, tp_size: int = 1,
                    pp_size: int = 1) -> tuple[CheckpointPlan, Quantization]:
    """:func:`make_plan`'s plan and the :class:`~qframe_plugins.quant_algo.Quantization` it was
    chosen from (the quantized linears, by the first part of each TensorRT-LLM linear, and
    experts), from the description's module structure alone: nothing here reads a tensor's
    values, so a model whose parts are on the meta device is planned as well.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> from .layout import layout_for
        >>> model, registry = tiny_llama_model().to("meta"), make_registry()
        >>> plan, chosen = plan_and_choice(describe_model(model, registry), layout_for(model, registry), torch.float16)
        >>> plan.quant_algo, len(chosen.excluded)
        (None, 10)
    """
    specs = [spec for i in range(layout.num_layers) for spec in layout.linears(i)]
    experts = [spec for i in range(layout.num_layers) for spec in layout.experts(i)]
    for spec in specs:
        _fused_alike(description, spec)
    for spec in experts:
        _experts_state(description, spec)
    chosen = choose(description, WRITER, [spec.parts[0].module for spec in specs])
    placed = {spec.module for spec in experts}
    unplaced = [s.where for n, s in chosen.experts.items() if n not in placed]
    if unplaced:  # a layout plugin for a mixture of experts that does not say where its experts go
        raise ExportError(f"{unplaced[0]}: quantized experts that the {type(layout).__name__} layout places nowhere "
                          "in TensorRT-LLM's checkpoint; export with --backend qframe, or keep them in float")
    algo = chosen.quant_algo
    float_experts = [spec for spec in experts if spec.module not in chosen.experts]
    if algo is not None and float_experts and layout.shared_expert:
        where = description.experts[float_experts[0].module].where
        raise ExportError(f"{where}: the routed experts stay in float while the model is {algo}, but TensorRT-LLM "
                          "rebuilds an excluded Qwen2-MoE mixture of experts without its shared expert, whose weights "
                          "would then not load; quantize the experts too (targets = [\"Linear\", \"Experts\"]) or "
                          "nothing")
    _weight_only_prescales(chosen, algo)
    excluded = [spec.name for spec in specs if spec.parts[0].module in chosen.excluded]
    excluded += [spec.name for spec in float_experts]
    float_modules = [name for i in range(layout.num_layers) for name in layout.float_modules(i)]
    patterns: list[str] = []
    if algo in WEIGHT_ONLY:
        # TensorRT-LLM quantizes a weight-only checkpoint's 16-bit weights itself, skipping those
        # whose *weight* name exclude_modules matches (the module's name is not enough there).
        plain = [name for name in excluded if name not in {spec.name for spec in float_experts}] + float_modules
        patterns = [f"{name}.weight" for name in plain]
        patterns += [f"{name}.weight" for spec in float_experts for name in (spec.fc, spec.proj)]
    # SmoothQuant linears always carry a smoother; AWQ's where qframe kept one.
    prescaled = algo == "W8A8_SQ_PER_CHANNEL" or any(s.prescale for s in chosen.quantized.values())
    plan = CheckpointPlan(algo, chosen.group_size, prescaled and algo in PRESCALED_ALGOS, chosen.kv_cache_quant_algo,
                          dtype, excluded, float_modules, patterns)
    if description.shapes_known:
        check_parallel(layout, plan, tp_size, pp_size)
    return plan, chosen


def _group(size: int | None) -> str:
    return f" (group {size})" if size else ""


def check_parallel(layout: Layout, plan: CheckpointPlan, tp_size: int, pp_size: int) -> None:
    """Refuse a tensor/pipeline split the model's shapes do not allow (ExportError)."""
    where = f"tp_size = {tp_size}"
    heads, kv = layout.heads, layout.kv_heads
    if heads % tp_size:
        raise ExportError(f"{where} does not divide the model's {heads} attention heads; choose a tp_size that "
                          f"divides {heads}")
    if kv % tp_size and tp_size % kv:
        raise ExportError(f"{where}: the model's {kv} key/value heads are neither divisible by it nor do they divide "
                          f"it; choose a tp_size that divides {kv} or that {kv} divides")
    for key, width in layout.mlp_widths().items():
        if width % tp_size:
            raise ExportError(f"{where} does not divide the model's MLP width {key} = {width}; choose a tp_size that "
                              "divides it")
    if layout.num_layers % pp_size:
        raise ExportError(f"pp_size = {pp_size} does not divide the model's {layout.num_layers} decoder layers; "
                          f"choose a pp_size that divides {layout.num_layers}")
    layered = [name for name in plan.excluded if name.startswith("transformer.layers.")]
    if pp_size > 1 and layered:
        # TensorRT-LLM matches exclude_modules against each pipeline stage's own layer numbers
        # (from 0), so one config cannot exclude a linear of one stage only.
        raise ExportError(f"pp_size = {pp_size}: {layered[0]} is left unquantized, and TensorRT-LLM matches "
                          "exclude_modules against each pipeline stage's own layer numbers, so that cannot be "
                          "expressed; quantize it too (remove it from the stage's ignore) or export with pp_size = 1")
    if plan.quant_algo == "NVFP4":
        for what, size in {"attention width": layout.heads * layout.head_size, **layout.mlp_widths()}.items():
            if size % (16 * tp_size):
                raise ExportError(f"NVFP4 at {where}: each rank's share of the model's {what} {size} must be a whole "
                                  f"number of 16-channel blocks; choose a tp_size that divides {size // 16}")
    if plan.quant_algo in AWQ_ALGOS:
        # TensorRT-LLM pads group-wise int4 linears to multiples of max(64, group) * tp (128 for
        # W4A8), and a padded linear no longer matches the checkpoint's shapes.
        multiple = max(128 if plan.quant_algo == "W4A8_AWQ" else 64, plan.group_size) * tp_size
        # (TensorRT-LLM's MoE does not pad, but splits each expert's groups across ranks: the same multiple.)
        sizes = {"hidden size": layout.hidden, **layout.mlp_widths(),
                 "attention width": layout.heads * layout.head_size,
                 "q/k/v width": (layout.heads + 2 * layout.kv_heads) * layout.head_size}
        for what, size in sizes.items():
            if size % multiple:
                raise ExportError(
                    f"{plan.quant_algo} group {plan.group_size} at {where}: the model's {what} {size} is not a multiple "
                    f"of {multiple} (max({128 if plan.quant_algo == 'W4A8_AWQ' else 64}, group size) x tp_size), so "
                    f"TensorRT-LLM would pad it and the checkpoint would not load; choose a group size and tp_size "
                    f"for which {size} is a multiple (e.g. group 64 at tp_size 1 when {size} is a multiple of 64)")


# -- tensors at tensor-parallel size 1 ---------------------------------------------------------------

@dataclass
class Piece:
    """One checkpoint tensor before it is split across ranks: ``parts`` (one per part of a
    fused linear, else one) concatenated along ``out_dim`` after splitting; ``in_dim`` is the
    dimension a row-parallel linear splits; ``parallel`` is ``column``, ``row``, ``vocab`` or
    ``None`` (replicated); ``heads`` per part split by attention head; ``encode`` turns the
    rank's tensor into its stored form (packing); ``stage`` is the layer index, or ``first``
    / ``last`` for the pipeline stage that holds it."""

    parts: list[torch.Tensor]
    stage: int | str
    parallel: str | None = None
    out_dim: int | None = None
    in_dim: int | None = None
    heads: list[int | None] | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None


def pack_int4_rows_int8(codes: torch.Tensor) -> torch.Tensor:
    """Int4 codes ``[..., rows, in]`` packed two a byte along the rows of each matrix (stacked
    experts each their own), low nibble the even row, typed int8 as TensorRT-LLM's
    W4A16_AWQ/W4A8_AWQ weights are (the same bytes as :func:`qframe.numerics.pack_int4_rows`).

    Example::

        >>> pack_int4_rows_int8(torch.tensor([[[1], [-2]], [[3], [4]]], dtype=torch.int8)).flatten().tolist()
        [-31, 67]
    """
    rows, cols = codes.shape[-2:]
    packed = numerics.pack_int4_rows(codes.reshape(-1, cols))  # rows are even: no pair spans two experts
    return packed.view(torch.int8).reshape(*codes.shape[:-2], rows // 2, cols)


def pack_e2m1_columns(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes ``[out, in]`` packed two a byte along the input, low nibble first (NVFP4)."""
    return formats.NVFP4.pack(codes)


def _rows(t: torch.Tensor, part: Part) -> torch.Tensor:
    return t if part.rows is None else t[part.rows[0]:part.rows[1]]


def _same(values: list[torch.Tensor], what: str, where: str) -> torch.Tensor:
    if any(not torch.equal(values[0], v) for v in values[1:]):
        raise ExportError(f"{where}: the fused parts have different {what}, but TensorRT-LLM keeps one for the fused "
                          "linear; they read the same input, so quantize them in one stage")
    return values[0]


def _shared_per_tensor(spec: LinearSpec, modules: list[nn.Module], algo: str
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Codes and per-row scales of each part under the one per-tensor weight scale TensorRT-LLM
    keeps for a fused linear (FP8's scale, NVFP4's global scale), and that scale. qframe's
    fp8/nvfp4 quantizers give q/k/v one scale already; otherwise the parts are re-quantized
    with the largest (as modelopt does), which changes their values slightly."""
    per_tensor = [m.weight_scale if algo == "FP8" else m.weight_global_scale for m in modules]
    joint = torch.stack([s.reshape(()) for s in per_tensor]).amax()
    codes = [_rows(m.weight_codes, p) for m, p in zip(modules, spec.parts)]
    scales = [_rows(m.weight_scale, p) for m, p in zip(modules, spec.parts)] if algo == "NVFP4" else []
    if all(torch.equal(s.reshape(()), joint) for s in per_tensor):
        return codes, scales, joint
    warnings.warn(f"{spec.name}: the parts {', '.join(p.module for p in spec.parts)} have different per-tensor weight "
                  f"scales; re-quantized with the largest for TensorRT-LLM's one fused scale, so this checkpoint "
                  f"differs slightly from the quantized model (quantize with the fp8/nvfp4 quantizers to avoid it)",
                  stacklevel=2)
    codes, scales = [], []
    for m, p in zip(modules, spec.parts):
        w = _rows(numerics.dequantize_weight(m.weight_codes, m.weight_scale, None, m.weight_args,
                                             global_scale=getattr(m, "weight_global_scale", None)), p)
        if algo == "FP8":
            codes.append(numerics.encode(numerics.quantize(w, joint, None, m.weight_args), m.weight_args))
        else:
            q = numerics.quantize_weight(w, m.weight_args, global_scale=joint)
            codes.append(q.codes)
            scales.append(q.scale)
    return codes, scales, joint


def linear_pieces(description: ModelDescription, spec: LinearSpec, plan: CheckpointPlan, stage: int
                  ) -> dict[str, Piece]:
    """The checkpoint tensors of one TensorRT-LLM linear, keyed by full name."""
    modules = [_state(description, p.module).module for p in spec.parts]
    algo = None if spec.name in plan.excluded else plan.quant_algo
    md, heads = plan.dtype, [p.heads for p in spec.parts]
    par = spec.parallel

    def rows(make: Callable[[nn.Module, Part], torch.Tensor], encode=None, in_dim: int | None = 1) -> Piece:
        return Piece([make(m, p) for m, p in zip(modules, spec.parts)], stage, par, 0, in_dim, heads, encode)

    def single(value: torch.Tensor, in_dim: int | None = None) -> Piece:
        return Piece([value], stage, par, None, in_dim)

    out: dict[str, Piece] = {}
    if algo in (None, *WEIGHT_ONLY):
        out["weight"] = rows(lambda m, p: _rows(m.weight.detach(), p).to(md))
    elif algo in ("FP8", "NVFP4"):
        codes, block, joint = _shared_per_tensor(spec, modules, algo)
        if algo == "FP8":
            out["weight"] = Piece(codes, stage, par, 0, 1, heads)
            out["weights_scaling_factor"] = single(joint.float().reshape(1))
        else:
            out["weight"] = Piece(codes, stage, par, 0, 1, heads, pack_e2m1_columns)
            out["weights_scaling_factor"] = Piece(block, stage, par, 0, 1, heads)
            out["weights_scaling_factor_2"] = single(joint.float().reshape(1))
        out["activation_scaling_factor"] = single(torch.stack([m.input_scale.float().reshape(()) for m in modules]).amax().reshape(1))
    elif algo in AWQ_ALGOS:
        out["weight"] = rows(lambda m, p: _rows(m.weight_codes, p), pack_int4_rows_int8)
        out["weights_scaling_factor"] = rows(lambda m, p: _rows(m.weight_scale, p).float())
        if algo == "W4A8_AWQ":
            scale_2 = w4a8_weight_scale_2([_rows(m.weight, p) for m, p in zip(modules, spec.parts)])
            out["weights_scaling_factor_2"] = single(scale_2.reshape(1))
            out["activation_scaling_factor"] = single(_same([m.input_scale.float().reshape(1) for m in modules],
                                                            "activation scales", spec.name))
    elif algo == "W8A8_SQ_PER_CHANNEL":
        out["weight"] = rows(lambda m, p: _rows(m.weight_codes, p))
        out["weights_scaling_factor"] = rows(lambda m, p: _rows(m.weight_scale, p).float().reshape(-1), in_dim=None)
        out["activation_scaling_factor"] = single(_same([m.input_scale.float().reshape(1) for m in modules],
                                                        "activation scales", spec.name))
    if algo is not None and algo not in WEIGHT_ONLY and plan.pre_quant_scale:
        ones = torch.ones(modules[0].in_features)
        prescale = _same([m.input_prescale.float() if m.has_prescale else ones for m in modules],
                         "input prescales", spec.name)
        out["prequant_scaling_factor"] = single(prescale.to(md), in_dim=0)
    if modules[0].bias is not None:
        out["bias"] = rows(lambda m, p: _rows(m.bias.detach(), p).to(md), in_dim=None)
    return {f"{spec.name}.{suffix}": piece for suffix, piece in out.items()}


def experts_pieces(description: ModelDescription, spec: ExpertsSpec, plan: CheckpointPlan, stage: int
                   ) -> dict[str, Piece]:
    """The checkpoint tensors of one layer's mixture of experts (``mlp.fc``, ``mlp.proj``), keyed
    by full name: stacked over the experts, each expert's up rows before its gate rows in ``fc``
    (Hugging Face's ``gate_up_proj`` holds gate first). Unquantized and weight-only experts are
    the weights the model computes with, in the checkpoint dtype; W4A16_AWQ experts their codes
    and group scales; FP8 and NVFP4 experts their codes, each expert's scales and the module's
    one input scale of each fused weight (:func:`_float_experts`).

    Example::

        >>> from qframe.testing import make_registry, tiny_model
        >>> from qframe.description import describe_model
        >>> from .layout import layout_for
        >>> model, registry = tiny_model("mixtral"), make_registry()
        >>> layout, description = layout_for(model, registry), describe_model(model, registry)
        >>> plan = make_plan(description, layout, torch.float16)
        >>> pieces = experts_pieces(description, layout.experts(0)[0], plan, 0)
        >>> {name: [tuple(t.shape) for t in piece.parts] for name, piece in pieces.items()}
        {'transformer.layers.0.mlp.fc.weight': [(4, 32, 64), (4, 32, 64)], 'transformer.layers.0.mlp.proj.weight': [(4, 64, 32)]}
    """
    module = description.experts[spec.module].module
    algo = None if spec.name in plan.excluded else plan.quant_algo
    md, inter = plan.dtype, spec.inter

    def up_gate(t: torch.Tensor) -> list[torch.Tensor]:
        # Split apart so that tensor parallelism gives every rank its own up and gate rows.
        return [t[:, inter:], t[:, :inter]]

    out: dict[str, Piece] = {}
    if algo in (None, *WEIGHT_ONLY):
        # The float weights, or the dequantized ones the quantized experts compute with.
        out["fc.weight"] = Piece(up_gate(module.gate_up_proj.detach().to(md)), stage, "column", 1)
        out["proj.weight"] = Piece([module.down_proj.detach().to(md)], stage, "row", None, 2)
    elif algo in ("FP8", "NVFP4"):
        out.update(_float_experts(module, algo, up_gate, stage, spec))
    else:  # W4A16_AWQ, the one grouped algorithm WRITER takes for experts
        b = module._buffers
        out["fc.weight"] = Piece(up_gate(b["gate_up_proj_codes"]), stage, "column", 1, encode=pack_int4_rows_int8)
        out["fc.weights_scaling_factor"] = Piece(up_gate(b["gate_up_proj_scale"].float()), stage, "column", 1)
        out["proj.weight"] = Piece([b["down_proj_codes"]], stage, "row", None, 2, encode=pack_int4_rows_int8)
        out["proj.weights_scaling_factor"] = Piece([b["down_proj_scale"].float()], stage, "row", None, 2)
        if plan.pre_quant_scale:
            # One row an expert, as modelopt stacks them; TensorRT-LLM reads expert 0's for all of
            # them, and qframe's experts keep no prescale: ones.
            e, h = spec.num_experts, spec.hidden
            out["fc.prequant_scaling_factor"] = Piece([torch.ones(e, h, dtype=md)], stage)
            out["proj.prequant_scaling_factor"] = Piece([torch.ones(e, inter, dtype=md)], stage, "row", None, 1)
    return {f"{spec.name}.{suffix}": piece for suffix, piece in out.items()}


def _float_experts(module: nn.Module, algo: str, up_gate: Callable[[torch.Tensor], list[torch.Tensor]], stage: int,
                   spec: ExpertsSpec) -> dict[str, Piece]:
    """``fc``'s and ``proj``'s tensors (suffixes) of FP8 or NVFP4 experts, as TensorRT-LLM's
    ``MixtureOfExperts`` loads them (``layers/moe.py``, ``MOEWeightWrapper``):

    - FP8: ``weight`` E4M3 ``[E, out, in]``; ``weights_scaling_factor`` f32 ``[E, 1]``, one per
      expert for the whole matrix (gate and up rows share it in ``fc``); ``activation_scaling_factor``
      f32 ``[1]``, one for all experts.
    - NVFP4: ``weight`` uint8 ``[E, out, in/2]`` (E2M1 codes packed along the input, low nibble
      first); ``weights_scaling_factor`` E4M3 block scales ``[E, out, in/16]``;
      ``weights_scaling_factor_2`` f32 ``[E]`` (each expert's global scale: the loader,
      ``models/modeling_utils.py`` ``preprocess_perlayer_weights``, turns the block scales into
      ``weights_block_scaling_factor`` (and its interleaved copy) and makes the per-expert
      ``alpha [E]`` as this times the activation's); ``activation_scaling_factor`` f32 ``[1]``,
      the input's global scale for all experts (``activation_global_scaling_factor``).

    qframe's experts hold exactly these numbers: one per-tensor weight scale (FP8) or global scale
    (NVFP4) per expert of the fused ``gate_up_proj``, which is ``fc`` (modelopt requantizes separate
    gate and up linears to the larger of their scales to get there; nothing is requantized here),
    and one static input scale per fused weight, shared by its experts."""
    b, e = module._buffers, spec.num_experts
    missing = [f"{w}_{what}" for w in ("gate_up_proj", "down_proj")
               for what in ("codes", "scale", "input_scale", *(("global_scale",) if algo == "NVFP4" else ()))
               if b.get(f"{w}_{what}") is None]
    if missing:
        raise ExportError(f"{spec.module}: {algo} experts without {', '.join(missing)}; TensorRT-LLM's mixture of "
                          "experts needs each weight's codes and scales and one static input scale a fused weight "
                          "(quantize the experts' inputs too: activations with dynamic = false)")
    pack = pack_e2m1_columns if algo == "NVFP4" else None
    out: dict[str, Piece] = {}
    for trt, w in (("fc", "gate_up_proj"), ("proj", "down_proj")):
        codes, scale = b[f"{w}_codes"], b[f"{w}_scale"]

        def split(t: torch.Tensor, encode=None) -> Piece:  # fc: each rank's up and gate rows; proj: its columns
            if trt == "fc":
                return Piece(up_gate(t), stage, "column", 1, encode=encode)
            return Piece([t], stage, "row", None, 2, encode=encode)

        out[f"{trt}.weight"] = split(codes, pack)
        if algo == "FP8":
            out[f"{trt}.weights_scaling_factor"] = Piece([scale.float().reshape(e, 1)], stage)
        else:
            out[f"{trt}.weights_scaling_factor"] = split(scale)
            out[f"{trt}.weights_scaling_factor_2"] = Piece([b[f"{w}_global_scale"].float().reshape(e)], stage)
        out[f"{trt}.activation_scaling_factor"] = Piece([b[f"{w}_input_scale"].float().reshape(1)], stage)
    return out


def _tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer ``name`` (a tied one under either name), found by its owner rather
    than by walking every tensor of the model, which each part would do again."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    found = module._parameters.get(leaf)
    return module._buffers.get(leaf) if found is None else found


def checkpoint_pieces(description: ModelDescription, layout: Layout, plan: CheckpointPlan, part: ModelPart | None = None
                      ) -> dict[str, Piece]:
    """The checkpoint's tensors before they are split across ranks: every one, or those of one
    model ``part`` (``"first"``: the embeddings, a decoder layer's index, ``"last"``: the final
    norm and lm_head), which read that part's modules only.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> from .layout import layout_for
        >>> model, registry = tiny_llama_model(), make_registry()
        >>> layout, description = layout_for(model, registry), describe_model(model, registry)
        >>> sorted(checkpoint_pieces(description, layout, make_plan(description, layout, torch.float16), "last"))
        ['lm_head.weight', 'transformer.ln_f.weight']
    """
    model = description.model

    def plain(entry, stage) -> Piece:
        # A quantized lm_head's dequantized weight is a buffer: _tensor finds it too.
        tensor = _tensor(model, entry.source)
        if tensor is None:
            raise ExportError(f"{entry.source}: the model has no such tensor, which TensorRT-LLM's layout needs")
        if tensor.is_meta:  # the loader left its part unloaded: nothing to write but its shape
            raise ExportError(f"{entry.source}: still on the meta device while model part {stage!r} is written")
        dtype = getattr(torch, entry.dtype) if entry.dtype else plan.dtype  # a MoE router is float32
        return Piece([tensor.detach().to(dtype)], stage, entry.split, 0 if entry.split else None)

    pieces: dict[str, Piece] = {}
    if part in (None, "first"):
        for entry in layout.first_tensors():
            pieces[entry.name] = plain(entry, "first")
    for i in range(layout.num_layers) if part is None else [part] if isinstance(part, int) else []:
        for entry in layout.layer_tensors(i):
            pieces[entry.name] = plain(entry, i)
        for spec in layout.linears(i):
            pieces.update(linear_pieces(description, spec, plan, i))
        for experts in layout.experts(i):
            pieces.update(experts_pieces(description, experts, plan, i))
        if plan.kv_cache_quant_algo is not None:
            # TensorRT-LLM reads one scale for both (the larger: nothing saturates); modelopt
            # also writes each, and so does qframe.
            k, v = (s.reshape(1) for s in description.caches[i].scales())
            for what, scale in (("kv", torch.maximum(k, v)), ("k", k), ("v", v)):
                pieces[f"transformer.layers.{i}.attention.{what}_cache_scaling_factor"] = Piece([scale.clone()], i)
    if part in (None, "last"):
        for entry in layout.last_tensors():
            pieces[entry.name] = plain(entry, "last")
    return pieces


def unshared_caches(description: ModelDescription, part: ModelPart | None = None) -> list[str]:
    """The attentions (of model ``part``, by default all) whose K and V scales differ: TensorRT-LLM
    serves both with the larger, so the smaller-scaled one is stored more coarsely than it was
    evaluated. Reads the scales (so one model part at a time).

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> unshared_caches(describe_model(tiny_llama_model(), make_registry()), 0)
        []
    """
    out = []
    for cache in description.caches.values():
        if part is not None and part_of(cache.attention, description.arch) != part:
            continue
        scales = cache.scales()
        if scales is not None and not torch.equal(*scales):
            out.append(cache.attention)
    return out


def warn_unshared_caches(unshared: list[str]) -> None:
    """Warn that TensorRT-LLM serves K and V with one scale where qframe evaluated two
    (``unshared``: what :func:`unshared_caches` found, in model order).

    Example::

        >>> warn_unshared_caches([])  # nothing to say
    """
    if unshared:
        warnings.warn(f"{unshared[0]}{f' and {len(unshared) - 1} more' if len(unshared) > 1 else ''}: K and V "
                      "have different cache scales, and TensorRT-LLM serves both with the larger, so the cache "
                      "it holds is coarser than the one qframe evaluated; quantize with options.shared = true in "
                      "the kv_cache stage to serve exactly that", stacklevel=3)
