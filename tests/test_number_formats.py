"""Number formats as registered objects (qframe.formats), and dtype casts of quantized models.

The formats' numerics are pinned in tests/test_numerics.py and tests/test_formats.py; here:
the registry and its API, each format's limits and storage, native packing equal to
``numerics.pack``, a format a plugin registers working end to end, and that casting a
quantized model (``.to(dtype)``, ``.half()``, ``.float()``) never changes codes or scales.
"""

import pytest
import torch

import qframe
from qframe import PluginError, RecipeError, formats, numerics
from qframe.qlinear import QuantLinear
from qframe.recipe import parse_recipe
from qframe.scheme import QuantArgs
from qframe.testing import random_tokens, tiny_llama_model


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparisons of any dtype."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int32 if t.dtype.itemsize == 4 else torch.int16)


@pytest.fixture
def registry(monkeypatch):
    """The registered float formats, restored after the test (registering is process-wide)."""
    monkeypatch.setattr(formats, "_FLOATS", dict(formats._FLOATS))


# -- the registry -----------------------------------------------------------------------------

LIMITS = {  # name: (family, bits, max, qmin, qmax, block, code dtype, scale dtype)
    "int4": (formats.IntFormat, 4, 7, -8, 7, None, torch.int8, torch.float32),
    "uint4": (formats.IntFormat, 4, 15, 0, 15, None, torch.uint8, torch.float32),
    "int8": (formats.IntFormat, 8, 127, -128, 127, None, torch.int8, torch.float32),
    "uint2": (formats.IntFormat, 2, 3, 0, 3, None, torch.uint8, torch.float32),
    "e4m3": (formats.FloatFormat, 8, 448.0, -448.0, 448.0, None, torch.float8_e4m3fn, torch.float32),
    "e5m2": (formats.FloatFormat, 8, 57344.0, -57344.0, 57344.0, None, torch.float8_e5m2, torch.float32),
    "nvfp4": (formats.FP4Format, 4, 6.0, -6.0, 6.0, 16, torch.uint8, torch.float8_e4m3fn),
    "mxfp4": (formats.FP4Format, 4, 6.0, -6.0, 6.0, 32, torch.uint8, torch.uint8),
}


@pytest.mark.parametrize("name", LIMITS)
def test_each_format_owns_its_limits_and_storage(name):
    family, width, largest, qmin, qmax, block, codes, scales = LIMITS[name]
    fmt = formats.by_name(name)
    assert isinstance(fmt, family) and isinstance(fmt, formats.NumberFormat)
    assert (fmt.name, fmt.bits, fmt.max, fmt.qmin, fmt.qmax, fmt.block) == (name, width, largest, qmin, qmax, block)
    assert (fmt.code_dtype, fmt.scale_dtype) == (codes, scales)
    assert fmt.symmetric == (not name.startswith("uint"))
    assert fmt.has_global_scale == (name == "nvfp4")


def test_singletons_and_lookups_agree():
    assert formats.by_name("e4m3") is formats.E4M3 and formats.by_name("e5m2") is formats.E5M2
    assert formats.by_name("nvfp4") is formats.NVFP4 and formats.by_name("mxfp4") is formats.MXFP4
    assert formats.INT4 == formats.IntFormat(4, True) and formats.INT8 == formats.IntFormat(8, True)
    assert formats.FP8_E4M3_MAX == formats.E4M3.max == 448.0
    assert isinstance(formats.NVFP4, formats.FloatFormat) and not isinstance(formats.INT4, formats.FloatFormat)
    cases = {
        QuantArgs(bits=4, granularity="group", group_size=64): formats.INT4,
        QuantArgs(bits=8): formats.INT8,
        QuantArgs(bits=4, symmetric=False): formats.IntFormat(4, False),
        QuantArgs(type="float", bits=8, granularity="tensor"): formats.E4M3,
        QuantArgs(type="float", bits=8, format="e5m2", dynamic=True, granularity="token"): formats.E5M2,
        QuantArgs.from_table({"format": "nvfp4"}, role="weights"): formats.NVFP4,
        QuantArgs.from_table({"format": "mxfp4", "dynamic": True}, role="activations"): formats.MXFP4,
    }
    for args, fmt in cases.items():
        assert formats.of(args) is args.number_format
        assert args.number_format == fmt and args.name == fmt.name
        assert (args.qmin, args.qmax) == (fmt.qmin, fmt.qmax)
    assert formats.of(QuantArgs(bits=4, granularity="group", group_size=64)) is formats.INT4


