"""Number formats: FP8 (E4M3, E5M2), FP4 E2M1 as NVFP4 and MXFP4, against values computed by
hand, against the formats' definitions, and against NVIDIA modelopt (the peer, in its own
environment: see tests/peer.py; those tests skip where it is absent).

Where qframe and modelopt derive scales by different conventions, a test pins the difference:
int scales (qframe's fitted ``max(hi/7, -lo/8)`` against modelopt's ``amax/7``; see README
"Scale convention" and docs/benchmarks.md) and MXFP4 scales (qframe follows the OCP MX spec,
``2^(floor(log2(amax)) - 2)``; modelopt uses ``2^ceil(log2(amax / 6))``).
"""

import math

import pytest
import torch
from safetensors.torch import load_file

import qframe
from qframe import QuantizerPlugin, RecipeError, formats, numerics
from qframe.kvcache import KVCacheQuant, attach, cache_quantizers
from qframe.pipeline import Quantizer
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.scheme import QuantArgs
from qframe.testing import make_registry, tiny_llama_model

from peer import peer_python, run_peer

E4M3 = QuantArgs(type="float", bits=8, format="e4m3", granularity="tensor")
E5M2 = QuantArgs(type="float", bits=8, format="e5m2", granularity="tensor")
NVFP4 = QuantArgs(type="float", bits=4, format="nvfp4", granularity="group", group_size=16)
MXFP4 = QuantArgs(type="float", bits=4, format="mxfp4", granularity="group", group_size=32)
ONE = torch.tensor(1.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparisons of any dtype (float8 and NaN included)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int32 if t.dtype.itemsize == 4 else torch.int16)


# -- FP8 ----------------------------------------------------------------------------------------

def test_e4m3_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([0.0, 1.0625, 1.1875, 300.0, 304.0, 440.0, 460.0, -1e6, float("inf"),
                      2.0**-10, 1.5 * 2.0**-10, 3 * 2.0**-10])
    expected = [0.0, 1.0,      # 1 + 1/16: tie between 1 (mantissa 000) and 1.125 (001) -> even
                1.25,          # 1 + 3/16: tie between 1.125 (001) and 1.25 (010) -> even
                288.0,         # step 32 above 256: 300 is nearer 288
                320.0,         # 304: tie between 288 (001) and 320 (010)
                448.0, 448.0, -448.0, 448.0,  # saturating at +-448 (inf too)
                0.0,           # 2^-10: tie between 0 and the smallest subnormal 2^-9
                2.0**-9,       # 0.75 * 2^-9 -> 2^-9
                2.0**-8]       # 1.5 * 2^-9: tie between 2^-9 (001) and 2^-8 (010)
    assert numerics.quantize(x, ONE, None, E4M3).tolist() == expected
    assert torch.isnan(numerics.fake_quantize(torch.tensor([float("nan")]), ONE, None, E4M3)).all()


def test_e5m2_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([1.125, 1.375, 3.0, 50000.0, 53248.0, 61440.0, -float("inf"), 2.0**-17, 3 * 2.0**-17])
    expected = [1.0,       # tie between 1 (00) and 1.25 (01)
                1.5,       # tie between 1.25 (01) and 1.5 (10)
                3.0,
                49152.0,   # step 8192 above 32768
                49152.0,   # 53248: tie between 49152 (10) and 57344 (11)
                57344.0,   # 61440 saturates (a plain cast to float8_e5m2 rounds it to inf)
                -57344.0,
                0.0,       # tie between 0 and the smallest subnormal 2^-16
                2.0**-15]  # 1.5 * 2^-16: tie between 2^-16 (01) and 2^-15 (10)
    assert numerics.quantize(x, ONE, None, E5M2).tolist() == expected
    assert torch.tensor(61440.0).to(torch.float8_e5m2).float().isinf()


def test_fp8_scale_is_amax_over_fmax():
    lo, hi = torch.tensor(-100.0), torch.tensor(50.0)
    assert numerics.qparams(lo, hi, E4M3)[0].item() == pytest.approx(100 / 448)
    assert numerics.qparams(lo, hi, E5M2)[0].item() == pytest.approx(100 / 57344)
    assert numerics.qparams(lo, hi, E4M3)[1] is None
    # scale 0.5: 224 / 0.5 = 448 exactly; 230 saturates
    w = torch.tensor([[224.0, -112.0, 1.0, 230.0]])
    q = numerics.quantize_weight(w, E4M3, (torch.tensor([[-230.0]]), torch.tensor([[224.0]])))
    assert q.codes.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    assert q.scale.item() == pytest.approx(230 / 448)


def test_fp8_per_channel_weight():
    w = torch.tensor([[448.0, -1.0, 3.0], [0.4375, 0.25, -0.125]])  # amax 448 and 448 * 2^-10
    q = numerics.quantize_weight(w, QuantArgs(type="float", bits=8))
    assert q.scale.flatten().tolist() == [1.0, 2.0**-10]
    assert q.codes.float().tolist()[0] == [448.0, -1.0, 3.0]
    assert q.dequantize().tolist() == w.tolist()  # every value is on the grid of its channel


