"""The calibrator interface: observe a stream of tensors, return a range.

A calibrator sees batches of any shape, keeps bounded state, and returns ``(lo, hi)``:
scalars per tensor, vectors over the last dimension per channel. :class:`Histogram` is the
streaming histogram the built-in ``percentile``, ``entropy`` and ``mse`` calibrators share.

Example::

    >>> import torch, qframe
    >>> from qframe.scheme import QuantArgs
    >>> calib = qframe.calibrators.get("minmax")(QuantArgs(granularity="tensor"))
    >>> calib.observe(torch.tensor([[-1.0, 3.0]])); calib.observe(torch.tensor([[2.0, -4.0]]))
    >>> [t.item() for t in calib.compute()]
    [-4.0, 3.0]
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from .errors import DataError, RecipeError
from .scheme import QuantArgs

# A first span a hair above the largest magnitude: every value lies strictly inside it,
# even after float32 rounding of value / width (2**-20 is far above float32's 2**-24).
HEADROOM = 1 + 2.0**-20
# The most bins a histogram takes: its state is columns x sides x bins int64 (per channel, times
# the channels), and entropy scores every bin as a threshold; modelopt and TensorRT use 2048.
MAX_BINS = 1 << 16


class Calibrator(ABC):
    """Base class for calibrators; subclasses implement ``observe`` and ``compute``.

    ``observe`` sees each batch once and keeps bounded state. ``compute`` returns
    ``(lo, hi)``: scalars for per-tensor ranges, vectors over the last dimension for
    per-channel ones.
    """

    def __init__(self, args: QuantArgs):
        self.args = args

    def reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The dimensions one range spans: all of them per tensor, all but the last per channel."""
        return tuple(range(x.dim())) if self.args.granularity == "tensor" else tuple(range(x.dim() - 1))

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[values, ranges]``: one column per tensor, one per channel (the last dim)."""
        return x.reshape(-1, 1) if self.args.granularity == "tensor" else x.reshape(-1, x.shape[-1])

    def shaped(self, v: torch.Tensor) -> torch.Tensor:
        """A ``[ranges]`` vector as :meth:`compute` returns it: a scalar per tensor."""
        return v.reshape(()) if self.args.granularity == "tensor" else v

    @abstractmethod
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch into the state."""

    @abstractmethod
    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``(lo, hi)`` of everything observed."""

    # A calibrator used across processes (qframe.distributed) also says how its state combines:
    #     def combine(self, ranks): ranks.reduce(self, lo="min", hi="max")
    # after which every rank's compute() is over every rank's batches.


class Histogram:
    """Counts of ``|x|`` in ``bins`` equal bins over ``[0, span)``, one histogram per column,
    in memory that does not grow with the stream.

    The first batch sets each column's ``span`` to its largest magnitude (as TensorRT and
    modelopt do), times ``1 + 2**-20`` so that every bin is half-open and the maximum lies
    inside the last one. A later batch that reaches the span doubles it ``k`` times, as often
    as needed, merging bins: old bin ``j`` lies wholly inside new bin ``j >> k``, so counts
    stay exact and no sample is ever kept; the result equals the histogram of everything at
    once over the final span, bin for bin. With ``signed=True`` negative and non-negative
    values are counted apart (two sides sharing the edges), for asymmetric ranges and for the
    exact error of a format. NaN and inf are ignored; ``lo``/``hi`` are the exact extremes
    of the finite values.

    State: ``counts`` int64 ``[columns, sides, bins]`` (side 0 holds negative values when
    signed), ``span`` float64 ``[columns]`` (0 until a non-zero value arrives), ``lo``/``hi``
    float32 ``[columns]``.

    Example::

        >>> h = Histogram(bins=4)
        >>> h.observe(torch.tensor([[0.25], [-1.2], [2.0]]))   # span 2 (and a hair): width 0.5
        >>> h.counts.flatten().tolist()
        [1, 0, 1, 1]
        >>> h.observe(torch.tensor([[7.0], [float("nan")]]))    # doubles twice: width 2
        >>> h.counts.flatten().tolist(), h.span.item() / HEADROOM
        ([3, 0, 0, 1], 8.0)
    """

    def __init__(self, bins: int = 2048, *, signed: bool = False):
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
            raise RecipeError("bins", bins, f"expected an integer from 2 to {MAX_BINS}")
        self.bins, self.sides = bins, 2 if signed else 1
        self.counts: torch.Tensor | None = None
        self.span = self.lo = self.hi = None

    @property
    def empty(self) -> bool:
        return self.counts is None

    def observe(self, x: torch.Tensor) -> None:
        """Count a batch ``[values, columns]``."""
        x = x.detach()
        columns = x.shape[1]
        if x.shape[0] == 0:
            return
        if self.counts is None:
            self.counts = torch.zeros(columns, self.sides, self.bins, dtype=torch.int64, device=x.device)
            self.span = torch.zeros(columns, dtype=torch.float64, device=x.device)
            self.lo = torch.full((columns,), math.inf, device=x.device)
            self.hi = torch.full((columns,), -math.inf, device=x.device)
        elif columns != self.counts.shape[0]:
            raise DataError(f"a calibrator saw {columns} channels after {self.counts.shape[0]}; the last dimension must not change")
        x = x.to(self.counts.device, torch.float32)
        finite = torch.isfinite(x)
        all_finite = bool(finite.all())
        lo = (x if all_finite else x.masked_fill(~finite, math.inf)).amin(0)
        hi = (x if all_finite else x.masked_fill(~finite, -math.inf)).amax(0)
        self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self._grow(torch.maximum(-lo, hi))
        width = torch.where(self.span > 0, self.span / self.bins, 1.0).float()
        magnitude = x.abs() if all_finite else x.abs().masked_fill_(~finite, 0.0)
        index = (magnitude / width).floor_().clamp_(max=self.bins - 1).long()
        index += torch.arange(columns, device=x.device) * (self.sides * self.bins)
        if self.sides == 2:
            index += (x >= 0).long() * self.bins
        size = self.counts.numel()
        if not all_finite:
            index.masked_fill_(~finite, size)  # one spare slot collects what is ignored
        self.counts += torch.bincount(index.flatten(), minlength=size + 1)[:size].view_as(self.counts)

    def _grow(self, top: torch.Tensor) -> None:
        """Make every column's span cover ``top`` by doubling it and merging bins."""
        top = top.double()
        fresh = (self.span == 0) & (top > 0)
        if bool(fresh.any()):  # only zeros so far: they sit in bin 0 whatever the span
            self.span = torch.where(fresh, top * HEADROOM, self.span)
        over = (top >= self.span) & (self.span > 0)
        if not bool(over.any()):
            return
        ratio = torch.where(over, top / self.span, 1.0)
        k = torch.log2(ratio).ceil().clamp(0, 62).long()
        k += (over & (top >= self.span * torch.pow(2.0, k))).long()  # the smallest k with top < span * 2**k
        k = k.clamp(max=62)
        index = torch.arange(self.bins, device=k.device) >> k[:, None]
        index = index[:, None, :].expand_as(self.counts)
        self.counts = torch.zeros_like(self.counts).scatter_add_(-1, index, self.counts)
        self.span = self.span * torch.pow(2.0, k)

    def combine(self, ranks) -> None:
        """Merge every rank's histogram into this one (:mod:`qframe.distributed`): the span is
        the first rank's (in rank order: the one a single process would start from), doubled as
        often as the extremes of all ranks need; each rank's bin goes where its center falls. The
        first rank's counts land exactly where a single process counts them (their spans differ
        by a power of two); another rank's are exact when its span does too, and otherwise
        within one of its bins. Extremes are exact.
        """
        shapes = ranks.all_gather_object(None if self.counts is None else tuple(self.counts.shape))
        known = [s for s in shapes if s is not None]
        if not known:
            return
        if self.counts is None:  # saw nothing here: an empty histogram shaped like the others'
            self.counts = torch.zeros(known[0], dtype=torch.int64, device=ranks.device)
            self.span = torch.zeros(known[0][0], dtype=torch.float64, device=ranks.device)
            self.lo = torch.full((known[0][0],), math.inf, device=ranks.device)
            self.hi = torch.full((known[0][0],), -math.inf, device=ranks.device)
        device, single = self.counts.device, [1] * ranks.size
        counts = ranks.gather_rows(self.counts.unsqueeze(0), single)  # [ranks, columns, sides, bins]
        spans = ranks.gather_rows(self.span.unsqueeze(0), single)  # [ranks, columns]
        (self.lo,), (self.hi,) = ranks.all_reduce([self.lo], "min"), ranks.all_reduce([self.hi], "max")
        started = spans > 0
        first = spans.gather(0, started.int().argmax(0, keepdim=True))[0]  # 0 where no rank saw a non-zero
        top = torch.maximum(-self.lo, self.hi).double().clamp_min(0)
        k = torch.log2(torch.where(first > 0, top / first, 1.0).clamp_min(1.0)).ceil().clamp(0, 62)
        k += (first > 0) & (top >= first * torch.pow(2.0, k))  # the smallest k with top < span * 2**k
        span = first * torch.pow(2.0, k)
        merged = torch.zeros_like(self.counts)
        centers = torch.arange(self.bins, dtype=torch.float64, device=device) + 0.5
        for r in range(ranks.size):
            ratio = torch.where(span > 0, spans[r] / span.clamp_min(1e-300), 0.0)  # its bin width over the new one
            index = (centers * ratio[:, None]).floor().clamp(max=self.bins - 1).long()
            merged.scatter_add_(-1, index[:, None, :].expand_as(merged), counts[r])
        self.counts, self.span = merged, span

    def width(self) -> torch.Tensor:
        """Bin width per column, float64 ``[columns]``."""
        return self.span / self.bins

    def magnitudes(self) -> torch.Tensor:
        """The histogram of ``|x|``, int64 ``[columns, bins]``."""
        return self.counts.sum(1)

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Observed minimum and maximum per column; 0 for a column that saw nothing finite."""
        seen = self.lo <= self.hi
        zero = torch.zeros((), device=self.lo.device)
        return torch.where(seen, self.lo, zero), torch.where(seen, self.hi, zero)

    def state_bytes(self) -> int:
        return sum(t.nbytes for t in (self.counts, self.span, self.lo, self.hi) if t is not None)


def magnitude_quantile(counts: torch.Tensor, width: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per row of a histogram ``[rows, bins]`` of bin ``width``, the value below which ``mass``
    counts lie, interpolated linearly inside its bin (0 where ``mass <= 0``).

    Example::

        >>> magnitude_quantile(torch.tensor([[2, 0, 2]]), torch.tensor([1.0]), torch.tensor([3.0]))
        tensor([2.5000], dtype=torch.float64)
    """
    counts = counts.double()
    cum = counts.cumsum(-1)
    mass = mass.double().to(cum.device)
    index = torch.searchsorted(cum, mass[:, None]).clamp(max=counts.shape[-1] - 1)
    inside = counts.gather(-1, index)
    before = cum.gather(-1, index) - inside
    fraction = torch.where(inside > 0, (mass[:, None] - before) / inside, 0.0).clamp(0, 1)
    value = ((index + fraction) * width.double()[:, None]).squeeze(-1)
    return torch.where(mass > 0, value, 0.0)


