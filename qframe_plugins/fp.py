"""``fp8``, ``nvfp4`` and ``mxfp4``: round-to-nearest in a floating-point format, with the
format's own constraints checked before any model loads.

- ``fp8``: E4M3 (or E5M2) weights per tensor or per channel; activations static per tensor
  (any calibrator) or dynamic per token, or none.
- ``nvfp4``: E2M1 weights in blocks of 16 with E4M3 block scales and an FP32 global scale;
  activations the same (W4A4), their global scale static per tensor (calibrated, by any
  calibrator, as TensorRT-LLM serves it) or dynamic per token, or none (weight-only).
- ``mxfp4``: E2M1 in blocks of 32 with E8M0 (power-of-two) scales, per the OCP MX spec.

Linears that read one input (the adapter's smoothing groups: q/k/v, gate/up; in a sparse
block, a shared expert's gate/up) share one per-tensor weight scale: FP8's per-tensor scale,
NVFP4's FP32 global scale. Serving stacks fuse them (TensorRT-LLM's ``qkv``, vLLM's
``gate_up_proj``) and keep one such scale for the fused weight; sharing it here makes the
checkpoint hold exactly the model that was evaluated.
Fused experts (``targets`` kind ``Experts``) get scales of their own, per expert: FP8's per-tensor
scale and NVFP4's global scale cover one expert's fused gate/up matrix, and its down matrix.

An fp8 stage can search that shared scale against the group's joint output error on the
calibration data instead of taking the joint maximum (``options = { shared_scale = "search" }``,
see :class:`SharedScaleOptions`).

Recipe::

    [[stage]]
    quantizer = "fp8"
    weights = { type = "float", bits = 8, granularity = "tensor" }
    activations = { type = "float", bits = 8, calibrator = "minmax" }
    options = { shared_scale = "search" }
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qframe import QuantizerPlugin, formats, hookimpl, numerics
from qframe.errors import RecipeError
from qframe.experts import is_fused_experts
from qframe.pipeline import LayerWork, weight_error

from .rtn import RTN, WEIGHT_RANGES
from .smoothing import ChannelStats
from .rtn import check as check_rtn


FP8_FORMATS = (formats.E4M3, formats.E5M2)


def _require(role: str, args, quantizer: str, allowed: tuple[formats.NumberFormat, ...],
             granularities: tuple[str, ...]) -> None:
    if args.number_format not in allowed:
        shown = f"type = {args.type!r}, bits = {args.bits}" + (f", format = {args.format!r}" if args.format else "")
        raise RecipeError(f"{role}.type", args.type, f"{quantizer} needs {' or '.join(f.name for f in allowed)} "
                          f"({shown} given); e.g. {role} = {{ type = \"float\", bits = {allowed[0].bits} }}")
    if args.granularity not in granularities:
        raise RecipeError(f"{role}.granularity", args.granularity,
                          f"{quantizer} {role} take {', '.join(granularities)}")


def check_fp8(stage) -> None:
    check_rtn(stage)
    weights, acts = stage.scheme.weights, stage.scheme.activations
    if weights is None:
        raise RecipeError("weights", None, "fp8 quantizes weights; add weights = { type = \"float\", bits = 8 }")
    _require("weights", weights, "fp8", FP8_FORMATS, ("tensor", "channel"))
    if acts is not None:
        _require("activations", acts, "fp8", FP8_FORMATS, ("tensor", "token"))


def _check_fp4(fmt: formats.FP4Format):
    name = fmt.name

    def check(stage) -> None:
        check_rtn(stage)
        weights, acts = stage.scheme.weights, stage.scheme.activations
        if weights is None:
            raise RecipeError("weights", None, f"{name} quantizes weights; add weights = {{ type = \"float\", bits = 4, format = \"{name}\" }}")
        _require("weights", weights, name, (fmt,), ("group",))
        if acts is not None:
            _require("activations", acts, name, (fmt,), ("group",))
            if not acts.dynamic and not fmt.has_global_scale:
                raise RecipeError("activations.dynamic", False, f"{name} activations are scaled per block at run time "
                                  "(its block scales have no global part to calibrate); allowed: true")
    return check


def input_sharing_groups(work: LayerWork, names) -> list[list[str]]:
    """The groups of two or more of ``names`` (full names) that read one input, per the
    architecture adapter's smoothing groups (all of a group's readers among ``names``) and
    expert groups (those of its readers that are among ``names``: a shared expert's gate and up).

    Example::

        >>> from qframe.model import SmoothingGroup
        >>> class Arch:
        ...     smoothing_groups = (SmoothingGroup("norm", ("q", "k")), SmoothingGroup("k", ("o",)))
        ...     expert_groups = (SmoothingGroup("norm2", ("router", "experts", "shared.gate", "shared.up")),)
        >>> work = LayerWork(0, "layers.0", None, None, torch.device("cpu"), arch=Arch())
        >>> input_sharing_groups(work, ["layers.0.q", "layers.0.k", "layers.0.o", "layers.0.shared.gate",
        ...                             "layers.0.shared.up"])
        [['layers.0.q', 'layers.0.k'], ['layers.0.shared.gate', 'layers.0.shared.up']]
    """
    wanted = set(names)
    groups = []
    for group in getattr(work.arch, "smoothing_groups", ()):
        members = [f"{work.prefix}.{c}" for c in group.consumers]
        if len(members) > 1 and all(m in wanted for m in members):
            groups.append(members)
    # A sparse block's norm feeds the router, the fused experts and a shared expert's gate and
    # up, which engines fuse into one linear with one scale (TensorRT-LLM's shared_expert.fc):
    # those of its readers that are linears here share. Experts keep scales of their own.
    for group in getattr(work.arch, "expert_groups", ()):
        members = [m for m in (f"{work.prefix}.{c}" for c in group.consumers) if m in wanted]
        if len(members) > 1:
            groups.append(members)
    return groups


@dataclass(frozen=True)
class SharedScaleOptions:
    """``options`` of an fp8 stage: how linears that read one input (q/k/v, gate/up) get their
    one per-tensor weight scale.

    ``shared_scale = "max"``: the joint range of their weights, as TensorRT-LLM's and
    modelopt's exports merge scales. ``"search"``: the range among ``grid + 1`` shrink ratios
    of the joint one, down to ``min_ratio``, whose rounding gives the least joint output error
    ``Σ_j tr(ΔW_j G ΔW_jᵀ)`` on the calibration inputs (``G = Σ xᵀx`` of their shared input,
    gathered in one more pass over the layer). ``"max"`` is among the candidates, so the
    search never does worse on the calibration data.

    Example::

        >>> SharedScaleOptions(shared_scale="search").grid
        20
    """

    shared_scale: str = "max"
    grid: int = 20
    min_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.shared_scale not in SHARED_SCALES:
            raise RecipeError("shared_scale", self.shared_scale, f"allowed: {', '.join(SHARED_SCALES)}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise RecipeError("grid", self.grid, "expected a positive number of candidates")
        if not 0 < self.min_ratio <= 1:  # also refuses NaN
            raise RecipeError("min_ratio", self.min_ratio, "expected a fraction of the joint range, in (0, 1]")


SHARED_SCALES = ("max", "search")


def search_shared_range(weights: list[torch.Tensor], gram: torch.Tensor, args, grid: int = 20,
                        min_ratio: float = 0.5) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """The per-tensor range ``(lo, hi)`` shared by ``weights`` (linears reading one input whose
    Gram matrix is ``gram``) that minimizes their joint output error ``Σ_j tr(ΔW_j G ΔW_jᵀ)``
    among the joint min/max range shrunk by ``1, ..., min_ratio``; and the chosen ratio.

    Example::

        >>> from qframe.scheme import QuantArgs
        >>> x = torch.randn(256, 8); w = [torch.randn(4, 8), torch.randn(2, 8)]
        >>> (lo, hi), ratio = search_shared_range(w, x.T @ x, QuantArgs(type="float", bits=8, granularity="tensor"))
        >>> 0.5 <= ratio <= 1.0
        True
    """
    gram = gram.float()
    floats = [w.detach().float().to(gram.device) for w in weights]
    lo = torch.stack([numerics._finite(w).amin() for w in floats]).amin().reshape(1, 1)
    hi = torch.stack([numerics._finite(w).amax() for w in floats]).amax().reshape(1, 1)
    best, best_loss = 1.0, None
    for k in range(grid + 1):
        ratio = 1.0 - (1.0 - min_ratio) * k / grid
        loss = torch.zeros((), dtype=torch.float64, device=gram.device)
        for w in floats:
            delta = numerics.quantize_weight(w, args, (lo * ratio, hi * ratio)).dequantize().sub_(w)
            loss += ((delta @ gram) * delta).sum(dtype=torch.float64)
        if best_loss is None or bool(loss < best_loss):
            best, best_loss = ratio, loss
    return (lo * best, hi * best), best


class SharedScaleRTN(RTN):
    """Round to nearest, with one per-tensor weight scale for the linears that read one input
    (see the module docstring): each is quantized again with the group's joint range (FP8;
    searched against the joint output error with ``shared_scale = "search"``) or the group's
    largest global scale (NVFP4)."""

    handles_experts = True

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return stage.static_activations or stage.options.get("shared_scale") == "search"

    def quantize_layer(self, work: LayerWork, targets, prescales: dict[str, torch.Tensor] | None = None) -> None:
        originals = {n: m for n, m in targets if not is_fused_experts(m)}  # experts: one scale set each
        super().quantize_layer(work, targets, prescales)
        weights = self.scheme.weights
        fmt = None if weights is None else weights.number_format
        per_tensor = fmt is not None and (weights.granularity == "tensor" or fmt.has_global_scale)
        if not per_tensor:
            return
        groups = input_sharing_groups(work, list(originals))
        search = getattr(self.options, "shared_scale", "max") == "search" and not fmt.has_global_scale
        grams = {}
        if search and groups and work.inputs is not None:  # one more pass: each shared input's Gram matrix
            grams = {n: s.gram for n, s in work.observe_inputs([g[0] for g in groups],
                                                              lambda _n: ChannelStats(gram=True)).items()}
        for group in groups:
            ranges = {n: WEIGHT_RANGES[weights.calibrator](originals[n].weight.detach(), weights) for n in group}
            joint_global = None
            if fmt.has_global_scale:
                joint_global = torch.stack([numerics.weight_global_scale(originals[n].weight.detach(), weights)
                                            for n in group]).amax()
            elif group[0] in grams:
                joint, ratio = search_shared_range([originals[n].weight for n in group], grams.pop(group[0]),
                                                   weights, self.options.grid, self.options.min_ratio)
                ranges = {n: joint for n in group}
                for name in group:
                    work.record(name, shared_scale_ratio=ratio)
            else:
                lo = torch.stack([ranges[n][0] for n in group]).amin(0)
                hi = torch.stack([ranges[n][1] for n in group]).amax(0)
                ranges = {n: (lo, hi) for n in group}
            quantized = dict(work.named_linears())
            for name in group:
                module = quantized[name]
                module.set_weight(originals[name].weight.detach(), ranges[name], joint_global)
                work.record(name, weight_error=weight_error(originals[name], module))


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(name="fp8", summary="FP8 E4M3/E5M2 weights, static or dynamic FP8 activations",
                          factory=SharedScaleRTN, options=SharedScaleOptions, check=check_fp8)
    yield QuantizerPlugin(name="nvfp4", summary="NVFP4: E2M1 in blocks of 16, E4M3 block scales, FP32 global scale",
                          factory=SharedScaleRTN, check=_check_fp4(formats.NVFP4))
    yield QuantizerPlugin(name="mxfp4", summary="MXFP4: E2M1 in blocks of 32, E8M0 power-of-two scales (OCP MX)",
                          factory=RTN, check=_check_fp4(formats.MXFP4))
