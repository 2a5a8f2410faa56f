"""``percentile`` and ``entropy``: ranges from one streaming histogram (:class:`qframe.calibrate.Histogram`).

- ``percentile`` (options ``percentile = 99.99``, ``bins = 2048``): symmetric formats take
  the given percentile of ``|x|`` (as modelopt and TensorRT do); asymmetric ones keep the
  sign and clip ``100 - percentile`` percent of all values from *each* tail (as ONNX
  Runtime does). The value is interpolated inside its bin (modelopt takes the bin's lower
  edge: at most one bin, 1/2048 of the range, lower), and the range is intersected with
  what was observed, so ``percentile = 100`` is min-max.
- ``entropy`` (options ``bins = 2048``, ``start_bin = 128``): TensorRT's KL-divergence
  calibration on the histogram of ``|x|``. For every candidate threshold, the upper edge of
  bin ``i`` for ``i`` from ``start_bin`` to the last non-empty bin (modelopt's histogram
  ends there after one batch; after a stream of growing ranges, qframe's may not), the reference ``P`` is
  the first ``i`` bins with everything beyond folded into the last; ``Q`` quantizes the
  first ``i`` bins to ``2**(bits-1)`` levels (``2**bits`` for an asymmetric format on a
  channel that saw nothing negative, as modelopt's ``unsigned``; a uniform grid, also for
  FP8) and spreads each level evenly back over its non-empty bins; the
  threshold with the smallest ``KL(P || Q)`` wins (the largest one on a tie). As in
  TensorRT's pytorch-quantization and modelopt, the first bin's count is replaced by the
  second's so that exact zeros (padding, ReLU) do not dominate. All candidates are scored
  at once from prefix sums, without a loop over them. It is a symmetric method: the range
  is ``[-t, t]`` intersected with what was observed.

Both return ranges per tensor, or per channel (one histogram per channel).

Recipe::

    activations = { bits = 8, calibrator = "entropy" }
"""

from __future__ import annotations

import torch

from qframe import CalibratorPlugin, hookimpl
from qframe.calibrate import Histogram, HistogramCalibrator, clip, magnitude_quantile, positive
from qframe.errors import RecipeError
from qframe.scheme import QuantArgs


class Percentile(HistogramCalibrator):
    """The range that holds ``percentile`` percent of the observed values.

    Example::

        >>> calib = Percentile(QuantArgs(granularity="tensor"), percentile=90.0, bins=10)
        >>> x = torch.arange(1.0, 11.0)      # |x|: bin [k-1, k) holds -k and k
        >>> calib.observe(torch.cat([x, -x]))
        >>> [round(t.item(), 4) for t in calib.compute()]   # 18 of 20 values lie up to 9
        [-9.0, 9.0]
    """

    name = "percentile"

    def __init__(self, args: QuantArgs, *, percentile: float = 99.99, bins: int = 2048):
        positive("percentile", percentile, float)
        if percentile > 100:
            raise RecipeError("percentile", percentile, "expected 0 < percentile <= 100")
        super().__init__(args, bins=bins, signed=not args.symmetric)
        self.percentile = float(percentile)

    def ranges(self, histogram: Histogram) -> tuple[torch.Tensor, torch.Tensor]:
        counts, width, share = histogram.counts, histogram.width(), self.percentile / 100
        total = counts.sum((1, 2)).double()
        if histogram.sides == 1:
            return clip(magnitude_quantile(counts[:, 0], width, share * total), histogram)
        tail = (1 - share) * total  # clipped from each side
        negative, nonnegative = counts[:, 0], counts[:, 1]
        lo = -magnitude_quantile(negative, width, negative.sum(-1) - tail)
        hi = magnitude_quantile(nonnegative, width, nonnegative.sum(-1) - tail)
        seen_lo, seen_hi = histogram.extremes()
        return torch.maximum(seen_lo, lo.float()), torch.minimum(seen_hi, hi.float())


