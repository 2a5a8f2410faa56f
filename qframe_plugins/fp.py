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

Recipe::

    [[stage]]
    quantizer = "fp8"
    weights = { type = "float", bits = 8, granularity = "tensor" }
    activations = { type = "float", bits = 8, calibrator = "minmax" }
"""

from __future__ import annotations

import torch

from qframe import QuantizerPlugin, formats, hookimpl, numerics
from qframe.errors import RecipeError
from qframe.experts import is_fused_experts
from qframe.pipeline import LayerWork, weight_error

from .rtn import RTN, WEIGHT_RANGES
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


class SharedScaleRTN(RTN):
    """Round to nearest, with one per-tensor weight scale for the linears that read one input
    (see the module docstring): each is quantized again with the group's joint range (FP8) or
    the group's largest global scale (NVFP4)."""

    handles_experts = True

    def quantize_layer(self, work: LayerWork, targets, prescales: dict[str, torch.Tensor] | None = None) -> None:
        originals = {n: m for n, m in targets if not is_fused_experts(m)}  # experts: one scale set each
        super().quantize_layer(work, targets, prescales)
        weights = self.scheme.weights
        fmt = None if weights is None else weights.number_format
        per_tensor = fmt is not None and (weights.granularity == "tensor" or fmt.has_global_scale)
        if not per_tensor:
            return
        for group in input_sharing_groups(work, list(originals)):
            ranges = {n: WEIGHT_RANGES[weights.calibrator](originals[n].weight.detach(), weights) for n in group}
            joint_global = None
            if fmt.has_global_scale:
                joint_global = torch.stack([numerics.weight_global_scale(originals[n].weight.detach(), weights)
                                            for n in group]).amax()
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
                          factory=SharedScaleRTN, check=check_fp8)
    yield QuantizerPlugin(name="nvfp4", summary="NVFP4: E2M1 in blocks of 16, E4M3 block scales, FP32 global scale",
                          factory=SharedScaleRTN, check=_check_fp4(formats.NVFP4))
    yield QuantizerPlugin(name="mxfp4", summary="MXFP4: E2M1 in blocks of 32, E8M0 power-of-two scales (OCP MX)",
                          factory=RTN, check=_check_fp4(formats.MXFP4))