# -- E2M1 ---------------------------------------------------------------------------------------

def test_e2m1_grid_codes_and_ties():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = torch.arange(16, dtype=torch.uint8)
    assert numerics.e2m1_decode(codes).tolist() == grid + [-v for v in grid]
    assert torch.equal(numerics.e2m1_encode(numerics.e2m1_decode(codes)), codes)  # -0.0 is code 8
    # Midpoints: ties go to the even code (0.25 -> 0, 0.75 -> 1.0, ..., 5 -> 4), as modelopt's NVFP4 cast.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert numerics.e2m1_decode(numerics.e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert numerics.e2m1_decode(numerics.e2m1_encode(-ties)).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    near = torch.tensor([0.26, 0.74, 1.26, 1.74, 2.51, 3.49, 5.01, 6.5, 1e30, float("inf"), float("nan")])
    assert numerics.e2m1_decode(numerics.e2m1_encode(near)).tolist() == [0.5, 0.5, 1.5, 1.5, 3.0, 3.0, 6.0, 6.0,
                                                                          6.0, 6.0, 0.0]


# -- NVFP4 --------------------------------------------------------------------------------------

def _nvfp4_hand_tensor() -> torch.Tensor:
    w = torch.zeros(2, 32)
    # Row 0, block 0: amax 2688 = 6 * 448, so the global scale is exactly 1 and this block's scale 448.
    w[0, :7] = torch.tensor([2688.0, 1000.0, 1344.0, -2240.0, 224.0, 100.0, -336.0])
    # Row 0, block 1: amax 600 -> 600 / 6 = 100, which E4M3 cannot hold: it rounds to 96
    # (100 = 1.5625 * 64 lies halfway between 1.5 and 1.625; ties to the even mantissa).
    w[0, 16:19] = torch.tensor([600.0, 150.0, -240.0])
    # Row 1, block 0: amax 1e-3 -> 1e-3 / 6 is below E4M3's smallest subnormal: clamped to 2^-9.
    w[1, 0] = 1e-3
    # Row 1, block 1: all zero -> block scale 1, codes 0.
    return w


def test_nvfp4_two_level_scales_by_hand():
    w = _nvfp4_hand_tensor()
    q = numerics.quantize_weight(w, NVFP4)
    assert q.global_scale.item() == 1.0
    assert q.scale.dtype == torch.float8_e4m3fn
    assert q.scale.float().tolist() == [[448.0, 96.0], [2.0**-9, 1.0]]
    deq = q.dequantize()
    # block 0 / 448: 6, 2.23 -> 2, 3, -5 -> -4 (tie), 0.5, 0.22 -> 0, -0.75 -> -1 (tie)
    assert deq[0, :7].tolist() == [2688.0, 896.0, 1344.0, -1792.0, 224.0, 0.0, -448.0]
    assert q.codes[0, :7].tolist() == [7, 4, 5, 14, 1, 0, 10]
    # block 1 / 96: 6.25 -> 6 (saturates), 1.5625 -> 1.5, -2.5 -> -2 (tie)
    assert deq[0, 16:19].tolist() == [576.0, 144.0, -192.0]
    # 1e-3 / 2^-9 = 0.512 -> 0.5
    assert deq[1, 0].item() == 2.0**-10
    assert deq[1, 16:].abs().sum() == 0 and q.codes[1, 16:].abs().sum() == 0
    assert deq[0, 7:16].abs().sum() == 0

    # Scaling the tensor by 2^-10 scales the global scale alone: the same codes and block scales.
    small = numerics.quantize_weight(w * 2.0**-10, NVFP4)
    assert small.global_scale.item() == 2.0**-10
    assert torch.equal(small.codes, q.codes) and torch.equal(bits(small.scale), bits(q.scale))
    assert torch.equal(small.dequantize(), deq * 2.0**-10)


def test_nvfp4_qparams_is_the_effective_scale():
    w = _nvfp4_hand_tensor()
    lo, hi = numerics.minmax_ranges(w, NVFP4)
    scale, zero = numerics.qparams(lo, hi, NVFP4)
    assert zero is None and scale.tolist() == [[448.0, 96.0], [2.0**-9, 1.0]]
    g = numerics.grouped(w, NVFP4)
    fake = numerics.fake_quantize(g, scale.unsqueeze(-1), None, NVFP4)
    assert torch.equal(numerics.ungrouped(fake, w.shape), numerics.quantize_weight(w, NVFP4).dequantize())


# -- MXFP4 --------------------------------------------------------------------------------------

