"""``mse``: the clipping range that minimizes the quantization error of the observed values
in the target format.

The values are kept as a signed streaming histogram (:class:`qframe.calibrate.Histogram`),
so memory stays bounded whatever the stream. Candidates shrink the observed range
``(lo, hi)`` by a ratio ``r``: one candidate per bin from ``start_bin`` (default 128, as
modelopt) to the last non-empty one (``r`` = the bin's center over the largest magnitude),
and ``r = 1`` (min-max). Each is scored by the squared error of the histogram's values
(each bin's count split between its two quarter points), weighted by their counts, after
``qframe.numerics.fake_quantize`` with the scale (and zero point) that
``qframe.numerics.qparams`` derives from ``(r lo, r hi)``: the exact grid of the target
format (int symmetric or asymmetric, FP8 E4M3/E5M2, whatever the numerics supports), with
qframe's own scale convention (int's extra negative code included). The smallest error
wins; on a tie, the wider range. Per tensor every candidate is scored; per channel (one
histogram per channel) every ``step``-th (default 16), then every one within a step of the
best. modelopt scores the same candidates at bin centers of ``|x|`` with its narrow-range
int grid; shrinking ``(lo, hi)`` by one ratio for asymmetric formats is llm-compressor's
search.

Options: ``bins = 2048``, ``start_bin = 128``, ``step`` (1 per tensor, 16 per channel).

Recipe::

    activations = { bits = 8, calibrator = "mse" }
"""

from __future__ import annotations

import torch

from qframe import CalibratorPlugin, hookimpl
from qframe import numerics
from qframe.calibrate import Histogram, HistogramCalibrator, positive
from qframe.errors import RecipeError
from qframe.scheme import QuantArgs

# Where a bin's values are taken to lie, in bin widths: a two-point midpoint rule; bin centers
# alone alias against a grid of a few bins per step (1 % more error after a coarse stream).
QUARTERS = torch.tensor([0.25, 0.75], dtype=torch.float64)


class MSE(HistogramCalibrator):
    """The range whose quantization error on the observed values is smallest.

    Example::

        >>> calib = MSE(QuantArgs(bits=4, granularity="tensor"), bins=64, start_bin=1)
        >>> calib.observe(torch.cat([torch.full((100_000,), 1.0), torch.tensor([-100.0, 100.0])]))
        >>> lo, hi = calib.compute()      # clips the two outliers, keeps the ones
        >>> hi.item() < 10
        True
    """

    name = "mse"

    def __init__(self, args: QuantArgs, *, bins: int = 2048, start_bin: int = 128, step: int | None = None):
        positive("start_bin", start_bin)
        if step is not None:
            positive("step", step)
        super().__init__(args, bins=bins, signed=True)
        if step is not None and step > bins:  # torch.arange(...)[::step] overflows past 2**62
            raise RecipeError("step", step, f"expected at most bins ({bins}): one candidate a step")
        self.start_bin = start_bin
        self.step = step or (1 if args.granularity == "tensor" else 16)

    def ranges(self, histogram: Histogram) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = histogram.extremes()
        ratios = self.candidates(histogram)
        count = ratios.shape[1]
        coarse = torch.arange(count, device=ratios.device)[:: self.step].tolist()
        coarse = torch.tensor(sorted(set(coarse) | {count - 1}), device=ratios.device)
        tried, errors = ratios[:, coarse], self.errors(histogram, ratios[:, coarse])
        if self.step > 1:  # then every candidate within a step of the best coarse one
            best = coarse[errors.argmin(-1)]
            window = (best[:, None] + torch.arange(1 - self.step, self.step, device=best.device)).clamp(0, count - 1)
            tried = torch.cat([tried, ratios.gather(-1, window)], -1)
            errors = torch.cat([errors, self.errors(histogram, tried[:, len(coarse):])], -1)
        least = errors.min(-1, keepdim=True).values
        r = torch.where(errors <= least, tried, 0.0).amax(-1).float()  # on a tie, the widest range
        return r * lo, r * hi

    def errors(self, histogram: Histogram, ratios: torch.Tensor) -> torch.Tensor:
        """Squared error of the histogram's values, each bin's count split between its two
        quarter points, for each candidate ratio ``[columns, candidates]``."""
        lo, hi = histogram.extremes()
        counts = histogram.counts
        columns, _, bins = counts.shape
        at = torch.arange(bins, dtype=torch.float64, device=counts.device)[:, None] + QUARTERS.to(counts.device)
        points = at.reshape(-1) * histogram.width()[:, None]
        values = torch.cat([-points, points], -1).float()  # side 0 holds the negative values
        weights = counts.reshape(columns, 2 * bins).double().repeat_interleave(len(QUARTERS), -1) / len(QUARTERS)
        used = weights.sum(0) > 0  # empty bins add nothing: skip them (outliers leave many)
        values, weights = values[:, used], weights[:, used]
        if not values.numel():  # nothing finite observed: every candidate is as good
            return torch.zeros(ratios.shape, dtype=torch.float64, device=counts.device)
        scales, zeros = self.grids(lo, hi, ratios.T.float())  # [candidates, columns]
        errors = torch.empty(ratios.shape, dtype=torch.float64, device=counts.device)
        chunk = max(1, (1 << 22) // values.numel())
        for start in range(0, ratios.shape[1], chunk):
            part = slice(start, start + chunk)
            zero = None if zeros is None else zeros[part, :, None]
            q = numerics.fake_quantize(values, scales[part, :, None], zero, self.args)
            errors[:, part] = ((q - values).double().square() * weights).sum(-1).T
        return errors

    def grids(self, lo: torch.Tensor, hi: torch.Tensor, ratios: torch.Tensor):
        """Scales (and zero points) for ranges ``ratios [candidates, columns]`` times ``(lo, hi)``,
        each as the quantizer will derive it from that range alone. One call for all when the
        format's qparams is elementwise (checked on the first and last candidates), else one
        per candidate (a format whose scales depend on every range passed together)."""
        scale, zero = numerics.qparams(ratios * lo, ratios * hi, self.args)
        for i in (0, -1):
            alone, alone_zero = numerics.qparams(ratios[i] * lo, ratios[i] * hi, self.args)
            if not torch.equal(alone, scale[i]) or (zero is not None and not torch.equal(alone_zero, zero[i])):
                grids = [numerics.qparams(r * lo, r * hi, self.args) for r in ratios]
                return torch.stack([s for s, _ in grids]), None if zero is None else torch.stack([z for _, z in grids])
        return scale, zero

    def candidates(self, histogram: Histogram) -> torch.Tensor:
        """Ratios ``[columns, candidates]``, ascending, the last one 1."""
        lo, hi = histogram.extremes()
        occupied = histogram.magnitudes() > 0
        columns, bins = occupied.shape
        top = torch.where(occupied.any(-1), bins - occupied.flip(-1).int().argmax(-1), 0)
        last = int(top.max())  # past every column's last non-empty bin all candidates are r = 1
        j = torch.arange(min(self.start_bin, last), last, device=occupied.device)
        amax = torch.maximum(-lo, hi).double().clamp_min(1e-30)
        ratios = (j + 0.5) * histogram.width()[:, None] / amax[:, None]
        ratios = torch.where(j[None, :] < top[:, None], ratios, 1.0).clamp(max=1.0)
        return torch.cat([ratios, ratios.new_ones(columns, 1)], -1)


@hookimpl
def qframe_calibrators():
    yield CalibratorPlugin(name="mse", summary="the clipping range of least quantization error in the target format",
                           factory=MSE)