def test_unknown_names_and_bad_formats_are_refused(registry):
    for name in ("fp6", "int9", "uint1", "E4M3"):
        with pytest.raises(KeyError, match="unknown number format"):
            formats.by_name(name)
    with pytest.raises(ValueError):
        formats.IntFormat(9)
    with pytest.raises(PluginError, match="lower-case"):
        formats.FloatFormat("E3M4", 8, 30.0, torch.float8_e4m3fn)
    with pytest.raises(PluginError, match="integer format"):
        formats.FloatFormat("int4", 4, 6.0, torch.uint8)
    with pytest.raises(PluginError, match="max"):
        formats.FloatFormat("e4m3x", 8, float("inf"), torch.float8_e4m3fn)
    with pytest.raises(PluginError, match="takes a FloatFormat"):
        formats.register(formats.INT4)


def test_a_second_format_under_a_taken_name_names_both(registry):
    assert formats.register(formats.FloatFormat("e4m3", 8, 448.0, torch.float8_e4m3fn)) is formats.E4M3
    with pytest.raises(PluginError) as caught:
        formats.register(formats.FloatFormat("e4m3", 8, 240.0, torch.float8_e4m3fn))
    assert "max=448.0" in str(caught.value) and "max=240.0" in str(caught.value)
    assert formats.by_name("e4m3") is formats.E4M3


def test_scheme_tables_come_from_the_registry():
    assert [f.name for f in formats.floats(8)] == ["e4m3", "e5m2"]
    assert [f.name for f in formats.floats(4)] == ["nvfp4", "mxfp4"]
    with pytest.raises(RecipeError, match="allowed: nvfp4, mxfp4"):
        QuantArgs(type="float", bits=4, format="e4m3", granularity="group", group_size=16)
    with pytest.raises(RecipeError, match="uses blocks of 32"):
        QuantArgs(type="float", bits=4, format="mxfp4", granularity="group", group_size=16)
    assert QuantArgs.from_table({"format": "mxfp4"}, role="weights").group_size == formats.MXFP4.block
    assert QuantArgs(type="float", bits=4, granularity="group", group_size=16).calibrated().number_format is formats.E4M3


def test_a_registered_format_works_end_to_end(registry, tmp_path):
    # E4M3 with a smaller saturation bound (as some accelerators serve it): a plugin's format.
    fmt = formats.register(formats.FloatFormat("e4m3_240", 8, 240.0, torch.float8_e4m3fn))
    assert formats.by_name("e4m3_240") is fmt and fmt in formats.floats(8)
    args = QuantArgs.from_table({"format": "e4m3_240", "granularity": "tensor"}, role="weights")
    assert args.number_format is fmt and (args.type, args.bits, args.fmax) == ("float", 8, 240.0)
    w = torch.tensor([[240.0, -120.0, 1.0, 300.0]])
    q = numerics.quantize_weight(w, args, (torch.tensor([[-240.0]]), torch.tensor([[240.0]])))
    assert q.codes.dtype == torch.float8_e4m3fn and q.scale.item() == 1.0
    assert q.codes.float().tolist() == [[240.0, -120.0, 1.0, 240.0]]  # 300 saturates at 240
    assert torch.equal(bits(fmt.unpack(fmt.pack(q.codes), 4)), bits(q.codes))
    recipe = parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"format": "e4m3_240"}}]})
    qmodel = qframe.quantize(tiny_llama_model(), recipe, device="cpu")
    qframe.export(qmodel, backend="qframe", output=tmp_path / "out")
    loaded = qframe.load_quantized(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj"
    for key in ("weight_codes", "weight_scale"):
        assert torch.equal(bits(getattr(loaded.quantized_modules()[name], key)),
                           bits(getattr(qmodel.quantized_modules()[name], key)))


# -- packing: the native checkpoint's bytes ---------------------------------------------------

def _every_code(fmt: formats.NumberFormat, columns: int) -> torch.Tensor:
    if isinstance(fmt, formats.IntFormat):
        values = torch.arange(fmt.qmin, fmt.qmax + 1)
    elif isinstance(fmt, formats.FP4Format):
        values = torch.arange(16)
    else:
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.code_dtype).float()
    picked = values[torch.randint(0, len(values), (5, columns), generator=torch.Generator().manual_seed(1))]
    return picked.to(fmt.code_dtype)


