"""Quantization arithmetic for every number format: ranges to scales, quantize, dequantize, pack.

Formats (``QuantArgs.type``, ``bits`` and ``format``):

- ``int2``-``int8``, symmetric (the *fitted* scale, see :func:`qparams`) or asymmetric (a zero point).
- FP8 ``e4m3`` (max 448) and ``e5m2`` (max 57344): ``scale = amax / fmax``; ``x / scale`` is
  clamped to ``±fmax`` (saturating) and cast to ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``,
  which rounds to nearest, ties to even.
- ``nvfp4``: FP4 E2M1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) in blocks of 16.
  A per-tensor FP32 global scale ``amax / (6 * 448)``; each block's scale
  ``amax_block / (6 * global)`` rounded to E4M3 (clamped to [2^-9, 448]; an all-zero block
  gets 1). The effective scale is ``e4m3(block) * global``.
- ``mxfp4``: E2M1 elements in blocks of 32 with an E8M0 power-of-two scale, as the OCP
  Microscaling spec v1.0 defines it: ``X = 2^(floor(log2(amax_block)) - 2)`` (2 is E2M1's
  largest exponent), clamped to [2^-127, 2^127]; elements saturate at ±6. An all-zero block
  gets 2^-127.

E2M1 rounds to nearest with ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
2.5 -> 2, 3.5 -> 4, 5 -> 4), as modelopt's NVFP4 cast does. Ranges ignore NaN and inf, so
neither ever reaches a scale; NaN elements become code 0 in int and FP4 storage (FP8 keeps NaN).

One shape of API for all of them::

    scale, zero = qparams(lo, hi, args)       # zero is None unless asymmetric int
    q = quantize(x, scale, zero, args)        # grid values in the scaled domain, float32
    x_hat = dequantize(q, scale, zero)        # q * scale, or (q - zero) * scale
    fake_quantize(x, scale, zero, args)       # both, in x's dtype

Weights: :func:`quantize_weight` returns a :class:`QuantizedWeight` holding storage codes
(``int8``/``uint8`` for int, ``float8_e4m3fn``/``float8_e5m2`` for FP8, ``uint8`` E2M1 nibble
codes 0-15 for FP4, sign in bit 3), stored scales (``float32``; NVFP4 block scales as
``float8_e4m3fn`` with a ``global_scale``; MXFP4 as ``uint8`` E8M0 biased exponents) and zero
points. Activations quantized at run time: :func:`quantize_dynamic`.

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

from .scheme import QuantArgs

# Smallest scale: keeps an all-zero group finite (its codes are all zero-point).
MIN_SCALE = 1e-12
# Infinite range ends become the largest float32, so no scale is ever inf or NaN.
FLOAT32_MAX = torch.finfo(torch.float32).max

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP4_FORMATS = ("nvfp4", "mxfp4")
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SCALE = 2.0**-9  # the smallest E4M3 subnormal: NVFP4 block scales never round to zero
E8M0_BIAS = 127
E2M1_EMAX = 2  # exponent of E2M1's largest power of two (4 = 2^2), OCP MX's emax_elem
# E2M1 magnitudes by the low three bits of a code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; ties at 0.75, 1.75 and 3.5 go up (to the even code).
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _is_fp8(args: QuantArgs) -> bool:
    return args.type == "float" and args.format in FP8_DTYPES


def _is_fp4(args: QuantArgs) -> bool:
    return args.type == "float" and args.format in FP4_FORMATS


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


def _div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` correctly rounded on every device. (CUDA replaces a division by a Python
    number with a multiplication by its reciprocal, which differs from the CPU in the last bit.)"""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def _sanitized(t: torch.Tensor) -> torch.Tensor:
    """A range end as float32 with NaN read as 0 and inf as the largest finite float."""
    return torch.nan_to_num(t.float(), nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)


# -- FP4 E2M1 and the two-level / power-of-two scales ----------------------------------------

