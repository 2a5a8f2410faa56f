"""A complete third-party qframe plugin: round-to-nearest on ranges shrunk by a fixed ratio."""

from dataclasses import dataclass

import qframe
from qframe import QuantizerPlugin, RecipeError
from qframe.numerics import minmax_ranges
from qframe.pipeline import Quantizer
from qframe.qlinear import QuantLinear


@dataclass(frozen=True)
class ClipOptions:
    """The stage's `options` table: options = { ratio = 0.9 }."""

    ratio: float = 0.9

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise RecipeError("ratio", self.ratio, "expected 0 < ratio <= 1")


def check(stage):
    """Refuse, before any model loads, what this algorithm cannot do."""
    if stage.scheme.weights is None or stage.scheme.activations is not None:
        raise RecipeError("weights", None, "clipped-rtn quantizes weights only; give weights and no activations")


class ClippedRTN(Quantizer):
    def quantize_layer(self, work, targets):
        args, ratio = self.scheme.weights, self.options.ratio
        for name, linear in targets:
            lo, hi = minmax_ranges(linear.weight, args)
            work.replace(name, QuantLinear.from_linear(linear, args, weight_ranges=(lo * ratio, hi * ratio)))


@qframe.hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(name="clipped-rtn", summary="RTN on ranges clipped by a fixed ratio",
                          factory=ClippedRTN, options=ClipOptions, check=check)