class HistogramCalibrator(Calibrator):
    """A calibrator whose state is one :class:`Histogram` (per tensor, or one per channel).

    Per tensor the state is ``bins * sides * 8`` bytes plus a few scalars (32 KiB for the
    default 2048 signed bins), whatever the stream's length; per channel it is that times
    the number of channels, so pass fewer ``bins`` for wide per-channel tensors.
    Subclasses set ``name`` and implement :meth:`ranges` on the filled histogram.
    """

    name = "histogram"

    def __init__(self, args: QuantArgs, *, bins: int = 2048, signed: bool = False):
        super().__init__(args)
        if args.granularity not in ("tensor", "channel"):
            raise RecipeError("granularity", args.granularity,
                              f"calibrator {self.name} gives ranges per tensor or per channel; allowed: tensor, channel")
        self.histogram = Histogram(bins, signed=signed)

    def observe(self, x: torch.Tensor) -> None:
        self.histogram.observe(self.columns(x))

    def combine(self, ranks) -> None:
        self.histogram.combine(ranks)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.histogram.empty:
            raise DataError(f"calibrator {self.name} observed nothing; no calibration batch reached this module")
        lo, hi = self.ranges(self.histogram)
        return self.shaped(lo.float()), self.shaped(hi.float())

    @abstractmethod
    def ranges(self, histogram: Histogram) -> tuple[torch.Tensor, torch.Tensor]:
        """The range this calibrator reads off a histogram."""


