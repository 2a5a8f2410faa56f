"""Number formats: one registered object per format, owning its codec, limits, storage and packing.

A format answers everything that depends on *what the numbers are*:

- its limits: ``bits``, ``qmin``/``qmax`` (the grid's ends in the scaled domain) and ``max``
  (the largest magnitude: 448 for E4M3, 57344 for E5M2, 6 for E2M1, ``qmax`` for int);
- its codec: :meth:`~NumberFormat.quantize` (values already divided by their scale, and
  offset by the zero point, onto the grid), :meth:`~NumberFormat.encode` (grid values to
  storage codes) and :meth:`~NumberFormat.decode` (codes back to float32 grid values);
- its scales: how stored scales follow from a range (:meth:`~NumberFormat.scale_parts`),
  what they are worth (:meth:`~NumberFormat.effective_scale`), their dtype, and, for FP4, the
  ``block`` of input channels one scale covers; NVFP4 adds a per-tensor FP32 global scale;
- its storage: ``code_dtype``, ``scale_dtype`` and the native checkpoint's packing along the
  last dimension (:meth:`~NumberFormat.pack`, :meth:`~NumberFormat.unpack`).

What does not depend on the format (grouping, range search, run-time activation policy)
lives in :mod:`qframe.numerics`, which reaches every format through :func:`of`.

Formats (``QuantArgs.type``, ``bits`` and ``format``):

- ``int2``-``int8`` symmetric (the *fitted* scale ``max(hi / qmax, lo / qmin)``) and
  ``uint2``-``uint8`` (asymmetric, with a zero point): :class:`IntFormat`.
- FP8 ``e4m3`` (max 448) and ``e5m2`` (max 57344): ``scale = amax / max``; values are clamped
  to ``±max`` (saturating) and cast to ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``, which
  rounds to nearest, ties to even: :class:`FloatFormat`.
- ``nvfp4``: FP4 E2M1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) in blocks of 16.
  A per-tensor FP32 global scale ``amax / (6 * 448)``; each block's scale
  ``amax_block / (6 * global)`` rounded to E4M3 (clamped to [2^-9, 448]; an all-zero block
  gets 1). The effective scale is ``e4m3(block) * global``.
- ``mxfp4``: E2M1 elements in blocks of 32 with an E8M0 power-of-two scale, as the OCP
  Microscaling spec v1.0 defines it: ``X = 2^(floor(log2(amax_block)) - 2)`` (2 is E2M1's
  largest exponent), clamped to [2^-127, 2^127]; elements saturate at ±6. An all-zero block
  gets 2^-127.

E2M1 rounds to nearest with ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
2.5 -> 2, 3.5 -> 4, 5 -> 4), as modelopt's NVFP4 cast does. NaN elements become code 0 in int
and FP4 storage (FP8 keeps NaN).

A plugin adds a float format with :func:`register`; :class:`~qframe.scheme.QuantArgs` then
accepts its name as ``format`` and :func:`by_name` finds it.

Example::

    >>> from qframe.scheme import QuantArgs
    >>> of(QuantArgs.from_table({"format": "nvfp4"}, role="weights")) is NVFP4
    True
    >>> fmt = by_name("uint4")
    >>> fmt, fmt.qmin, fmt.qmax, fmt.code_dtype
    (IntFormat(bits=4, symmetric=False), 0, 15, torch.uint8)
    >>> E4M3.max, NVFP4.block, MXFP4.scale_dtype
    (448.0, 16, torch.uint8)
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import PluginError

if TYPE_CHECKING:  # scheme.py imports this module; the reverse import is for type hints only
    from .scheme import QuantArgs

# Stored scales: (scale, zero point or None, global scale or None).
Scales = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]

# Smallest scale: keeps an all-zero group finite (its codes are all zero-point).
MIN_SCALE = 1e-12
# Infinite range ends become the largest float32, so no scale is ever inf or NaN.
FLOAT32_MAX = torch.finfo(torch.float32).max
# Integer widths: every code fits one byte.
INT_BITS = (2, 3, 4, 5, 6, 7, 8)

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_MIN_SCALE = 2.0**-9  # the smallest E4M3 subnormal: NVFP4 block scales never round to zero
E8M0_BIAS = 127
E2M1_EMAX = 2  # exponent of E2M1's largest power of two (4 = 2^2), OCP MX's emax_elem
# E2M1 magnitudes by the low three bits of a code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; ties at 0.75, 1.75 and 3.5 go up (to the even code).
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_INT_NAME = re.compile(r"(u?)int(\d+)")


def _div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` correctly rounded on every device. (CUDA replaces a division by a Python
    number with a multiplication by its reciprocal, which differs from the CPU in the last bit.)"""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def _sanitized(t: torch.Tensor) -> torch.Tensor:
    """A range end as float32 with NaN read as 0 and inf as the largest finite float."""
    return torch.nan_to_num(t.float(), nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)