def test_mxfp4_power_of_two_scale_per_ocp():
    # X = 2^(floor(log2(amax)) - emax_elem), emax_elem = 2 for E2M1; E8M0 stores it biased by 127.
    amax = torch.tensor([1.0, 1.5, 2.0, 6.0, 7.99, 2.0**-130, 0.0, 3.0e38])
    assert numerics.mxfp4_scales(amax).tolist() == [125, 125, 126, 127, 127, 0, 0, 252]
    w = torch.zeros(1, 64)
    w[0, :6] = torch.tensor([7.0, 5.0, 1.3, -0.75, 0.25, 2.6])  # amax 7: floor(log2 7) = 2 -> X = 1
    w[0, 32:35] = torch.tensor([0.1, -0.05, 0.01])               # amax 0.1 = 1.6 * 2^-4 -> X = 2^-6
    q = numerics.quantize_weight(w, MXFP4)
    assert q.scale.dtype == torch.uint8 and q.scale.tolist() == [[127, 121]]
    deq = q.dequantize()
    # 7 saturates to 6 (OCP's scale leaves amax / X in [4, 8)); 5 -> 4 and -0.75 -> -1 are ties.
    assert deq[0, :6].tolist() == [6.0, 4.0, 1.5, -1.0, 0.0, 3.0]
    # 6.4 -> 6, -3.2 -> -3, 0.64 -> 0.5, times 2^-6
    assert deq[0, 32:35].tolist() == [6 / 64, -3 / 64, 0.5 / 64]


def test_fp4_partial_last_block():
    w = torch.linspace(-3, 5, 3 * 40).reshape(3, 40)
    for args in (NVFP4, MXFP4):
        q = numerics.quantize_weight(w, args)
        assert q.codes.shape == (3, 40) and q.scale.shape == (3, math.ceil(40 / args.group_size))
        assert (q.dequantize() - w).abs().max() <= w.abs().max() / 6 * 2  # within a step everywhere
        packed = numerics.pack(q.codes, 4, format=args.format)
        assert packed.shape == (3, 20)
        assert torch.equal(numerics.unpack(packed, 4, False, 40, format=args.format), q.codes)


# -- packing ------------------------------------------------------------------------------------

def test_pack_fp4_low_nibble_first_and_roundtrip():
    codes = torch.tensor([[0b0011, 0b1010, 0b0111]], dtype=torch.uint8)  # 1.5, -1, 6
    packed = numerics.pack(codes, 4, format="nvfp4")
    assert packed.tolist() == [[0b1010_0011, 0b0000_0111]]
    assert torch.equal(numerics.unpack(packed, 4, False, 3, format="nvfp4"), codes)
    every = torch.randint(0, 16, (5, 33), dtype=torch.uint8)
    for fmt in ("nvfp4", "mxfp4"):
        assert torch.equal(numerics.unpack(numerics.pack(every, 4, format=fmt), 4, False, 33, format=fmt), every)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_pack_fp8_every_bit_pattern(fmt):
    dtype = formats.by_name(fmt).code_dtype
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(4, 64)
    packed = numerics.pack(codes, 8, format=fmt)
    assert packed.dtype == torch.uint8 and torch.equal(packed.flatten(), torch.arange(256).to(torch.uint8))
    back = numerics.unpack(packed, 8, True, 64, format=fmt)
    assert back.dtype == dtype and torch.equal(bits(back), bits(codes))


# -- zeros, NaN, inf ----------------------------------------------------------------------------

ALL_WEIGHT_FORMATS = {
    "int4": QuantArgs(bits=4, granularity="group", group_size=16),
    "uint4": QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16),
    "e4m3": QuantArgs(type="float", bits=8),
    "e5m2": QuantArgs(type="float", bits=8, format="e5m2", granularity="tensor"),
    "nvfp4": NVFP4,
    "mxfp4": MXFP4,
}


@pytest.mark.parametrize("name", ALL_WEIGHT_FORMATS)
def test_all_zero_weights_give_finite_scales_and_zero_codes(name):
    args = ALL_WEIGHT_FORMATS[name]
    q = numerics.quantize_weight(torch.zeros(4, 64), args)
    assert torch.isfinite(numerics.effective_scale(q.scale, q.global_scale, args)).all()
    assert (numerics.effective_scale(q.scale, q.global_scale, args) > 0).all()
    assert torch.equal(q.dequantize(), torch.zeros(4, 64))
    assert (bits(q.codes) == 0).all()


@pytest.mark.parametrize("name", ALL_WEIGHT_FORMATS)
def test_inf_and_nan_never_reach_a_scale(name):
    args = ALL_WEIGHT_FORMATS[name]
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    w[0, 3], w[1, 5], w[2, 40] = float("inf"), float("nan"), -float("inf")
    q = numerics.quantize_weight(w, args)
    scale = numerics.effective_scale(q.scale, q.global_scale, args)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    deq = q.dequantize()
    finite = torch.isfinite(w)
    # the finite values quantize as if the others were absent, give or take a step
    clean = numerics.quantize_weight(torch.where(finite, w, torch.zeros(())), args).dequantize()
    assert torch.equal(deq[finite], clean[finite])
    assert deq[0, 3] > 0 and deq[2, 40] < 0 and torch.isfinite(deq[[0, 2], [3, 40]]).all()  # saturated