def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0-15; bit 3 the sign) of values already divided by their scale.

    Round to nearest, ties to the even code; magnitudes above 6 (inf too) saturate to 6; NaN
    becomes ±0. The sign bit is kept: a negative value that rounds to zero, and -0.0 itself,
    give code 8 (-0.0), so ``e2m1_encode(e2m1_decode(c)) == c`` for every code.

    Example::

        >>> e2m1_encode(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 9.0, -1.6])).tolist()
        [0, 2, 2, 4, 4, 6, 6, 7, 11]
    """
    v = v.float()
    mag = torch.nan_to_num(v.abs(), nan=0.0)
    bounds = torch.tensor(_E2M1_BOUNDS, device=v.device)
    code = torch.bucketize(mag, bounds)  # bounds[i-1] < mag <= bounds[i]: ties go down ...
    code += (mag == 0.75) | (mag == 1.75) | (mag == 3.5)  # ... except onto an odd code
    return code.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes."""
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 global scale for a tensor whose largest magnitude is ``amax``:
    ``amax / (6 * 448)``, or 1 where ``amax`` is 0 (what TensorRT-LLM stores as an NVFP4
    linear's ``weights_scaling_factor_2`` and, for activations, ``input_scale``).

    Example::

        >>> nvfp4_global_scale(torch.tensor([2688.0, 0.0])).tolist()
        [1.0, 1.0]
    """
    global_scale = _div(_sanitized(amax).abs(), E2M1_MAX * E4M3_MAX)
    return torch.where(global_scale > 0, global_scale, torch.ones_like(global_scale))


def nvfp4_scales(
    amax_block: torch.Tensor, amax_global: torch.Tensor | None = None, *, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 block scales (``float8_e4m3fn``, shaped like ``amax_block``) and the FP32 global scale.

    ``global = amax_global / (6 * 448)`` (``amax_global`` defaults to the largest block amax:
    the tensor's; a calibrated ``global_scale`` may be given instead); ``block =
    e4m3(amax_block / (6 * global))``, clamped to [2^-9, 448]. An all-zero block gets 1, an
    all-zero tensor a global scale of 1. The arithmetic and its order
    are modelopt's (``NVFP4QTensor``), so both give the same bits.

    Example::

        >>> block, glob = nvfp4_scales(torch.tensor([[6 * 448.0, 6 * 100.0, 0.0]]))
        >>> block.float().tolist(), glob.item()
        ([[448.0, 96.0, 1.0]], 1.0)
    """
    amax_block = _sanitized(amax_block).abs()
    if global_scale is None:
        global_scale = nvfp4_global_scale(amax_block.amax() if amax_global is None else amax_global)
    global_scale = global_scale.float()
    block = amax_block / (E2M1_MAX * global_scale)
    block = torch.where(block == 0, torch.ones_like(block), block)
    return block.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn), global_scale


