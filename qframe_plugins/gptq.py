"""``gptq``: weights rounded column by column against each linear's input Hessian (Frantar et
al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For each target linear, ``H = 2/n Σ xᵀx`` is accumulated over every calibration token. The
weight is then rounded one input column at a time (in blocks of ``block_size`` with lazy
updates); each column's rounding error is spread over the columns not yet rounded through the
Cholesky factor of ``H⁻¹``, so the layer's *output* error is minimized rather than the weight's.

Group scales: each group's scale (and zero point) is taken from the weight's min/max when the
rounding reaches the group, after the earlier columns' errors have updated it. With
``act_order`` (columns in order of decreasing ``diag(H)``) they are fixed up front from the
original weight instead (static groups), so the scales stay contiguous and export as for RTN. Every weight format of :mod:`qframe.numerics` works
(int2-8 symmetric or asymmetric, FP8, NVFP4 with the original weight's global scale, MXFP4).

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

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qframe import QuantizerPlugin, hookimpl, numerics
from qframe.errors import RecipeError
from qframe.pipeline import LayerWork, Quantizer, weight_error
from qframe.qlinear import QuantLinear
from qframe.scheme import QuantArgs
from qframe_plugins.rtn import check as rtn_check

# Failed Cholesky factorizations are retried with 10x the dampening this many times.
DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQOptions:
    """``options`` of a gptq stage.

    ``block_size``: columns rounded between two lazy updates of the rest of the weight.
    ``dampening``: added to ``diag(H)`` as a fraction of its mean (numerical stability).
    ``act_order``: round columns in order of decreasing ``diag(H)`` (largest inputs first).
    ``true_sequential``: quantize the layer's linears group by group, each on inputs
    recomputed through the groups already quantized.

    Example::

        >>> GPTQOptions(block_size=64).dampening
        0.01
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = False
    true_sequential: bool = True

    def __post_init__(self) -> None:
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
                          "gptq fixes each group's scale from the original weight's min/max; allowed: minmax")
    rtn_check(stage)


class Hessian:
    """Accumulates ``H = 2/n Σ xᵀx`` (float32) over the rows of every input it observes;
    rows holding NaN or inf are dropped and counted in ``dropped``.

    Example::

        >>> h = Hessian(2, torch.device("cpu"))
        >>> h.observe(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))
        >>> h.matrix.tolist(), h.tokens, h.dropped
        ([[2.0, 0.0], [0.0, 0.0]], 1, 1)
    """

    def __init__(self, columns: int, device: torch.device):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0
        self.dropped = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)
        finite = torch.isfinite(x).all(dim=1)
        kept = int(finite.sum())
        if kept < x.shape[0]:
            self.dropped += x.shape[0] - kept
            x = x[finite]
        if kept == 0:
            return
        total = self.tokens + kept
        # A running mean keeps the scale of H independent of the amount of data.
        self.matrix.mul_(self.tokens / total).addmm_(x.T, x, alpha=2.0 / total)
        self.tokens = total


@dataclass
class GPTQResult:
    """The rounded weight (float32, on the grid of ``ranges``/``global_scale``) and figures."""

    weight: torch.Tensor
    ranges: tuple[torch.Tensor, torch.Tensor]
    global_scale: torch.Tensor | None
    loss: float  # Σ err²/d² over tr(W H Wᵀ): about the relative output error on the calibration inputs
    damp: float  # the dampening fraction that factorized (NaN on fallback)
    fallback: bool  # rounded to nearest: no dampening made H positive definite


def _per_column(t: torch.Tensor, args: QuantArgs, shape: torch.Size) -> torch.Tensor:
    """Scales (or zeros) ``[rows, groups]`` spread to one per weight element ``[out, in]``."""
    if args.granularity == "group":
        t = t.repeat_interleave(args.group_size, dim=1)[:, : shape[1]]
    return t.expand(shape).contiguous()