@pytest.mark.parametrize("fmt", ["int8", "e4m3", "nvfp4", "mxfp4"])
def test_dynamic_activations_zero_and_inf_rows(fmt):
    table = {"int8": {"bits": 8, "dynamic": True}, "e4m3": {"type": "float", "dynamic": True},
             "nvfp4": {"format": "nvfp4", "dynamic": True}, "mxfp4": {"format": "mxfp4", "dynamic": True}}[fmt]
    args = QuantArgs.from_table(table, role="activations")
    x = torch.randn(3, 5, 64)
    x[0, 0] = 0.0
    x[1, 2, 7] = float("inf")
    y = numerics.quantize_dynamic(x, args)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[0, 0], torch.zeros(64))
    assert not torch.isnan(y).any()
    assert torch.equal(y[2], numerics.quantize_dynamic(x[2:], args)[0])  # a token never sees the others


def test_dynamic_per_block_matches_the_weight_path():
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for fmt in ("nvfp4", "mxfp4"):
        args = QuantArgs.from_table({"format": fmt, "dynamic": True}, role="activations")
        weight_args = QuantArgs.from_table({"format": fmt}, role="weights")
        y = numerics.quantize_dynamic(x, args).reshape(-1, 64)
        for i, token in enumerate(x.reshape(-1, 64)):  # NVFP4's global scale is per token: a one-row "weight"
            expected = numerics.quantize_weight(token[None].float(), weight_args).dequantize()
            assert torch.equal(y[i : i + 1], expected.to(torch.bfloat16)), (fmt, i)
    token = QuantArgs(bits=8, granularity="token", dynamic=True)
    assert torch.equal(numerics.quantize_per_token(x, token), numerics.quantize_dynamic(x, token))


# -- QuantLinear and the native checkpoint -------------------------------------------------------

class FormatRTN(Quantizer):
    """Round-to-nearest in any format; static inputs get the fixed range [-3, 3]."""

    @classmethod
    def needs_calibration(cls, stage):
        return False

    def quantize_layer(self, work, targets):
        w, a = self.scheme.weights, self.scheme.activations
        fixed = (torch.tensor(-3.0), torch.tensor(3.0)) if a is not None and not a.dynamic else None
        for name, linear in targets:
            work.replace(name, QuantLinear.from_linear(linear, w, a, input_range=fixed))
        cache = KVCacheQuant(QuantArgs(bits=8, granularity="tensor"))  # an INT8 KV cache travels with every format
        cache.set_ranges((torch.tensor(-2.0), torch.tensor(2.5)), (torch.tensor(-1.0), torch.tensor(1.0)))
        attach(work.attention()[1], cache)


class FormatsPlugin:
    @qframe.hookimpl
    def qframe_quantizers():
        yield QuantizerPlugin(name="formats-rtn", summary="rtn in every format (test)", factory=FormatRTN)


ROUND_TRIP = {
    "uint4 g32": ({"bits": 4, "symmetric": False, "group_size": 32}, None),
    "int8 + int8 static": ({"bits": 8}, {"bits": 8}),
    "e4m3 + e4m3 per token": ({"type": "float", "bits": 8}, {"type": "float", "bits": 8, "dynamic": True}),
    "e4m3 tensor + e4m3 static": ({"type": "float", "bits": 8, "granularity": "tensor"}, {"type": "float", "bits": 8}),
    "e5m2 + e5m2 static": ({"type": "float", "bits": 8, "format": "e5m2"}, {"type": "float", "format": "e5m2"}),
    "nvfp4 W4A4": ({"type": "float", "bits": 4}, {"type": "float", "bits": 4, "dynamic": True}),
    "nvfp4 W4A4 static global": ({"type": "float", "bits": 4}, {"format": "nvfp4"}),
    "nvfp4 W4A16": ({"format": "nvfp4"}, None),
    "mxfp4 W4A4": ({"format": "mxfp4"}, {"format": "mxfp4", "dynamic": True}),
}


