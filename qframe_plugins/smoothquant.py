"""``smoothquant``: migrate activation outliers into the weights, then quantize (W8A8).

SmoothQuant (Xiao et al., 2023): for each smoothing group of a decoder layer (a norm or a
linear and the linears reading its output), a per-input-channel scale
``s = max|x|^alpha / max|w|^(1 - alpha)`` divides the input (folded into the producer) and
multiplies the consumers' weight columns, so the layer computes the same function with
flatter activations. A group whose scale cannot be folded exactly (GQA's ``v_proj`` in
front of ``o_proj``) is left alone, or with ``prescale = true`` keeps its scale as the
consumers' ``input_prescale`` (TensorRT-LLM's SmoothQuant "smoother"). Then the targets are quantized as ``rtn`` does: weights per
channel, activations static per tensor (calibrated after smoothing) or dynamic per token.

``alpha_grid`` searches alpha per layer and group: the grid value whose smoothed group,
quantized as the stage says, reproduces the float group's outputs best on the calibration
data. ``quantize = false`` only smooths, leaving float linears for a later stage (gptq).

Recipe::

    [[stage]]
    quantizer = "smoothquant"
    weights = { bits = 8 }
    activations = { bits = 8 }                       # static per tensor; dynamic = true: per token
    options = { alpha = 0.5, alpha_grid = [0.3, 0.5, 0.7, 0.85] }
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qframe import QuantizerPlugin, hookimpl, numerics
from qframe.errors import RecipeError
from qframe.pipeline import LayerWork
from qframe.scheme import QuantArgs

from .rtn import RTN
from .rtn import check as check_rtn
from .smoothing import (ActiveGroup, CandidateLoss, ChannelStats, active_groups, apply_scale, scale_columns,
                        smoothquant_scale)


MAX_ALPHAS = 100


def _alpha(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RecipeError(key, value, "expected a number strictly between 0 and 1")
    return float(value)


@dataclass(frozen=True)
class SmoothQuantOptions:
    """``alpha``: migration strength (0 < alpha < 1); ``alpha_grid``: alphas to search per
    layer and group instead; ``quantize``: false to smooth only; ``prescale``: also smooth
    groups that cannot be folded (GQA's ``v_proj`` -> ``o_proj``), keeping their scale as the
    consumers' input prescale (off by default: on SmolLM2 at alpha 0.8 it costs +10.6 %
    perplexity against +3.0 % without; docs/benchmarks.md)."""

    alpha: float = 0.5
    alpha_grid: list = field(default_factory=list)
    quantize: bool = True
    prescale: bool = False

    def __post_init__(self) -> None:
        _alpha("alpha", self.alpha)
        if not isinstance(self.alpha_grid, list):
            raise RecipeError("alpha_grid", self.alpha_grid, "expected a list of alphas, e.g. [0.3, 0.5, 0.7]")
        if len(self.alpha_grid) > MAX_ALPHAS:  # each alpha costs a forward pass of every group
            raise RecipeError("alpha_grid", self.alpha_grid, f"expected at most {MAX_ALPHAS} alphas")
        object.__setattr__(self, "alpha_grid", [_alpha("alpha_grid", a) for a in self.alpha_grid])


def check(stage) -> None:
    check_rtn(stage)


def _activation_quantizer(acts: QuantArgs | None, stats: ChannelStats, scales: torch.Tensor
                          ) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """How candidate ``c``'s smoothed input is quantized during the alpha search. A static
    per-tensor range is exact from the per-channel extremes: ``x / s`` spans
    ``[min_c lo_c / s_c, max_c hi_c / s_c]`` (the minmax calibrator's range)."""
    if acts is None:
        return None
    if acts.dynamic:
        return lambda x, _c: numerics.quantize_dynamic(x, acts)
    lows, highs = (stats.lo / scales).amin(1), (stats.hi / scales).amax(1)

    def static(x: torch.Tensor, c: int) -> torch.Tensor:
        return numerics.quantize_input(x, acts, *numerics.input_qparams(lows[c], highs[c], acts))

    return static


class SmoothQuant(RTN):
    """Smooth every foldable group the targets belong to, then quantize them as ``rtn``."""

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True

    def replaces_targets(self) -> bool:
        return self.options.quantize  # false: smoothed linears stay float for a later stage

    def quantize_layer(self, work: LayerWork, targets) -> None:
        # A group that cannot be folded (GQA's v_proj -> o_proj) is smoothed only with the
        # prescale option, keeping its scale as the consumers' input prescale (TensorRT-LLM's
        # SmoothQuant "smoother"); a float linear left for a later stage cannot carry one.
        prescaled = self.options.prescale and self.options.quantize
        groups = [g for g in active_groups(work, targets) if g.producer is not None or prescaled]
        pending: dict[str, torch.Tensor] = {}
        if groups:
            feeds = [g.names[0] for g in groups]  # consumers of a group share one input
            stats = work.observe_inputs(feeds, lambda _name: ChannelStats())
            alphas = [self.options.alpha] * len(groups)
            losses = self._search(work, groups, stats, alphas) if self.options.alpha_grid else {}
            for group, alpha in zip(groups, alphas):
                scale = smoothquant_scale(stats[group.names[0]].amax, group.weight_amax(), alpha)
                folded = apply_scale(work, group, scale, pending)
                for name in group.names:
                    work.record(name, smoothquant_alpha=alpha, smoothquant_folded=float(folded),
                                smoothquant_scale_max=float(scale.max()), smoothquant_scale_min=float(scale.min()))
                    if name in losses:
                        work.record(name, smoothquant_search_loss=losses[name])
        if self.options.quantize:
            linears = dict(targets)
            for name, scale in pending.items():  # weights take the scale, inputs its inverse
                scale_columns(linears[name], scale)
            super().quantize_layer(work, targets, {name: 1.0 / scale for name, scale in pending.items()})

    def _search(self, work: LayerWork, groups: list[ActiveGroup], stats: dict[str, ChannelStats],
                alphas: list[float]) -> dict[str, float]:
        """Set ``alphas[i]`` to group ``i``'s grid alpha of least output error under the
        stage's quantization, all groups scored in one more pass over the calibration data;
        return each consumer's relative loss at that alpha."""
        grid, losses = self.options.alpha_grid, {}
        for group in groups:
            observed = stats[group.names[0]]
            scales = torch.stack([smoothquant_scale(observed.amax, group.weight_amax(), a) for a in grid])
            act = _activation_quantizer(self.scheme.activations, observed, scales)
            losses[group.names[0]] = CandidateLoss([m.weight for m in group.linears], scales, self.scheme.weights, act)
        work.observe_inputs(list(losses), losses.__getitem__)
        found = {}
        for i, group in enumerate(groups):
            search = losses[group.names[0]]
            best = int(search.loss.argmin())
            alphas[i] = grid[best]
            found.update({name: search.relative_loss(best) for name in group.names})
        return found


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(
        name="smoothquant",
        summary="SmoothQuant: fold activation outliers into the weights, then W8A8 (static or per-token)",
        factory=SmoothQuant,
        options=SmoothQuantOptions,
        check=check,
    )
