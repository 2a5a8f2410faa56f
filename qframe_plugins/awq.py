"""``awq``: activation-aware weight quantization (int weights, W4A16 or W4A8).

AWQ (Lin et al., 2024), in the streaming style of llm-awq and modelopt's ``awq_lite``. For
each smoothing group of a decoder layer (the linears reading one input):

1. one pass over the calibration data gathers each input channel's mean ``|x|`` (and a
   subsample of at most ``clip_tokens`` tokens for step 3);
2. a second pass scores ``n_grid`` scales ``s_r = mean|x|^r / mean|w|^(1-r)`` (normalized by
   ``sqrt(max · min)``), ``r = k / n_grid``, by the group's output error
   ``sum_j ||Q(W_j · s)(x / s) − W_j x||²``; candidate ``r = 0`` is the identity (``s = 1``,
   plain round-to-nearest), so AWQ never does worse than RTN on this objective. The best
   scale is folded into the producer when exact, else kept as each consumer's
   ``input_prescale`` (GQA's ``v_proj`` → ``o_proj``, as TensorRT-LLM's W4A16_AWQ does);
3. per consumer, each weight group's range is shrunk by the ratio (``1`` to
   ``1 - max_shrink``) that best preserves that group's share of the outputs on the token
   subsample; the weights are quantized with those ranges.

Static activations (W4A8: int4 weights, FP8 E4M3 per-tensor inputs) are calibrated after
smoothing, on the inputs as the quantized layer will see them. ``quantize = false`` only
smooths (foldable groups), leaving float linears for a later stage.

Recipe::

    [[stage]]
    quantizer = "awq"
    weights = { bits = 4, group_size = 128 }                 # symmetric = false: with zero points
    activations = { type = "float", bits = 8 }               # optional: W4A8
    options = { n_grid = 20, clip = true, max_shrink = 0.5 }
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qframe import QuantizerPlugin, formats, hookimpl, numerics
from qframe.calibrate import Prescaled
from qframe.errors import RecipeError
from qframe.pipeline import LayerWork, Quantizer, weight_error
from qframe.qlinear import QuantLinear
from qframe.scheme import QuantArgs

from .rtn import check as check_rtn
from .smoothing import CandidateLoss, ChannelStats, active_groups, apply_scale, scale_columns

# The clip search's partial outputs [tokens, rows, groups] are computed this many elements at a time.
CLIP_CHUNK = 1 << 24


MAX_GRID = 1000


@dataclass(frozen=True)
class AWQOptions:
    """``n_grid``: scale ratios searched; ``clip``: search weight ranges too, over
    ``clip_grid + 1`` shrink ratios down to ``1 - max_shrink``, on ``clip_tokens`` tokens;
    ``quantize``: false to smooth only."""

    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    quantize: bool = True

    def __post_init__(self) -> None:
        for key in ("n_grid", "clip_grid", "clip_tokens"):
            if getattr(self, key) < 1:
                raise RecipeError(key, getattr(self, key), "expected a positive integer")
        for key in ("n_grid", "clip_grid"):  # each point of a grid costs a forward pass of every group
            if getattr(self, key) > MAX_GRID:
                raise RecipeError(key, getattr(self, key), f"expected at most {MAX_GRID} points (the default is 20)")
        if not 0 < self.max_shrink < 1:
            raise RecipeError("max_shrink", self.max_shrink, "expected a fraction of the range, 0 < max_shrink < 1")


def check(stage) -> None:
    weights = stage.scheme.weights
    if weights is None:
        raise RecipeError("weights", None, "awq quantizes weights; add weights = { bits = 4, group_size = 128 }")
    if not isinstance(weights.number_format, formats.IntFormat):
        raise RecipeError("weights.type", weights.type, "awq's scale and clip search is defined for integer "
                          "weights; allowed: int (use the nvfp4/mxfp4/fp8 quantizers for float weights)")
    if weights.granularity == "tensor":
        raise RecipeError("weights.granularity", "tensor", "awq's clip search works per row; allowed: channel, group")
    if weights.calibrator != "minmax":
        raise RecipeError("weights.calibrator", weights.calibrator,
                          "awq searches its own weight ranges (options.clip); allowed: minmax")
    check_rtn(stage)


def awq_scale(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's candidate scale for ``ratio`` in [0, 1): the identity at 0, otherwise
    ``mean|x|^r / mean|w|^(1-r)`` normalized by ``sqrt(max · min)``, at least 1e-4; channels
    never active in calibration keep 1 (nothing is known about them).

    Example::

        >>> awq_scale(torch.tensor([4.0, 1.0, 0.0]), torch.ones(3), 0.5).tolist()
        [1.4142135381698608, 0.7071067690849304, 1.0]
    """
    if ratio == 0:
        return torch.ones_like(x_mean, dtype=torch.float32)
    live = x_mean > 0
    s = x_mean.float().clamp_min(1e-4).pow(ratio) / w_mean.float().clamp_min(1e-4).pow(1 - ratio)
    picked = s[live] if bool(live.any()) else s
    s = (s / (picked.max() * picked.min()).sqrt()).clamp_min(1e-4)
    return torch.where(live, s, torch.ones_like(s))


def weight_mean(linears: list[nn.Linear], args: QuantArgs) -> torch.Tensor:
    """Mean |w| per input channel, each quantization group first scaled to a max of 1 (so a
    few large rows do not decide it), over the rows of every consumer."""
    rows = []
    for linear in linears:
        g = numerics.grouped(linear.weight.detach().float().abs(), args)
        rows.append(numerics.ungrouped(g / g.amax(-1, keepdim=True).clamp_min(1e-12), linear.weight.shape))
    return torch.cat(rows).mean(0)


