"""``gptq``: weights rounded column by column against each linear's input Hessian (Frantar et
al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For each target linear, ``H = 2/n Σ xᵀx`` is accumulated over every calibration token. The
weight is then rounded one input column at a time (in blocks of ``block_size`` with lazy
updates); each column's rounding error is spread over the columns not yet rounded through the
Cholesky factor of ``H⁻¹``, so the layer's *output* error is minimized rather than the weight's.

Group scales: each group's scale (and zero point) is taken from the weight's min/max when the
rounding reaches the group, after the earlier columns' errors have updated it. With
``act_order`` (columns in order of decreasing ``diag(H)``) they are fixed up front from the
original weight instead (static groups), so the scales stay contiguous and export as for RTN;
``range_search`` then picks each static scale among 0.6-1.5x its min/max by the rounding error
weighted by ``diag(H)`` (:func:`searched_ranges`). Every weight format of :mod:`qframe.numerics` works
(int2-8 symmetric or asymmetric, FP8, NVFP4 with the original weight's global scale, MXFP4).
Linears that read one input (q/k/v, gate/up) are rounded together, against one Hessian, and
share a per-tensor scale (FP8's range, NVFP4's global scale) as engines serve them fused.
On CUDA the column loop runs as a Triton kernel (:mod:`qframe_plugins.gptq_triton`).

With ``true_sequential`` the layer's linears are quantized in the order of the architecture's
smoothing groups (q/k/v, o, gate/up, down), each group's Hessians observed on inputs computed
with the groups before it already quantized. Activations are handled as by ``rtn``.

A Hessian that is not positive definite after dampening is retried with 10× the dampening a
few times; if it still fails the linear is rounded to nearest (figure ``gptq_fallback`` = 1).

Recipe::

    [[stage]]
    quantizer = "gptq"
    weights = { bits = 4, group_size = 128 }
    options = { block_size = 128, dampening = 0.01, act_order = true, true_sequential = true }
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qframe import QuantizerPlugin, formats, hookimpl, numerics
from qframe.calibrate import add_gram
from qframe.distributed import Ranks, spread
from qframe.errors import RecipeError
from qframe.expert_inputs import (ALL, ExpertCalibration, ExpertHessians, WeightInputs, calibrate_expert_inputs,
                                  expert_matrix, expert_weight_names, observe_experts)
from qframe.experts import OUT_IN, QuantExperts, expert_layouts, experts_error, is_fused_experts, num_experts
from qframe.pipeline import LayerWork, Quantizer, weight_error
from qframe.qlinear import QuantLinear
from qframe.scheme import QuantArgs
from qframe_plugins import gptq_triton
from qframe_plugins.rtn import check as rtn_check

# Failed Cholesky factorizations are retried with 10x the dampening this many times.
DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQOptions(ExpertCalibration):
    """``options`` of a gptq stage.

    ``block_size``: columns rounded between two lazy updates of the rest of the weight.
    ``dampening``: added to ``diag(H)`` as a fraction of its mean (numerical stability).
    ``act_order``: round columns in order of decreasing ``diag(H)`` (largest inputs first).
    ``true_sequential``: quantize the layer's linears group by group, each on inputs
    recomputed through the groups already quantized.
    ``range_search``: search each static group's (or channel's) scale before rounding
    (:func:`searched_ranges`, against ``diag(H)``); needs ``act_order`` for group scales.
    ``experts``, ``expert_min_tokens``: which tokens each fused expert's Hessians cover
    (:class:`qframe.expert_inputs.ExpertCalibration`).

    Example::

        >>> GPTQOptions(block_size=64).dampening
        0.01
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = False
    true_sequential: bool = True
    range_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise RecipeError("block_size", self.block_size, "expected a positive number of columns")
        if not 0 <= self.dampening < 1e3:  # also refuses NaN
            raise RecipeError("dampening", self.dampening, "expected a fraction of mean(diag(H)), >= 0, e.g. 0.01")


def check(stage) -> None:
    weights = stage.scheme.weights
    if weights is None:
        raise RecipeError("weights", None, "gptq quantizes weights; give a weights table such as { bits = 4 }")
    if weights.calibrator != "minmax":
        raise RecipeError("weights.calibrator", weights.calibrator,
                          "gptq fixes each group's scale from the original weight's min/max (options.range_search "
                          "then searches it against the Hessian); allowed: minmax")
    if stage.options.get("range_search"):
        if weights.granularity == "tensor":
            raise RecipeError("options.range_search", True, "searches per-group and per-channel weight scales; these "
                              "weights have one scale per tensor (fp8's shared_scale = \"search\" searches those)")
        if weights.granularity == "group" and not stage.options.get("act_order", False):
            raise RecipeError("options.range_search", True, "searches the static group scales that act_order = true "
                              "fixes up front; without act_order each group's scale is taken as the rounding reaches it")
    rtn_check(stage)


# Elements of inputs folded into a Hessian at once (a copy of at most 256 MiB in float32).
HESSIAN_CHUNK = 1 << 26
# The rows of a weight whose output energy w H wᵀ is computed at once (float32 temporaries).
ENERGY_ROWS = 4096