# -- element and scale codecs ------------------------------------------------------------------

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
    """Float32 values of E2M1 codes.

    Example::

        >>> e2m1_decode(torch.tensor([3, 10, 7], dtype=torch.uint8)).tolist()
        [1.5, -1.0, 6.0]
    """
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
    global_scale = _div(_sanitized(amax).abs(), E2M1_MAX * FP8_E4M3_MAX)
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
    return block.clamp(E4M3_MIN_SCALE, FP8_E4M3_MAX).to(torch.float8_e4m3fn), global_scale


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


def _pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (uint8) packed ``8 // bits`` a byte along the last dim, low bits first;
    widths that do not divide 8 (and 8 itself) stay one a byte."""
    if 8 % bits or bits == 8:
        return u
    per_byte = 8 // bits
    pad = (-u.shape[-1]) % per_byte
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, per_byte)
    # OR-ed a code at a time in uint8: no widened copy of the whole weight (a 58M-weight linear
    # would take 700 MB of int32/int64 temporaries); codes are below 2**bits, so nothing overflows.
    packed = u[..., 0].clone()
    for k in range(1, per_byte):
        packed |= u[..., k] << (k * bits)
    return packed


def _unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: unsigned codes as int16, ``length`` along the last dim."""
    if 8 % bits or bits == 8:
        return packed.to(torch.int16)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int16) * bits
    u = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(*packed.shape[:-1], -1)[..., :length]