def clip_ranges(w: torch.Tensor, x: torch.Tensor, args: QuantArgs, steps: int, max_shrink: float
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Per weight group, the min/max range shrunk by the ratio in ``1, ..., 1 - max_shrink``
    that minimizes ``||x_g (W_g − Q(W_g))ᵀ||²``, the group's share of the outputs on the
    tokens ``x`` [tokens, in]; returns the ranges and the mean ratio. Ties keep the wider range.

    Example::

        (lo, hi), mean_ratio = clip_ranges(linear.weight, samples, QuantArgs(bits=4, granularity="group", group_size=128), 20, 0.5)
    """
    w = w.detach().float()
    lo, hi = numerics.minmax_ranges(w, args)
    wg = numerics.grouped(w, args)  # [rows, groups, size]
    xg = numerics.grouped(x.float(), args).transpose(0, 1)  # [groups, tokens, size]
    best_err = torch.full(lo.shape, float("inf"), device=w.device)
    best = torch.ones_like(lo)
    chunk = max(1, CLIP_CHUNK // max(1, xg.shape[0] * xg.shape[1]))
    for k in range(steps + 1):
        ratio = 1.0 - max_shrink * k / steps
        scale, zero, _ = numerics.scale_parts(lo * ratio, hi * ratio, args)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        diff = numerics.dequantize(numerics.quantize(wg, scale, zero, args), scale, zero) - wg
        err = torch.cat([torch.bmm(xg, part.permute(1, 2, 0)).square().sum(1).T  # [rows, groups]
                         for part in diff.split(chunk)])
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return (lo * best, hi * best), float(best.mean())


class AWQ(Quantizer):
    """Search smoothing scales and weight clipping per group, then quantize (see module doc)."""

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True

    def replaces_targets(self) -> bool:
        return self.options.quantize  # false: smoothed linears stay float for a later stage

    def quantize_layer(self, work: LayerWork, targets) -> None:
        opts, weights = self.options, self.scheme.weights
        groups = active_groups(work, targets)
        if not opts.quantize:  # a float nn.Linear cannot carry a prescale
            groups = [g for g in groups if g.producer is not None]
        # One observed input per group (its consumers share it) and per target outside groups.
        feed = {name: g.names[0] for g in groups for name in g.names}
        feed.update({name: name for name, _ in targets if name not in feed})
        keep = opts.clip_tokens if opts.clip and opts.quantize else 0
        stats = work.observe_inputs(sorted(set(feed.values())), lambda _name: ChannelStats(keep))

        searches = {}
        for g in groups:
            x_mean = stats[g.names[0]].mean_abs
            w_mean = weight_mean(g.linears, weights)
            scales = torch.stack([awq_scale(x_mean, w_mean, k / opts.n_grid) for k in range(opts.n_grid)])
            searches[g.names[0]] = CandidateLoss([m.weight for m in g.linears], scales, weights)
        if searches:
            work.observe_inputs(list(searches), searches.__getitem__)
        smoothed, pending = {}, {}
        for g in groups:
            search = searches[g.names[0]]
            best = int(search.loss.argmin())
            folded = apply_scale(work, g, search.scales[best], pending)
            for name in g.names:
                smoothed[name] = search.scales[best]
                # awq_loss / awq_rtn_loss: the chosen scale's output error, and the identity's.
                work.record(name, awq_ratio=best / opts.n_grid, awq_loss=search.relative_loss(best),
                            awq_rtn_loss=search.relative_loss(0), awq_folded=float(folded))
        if opts.quantize:
            self._quantize(work, targets, stats, feed, smoothed, pending)

    def _quantize(self, work: LayerWork, targets, stats, feed, smoothed, pending) -> None:
        acts, weights, opts = self.scheme.activations, self.scheme.weights, self.options
        ranges = {}
        if acts is not None and not acts.dynamic:
            # After smoothing, on what each quantized linear will quantize: x · prescale.
            def make(name: str):
                calibrator = self.calibrator(acts)
                return Prescaled(calibrator, 1.0 / pending[name]) if name in pending else calibrator

            ranges = {n: c.compute() for n, c in work.observe_inputs([n for n, _ in targets], make).items()}
        for name, linear in targets:
            if name in pending:
                scale_columns(linear, pending[name])
            weight_ranges, clip_mean = None, 1.0
            samples = stats[feed[name]].samples
            if opts.clip and samples is not None and samples.shape[0] > 0:
                if name in smoothed:  # sampled before smoothing; the layer now reads x / s
                    samples = samples / smoothed[name]
                weight_ranges, clip_mean = clip_ranges(linear.weight, samples, weights, opts.clip_grid, opts.max_shrink)
            quantized = QuantLinear.from_linear(linear, weights, acts, weight_ranges=weight_ranges,
                                                input_range=ranges.get(name))
            if name in pending:
                quantized.set_input_prescale(1.0 / pending[name])
            work.replace(name, quantized)
            work.record(name, weight_error=weight_error(linear, quantized), awq_clip_ratio=clip_mean)


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(
        name="awq",
        summary="AWQ: activation-aware scale and clip search, int weights (W4A16, W4A8 with FP8 inputs)",
        factory=AWQ,
        options=AWQOptions,
        check=check,
    )