def clip(threshold: torch.Tensor, histogram: Histogram) -> tuple[torch.Tensor, torch.Tensor]:
    """``[-threshold, threshold]`` intersected with the observed range, per column."""
    lo, hi = histogram.extremes()
    t = threshold.to(lo.device, torch.float32)
    return torch.maximum(lo, -t), torch.minimum(hi, t)


def positive(key: str, value: object, kind: type = int) -> None:
    """Raise a :class:`RecipeError` naming ``key`` unless ``value`` is a positive ``kind``."""
    if isinstance(value, bool) or not isinstance(value, (kind, int)) or value <= 0:
        raise RecipeError(key, value, f"expected a positive {'integer' if kind is int else 'number'}")


class Prescaled:
    """A calibrator that observes ``x · prescale``: the input a linear with an unfolded
    smoothing scale (``QuantLinear.input_prescale``) will quantize.

    Example::

        >>> from qframe_plugins.minmax import MinMax
        >>> calib = Prescaled(MinMax(QuantArgs(granularity="tensor")), torch.tensor([2.0, 0.5]))
        >>> calib.observe(torch.tensor([[1.0, -4.0]])); [t.item() for t in calib.compute()]
        [-2.0, 2.0]
    """

    def __init__(self, inner: Calibrator, prescale: torch.Tensor):
        self.inner, self.prescale = inner, prescale

    def observe(self, x: torch.Tensor) -> None:
        self.inner.observe(x * self.prescale.to(x.device, x.dtype))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.compute()

    def combine(self, ranks) -> None:
        from .distributed import combine

        combine([self.inner], ranks)