def _symmetric_scale(lo: torch.Tensor, hi: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    # The fitted scale: nothing observed is clipped, and int's extra negative code is used
    # whenever the negative extreme dominates (FP8's grid is symmetric: amax / max).
    return torch.maximum(_div(hi, qmax), _div(lo, qmin)).clamp(MIN_SCALE, FLOAT32_MAX)


# -- the formats -------------------------------------------------------------------------------

class NumberFormat(ABC):
    """What every number format provides; :class:`IntFormat` and :class:`FloatFormat` are the
    two families (and :class:`FP4Format` a kind of float).

    Attributes: ``name``, ``bits``, ``max`` (largest magnitude), ``qmin``/``qmax``,
    ``symmetric``, ``block`` (input channels per scale, FP4; else ``None``), ``code_dtype``,
    ``scale_dtype`` and ``has_global_scale`` (a per-tensor FP32 scale over the stored scales).

    Example::

        >>> isinstance(NVFP4, NumberFormat), isinstance(INT4, NumberFormat)
        (True, True)
    """

    has_global_scale = False

    @property
    def qmin(self) -> int | float:
        return -self.max

    @property
    def qmax(self) -> int | float:
        return self.max

    @abstractmethod
    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        """Values already divided by their scale (and offset by the zero point) onto this
        format's grid, as float32."""
        raise NotImplementedError

    @abstractmethod
    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Storage codes (``code_dtype``) of grid values from :meth:`quantize`."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 grid values of storage codes (inverse of :meth:`encode`)."""
        return codes.float()

    @abstractmethod
    def scale_parts(self, lo: torch.Tensor, hi: torch.Tensor, global_scale: torch.Tensor | None = None) -> Scales:
        """The scales as stored, ``(scale, zero, global_scale)``, for float32 ranges with
        ``lo <= 0 <= hi`` (finite; :func:`qframe.numerics.scale_parts` makes them so)."""
        raise NotImplementedError

    def effective_scale(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 scale the arithmetic uses, from the scale as stored."""
        if global_scale is not None:
            return scale.float() * global_scale.float()
        return scale.float()

    def global_scale(self, amax: torch.Tensor) -> torch.Tensor | None:
        """The per-tensor FP32 scale over the stored scales for a tensor whose largest
        magnitude is ``amax``; ``None`` for formats without one (all but NVFP4)."""
        return None

    @abstractmethod
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes packed along the last dim into uint8, as the native checkpoint stores them."""
        raise NotImplementedError

    @abstractmethod
    def unpack(self, packed: torch.Tensor, length: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``length`` codes along the last dim, in ``code_dtype``."""
        raise NotImplementedError


@dataclass(frozen=True)
class IntFormat(NumberFormat):
    """Integers of ``bits`` (2-8): symmetric codes ``-2^(bits-1) .. 2^(bits-1) - 1`` (int8
    storage) with the fitted scale ``max(hi / qmax, lo / qmin)``, or asymmetric codes
    ``0 .. 2^bits - 1`` (uint8) with a zero point. Packed ``8 // bits`` a byte when the width
    divides 8 (symmetric codes offset by ``2^(bits-1)``), low bits first; else one a byte.

    Example::

        >>> INT4.name, INT4.qmin, INT4.qmax, INT4.max, INT4.code_dtype
        ('int4', -8, 7, 7, torch.int8)
        >>> INT4.pack(torch.tensor([[1, -2]], dtype=torch.int8)).tolist()   # 9 | 6 << 4
        [[105]]
        >>> INT4.quantize(torch.tensor([2.5, -9.0, 7.6])).tolist()
        [2.0, -8.0, 7.0]
    """

    bits: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in INT_BITS:
            raise ValueError(f"integer formats have {INT_BITS[0]}-{INT_BITS[-1]} bits, not {self.bits!r}")

    @property
    def name(self) -> str:
        return f"{'int' if self.symmetric else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def max(self) -> int:
        return self.qmax

    @property
    def block(self) -> None:
        return None

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        return v.round().clamp(self.qmin, self.qmax)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(q, nan=0.0).to(self.code_dtype)

    def scale_parts(self, lo: torch.Tensor, hi: torch.Tensor, global_scale: torch.Tensor | None = None) -> Scales:
        if self.symmetric:
            return _symmetric_scale(lo, hi, self.qmin, self.qmax), None, None
        scale = _div(hi - lo, self.qmax - self.qmin).clamp(MIN_SCALE, FLOAT32_MAX)
        zero = (self.qmin - lo / scale).round().clamp(self.qmin, self.qmax)
        return scale, zero, None

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        u = codes.to(torch.int16) + ((1 << (self.bits - 1)) if self.symmetric else 0)
        return _pack_bits(u.to(torch.uint8), self.bits)

    def unpack(self, packed: torch.Tensor, length: int) -> torch.Tensor:
        u = _unpack_bits(packed, self.bits, length)
        if self.symmetric:
            return (u - (1 << (self.bits - 1))).to(torch.int8)
        return u.to(torch.uint8)


@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """A float format whose codes are a torch dtype (FP8): saturating at ``±max``, rounding
    as the cast to ``code_dtype`` does (to nearest, ties to even), one scale ``amax / max``
    per tensor, channel or group (float32). Stored and packed as the codes' bytes.

    Example::

        >>> E4M3.quantize(torch.tensor([1.0625, 300.0, 460.0])).tolist()   # ties to even; saturates
        [1.0, 288.0, 448.0]
        >>> E5M2.pack(torch.tensor([[1.0, -2.0]])).tolist()
        [[60, 192]]
    """

    name: str
    bits: int
    max: float
    code_dtype: torch.dtype
    scale_dtype: torch.dtype = torch.float32
    block: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name) or _INT_NAME.fullmatch(self.name):
            raise PluginError(f"number format name {self.name!r}: expected lower-case letters, digits and _, "
                              "starting with a letter, and not an integer format's name (int4, uint8)")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise PluginError(f"number format {self.name!r}: bits {self.bits!r}; expected 1-8 (codes fit a byte)")
        if not (isinstance(self.max, (int, float)) and math.isfinite(self.max) and self.max > 0):
            raise PluginError(f"number format {self.name!r}: max {self.max!r}; expected a positive finite number")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int)
                                       or self.block < 1):
            raise PluginError(f"number format {self.name!r}: block {self.block!r}; expected a positive integer")

    @property
    def symmetric(self) -> bool:
        return True

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        return v.clamp(-self.max, self.max).to(self.code_dtype).float()

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(self.code_dtype)

    def scale_parts(self, lo: torch.Tensor, hi: torch.Tensor, global_scale: torch.Tensor | None = None) -> Scales:
        return _symmetric_scale(lo, hi, self.qmin, self.qmax), None, None

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(self.code_dtype).view(torch.uint8)

    def unpack(self, packed: torch.Tensor, length: int) -> torch.Tensor:
        return packed.contiguous().view(self.code_dtype)[..., :length]


@dataclass(frozen=True)
class FP4Format(FloatFormat):
    """FP4 E2M1 elements (uint8 codes 0-15, bit 3 the sign) in blocks of ``block`` input
    channels, packed two a byte, low nibble first. Subclasses say how block scales are made
    (:class:`NVFP4Format`, :class:`MXFP4Format`).

    Example::

        >>> NVFP4.pack(torch.tensor([[0b0011, 0b1010]], dtype=torch.uint8)).tolist()   # 1.5, -1
        [[163]]
        >>> MXFP4.quantize(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0])).tolist()
        [0.0, 1.0, 2.0, 4.0, 6.0]
    """

    bits: int = 4
    max: float = E2M1_MAX
    code_dtype: torch.dtype = torch.uint8

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        return e2m1_decode(e2m1_encode(v))

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        return e2m1_encode(q)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return e2m1_decode(codes)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return _pack_bits(codes.to(torch.int16).to(torch.uint8), 4)

    def unpack(self, packed: torch.Tensor, length: int) -> torch.Tensor:
        return _unpack_bits(packed, 4, length).to(torch.uint8)


@dataclass(frozen=True)
class NVFP4Format(FP4Format):
    """E2M1 with E4M3 block scales under a per-tensor FP32 global scale (see
    :func:`nvfp4_scales`).

    Example::

        >>> block, _, glob = NVFP4.scale_parts(torch.tensor([[-600.0]]), torch.tensor([[2688.0]]))
        >>> block.float().tolist(), glob.item(), NVFP4.has_global_scale
        ([[448.0]], 1.0, True)
    """

    scale_dtype: torch.dtype = torch.float8_e4m3fn
    has_global_scale = True

    def scale_parts(self, lo: torch.Tensor, hi: torch.Tensor, global_scale: torch.Tensor | None = None) -> Scales:
        block, global_scale = nvfp4_scales(torch.maximum(-lo, hi), global_scale=global_scale)
        return block, None, global_scale

    def global_scale(self, amax: torch.Tensor) -> torch.Tensor:
        return nvfp4_global_scale(amax)


@dataclass(frozen=True)
class MXFP4Format(FP4Format):
    """E2M1 with E8M0 power-of-two block scales (uint8 biased exponents, see
    :func:`mxfp4_scales`).

    Example::

        >>> scale, _, _ = MXFP4.scale_parts(torch.tensor([-1.0]), torch.tensor([8.0]))
        >>> scale.tolist(), MXFP4.effective_scale(scale).tolist()
        ([128], [2.0])
    """

    scale_dtype: torch.dtype = torch.uint8

    def scale_parts(self, lo: torch.Tensor, hi: torch.Tensor, global_scale: torch.Tensor | None = None) -> Scales:
        return mxfp4_scales(torch.maximum(-lo, hi)), None, None

    def effective_scale(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        return e8m0_decode(scale)


# -- the registry ------------------------------------------------------------------------------

_FLOATS: dict[str, FloatFormat] = {}


def register(fmt: FloatFormat) -> FloatFormat:
    """Add a float format, by its name, to those :func:`by_name` finds and ``QuantArgs``
    accepts as ``format`` (the first registered of a width is that width's default).
    Registering the same format again is a no-op; another one under a taken name is a
    :class:`~qframe.errors.PluginError` naming both.

    Example::

        >>> register(FloatFormat("e4m3", 8, 448.0, torch.float8_e4m3fn)) is E4M3   # the same: a no-op
        True
        >>> register(FloatFormat("e4m3", 8, 240.0, torch.float8_e4m3fn))
        Traceback (most recent call last):
        ...
        qframe.errors.PluginError: number format 'e4m3' is registered already as FloatFormat(name='e4m3', bits=8, max=448.0, code_dtype=torch.float8_e4m3fn, scale_dtype=torch.float32, block=None); a second one, FloatFormat(name='e4m3', bits=8, max=240.0, code_dtype=torch.float8_e4m3fn, scale_dtype=torch.float32, block=None), cannot take its name
    """
    if not isinstance(fmt, FloatFormat):
        raise PluginError(f"register() takes a FloatFormat, not {fmt!r}; integer formats need no registration")
    existing = _FLOATS.get(fmt.name)
    if existing is not None:
        if existing != fmt:
            raise PluginError(f"number format {fmt.name!r} is registered already as {existing!r}; a second one, "
                              f"{fmt!r}, cannot take its name")
        return existing
    _FLOATS[fmt.name] = fmt
    return fmt


def floats(bits: int | None = None) -> tuple[FloatFormat, ...]:
    """The registered float formats (of one width when ``bits`` is given), in the order they
    were registered: the first of a width is its default.

    Example::

        >>> [f.name for f in floats(8)], [f.name for f in floats(4)]
        (['e4m3', 'e5m2'], ['nvfp4', 'mxfp4'])
    """
    return tuple(f for f in _FLOATS.values() if bits is None or f.bits == bits)


@functools.lru_cache(maxsize=None)
def _int_format(bits: int, symmetric: bool) -> IntFormat:
    # One object per integer format, so that ``of(args) is INT4`` holds as it does for floats.
    return IntFormat(bits, symmetric)


def by_name(name: str) -> NumberFormat:
    """The format called ``name``: ``int2``-``int8``, ``uint2``-``uint8`` (asymmetric), or a
    registered float format (``e4m3``, ``e5m2``, ``nvfp4``, ``mxfp4``, ...).

    Example::

        >>> by_name("e4m3") is E4M3, by_name("int4") is INT4
        (True, True)
        >>> by_name("fp6")
        Traceback (most recent call last):
        ...
        KeyError: "unknown number format 'fp6'; known: int2-int8, uint2-uint8, e4m3, e5m2, nvfp4, mxfp4"
    """
    if name in _FLOATS:
        return _FLOATS[name]
    match = _INT_NAME.fullmatch(name) if isinstance(name, str) else None
    if match and int(match[2]) in INT_BITS:
        return _int_format(int(match[2]), not match[1])
    known = ", ".join([f"int{INT_BITS[0]}-int{INT_BITS[-1]}", f"uint{INT_BITS[0]}-uint{INT_BITS[-1]}", *_FLOATS])
    raise KeyError(f"unknown number format {name!r}; known: {known}")


def of(args: QuantArgs) -> NumberFormat:
    """The number format of a :class:`~qframe.scheme.QuantArgs` (weights or activations);
    also ``args.number_format``.

    Example::

        >>> from qframe.scheme import QuantArgs
        >>> of(QuantArgs(bits=4, symmetric=False)).name, of(QuantArgs(type="float", bits=8)) is E4M3
        ('uint4', True)
    """
    if args.type == "int":
        return _int_format(args.bits, args.symmetric)
    return by_name(args.format)


E4M3 = register(FloatFormat("e4m3", 8, FP8_E4M3_MAX, torch.float8_e4m3fn))
E5M2 = register(FloatFormat("e5m2", 8, 57344.0, torch.float8_e5m2))
NVFP4 = register(NVFP4Format("nvfp4", block=16))
MXFP4 = register(MXFP4Format("mxfp4", block=32))
INT4 = _int_format(4, True)
INT8 = _int_format(8, True)