class Hessian:
    """Accumulates ``H = 2/n Σ xᵀx`` (float32) over the rows of every input it observes;
    rows holding NaN or inf are dropped and counted in ``dropped``. Batches are folded into a
    sum on the device without reading anything back (no host sync per batch) and in float32
    chunks of bounded size; ``matrix`` divides by the token count when read.

    Example::

        >>> h = Hessian(2, torch.device("cpu"))
        >>> h.observe(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))
        >>> h.matrix.tolist(), h.tokens, h.dropped
        ([[2.0, 0.0], [0.0, 0.0]], 1, 1)
    """

    def __init__(self, columns: int, device: torch.device):
        self.sum: torch.Tensor | None = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._kept = torch.zeros((), dtype=torch.long, device=device)
        self._rows = 0

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        self._rows += rows.shape[0]
        for part in rows.split(max(1, HESSIAN_CHUNK // rows.shape[1])):
            part = part.to(self.sum.device)
            finite = torch.isfinite(part).all(dim=1, keepdim=True)
            add_gram(self.sum, part.masked_fill(~finite, 0.0))  # a copy in the rows' own dtype
            self._kept += finite.sum()

    def combine(self, ranks) -> None:
        ranks.reduce(self, sum="sum", _kept="sum", _rows="sum")

    @property
    def tokens(self) -> int:
        return int(self._kept)

    @property
    def dropped(self) -> int:
        return self._rows - self.tokens

    @property
    def matrix(self) -> torch.Tensor:
        """``H``, a new tensor (``2/n`` times the sum; a running mean would rescale it per batch)."""
        return self.sum * (2.0 / max(self.tokens, 1))

    def take(self) -> torch.Tensor:
        """``H``, made in place of the sum, which the Hessian gives up (GPTQ consumes it)."""
        matrix, self.sum = self.sum.mul_(2.0 / max(self.tokens, 1)), None
        return matrix


@dataclass
class GPTQResult:
    """The rounded weight (float32, on the grid of ``ranges``/``global_scale``) and figures."""

    weight: torch.Tensor
    ranges: tuple[torch.Tensor, torch.Tensor]
    global_scale: torch.Tensor | None
    loss: float  # Σ err²/d² over tr(W H Wᵀ): about the relative output error on the calibration inputs
    damp: float  # the dampening fraction that factorized (NaN on fallback)
    fallback: bool  # rounded to nearest: no dampening made H positive definite


@dataclass
class BatchedGPTQ:
    """:func:`gptq_batched`'s result: ``weight [B, out, in]`` (float32), ``ranges`` ``[B, out,
    groups]`` (``[B, 1, 1]`` per tensor), NVFP4's ``global_scale [B, 1, 1]``, per matrix
    ``loss``, ``damp`` and ``fallback`` ``[B]``, and per row the summed ``Σ err²/d²`` and
    ``w H wᵀ`` (``row_error``, ``row_energy`` ``[B, out]``: a block of rows' own relative loss)."""

    weight: torch.Tensor
    ranges: tuple[torch.Tensor, torch.Tensor]
    global_scale: torch.Tensor | None
    loss: torch.Tensor
    damp: torch.Tensor
    fallback: torch.Tensor
    row_error: torch.Tensor
    row_energy: torch.Tensor


def _per_column(t: torch.Tensor, args: QuantArgs, shape: torch.Size) -> torch.Tensor:
    """Scales (or zeros) ``[B, rows, groups]`` spread to one per weight element ``[B, out, in]``."""
    if args.granularity == "group":
        t = t.repeat_interleave(args.group_size, dim=-1)[..., : shape[-1]]
    return t.expand(shape).contiguous()


def _inverse_factor(reversed_h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The upper Cholesky factors ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (``UᵀU`` is the
    inverse) of a batch ``[B, n, n]``, the dampening used and which failed: a factorization
    that fails is retried with 10x the dampening; one that never succeeds gets ``U = I``
    (rounding to nearest: no error is spread) and ``damp = NaN``.

    It takes ``J·H·J``, ``H`` with rows and columns reversed, because then
    ``U = J·L⁻¹·J`` for the lower Cholesky factor ``L`` of ``J·H·J``, and ``L⁻¹`` can be
    solved for in place: no more than two ``[B, in, in]`` tensors exist at any moment (for a
    14336-wide down_proj each matrix is 784 MiB). ``reversed_h`` is overwritten with ``U``.
    """
    h = reversed_h
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    mean_diag = diagonal.mean(-1)
    damp = torch.full_like(mean_diag, dampening, dtype=torch.float64)  # reported exactly as given
    added = torch.zeros_like(damp)
    for attempt in range(DAMP_RETRIES + 1):
        diagonal.add_(((damp - added) * mean_diag).unsqueeze(-1).to(h.dtype))
        added = damp.clone()
        lower, info = torch.linalg.cholesky_ex(h)
        failed = info != 0
        if attempt == DAMP_RETRIES or not bool(failed.any()):
            break
        del lower
        damp = torch.where(failed, (damp * 10).clamp_min(1e-4), damp)  # a zero dampening would never grow
    eye = torch.eye(h.shape[-1], device=h.device, dtype=h.dtype)
    lower[failed] = eye
    h.zero_().diagonal(dim1=-2, dim2=-1).fill_(1.0)
    torch.linalg.solve_triangular(lower, h, upper=False, out=h)  # h = L⁻¹
    del lower
    h.copy_(h.flip((-2, -1)))  # U, in H's memory: a caller's reference to H holds nothing more
    upper = h
    failed = failed | ~torch.isfinite(upper).flatten(1).all(-1)
    upper[failed] = eye
    return upper, torch.where(failed, torch.full_like(damp, float("nan")), damp), failed


def _static_ranges(weight: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max ranges of each matrix of ``weight [B, out, in]``: ``[B, out, groups]``, or
    ``[B, 1, 1]`` per tensor."""
    b, out, columns = weight.shape
    if args.granularity == "tensor":
        finite = numerics._finite(weight)
        return finite.amin((1, 2)).view(b, 1, 1), finite.amax((1, 2)).view(b, 1, 1)
    lo, hi = numerics.minmax_ranges(weight.reshape(b * out, columns), args)
    return lo.view(b, out, -1), hi.view(b, out, -1)


# range_search's candidates: each group's min/max scaled by 0.6, 0.625, ..., 1.5. Below 1 clips
# the group's extremes; above 1 widens the step (for NVFP4, a larger E4M3 block scale: as
# modelopt's "4/6", its largest value on E2M1's 4 instead of 6, so that more values round well).
SEARCH_RATIOS = tuple(round(0.6 + 0.025 * i, 3) for i in range(37))
# Weight elements scored at once by the search (its float32 temporaries: a few times 64 MiB).
SEARCH_ELEMENTS = 1 << 24


def searched_ranges(weight: torch.Tensor, importance: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    args: QuantArgs, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (or channel's) range ``(r lo, r hi)`` for the ratio ``r`` in
    ``SEARCH_RATIOS`` whose rounding of ``weight [B, out, in]`` has the least error weighted by
    ``importance [B, in]`` (``diag(H)``: each input channel's energy), as the format stores the
    scale (E4M3 block scales under ``global_scale`` for NVFP4); on a tie, the wider range.
    ``lo``/``hi``: ``[B, out, groups]`` min/max ranges. Rows are scored in chunks of
    ``SEARCH_ELEMENTS`` weights, so the temporaries stay a few times 64 MiB.

    Example::

        >>> w = torch.tensor([[[0.1, 0.2, 0.3, 4.0]]])       # one outlier in a group of 4
        >>> args = QuantArgs(bits=4, granularity="group", group_size=4)
        >>> lo, hi = _static_ranges(w, args)
        >>> lo2, hi2 = searched_ranges(w, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), lo, hi, args)
        >>> float(hi2) < float(hi)            # the outlier's input is never active: it is clipped
        True
    """
    b, out, columns = weight.shape
    step = max(1, SEARCH_ELEMENTS // (b * columns))
    chosen = []
    for rows in range(0, out, step):
        part = slice(rows, rows + step)
        w, low, high = weight[:, part], lo[:, part], hi[:, part]
        glob = global_scale if global_scale is None or global_scale.shape[1] == 1 else global_scale[:, part]
        best, best_ratio = None, None
        for r in sorted(SEARCH_RATIOS, reverse=True):  # widest first: a later one must be strictly better
            scale, zero, _ = numerics.scale_parts(low * r, high * r, args, glob)
            scales = _per_column(numerics.effective_scale(scale, glob, args), args, w.shape)
            zeros = None if zero is None else _per_column(zero, args, w.shape)
            error = (numerics.fake_quantize(w, scales, zeros, args) - w).square_().mul_(importance.unsqueeze(1))
            error = numerics.grouped(error.reshape(-1, columns), args).sum(-1).view_as(low)
            if best is None:
                best, best_ratio = error, torch.full_like(error, r)
            else:
                better = error < best
                best, best_ratio = torch.where(better, error, best), best_ratio.masked_fill(better, r)
        chosen.append(best_ratio)
    ratio = torch.cat(chosen, 1)
    return lo * ratio, hi * ratio


def _gather_columns(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return t.gather(-1, order.unsqueeze(1).expand_as(t))


def gptq_batched(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, *, block_size: int = 128,
                 dampening: float = 0.01, act_order: bool = False,
                 range_search: bool = False, ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
                 global_scale: torch.Tensor | None = None) -> BatchedGPTQ:
    """GPTQ on a batch of matrices at once: round each ``w[b]`` ``[out, in]`` against its own
    Hessian ``h[b]`` (``h [B, in, in]``, consumed: overwritten and freed), every step of the
    column loop a batched operation. Static ``ranges`` and ``global_scale`` (broadcastable to
    ``[B, out, groups]`` and ``[B, out, 1]``) replace each matrix's own min/max and NVFP4
    global scale, e.g. one range per expert over rows of many experts sharing a Hessian.
    Otherwise as :func:`gptq_quantize`, which is this with ``B = 1``.

    Example::

        >>> x = torch.randn(3, 64, 16)
        >>> r = gptq_batched(torch.randn(3, 4, 16), 2 * x.transpose(1, 2) @ x / 64, QuantArgs(bits=4))
        >>> tuple(r.weight.shape), r.fallback.tolist()
        ((3, 4, 16), [False, False, False])
    """
    b, out, columns = w.shape
    device = w.device
    h = h.to(device, torch.float32)
    # An input channel that is always zero carries no information: its weights can be dropped.
    dead = h.diagonal(dim1=-2, dim2=-1) == 0  # [B, in]
    h.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    row_energy = torch.cat([(torch.bmm(alive, h) * alive).sum(2)  # [B, out], in row chunks of bounded size
                            for alive in (rows.float().masked_fill(dead.unsqueeze(1), 0.0)
                                          for rows in w.detach().split(ENERGY_ROWS, dim=1))], dim=1)
    order = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True) if act_order else None
    search = range_search and ranges is None and (act_order or args.granularity == "channel")
    importance = h.diagonal(dim1=-2, dim2=-1).masked_fill(dead, 0.0) if search else None  # H is overwritten below
    # Columns in reverse order of rounding (see _inverse_factor), permuted within H's memory:
    # two [B, in, in] matrices at most, also while a caller still holds H.
    # act_order rounds the columns with the largest inputs first; each keeps its own group's scale.
    backwards = order.flip(-1) if act_order else torch.arange(columns - 1, -1, -1, device=device).expand(b, -1)
    rows_permuted = h.gather(1, backwards.unsqueeze(-1).expand_as(h))
    torch.gather(rows_permuted, 2, backwards.unsqueeze(1).expand_as(h), out=h)
    del rows_permuted
    # Factorize first: float32 copies of the weight wait until H has become its factor.
    upper, damp, fallback = _inverse_factor(h, dampening)
    del h  # overwritten by the factorization

    weight = w.detach().to(torch.float32, copy=True)
    # Static scales from the original weight: rounding the result again gives the same codes.
    if global_scale is None:
        global_scale = formats.of(args).global_scale(numerics._finite(weight).abs().amax((1, 2)))
        global_scale = None if global_scale is None else global_scale.view(b, 1, 1)
    lo, hi = ranges if ranges is not None else _static_ranges(weight, args)
    if importance is not None:
        lo, hi = searched_ranges(weight, importance, lo, hi, args, global_scale)
    scale, zero, global_scale = numerics.scale_parts(lo, hi, args, global_scale)
    scales = _per_column(numerics.effective_scale(scale, global_scale, args), args, weight.shape)
    zeros = None if zero is None else _per_column(zero, args, weight.shape)
    weight.masked_fill_(dead.unsqueeze(1), 0.0)
    if act_order:
        weight, scales = _gather_columns(weight, order), _gather_columns(scales, order)
        zeros = None if zeros is None else _gather_columns(zeros, order)
    dynamic = not act_order and args.granularity == "group" and ranges is None
    if dynamic:
        lo, hi = lo.clone(), hi.clone()
    row_error = torch.zeros(b, out, device=device)
    quantized = weight  # a finished block's columns are dead: their rounded values go in their place
    grid = gptq_triton.kernel_grid(formats.of(args)) if gptq_triton.available(device) else None

    def new_group(block: torch.Tensor, i: int, end: int) -> None:
        """Scale (and zero) of the group starting at column ``i`` of ``block`` (which ends at
        column ``end`` of the weight), from its columns as the earlier errors updated them:
        those left in the block, then the weight's next ones."""
        c = end - block.shape[-1] + i
        g, size = c // args.group_size, min(args.group_size, columns - c)
        beyond = max(0, size - (block.shape[-1] - i))
        current = torch.cat([block[..., i:i + size], weight[..., end:end + beyond]], -1)
        lo[..., g], hi[..., g] = current.amin(-1), current.amax(-1)
        s_g, z_g, _ = numerics.scale_parts(lo[..., g:g + 1], hi[..., g:g + 1], args, global_scale)
        scales[..., c:c + size] = numerics.effective_scale(s_g, global_scale, args)
        if zeros is not None:
            zeros[..., c:c + size] = z_g

    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[..., start:end].clone(memory_format=torch.contiguous_format)
        errors = torch.zeros_like(block)
        u = upper[:, start:end, start:end]
        if grid is not None:  # one kernel per block; with dynamic group scales, one per group in it
            u, rounded = u.contiguous(), torch.zeros_like(block)
            starts = (c - start for c in range(start, end) if dynamic and c % args.group_size == 0)
            cuts = sorted({0, end - start, *starts})
            for first, last in zip(cuts, cuts[1:]):
                if dynamic and (start + first) % args.group_size == 0:
                    new_group(block, first, end)
                gptq_triton.round_block(block, u, scales[..., start:end].contiguous(),
                                        None if zeros is None else zeros[..., start:end].contiguous(),
                                        rounded, errors, row_error, first, last, grid)
            quantized[..., start:end] = rounded
        else:
            for i in range(end - start):
                c = start + i
                if dynamic and c % args.group_size == 0:  # a new group: its scale from the updated weight
                    new_group(block, i, end)
                col = block[..., i]
                q = numerics.fake_quantize(col, scales[..., c], None if zeros is None else zeros[..., c], args)
                quantized[..., c] = q
                err = (col - q) / u[:, i, i].unsqueeze(-1)
                row_error += err.square()
                block[..., i:] -= err.unsqueeze(-1) * u[:, i, i:].unsqueeze(1)
                errors[..., i] = err
        weight[..., end:] -= torch.bmm(errors, upper[:, start:end, end:])  # the lazy update of later columns
    if act_order:
        quantized = _gather_columns(quantized, torch.argsort(order, dim=-1))
    loss = torch.where(fallback, float("nan"), row_error.sum(1) / row_energy.sum(1).clamp_min(1e-30))
    return BatchedGPTQ(quantized, (lo, hi), global_scale, loss, damp, fallback, row_error, row_energy)


def _own_matrix(h: torch.Tensor | Hessian, device: torch.device) -> torch.Tensor:
    """A float32 ``H`` on ``device`` that GPTQ may overwrite: a Hessian object's own (it is
    consumed), or a copy of a caller's tensor (left as it was)."""
    if isinstance(h, Hessian):
        return h.take().to(device, torch.float32)
    return h.to(device, torch.float32, copy=True)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor | Hessian, args: QuantArgs, *, block_size: int = 128,
                  dampening: float = 0.01, act_order: bool = False, range_search: bool = False) -> GPTQResult:
    """Round ``w`` ``[out, in]`` to ``args``'s grid minimizing ``tr(ΔW H ΔWᵀ)`` for the input
    Hessian ``h`` ``[in, in]``, on ``w``'s device. A :class:`Hessian` given instead of its
    matrix is consumed (its matrix is taken and freed as soon as it is factorized), which
    keeps the peak memory of wide layers at two ``[in, in]`` matrices.

    Group scales: with ``act_order`` they are fixed up front from the original weight (static
    groups, contiguous for export); without it each group's scale is taken when the rounding
    reaches the group, from the weight as the earlier columns' errors have updated it (as the
    GPTQ paper does), which fits the scale to what is actually rounded.

    Example::

        >>> x = torch.randn(256, 16)
        >>> r = gptq_quantize(torch.randn(4, 16), 2 * x.T @ x / 256, QuantArgs(bits=4))
        >>> r.weight.shape, r.fallback
        (torch.Size([4, 16]), False)
    """
    r = gptq_batched(w.unsqueeze(0), _own_matrix(h, w.device).unsqueeze(0), args, block_size=block_size,
                     dampening=dampening, act_order=act_order, range_search=range_search)
    fallback = bool(r.fallback[0])
    if fallback:
        warnings.warn("gptq: the Hessian is not positive definite even with strong dampening; rounding to nearest")
    lo, hi = r.ranges
    return GPTQResult(r.weight[0], (lo[0], hi[0]), None if r.global_scale is None else r.global_scale.reshape(()),
                      float(r.loss[0]), float(r.damp[0]), fallback)


def gptq_shared(weights: list[torch.Tensor], h: torch.Tensor | Hessian, args: QuantArgs, *, block_size: int = 128,
                dampening: float = 0.01, act_order: bool = False, range_search: bool = False,
                joint: bool = True, ranks: Ranks | None = None) -> list[GPTQResult]:
    """:func:`gptq_quantize` for linears that read one input (q/k/v, gate/up), against their
    one Hessian: their rows are rounded as one matrix. GPTQ rounds rows independently given
    ``H``, so each linear's result is what rounding it alone gives, for one factorization and
    one column loop instead of one per linear. A per-tensor scale (a per-tensor range, NVFP4's
    global scale) is the linears' ``joint`` one, as engines serve them fused (one scale for
    TensorRT-LLM's ``qkv``, vLLM's ``gate_up_proj``): the joint range, the largest global
    scale; with ``joint=False`` each keeps its own.

    With ``ranks`` (:mod:`qframe.distributed`; ``h`` is then the same on every rank), each rank
    rounds its share of the rows and every rank gets all of them: the linears' rounding is
    spread evenly over the ranks, whatever their sizes.

    Example::

        >>> x = torch.randn(256, 16); h = 2 * x.T @ x / 256
        >>> q, k = torch.randn(4, 16), torch.randn(2, 16)
        >>> both = gptq_shared([q, k], h, QuantArgs(bits=4))
        >>> torch.equal(both[1].weight, gptq_quantize(k, h, QuantArgs(bits=4)).weight)
        True
    """
    if len(weights) == 1 and ranks is None:  # a Hessian handed on whole is consumed there, not copied
        return [gptq_quantize(weights[0], h, args, block_size=block_size, dampening=dampening, act_order=act_order,
                              range_search=range_search)]
    sizes = [w.shape[0] for w in weights]
    floats = [w.detach().float().unsqueeze(0) for w in weights]
    ranges = None
    if args.granularity == "tensor":  # per row, the linear's range (or the joint one)
        per = [_static_ranges(w, args) for w in floats]
        if joint:
            per = [(torch.stack([r[0] for r in per]).amin(0), torch.stack([r[1] for r in per]).amax(0))] * len(per)
        ranges = tuple(torch.cat([r[i].expand(1, n, 1) for r, n in zip(per, sizes)], 1) for i in (0, 1))
    scales = [formats.of(args).global_scale(numerics._finite(w).abs().amax((1, 2))) for w in floats]
    if joint and scales[0] is not None:
        scales = [torch.stack(scales).amax(0)] * len(scales)
    global_scale = None if scales[0] is None else torch.cat(
        [g.reshape(1, 1, 1).expand(1, n, 1) for g, n in zip(scales, sizes)], 1)
    del floats
    whole = torch.cat([w.detach() for w in weights]).unsqueeze(0)
    matrix = _own_matrix(h, weights[0].device).unsqueeze(0)
    options = dict(block_size=block_size, dampening=dampening, act_order=act_order, range_search=range_search)
    if ranks is not None and whole.shape[1] >= ranks.size:
        r = _rows_across(ranks, whole, matrix, args, ranges, global_scale, **options)
    else:
        r = gptq_batched(whole, matrix, args, ranges=ranges, global_scale=global_scale, **options)
    fallback = bool(r.fallback[0])
    if fallback:
        warnings.warn("gptq: the Hessian is not positive definite even with strong dampening; rounding to nearest")
    results, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        one = slice(start, start + 1) if args.granularity == "tensor" else rows  # the linear's own range
        lo, hi = (t[0, one] for t in r.ranges)
        loss = float("nan") if fallback else float(r.row_error[0, rows].sum() / r.row_energy[0, rows].sum().clamp_min(1e-30))
        glob = None if r.global_scale is None else r.global_scale[0, start].reshape(())
        results.append(GPTQResult(r.weight[0, rows], (lo, hi), glob, loss, float(r.damp[0]), fallback))
        start += n
    return results


def _rows_across(ranks: Ranks, w: torch.Tensor, h: torch.Tensor, args: QuantArgs,
                 ranges: tuple[torch.Tensor, torch.Tensor] | None, global_scale: torch.Tensor | None,
                 **options) -> BatchedGPTQ:
    """:func:`gptq_batched` on ``w [1, out, in]`` with this rank rounding its share of the rows
    and every rank getting all of them (rows are rounded independently given ``h``). Per-row
    static ``ranges``/``global_scale`` (``[1, out, ·]``) are cut like the rows."""
    shares = ranks.split(w.shape[1])
    mine = slice(shares[ranks.rank].start, shares[ranks.rank].stop)
    part = gptq_batched(w[:, mine], h, args, ranges=None if ranges is None else tuple(t[:, mine] for t in ranges),
                        global_scale=None if global_scale is None else global_scale[:, mine], **options)
    counts = [len(s) for s in shares]
    gathered = [ranks.gather_rows(t, counts, dim=1) for t in (part.weight, *part.ranges, part.row_error, part.row_energy)]
    weight, lo, hi, row_error, row_energy = gathered
    glob = part.global_scale
    if glob is not None and glob.shape[1] > 1:
        glob = ranks.gather_rows(glob, counts, dim=1)
    loss = torch.where(part.fallback, float("nan"), row_error.sum(1) / row_energy.sum(1).clamp_min(1e-30))
    return BatchedGPTQ(weight, (lo, hi), glob, loss, part.damp, part.fallback, row_error, row_energy)


def feed_owners(ranks: Ranks | None, readers: dict[str, list[tuple[str, nn.Linear]]]) -> dict[str, int] | None:
    """Which rank rounds each input's linears when one group of GPTQ has several inputs
    (``true_sequential = false``: every linear of the layer at once) and there are ranks: whole
    inputs spread over the ranks by their cost (columns times columns plus rows: the column
    loop and its updates), largest first onto the least loaded rank, so that the ranks' column
    loops run at once. ``None`` for one input (its rows are shared instead) or one process.

    Example::

        >>> from qframe.distributed import Ranks
        >>> feeds = {"q": [("q", nn.Linear(8, 8))], "down": [("down", nn.Linear(32, 8))], "o": [("o", nn.Linear(8, 8))]}
        >>> feed_owners(Ranks(0, 2, torch.device("cpu")), feeds)
        {'down': 0, 'q': 1, 'o': 1}
    """
    if ranks is None or len(readers) < 2:
        return None
    cost = {feed: members[0][1].in_features * (members[0][1].in_features + sum(m.out_features for _, m in members))
            for feed, members in readers.items() if members}
    if len(cost) < 2:
        return None
    loads, owners = [0] * ranks.size, {}
    for feed in sorted(cost, key=lambda f: -cost[f]):  # stable: ties keep the architecture's order
        owner = loads.index(min(loads))
        owners[feed], loads[owner] = owner, loads[owner] + cost[feed]
    return owners


def share_results(ranks: Ranks, owner: int, results: list[GPTQResult] | None, device: torch.device) -> list[GPTQResult]:
    """Rank ``owner``'s GPTQ results for one input's linears, on every rank: one broadcast of
    their shapes and figures, one of their tensors (float32, packed)."""
    if ranks.rank == owner:
        meta = [(tuple(r.weight.shape), tuple(r.ranges[0].shape), r.global_scale is not None, r.loss, r.damp,
                 r.fallback) for r in results]
        ranks.broadcast_object(meta, owner)
        tensors = [t for r in results for t in (r.weight, *r.ranges, r.global_scale) if t is not None]
        ranks.broadcast(torch.cat([t.reshape(-1).float() for t in tensors]), owner)
        return results
    meta = ranks.broadcast_object(None, owner)
    sizes = [(w, rng, rng, () if glob else None) for w, rng, glob, *_ in meta]
    total = sum(math.prod(s) for shapes in sizes for s in shapes if s is not None)
    flat, at, shared = ranks.broadcast(torch.empty(total, device=device), owner), 0, []
    for shapes, (_, _, _, loss, damp, fallback) in zip(sizes, meta):
        parts = []
        for shape in shapes:
            if shape is None:
                parts.append(None)
                continue
            parts.append(flat[at:at + math.prod(shape)].view(shape))
            at += math.prod(shape)
        weight, lo, hi, glob = parts
        shared.append(GPTQResult(weight, (lo, hi), glob, loss, damp, fallback))
    return shared


def _smoothing_groups(work: LayerWork, linears: list[tuple[str, nn.Linear]]
                      ) -> tuple[list[list[tuple[str, nn.Linear]]], dict[str, nn.Linear]]:
    """``linears`` by the architecture's smoothing groups, in its order (a group's consumers
    read one tensor, its producer's output), and those in none."""
    left = dict(linears)
    groups = []
    for smoothing in (work.arch.smoothing_groups if work.arch is not None else ()):
        names = [f"{work.prefix}.{c}" for c in smoothing.consumers if f"{work.prefix}.{c}" in left]
        if names:
            groups.append([(n, left.pop(n)) for n in names])
    return groups, left


def _shared_inputs(work: LayerWork, group: list[tuple[str, nn.Linear]]) -> list[list[tuple[str, nn.Linear]]]:
    """``group``'s linears by the input they read: a smoothing group's consumers read one
    tensor; any other linear reads its own."""
    shared, left = _smoothing_groups(work, group)
    return shared + [[item] for item in left.items()]


def _groups(work: LayerWork, targets: list[tuple[str, nn.Linear]], sequential: bool) -> list[list[tuple[str, nn.Linear]]]:
    """Targets in the order true-sequential quantization takes them; the rest come last."""
    if not sequential or work.arch is None or not work.arch.smoothing_groups:
        return [targets]
    groups, left = _smoothing_groups(work, targets)
    return groups + ([list(left.items())] if left else [])


def _expert_ranges(w: torch.Tensor, args: QuantArgs) -> tuple[tuple[torch.Tensor, torch.Tensor] | None,
                                                             torch.Tensor | None]:
    """For experts sharing one Hessian, rounded as the rows of one matrix ``[1, E·out, in]``:
    each expert's own per-tensor range and NVFP4 global scale spread over its rows (per channel
    and group, each row's range is its own anyway: ``None``)."""
    e, out, _ = w.shape
    ranges = None
    if args.granularity == "tensor":
        ranges = tuple(r.repeat_interleave(out, 0).view(1, e * out, 1) for r in _static_ranges(w, args))
    global_scale = formats.of(args).global_scale(numerics._finite(w.float()).abs().amax((1, 2)))
    if global_scale is not None:
        global_scale = global_scale.repeat_interleave(out).view(1, e * out, 1)
    return ranges, global_scale


@dataclass
class ExpertsGPTQ:
    """One fused weight of every expert after GPTQ: ``weight [E, out, in]`` (float32),
    ``ranges`` ``[E, out, groups]`` (``[E, 1, 1]`` per tensor), ``global_scale [E]``, the
    relative loss (mean over experts; ``expert_loss [E]`` each one's, NaN for a starved one), and
    the experts rounded to nearest: ``starved`` (too few routed tokens) and ``fallback`` (no
    dampening factorized their Hessian)."""

    weight: torch.Tensor
    ranges: tuple[torch.Tensor, torch.Tensor]
    global_scale: torch.Tensor | None
    loss: float
    starved: list[int]
    fallback: list[int]
    expert_loss: torch.Tensor | None = None


# Weight elements rounded in one batched GPTQ call: bounds its float32 copies of the weight, its
# scales and its blocks (Qwen3-30B-A3B's gate_up_proj is 403 M elements) at a few GiB.
EXPERT_CHUNK_ELEMENTS = 1 << 28


def gptq_experts(w: torch.Tensor, hessians: ExpertHessians, args: QuantArgs, *, min_tokens: int = 1,
                 **options) -> ExpertsGPTQ:
    """GPTQ on every expert of one fused weight ``w [E, out, in]`` at once (in chunks of experts
    of at most ``EXPERT_CHUNK_ELEMENTS`` weights). Experts sharing one Hessian (every token
    through every expert) are rounded as the rows of one matrix; otherwise each against its own,
    batched (:func:`gptq_batched`). An expert with fewer than ``min_tokens`` tokens is rounded to
    nearest on its min/max ranges. ``options`` go to :func:`gptq_batched` (``block_size``,
    ``dampening``, ``act_order``, ``range_search``).

    Example::

        >>> h = ExpertHessians(3, 16, shared=True, device=torch.device("cpu"))
        >>> h.observe(torch.randn(64, 16), experts=slice(None), routed=None)
        >>> r = gptq_experts(torch.randn(3, 8, 16), h, QuantArgs(bits=4, granularity="group", group_size=8))
        >>> tuple(r.weight.shape), tuple(r.ranges[0].shape), r.starved
        ((3, 8, 16), (3, 8, 2), [])
    """
    e, out, columns = w.shape
    matrices = hessians.matrices()
    hessians.sums = None  # consumed: each chunk's matrices are factorized in place
    fed = hessians.tokens >= min_tokens
    if hessians.shared and not bool(fed[0]):
        matrices = torch.eye(columns, device=w.device).unsqueeze(0)  # no data: round to nearest
    elif not hessians.shared:
        # Experts without enough data get H = I: GPTQ then spreads no error, which is rounding to nearest.
        matrices[~fed] = torch.eye(columns, device=matrices.device)
    step = max(1, EXPERT_CHUNK_ELEMENTS // max(1, out * columns))
    parts = []
    for i in range(0, e, step):
        chunk = slice(i, min(i + step, e))
        count = chunk.stop - chunk.start
        if hessians.shared:
            ranges, global_scale = _expert_ranges(w[chunk], args)
            h = matrices if chunk.stop == e and i == 0 else matrices.clone()
            r = gptq_batched(w[chunk].reshape(1, count * out, columns), h, args, ranges=ranges,
                             global_scale=global_scale, **options)
            lo, hi = (t.view(count, out, -1)[:, :1] if args.granularity == "tensor" else t.view(count, out, -1)
                      for t in r.ranges)
            glob = None if r.global_scale is None else r.global_scale.view(count, out)[:, 0]
            parts.append((r.weight.view(count, out, columns), lo, hi, glob, r.loss.expand(count),
                          r.fallback.expand(count)))
        else:
            r = gptq_batched(w[chunk], matrices[chunk], args, **options)
            parts.append((r.weight, *r.ranges, None if r.global_scale is None else r.global_scale.view(count),
                          r.loss, r.fallback))
    weight, lo, hi, glob, loss, fallback = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
    fed = fed.expand(e).to(loss.device) if hessians.shared else fed.to(loss.device)
    starved = (~fed).nonzero().flatten().tolist()
    fallback = (fallback & fed).nonzero().flatten().tolist()
    expert_loss = torch.where(fed, loss.nan_to_num(), float("nan"))
    loss = loss[fed]
    return ExpertsGPTQ(weight, (lo, hi), glob, float(loss.nan_to_num().mean()) if loss.numel() else float("nan"),
                       starved, fallback, expert_loss)


def experts_across(ranks: Ranks | None, w: torch.Tensor, hessians: ExpertHessians, args: QuantArgs,
                   **options) -> ExpertsGPTQ:
    """:func:`gptq_experts` with the experts shared across ``ranks`` (each rounds its share of
    them against their Hessians, combined over every rank's tokens) and every rank getting all
    of them; one process, or fewer experts than ranks, rounds all.

    Example::

        >>> h = ExpertHessians(2, 8, shared=True, device=torch.device("cpu"))
        >>> h.observe(torch.randn(32, 8), experts=slice(None), routed=None)
        >>> experts_across(None, torch.randn(2, 4, 8), h, QuantArgs(bits=4)).weight.shape
        torch.Size([2, 4, 8])
    """
    if ranks is None or w.shape[0] < ranks.size:
        return gptq_experts(w, hessians, args, **options)
    total = w.shape[0]

    def rounded(experts: slice):
        r = gptq_experts(w[experts], hessians.subset(experts), args, **options)
        count = experts.stop - experts.start
        flags = torch.zeros(count, 2, device=w.device)
        flags[r.starved, 0], flags[r.fallback, 1] = 1.0, 1.0
        glob = r.global_scale if r.global_scale is not None else torch.zeros(count, device=w.device)
        return r.weight, r.ranges[0], r.ranges[1], glob.reshape(count), r.expert_loss.to(w.device), flags

    weight, lo, hi, glob, expert_loss, flags = spread(ranks, total, rounded)
    fed = ~torch.isnan(expert_loss)
    loss = expert_loss[fed]
    has_global = formats.of(args).has_global_scale
    return ExpertsGPTQ(weight, (lo, hi), glob if has_global else None,
                       float(loss.mean()) if loss.numel() else float("nan"),
                       flags[:, 0].nonzero().flatten().tolist(), flags[:, 1].nonzero().flatten().tolist(), expert_loss)


def _starved_warning(name: str, starved: list[int], experts: int, min_tokens: int) -> str:
    shown = ", ".join(map(str, starved[:8])) + (f" and {len(starved) - 8} more" if len(starved) > 8 else "")
    return (f"{name}: expert{'s' if len(starved) > 1 else ''} {shown} (of {experts}) saw fewer than {min_tokens} "
            "routed calibration tokens (experts = \"routed\") and were rounded to nearest on their weight ranges; "
            "calibrate on more tokens, or use experts = \"all\" (the default) so that every token reaches every expert")


class GPTQ(Quantizer):
    handles_experts = True

    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True  # the Hessians come from data

    def working_set(self, layer: nn.Module, batch_tokens: int) -> int:
        """The larger of observing (a forward and the widest Hessian, float32) and rounding (the
        widest Hessian and its factor, three float32 copies of the largest weight, twice for
        linears rounded together); fused experts hold one Hessian per expert."""
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        widest = max((m.in_features for m in linears), default=0)
        largest = max((m.weight.numel() for m in linears), default=0)
        experts = max((num_experts(m) * max(p.shape[1:]) ** 2 for m in layer.modules() if is_fused_experts(m)
                       for p in m.parameters(recurse=False) if p.dim() == 3), default=0)
        hessians = 4 * max(widest**2, experts)
        return max(super().working_set(layer, batch_tokens) + hessians, 2 * hessians + 3 * 4 * 2 * largest)

    def quantize_layer(self, work: LayerWork, targets: list[tuple[str, nn.Module]]) -> None:
        experts = [(n, m) for n, m in targets if is_fused_experts(m)]
        self._quantize_linears(work, [(n, m) for n, m in targets if not is_fused_experts(m)])
        for name, module in experts:  # after the linears: their inputs come through the quantized attention
            self._quantize_experts(work, name, module)

    def _quantize_experts(self, work: LayerWork, name: str, module: nn.Module) -> None:
        """Each fused weight in turn (``gate_up_proj``, then ``down_proj`` on hidden activations
        computed through the rounded ``gate_up_proj``): Hessians per expert, GPTQ on all
        experts at once; then the module becomes :class:`QuantExperts` holding exactly that."""
        weights, opts = self.scheme.weights, self.options
        started = time.perf_counter()
        layouts = expert_layouts(module)
        originals = {n: module._parameters[n].detach().clone() for n in layouts}
        total = num_experts(module)
        results: dict[str, ExpertsGPTQ] = {}
        for weight_name in expert_weight_names(module):
            matrix = expert_matrix(module, weight_name)
            hessians = ExpertHessians(total, matrix.shape[2], device=work.device,
                                      shared=opts.experts == ALL and weight_name == expert_weight_names(module)[0])
            observe_experts(work, [name], lambda _n: WeightInputs(module, weight_name, hessians), opts.experts)
            with torch.no_grad():
                result = experts_across(work.ranks, matrix, hessians, weights, min_tokens=opts.expert_min_tokens,
                                        block_size=opts.block_size, dampening=opts.dampening, act_order=opts.act_order,
                                        range_search=opts.range_search)
                # The next weight's inputs are computed through this one as it will be served.
                matrix.copy_(result.weight.to(matrix.dtype))
            results[weight_name] = result
        acts = self.scheme.activations
        quantized = QuantExperts.convert(module, weights, acts, layouts)
        for weight_name, result in results.items():
            rounded = result.weight if layouts[weight_name] == OUT_IN else result.weight.transpose(1, 2)
            quantized.set_weight(weight_name, rounded, ranges=result.ranges, global_scale=result.global_scale)
        if acts is not None and not acts.dynamic:  # as for linears: input scales last, on the rounded weights
            calibrate_expert_inputs(work, name, quantized, lambda: self.calibrator(acts), opts.experts)
        starved = sorted({e for r in results.values() for e in r.starved})
        fallback = sorted({e for r in results.values() for e in r.fallback})
        if starved:
            warnings.warn(_starved_warning(name, starved, total, opts.expert_min_tokens))
        work.record(name, weight_error=experts_error(originals, quantized),
                    gptq_loss=sum(r.loss for r in results.values()) / len(results),
                    rtn_experts=float(len(starved)), gptq_fallback=float(len(fallback)),
                    seconds=round(time.perf_counter() - started, 4))

    def _quantize_linears(self, work: LayerWork, targets: list[tuple[str, nn.Linear]]) -> None:
        acts = self.scheme.activations
        static = acts is not None and not acts.dynamic
        rounded: dict[str, tuple[nn.Linear, GPTQResult]] = {}
        for group in _groups(work, targets, self.options.true_sequential):
            readers = {members[0][0]: members for members in _shared_inputs(work, group)}  # one Hessian each
            hessians = work.observe_inputs(list(readers), lambda name: Hessian(readers[name][0][1].in_features,
                                                                               work.device))
            owners = feed_owners(work.ranks, readers)
            if owners is None:  # one process, or one input: each feed's rows are shared across ranks
                for feed, members in readers.items():  # each feed's float32 results freed before the next
                    rounded.update(self._place(work, members, *self._round(members, hessians.pop(feed), work.ranks),
                                               static))
                continue
            # Several inputs across ranks: each rank rounds the feeds it owns, at once, then all share.
            mine = {feed: self._round(members, hessians.pop(feed), None) for feed, members in readers.items()
                    if owners[feed] == work.ranks.rank}
            hessians.clear()
            for feed, members in readers.items():
                results, elapsed, dropped = mine.pop(feed, (None, 0.0, 0))
                results = share_results(work.ranks, owners[feed], results, work.device)
                elapsed, dropped = work.ranks.broadcast_object((elapsed, dropped), owners[feed])
                rounded.update(self._place(work, members, results, elapsed, dropped, static))
        if rounded:  # input scales come last, calibrated with every weight quantized
            observed = work.observe_inputs(list(rounded), lambda _name: self.calibrator(acts))
            for name, (holder, result) in rounded.items():
                dtype = dict(targets)[name].weight.dtype
                work.replace(name, self._build(holder, result, acts, observed[name].compute(), dtype))

    def _round(self, members: list[tuple[str, nn.Linear]], hessian: Hessian, ranks: Ranks | None
               ) -> tuple[list[GPTQResult], float, int]:
        """Round linears reading one input against its Hessian (consumed), their rows shared
        across ``ranks`` (``None``: all here); the results, the seconds it took and the tokens
        the Hessian dropped."""
        weights, opts = self.scheme.weights, self.options
        started, dropped = time.perf_counter(), hessian.dropped
        with torch.no_grad():  # consumes the Hessian: its [in, in] matrix is freed as it goes
            results = gptq_shared([linear.weight for _, linear in members], hessian, weights,
                                  block_size=opts.block_size, dampening=opts.dampening, act_order=opts.act_order,
                                  range_search=opts.range_search, ranks=ranks)
        return results, time.perf_counter() - started, dropped

    def _place(self, work: LayerWork, members: list[tuple[str, nn.Linear]], results: list[GPTQResult],
               elapsed: float, dropped: int, static: bool) -> dict[str, tuple[nn.Linear, GPTQResult]]:
        """Put the rounded linears in the layer; with static activations, return their float32
        holders for input calibration."""
        rows = sum(linear.out_features for _, linear in members)
        pending = {}
        for (name, linear), result in zip(members, results):
            # A float32 linear holding the result (not a copy): its codes reproduce the result exactly.
            holder = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
            holder.weight = nn.Parameter(result.weight, requires_grad=False)
            if linear.bias is not None:
                holder.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
            if static:
                pending[name] = (holder, result)
            quantized = self._build(holder, result, None if static else self.scheme.activations, None,
                                    linear.weight.dtype)
            work.replace(name, quantized)
            work.record(name, weight_error=weight_error(linear, quantized), gptq_loss=result.loss, damp=result.damp,
                        dropped_tokens=float(dropped), seconds=round(elapsed * linear.out_features / rows, 4))
            if result.fallback:
                work.record(name, gptq_fallback=1.0)
        return pending

    def _build(self, holder: nn.Linear, result: GPTQResult, acts: QuantArgs | None, input_range, dtype) -> QuantLinear:
        module = QuantLinear.from_linear(holder, self.scheme.weights, acts, weight_ranges=result.ranges,
                                         weight_global_scale=result.global_scale, input_range=input_range)
        # The codes are GPTQ's rounding, on the float32 grid; group scales are then stored as a
        # 16-bit kernel in the model's dtype reads them. The cast changes only weight and bias.
        module.serve_scales(dtype)
        return module.to(dtype)


@hookimpl
def qframe_quantizers():
    yield QuantizerPlugin(
        name="gptq",
        summary="GPTQ: Hessian-aware rounding of weights (int2-8, FP8, NVFP4, MXFP4), optional activations",
        factory=GPTQ,
        options=GPTQOptions,
        check=check,
    )