_OUT_DTYPE_MM: list[bool] = []  # whether this torch multiplies 16-bit matrices into float32 (once known)


def add_gram(total: torch.Tensor, rows: torch.Tensor) -> None:
    """``total += rowsᵀ rows``, summed in float32 (``total`` is float32 ``[in, in]``, ``rows``
    ``[n, in]`` finite). On CUDA, 16-bit rows are multiplied as they are, with float32
    products and sums (exact products at tensor-core speed, no float32 copy of the rows);
    otherwise in float32.

    Example::

        >>> total = torch.zeros(3, 3)
        >>> add_gram(total, torch.ones(2, 3, dtype=torch.bfloat16))
        >>> total[0, 0].item()
        2.0
    """
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and _OUT_DTYPE_MM != [False]:
        try:
            torch.addmm(total, rows.T, rows, out_dtype=torch.float32, out=total)
            _OUT_DTYPE_MM[:] = [True]
            return
        except (TypeError, RuntimeError):  # an older torch: TF32 is exact for 16-bit operands too
            _OUT_DTYPE_MM[:] = [False]
    wide = rows.float()
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = rows.dtype in (torch.bfloat16, torch.float16)
    try:
        total.addmm_(wide.T, wide)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def build_calibrator(record: Any, args: QuantArgs) -> Calibrator:
    """Build the calibrator plugin ``record`` for ``args`` (as :meth:`QuantArgs.calibrated`
    sees them), passing ``args.calibrator_options``.

    An option the calibrator does not take is a :class:`RecipeError` naming it and listing
    the ones it does; resolving a recipe calls this once, so mistakes surface before any
    model loads.

    Example::

        >>> from qframe.plugins import default_registry
        >>> args = QuantArgs(granularity="tensor", calibrator="percentile", calibrator_options={"percentile": 99.9})
        >>> build_calibrator(default_registry().get("calibrator", "percentile"), args).percentile
        99.9
    """
    options = dict(args.calibrator_options)
    try:
        parameters = inspect.signature(record.factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C factory: let the call decide
        parameters = ()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        known = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
        for key, value in options.items():
            if key not in known:
                allowed = ", ".join(known) if known else "none"
                raise RecipeError(f"calibrator_options.{key}", value,
                                  f"calibrator {record.name} has no such option; allowed: {allowed}")
    try:
        return record.factory(args.calibrated(), **options)
    except RecipeError as exc:  # an option's value, or args the calibrator cannot serve
        raise (exc.within("calibrator_options") if exc.key in options else exc) from None