@pytest.mark.parametrize("weights, activations", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_quant_linear_native_checkpoint_roundtrip(tmp_path, weights, activations):
    stage = {"quantizer": "formats-rtn", "weights": weights}
    if activations is not None:
        stage["activations"] = activations
    recipe = parse_recipe({"stage": [stage]})
    registry = make_registry(FormatsPlugin)
    model = tiny_llama_model(seed=3)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    qmodel = qframe.quantize(model, recipe, registry=registry, device="cpu")
    with torch.inference_mode():
        before = qmodel.model(input_ids=ids).logits
    qframe.export(qmodel, backend="qframe", output=tmp_path / "out", registry=registry)
    loaded = qframe.load_quantized(tmp_path / "out")
    with torch.inference_mode():
        after = loaded.model(input_ids=ids).logits
    assert torch.equal(before, after)
    args = QuantArgs.from_table(weights, role="weights")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj"
    original, reloaded = qmodel.quantized_modules()[name], loaded.quantized_modules()[name]
    assert saved[f"{name}.weight_packed"].dtype == torch.uint8
    fmt = args.number_format
    assert saved[f"{name}.weight_scale"].dtype == fmt.scale_dtype == numerics.scale_dtype(args)
    assert reloaded.weight_codes.dtype == fmt.code_dtype == numerics.code_dtype(args)
    for key, tensor in original.state_dict().items():
        assert torch.equal(bits(tensor), bits(reloaded.state_dict()[key])), key
    if fmt is formats.NVFP4:
        assert saved[f"{name}.weight_global_scale"].shape == ()
    if isinstance(fmt, formats.FP4Format):
        assert saved[f"{name}.weight_packed"].shape == (original.out_features, original.in_features // 2)
    cache = cache_quantizers(loaded.model)["model.layers.0.self_attn"]
    assert float(cache.k_scale) == pytest.approx(2.5 / 127) and float(cache.v_scale) == pytest.approx(1 / 127)


def test_quant_linear_keeps_quantized_state_through_dtype_casts():
    acts = QuantArgs.from_table({"format": "nvfp4", "dynamic": True}, role="activations")
    layer = QuantLinear.from_linear(torch.nn.Linear(32, 8), NVFP4, acts)
    codes, scale = layer.weight_codes.clone(), layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float8_e4m3fn and torch.equal(bits(layer.weight_scale), bits(scale))
    assert torch.equal(layer.weight_codes, codes) and layer.weight_global_scale.dtype == torch.float32
    y = layer(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_static_nvfp4_inputs_keep_a_calibrated_global_scale():
    # input_scale is the activations' FP32 global scale, amax / (6 * 448), as TensorRT-LLM stores it;
    # block scales still come from each input, under that global scale
    acts = QuantArgs.from_table({"format": "nvfp4"}, role="activations")
    assert (acts.dynamic, acts.granularity, acts.calibrated().granularity) == (False, "group", "tensor")
    layer = QuantLinear.from_linear(torch.nn.Linear(32, 8), NVFP4, acts, input_range=(torch.tensor(-12.0), torch.tensor(6.0)))
    assert layer.input_scale.item() == pytest.approx(12.0 / 2688)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)) * 3
    amax = x.reshape(5, 2, 16).abs().amax(-1, keepdim=True)
    block = (amax / (6 * layer.input_scale)).clamp(2.0**-9, 448).to(torch.float8_e4m3fn).float() * layer.input_scale
    expected = (numerics.e2m1_decode(numerics.e2m1_encode(x.reshape(5, 2, 16) / block)) * block).reshape(5, 32)
    assert torch.equal(layer.quantize_input(x), expected)
    # beyond the calibrated range a block saturates at 6 * 448 * global
    assert layer.quantize_input(torch.full((1, 32), 100.0)).max().item() == pytest.approx(12.0)


def test_static_fp8_input_saturates_in_quant_linear():
    linear = torch.nn.Linear(2, 1, bias=False)
    linear.weight.data = torch.tensor([[1.0, 1.0]])
    acts = QuantArgs.from_table({"type": "float", "bits": 8}, role="activations")
    layer = QuantLinear.from_linear(linear, QuantArgs(type="float", bits=8), acts,
                                    input_range=(torch.tensor(-1.0), torch.tensor(4.48)))
    assert layer.input_scale.item() == pytest.approx(0.01)
    assert layer(torch.tensor([[100.0, 0.0]])).item() == pytest.approx(4.48)


# -- recipes ------------------------------------------------------------------------------------

RECIPE_ERRORS = {
    "asymmetric fp8": ({"type": "float", "bits": 8, "symmetric": False}, "weights",
                       "stage[0].weights.symmetric: False is not valid; e4m3 is symmetric", "allowed: true"),
    "nvfp4 block 64": ({"type": "float", "bits": 4, "group_size": 64}, "weights",
                       "stage[0].weights.group_size: 64 is not valid; nvfp4 uses blocks of 16", "allowed: 16"),
    "mxfp4 block 16": ({"format": "mxfp4", "group_size": 16}, "weights",
                       "stage[0].weights.group_size: 16 is not valid; mxfp4 uses blocks of 32", "allowed: 32"),
    "nvfp4 per channel": ({"format": "nvfp4", "granularity": "channel"}, "weights",
                          "stage[0].weights.granularity: 'channel' is not valid; nvfp4 scales blocks of 16",
                          "allowed: group"),
    "int with a format": ({"bits": 8, "type": "int", "format": "e4m3"}, "weights",
                          "stage[0].weights.format: 'e4m3' is not valid", "allowed for int: none"),
    "fp4 format at 8 bits": ({"type": "float", "bits": 8, "format": "nvfp4"}, "weights",
                             "stage[0].weights.format: 'nvfp4' is not valid; nvfp4 needs bits = 4",
                             "allowed: e4m3, e5m2"),
    "unknown format": ({"type": "float", "bits": 8, "format": "e3m4"}, "weights",
                       "stage[0].weights.format: 'e3m4' is not valid", "allowed: e4m3, e5m2"),
    "static mxfp4 activations": ({"format": "mxfp4"}, "activations",
                               "stage[0].activations.dynamic: False is not valid", "allowed: true"),
}


@pytest.mark.parametrize("table, role, start, allowed", RECIPE_ERRORS.values(), ids=RECIPE_ERRORS.keys())
def test_recipe_errors_for_formats(table, role, start, allowed):
    stage = {"quantizer": "rtn", role: table}
    if role == "activations":
        stage["weights"] = {"bits": 8}
    with pytest.raises(RecipeError) as info:
        parse_recipe({"stage": [stage]}, source="r.toml")
    message = str(info.value)
    assert message.startswith(f"r.toml: {start}"), message
    assert allowed in message


@pytest.mark.parametrize("name", ALL_WEIGHT_FORMATS)
def test_mse_weight_ranges_never_lose_to_minmax(name):
    args = ALL_WEIGHT_FORMATS[name]
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    w[3, 5], w[7, :] = 40.0, 0.0  # an outlier, an all-zero row
    w[9, 9] = float("nan")
    lo, hi = numerics.mse_ranges(w, args)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    minmax_lo, minmax_hi = numerics.minmax_ranges(w, args)
    assert (hi <= minmax_hi).all() and (lo >= minmax_lo).all()
    clean = torch.nan_to_num(w)

    def group_errors(ranges):
        q = numerics.quantize_weight(clean, args, ranges).dequantize()
        return numerics.grouped((q - clean).square(), args).sum(-1)

    searched, plain = group_errors((lo, hi)), group_errors(None)
    assert (searched <= plain * (1 + 1e-6) + 1e-12).all()  # per group, exactly the better candidate
    if args.type == "int" and args.bits <= 4:
        assert searched.sum() < plain.sum()  # and at 4 bits and below it finds better ones


def test_format_defaults_and_to_dict():
    assert QuantArgs(type="float").format == "e4m3"
    assert QuantArgs(type="float", bits=4, granularity="group", group_size=16).format == "nvfp4"
    assert QuantArgs(bits=4).to_dict().get("format") is None
    fp4 = QuantArgs.from_table({"format": "mxfp4"}, role="weights")
    assert (fp4.type, fp4.bits, fp4.granularity, fp4.group_size) == ("float", 4, "group", 32)
    assert fp4.to_dict()["format"] == "mxfp4" and QuantArgs(**fp4.to_dict()) == fp4
    acts = QuantArgs.from_table({"type": "float", "bits": 4, "dynamic": True}, role="activations")
    assert (acts.format, acts.granularity, acts.group_size) == ("nvfp4", "group", 16)
    assert (E4M3.qmin, E4M3.qmax, E5M2.fmax, NVFP4.fmax) == (-448.0, 448.0, 57344.0, 6.0)


# -- CUDA -------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_WEIGHT_FORMATS)
def test_cuda_matches_cpu_bit_for_bit(name):
    args = ALL_WEIGHT_FORMATS[name]
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 96)[:, None]
    w[0, :32] = 0
    cpu, gpu = numerics.quantize_weight(w, args), numerics.quantize_weight(w.cuda(), args)
    assert torch.equal(bits(cpu.codes), bits(gpu.codes)) and torch.equal(bits(cpu.scale), bits(gpu.scale))
    if cpu.global_scale is not None:
        assert torch.equal(cpu.global_scale, gpu.global_scale.cpu())
    assert torch.equal(cpu.dequantize(), gpu.dequantize().cpu())
    x = torch.randn(4, 9, 256)
    for acts in ({"bits": 8, "dynamic": True}, {"type": "float", "dynamic": True},
                 {"format": "nvfp4", "dynamic": True}, {"format": "mxfp4", "dynamic": True}):
        a = QuantArgs.from_table(acts, role="activations")
        assert torch.equal(numerics.quantize_dynamic(x, a), numerics.quantize_dynamic(x.cuda(), a).cpu()), acts