def mxfp4_scales(amax_block: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (uint8 biased exponents) per the OCP MX spec v1.0, section 6.3:
    ``X = 2^(floor(log2(amax)) - 2)``, the exponent clamped to [-127, 127]; an all-zero
    block gets the smallest, 2^-127 (code 0). ``floor(log2)`` is read exactly off the float's
    exponent.

    Example::

        >>> mxfp4_scales(torch.tensor([4.0, 7.99, 8.0, 0.0])).tolist()   # 2^0, 2^0, 2^1, 2^-127
        [127, 127, 128, 0]
    """
    amax = _sanitized(amax_block).abs()
    _, exponent = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1
    shared = (exponent.to(torch.int32) - 1 - E2M1_EMAX).clamp(-E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS))
    return (shared + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """Float32 value of E8M0 biased exponents: ``2^(code - 127)``, built from its bits (exact on
    every device: ``exp2`` may flush the subnormal 2^-127 to zero). Code 255 (NaN) is never made.

    Example::

        >>> e8m0_decode(torch.tensor([127, 128, 0], dtype=torch.uint8)).tolist() == [1.0, 2.0, 2.0**-127]
        True
    """
    code = scale.to(torch.int32)
    bits = torch.where(code > 0, code << 23, torch.full_like(code, 1 << 22))  # 2^-127 is subnormal
    return bits.view(torch.float32)


# -- ranges to scales -------------------------------------------------------------------------

def scale_parts(
    lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The scales as stored: ``(scale, zero, global_scale)``.

    ``scale`` is float32, except for NVFP4 (``float8_e4m3fn`` block scales, with a scalar
    ``global_scale``: the one given, else from the largest range) and MXFP4 (``uint8`` E8M0
    exponents). ``zero`` only for asymmetric int.
    """
    lo = torch.minimum(_sanitized(lo), torch.zeros((), device=lo.device))
    hi = torch.maximum(_sanitized(hi), torch.zeros((), device=hi.device))
    if _is_fp4(args):
        amax = torch.maximum(-lo, hi)
        if args.format == "nvfp4":
            block, global_scale = nvfp4_scales(amax, global_scale=global_scale)
            return block, None, global_scale
        return mxfp4_scales(amax), None, None
    if args.symmetric:  # int (fitted) and FP8 (qmin = -qmax = -fmax: amax / fmax)
        scale = torch.maximum(_div(hi, args.qmax), _div(lo, args.qmin))
        return scale.clamp(MIN_SCALE, FLOAT32_MAX), None, None
    scale = _div(hi - lo, args.qmax - args.qmin).clamp(MIN_SCALE, FLOAT32_MAX)
    zero = (args.qmin - lo / scale).round().clamp(args.qmin, args.qmax)
    return scale, zero, None


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """The float32 scale the arithmetic uses, from the scale as stored."""
    if _is_fp4(args) and args.format == "mxfp4":
        return e8m0_decode(scale)
    if global_scale is not None:
        return scale.float() * global_scale.float()
    return scale.float()


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
    if _is_fp8(args):
        return q.clamp(-args.fmax, args.fmax).to(FP8_DTYPES[args.format]).float()
    if _is_fp4(args):
        return e2m1_decode(e2m1_encode(q))
    if zero is not None:
        q = q + zero
    return q.round().clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype."""
    return dequantize(quantize(x, scale, zero, args), scale, zero).to(x.dtype)


def code_dtype(args: QuantArgs) -> torch.dtype:
    """The dtype of stored codes: int8/uint8 (int), torch float8 (FP8), uint8 nibble codes (FP4)."""
    if _is_fp8(args):
        return FP8_DTYPES[args.format]
    if _is_fp4(args):
        return torch.uint8
    return torch.int8 if args.symmetric else torch.uint8


def scale_dtype(args: QuantArgs) -> torch.dtype:
    """The dtype of stored scales: float32, float8_e4m3fn (NVFP4 blocks) or uint8 (MXFP4 E8M0)."""
    if _is_fp4(args):
        return torch.float8_e4m3fn if args.format == "nvfp4" else torch.uint8
    return torch.float32


def encode(q: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Storage codes of grid values from :func:`quantize`."""
    if _is_fp8(args):
        return q.to(FP8_DTYPES[args.format])
    if _is_fp4(args):
        return e2m1_encode(q)
    return torch.nan_to_num(q, nan=0.0).to(code_dtype(args))


def decode(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Float32 grid values of storage codes (inverse of :func:`encode`)."""
    if _is_fp4(args):
        return e2m1_decode(codes)
    return codes.float()


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
) -> QuantizedWeight:
    """Round a weight ``[out, in]`` to the grid ``args`` defines, with ranges per tensor,
    channel or group (default: their min/max; :func:`mse_ranges` searches clipped ones).
    NVFP4's global scale comes from the weight's own largest magnitude (so clipped ranges
    shrink the block scales under it) unless ``global_scale`` is given: an algorithm that
    changes the weight as it rounds (GPTQ) passes the original one, so that rounding its
    result again reproduces the same codes."""
    lo, hi = ranges if ranges is not None else minmax_ranges(w, args)
    g = grouped(w.float(), args)
    if global_scale is None:
        global_scale = weight_global_scale(w, args)
    scale, zero, global_scale = scale_parts(lo, hi, args, global_scale)
    scale = served_scale(scale, args, w.dtype)
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
    if args.type != "int" or args.granularity != "group" or dtype not in (torch.float16, torch.bfloat16):
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
    if not (_is_fp4(args) and args.format == "nvfp4"):
        return None
    return nvfp4_global_scale(_finite(w.float()).abs().amax())


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

def _dynamic(x: torch.Tensor, args: QuantArgs, granularity: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.float()
    if granularity == "group":
        size = args.group_size
        length = xf.shape[-1]
        pad = -length % size
        blocks = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
        blocks = blocks.reshape(*xf.shape[:-1], -1, size)
        finite = _finite(blocks)
        lo, hi = finite.amin(dim=-1, keepdim=True), finite.amax(dim=-1, keepdim=True)
        if _is_fp4(args) and args.format == "nvfp4":
            amax = torch.maximum(-lo, hi)
            if global_scale is None:  # per token: no token depends on another
                block, global_scale = nvfp4_scales(amax, amax.amax(dim=-2, keepdim=True))
            else:  # static, calibrated
                block, global_scale = nvfp4_scales(amax, global_scale=global_scale.to(amax.device))
            scale, zero = block.float() * global_scale, None
        else:
            scale, zero = qparams(lo, hi, args)
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


def quantize_per_token(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantize activations with one scale per token (dynamic, over the last dim)."""
    return _dynamic(x, args, "token")


# -- packing -------------------------------------------------------------------------------

def pack(codes: torch.Tensor, bits: int, symmetric: bool = True, format: str | None = None) -> torch.Tensor:
    """Pack codes along the last dim into uint8.

    Integers: 2 (int4) or 4 (int2) per byte, stored offset to unsigned (``code + 2**(bits-1)``
    when symmetric), low nibble first; widths that do not divide 8 are stored one per byte.
    ``format`` ``"nvfp4"``/``"mxfp4"``: two E2M1 codes per byte, low nibble first.
    ``"e4m3"``/``"e5m2"``: the float8 codes' bytes (a uint8 view).

    Example::

        >>> pack(torch.tensor([[1, -2]], dtype=torch.int8), 4, True).tolist()
        [[105]]
        >>> pack(torch.tensor([[0b0011, 0b1010]], dtype=torch.uint8), 4, format="nvfp4").tolist()   # 1.5, -1
        [[163]]
    """
    if format in FP8_DTYPES:
        return codes.to(FP8_DTYPES[format]).view(torch.uint8)
    if format in FP4_FORMATS:
        bits, symmetric = 4, False
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


def unpack(packed: torch.Tensor, bits: int, symmetric: bool, length: int, format: str | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: codes of the given length along the last dim (int8 when
    symmetric int, uint8 when asymmetric or FP4, the float8 dtype for FP8)."""
    if format in FP8_DTYPES:
        return packed.contiguous().view(FP8_DTYPES[format])[..., :length]
    if format in FP4_FORMATS:
        bits, symmetric = 4, False
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
