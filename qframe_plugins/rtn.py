"""``rtn``: round-to-nearest, in every number format of the core numerics.

Weights are rounded on the grid their ``QuantArgs`` define (int2-8 symmetric or asymmetric
per tensor, channel or group; FP8 E4M3/E5M2; NVFP4 and MXFP4 blocks), with ranges from the
weights' own min/max (``calibrator = "minmax"``, the default) or, with ``calibrator = "mse"``,
each group's min/max shrunk to the ratio of least rounding error
(:func:`qframe.numerics.mse_ranges`). Activations, when the stage has them, are quantized statically (one
scale per tensor, calibrated on the layer's real inputs by any calibrator plugin) or
dynamically (per token, or per block for FP4).

Fused mixture-of-experts modules (``targets`` kind ``Experts``, in the default targets) are
quantized too: every expert's gate/up and down matrices with their own scales, all experts of a
weight in one batched call (:class:`qframe.experts.QuantExperts`). Their inputs, when the stage
quantizes activations, take one static scale per weight shared by the experts (calibrated with
every calibration token through every expert), or dynamic ones.

Recipe::

    [[stage]]
    quantizer = "rtn"
    weights = { bits = 4, group_size = 128 }
    activations = { bits = 8, dynamic = true }     # optional
"""

from __future__ import annotations

import torch

from qframe import QuantizerPlugin, formats, hookimpl, numerics
from qframe.calibrate import Prescaled
from qframe.errors import RecipeError
from qframe.expert_inputs import expert_input_ranges
from qframe.experts import QuantExperts, experts_error, expert_layouts, is_fused_experts
from qframe.pipeline import LayerWork, Quantizer, weight_error
from qframe.qlinear import QuantLinear


# Weight calibrators: ranges read off the whole weight at once (no stream to observe).
WEIGHT_RANGES = {"minmax": numerics.minmax_ranges, "mse": numerics.mse_ranges}


def check(stage) -> None:
    weights, acts = stage.scheme.weights, stage.scheme.activations
    if weights is not None and weights.calibrator not in WEIGHT_RANGES:
        raise RecipeError("weights.calibrator", weights.calibrator,
                          "rtn takes weight ranges from the weights themselves: their min/max, or the clipped "
                          f"ranges of least rounding error; allowed: {', '.join(WEIGHT_RANGES)}")
    if weights is not None and weights.calibrator_options:
        key, value = weights.calibrator_options[0]
        raise RecipeError(f"weights.calibrator_options.{key}", value, "rtn's weight ranges take no options; allowed: none")
    if acts is not None and isinstance(acts.number_format, formats.IntFormat) and acts.bits != 8:
        raise RecipeError("activations.bits", acts.bits, "int activations are int8; allowed: 8")


class RTN(Quantizer):
    # Whether this class quantizes fused experts: declared by each class itself, so a subclass
    # with an algorithm of its own (smoothquant) leaves them alone until it says otherwise.
    handles_experts = True

    def quantize_layer(self, work: LayerWork, targets, prescales: dict[str, torch.Tensor] | None = None) -> None:
        """Quantize ``targets``; ``prescales[name]`` (from a smoothing subclass) multiplies that
        linear's inputs before they are quantized: its static range is calibrated on them.
        Fused experts are quantized in place (:meth:`quantize_experts`)."""
        experts = [(n, m) for n, m in targets if is_fused_experts(m)]
        targets = [(n, m) for n, m in targets if not is_fused_experts(m)]
        for name, module in experts:
            self.quantize_experts(work, name, module)
        acts, prescales = self.scheme.activations, prescales or {}
        ranges = {}
        if acts is not None and not acts.dynamic and targets:
            def make(name: str):
                calibrator = self.calibrator(acts)
                return Prescaled(calibrator, prescales[name]) if name in prescales else calibrator

            observed = work.observe_inputs([n for n, _ in targets], make)
            ranges = {name: calib.compute() for name, calib in observed.items()}
        weights = self.scheme.weights
        for name, linear in targets:
            weight_ranges = None if weights is None else WEIGHT_RANGES[weights.calibrator](linear.weight.detach(), weights)
            quantized = QuantLinear.from_linear(linear, weights, acts, weight_ranges=weight_ranges,
                                                input_range=ranges.get(name))
            if name in prescales:
                quantized.set_input_prescale(prescales[name])
            work.replace(name, quantized)
            if self.scheme.weights is not None:
                work.record(name, weight_error=weight_error(linear, quantized))


    def quantize_experts(self, work: LayerWork, name: str, module) -> QuantExperts:
        """Quantize the fused-experts ``module`` in place, every expert with its own scales and the
        stage's weight ranges (min/max or mse), calibrate static input scales (every calibration
        token through every expert), and record its weight error."""
        originals = {n: module._parameters[n].detach().clone() for n in expert_layouts(module)}
        acts = self.scheme.activations
        ranges = None
        if acts is not None and not acts.dynamic:  # on the float experts, as linears are calibrated
            ranges = expert_input_ranges(work, name, module, lambda: self.calibrator(acts))
        quantized = QuantExperts.quantize(module, self.scheme.weights, self.scheme.weights.calibrator, acts)
        if ranges is not None:
            ranges.apply(quantized)
        work.record(name, weight_error=experts_error(originals, quantized))
        return quantized


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(
        name="rtn",
        summary="round-to-nearest weights (int2-8, FP8, NVFP4, MXFP4), optional activations",
        factory=RTN,
        check=check,
    )