# -- against modelopt (the peer) ------------------------------------------------------------------

PEER_CODE = """
import torch
from modelopt.torch.quantization.tensor_quant import fake_tensor_quant, scaled_e4m3
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor

w = inputs["w"]
for name in ("tensor", "tensor_pow2", "channel", "channel_pow2"):
    outputs["fp8_" + name] = scaled_e4m3(w, inputs["fp8_amax_" + name], None, 4, 3)
# int8 per channel and int4 in blocks of 128: [-2^(b-1), 2^(b-1)-1] (narrow_range=False, modelopt's default)
for name in ("channel", "channel_pow2"):
    outputs["int8_" + name] = fake_tensor_quant(w, inputs["int8_amax_" + name], None, 8, False, False)
blocks = w.reshape(-1, 128)
for name in ("block", "block_pow2"):
    outputs["int4_" + name] = fake_tensor_quant(blocks, inputs["int4_amax_" + name], None, 4, False, False).reshape(w.shape)
q, block_scale, global_scale = NVFP4QTensor.quantize(w.clone(), 16)
outputs["nvfp4_packed"] = q._quantized_data
outputs["nvfp4_block_scale"] = block_scale.view(torch.uint8)
outputs["nvfp4_global_scale"] = global_scale.reshape(1).float()
outputs["nvfp4_dequantized"] = q.dequantize(dtype=torch.float32, scale=block_scale, double_scale=global_scale,
                                            block_sizes={-1: 16})
q, e8m0 = MXFP4QTensor.quantize(w.clone(), 32)
outputs["mxfp4_scale"] = e8m0.reshape(w.shape[0], -1)
outputs["mxfp4_dequantized"] = q.dequantize(dtype=torch.float32, scale=e8m0, block_sizes={-1: 32})
"""


