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

from torch import nn

from qframe import QuantizerPlugin, hookimpl, numerics
from qframe.errors import RecipeError
from qframe.expert_inputs import ExpertCalibration, expert_chunk, expert_hidden, observe_experts
from qframe.experts import expert_matrix, expert_weight_names, is_fused_experts, num_experts
from qframe.pipeline import LayerWork
from qframe.scheme import QuantArgs

from .rtn import RTN
from .rtn import check as check_rtn
from .smoothing import (ActiveGroup, CandidateLoss, ChannelStats, active_groups, apply_scale, concatenated_gate,
                        expert_group, fold_block_input, fold_up_down, scale_columns, smoothquant_scale)


MAX_ALPHAS = 100


def _alpha(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RecipeError(key, value, "expected a number strictly between 0 and 1")
    return float(value)


@dataclass(frozen=True)
class SmoothQuantOptions(ExpertCalibration):
    """``alpha``: migration strength (0 < alpha < 1); ``alpha_grid``: alphas to search per
    layer and group instead; ``quantize``: false to smooth only; ``prescale``: also smooth
    groups that cannot be folded (GQA's ``v_proj`` -> ``o_proj``), keeping their scale as the
    consumers' input prescale (off by default: on SmolLM2 at alpha 0.8 it costs +10.6 %
    perplexity against +3.0 % without; docs/benchmarks.md). Fused experts take ``alpha`` (the
    grid searches linears' groups); ``experts`` says which tokens their statistics cover
    (:class:`qframe.expert_inputs.ExpertCalibration`)."""

    alpha: float = 0.5
    alpha_grid: list = field(default_factory=list)
    quantize: bool = True
    prescale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
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


class ExpertAmax:
    """An :class:`~qframe.expert_inputs.ExpertObserver` for SmoothQuant: max ``|x|`` per channel
    of the experts' input ``[H]``, and of each expert's hidden activation ``[E, I]`` (what its
    ``down_proj`` reads; under ``"routed"`` over its routed tokens only). NaN and inf are ignored."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.inputs: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, routed: torch.Tensor | None) -> None:
        magnitude = torch.nan_to_num(x.float().abs(), nan=0.0, posinf=0.0).amax(0)
        self.inputs = magnitude if self.inputs is None else torch.maximum(self.inputs, magnitude)
        total, step = num_experts(self.module), expert_chunk(self.module, x.shape[0])
        parts = []
        for start in range(0, total, step):
            chunk = slice(start, min(start + step, total))
            hidden = torch.nan_to_num(expert_hidden(self.module, x, chunk).float().abs(), nan=0.0, posinf=0.0)
            if routed is not None:
                hidden = hidden * routed[chunk].unsqueeze(-1)
            parts.append(hidden.amax(1))
        hidden = torch.cat(parts)
        self.hidden = hidden if self.hidden is None else torch.maximum(self.hidden, hidden)

    def combine(self, ranks) -> None:
        ranks.reduce(self, inputs="max", hidden="max")


class SmoothQuant(RTN):
    """Smooth every foldable group the targets belong to, then quantize them as ``rtn``."""

    handles_experts = True

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True

    def replaces_targets(self) -> bool:
        return self.options.quantize  # false: smoothed linears stay float for a later stage

    def quantize_layer(self, work: LayerWork, targets) -> None:
        chosen = {n for n, m in targets if not is_fused_experts(m)}
        for name, module in targets:
            if is_fused_experts(module):
                self._smooth_experts(work, name, module, chosen)
        linears = [(n, m) for n, m in targets if n in chosen]
        # A group that cannot be folded (GQA's v_proj -> o_proj) is smoothed only with the
        # prescale option, keeping its scale as the consumers' input prescale (TensorRT-LLM's
        # SmoothQuant "smoother"); a float linear left for a later stage cannot carry one.
        prescaled = self.options.prescale and self.options.quantize
        groups = [g for g in active_groups(work, linears) if g.producer is not None or prescaled]
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
            modules = dict(targets)
            for name, scale in pending.items():  # weights take the scale, inputs its inverse
                scale_columns(modules[name], scale)
            super().quantize_layer(work, targets, {name: 1.0 / scale for name, scale in pending.items()})

    def _smooth_experts(self, work: LayerWork, name: str, module: nn.Module, chosen: set[str]) -> None:
        """SmoothQuant's scales for fused experts, from one pass of statistics: the sparse
        block's norm → router, every expert's first weight and the stage's shared-expert linears
        (one scale, folded into the norm; the float router takes ``W · s``), and each expert's
        up → down (its own scale, folded into ``up``'s rows where the gate allows)."""
        alpha = self.options.alpha
        found = expert_group(work, name, module)
        up_down = concatenated_gate(module)
        if found is None and not up_down:
            return
        stats = observe_experts(work, [name], lambda _n: ExpertAmax(module), self.options.experts)[name]
        if stats.inputs is None:
            return
        first, second = expert_weight_names(module)
        if found is not None:
            producer, readers = found
            columns = [expert_matrix(module, first).detach().abs().amax((0, 1)).float()]
            columns += [r.weight.detach().abs().amax(0).float() for c, r in readers.items()
                        if f"{work.prefix}.{c}" in chosen]
            scale = smoothquant_scale(stats.inputs, torch.stack(columns).amax(0), alpha)
            fold_block_input(work, producer, [module, *readers.values()], scale)
            work.record(name, smoothquant_alpha=alpha, smoothquant_folded=1.0,
                        smoothquant_scale_max=float(scale.max()), smoothquant_scale_min=float(scale.min()))
        if up_down:
            down = expert_matrix(module, second).detach().abs().amax(1).float()  # [E, I]
            fold_up_down(module, smoothquant_scale(stats.hidden, down, alpha))
            work.record(name, smoothquant_up_down=1.0)

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
