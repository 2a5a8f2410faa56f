"""The calibrator interface: observe a stream of tensors, return a range.

Example::

    >>> import torch, qframe
    >>> from qframe.scheme import QuantArgs
    >>> calib = qframe.calibrators.get("minmax")(QuantArgs(granularity="tensor"))
    >>> calib.observe(torch.tensor([[-1.0, 3.0]])); calib.observe(torch.tensor([[2.0, -4.0]]))
    >>> [t.item() for t in calib.compute()]
    [-4.0, 3.0]
"""

from __future__ import annotations

import torch

from .scheme import QuantArgs


class Calibrator:
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

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