def _inverse_factor(reversed_h: torch.Tensor, dampening: float) -> tuple[torch.Tensor | None, float]:
    """The upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (``UᵀU`` is the
    inverse) and the dampening used, retrying with 10x the dampening when a factorization
    fails; ``None`` if all fail.

    It takes ``J·H·J``, ``H`` with rows and columns reversed, because then
    ``U = J·L⁻¹·J`` for the lower Cholesky factor ``L`` of ``J·H·J``, and ``L⁻¹`` can be
    solved for in place: no more than two ``[in, in]`` matrices exist at any moment (for a
    14336-wide down_proj each is 784 MiB). ``reversed_h`` is overwritten.
    """
    h = reversed_h
    mean_diag = h.diagonal().mean()
    damp, added = dampening, 0.0
    for _ in range(DAMP_RETRIES + 1):
        h.diagonal().add_((damp - added) * mean_diag)
        added = damp
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            h.zero_().diagonal().fill_(1.0)
            torch.linalg.solve_triangular(lower, h, upper=False, out=h)  # h = L⁻¹
            del lower
            upper = h.flip((0, 1))
            if bool(torch.isfinite(upper).all()):
                return upper, damp
            return None, float("nan")  # H itself is gone: the caller rounds to nearest
        del lower
        damp = max(damp * 10, 1e-4)  # a zero dampening would never grow
    return None, float("nan")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor | Hessian, args: QuantArgs, *, block_size: int = 128,
                  dampening: float = 0.01, act_order: bool = False) -> GPTQResult:
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
    columns = w.shape[1]
    device = w.device
    if isinstance(h, Hessian):
        h, h_owner = h.matrix.to(device, torch.float32), h
        h_owner.matrix = None
    else:
        h = h.to(device, torch.float32).clone()
    # An input channel that is always zero carries no information: its weights can be dropped.
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    alive = w.detach().float().masked_fill(dead, 0.0)
    energy = float((alive @ h * alive).sum().clamp_min(1e-30))
    del alive
    order = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if act_order:  # columns with the largest inputs first; each keeps its own group's scale
        backwards = order.flip(0)
        h = h[backwards]  # rows, then columns: never more than two [in, in] matrices at once
        h = h[:, backwards]
    else:
        h = h.flip((0, 1))
    # Factorize first: float32 copies of the weight wait until H has become its factor.
    upper, damp = _inverse_factor(h, dampening)
    del h  # overwritten by the factorization

    weight = w.detach().float().clone()
    # Static scales from the original weight: rounding the result again gives the same codes.
    ranges = numerics.minmax_ranges(weight, args)
    global_scale = numerics.weight_global_scale(weight, args)
    scale, zero, global_scale = numerics.scale_parts(*ranges, args, global_scale)
    scales = _per_column(numerics.effective_scale(scale, global_scale, args), args, weight.shape)
    zeros = None if zero is None else _per_column(zero, args, weight.shape)
    weight[:, dead] = 0.0
    if act_order:
        weight, scales = weight[:, order], scales[:, order]
        zeros = None if zeros is None else zeros[:, order]
    dynamic = not act_order and args.granularity == "group" and upper is not None
    lo, hi = (ranges[0].clone(), ranges[1].clone()) if dynamic else ranges
    loss = torch.zeros((), device=weight.device)
    if upper is None:
        warnings.warn("gptq: the Hessian is not positive definite even with strong dampening; rounding to nearest")
        quantized = numerics.fake_quantize(weight, scales, zeros, args)
    else:
        quantized = weight  # a finished block's columns are dead: their rounded values go in their place
        for start in range(0, columns, block_size):
            end = min(start + block_size, columns)
            block = weight[:, start:end].clone()
            errors = torch.zeros_like(block)
            u = upper[start:end, start:end]
            for i in range(end - start):
                c = start + i
                if dynamic and c % args.group_size == 0:  # a new group: its scale from the updated weight
                    g, size = c // args.group_size, min(args.group_size, columns - c)
                    current = torch.cat([block[:, i:], weight[:, end:]], 1)[:, :size]
                    lo[:, g], hi[:, g] = current.amin(1), current.amax(1)
                    s_g, z_g, _ = numerics.scale_parts(lo[:, g:g + 1], hi[:, g:g + 1], args, global_scale)
                    scales[:, c:c + size] = numerics.effective_scale(s_g, global_scale, args)
                    if zeros is not None:
                        zeros[:, c:c + size] = z_g
                col = block[:, i]
                q = numerics.fake_quantize(col, scales[:, c], None if zeros is None else zeros[:, c], args)
                quantized[:, c] = q
                err = (col - q) / u[i, i]
                loss += err.square().sum()
                block[:, i:] -= err.unsqueeze(1) * u[i, i:].unsqueeze(0)
                errors[:, i] = err
            weight[:, end:] -= errors @ upper[start:end, end:]  # the lazy update of the later columns
    if act_order:
        quantized = quantized[:, torch.argsort(order)]
    fallback = upper is None
    return GPTQResult(quantized, (lo, hi) if dynamic else ranges, global_scale,
                      float("nan") if fallback else float(loss) / energy, damp, fallback)


