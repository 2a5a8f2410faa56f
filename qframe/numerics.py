"""Quantization arithmetic: ranges to scales, scale search, quantize, dequantize, and run-time
activation quantization, for every number format.

What a format *is* (its grid, codes, limits, scale codec and packing) belongs to its object in
:mod:`qframe.formats`; this module reaches it through ``formats.of(args)`` and never names a
format. Ranges ignore NaN and inf, so neither ever reaches a scale.

One shape of API for all of them::

    scale, zero = qparams(lo, hi, args)       # zero is None unless asymmetric int
    q = quantize(x, scale, zero, args)        # grid values in the scaled domain, float32
    x_hat = dequantize(q, scale, zero)        # q * scale, or (q - zero) * scale
    fake_quantize(x, scale, zero, args)       # both, in x's dtype

Weights: :func:`quantize_weight` returns a :class:`QuantizedWeight` holding storage codes
(``int8``/``uint8`` for int, ``float8_e4m3fn``/``float8_e5m2`` for FP8, ``uint8`` E2M1 nibble
codes 0-15 for FP4, sign in bit 3), stored scales (``float32``; NVFP4 block scales as
``float8_e4m3fn`` with a ``global_scale``; MXFP4 as ``uint8`` E8M0 biased exponents) and zero
points. Activations quantized at run time: :func:`quantize_dynamic` and :func:`quantize_input`.

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
    >>> e2m1 = QuantArgs(type="float", bits=4, format="mxfp4", granularity="group", group_size=32)
    >>> quantize(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0]), torch.tensor(1.0), None, e2m1).tolist()
    [0.0, 1.0, 2.0, 4.0, 6.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import formats
# Format codecs that callers reach through this module too (they lived here before formats.py).
from .formats import (  # noqa: F401
    FLOAT32_MAX, MIN_SCALE, _div, _sanitized, e2m1_decode, e2m1_encode, e8m0_decode, mxfp4_scales,
    nvfp4_global_scale, nvfp4_scales,
)
from .scheme import QuantArgs


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


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and inf replaced by zero (for ranges only)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


# -- ranges to scales -------------------------------------------------------------------------

def scale_parts(
    lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The scales as stored: ``(scale, zero, global_scale)``, as the format makes them
    (:meth:`qframe.formats.NumberFormat.scale_parts`) from ranges read as ``lo <= 0 <= hi``
    with NaN as 0 and inf as the largest float32.

    ``scale`` is float32, except for NVFP4 (``float8_e4m3fn`` block scales, with a scalar
    ``global_scale``: the one given, else from the largest range) and MXFP4 (``uint8`` E8M0
    exponents). ``zero`` only for asymmetric int.

    Example::

        >>> scale_parts(torch.tensor([-1.0]), torch.tensor([float("nan")]), QuantArgs(bits=4, symmetric=False))
        (tensor([0.0667]), tensor([15.]), None)
    """
    lo = torch.minimum(_sanitized(lo), torch.zeros((), device=lo.device))
    hi = torch.maximum(_sanitized(hi), torch.zeros((), device=hi.device))
    return formats.of(args).scale_parts(lo, hi, global_scale)


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """The float32 scale the arithmetic uses, from the scale as stored."""
    return formats.of(args).effective_scale(scale, global_scale)


def qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point, when asymmetric) from observed ranges.

    Symmetric int ranges use the *fitted* convention: ``scale = max(hi / qmax, -lo / -qmin)``
    (e.g. ``max(hi/7, -lo/8)`` for int4). Nothing observed is clipped, and the extra
    negative code (-8) is used whenever the negative extreme dominates. The plain
    ``amax / qmax`` rule wastes that code; ``amax / 7.5`` uses it but clips every positive
    extreme (docs/benchmarks.md measures all three).

    FP8: ``amax / fmax``. NVFP4 and MXFP4: the effective per-block scale (``e4m3(block) *
    global``, the global from the largest of the given ranges; or ``2^e``), see
    :func:`scale_parts` for the scales as stored.
    """
    scale, zero, global_scale = scale_parts(lo, hi, args)
    return effective_scale(scale, global_scale, args), zero


# -- quantize / dequantize --------------------------------------------------------------------

def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """``x`` on the format's grid, in the scaled domain, as float32, for broadcastable scales:
    integer codes (int), FP8 values (saturating at ``±fmax``), or E2M1 values (FP4)."""
    q = x.float() / scale.to(x.device)  # a CPU scalar would be a reciprocal multiplication on CUDA
    if zero is not None:
        q = q + zero
    return formats.of(args).quantize(q)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype."""
    return dequantize(quantize(x, scale, zero, args), scale, zero).to(x.dtype)


