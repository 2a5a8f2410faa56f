"""RTN numerics against values computed by hand."""

import pytest
import torch

from qframe import numerics
from qframe.qlinear import QuantLinear
from qframe.scheme import QuantArgs


def test_int4_symmetric_fitted_scale_uses_minus_eight():
    # group [1, -2]: max(1/7, 2/8) = 0.25 -> codes 4, -8; group [0.7, 0.3]: 0.7/7 = 0.1 -> 7, 3
    args = QuantArgs(bits=4, granularity="group", group_size=2)
    q = numerics.quantize_weight(torch.tensor([[1.0, -2.0, 0.7, 0.3]]), args)
    assert q.codes.tolist() == [[4, -8, 7, 3]]
    assert q.scale == pytest.approx(torch.tensor([[0.25, 0.1]]))
    assert q.dequantize() == pytest.approx(torch.tensor([[1.0, -2.0, 0.7, 0.3]]))


def test_int4_asymmetric_zero_point():
    # lo=-1, hi=2: scale 3/15 = 0.2, zero = round(0 + 1/0.2) = 5; 0.25/0.2 + 5 = 6.25 -> 6
    args = QuantArgs(bits=4, symmetric=False)
    q = numerics.quantize_weight(torch.tensor([[-1.0, 0.25, 2.0]]), args)
    assert q.codes.dtype == torch.uint8
    assert q.codes.tolist() == [[0, 6, 15]]
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero.item() == 5
    assert q.dequantize() == pytest.approx(torch.tensor([[-1.0, 0.2, 2.0]]))


def test_int8_per_channel_and_per_tensor():
    w = torch.tensor([[127.0, -50.0], [1.0, 0.5]])
    per_channel = numerics.quantize_weight(w, QuantArgs(bits=8))
    assert per_channel.scale.flatten().tolist() == pytest.approx([1.0, 1 / 127])
    assert per_channel.codes.tolist() == [[127, -50], [127, 64]]
    per_tensor = numerics.quantize_weight(w, QuantArgs(bits=8, granularity="tensor"))
    assert per_tensor.scale.shape == (1, 1)
    assert per_tensor.codes.tolist() == [[127, -50], [1, 0]]


def test_last_partial_group_gets_its_own_scale():
    args = QuantArgs(bits=4, granularity="group", group_size=2)
    w = torch.tensor([[0.7, -0.7, 0.7, -0.7, 7.0]])
    q = numerics.quantize_weight(w, args)
    assert q.scale.shape == (1, 3)
    assert q.scale[0, 2].item() == pytest.approx(1.0)
    assert q.dequantize() == pytest.approx(w, abs=1e-6)


def test_all_zero_channel_stays_zero_and_finite():
    w = torch.zeros(2, 8)
    w[1] = torch.linspace(-1, 1, 8)
    for args in (QuantArgs(bits=4), QuantArgs(bits=4, symmetric=False), QuantArgs(bits=3, granularity="group", group_size=4)):
        deq = numerics.quantize_weight(w, args).dequantize()
        assert torch.isfinite(deq).all()
        assert deq[0].abs().sum() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_roundtrip(bits, symmetric):
    args = QuantArgs(bits=bits, symmetric=symmetric)
    dtype = torch.int8 if symmetric else torch.uint8
    codes = torch.randint(args.qmin, args.qmax + 1, (3, 7)).to(dtype)
    packed = numerics.pack(codes, bits, symmetric)
    assert packed.dtype == torch.uint8
    if bits in (2, 4):
        assert packed.shape[-1] == -(-7 // (8 // bits))
    assert torch.equal(numerics.unpack(packed, bits, symmetric, 7), codes)


def test_pack_int4_by_hand():
    # symmetric codes 1, -2 -> unsigned 9, 6 -> low nibble first: 9 + 6 * 16 = 105
    assert numerics.pack(torch.tensor([[1, -2]], dtype=torch.int8), 4, True).tolist() == [[105]]


def test_per_token_dynamic_activation():
    x = torch.tensor([[[1.0, -0.5], [0.01, 0.02]]])
    y = numerics.quantize_per_token(x, QuantArgs(bits=8, granularity="token", dynamic=True))
    # row 0: scale max(1/127, 0.5/128) = 1/127; -0.5 * 127 = -63.5 -> -64 (half to even)
    assert y[0, 0].tolist() == pytest.approx([1.0, -64 / 127])
    assert y[0, 1].tolist() == pytest.approx([0.01, 0.02], rel=1e-2)


def test_static_input_scale_in_quant_linear():
    linear = torch.nn.Linear(2, 1, bias=False)
    linear.weight.data = torch.tensor([[1.0, 1.0]])
    acts = QuantArgs(bits=8, granularity="tensor")
    layer = QuantLinear.from_linear(linear, QuantArgs(bits=8), acts,
                                    input_range=(torch.tensor(-1.0), torch.tensor(2.0)))
    assert layer.input_scale.item() == pytest.approx(2 / 127)
    # 5.0 is outside the calibrated range: it saturates at 127 * 2/127 = 2
    assert layer(torch.tensor([[5.0, 0.0]])).item() == pytest.approx(2.0)


@pytest.mark.parametrize("args", [
    QuantArgs(type="float", bits=4, granularity="group", group_size=16, dynamic=True),
    QuantArgs(type="float", bits=4, format="mxfp4", granularity="group", group_size=32, dynamic=True),
    QuantArgs(bits=8, granularity="token", dynamic=True),
], ids=["nvfp4", "mxfp4", "int8-token"])
def test_large_activations_are_quantized_in_row_chunks_with_the_same_bits(args, monkeypatch):
    """Rows are independent per token and per block: a batch quantized a few rows at a time (to
    bound the float32 temporaries) is bit-identical to it quantized whole."""
    torch.manual_seed(0)
    x = (torch.randn(3, 70, 96) * torch.rand(96) * 5).to(torch.bfloat16)
    whole = numerics.quantize_dynamic(x, args)
    monkeypatch.setattr(numerics, "ACTIVATION_CHUNK", 500)
    assert torch.equal(numerics.quantize_dynamic(x, args), whole)
