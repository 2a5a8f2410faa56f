"""``awq``: activation-aware weight quantization (int weights, W4A16 or W4A8).

AWQ (Lin et al., 2024), in the streaming style of llm-awq and modelopt's ``awq_lite``. For
each smoothing group of a decoder layer (the linears reading one input):

1. one pass over the calibration data gathers each input channel's mean ``|x|`` and the
   inputs' Gram matrix ``G = Σ xᵀx``, which holds every token's contribution to any linear
   output error: ``||x ΔWᵀ||² = tr(ΔW G ΔWᵀ)``;
2. ``n_grid`` scales ``s_r = mean|x|^r / mean|w|^(1-r)`` (normalized by
   ``sqrt(max · min)``), ``r = k / n_grid``, are scored by the group's output error
   ``sum_j ||Q(W_j · s)(x / s) − W_j x||²``, computed from ``G`` (each candidate costs
   ``out · in²`` instead of ``tokens · out · in``); candidate ``r = 0`` is the identity (``s = 1``,
   plain round-to-nearest), so AWQ never does worse than RTN on this objective. The best
   scale is folded into the producer when exact, else kept as each consumer's
   ``input_prescale`` (GQA's ``v_proj`` → ``o_proj``, as TensorRT-LLM's W4A16_AWQ does);
3. per consumer, each weight group's range is shrunk by the ratio (``1`` to
   ``1 - max_shrink``) that best preserves that group's share of the outputs over every
   token (``G``'s diagonal block for the group); the weights are quantized with those ranges.

Fused experts, whose tokens are routed, search on a sample of ``expert_tokens`` tokens.

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

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from qframe import QuantizerPlugin, formats, hookimpl, numerics
from qframe.calibrate import Prescaled
from qframe.distributed import Ranks, spread
from qframe.errors import RecipeError
from qframe.expert_inputs import (ExpertCalibration, expert_input_ranges, expert_hidden, expert_matrix,
                                  expert_weight_names, observe_experts)
from qframe.experts import QuantExperts, expert_layouts, experts_error, is_fused_experts, num_experts
from qframe.model import listed
from qframe.pipeline import LayerWork, Quantizer, weight_error
from qframe.qlinear import QuantLinear
from qframe.scheme import QuantArgs

from .rtn import check as check_rtn
from .smoothing import (CANDIDATE_BYTES, CandidateLoss, ChannelStats, active_groups, apply_scale, concatenated_gate,
                        expert_group, fold_block_input, fold_up_down, scale_columns)

# The clip search's partial outputs [tokens, rows, groups] are computed this many elements at a time.
CLIP_CHUNK = 1 << 24


MAX_GRID = 1000


@dataclass(frozen=True)
class AWQOptions(ExpertCalibration):
    """``n_grid``: scale ratios searched; ``clip``: search weight ranges too, over
    ``clip_grid + 1`` shrink ratios down to ``1 - max_shrink`` (on every token for linears, on
    ``clip_tokens`` of the sampled tokens for fused experts);
    ``quantize``: false to smooth only. Fused experts: their searches run on ``expert_tokens``
    tokens sampled evenly from the calibration stream; ``experts`` and ``expert_min_tokens`` as
    :class:`qframe.expert_inputs.ExpertCalibration` says."""

    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    quantize: bool = True
    expert_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n_grid", "clip_grid", "clip_tokens", "expert_tokens"):
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
    never active in calibration keep 1 (nothing is known about them). Batched over leading
    dimensions (one scale per expert: ``[E, channels]``).

    Example::

        >>> awq_scale(torch.tensor([4.0, 1.0, 0.0]), torch.ones(3), 0.5).tolist()
        [1.4142135381698608, 0.7071067690849304, 1.0]
    """
    if ratio == 0:
        return torch.ones_like(x_mean, dtype=torch.float32)
    live = x_mean > 0
    s = x_mean.float().clamp_min(1e-4).pow(ratio) / w_mean.float().clamp_min(1e-4).pow(1 - ratio)
    # Normalized over the live channels of each row (each expert's own, for [E, channels]).
    any_live = live.any(-1, keepdim=True)
    picked = live | ~any_live
    top = torch.where(picked, s, -math.inf).amax(-1, keepdim=True)
    bottom = torch.where(picked, s, math.inf).amin(-1, keepdim=True)
    s = (s / (top * bottom).sqrt()).clamp_min(1e-4)
    return torch.where(live, s, torch.ones_like(s))