def _groups(work: LayerWork, targets: list[tuple[str, nn.Linear]], sequential: bool) -> list[list[tuple[str, nn.Linear]]]:
    """Targets in the order true-sequential quantization takes them; the rest come last."""
    if not sequential or work.arch is None or not work.arch.smoothing_groups:
        return [targets]
    left = dict(targets)
    groups = []
    for group in work.arch.smoothing_groups:
        names = [f"{work.prefix}.{c}" for c in group.consumers if f"{work.prefix}.{c}" in left]
        if names:
            groups.append([(n, left.pop(n)) for n in names])
    if left:
        groups.append(list(left.items()))
    return groups


class GPTQ(Quantizer):
    @classmethod
    def needs_calibration(cls, stage) -> bool:
        return True  # the Hessians come from data

    def quantize_layer(self, work: LayerWork, targets: list[tuple[str, nn.Linear]]) -> None:
        weights, acts, opts = self.scheme.weights, self.scheme.activations, self.options
        static = acts is not None and not acts.dynamic
        rounded: dict[str, tuple[nn.Linear, GPTQResult]] = {}
        for group in _groups(work, targets, opts.true_sequential):
            widths = {name: linear.in_features for name, linear in group}
            hessians = work.observe_inputs(list(widths), lambda name: Hessian(widths[name], work.device))
            for name, linear in group:
                started = time.perf_counter()
                hessian = hessians[name]
                with torch.no_grad():  # consumes the Hessian: its [in, in] matrix is freed as it goes
                    result = gptq_quantize(linear.weight, hessian, weights, block_size=opts.block_size,
                                           dampening=opts.dampening, act_order=opts.act_order)
                # A float32 linear holding the result: its codes reproduce the result exactly.
                holder = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                   device=result.weight.device)
                with torch.no_grad():
                    holder.weight.copy_(result.weight)
                    if linear.bias is not None:
                        holder.bias.copy_(linear.bias.float())
                if static:  # input scales come last, calibrated with every weight quantized
                    rounded[name] = (holder, result)
                quantized = self._build(holder, result, None if static else acts, None, linear.weight.dtype)
                work.replace(name, quantized)
                work.record(name, weight_error=weight_error(linear, quantized), gptq_loss=result.loss, damp=result.damp,
                            dropped_tokens=float(hessian.dropped), seconds=round(time.perf_counter() - started, 4))
                if result.fallback:
                    work.record(name, gptq_fallback=1.0)
        if rounded:
            observed = work.observe_inputs(list(rounded), lambda _name: self.calibrator(acts))
            for name, (holder, result) in rounded.items():
                dtype = dict(targets)[name].weight.dtype
                work.replace(name, self._build(holder, result, acts, observed[name].compute(), dtype))

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
