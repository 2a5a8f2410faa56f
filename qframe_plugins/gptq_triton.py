"""GPTQ's column loop as one Triton kernel per block of columns (CUDA only).

Rounding a block of ``n`` columns takes ``n`` sequential steps: round column ``i``, divide its
error by ``U[i, i]`` and subtract ``err ⊗ U[i, i:]`` from the block. In PyTorch that is a
dozen tiny kernels per column, so a Llama-8B layer (26,624 columns) is bound by launch
overhead. Rows are independent given the Hessian, so one program here holds a tile of rows ×
the whole block in registers and runs every step of the block; the update of the columns after
the block stays one matmul outside.

The kernel does exactly the arithmetic of the PyTorch loop in ``gptq.gptq_batched``, operation
for operation (IEEE division, no fused multiply-add), so both give the same bits; the tests
check that for every grid it supports: integer grids (round half to even, clamp), FP8 E4M3
(saturating cast) and FP4 E2M1 (nearest, ties to the even code, saturating at 6). Another
number format (a plugin's) keeps the PyTorch loop.

Example (CUDA with Triton)::

    >>> grid = kernel_grid(formats.of(QuantArgs(bits=4)))   # doctest: +SKIP
    >>> round_block(block, upper_block, scales, None, quantized, errors, row_error, 0, 128, grid)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qframe import formats

try:  # Triton ships with CUDA builds of torch; CPU builds fall back to the PyTorch loop
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

INT, FP8, E2M1 = 0, 1, 2
ROWS = 16  # rows per program: a 16 × 128 float32 tile, plus its rounded values and errors


@dataclass(frozen=True)
class KernelGrid:
    """Which grid the kernel rounds to: ``kind`` (INT, FP8 or E2M1) and the integer clamp."""

    kind: int
    qmin: float = 0.0
    qmax: float = 0.0


def kernel_grid(fmt: formats.NumberFormat) -> KernelGrid | None:
    """The kernel's grid for a number format, or None where only the PyTorch loop rounds
    exactly as the format does (a subclass may round its own way)."""
    if type(fmt) is formats.IntFormat:
        return KernelGrid(INT, float(fmt.qmin), float(fmt.qmax))
    if type(fmt) is formats.FloatFormat and fmt.code_dtype == torch.float8_e4m3fn and fmt.max == 448.0:
        return KernelGrid(FP8)
    if type(fmt) in (formats.NVFP4Format, formats.MXFP4Format):
        return KernelGrid(E2M1)
    return None


def available(device: torch.device) -> bool:
    """True where the kernel runs: a CUDA device and an importable Triton."""
    return triton is not None and device.type == "cuda"


def round_block(block: torch.Tensor, upper: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                quantized: torch.Tensor, errors: torch.Tensor, row_error: torch.Tensor, first: int, last: int,
                grid: KernelGrid) -> None:
    """Round columns ``first .. last-1`` of ``block [B, R, n]`` in place, as the PyTorch loop
    does: each column's rounded value goes to ``quantized``, its scaled error to ``errors``
    (both ``[B, R, n]``), ``Σ err²`` is added to ``row_error [B, R]``, and every later column of
    the block is updated through ``upper [B, n, n]``. ``scales``/``zeros`` are per element,
    ``[B, R, n]``. All tensors are contiguous float32 on one CUDA device."""
    b, rows, n = block.shape
    width = triton.next_power_of_2(n)
    _round_block[(triton.cdiv(rows, ROWS), b)](
        block, upper, scales, zeros if zeros is not None else scales, quantized, errors, row_error,
        rows, n, first, last, grid.qmin, grid.qmax,
        KIND=grid.kind, HAS_ZERO=zeros is not None, ROWS=ROWS, WIDTH=width,
        num_warps=4, enable_fp_fusion=False)


if triton is not None:

    @triton.jit
    def _round_to_grid(v, qmin, qmax, KIND: tl.constexpr):
        if KIND == 0:  # round half to even, then clamp (NaN stays NaN, as torch.clamp keeps it)
            low = tl.floor(v)
            frac = v - low
            odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
            up = (frac > 0.5) | ((frac == 0.5) & odd)
            r = tl.where(up, low + 1.0, low)
            r = tl.where(r < qmin, qmin, r)
            r = tl.where(r > qmax, qmax, r)
            return r
        elif KIND == 1:  # saturate, then the cast rounds to nearest even
            c = tl.where(v < -448.0, -448.0, tl.where(v > 448.0, 448.0, v))
            return c.to(tl.float8e4nv).to(tl.float32)
        else:  # E2M1 magnitudes 0 .5 1 1.5 2 3 4 6; ties to the even code; NaN → 0
            m = tl.where(v != v, 0.0, tl.abs(v))
            q = tl.where(m > 5.0, 6.0, tl.where(m >= 3.5, 4.0, tl.where(m > 2.5, 3.0, tl.where(
                m >= 1.75, 2.0, tl.where(m > 1.25, 1.5, tl.where(m >= 0.75, 1.0, tl.where(m > 0.25, 0.5, 0.0)))))))
            return tl.where(v < 0, -q, q)

    @triton.jit
    def _round_block(block_ptr, upper_ptr, scale_ptr, zero_ptr, quant_ptr, err_ptr, row_err_ptr,
                     rows, n, first, last, qmin, qmax,
                     KIND: tl.constexpr, HAS_ZERO: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_b = tl.program_id(1)
        r = pid_r * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, WIDTH)
        row_ok = r < rows
        tile_ok = row_ok[:, None] & (c < n)[None, :]
        base = pid_b.to(tl.int64) * rows * n
        at = base + r[:, None].to(tl.int64) * n + c[None, :]
        tile = tl.load(block_ptr + at, mask=tile_ok, other=0.0)
        quant = tl.load(quant_ptr + at, mask=tile_ok, other=0.0)
        errs = tl.load(err_ptr + at, mask=tile_ok, other=0.0)
        row_err = tl.load(row_err_ptr + pid_b.to(tl.int64) * rows + r, mask=row_ok, other=0.0)
        u_base = upper_ptr + pid_b.to(tl.int64) * n * n
        col_at = base + r.to(tl.int64) * n
        for i in range(first, last):
            here = c[None, :] == i
            col = tl.sum(tl.where(here, tile, 0.0), axis=1)
            s = tl.load(scale_ptr + col_at + i, mask=row_ok, other=1.0)
            v = tl.math.div_rn(col, s)
            if HAS_ZERO:
                z = tl.load(zero_ptr + col_at + i, mask=row_ok, other=0.0)
                q = (_round_to_grid(v + z, qmin, qmax, KIND) - z) * s
            else:
                q = _round_to_grid(v, qmin, qmax, KIND) * s
            d = tl.load(u_base + i * n + i)
            err = tl.math.div_rn(col - q, d)
            row_err = row_err + err * err
            u_row = tl.load(u_base + i * n + c, mask=(c >= i) & (c < n), other=0.0)
            tile = tl.where(c[None, :] >= i, tile - err[:, None] * u_row[None, :], tile)
            quant = tl.where(here, q[:, None], quant)
            errs = tl.where(here, err[:, None], errs)
        tl.store(block_ptr + at, tile, mask=tile_ok)
        tl.store(quant_ptr + at, quant, mask=tile_ok)
        tl.store(err_ptr + at, errs, mask=tile_ok)
        tl.store(row_err_ptr + pid_b.to(tl.int64) * rows + r, row_err, mask=row_ok)
