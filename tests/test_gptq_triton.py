"""GPTQ's Triton column loop gives the same bits as the PyTorch loop (CUDA only), and the
formats it takes are the ones whose rounding it reproduces."""

from __future__ import annotations

import pytest
import torch

from qframe import formats
from qframe.scheme import QuantArgs
from qframe_plugins import gptq_triton
from qframe_plugins.gptq import gptq_batched

SCHEMES = {
    "int4-g64": QuantArgs(bits=4, granularity="group", group_size=64),
    "int4-g32-asym": QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False),
    "int8-channel": QuantArgs(bits=8),
    "int3-g128": QuantArgs(bits=3, granularity="group", group_size=128),
    "fp8-tensor": QuantArgs(type="float", bits=8, granularity="tensor"),
    "fp8-channel": QuantArgs(type="float", bits=8),
    "nvfp4": QuantArgs(type="float", bits=4, format="nvfp4", granularity="group", group_size=16),
    "mxfp4": QuantArgs(type="float", bits=4, format="mxfp4", granularity="group", group_size=32),
}


def test_kernel_grids_of_the_builtin_formats():
    assert gptq_triton.kernel_grid(formats.of(QuantArgs(bits=4))) == gptq_triton.KernelGrid(gptq_triton.INT, -8, 7)
    assert gptq_triton.kernel_grid(formats.of(QuantArgs(bits=4, symmetric=False))).qmax == 15
    assert gptq_triton.kernel_grid(formats.of(SCHEMES["fp8-channel"])).kind == gptq_triton.FP8
    assert gptq_triton.kernel_grid(formats.of(SCHEMES["nvfp4"])).kind == gptq_triton.E2M1
    assert gptq_triton.kernel_grid(formats.of(SCHEMES["mxfp4"])).kind == gptq_triton.E2M1
    assert gptq_triton.kernel_grid(formats.E5M2) is None  # FP8 E5M2 rounds on another grid: the PyTorch loop


def test_unavailable_without_cuda():
    assert not gptq_triton.available(torch.device("cpu"))


@pytest.mark.skipif(not (torch.cuda.is_available() and gptq_triton.triton is not None), reason="needs CUDA and Triton")
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_kernel_matches_the_pytorch_loop_bit_for_bit(scheme, act_order, monkeypatch):
    args = SCHEMES[scheme]
    g = torch.Generator().manual_seed(0)
    columns = 320  # blocks of 128, 128 and 64: a partial last block
    x = torch.randn(3, 2048, columns, generator=g) * torch.rand(1, 1, columns, generator=g) * 4
    x[..., 7] = 0  # a dead input channel
    h = (2 * x.transpose(1, 2) @ x / 2048).cuda()
    w = (torch.randn(3, 40, columns, generator=g) * 0.05).cuda()  # 40 rows: a partial tile of 16
    w[1, 3, 11] = 2.0  # an outlier
    fused = gptq_batched(w, h.clone(), args, act_order=act_order)
    monkeypatch.setattr(gptq_triton, "available", lambda device: False)
    loop = gptq_batched(w, h.clone(), args, act_order=act_order)
    assert torch.equal(fused.weight, loop.weight)
    assert all(torch.equal(a, b) for a, b in zip(fused.ranges, loop.ranges))
    assert torch.equal(fused.row_error, loop.row_error)
    assert torch.equal(fused.loss, loop.loss)
