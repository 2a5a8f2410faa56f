"""``minmax``: the running minimum and maximum of everything observed."""

from __future__ import annotations

import torch

from qframe import CalibratorPlugin, hookimpl
from qframe.calibrate import Calibrator
from qframe.errors import DataError


class MinMax(Calibrator):
    """Two tensors of state whatever the stream's length. NaN and inf are ignored."""

    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            x = torch.where(finite, x, torch.zeros((), device=x.device))
        dims = self.reduce_dims(x)
        lo, hi = torch.amin(x, dim=dims), torch.amax(x, dim=dims)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def combine(self, ranks) -> None:
        ranks.reduce(self, lo="min", hi="max")

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise DataError("calibrator minmax observed nothing; no calibration batch reached this module")
        return self.lo, self.hi


@hookimpl
def qframe_calibrators():
    yield CalibratorPlugin(name="minmax", summary="running minimum and maximum", factory=MinMax)