def kl_thresholds(counts: torch.Tensor, levels: int, start_bin: int = 128) -> torch.Tensor:
    """For each row of a histogram of ``|x|`` (``[rows, bins]``), the number of bins ``i``
    whose upper edge minimizes TensorRT's ``KL(P || Q)`` for ``levels`` quantization levels.

    With prefix sums ``C`` (counts), ``N`` (non-empty bins) and ``X`` (``c log c``), level
    ``k`` of candidate ``i`` covers bins ``[ceil(k i / L), ceil((k + 1) i / L))`` with sum
    ``S_k`` over ``n_k`` non-empty bins, and with ``T`` the total and ``o`` the outliers,
    ``KL = (X[i-1] + P log P - sum_k S_k log(S_k / n_k) - o log(S_L-1 / n_L-1)) / T - log T + log C[i]``
    where ``P = c[i-1] + o`` (infinite when ``c[i-1] = 0 < o``: ``Q`` is 0 where ``P`` is not).
    """
    hist = counts.double().clone()
    rows, bins = hist.shape
    if bins > 1:
        hist[:, 0] = hist[:, 1]
    nonzero = hist > 0
    top = torch.where(nonzero.any(-1), bins - nonzero.flip(-1).int().argmax(-1), 1)  # last non-empty bin + 1
    pad = hist.new_zeros(rows, 1)
    cum = torch.cat([pad, hist.cumsum(-1)], -1)
    filled = torch.cat([pad, nonzero.double().cumsum(-1)], -1)
    xlogx = torch.cat([pad, torch.where(nonzero, hist * hist.log(), 0.0).cumsum(-1)], -1)
    candidates = torch.arange(min(start_bin, bins), bins + 1, device=hist.device)
    level = torch.arange(levels + 1, device=hist.device)
    bounds = (level[None, :] * candidates[:, None] + levels - 1) // levels  # [I, L+1]; last column = i
    best = torch.empty(rows, dtype=torch.long, device=hist.device)
    chunk = max(1, (1 << 22) // (len(candidates) * (levels + 1)))
    for start in range(0, rows, chunk):
        r = slice(start, start + chunk)
        c, n = cum[r][:, bounds], filled[r][:, bounds]  # [rows, I, L+1]
        sums, used = c[..., 1:] - c[..., :-1], n[..., 1:] - n[..., :-1]
        log_mean = torch.where(used > 0, sums.clamp_min(1e-300).log() - used.clamp_min(1).log(), 0.0)
        total = cum[r][:, -1:]
        below = cum[r][:, candidates]
        outliers = total - below
        last = hist[r][:, candidates - 1]
        p_last = last + outliers
        a = xlogx[r][:, candidates - 1] + torch.where(p_last > 0, p_last * p_last.clamp_min(1e-300).log(), 0.0)
        b = (sums * log_mean).sum(-1) + torch.where(last > 0, outliers * log_mean[..., -1], 0.0)
        kl = (a - b) / total - total.log() + below.log()
        invalid = ((last == 0) & (outliers > 0)) | (below == 0) | (candidates[None, :] > top[r, None])
        kl = torch.where(invalid, torch.inf, kl)
        pick = len(candidates) - 1 - kl.flip(-1).argmin(-1)  # the last minimum: the larger threshold
        best[r] = torch.where(torch.isfinite(kl).any(-1), candidates[pick], top[r])
    return best


class Entropy(HistogramCalibrator):
    """TensorRT's KL-divergence calibration (see the module's docstring).

    Example::

        >>> calib = Entropy(QuantArgs(granularity="tensor"))
        >>> calib.observe(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
        >>> 2.5 < calib.compute()[1].item() < 4.5
        True
    """

    name = "entropy"

    def __init__(self, args: QuantArgs, *, bins: int = 2048, start_bin: int = 128):
        positive("start_bin", start_bin)
        super().__init__(args, bins=bins)
        self.start_bin = start_bin

    def ranges(self, histogram: Histogram) -> tuple[torch.Tensor, torch.Tensor]:
        counts = histogram.magnitudes().cpu()
        # an asymmetric grid over values that are all >= 0 has 2**bits levels, not 2**(bits-1)
        unsigned = (histogram.extremes()[0].cpu() >= 0) & (not self.args.symmetric)
        bins = torch.empty(counts.shape[0], dtype=torch.long)
        for half in (True, False):
            if bool((unsigned == half).any()):
                levels = 1 << (self.args.bits - (0 if half else 1))
                bins[unsigned == half] = kl_thresholds(counts[unsigned == half], levels, self.start_bin)
        return clip(bins.double() * histogram.width().cpu(), histogram)


@hookimpl
def qframe_calibrators():
    yield CalibratorPlugin(name="percentile", summary="a percentile of the observed values (default 99.99), from a histogram",
                           factory=Percentile)
    yield CalibratorPlugin(name="entropy", summary="TensorRT's KL-divergence threshold, from a histogram of |x|",
                           factory=Entropy)