def normalized_magnitudes(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``|w|`` ``[out, in]`` with each quantization group scaled to a max of 1 (float32)."""
    g = numerics.grouped(w.detach().float().abs(), args)
    return numerics.ungrouped(g / g.amax(-1, keepdim=True).clamp_min(1e-12), w.shape)


def weight_mean(weights: list[torch.Tensor], args: QuantArgs) -> torch.Tensor:
    """Mean |w| per input channel, each quantization group first scaled to a max of 1 (so a
    few large rows do not decide it), over the rows of every consumer's weight ``[out, in]``."""
    return torch.cat([normalized_magnitudes(w, args) for w in weights]).mean(0)


def candidate_losses(weights: list[torch.Tensor], scales: torch.Tensor, args: QuantArgs, gram: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's objective for each candidate scale ``s_c`` (a row of ``scales [K, in]``), from the
    consumers' common input's Gram matrix ``G = Σ xᵀx``: ``Σ_j ||Q(W_j · s_c)(x / s_c) − W_j x||²
    = Σ_j tr(ΔW_j G ΔW_jᵀ)`` with ``ΔW_j = Q(W_j · s_c) · diag(1 / s_c) − W_j``. Returns the losses
    ``[K]`` and the outputs' energy ``Σ_j tr(W_j G W_jᵀ)``, in float64. The tokens are summed once,
    in ``G``: each candidate costs ``out · in²``, not ``tokens · out · in``.

    Example::

        >>> x, w = torch.randn(64, 8), torch.randn(4, 8)
        >>> loss, energy = candidate_losses([w], torch.ones(1, 8), QuantArgs(bits=4), x.T @ x)
        >>> direct = (x @ (numerics.quantize_weight(w, QuantArgs(bits=4)).dequantize() - w).T).square().sum()
        >>> bool(torch.isclose(loss[0], direct.double(), rtol=1e-4))
        True
    """
    gram = gram.float()
    loss = torch.zeros(scales.shape[0], dtype=torch.float64, device=gram.device)
    energy = torch.zeros((), dtype=torch.float64, device=gram.device)
    for w in weights:  # each consumer apart: per-tensor weight ranges must not span two
        w = w.detach().float().to(gram.device)
        energy += ((w @ gram) * w).sum(dtype=torch.float64)
        for c in range(scales.shape[0]):
            s = scales[c].float().to(gram.device)
            delta = numerics.quantize_weight(w * s, args).dequantize().div_(s).sub_(w)
            loss[c] += ((delta @ gram) * delta).sum(dtype=torch.float64)
    return loss, energy


def clip_ranges_gram(w: torch.Tensor, gram: torch.Tensor, args: QuantArgs, steps: int, max_shrink: float
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """:func:`clip_ranges` on every calibration token at once, through the Gram matrix ``G =
    Σ xᵀx`` of the inputs ``[in, in]``: a group's share of the output error is
    ``ΔW_g G_gg ΔW_gᵀ`` with ``G_gg`` the group's diagonal block.

    Example::

        >>> x, w, args = torch.randn(256, 16), torch.randn(4, 16), QuantArgs(bits=4, granularity="group", group_size=8)
        >>> a, _ = clip_ranges_gram(w, x.T @ x, args, 10, 0.5); b, _ = clip_ranges(w, x, args, 10, 0.5)
        >>> torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        True
    """
    w = w.detach().float().to(gram.device)
    lo, hi = numerics.minmax_ranges(w, args)
    wg = numerics.grouped(w, args)  # [rows, groups, size]
    groups, size = wg.shape[1], wg.shape[2]
    gram = gram.float()
    if groups * size != gram.shape[0]:  # a partial last group: pad (a copy), else G's own blocks (a view)
        gram = torch.nn.functional.pad(gram, (0, groups * size - gram.shape[0]) * 2)
    blocks = gram.view(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
    best_err = torch.full(lo.shape, float("inf"), device=w.device)
    best = torch.ones_like(lo)
    for k in range(steps + 1):
        ratio = 1.0 - max_shrink * k / steps
        scale, zero, _ = numerics.scale_parts(lo * ratio, hi * ratio, args)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        diff = (numerics.dequantize(numerics.quantize(wg, scale, zero, args), scale, zero) - wg).transpose(0, 1)
        err = (torch.bmm(diff, blocks) * diff).sum(-1).T  # [rows, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return (lo * best, hi * best), float(best.mean())


def clip_ranges(w: torch.Tensor, x: torch.Tensor, args: QuantArgs, steps: int, max_shrink: float
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Per weight group, the min/max range shrunk by the ratio in ``1, ..., 1 - max_shrink``
    that minimizes ``||x_g (W_g − Q(W_g))ᵀ||²``, the group's share of the outputs on the
    tokens ``x`` [tokens, in]; returns the ranges and the mean ratio. Ties keep the wider range.

    Example::

        (lo, hi), mean_ratio = clip_ranges(linear.weight, samples, QuantArgs(bits=4, granularity="group", group_size=128), 20, 0.5)
    """
    (lo, hi), ratio = clip_ranges_batched(w.unsqueeze(0), x.unsqueeze(0), args, steps, max_shrink)
    return (lo[0], hi[0]), ratio


def clip_ranges_batched(w: torch.Tensor, x: torch.Tensor, args: QuantArgs, steps: int, max_shrink: float
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """:func:`clip_ranges` for a batch of matrices ``w [B, out, in]`` (every expert of a fused
    weight), each on its own tokens ``x [B, tokens, in]`` or all on the same ``x [1, tokens,
    in]``; ranges ``[B, out, groups]``.

    Example::

        >>> (lo, hi), _ = clip_ranges_batched(torch.randn(3, 4, 8), torch.randn(1, 16, 8), QuantArgs(bits=4), 4, 0.5)
        >>> tuple(lo.shape)
        (3, 4, 1)
    """
    b, rows, columns = w.shape
    w = w.detach().float().reshape(b * rows, columns)
    lo, hi = numerics.minmax_ranges(w, args)
    groups = lo.shape[-1]
    wg = numerics.grouped(w, args).view(b, rows, groups, -1)  # [B, rows, groups, size]
    xg = torch.stack([numerics.grouped(t.float(), args) for t in x]).transpose(1, 2)  # [Bx, groups, tokens, size]
    tokens = xg.shape[2]
    lo, hi = lo.view(b, rows, groups), hi.view(b, rows, groups)
    best_err = torch.full(lo.shape, float("inf"), device=w.device)
    best = torch.ones_like(lo)
    per_row = max(1, groups * tokens)
    row_step = max(1, CLIP_CHUNK // per_row)
    batch_step = max(1, CLIP_CHUNK // (per_row * rows)) if row_step >= rows else 1
    for k in range(steps + 1):
        ratio = 1.0 - max_shrink * k / steps
        scale, zero, _ = numerics.scale_parts(lo * ratio, hi * ratio, args)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        diff = numerics.dequantize(numerics.quantize(wg, scale, zero, args), scale, zero) - wg
        err = torch.empty_like(best_err)
        for i in range(0, b, batch_step):
            j = min(i + batch_step, b)
            xs = xg[i:j] if xg.shape[0] > 1 else xg.expand(j - i, -1, -1, -1)
            flat_x = xs.reshape((j - i) * groups, tokens, -1)  # [b·groups, tokens, size]
            for r in range(0, rows, row_step):
                part = diff[i:j, r:r + row_step].permute(0, 2, 3, 1)  # [b, groups, size, rows]
                out = torch.bmm(flat_x, part.reshape((j - i) * groups, part.shape[2], -1))
                err[i:j, r:r + row_step] = out.square().sum(1).view(j - i, groups, -1).transpose(1, 2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return (lo * best, hi * best), float(best.mean())


# -- fused experts -----------------------------------------------------------------------------

# Elements of one chunk of expert outputs [experts, tokens, out] scored at once.
EXPERT_OUTPUT_ELEMENTS = 1 << 26


def experts_candidate_loss(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, args: QuantArgs,
                           routed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's objective for every expert of a fused weight at once: for each candidate scale
    ``s_k`` (``scales [K, in]``, shared, or ``[K, E, in]``, each expert its own), the squared
    output error ``Σ_t ||Q(W_e · s_k)(x_t / s_k) − W_e x_t||²`` of each expert ``e`` (``w [E,
    out, in]``) over its tokens (``x [tokens, in]`` shared or ``[E, tokens, in]``; ``routed
    [E, tokens]`` weights them, ``None``: all). Returns ``loss [K, E]`` and each expert's output
    energy ``[E]``, in float64.

    Example::

        >>> loss, energy = experts_candidate_loss(torch.randn(2, 4, 8), torch.randn(16, 8),
        ...                                       torch.ones(1, 8), QuantArgs(bits=4))
        >>> tuple(loss.shape), bool((loss < energy).all())
        ((1, 2), True)
    """
    e, out, columns = w.shape
    tokens = x.shape[-2]
    dtype = w.dtype if w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) else torch.float32
    loss = torch.zeros(scales.shape[0], e, dtype=torch.float64, device=w.device)
    energy = torch.zeros(e, dtype=torch.float64, device=w.device)
    step = max(1, EXPERT_OUTPUT_ELEMENTS // max(1, tokens * out))
    for i in range(0, e, step):
        chunk = slice(i, min(i + step, e))
        wc = w[chunk].detach().float()
        xc = (x.unsqueeze(0) if x.dim() == 2 else x[chunk]).float()
        xc = torch.where(torch.isfinite(xc), xc, torch.zeros((), device=xc.device))
        weight = None if routed is None else routed[chunk].to(w.device, torch.float64)
        reference = torch.matmul(xc.to(dtype), wc.to(dtype).transpose(1, 2)).float()  # [c, tokens, out]
        per_token = reference.square().sum(-1).double()
        energy[chunk] = (per_token if weight is None else per_token * weight).sum(-1)
        for k in range(scales.shape[0]):
            s = scales[k] if scales.dim() == 2 else scales[k, chunk]
            s = s.float().view(-1, 1, columns) if scales.dim() == 3 else s.float().view(1, 1, columns)
            scaled = (wc * s).reshape(-1, columns)
            rounded = numerics.quantize_weight(scaled, args, served_dtype=torch.float32).dequantize()
            outputs = torch.matmul((xc / s).to(dtype), rounded.view(wc.shape).to(dtype).transpose(1, 2)).float()
            err = outputs.sub_(reference).square_().sum(-1).double()
            loss[k, chunk] = (err if weight is None else err * weight).sum(-1)
    return loss, energy


def experts_loss_across(ranks: Ranks | None, w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor,
                        args: QuantArgs, routed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`experts_candidate_loss` with the experts shared across ``ranks`` (each scores its
    share; every rank gets all): ``loss [K, E]``, ``energy [E]``."""
    if ranks is None:
        return experts_candidate_loss(w, x, scales, args, routed)

    def scored(experts: slice):
        loss, energy = experts_candidate_loss(w[experts], x if x.dim() == 2 else x[experts],
                                              scales if scales.dim() == 2 else scales[:, experts], args,
                                              None if routed is None else routed[experts])
        return loss.T.contiguous(), energy  # experts first, to be gathered in order

    loss, energy = spread(ranks, w.shape[0], scored)
    return loss.T, energy


def clip_across(ranks: Ranks | None, w: torch.Tensor, x: torch.Tensor, args: QuantArgs, steps: int,
                max_shrink: float) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """:func:`clip_ranges_batched` on fused experts ``w [E, out, in]`` with the experts shared
    across ``ranks`` (``x``: ``[1, tokens, in]`` for all, or ``[E, tokens, in]``)."""
    if ranks is None:
        return clip_ranges_batched(w, x, args, steps, max_shrink)

    def clipped(experts: slice):
        (lo, hi), ratio = clip_ranges_batched(w[experts], x if x.shape[0] == 1 else x[experts], args, steps,
                                              max_shrink)
        return lo, hi, torch.full(lo.shape[:1], ratio, device=lo.device)

    lo, hi, ratios = spread(ranks, w.shape[0], clipped)
    return (lo, hi), float(ratios.mean())


class ExpertSample:
    """An :class:`~qframe.expert_inputs.ExpertObserver` for AWQ: mean ``|x|`` per channel over
    every token the experts receive, and an evenly spread sample of at most ``keep`` tokens
    ``[n, H]`` with their routing ``[E, n]`` (``None`` under ``experts = "all"``; then also the
    routed tokens per expert over the whole stream). The routing rides along as extra columns
    of the sampled rows, so both are sampled alike.

    Example::

        >>> sample = ExpertSample(keep=2)
        >>> sample.observe(torch.ones(4, 3), torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]]).bool())
        >>> x, routed = sample.tokens()
        >>> tuple(x.shape), routed.int().tolist(), sample.routed_tokens.tolist()
        ((2, 3), [[1, 0], [0, 1]], [2, 2])
    """

    def __init__(self, keep: int):
        self.stats = ChannelStats(keep)
        self.width = 0
        self.routed_tokens: torch.Tensor | None = None  # per expert, over the whole stream ("routed")

    def observe(self, x: torch.Tensor, routed: torch.Tensor | None) -> None:
        self.width = x.shape[-1]
        self.stats.observe(x if routed is None else torch.cat([x.float(), routed.T.float()], -1))
        if routed is not None:
            counts = routed.sum(1)
            self.routed_tokens = counts if self.routed_tokens is None else self.routed_tokens + counts

    def combine(self, ranks) -> None:
        self.stats.combine(ranks)
        ranks.reduce(self, width="max", routed_tokens="sum")

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.stats.mean_abs[: self.width]

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampled tokens and their routing masks."""
        rows = self.stats.samples
        routed = rows[:, self.width:].T > 0.5 if rows.shape[1] > self.width else None
        return rows[:, : self.width], routed


class AWQ(Quantizer):
    """Search smoothing scales and weight clipping per group, then quantize (see module doc)."""

    handles_experts = True

    def working_set(self, layer: nn.Module, batch_tokens: int) -> int:
        """A forward, every linear's input Gram matrix (float32, all observed in one pass) and
        the candidate search's float32 copies of the largest weight."""
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        grams = sum(4 * m.in_features**2 for m in linears)
        largest = max((m.weight.numel() for m in linears), default=0)
        return super().working_set(layer, batch_tokens) + grams + max(CANDIDATE_BYTES, 4 * 4 * largest)

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True

    def replaces_targets(self) -> bool:
        return self.options.quantize  # false: smoothed linears stay float for a later stage

    def quantize_layer(self, work: LayerWork, targets) -> None:
        experts = [(n, m) for n, m in targets if is_fused_experts(m)]
        linears = [(n, m) for n, m in targets if not is_fused_experts(m)]
        chosen = {n for n, _ in linears}
        for name, module in experts:  # first: the norm it smooths feeds the shared expert's linears too
            self._smooth_block_input(work, name, module, chosen)
        if linears:
            self._quantize_linears(work, linears)
        for name, module in experts:
            self._quantize_experts(work, name, module)

    def _smooth_block_input(self, work: LayerWork, name: str, module: nn.Module, chosen: set[str]) -> None:
        """The norm in front of the sparse block → router, every expert's first weight and the
        shared expert (the adapter's ``expert_groups``): one scale for all, searched on AWQ's
        objective summed over every expert and the stage's shared-expert linears, folded into
        the norm; the router and shared gate (float) take ``W · s`` too, so routing is unchanged."""
        opts, weights = self.options, self.scheme.weights
        found = expert_group(work, name, module)
        if found is not None:
            producer, readers = found
            first = expert_weight_names(module)[0]
            w = expert_matrix(module, first)
            sample = observe_experts(work, [name], lambda _n: ExpertSample(opts.expert_tokens), opts.experts)[name]
            x, routed = sample.tokens()
            shared = [r.weight for c, r in readers.items() if f"{work.prefix}.{c}" in chosen]
            w_mean = weight_mean([w.reshape(-1, w.shape[2]), *shared], weights)
            scales = torch.stack([awq_scale(sample.mean_abs, w_mean, k / opts.n_grid) for k in range(opts.n_grid)])
            loss, energy = experts_loss_across(work.ranks, w, x, scales, weights, routed)
            loss, energy = loss.sum(1), energy.sum()
            if shared:
                search = CandidateLoss(shared, scales, weights)
                search.observe(x)
                loss, energy = loss + search.loss, energy + search.energy
            best = int(loss.argmin())
            if best:
                fold_block_input(work, producer, [module, *readers.values()], scales[best])
            energy = float(energy.clamp_min(1e-30))
            work.record(name, awq_ratio=best / opts.n_grid, awq_loss=float(loss[best]) / energy,
                        awq_rtn_loss=float(loss[0]) / energy, awq_folded=1.0)

    def _quantize_experts(self, work: LayerWork, name: str, module: nn.Module) -> None:
        """Up → down inside each expert (its own scale, folded into ``up``'s rows where the gate is
        ``act(gate) · up``), then each weight's clip search, all experts batched; then the
        module becomes :class:`QuantExperts` with those ranges."""
        opts, weights = self.options, self.scheme.weights
        keep = max(opts.expert_tokens, opts.clip_tokens if opts.clip else 0)
        sample = observe_experts(work, [name], lambda _n: ExpertSample(keep), opts.experts)[name]
        x, routed = sample.tokens()
        first, second = expert_weight_names(module)
        total = num_experts(module)
        starved = []
        if sample.routed_tokens is not None:
            starved = (sample.routed_tokens < opts.expert_min_tokens).nonzero().flatten().tolist()
        with torch.no_grad():
            if concatenated_gate(module) and x.shape[0]:
                down = expert_matrix(module, second)
                hidden = expert_hidden(module, x)  # [E, n, I]
                magnitude = hidden.abs().float()
                if routed is None:
                    a_mean = magnitude.mean(1)
                else:
                    mask = routed.to(magnitude.device).float()
                    a_mean = (magnitude * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
                del magnitude
                inner = down.shape[2]
                w_mean = normalized_magnitudes(down.reshape(-1, inner), weights).view(down.shape).mean(1)
                scales = torch.stack([awq_scale(a_mean, w_mean, k / opts.n_grid) for k in range(opts.n_grid)])
                loss, energy = experts_loss_across(work.ranks, down, hidden, scales, weights, routed)
                del hidden
                best = loss.argmin(0)
                best[starved] = 0  # too few tokens to trust a search: the identity
                fold_up_down(module, scales[best.to(scales.device), torch.arange(total, device=scales.device)])
                picked = loss.gather(0, best.to(loss.device).unsqueeze(0)).sum()
                whole = float(energy.sum().clamp_min(1e-30))
                work.record(name, awq_expert_ratio=float(best.float().mean()) / opts.n_grid,
                            awq_expert_loss=float(picked) / whole, awq_expert_rtn_loss=float(loss[0].sum()) / whole)
        if starved:
            warnings.warn(f"{name}: expert{'s' if len(starved) > 1 else ''} {listed([str(e) for e in starved], 8)} "
                          f"(of {total}) saw fewer than {opts.expert_min_tokens} routed calibration tokens (experts = "
                          "\"routed\"): no smoothing scale was searched for them; calibrate on more tokens, or use "
                          "experts = \"all\" (the default) so that every token reaches every expert")
        if not opts.quantize:
            return
        ranges = {}
        if opts.clip and x.shape[0]:
            clip = x[:: max(1, -(-x.shape[0] // opts.clip_tokens))]  # evenly spread, at most clip_tokens
            with torch.no_grad():
                ranges[first], ratio_first = clip_across(work.ranks, expert_matrix(module, first), clip.unsqueeze(0),
                                                         weights, opts.clip_grid, opts.max_shrink)
                ranges[second], ratio_second = clip_across(work.ranks, expert_matrix(module, second),
                                                           expert_hidden(module, clip), weights, opts.clip_grid,
                                                           opts.max_shrink)
            work.record(name, awq_clip_ratio=(ratio_first + ratio_second) / 2)
        layouts = expert_layouts(module)
        smoothed = {n: module._parameters[n].detach().clone() for n in layouts}
        acts = self.scheme.activations
        inputs = None
        if acts is not None and not acts.dynamic:  # after smoothing, on the float experts, as for linears
            inputs = expert_input_ranges(work, name, module, lambda: self.calibrator(acts), opts.experts)
        quantized = QuantExperts.convert(module, weights, acts, layouts)
        for weight_name, w in smoothed.items():
            quantized.set_weight(weight_name, w, ranges=ranges.get(weight_name))
        if inputs is not None:
            inputs.apply(quantized)
        work.record(name, weight_error=experts_error(smoothed, quantized))

    def _quantize_linears(self, work: LayerWork, targets) -> None:
        opts, weights = self.options, self.scheme.weights
        groups = active_groups(work, targets)
        if not opts.quantize:  # a float nn.Linear cannot carry a prescale
            groups = [g for g in groups if g.producer is not None]
        # One observed input per group (its consumers share it) and per target outside groups.
        feed = {name: g.names[0] for g in groups for name in g.names}
        feed.update({name: name for name, _ in targets if name not in feed})
        # One pass over the calibration data: mean |x| per channel and the Gram matrix of each
        # group's input, from which both searches score every candidate on every token.
        clip = opts.clip and opts.quantize
        grouped = {g.names[0] for g in groups}
        stats = work.observe_inputs(sorted(set(feed.values())),
                                    lambda name: ChannelStats(gram=clip or name in grouped))
        smoothed, pending = {}, {}
        for g in groups:
            x_mean, gram = stats[g.names[0]].mean_abs, stats[g.names[0]].gram
            w_mean = weight_mean([m.weight for m in g.linears], weights)
            scales = torch.stack([awq_scale(x_mean, w_mean, k / opts.n_grid) for k in range(opts.n_grid)])

            def scored(part: slice, consumers=[m.weight for m in g.linears], scales=scales, gram=gram):
                loss, energy = candidate_losses(consumers, scales[part], weights, gram)
                return loss, energy.expand(loss.shape)

            loss, energy = spread(work.ranks, len(scales), scored)  # the candidates shared across ranks
            energy = float(energy[0].clamp_min(1e-30))
            best = int(loss.argmin())
            folded = apply_scale(work, g, scales[best], pending)
            for name in g.names:
                smoothed[name] = scales[best]
                # awq_loss / awq_rtn_loss: the chosen scale's output error, and the identity's.
                work.record(name, awq_ratio=best / opts.n_grid, awq_loss=float(loss[best]) / energy,
                            awq_rtn_loss=float(loss[0]) / energy, awq_folded=float(folded))
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
        rescaled: set[str] = set()
        readers = Counter(feed[name] for name, _ in targets)  # a Gram matrix is freed after its last reader
        for name, linear in targets:
            if name in pending:
                scale_columns(linear, pending[name])
            weight_ranges, clip_mean = None, 1.0
            key = feed[name]
            gram = stats[key].gram
            if opts.clip and gram is not None:
                if name in smoothed and key not in rescaled:  # gathered before smoothing; the layer now reads x / s
                    s = smoothed[name].to(gram.device)
                    with torch.inference_mode():  # in place (G was summed there): one for the group's readers
                        gram.div_(s.unsqueeze(1)).div_(s.unsqueeze(0))
                    rescaled.add(key)
                def clipped(rows: slice, w=linear.weight, gram=gram):
                    (lo, hi), mean = clip_ranges_gram(w[rows], gram, weights, opts.clip_grid, opts.max_shrink)
                    return lo, hi, torch.full(lo.shape[:1], mean, device=lo.device)

                lo, hi, means = spread(work.ranks, linear.out_features, clipped)  # the rows shared across ranks
                weight_ranges, clip_mean = (lo, hi), float(means.mean())
            readers[key] -= 1
            if not readers[key]:
                stats[key].gram = gram = None
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
