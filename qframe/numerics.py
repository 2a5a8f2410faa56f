"""Integer quantization arithmetic: ranges to scales, quantize, dequantize, pack.

Shapes: a weight ``[out, in]`` is viewed as ``[out, groups, group_size]``; its scales are
``[out, groups]`` (``groups`` is 1 per channel, and per tensor the scale is ``[1, 1]``).
A last, partial group is padded with zeros for the arithmetic and trimmed afterwards.

Example::

    >>> import torch
    >>> from qframe.scheme import QuantArgs
    >>> args = QuantArgs(bits=4, granularity="group", group_size=2)
    >>> w = torch.tensor([[1.0, -2.0, 0.7, 0.35]])
    >>> q = quantize_weight(w, args)
    >>> q.codes.tolist(), q.scale.tolist()
    ([[4, -8, 7, 4]], [[0.25, 0.10000000149011612]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scheme import QuantArgs

# Smallest scale: keeps an all-zero group finite (its codes are all zero-point).
MIN_SCALE = 1e-12


def n_groups(in_features: int, args: QuantArgs) -> int:
    if args.granularity == "group":
        return math.ceil(in_features / args.group_size)
    return 1


def grouped(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, groups, size]``; zero-pad a last partial group."""
    out, in_features = w.shape
    if args.granularity == "tensor":
        return w.reshape(1, 1, -1)
    if args.granularity != "group":
        return w.reshape(out, 1, in_features)
    size = args.group_size
    pad = n_groups(in_features, args) * size - in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, size)


def ungrouped(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`grouped`: drop padding and restore ``[out, in]``."""
    out, in_features = shape
    return g.reshape(out, -1)[:, :in_features]


def qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point, when asymmetric) from observed ranges.

    Symmetric ranges use the *fitted* convention: ``scale = max(hi / qmax, -lo / -qmin)``
    (e.g. ``max(hi/7, -lo/8)`` for int4). Nothing observed is clipped, and the extra
    negative code (-8) is used whenever the negative extreme dominates. The plain
    ``amax / qmax`` rule wastes that code; ``amax / 7.5`` uses it but clips every positive
    extreme (docs/benchmarks.md measures all three).
    """
    lo = torch.minimum(lo.float(), torch.zeros((), device=lo.device))
    hi = torch.maximum(hi.float(), torch.zeros((), device=hi.device))
    if args.symmetric:
        scale = torch.maximum(hi / args.qmax, lo / args.qmin)
        return scale.clamp_min(MIN_SCALE), None
    scale = ((hi - lo) / (args.qmax - args.qmin)).clamp_min(MIN_SCALE)
    zero = (args.qmin - lo / scale).round().clamp(args.qmin, args.qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Integer codes of ``x`` (as float tensors holding integers) for broadcastable scales."""
    q = x.float() / scale
    if zero is not None:
        q = q + zero
    return q.round().clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype."""
    return dequantize(quantize(x, scale, zero, args), scale, zero).to(x.dtype)


def minmax_ranges(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of a weight, shaped like its scales."""
    g = grouped(w.float(), args)
    return g.amin(dim=-1), g.amax(dim=-1)


@dataclass
class QuantizedWeight:
    """Integer codes ``[out, in]`` with scales (and zero points) ``[out, groups]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    args: QuantArgs

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, self.args)


def quantize_weight(
    w: torch.Tensor,
    args: QuantArgs,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """Round a weight ``[out, in]`` to the grid ``args`` defines (ranges default to min/max)."""
    lo, hi = ranges if ranges is not None else minmax_ranges(w, args)
    scale, zero = qparams(lo, hi, args)
    g = grouped(w.float(), args)
    q = quantize(g, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), args)
    dtype = torch.int8 if args.symmetric else torch.uint8
    return QuantizedWeight(ungrouped(q, w.shape).to(dtype), scale, zero, args)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """Float32 weight ``[out, in]`` from codes and per-group scales."""
    g = grouped(codes.float(), args)
    z = None if zero is None else zero.float().unsqueeze(-1)
    return ungrouped(dequantize(g, scale.float().unsqueeze(-1), z), codes.shape)


def quantize_per_token(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantize activations with one scale per token (dynamic, over the last dim)."""
    lo, hi = x.float().amin(dim=-1, keepdim=True), x.float().amax(dim=-1, keepdim=True)
    scale, zero = qparams(lo, hi, args)
    return fake_quantize(x, scale, zero, args)


# -- packing -------------------------------------------------------------------------------

def pack(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Pack integer codes along the last dim into uint8: 2 (int4) or 4 (int2) per byte.

    Codes are stored offset to unsigned (``code + 2**(bits-1)`` when symmetric), low
    nibble first. Widths that do not divide 8 are stored one per byte, unpacked.

    Example::

        >>> pack(torch.tensor([[1, -2]], dtype=torch.int8), 4, True).tolist()
        [[105]]
    """
    u = codes.to(torch.int16) + ((1 << (bits - 1)) if symmetric else 0)
    u = u.to(torch.uint8)
    if 8 % bits or bits == 8:
        return u
    per_byte = 8 // bits
    pad = (-u.shape[-1]) % per_byte
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=u.device, dtype=torch.int32) * bits
    return (u << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, symmetric: bool, length: int) -> torch.Tensor:
    """Inverse of :func:`pack`: codes (int8 when symmetric, else uint8) of the given length."""
    if 8 % bits or bits == 8:
        u = packed.to(torch.int16)
    else:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int16) * bits
        u = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        u = u.reshape(*packed.shape[:-1], -1)[..., :length]
    if symmetric:
        return (u - (1 << (bits - 1))).to(torch.int8)
    return u.to(torch.uint8)