def _pow2(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The amax nearest ``amax`` whose scale ``amax / qmax`` is a power of two: then every
    multiplication and division either tool makes is exact, and the two must agree bit for bit."""
    return qmax * torch.exp2(torch.round(torch.log2(amax.clamp_min(1e-30) / qmax)))


@pytest.fixture(scope="module")
def peer():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)) * torch.logspace(-2, 1, 64)[:, None]
    w[:, :128] *= 3  # some blocks wider than others
    w[5, 256:384] = 0  # an all-zero int4 block
    amax_tensor = w.abs().amax()
    amax_channel = w.abs().amax(dim=1, keepdim=True)
    amax_block = w.reshape(-1, 128).abs().amax(dim=1, keepdim=True)
    inputs = {"w": w,
              "fp8_amax_tensor": amax_tensor, "fp8_amax_tensor_pow2": _pow2(amax_tensor, 448.0),
              "fp8_amax_channel": amax_channel, "fp8_amax_channel_pow2": _pow2(amax_channel, 448.0),
              "int8_amax_channel": amax_channel.clone(), "int8_amax_channel_pow2": _pow2(amax_channel, 127.0),
              "int4_amax_block": amax_block, "int4_amax_block_pow2": _pow2(amax_block, 7.0)}
    return inputs, run_peer(PEER_CODE, inputs)


def _same_grid_points(ours: torch.Tensor, theirs: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> None:
    """Arbitrary scales: modelopt multiplies by ``qmax / amax`` where qframe divides by
    ``amax / qmax``. The two quotients differ in the last bit now and then, which moves a value
    to the neighbouring grid point only when it lies within that bit of a rounding boundary;
    the dequantized values differ by float rounding. So: the same grid points, all but a few
    in a million, and the same values to float precision."""
    scale = scale.expand_as(ours)
    ours_q = numerics.quantize(ours, scale, None, args)  # back on the grid: exact, both are within an ulp of it
    theirs_q = numerics.quantize(theirs, scale, None, args)
    moved = (ours_q != theirs_q).float().mean().item()
    assert moved <= 1e-4, moved
    same = ours_q == theirs_q
    assert torch.allclose(ours[same], theirs[same], rtol=1e-6, atol=0)


def test_peer_fp8_e4m3_per_tensor_and_per_channel(peer):
    inputs, out = peer
    w = inputs["w"]
    for name, args in (("tensor", E4M3), ("channel", QuantArgs(type="float", bits=8))):
        amax = inputs[f"fp8_amax_{name}_pow2"]
        ours = numerics.fake_quantize(w, amax / 448.0, None, args)
        assert torch.equal(ours, out[f"fp8_{name}_pow2"]), name
        scale = inputs[f"fp8_amax_{name}"] / 448.0
        _same_grid_points(numerics.fake_quantize(w, scale, None, args), out[f"fp8_{name}"], scale, args)
        # and qframe's own scale from min/max ranges is the same amax / 448
        lo, hi = numerics.minmax_ranges(w, args)
        assert torch.equal(numerics.qparams(lo, hi, args)[0].reshape(scale.shape), scale)


def test_peer_int8_per_channel(peer):
    inputs, out = peer
    w, args = inputs["w"], QuantArgs(bits=8)
    amax = inputs["int8_amax_channel_pow2"]
    assert torch.equal(numerics.fake_quantize(w, amax / 127.0, None, args), out["int8_channel_pow2"])
    scale = inputs["int8_amax_channel"] / 127.0
    _same_grid_points(numerics.fake_quantize(w, scale, None, args), out["int8_channel"], scale, args)


def test_peer_int4_blockwise_128_given_the_same_scale(peer):
    inputs, out = peer
    w = inputs["w"]
    args = QuantArgs(bits=4, granularity="group", group_size=128)
    g = numerics.grouped(w, args)
    for name in ("block_pow2", "block"):
        scale = (inputs[f"int4_amax_{name}"] / 7.0).reshape(g.shape[0], g.shape[1], 1).clamp_min(numerics.MIN_SCALE)
        ours = numerics.ungrouped(numerics.fake_quantize(g, scale, None, args), w.shape)
        if name == "block_pow2":
            assert torch.equal(ours, out["int4_block_pow2"])
        else:
            flat = numerics.ungrouped(scale.expand_as(g), w.shape)
            _same_grid_points(ours, out["int4_block"], flat, args)


def test_peer_int4_scale_convention_differs_by_design(peer):
    # qframe fits symmetric int scales to both extremes: max(hi / 7, -lo / 8); modelopt takes
    # amax / 7. They agree where the positive extreme is the larger (hi >= -lo); where the
    # negative one is, qframe's scale is smaller (and reaches it with code -8, which amax / 7
    # never uses). README "Scale convention" and docs/benchmarks.md measure what it costs and saves.
    inputs, out = peer
    w = inputs["w"]
    args = QuantArgs(bits=4, granularity="group", group_size=128)
    lo, hi = numerics.minmax_ranges(w, args)
    fitted, _ = numerics.qparams(lo, hi, args)
    amax7 = (inputs["int4_amax_block"].reshape(fitted.shape) / 7).clamp_min(numerics.MIN_SCALE)
    assert torch.equal(fitted, torch.maximum(hi / 7, lo / -8).clamp_min(numerics.MIN_SCALE))
    positive_larger = hi >= -lo
    assert positive_larger.any() and (~positive_larger).any()
    assert torch.equal(fitted[positive_larger], amax7[positive_larger])
    assert (fitted[~positive_larger] < amax7[~positive_larger]).all()
    ours = numerics.quantize_weight(w, args).dequantize()
    assert not torch.equal(ours, out["int4_block"])
    # ... and given modelopt's scale, qframe reproduces modelopt (test above).


def test_peer_nvfp4_real_quantization_bit_exact_on_cpu(peer):
    # modelopt's NVFP4QTensor (its export path; pure torch, so it runs on the CPU): the same
    # packed E2M1 codes, E4M3 block scales, FP32 global scale and dequantized values.
    inputs, out = peer
    q = numerics.quantize_weight(inputs["w"], NVFP4)
    assert torch.equal(numerics.pack(q.codes, 4, format="nvfp4"), out["nvfp4_packed"])
    assert torch.equal(bits(q.scale), out["nvfp4_block_scale"])
    assert torch.equal(q.global_scale.reshape(1), out["nvfp4_global_scale"])
    assert torch.equal(q.dequantize(), out["nvfp4_dequantized"])


def test_peer_mxfp4_scale_convention_differs_by_design(peer):
    # OCP MX v1.0: X = 2^(floor(log2(amax)) - 2), so amax / X lies in [4, 8) and elements above
    # 6 saturate. modelopt's MXFP4QTensor (and its CUDA kernel, "compute_scale_e8m0_NV") takes
    # 2^ceil(log2(amax / 6)) instead, one power of two larger whenever amax's significand
    # exceeds 1.5, so that nothing saturates. Its element cast also rounds ties down (0.75 ->
    # 0.5) where the spec rounds them to even (0.75 -> 1).
    inputs, out = peer
    w = inputs["w"]
    ours = numerics.quantize_weight(w, MXFP4)
    lo, hi = numerics.minmax_ranges(w, MXFP4)
    amax = torch.maximum(-lo, hi)
    mantissa, _ = torch.frexp(amax)  # amax = mantissa * 2^e, mantissa in [0.5, 1)
    expected_theirs = ours.scale.int() + (mantissa > 0.75).int()
    theirs = out["mxfp4_scale"].int()
    assert torch.equal(theirs[amax > 0], expected_theirs[amax > 0])
    assert (theirs != ours.scale.int()).any() and (theirs == ours.scale.int()).any()
    # Where the scales agree, the elements agree but for exact ties.
    same = (theirs == ours.scale.int()).repeat_interleave(32, dim=1)
    deq = ours.dequantize()
    scaled = (w / numerics.e8m0_decode(ours.scale).repeat_interleave(32, dim=1)).abs()
    tie = (scaled == 0.75) | (scaled == 1.75) | (scaled == 3.5)
    assert torch.equal(deq[same & ~tie], out["mxfp4_dequantized"][same & ~tie])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="modelopt's NVFP4 fake quantization runs only on CUDA")
def test_peer_nvfp4_fake_quant_cuda():
    if peer_python() is None:
        pytest.skip("no peer environment with nvidia-modelopt")
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(11)) * torch.logspace(-2, 1, 128)[:, None]
    code = """
import torch
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
if not torch.cuda.is_available():
    raise SystemExit("the peer's torch has no CUDA")
quantizer = TensorQuantizer(QuantizerAttributeConfig(
    num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})).cuda()
outputs["y"] = quantizer(inputs["w"].cuda()).cpu()
"""
    theirs = run_peer(code, {"w": w})["y"]
    ours = numerics.quantize_weight(w.cuda(), NVFP4)
    scale = numerics.effective_scale(ours.scale, ours.global_scale, NVFP4).repeat_interleave(16, dim=1).cpu()
    _same_grid_points(ours.dequantize().cpu(), theirs, scale, NVFP4)