@pytest.mark.parametrize("name", [f"{u}int{b}" for b in range(2, 9) for u in ("", "u")] + ["e4m3", "e5m2", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("columns", [32, 33])
def test_pack_is_the_native_packing(name, columns):
    fmt = formats.by_name(name)
    codes = _every_code(fmt, columns)
    floating = isinstance(fmt, formats.FloatFormat)
    packed = fmt.pack(codes)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, numerics.pack(codes, fmt.bits, fmt.symmetric, fmt.name if floating else None))
    per_byte = 8 // fmt.bits if 8 % fmt.bits == 0 else 1
    assert packed.shape == (5, -(-columns // per_byte))
    back = fmt.unpack(packed, columns)
    assert back.dtype == fmt.code_dtype and torch.equal(bits(back), bits(codes))


# -- dtype casts never change quantized values -----------------------------------------------

def _state(qmodel) -> dict[str, torch.Tensor]:
    keys = ("weight_codes", "weight_scale", "weight_zero", "weight_global_scale", "input_scale", "input_zero")
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in qmodel.quantized_modules().items()
            for k in keys if getattr(m, k, None) is not None}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(bits(a[key]), bits(b[key])), key


INT4_G64 = {"bits": 4, "group_size": 64}
QUANTIZERS = {
    "rtn": {"quantizer": "rtn", "weights": INT4_G64},
    "rtn asymmetric": {"quantizer": "rtn", "weights": {**INT4_G64, "symmetric": False}},
    "awq": {"quantizer": "awq", "weights": INT4_G64},
    "gptq": {"quantizer": "gptq", "weights": INT4_G64},
    "gptq act_order": {"quantizer": "gptq", "weights": INT4_G64, "options": {"act_order": True}},
}


@pytest.fixture(scope="module")
def bf16_models():
    """A tiny bf16 Llama quantized by each quantizer (int4, group 64), once for the module."""
    ids = random_tokens(8, 32, vocab=256)
    out = {}
    for label, stage in QUANTIZERS.items():
        recipe = parse_recipe({"calibration": {"batch_size": 4}, "stage": [stage]})
        out[label] = qframe.quantize(tiny_llama_model().to(torch.bfloat16), recipe, calibration=ids, device="cpu")
    return out


@pytest.mark.parametrize("label", QUANTIZERS)
def test_dtype_casts_never_change_codes_or_scales(bf16_models, label):
    qmodel = bf16_models[label]
    quantized = _state(qmodel)
    module = qmodel.quantized_modules()["model.layers.0.self_attn.q_proj"]
    assert module.weight.dtype == torch.bfloat16 and module.weight_scale.dtype == torch.float32
    # Group scales serve in the model's dtype (TensorRT-LLM's int4 kernels take them so):
    # exact in bf16 after every quantizer, GPTQ's float32 rounding included.
    for name, tensor in quantized.items():
        if name.endswith(".weight_scale"):
            assert torch.equal(tensor.to(torch.bfloat16).float(), tensor), name
    model = qmodel.model
    try:
        for cast in (lambda m: m.to(torch.float16), lambda m: m.to(torch.bfloat16), lambda m: m.float(),
                     lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
            cast(model)
            _assert_same(_state(qmodel), quantized)
            dtype = module.weight.dtype
            expected = numerics.dequantize_weight(module.weight_codes, module.weight_scale,
                                                  getattr(module, "weight_zero", None), module.weight_args)
            # The derived weight is dequantized again in the new dtype, not cast from the old one.
            assert torch.equal(module.weight, expected.to(dtype))
    finally:
        model.to(torch.bfloat16)


def test_half_of_a_quantized_bf16_model_keeps_codes_and_scales(bf16_models):
    qmodel = bf16_models["gptq"]
    before = {n: (m.weight_codes.clone(), m.weight_scale.clone()) for n, m in qmodel.quantized_modules().items()}
    try:
        qmodel.model.half()
        for name, module in qmodel.quantized_modules().items():
            codes, scale = before[name]
            assert torch.equal(bits(module.weight_codes), bits(codes)), name
            assert torch.equal(bits(module.weight_scale), bits(scale)), name
            assert module.weight.dtype == torch.float16
    finally:
        qmodel.model.to(torch.bfloat16)


def test_a_float32_quantized_linear_keeps_its_scales_when_cast():
    args = QuantArgs(bits=4, granularity="group", group_size=8)
    linear = torch.nn.Linear(16, 4)
    layer = QuantLinear.from_linear(linear, args)
    scale = layer.weight_scale.clone()
    assert not torch.equal(scale.to(torch.bfloat16).float(), scale)  # float32 scales, not bf16 ones
    layer.to(torch.bfloat16)
    assert torch.equal(layer.weight_scale, scale)
    # A quantizer working in float32 for a 16-bit model asks for served scales itself: before
    # the codes are taken (set_weight), or keeping codes its own rounding fixed (GPTQ).
    layer = QuantLinear.from_linear(linear, args)
    layer.set_weight(linear.weight.detach(), served_dtype=torch.bfloat16)
    assert torch.equal(layer.weight_scale, numerics.served_scale(scale, args, torch.bfloat16))
    kept = QuantLinear.from_linear(linear, args)
    codes = kept.weight_codes.clone()
    kept.serve_scales(torch.bfloat16)
    assert torch.equal(kept.weight_codes, codes) and torch.equal(kept.weight_scale, layer.weight_scale)
    assert kept.weight.dtype == torch.float32
