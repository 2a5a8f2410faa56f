"""``compressed-tensors``: the checkpoint vLLM and SGLang load natively (llm-compressor's format).

A Hugging Face checkpoint whose ``config.json`` carries a ``quantization_config`` with
``quant_method = "compressed-tensors"``: one ``config_groups`` entry per quantization scheme
(``targets``, ``weights`` and ``input_activations`` arguments, the group's ``format``), the
``ignore`` list of linears left in float, and ``kv_cache_scheme`` for an FP8 KV cache. Tensors
keep the model's own names; each quantized linear ``<name>`` is written by its group's format
(md: the checkpoint's dtype, O/I: the linear's output/input features, G: groups):

=====================  =================================================================
format                 tensors of a quantized linear
=====================  =================================================================
pack-quantized         int weights without activations (W4A16, W8A16, 2-8 bits):
                       ``weight_packed`` int32 [O, ceil(I·b/32)] (codes + 2^(b-1), a bit
                       stream along the input, least significant bits first),
                       ``weight_scale`` md [O, G] / [O, 1] / [1], ``weight_shape`` int64
                       [2]; asymmetric: ``weight_zero_point`` int32, packed along the output
int-quantized          int weights with int8 activations (W8A8, W4A8): ``weight`` int8
                       codes, ``weight_scale`` (``weight_zero_point`` int8), static inputs
                       ``input_scale`` md [1] (``input_zero_point`` int8 [1])
float-quantized        FP8 E4M3: ``weight`` float8_e4m3fn, ``weight_scale`` md [1] / [O, 1],
                       static inputs ``input_scale`` md [1]
nvfp4-pack-quantized   ``weight_packed`` uint8 [O, I/2] (E2M1, even input in the low nibble),
                       ``weight_scale`` float8_e4m3fn [O, I/16], ``weight_global_scale``
                       float32 [1] (the reciprocal of qframe's and modelopt's global scale);
                       W4A4: ``input_global_scale`` float32 [1]
mxfp4-pack-quantized   ``weight_packed`` uint8 [O, I/2], ``weight_scale`` uint8 E8M0 [O, I/32]
=====================  =================================================================

Scales are in the checkpoint dtype, as llm-compressor writes them (NVFP4's and MXFP4's in
their own dtypes); a qframe scale that this rounds (a float32 FP8 or per-channel scale of a
model served in 16 bits) is warned about, naming the linears. An FP8 KV cache adds each
attention module's ``k_scale`` and ``v_scale`` (md [1], amax/448). Quantized fused experts are
written one linear an expert under their Hugging Face checkpoints' names, as the unified HF
checkpoint writes them (:mod:`qframe_plugins.hf`). Linears quantized differently go in
groups of their own (top-level ``format = "mixed-precision"`` when the formats differ).

Refused before calibration, naming the module: activations without quantized weights, FP8
E5M2, FP8 weights per group, int activations other than 8 bits, NVFP4 activations with a
per-token global scale, groups that do not divide a linear, INT8 KV caches, transposed
Conv1D layouts. Refused at export: an input prescale kept by AWQ (the format has no
``pre_quant_scale``; smooth with ``awq`` ``quantize = false`` and round with ``gptq``/``rtn``).

Recipe::

    [export]
    backend = "compressed-tensors"
    dtype = "auto"              # float16 | bfloat16 | float32 | auto
    max_shard_size = "10GB"

Command line (from a qframe output, no calibration)::

    qframe export out/gptq_w4a16 --backend compressed-tensors
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qframe import BackendPlugin, formats, hookimpl
from qframe.description import CacheState, ExpertsState, LinearState, ModelDescription
from qframe.errors import ExportError, shorten
from qframe.scheme import QuantArgs, describe

from . import hf
from .quant_algo import Quantization

VERSION = "0.20.0"  # the compressed-tensors release whose format this writes
STREAM = hf.STREAM
PACK, INT, FLOAT, NVFP4, MXFP4 = ("pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized",
                                  "mxfp4-pack-quantized")
FORMATS = (PACK, INT, FLOAT, NVFP4, MXFP4)


# -- schemes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheme:
    """How one quantized linear (or fused-experts module) is written: its compressed-tensors
    ``format`` and the ``weights`` and ``input_activations`` arguments of its config group.

    Example::

        >>> s = scheme_of(QuantArgs(bits=4, granularity="group", group_size=128), None, "q_proj")
        >>> s.format, s.weights["strategy"], s.weights["group_size"]
        ('pack-quantized', 'group', 128)
    """

    format: str
    weights: dict[str, Any]
    input_activations: dict[str, Any] | None

    @property
    def key(self) -> str:
        return json.dumps([self.format, self.weights, self.input_activations], sort_keys=True)


def _args(num_bits: int, kind: str, strategy: str, *, symmetric: bool = True, dynamic: bool | str = False,
          group_size: int | None = None, **extra: Any) -> dict[str, Any]:
    """One ``QuantizationArgs`` as compressed-tensors serializes it (keys sorted)."""
    out = {"dynamic": dynamic, "group_size": group_size, "num_bits": num_bits, "strategy": strategy,
           "symmetric": symmetric, "type": kind, **extra}
    return dict(sorted(out.items()))


def scheme_of(weights: QuantArgs | None, acts: QuantArgs | None, where: str) -> Scheme | None:
    """The :class:`Scheme` of a module quantized with these args (``None``: left in float), or
    an :class:`~qframe.ExportError` naming ``where`` and what to change.

    Example::

        >>> scheme_of(QuantArgs(type="float", bits=8, format="e5m2", granularity="tensor"), None, "q_proj")
        Traceback (most recent call last):
        ...
        qframe.errors.ExportError: q_proj: weights e5m2 per tensor, activations none: compressed-tensors' FP8 is E4M3; set weights.format = "e4m3"
    """
    def refuse(why: str) -> ExportError:
        return ExportError(f"{where}: weights {describe(weights)}, activations {describe(acts)}: {why}")

    if weights is None:
        if acts is not None:
            raise refuse("compressed-tensors quantizes activations only beside quantized weights; quantize the "
                         "weights too, or neither")
        return None
    fmt = formats.of(weights)
    act_fmt = None if acts is None else formats.of(acts)
    if isinstance(fmt, formats.IntFormat):
        strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[weights.granularity]
        w = _args(fmt.bits, "int", strategy, symmetric=weights.symmetric,
                  group_size=weights.group_size if strategy == "group" else None)
        if acts is None:
            return Scheme(PACK, w, None)
        if not isinstance(act_fmt, formats.IntFormat) or act_fmt.bits != 8:
            raise refuse("int weights are served with int8 activations (W8A8, W4A8) or none (W4A16, W8A16); set "
                         "activations = { bits = 8 } or remove them")
        return Scheme(INT, w, _activation_args(acts, "int", refuse))
    if fmt is formats.E4M3:
        if weights.granularity not in ("tensor", "channel"):
            raise refuse("FP8 weights are scaled per tensor or per output channel; set weights.granularity = "
                         "\"tensor\" or \"channel\"")
        w = _args(8, "float", weights.granularity)
        if acts is not None and act_fmt is not formats.E4M3:
            raise refuse("FP8 weights are served with FP8 E4M3 activations or none; set activations = "
                         "{ type = \"float\", bits = 8 } or remove them")
        return Scheme(FLOAT, w, None if acts is None else _activation_args(acts, "float", refuse))
    if isinstance(fmt, formats.FloatFormat) and fmt.bits == 8:
        raise refuse("compressed-tensors' FP8 is E4M3; set weights.format = \"e4m3\"")
    if fmt is formats.NVFP4:
        w = _args(4, "float", "tensor_group", group_size=fmt.block, scale_dtype="torch.float8_e4m3fn")
        if acts is None:
            return Scheme(NVFP4, w, None)
        if act_fmt is not formats.NVFP4 or acts.dynamic:
            raise refuse("NVFP4 weights are served with NVFP4 activations under one static global scale "
                         "(input_global_scale) or none; set activations = { type = \"float\", bits = 4 } (static)")
        a = _args(4, "float", "tensor_group", dynamic="local", group_size=fmt.block, observer="static_minmax",
                  scale_dtype="torch.float8_e4m3fn")
        return Scheme(NVFP4, w, a)
    if fmt is formats.MXFP4:
        w = _args(4, "float", "group", group_size=fmt.block, scale_dtype="torch.uint8")
        if acts is None:
            return Scheme(MXFP4, w, None)
        if act_fmt is not formats.MXFP4 or not acts.dynamic:
            raise refuse("MXFP4 weights are served with dynamic MXFP4 activations or none; set activations = "
                         "{ type = \"float\", bits = 4, format = \"mxfp4\", dynamic = true } or remove them")
        return Scheme(MXFP4, w, _args(4, "float", "group", dynamic=True, group_size=fmt.block, scale_dtype="torch.uint8"))
    raise refuse(f"compressed-tensors has no {fmt.name} weights; use int 2-8 bits, e4m3, nvfp4 or mxfp4")


def _activation_args(acts: QuantArgs, kind: str, refuse) -> dict[str, Any]:
    """Static per-tensor, or dynamic per-token or per-group input arguments."""
    if acts.dynamic:
        if acts.granularity == "token":
            return _args(8, kind, "token", symmetric=acts.symmetric, dynamic=True)
        if acts.granularity == "group":
            return _args(8, kind, "group", symmetric=acts.symmetric, dynamic=True, group_size=acts.group_size)
    elif acts.granularity == "tensor":
        return _args(8, kind, "tensor", symmetric=acts.symmetric)
    raise refuse("8-bit activations are static per tensor, or dynamic per token or per group")


def _experts_scheme(state: ExpertsState, shapes_known: bool) -> Scheme:
    scheme = scheme_of(state.weights, state.activations, state.where)
    hf.refuse_unsplittable_experts(state, "compressed-tensors")
    size = state.weights.group_size if state.weights.granularity == "group" else None
    for name, _, inp, _ in state.matrices if shapes_known and size else ():
        if inp % size:
            raise ExportError(f"{state.where}: {name}'s {inp} input channels per expert are not a whole number of "
                              f"groups of {size}; choose a group size that divides {inp}")
    return scheme


@dataclass
class Plan:
    """What the checkpoint of a model description holds: each quantized linear's and experts
    module's :class:`Scheme` (by in-memory name), the linears left in float, and whether the
    KV cache is FP8."""

    schemes: dict[str, Scheme]
    quantization: Quantization


def plan_of(description: ModelDescription) -> Plan:
    """Check ``description`` against the format and say how each module is written; raises
    :class:`~qframe.ExportError` naming the module for what the format cannot express.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> plan_of(describe_model(tiny_llama_model(), make_registry())).schemes
        {}
    """
    hf._refuse_transposed_layouts(description)
    quantization, schemes = Quantization(None, None, None), {}
    for name, state in description.linears.items():
        scheme = scheme_of(state.weights, state.activations, state.where)
        if scheme is None:
            quantization.excluded.append(name)
            continue
        size = state.weights.group_size
        if description.shapes_known and state.weights.granularity == "group" and state.in_features % size:
            raise ExportError(f"{state.where}: its {state.in_features} input channels are not a whole number of groups "
                              f"of {size}, which compressed-tensors needs; choose a group size that divides "
                              f"{state.in_features}")
        schemes[name] = scheme
        quantization.quantized[name] = state
    experts = [s for s in description.experts.values() if s.quantized]
    if experts:
        hf.hub_naming(getattr(description.model.config, "model_type", None), experts[0].where)
    for state in experts:
        schemes[state.name] = _experts_scheme(state, description.shapes_known)
        quantization.experts[state.name] = state
    for cache in description.caches.values():
        if formats.of(cache.args) is not formats.E4M3 or cache.args.dynamic or cache.args.granularity != "tensor":
            raise ExportError(f"{cache.where}: a {describe(cache.args)} KV cache cannot be written for compressed-"
                              "tensors, which vLLM serves as FP8 E4M3 with one static scale per tensor; give the "
                              "kv_cache stage activations = { type = \"float\", bits = 8 }")
    if description.caches:
        missing = [i for i in range(description.num_layers) if i not in description.caches]
        if missing and description.shapes_known:
            raise ExportError(f"{next(iter(description.caches.values())).where} quantizes its KV cache but decoder "
                              f"layer(s) {missing[:5]} keep theirs in float; compressed-tensors has one kv_cache_scheme "
                              "for every layer; quantize all of them, or none")
        quantization.kv_cache_quant_algo = "FP8"
    return Plan(schemes, quantization)


# -- tensors ---------------------------------------------------------------------------------------------

def pack_int32(codes: torch.Tensor, bits: int, signed: bool = True, dim: int = 1) -> torch.Tensor:
    """Int codes ``[rows, cols]`` as compressed-tensors packs them: offset to unsigned (``+
    2^(bits-1)`` for signed codes), then a bit stream along ``dim`` (1: each row's columns; 0:
    each column's rows, as zero points are packed), least significant bits first, in int32 words.

    Example::

        >>> hex(pack_int32(torch.arange(-8, 8).view(1, 16), 4)[0, 0].item() & 0xFFFFFFFF)
        '0x76543210'
    """
    if dim == 0:
        return pack_int32(codes.T.contiguous(), bits, signed).T.contiguous()
    u = codes.to(torch.int64) + ((1 << (bits - 1)) if signed else 0)
    rows, cols = u.shape
    words = -(-cols * bits // 32)
    if 32 % bits == 0:  # whole codes per word: shift and sum
        per = 32 // bits
        u = torch.nn.functional.pad(u, (0, words * per - cols)).view(rows, words, per)
        packed = (u << (torch.arange(per, device=u.device) * bits)).sum(-1)
    else:  # codes straddle words: through the bit stream
        shifts = torch.arange(bits, device=u.device)
        stream = ((u.unsqueeze(-1) >> shifts) & 1).view(rows, cols * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits)).view(rows, words, 32)
        packed = (stream << torch.arange(32, device=u.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _fp4(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles packed two a byte, negative zero written as zero (as the package's
    compressor writes a dequantized -0.0)."""
    return formats.NVFP4.pack(torch.where(codes == 8, torch.zeros_like(codes), codes))


def _vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().reshape(1).to(dtype).cpu().clone()


def weight_tensors(scheme: Scheme, args: QuantArgs, codes: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, global_scale: torch.Tensor | None, input_scale: torch.Tensor | None,
                   input_zero: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's tensors (local names) in ``scheme``'s format, from its codes ``[O, I]`` and
    scales as qframe holds them.

    Example::

        >>> s = scheme_of(QuantArgs(bits=4, granularity="channel"), None, "proj")
        >>> out = weight_tensors(s, QuantArgs(bits=4, granularity="channel"), torch.zeros(2, 8, dtype=torch.int8),
        ...                      torch.ones(2, 1), None, None, None, None, torch.bfloat16)
        >>> {k: (tuple(t.shape), str(t.dtype)) for k, t in out.items()}
        {'weight_packed': ((2, 1), 'torch.int32'), 'weight_scale': ((2, 1), 'torch.bfloat16'), 'weight_shape': ((2,), 'torch.int64')}
    """
    rows, cols = codes.shape
    out: dict[str, torch.Tensor] = {}
    # Per tensor or channel (or group), as the format shapes its scales: [1], [O, 1], [O, G].
    scales = scale.reshape(1) if args.granularity == "tensor" else scale.reshape(rows, -1)
    if scheme.format == PACK:
        offset = 1 << (args.bits - 1)
        # qframe's asymmetric codes and zero points are unsigned; compressed-tensors' are signed.
        out["weight_packed"] = pack_int32(codes.to(torch.int16) - (0 if args.symmetric else offset), args.bits)
        out["weight_scale"] = scales.to(dtype)
        out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if zero is not None:
            z = zero.round().to(torch.int16).reshape(scales.shape) - offset
            out["weight_zero_point"] = z.to(torch.int8) if args.granularity == "tensor" else \
                pack_int32(z, args.bits, dim=0)
    elif scheme.format == INT:
        offset = 1 << (args.bits - 1)
        out["weight"] = (codes.to(torch.int16) - (0 if args.symmetric else offset)).to(torch.int8)
        out["weight_scale"] = scales.to(dtype)
        if zero is not None:
            out["weight_zero_point"] = (zero.round().to(torch.int16).reshape(scales.shape) - offset).to(torch.int8)
    elif scheme.format == FLOAT:
        out["weight"] = codes.to(torch.float8_e4m3fn)
        out["weight_scale"] = scales.to(dtype)
    elif scheme.format == NVFP4:
        out["weight_packed"] = _fp4(codes)
        out["weight_scale"] = scale.reshape(rows, -1).to(torch.float8_e4m3fn)
        out["weight_global_scale"] = _vector(1.0 / global_scale.float(), torch.float32)
    else:  # MXFP4
        out["weight_packed"] = _fp4(codes)
        out["weight_scale"] = scale.reshape(rows, -1).to(torch.uint8)
    acts = scheme.input_activations
    if acts is not None and not acts["dynamic"]:
        out["input_scale"] = _vector(input_scale, dtype)
        if input_zero is not None and not acts["symmetric"]:
            out["input_zero_point"] = _vector(input_zero.round().to(torch.int16) - 128, torch.int8)
    if acts is not None and acts["dynamic"] == "local":  # NVFP4: the static global scale, as its reciprocal
        out["input_global_scale"] = _vector(1.0 / input_scale.float(), torch.float32)
    return {k: t.detach().contiguous().cpu() for k, t in out.items()}


def linear_tensors(state: LinearState, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, keyed by full name; an
    :class:`~qframe.ExportError` for an input prescale the format cannot hold."""
    module = state.module
    if module.has_prescale:
        raise ExportError(f"{state.name}: keeps an input prescale (an AWQ smoothing scale that could not be folded into "
                          "the layer before it), which compressed-tensors cannot hold; smooth with awq's "
                          "options = { quantize = false } and round with gptq or rtn, or export with --backend hf or "
                          "tensorrt-llm (pre_quant_scale)")
    out = weight_tensors(scheme, module.weight_args, module.weight_codes, module.weight_scale,
                         getattr(module, "weight_zero", None), getattr(module, "weight_global_scale", None),
                         getattr(module, "input_scale", None), getattr(module, "input_zero", None), dtype)
    if module.bias is not None:
        out["bias"] = module.bias.detach().to(dtype).cpu()
    return {f"{state.name}.{suffix}": t for suffix, t in out.items()}


def expert_tensors(state: ExpertsState, scheme: Scheme, leaves: tuple[str, ...], dtype: torch.dtype
                   ) -> dict[str, torch.Tensor]:
    """One quantized fused-experts module as one linear an expert (``<name>.<e>.<leaf>``, keyed
    by full in-memory name): gate_up_proj's first half of rows is the gate, the second the up
    projection; per-tensor scales are the expert's for both halves, the input scales the
    module's for every expert."""
    buffers, args, out = state.module._buffers, state.module.weight_args, {}
    per_tensor = args.granularity == "tensor"
    for fused, halves in (("gate_up_proj", leaves[:2]), ("down_proj", leaves[2:])):
        codes, scale, zero = (buffers.get(f"{fused}_{s}") for s in ("codes", "scale", "zero"))
        global_scale, input_scale, input_zero = (buffers.get(f"{fused}_{s}") for s in
                                                 ("global_scale", "input_scale", "input_zero"))
        rows = codes.shape[1] // len(halves)
        for e in range(codes.shape[0]):
            for i, leaf in enumerate(halves):
                part = slice(i * rows, (i + 1) * rows)
                tensors = weight_tensors(scheme, args, codes[e, part], scale[e] if per_tensor else scale[e, part],
                                         None if zero is None else zero[e] if per_tensor else zero[e, part],
                                         None if global_scale is None else global_scale[e], input_scale, input_zero,
                                         dtype)
                out.update({f"{state.name}.{e}.{leaf}.{suffix}": t.clone() for suffix, t in tensors.items()})
    return out


def kv_tensors(cache: CacheState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's FP8 cache scales on its attention module, as compressed-tensors names them."""
    k, v = cache.scales()
    return {f"{cache.attention}.k_scale": _vector(k, dtype), f"{cache.attention}.v_scale": _vector(v, dtype)}


def _rounded_scales(tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> float:
    """The largest relative change writing ``originals`` (float32 scales) as ``tensors`` made."""
    worst = 0.0
    for name, original in originals.items():
        written = tensors[name].float().reshape(original.shape)
        change = ((written - original.float()).abs() / original.float().abs().clamp_min(1e-30)).max()
        worst = max(worst, float(change))
    return worst


@dataclass
class CTSession(hf.HFSession):
    """:class:`qframe_plugins.hf.HFSession` plus each module's :class:`Scheme` and the linears
    whose scales the checkpoint dtype rounds (warned about once, at the end)."""

    schemes: dict[str, Scheme] = field(default_factory=dict)
    rounded: dict[str, float] = field(default_factory=dict)


def plan_checkpoint(description: ModelDescription, options: hf.HFOptions) -> CTSession:
    """Everything the export checks and decides before a tensor is read (the parts may be on
    the meta device).

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.description import describe_model
        >>> session = plan_checkpoint(describe_model(tiny_llama_model().to("meta"), make_registry()), hf.HFOptions())
        >>> session.schemes, session.dtype
        ({}, torch.float16)
    """
    plan = plan_of(description)
    quantization, model, arch = plan.quantization, description.model, description.arch
    renames, leaves = hf.hub_naming(getattr(model.config, "model_type", None)) if quantization.experts else ([], ())
    quantizers = {id(c.module) for c in description.caches.values() if c.module is not None}
    caches = {name for name, module in model.named_modules() if id(module) in quantizers}
    return CTSession(description, quantization, description.serving_dtype(options.dtype), options.shard_bytes, set(),
                     renames, leaves, hf.tied_names(model), caches, hf._by_part(quantization.quantized, arch), {},
                     hf._by_part(description.caches.values(), arch, lambda c: c.attention),
                     hf._by_part(quantization.experts.values(), arch, lambda e: e.name), schemes=plan.schemes)


def checkpoint_tensors(session: CTSession, part) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of one model part, under the checkpoint's names; notes the
    scales the checkpoint dtype rounds."""
    dtype = session.dtype

    def linear(name: str) -> dict[str, torch.Tensor]:
        state = session.quantization.quantized[name]
        tensors = linear_tensors(state, session.schemes[name], dtype)
        scale = state.module.weight_scale
        if scale.dtype == torch.float32 and f"{name}.weight_scale" in tensors:
            worst = _rounded_scales(tensors, {f"{name}.weight_scale": scale})
            if worst:
                session.rounded[name] = worst
        return tensors

    def experts(state: ExpertsState) -> dict[str, torch.Tensor]:
        for fused in ("gate_up_proj", "down_proj"):
            scale = state.module._buffers.get(f"{fused}_scale")
            if scale is not None and scale.dtype == torch.float32 and dtype != torch.float32:
                written = scale.to(dtype).float()
                worst = float(((written - scale).abs() / scale.abs().clamp_min(1e-30)).max())
                if worst:
                    session.rounded[state.name] = max(worst, session.rounded.get(state.name, 0.0))
        return expert_tensors(state, session.schemes[state.name], session.leaves, dtype)

    return hf.model_tensors(session, part, linear, lambda cache: kv_tensors(cache, dtype), experts)


# -- config ----------------------------------------------------------------------------------------------

def quantization_config(session: CTSession) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: one group per scheme, in model order
    (``targets = ["Linear"]`` when one scheme covers every quantized linear, else the group's
    modules by name), ``ignore`` (the linears and routers left in float, by checkpoint name) and
    the KV cache scheme; keys as compressed-tensors serializes them."""
    description, quantization = session.description, session.quantization
    name = lambda n: hf._hub_name(n, session.renames)  # noqa: E731 - the checkpoint's name of a module
    members: dict[str, list[str]] = {}
    for module, scheme in session.schemes.items():
        if module in quantization.experts:
            leaves = session.leaves
            members.setdefault(scheme.key, []).extend(
                f"{name(module)}.{e}.{leaf}" for e in range(quantization.experts[module].num_experts) for leaf in leaves)
        else:
            members.setdefault(scheme.key, []).append(name(module))
    schemes = {s.key: s for s in session.schemes.values()}
    groups = {}
    for i, (key, modules) in enumerate(members.items()):
        scheme = schemes[key]
        targets = ["Linear"] if len(members) == 1 else sorted(modules)
        groups[f"group_{i}"] = {"format": scheme.format, "input_activations": scheme.input_activations,
                                "output_activations": None, "targets": targets, "weights": scheme.weights}
    used = sorted({s.format for s in session.schemes.values()})
    ignore = [name(n) for n in quantization.excluded + hf._routers(description, quantization)]
    kv = _args(8, "float", "tensor") if quantization.kv_cache_quant_algo else None
    return {"config_groups": groups, "format": used[0] if len(used) == 1 else "mixed-precision" if used else "dense",
            "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": kv, "moe_sparsity_config": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": VERSION}


# -- the exporter ----------------------------------------------------------------------------------------

class CompressedTensorsExporter:
    """Writes, checks and validates compressed-tensors checkpoints (see the module docstring).

    Example::

        >>> CompressedTensorsExporter().subdirectory
        'compressed-tensors'
    """

    subdirectory = "compressed-tensors"

    def __init__(self, options: hf.HFOptions | None = None):
        self.options = options or hf.HFOptions()

    def check(self, description: ModelDescription) -> None:
        """Refuse what the format cannot express, before calibration, naming the module."""
        plan_of(description)

    def export(self, qmodel: Any, directory: str | Path) -> Path:
        """Write the safetensors, ``config.json`` with its ``quantization_config``, the
        generation config and the tokenizer into ``directory``, a model part at a time."""
        from qframe.parts import write_in_parts

        return write_in_parts(self, qmodel.describe(), Path(directory), tokenizer=qmodel.tokenizer)

    def begin(self, description: ModelDescription) -> CTSession:
        """Check ``description`` and plan its checkpoint from the modules' structure alone."""
        return plan_checkpoint(description, self.options)

    def part(self, session: CTSession, part) -> dict[str, dict[str, torch.Tensor]]:
        """The checkpoint tensors of one model part, as stream ``"model"``."""
        return {STREAM: checkpoint_tensors(session, part)}

    def finish(self, session: CTSession, directory: Path, spool: Any, tokenizer: Any = None) -> None:
        """Assemble the safetensors from the spooled parts and write the configs and tokenizer;
        warn once about the scales the checkpoint dtype rounded."""
        if session.rounded:
            order = session.order
            names = hf.in_order([n for n in session.rounded if n in order], order) + \
                [n for n in session.rounded if n not in order]  # experts after the linears
            warnings.warn(f"{names[0]}{f' and {len(names) - 1} more modules' if len(names) > 1 else ''}: weight scales "
                          f"are not exact in {str(session.dtype).removeprefix('torch.')}, in which compressed-tensors "
                          f"stores them (by up to {max(session.rounded.values()):.1e} relative), so the served weights "
                          "differ slightly from the evaluated ones; quantize the model in its serving dtype, or export "
                          "with dtype = \"float32\"", stacklevel=2)
        config = hf.write_model_files(session, Path(directory), spool, tokenizer)
        config["quantization_config"] = quantization_config(session)
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def validate(self, directory: str | Path) -> list[str]:
        """The problems of a written checkpoint directory (empty when it is valid)."""
        return validate_checkpoint(Path(directory))

    def recognizes(self, directory: str | Path) -> bool:
        """Whether ``config.json`` says compressed-tensors."""
        try:
            config = json.loads((Path(directory) / "config.json").read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            return False
        quant = config.get("quantization_config") if isinstance(config, dict) else None
        return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


# -- the validator ---------------------------------------------------------------------------------------

_ARGS_KEYS = ("dynamic", "group_size", "num_bits", "strategy", "symmetric", "type")
# Tensors a quantized linear (or an attention's KV cache) has beside the model's own.
_QUANT_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale",
                 "input_scale", "input_zero_point", "input_global_scale", "k_scale", "v_scale")


def _matches(name: str, targets: list[str], linear: bool) -> bool:
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], name):
                return True
        elif target == name or (target == "Linear" and linear):
            return True
    return False


def _expected(fmt: str, weights: dict, acts: dict | None, rows: int, cols: int, dtype: str) -> dict[str, tuple]:
    """The (shape, dtype) of each tensor of a ``rows x cols`` linear in ``fmt`` (shapes of
    ``None``: any)."""
    bits, strategy, size = weights.get("num_bits"), weights.get("strategy"), weights.get("group_size")
    scale_shape = {"tensor": (1,), "channel": (rows, 1)}.get(strategy, (rows, cols // size if size else -1))
    out: dict[str, tuple] = {}
    if fmt == PACK:
        out = {"weight_packed": ((rows, -(-cols * bits // 32)), "int32"), "weight_scale": (scale_shape, dtype),
               "weight_shape": ((2,), "int64")}
        if not weights.get("symmetric"):
            zero = (1,) if strategy == "tensor" else (-(-rows * bits // 32), scale_shape[1])
            out["weight_zero_point"] = (zero, "int8" if strategy == "tensor" else "int32")
    elif fmt == INT:
        out = {"weight": ((rows, cols), "int8"), "weight_scale": (scale_shape, dtype)}
        if not weights.get("symmetric"):
            out["weight_zero_point"] = (scale_shape, "int8")
    elif fmt == FLOAT:
        out = {"weight": ((rows, cols), "float8_e4m3fn"), "weight_scale": (scale_shape, dtype)}
    elif fmt == NVFP4:
        out = {"weight_packed": ((rows, cols // 2), "uint8"), "weight_scale": ((rows, cols // 16), "float8_e4m3fn"),
               "weight_global_scale": ((1,), "float32")}
        if acts is not None:
            out["input_global_scale"] = ((1,), "float32")
    elif fmt == MXFP4:
        out = {"weight_packed": ((rows, cols // 2), "uint8"), "weight_scale": ((rows, cols // 32), "uint8")}
    if fmt in (INT, FLOAT) and acts is not None and acts.get("dynamic") is False:
        out["input_scale"] = ((1,), dtype)
        if not acts.get("symmetric"):
            out["input_zero_point"] = ((1,), "int8")
    return out


def validate_checkpoint(directory: Path) -> list[str]:
    """Check a compressed-tensors checkpoint directory: ``quantization_config`` is well formed;
    every quantized linear (found by its ``weight_scale``) belongs to one config group and has
    that group's tensors with the right dtypes and shapes for the linear ``config.json``'s model
    has there (each expert's, where fused experts are written one linear an expert); every other
    linear of the model is in ``ignore``; the KV cache has its scales on every layer.

    Example::

        >>> validate_checkpoint(Path("/nonexistent"))
        ['config.json is missing']
    """
    try:
        config = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        return ["config.json is missing"]
    except (OSError, ValueError, RecursionError) as exc:
        return [f"config.json: unreadable ({shorten(str(exc))})"]
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return ["config.json has no quantization_config with quant_method \"compressed-tensors\""]
    problems: list[str] = []
    groups, ignore = quant.get("config_groups"), quant.get("ignore")
    if not isinstance(groups, dict) or not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        return ["quantization_config: config_groups must be a table and ignore a list of module names"]
    for key, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or any(k not in weights for k in _ARGS_KEYS):
            problems.append(f"config_groups.{key}: weights must give {', '.join(_ARGS_KEYS)}")
        elif group.get("format") not in FORMATS:
            problems.append(f"config_groups.{key}: format {shorten(group.get('format'))} is not one of "
                            f"{', '.join(FORMATS)}")
        elif not isinstance(group.get("targets"), list) or not all(isinstance(t, str) for t in group["targets"]):
            problems.append(f"config_groups.{key}: targets must be a list of names, re: patterns or classes")
    formats_used = sorted({g["format"] for g in groups.values()}) if not problems else []
    declared = formats_used[0] if len(formats_used) == 1 else "mixed-precision" if formats_used else "dense"
    if not problems and quant.get("format") != declared:
        problems.append(f"quantization_config: format is {shorten(quant.get('format'))}, expected {declared} for "
                        "these groups")
    if not (directory / hf.WEIGHTS).is_file() and not (directory / hf.INDEX).is_file():
        problems.append(f"{hf.WEIGHTS} is missing")
    if problems:
        return problems
    specs, more = hf._tensor_specs(directory)
    problems += more
    linears, dtype = _model_linears(config, specs)
    if isinstance(linears, str):
        return problems + [linears]
    quantized = {n.rpartition(".")[0] for n in specs if n.endswith(".weight_scale")}
    for prefix in sorted(quantized):
        owners = [(k, g) for k, g in groups.items() if _matches(prefix, g["targets"], prefix in linears)]
        if not owners:
            problems.append(f"{prefix} is quantized but no config group targets it")
            continue
        if _matches(prefix, ignore, False):
            problems.append(f"{prefix} is quantized but ignore lists it")
        key, group = owners[0]
        shape = linears.get(prefix)
        if shape is None:
            problems.append(f"{prefix} is quantized but config.json's model has no linear there")
            continue
        want = _expected(group["format"], group["weights"], group.get("input_activations"), *shape, dtype)
        for leaf, (want_shape, want_dtype) in want.items():
            found = specs.get(f"{prefix}.{leaf}")
            if found is None:
                problems.append(f"{prefix}.{leaf} is missing ({key}: {group['format']})")
            elif found != (tuple(want_shape), want_dtype):
                problems.append(f"{prefix}.{leaf} is {found[1]} {list(found[0])}, expected {want_dtype} "
                                f"{list(want_shape)} ({key}: {group['format']})")
        for name in specs:
            owner, _, leaf = name.rpartition(".")
            if owner == prefix and leaf in _QUANT_LEAVES and leaf not in want:
                problems.append(f"{name} is written but {key}'s {group['format']} has no {leaf}")
    for prefix in sorted(set(linears) - quantized):
        if f"{prefix}.weight" in specs and any(_matches(prefix, g["targets"], True) for g in groups.values()) \
                and not _matches(prefix, ignore, False):
            problems.append(f"{prefix} is targeted but left in float and not in ignore, so loaders would read it as "
                            "quantized")
    problems += _kv_problems(quant.get("kv_cache_scheme"), specs, config)
    return problems[:20] + ([f"and {len(problems) - 20} more problems"] if len(problems) > 20 else [])


def _model_linears(config: dict, specs: dict) -> tuple[dict[str, tuple[int, int]] | str, str]:
    """The linears (and routers) of the model ``config`` describes, by checkpoint name, with
    their ``(out, in)``; fused experts as the per-expert linears the checkpoint holds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qframe.experts import is_fused_experts

    try:
        model_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except Exception as exc:  # transformers raises many types for a damaged config
        return f"config.json: not a usable model config ({shorten(' '.join(str(exc).split()))})", ""
    dtype = str(config.get("dtype") or "").removeprefix("torch.")
    linears: dict[str, tuple[int, int]] = {}
    renames: list = []
    for name, module in skeleton.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or (
                isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding)
                and "norm" not in type(module).__name__.lower()):
            linears[name] = tuple(weight.shape)
        elif is_fused_experts(module) and getattr(module, "gate_up_proj", None) is not None:
            if not renames:
                try:
                    renames, leaves = hf.hub_naming(getattr(model_config, "model_type", None))
                except ExportError:
                    continue
            e, rows, cols = module.gate_up_proj.shape
            _, out, inner = module.down_proj.shape
            for i in range(e):
                for leaf, shape in zip(leaves, ((rows // 2, cols), (rows // 2, cols), (out, inner))):
                    linears[f"{name}.{i}.{leaf}"] = shape
    return {hf._hub_name(n, renames): s for n, s in linears.items()}, dtype


def _kv_problems(kv: Any, specs: dict, config: dict) -> list[str]:
    scales = {n: s for n, s in specs.items() if n.endswith((".k_scale", ".v_scale"))}
    if kv is None:
        return [f"{n} is written but kv_cache_scheme is null" for n in sorted(scales)][:1]
    if not isinstance(kv, dict) or kv.get("type") != "float" or kv.get("num_bits") != 8:
        return [f"kv_cache_scheme {shorten(kv)} is not FP8 (type float, 8 bits)"]
    layers = config.get("num_hidden_layers")
    problems = [f"{n} is {s[1]} {list(s[0])}, expected a [1] scale" for n, s in scales.items() if s[0] != (1,)]
    for role in ("k_scale", "v_scale"):
        count = sum(1 for n in scales if n.endswith(f".{role}"))
        if count != layers:
            problems.append(f"{count} {role} tensors for {layers} layers with an FP8 KV cache")
    return problems


@hookimpl
def qframe_backends():
    summary = "compressed-tensors checkpoint (llm-compressor's format) for vLLM and SGLang"
    yield BackendPlugin(name="compressed-tensors", summary=summary, factory=CompressedTensorsExporter,
                        options=hf.HFOptions)
