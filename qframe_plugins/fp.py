"""``fp8``, ``nvfp4`` and ``mxfp4``: round-to-nearest in a floating-point format, with the
format's own constraints checked before any model loads.

- ``fp8``: E4M3 (or E5M2) weights per tensor or per channel; activations static per tensor
  (any calibrator) or dynamic per token, or none.
- ``nvfp4``: E2M1 weights in blocks of 16 with E4M3 block scales and an FP32 global scale;
  activations the same (W4A4), their global scale static per tensor (calibrated, by any
  calibrator, as TensorRT-LLM serves it) or dynamic per token, or none (weight-only).
- ``mxfp4``: E2M1 in blocks of 32 with E8M0 (power-of-two) scales, per the OCP MX spec.

Recipe::

    [[stage]]
    quantizer = "fp8"
    weights = { type = "float", bits = 8, granularity = "tensor" }
    activations = { type = "float", bits = 8, calibrator = "minmax" }
"""

from __future__ import annotations

from qframe import QuantizerPlugin, hookimpl
from qframe.errors import RecipeError

from .rtn import RTN
from .rtn import check as check_rtn


def _format_of(args) -> str:
    return args.format if args.type == "float" else f"int{args.bits}"


def _require(role: str, args, quantizer: str, formats: tuple[str, ...], granularities: tuple[str, ...]) -> None:
    if _format_of(args) not in formats:
        shown = f"type = {args.type!r}, bits = {args.bits}" + (f", format = {args.format!r}" if args.format else "")
        raise RecipeError(f"{role}.type", args.type, f"{quantizer} needs {' or '.join(formats)} ({shown} given); "
                          f"e.g. {role} = {{ type = \"float\", bits = {4 if 'fp4' in formats[0] else 8} }}")
    if args.granularity not in granularities:
        raise RecipeError(f"{role}.granularity", args.granularity,
                          f"{quantizer} {role} take {', '.join(granularities)}")


def check_fp8(stage) -> None:
    check_rtn(stage)
    weights, acts = stage.scheme.weights, stage.scheme.activations
    if weights is None:
        raise RecipeError("weights", None, "fp8 quantizes weights; add weights = { type = \"float\", bits = 8 }")
    _require("weights", weights, "fp8", ("e4m3", "e5m2"), ("tensor", "channel"))
    if acts is not None:
        _require("activations", acts, "fp8", ("e4m3", "e5m2"), ("tensor", "token"))


def _check_fp4(name: str):
    def check(stage) -> None:
        check_rtn(stage)
        weights, acts = stage.scheme.weights, stage.scheme.activations
        if weights is None:
            raise RecipeError("weights", None, f"{name} quantizes weights; add weights = {{ type = \"float\", bits = 4, format = \"{name}\" }}")
        _require("weights", weights, name, (name,), ("group",))
        if acts is not None:
            _require("activations", acts, name, (name,), ("group",))
            if not acts.dynamic and name == "mxfp4":
                raise RecipeError("activations.dynamic", False, "mxfp4 activations are scaled per block at run time "
                                  "(E8M0 scales have no global part to calibrate); allowed: true")
    return check


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(name="fp8", summary="FP8 E4M3/E5M2 weights, static or dynamic FP8 activations",
                          factory=RTN, check=check_fp8)
    yield QuantizerPlugin(name="nvfp4", summary="NVFP4: E2M1 in blocks of 16, E4M3 block scales, FP32 global scale",
                          factory=RTN, check=_check_fp4("nvfp4"))
    yield QuantizerPlugin(name="mxfp4", summary="MXFP4: E2M1 in blocks of 32, E8M0 power-of-two scales (OCP MX)",
                          factory=RTN, check=_check_fp4("mxfp4"))