def code_dtype(args: QuantArgs) -> torch.dtype:
    """The dtype of stored codes (``formats.of(args).code_dtype``): int8/uint8 (int), torch
    float8 (FP8), uint8 nibble codes (FP4)."""
    return formats.of(args).code_dtype


def scale_dtype(args: QuantArgs) -> torch.dtype:
    """The dtype of stored scales (``formats.of(args).scale_dtype``): float32, float8_e4m3fn
    (NVFP4 blocks) or uint8 (MXFP4 E8M0)."""
    return formats.of(args).scale_dtype


def encode(q: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Storage codes of grid values from :func:`quantize`."""
    return formats.of(args).encode(q)


def decode(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Float32 grid values of storage codes (inverse of :func:`encode`)."""
    return formats.of(args).decode(codes)


def minmax_ranges(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of a weight, shaped like its scales (NaN and inf ignored)."""
    g = grouped(_finite(w.float()), args)
    return g.amin(dim=-1), g.amax(dim=-1)


@dataclass
class QuantizedWeight:
    """Codes ``[out, in]`` with scales (and zero points) ``[out, groups]``, in their storage
    dtypes (see :func:`code_dtype`, :func:`scale_dtype`); NVFP4 adds a scalar ``global_scale``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    args: QuantArgs
    global_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, self.args, global_scale=self.global_scale)


def quantize_weight(
    w: torch.Tensor,
    args: QuantArgs,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
    global_scale: torch.Tensor | None = None,
    *,
    served_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Round a weight ``[out, in]`` to the grid ``args`` defines, with ranges per tensor,
    channel or group (default: their min/max; :func:`mse_ranges` searches clipped ones).
    NVFP4's global scale comes from the weight's own largest magnitude (so clipped ranges
    shrink the block scales under it) unless ``global_scale`` is given: an algorithm that
    changes the weight as it rounds (GPTQ) passes the original one, so that rounding its
    result again reproduces the same codes.

    ``served_dtype`` is the dtype the model computes in (default: ``w``'s): group-wise int
    scales are rounded to it before the weight is rounded (see :func:`served_scale`), so an
    algorithm that works in float32 on a 16-bit model passes the model's dtype.

    Example::

        >>> args = QuantArgs(bits=4, granularity="group", group_size=2)
        >>> quantize_weight(torch.tensor([[0.7, 0.1]]), args, served_dtype=torch.bfloat16).scale.item()
        0.10009765625
    """
    lo, hi = ranges if ranges is not None else minmax_ranges(w, args)
    g = grouped(w.float(), args)
    if global_scale is None:
        global_scale = weight_global_scale(w, args)
    scale, zero, global_scale = scale_parts(lo, hi, args, global_scale)
    scale = served_scale(scale, args, w.dtype if served_dtype is None else served_dtype)
    effective = effective_scale(scale, global_scale, args).unsqueeze(-1)
    q = quantize(g, effective, None if zero is None else zero.unsqueeze(-1), args)
    return QuantizedWeight(ungrouped(encode(q, args), w.shape), scale, zero, args, global_scale)


def served_scale(scale: torch.Tensor, args: QuantArgs, dtype: torch.dtype) -> torch.Tensor:
    """Group-wise int weight scales as a 16-bit kernel uses them: rounded to ``dtype`` (and
    kept positive and finite in it) when the weight is float16 or bfloat16; unchanged otherwise.

    TensorRT-LLM's group-wise int4 kernels (W4A16_AWQ, W4A8_AWQ) take their scales in the
    model's dtype, so a float32 scale would be rounded there and the served weights would
    differ from the quantized model's; per-channel and per-tensor scales stay float32 there.

    Example::

        >>> args = QuantArgs(bits=4, granularity="group", group_size=2)
        >>> served_scale(torch.tensor([[0.1]]), args, torch.bfloat16).item()
        0.10009765625
    """
    if (not isinstance(formats.of(args), formats.IntFormat) or args.granularity != "group"
            or dtype not in (torch.float16, torch.bfloat16)):
        return scale
    info = torch.finfo(dtype)
    smallest = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)).float()
    return scale.clamp(smallest.item(), info.max).to(dtype).float()


def weight_global_scale(w: torch.Tensor, args: QuantArgs) -> torch.Tensor | None:
    """NVFP4's FP32 global scale for the weight ``w`` (from its largest finite magnitude); ``None``
    for every other format. Algorithms that change the weight as they round (GPTQ) keep the
    original one.

    Example::

        >>> nvfp4 = QuantArgs(type="float", bits=4, granularity="group", group_size=16)
        >>> weight_global_scale(torch.tensor([[2688.0, -1.0]]), nvfp4).item()
        1.0
    """
    fmt = formats.of(args)
    if not fmt.has_global_scale:
        return None  # and no float32 copy of the weight for nothing
    return fmt.global_scale(_finite(w.float()).abs().amax())


def mse_ranges(w: torch.Tensor, args: QuantArgs, *, max_shrink: float = 0.2, steps: int = 20
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ranges of a weight ``[out, in]`` that minimize its squared rounding error
    in the target format: each group's min/max shrunk by the ratio, among ``1, 1 - d, ...,
    1 - max_shrink`` (``d = max_shrink / steps``), whose fake-quantized group lies closest to
    the original. Exact (every candidate quantizes the whole weight once) and vectorized over
    groups; NVFP4 keeps the weight's global scale, so each block's E4M3 scale is searched.

    Example::

        >>> w = torch.tensor([[1.0, 0.9, 0.8, 0.55, 0.5, 0.3, 0.2, -7.0]])   # one outlier
        >>> lo, hi = mse_ranges(w, QuantArgs(bits=2, symmetric=False))
        >>> lo.item() > -7.0    # clipping the outlier costs less than the grid it wastes
        True
    """
    lo, hi = minmax_ranges(w, args)
    g = grouped(_finite(w.float()), args)
    fixed = weight_global_scale(w, args)
    best_err = torch.full(lo.shape, math.inf, device=w.device)
    best_ratio = torch.ones_like(lo)
    for k in range(steps + 1):
        ratio = 1.0 - max_shrink * k / steps
        scale, zero, global_scale = scale_parts(lo * ratio, hi * ratio, args, fixed)
        effective = effective_scale(scale, global_scale, args).unsqueeze(-1)
        z = None if zero is None else zero.unsqueeze(-1)
        err = (dequantize(quantize(g, effective, z, args), effective, z) - g).square().sum(-1)
        better = err < best_err  # ties keep the wider range
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return lo * best_ratio, hi * best_ratio


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    args: QuantArgs,
    *,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 weight ``[out, in]`` from codes and per-group scales (as stored)."""
    g = grouped(decode(codes, args), args)
    z = None if zero is None else zero.float().unsqueeze(-1)
    return ungrouped(dequantize(g, effective_scale(scale, global_scale, args).unsqueeze(-1), z), codes.shape)


# -- activations at run time ------------------------------------------------------------------

# Activation elements fake-quantized at once per token or per block: their float32 temporaries
# (a few 64 MiB copies) instead of several of a whole batch (an 8 x 2048-token batch of an 8B
# MLP's 14336-wide input is 940 MiB in float32).
ACTIVATION_CHUNK = 1 << 24


def _dynamic(x: torch.Tensor, args: QuantArgs, granularity: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    if granularity != "tensor" and x.dim() > 1 and x.numel() > ACTIVATION_CHUNK:  # rows are independent
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, ACTIVATION_CHUNK // x.shape[-1])
        return torch.cat([_dynamic(r, args, granularity, global_scale) for r in rows.split(step)]).view(x.shape)
    xf = x.float()
    if granularity == "group":
        size = args.group_size
        length = xf.shape[-1]
        pad = -length % size
        blocks = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
        blocks = blocks.reshape(*xf.shape[:-1], -1, size)
        finite = _finite(blocks)
        lo, hi = finite.amin(dim=-1, keepdim=True), finite.amax(dim=-1, keepdim=True)
        fmt = formats.of(args)
        if global_scale is not None:  # static, calibrated
            global_scale = global_scale.to(lo.device)
        elif fmt.has_global_scale:  # taken per token here: no token depends on another
            global_scale = fmt.global_scale(torch.maximum(-lo, hi).amax(dim=-2, keepdim=True))
        stored, zero, global_scale = scale_parts(lo, hi, args, global_scale)
        scale = effective_scale(stored, global_scale, args)
        y = dequantize(quantize(blocks, scale, zero, args), scale, zero)
        return y.reshape(*xf.shape[:-1], -1)[..., :length].to(x.dtype)
    finite = _finite(xf)
    if granularity == "tensor":
        lo, hi = finite.amin(), finite.amax()
    else:  # token: one scale per row of the last dimension
        lo, hi = finite.amin(dim=-1, keepdim=True), finite.amax(dim=-1, keepdim=True)
    scale, zero = qparams(lo, hi, args)
    return fake_quantize(x, scale, zero, args)


def quantize_dynamic(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantize activations with scales taken from ``x`` itself, as ``args.granularity`` says:
    per ``token`` (each row of the last dimension; int or FP8), per ``group`` (blocks of
    ``group_size`` along the last dimension: NVFP4, MXFP4, or int/FP8 blocks), or per ``tensor``.

    NVFP4's global scale is taken per token here (``amax_token / (6 * 448)``), so a token's
    result never depends on what else is in the batch.

    Example::

        >>> args = QuantArgs(type="float", bits=4, format="mxfp4", granularity="group", group_size=32, dynamic=True)
        >>> quantize_dynamic(torch.full((1, 32), 7.0), args)[0, :2].tolist()   # X = 2^(2-2): 7 saturates
        [6.0, 6.0]
    """
    return _dynamic(x, args, args.granularity)


def quantize_nvfp4_static(x: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor) -> torch.Tensor:
    """Fake-quantize activations to NVFP4 with a calibrated FP32 ``global_scale`` and block
    scales taken from ``x`` at run time: what TensorRT-LLM's NVFP4 linears do with their
    ``input_scale``. A block larger than ``6 * 448 * global_scale`` saturates.

    Example::

        >>> args = QuantArgs(type="float", bits=4, granularity="group", group_size=16)
        >>> x = torch.tensor([[6.0] + [0.5] * 15])
        >>> quantize_nvfp4_static(x, args, torch.tensor(6 / 2688))[0, :2].tolist()   # calibrated amax 6
        [6.0, 0.5]
        >>> quantize_nvfp4_static(x, args, torch.tensor(3 / 2688))[0, :2].tolist()   # amax 3: saturates
        [3.0, 0.5]
    """
    return _dynamic(x, args, "group", global_scale)


def input_qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a static activation quantizer keeps from a calibrated range ``(lo, hi)``: its
    scale and zero point (:func:`qparams`), or, for a format whose block scales are taken at
    run time under a per-tensor scale (NVFP4), that FP32 global scale and no zero point.
    :func:`quantize_input` takes them back.

    Example::

        >>> nvfp4 = QuantArgs(type="float", bits=4, granularity="group", group_size=16)
        >>> input_qparams(torch.tensor(-2688.0), torch.tensor(1.0), nvfp4)
        (tensor(1.), None)
        >>> input_qparams(torch.tensor(-8.0), torch.tensor(7.0), QuantArgs(bits=4, granularity="tensor"))
        (tensor(1.), None)
    """
    fmt = formats.of(args)
    if fmt.has_global_scale:
        return fmt.global_scale(torch.maximum(-lo, hi)), None
    return qparams(lo, hi, args)


def quantize_input(x: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize activations as ``args`` says: dynamic ones with scales from ``x``
    (:func:`quantize_dynamic`), static ones with the ``scale`` and ``zero`` of
    :func:`input_qparams` (NVFP4: block scales from ``x`` under the calibrated global scale,
    :func:`quantize_nvfp4_static`).

    Example::

        >>> int8 = QuantArgs(bits=8, granularity="tensor")
        >>> quantize_input(torch.tensor([0.3, -1.0]), int8, torch.tensor(0.5)).tolist()
        [0.5, -1.0]
    """
    if args.dynamic:
        return quantize_dynamic(x, args)
    if formats.of(args).has_global_scale:
        return _dynamic(x, args, "group", scale)
    return fake_quantize(x, scale, zero, args)


def quantize_per_token(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantize activations with one scale per token (dynamic, over the last dim)."""
    return _dynamic(x, args, "token")


# -- packing -------------------------------------------------------------------------------

def _format(bits: int, symmetric: bool, format: str | None) -> formats.NumberFormat:
    return formats.by_name(format) if format is not None else formats.IntFormat(bits, symmetric)


def pack(codes: torch.Tensor, bits: int, symmetric: bool = True, format: str | None = None) -> torch.Tensor:
    """Pack codes along the last dim into uint8, as the native checkpoint stores them: the
    format's :meth:`~qframe.formats.NumberFormat.pack` (``format`` names a float format;
    without it, ``bits`` and ``symmetric`` an integer one).

    Integers: 2 (int4) or 4 (int2) per byte, stored offset to unsigned (``code + 2**(bits-1)``
    when symmetric), low nibble first; widths that do not divide 8 are stored one per byte.
    FP4: two E2M1 codes per byte, low nibble first. FP8: the float8 codes' bytes.

    Example::

        >>> pack(torch.tensor([[1, -2]], dtype=torch.int8), 4, True).tolist()
        [[105]]
        >>> pack(torch.tensor([[0b0011, 0b1010]], dtype=torch.uint8), 4, format="nvfp4").tolist()   # 1.5, -1
        [[163]]
    """
    return _format(bits, symmetric, format).pack(codes)


def unpack(packed: torch.Tensor, bits: int, symmetric: bool, length: int, format: str | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: codes of the given length along the last dim (int8 when
    symmetric int, uint8 when asymmetric or FP4, the float8 dtype for FP8)."""
    return _format(bits, symmetric, format).unpack(packed, length)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes ``[out, in]`` (int8, -8..7) packed two a byte along the *output*
    rows, as TensorRT-LLM's and the unified HF checkpoint's AWQ weights hold them:
    ``byte[j, k] = (q[2j, k] & 0xF) | (q[2j+1, k] << 4)``, uint8 ``[out/2, in]``.

    Example::

        >>> pack_int4_rows(torch.tensor([[1], [-2]], dtype=torch.int8)).tolist()
        [[225]]
    """
    u = codes.to(torch.int16) & 0xF
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_rows` (uint8, or the same bytes viewed as int8): int8
    codes ``[2 * rows, in]``.

    Example::

        >>> unpack_int4_rows(pack_int4_rows(torch.tensor([[7], [-8]], dtype=torch.int8))).flatten().tolist()
        [7, -8]
    """
    u = packed.view(torch.uint8).to(torch.int16)
    rows = torch.stack([u & 0xF, u >> 4], dim=1).reshape(-1, packed.shape[-1])
    return torch.where(rows > 7, rows - 16, rows).to(torch.int8)
