"""Fused mixture-of-experts modules: recognizing them, and their quantized state.

In transformers 5 a decoder layer's routed experts are one module with 3-D parameters whose
leading dimension is the number of experts, e.g. Qwen3-MoE's ``Qwen3MoeExperts``:
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, each expert's matrix used as
``F.linear(x, W[e])`` (``[E, out, in]``). gpt-oss stores them the other way round and
computes ``x @ W[e] + b[e]`` (``[E, in, out]``, with 2-D expert biases that stay float).

Orientation is read from what the class says, never guessed from shapes (a square expert
would be ambiguous): transformers' ``@use_experts_implementation`` sets ``is_transposed`` on
every expert module it decorates (Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss); for other
classes the source of ``forward`` must show ``linear(..., self.W[...])`` (``[E, out, in]``) or
``... @ self.W[...]`` (``[E, in, out]``) for each 3-D weight, and anything else is a
:class:`~qframe.errors.ModelError`.

:class:`QuantExperts` converts such a module **in place**: each 3-D weight Parameter becomes
persistent buffers of codes ``<w>_codes [E, out, in]`` and scales ``<w>_scale [E, out, groups]``
(``[E, 1, 1]`` per tensor; ``<w>_zero`` when asymmetric; NVFP4's FP32 ``<w>_global_scale [E]``,
one per expert) and a non-persistent buffer ``<w>`` holding the dequantized weight in the
module's own layout and dtype. The module's class becomes a subclass of both
:class:`QuantExperts` and its own class, so its own ``forward`` — and every experts
implementation transformers dispatches to (``eager``, ``grouped_mm``, ``batched_mm``), the
routing around it, and any adapter's ``isinstance`` test — runs unchanged on exactly the
weights that are served, and state-dict names stay the model's. A wrapper would have
renamed every tensor (``experts.inner.gate_up_proj``) and had to re-implement each family's
forward.

Example::

    >>> import torch, transformers
    >>> from qframe.scheme import QuantArgs
    >>> config = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4)
    >>> experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj); _ = torch.nn.init.normal_(experts.down_proj)
    >>> is_fused_experts(experts), expert_layouts(experts)
    (True, {'gate_up_proj': 'out_in', 'down_proj': 'out_in'})
    >>> q = QuantExperts.quantize(experts, QuantArgs(bits=4, granularity="group", group_size=16))
    >>> isinstance(q, QuantExperts), tuple(q.gate_up_proj_codes.shape), tuple(q.gate_up_proj_scale.shape)
    (True, (4, 32, 32), (4, 32, 2))
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Callable

import torch
from torch import nn

from . import numerics
from .errors import ModelError, RecipeError
from .scheme import QuantArgs

OUT_IN = "out_in"  # W[e] is [out, in]: F.linear(x, W[e])
IN_OUT = "in_out"  # W[e] is [in, out]: x @ W[e]
LAYOUTS = (OUT_IN, IN_OUT)
# Buffers of a quantized weight, by suffix: exact in their own dtypes, never cast.
_SUFFIXES = ("_codes", "_scale", "_zero", "_global_scale", "_input_scale", "_input_zero")


def _weights3d(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own 3-D floating-point parameters, by name."""
    return {n: p for n, p in module._parameters.items()
            if p is not None and p.dim() == 3 and p.dtype.is_floating_point}


def is_fused_experts(module: object) -> bool:
    """Whether ``module`` is a fused-experts module: quantized (:class:`QuantExperts`), or one
    with 3-D floating-point parameters of its own that share a leading dimension of at least 2
    (the number of experts). What it computes is read by :func:`expert_layouts`.

    Example::

        >>> is_fused_experts(torch.nn.Linear(4, 4)), is_fused_experts("x")
        (False, False)
    """
    if isinstance(module, QuantExperts):
        return True
    if not isinstance(module, nn.Module) or isinstance(module, nn.modules.conv._ConvNd):
        return False  # a convolution's weight is 3-D too
    weights = _weights3d(module)
    leading = {p.shape[0] for p in weights.values()}
    return len(leading) == 1 and next(iter(leading)) >= 2


def num_experts(module: nn.Module) -> int:
    """The number of experts of a fused-experts module (the leading dimension of its weights)."""
    if isinstance(module, QuantExperts):
        return int(next(iter(module.expert_weights_of().values()))[0])
    return int(next(iter(_weights3d(module).values())).shape[0])


def _forward_source(module: nn.Module) -> str:
    forward = inspect.unwrap(type(module).forward)
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return ""


def expert_layouts(module: nn.Module) -> dict[str, str]:
    """Each 3-D weight of a fused-experts module and how its forward reads it: ``"out_in"``
    (``F.linear(x, W[e])``, ``W [E, out, in]``) or ``"in_out"`` (``x @ W[e]``, ``W [E, in,
    out]``). Read from transformers' ``is_transposed`` flag where the class carries it, else
    from the source of its ``forward``; a :class:`ModelError` where neither tells.

    Example::

        >>> class Experts(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.zeros(2, 3, 4))
        ...     def forward(self, x, e):
        ...         return x @ self.w[e]
        >>> expert_layouts(Experts())
        {'w': 'in_out'}
    """
    if isinstance(module, QuantExperts):
        return dict(module.expert_layouts)
    weights = _weights3d(module)
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return {n: IN_OUT if flag else OUT_IN for n in weights}
    source = _forward_source(module)
    layouts = {}
    for name in weights:
        as_linear = re.search(rf"linear\([^()]*?,\s*self\.{name}\[", source)
        as_matmul = re.search(rf"@\s*self\.{name}\[", source)
        if bool(as_linear) == bool(as_matmul):
            raise ModelError(
                f"{type(module).__name__}.{name} is a 3-D weight of what looks like fused experts "
                f"{list(weights[name].shape)}, but qframe cannot tell from {type(module).__name__}.forward whether "
                "each expert computes F.linear(x, W[e]) or x @ W[e]; leave these experts out of the recipe's targets "
                "(targets = [\"Linear\"]) or set is_transposed on the class")
        layouts[name] = OUT_IN if as_linear else IN_OUT
    return layouts


def expert_weight_names(module: nn.Module) -> tuple[str, str]:
    """The weight that reads the experts' input (``gate_up_proj``, or ``up_proj`` without a gate)
    and the one that reads each expert's hidden activation (``down_proj``); a
    :class:`ModelError` for a fused-experts class laid out otherwise, which data-driven
    algorithms cannot calibrate (round-to-nearest still quantizes it)."""
    layouts = expert_layouts(module)
    first = next((n for n in ("gate_up_proj", "up_proj") if n in layouts), None)
    if first is None or "down_proj" not in layouts or len(layouts) != 2:
        raise ModelError(
            f"{type(module).__name__} holds fused experts as {sorted(layouts)}; the data-driven algorithms (gptq, "
            "awq) calibrate experts laid out as transformers 5 lays them out (gate_up_proj or up_proj, then "
            "down_proj). Quantize these experts with rtn (or fp8/nvfp4/mxfp4), or leave them out of this stage's "
            "targets (targets = [\"Linear\"])")
    return first, "down_proj"


def expert_matrix(module: nn.Module, name: str) -> torch.Tensor:
    """The weight ``name`` of every expert as ``[E, out, in]`` (a view), float or dequantized."""
    w = getattr(module, name)
    return w if expert_layouts(module)[name] == OUT_IN else w.transpose(1, 2)


def expert_gate(module: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """What the experts make of their first weight's output ``[..., out]``: transformers' own
    ``_apply_gate`` (``act(gate) · up`` on the halves, gpt-oss's clamped GLU), or ``act_fn``
    alone for experts without a gate; batched over any leading dimensions."""
    if not getattr(module, "has_gate", True):
        return module.act_fn(projected)
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:  # transformers' own (default or the family's), applied batched
        return apply_gate(projected)
    gate, up = projected.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def check_expert_inputs(module: nn.Module, activations: QuantArgs) -> None:
    """Refuse, naming why, quantized inputs the experts cannot take: static ones other than per
    tensor (one scale a weight, shared by its experts, as serving engines keep it), and experts
    not laid out as transformers 5 lays them out (their computation is then unknown), or with a
    norm after each expert."""
    if not (activations.dynamic or activations.granularity == "tensor" or activations.number_format.has_global_scale):
        raise RecipeError("activations.granularity", activations.granularity,
                          "the inputs of fused experts take one static scale per weight, shared by the experts "
                          "(as TensorRT-LLM and vLLM serve them); allowed: tensor, NVFP4's blocks under a static "
                          "global scale, or dynamic = true")
    expert_weight_names(module)
    if getattr(module, "has_post_expert_norm", False):
        raise ModelError(f"{type(module).__name__} normalizes each expert's output; qframe quantizes its "
                         "weights but not its inputs: drop the stage's activations for these experts")


# -- batched arithmetic: every expert at once, each with its own scales ----------------------

def _row_args(args: QuantArgs) -> QuantArgs:
    """Per-tensor args become per-row args on the ``[E, out*in]`` view: one scale per expert."""
    return dataclasses.replace(args, granularity="channel") if args.granularity == "tensor" else args


def _rows(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``[E, out, in]`` as the 2-D view the batched arithmetic rounds: ``[E, out*in]`` per tensor
    (one row an expert), else ``[E*out, in]`` (rows and groups of every expert)."""
    e, out, inp = w.shape
    return w.reshape(e, out * inp) if args.granularity == "tensor" else w.reshape(e * out, inp)


def _row_global(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """NVFP4's global scale per expert ``[E]`` (from each expert's largest finite magnitude, as
    :func:`qframe.numerics.weight_global_scale` takes it from one matrix) and the same spread
    over the rows of :func:`_rows` ``[rows, 1]``; ``(None, None)`` for other formats."""
    fmt = args.number_format
    if not fmt.has_global_scale:
        return None, None
    amax = numerics._finite(w.float()).abs().amax(dim=(1, 2))
    per_expert = fmt.global_scale(amax)
    rows = per_expert if args.granularity == "tensor" else per_expert.repeat_interleave(w.shape[1])
    return per_expert, rows.unsqueeze(-1)


def _mse_rows(rows: torch.Tensor, args: QuantArgs, fixed: torch.Tensor | None, *, max_shrink: float = 0.2,
              steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qframe.numerics.mse_ranges` on the rows of every expert at once, with NVFP4's
    global scale fixed per expert (``fixed``, ``[rows, 1]``) rather than over all of them."""
    lo, hi = numerics.minmax_ranges(rows, args)
    g = numerics.grouped(numerics._finite(rows.float()), args)
    best_err = torch.full(lo.shape, math.inf, device=rows.device)
    best_ratio = torch.ones_like(lo)
    for k in range(steps + 1):
        ratio = 1.0 - max_shrink * k / steps
        scale, zero, global_scale = numerics.scale_parts(lo * ratio, hi * ratio, args, fixed)
        effective = numerics.effective_scale(scale, global_scale, args).unsqueeze(-1)
        z = None if zero is None else zero.unsqueeze(-1)
        err = (numerics.dequantize(numerics.quantize(g, effective, z, args), effective, z) - g).square().sum(-1)
        better = err < best_err  # ties keep the wider range
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return lo * best_ratio, hi * best_ratio


RANGES = ("minmax", "mse")


@dataclasses.dataclass
class QuantizedExperts:
    """One fused weight's experts, quantized: codes ``[E, out, in]``, scales and zero points
    ``[E, out, groups]`` (``[E, 1, 1]`` per tensor), NVFP4's ``global_scale [E]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    global_scale: torch.Tensor | None


def quantize_experts(w: torch.Tensor, args: QuantArgs, calibrator: str = "minmax", *,
                     served_dtype: torch.dtype | None = None,
                     ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
                     global_scale: torch.Tensor | None = None) -> QuantizedExperts:
    """Round every expert's matrix of ``w [E, out, in]`` in one batched call, each with its own
    scales as ``args`` says (per tensor: one an expert; per channel or group: its rows' and
    groups'; NVFP4: a global scale an expert), from min/max ranges or, with ``calibrator =
    "mse"``, clipped ranges of least rounding error; an algorithm that fixed its own ranges
    (GPTQ, AWQ's clip search) passes them as ``ranges`` (``[E, out, groups]``, ``[E, 1, 1]`` per
    tensor) and NVFP4's ``global_scale [E]``. Expert ``e``'s result is bit-equal to
    :func:`qframe.numerics.quantize_weight` of ``w[e]`` alone.

    Example::

        >>> w = torch.randn(3, 4, 8)
        >>> args = QuantArgs(bits=4, granularity="tensor")
        >>> q = quantize_experts(w, args)
        >>> tuple(q.scale.shape), torch.equal(q.codes[1], numerics.quantize_weight(w[1], args).codes)
        ((3, 1, 1), True)
    """
    if calibrator not in RANGES:
        raise ValueError(f"weight ranges of experts come from {' or '.join(RANGES)}, not {calibrator!r}")
    e, out, inp = w.shape
    step = _experts_per_chunk(w)
    if step < e:  # experts are independent: a chunk at a time bounds the float32 temporaries
        parts = [quantize_experts(w[i:i + step], args, calibrator, served_dtype=served_dtype or w.dtype,
                                  ranges=None if ranges is None else tuple(r[i:i + step] for r in ranges),
                                  global_scale=None if global_scale is None else global_scale.reshape(e)[i:i + step])
                 for i in range(0, e, step)]
        joined = lambda key: None if getattr(parts[0], key) is None else torch.cat([getattr(p, key) for p in parts])
        return QuantizedExperts(joined("codes"), joined("scale"), joined("zero"), joined("global_scale"))
    row_args = _row_args(args)
    rows = _rows(w, args)
    per_expert, row_global = _row_global(w, args)
    if global_scale is not None:
        per_expert = global_scale.reshape(e).float()
        row_global = (per_expert if args.granularity == "tensor" else per_expert.repeat_interleave(out)).unsqueeze(-1)
    if ranges is not None:  # [E, out, groups] -> the rows of _rows: [E, 1] per tensor, else [E*out, groups]
        ranges = tuple(r.reshape(e, 1) if args.granularity == "tensor" else r.reshape(e * out, -1) for r in ranges)
    elif calibrator == "mse":
        ranges = _mse_rows(rows, row_args, row_global)
    q = numerics.quantize_weight(rows, row_args, ranges, row_global,
                                 served_dtype=w.dtype if served_dtype is None else served_dtype)
    shape = (e, 1, 1) if args.granularity == "tensor" else (e, out, -1)
    return QuantizedExperts(q.codes.reshape(e, out, inp), q.scale.reshape(shape),
                            None if q.zero is None else q.zero.reshape(shape), per_expert)


# Weight elements of one chunk of experts rounded at once: the float32 temporaries of rounding a
# whole fused weight (Qwen3-30B-A3B's gate_up_proj: 128 experts, 403 M elements) would be many GiB.
CHUNK_ELEMENTS = 1 << 25


def _experts_per_chunk(w: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, w[0].numel()))


def dequantize_experts(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs,
                       global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``[E, out, in]`` from the stored codes and scales of :func:`quantize_experts`."""
    e, out, inp = codes.shape
    row_args = _row_args(args)
    rows = _rows(codes, args)
    flat = (lambda t: t.reshape(e, -1)) if args.granularity == "tensor" else (lambda t: t.reshape(e * out, -1))
    row_global = None
    if global_scale is not None:
        row_global = global_scale.float() if args.granularity == "tensor" else global_scale.float().repeat_interleave(out)
        row_global = row_global.unsqueeze(-1)
    w = numerics.dequantize_weight(rows, flat(scale), None if zero is None else flat(zero), row_args,
                                   global_scale=row_global)
    return w.reshape(e, out, inp)


# -- the module -----------------------------------------------------------------------------

_CLASSES: dict[type, type] = {}


def _quant_class(cls: type) -> type:
    if issubclass(cls, QuantExperts):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantExperts, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


class QuantExperts(nn.Module):
    """A fused-experts module converted in place to hold its experts' weights quantized (see the
    module docstring for the buffers and why in place). Never built directly: use
    :meth:`quantize` (quantize a float module) or :meth:`convert` (empty state, to load into).

    ``weight_args`` and ``input_args`` are the stage's; ``expert_layouts`` maps each quantized
    weight to ``"out_in"`` or ``"in_out"``. Casts (``.half()``, ``.to()``) never change codes
    or scales; the dequantized weights are recomputed in the new dtype.
    """

    stands_for = ("Experts",)  # recipe targets that name Experts reach quantized experts too
    weight_args: QuantArgs
    input_args: QuantArgs | None
    expert_layouts: dict[str, str]

    @classmethod
    def convert(cls, module: nn.Module, weights: QuantArgs, activations: QuantArgs | None = None,
                layouts: dict[str, str] | None = None) -> "QuantExperts":
        """Turn the fused-experts ``module`` into a :class:`QuantExperts` with zero codes and unit
        scales (what :func:`qframe.checkpoint.load_native` loads into); returns it."""
        if isinstance(module, QuantExperts):
            raise ValueError(f"{type(module).__name__} is quantized already")
        layouts = expert_layouts(module) if layouts is None else layouts
        static = activations is not None and not activations.dynamic
        if activations is not None:
            check_expert_inputs(module, activations)
        fmt = weights.number_format
        for name, layout in layouts.items():
            param = module._parameters[name]
            e, a, b = param.shape
            out, inp = (a, b) if layout == OUT_IN else (b, a)
            rows = 1 if weights.granularity == "tensor" else out
            groups = 1 if weights.granularity == "tensor" else numerics.n_groups(inp, weights)
            device, dtype = param.device, param.dtype
            del module._parameters[name]
            module.register_buffer(f"{name}_codes", torch.zeros(e, out, inp, dtype=fmt.code_dtype, device=device))
            module.register_buffer(f"{name}_scale", torch.ones(e, rows, groups, device=device).to(fmt.scale_dtype))
            if not weights.symmetric:
                module.register_buffer(f"{name}_zero", torch.zeros(e, rows, groups, device=device))
            if fmt.has_global_scale:
                module.register_buffer(f"{name}_global_scale", torch.ones(e, device=device))
            module.register_buffer(name, torch.zeros(param.shape, dtype=dtype, device=device), persistent=False)
            if static:  # one input scale per weight, shared by the experts (what engines serve)
                module.register_buffer(f"{name}_input_scale", torch.ones((), device=device))
                if not activations.symmetric:
                    module.register_buffer(f"{name}_input_zero", torch.zeros((), device=device))
        module.__class__ = _quant_class(type(module))
        module.weight_args, module.input_args, module.expert_layouts = weights, activations, dict(layouts)
        return module

    @classmethod
    def quantize(cls, module: nn.Module, weights: QuantArgs, calibrator: str = "minmax",
                 activations: QuantArgs | None = None) -> "QuantExperts":
        """Quantize every 3-D weight of the fused-experts ``module`` in place (each expert with its
        own scales, :func:`quantize_experts`; group-wise int scales rounded to the module's dtype)
        and return it, now a :class:`QuantExperts`. Static ``activations`` need their ranges
        set afterwards (:meth:`set_input_range`, from calibration)."""
        layouts = expert_layouts(module)
        originals = {n: module._parameters[n].detach() for n in layouts}
        converted = cls.convert(module, weights, activations, layouts)
        for name, w in originals.items():
            converted.set_weight(name, w)
        return converted

    def expert_weights_of(self) -> dict[str, tuple[int, int, int]]:
        """Each quantized weight's ``(E, out, in)``."""
        return {n: tuple(self._buffers[f"{n}_codes"].shape) for n in self.expert_layouts}

    def matrix(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (shaped like the weight ``name`` in the module's layout) as ``[E, out, in]``."""
        return w if self.expert_layouts[name] == OUT_IN else w.transpose(1, 2)

    def set_weight(self, name: str, w: torch.Tensor, *, served_dtype: torch.dtype | None = None,
                   ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
                   global_scale: torch.Tensor | None = None) -> None:
        """Quantize the float weight ``name`` (``w`` in the module's own layout) into its codes
        and scales — with the stage's weight ranges, or ``ranges``/``global_scale`` an algorithm
        fixed (see :func:`quantize_experts`) — and refresh the dequantized weight."""
        served = self._buffers[name].dtype if served_dtype is None else served_dtype
        q = quantize_experts(self.matrix(name, w.detach()).contiguous(), self.weight_args,
                             self.weight_args.calibrator, served_dtype=served, ranges=ranges,
                             global_scale=global_scale)
        self._buffers[f"{name}_codes"].copy_(q.codes)
        self._buffers[f"{name}_scale"].copy_(q.scale)
        if q.zero is not None:
            self._buffers[f"{name}_zero"].copy_(q.zero)
        if q.global_scale is not None:
            self._buffers[f"{name}_global_scale"].copy_(q.global_scale)
        self.refresh()

    def set_input_range(self, name: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the static input scale of the weight ``name`` (all experts) from a calibrated range."""
        scale, zero = numerics.input_qparams(lo, hi, self.input_args)
        self._buffers[f"{name}_input_scale"].copy_(scale.reshape(()))
        if zero is not None:
            self._buffers[f"{name}_input_zero"].copy_(zero.reshape(()))

    def quantize_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the weight ``name``'s quantized input reads it (unchanged without activations)."""
        if self.input_args is None:
            return x
        b = self._buffers
        return numerics.quantize_input(x, self.input_args, b.get(f"{name}_input_scale"),
                                       b.get(f"{name}_input_zero")).to(x.dtype)

    def forward(self, *args, **kwargs):
        # Weights only: the model's own forward (and every implementation transformers dispatches
        # to) on the dequantized weights. With quantized inputs, the experts' computation as
        # transformers defines it for every fused family, each weight reading its input quantized.
        if self.input_args is None:
            return super().forward(*args, **kwargs)
        return self._forward_quantized_inputs(*args, **kwargs)

    def _forward_quantized_inputs(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
        first, second = expert_weight_names(self)
        w1, w2 = expert_matrix(self, first), expert_matrix(self, second)
        biased = getattr(self, "has_bias", False)
        b1 = getattr(self, f"{first}_bias", None) if biased else None
        b2 = getattr(self, f"{second}_bias", None) if biased else None
        x = self.quantize_input(first, hidden_states)
        tokens, k = top_k_index.shape[0], top_k_index.reshape(top_k_index.shape[0], -1).shape[1]
        index, weights = top_k_index.reshape(tokens, k), top_k_weights.reshape(tokens, k)
        out = torch.zeros_like(hidden_states)
        experts = w1.shape[0]
        order = index.flatten().argsort(stable=True)
        counts = torch.bincount(index.flatten().clamp(0, experts), minlength=experts + 1)[:experts].tolist()
        start = 0
        for e, n in enumerate(counts):  # as transformers' eager experts: one matmul pair per routed expert
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            rows, slot = pairs // k, pairs % k
            h = nn.functional.linear(x[rows], w1[e], None if b1 is None else b1[e])
            a = self.quantize_input(second, expert_gate(self, h))
            y = nn.functional.linear(a, w2[e], None if b2 is None else b2[e])
            out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
        return out

    def dequantized(self, name: str) -> torch.Tensor:
        """Float32 ``[E, out, in]`` of the weight ``name``, from its codes and scales."""
        b = self._buffers
        return dequantize_experts(b[f"{name}_codes"], b[f"{name}_scale"], b.get(f"{name}_zero"), self.weight_args,
                                  b.get(f"{name}_global_scale"))

    def refresh(self) -> None:
        """Recompute every dequantized weight from codes and scales (after loading them), a chunk
        of experts at a time."""
        b = self._buffers
        for name in self.expert_layouts:
            codes = b[f"{name}_codes"]
            served = torch.empty(b[name].shape, dtype=b[name].dtype, device=codes.device)
            step = _experts_per_chunk(codes)
            for i in range(0, codes.shape[0], step):
                part = slice(i, i + step)
                zero, glob = b.get(f"{name}_zero"), b.get(f"{name}_global_scale")
                w = dequantize_experts(codes[part], b[f"{name}_scale"][part], None if zero is None else zero[part],
                                       self.weight_args, None if glob is None else glob[part])
                served[part] = self.matrix(name, w).to(served.dtype)
            b[name] = served

    def _apply(self, fn, recurse=True):
        # As QuantLinear: codes and scales keep their dtypes and bits through casts; the derived
        # weights are dequantized again in the new dtype rather than cast.
        exact = {f"{n}{s}" for n in self.expert_layouts for s in _SUFFIXES}
        kept = {n: b for n, b in self._buffers.items() if n in exact and b is not None}
        before = {n: self._buffers[n].dtype for n in self.expert_layouts}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if any(self._buffers[n].dtype != d for n, d in before.items()):
            self.refresh()
        return self

    def extra_repr(self) -> str:
        base = super().extra_repr()
        text = f"experts={num_experts(self)}, weights={self.weight_args.to_dict()}, layouts={self.expert_layouts}"
        return f"{base}, {text}" if base else text


def experts_error(originals: dict[str, torch.Tensor], module: QuantExperts) -> float:
    """Relative squared error of all the experts' dequantized weights, ``sum ||W - Q(W)||^2 /
    sum ||W||^2`` over every quantized weight (``originals`` by name, in the module's layout)."""
    num = den = 0.0
    for name, w in originals.items():
        w = w.detach().float()
        num += float((w - module._buffers[name].float()).pow(2).sum())
        den += float(w.pow(2).sum())
    return num / max(den, 1e-30)


def quantized_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """Every :class:`QuantExperts` of ``model`` by full name.

    Example::

        >>> quantized_experts(torch.nn.Linear(2, 2))
        {}
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}


def fused_experts(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Every fused-experts module under ``module`` (float or quantized), by full name."""
    join: Callable[[str], str] = (lambda n: f"{prefix}.{n}" if prefix and n else (n or prefix))
    return [(join(n), m) for n, m in module.named_modules() if is_fused_experts(m)]


# -- calibration tokens per expert ------------------------------------------------------------


class ExpertTokens:
    """Counts the tokens the model's own routing sends to each expert of every fused-experts
    module under ``module``, while the block is entered: a forward pre-hook per experts module
    reads the ``top_k_index [tokens, k]`` its MoE block passes (``experts(hidden, top_k_index,
    top_k_weights)``) and adds its ``bincount`` on the device. :meth:`counts` reads them all with
    one host sync. A module called without an integer index tensor second is not counted.

    Example::

        >>> import transformers
        >>> config = transformers.Qwen3MoeConfig(hidden_size=8, moe_intermediate_size=4, num_experts=4)
        >>> experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
        >>> _ = torch.nn.init.normal_(experts.gate_up_proj); _ = torch.nn.init.normal_(experts.down_proj)
        >>> with ExpertTokens(experts, "mlp.experts") as tokens:
        ...     _ = experts(torch.randn(3, 8), torch.tensor([[0, 1], [1, 2], [1, 0]]), torch.ones(3, 2))
        >>> tokens.counts()
        {'mlp.experts': [2, 3, 1, 0]}
    """

    def __init__(self, module: nn.Module, prefix: str = ""):
        self._modules = fused_experts(module, prefix)
        self._counts: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    def __enter__(self) -> "ExpertTokens":
        self._hooks = [m.register_forward_pre_hook(self._hook(name, num_experts(m))) for name, m in self._modules]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook(self, name: str, experts: int):
        def hook(_module, args):
            index = args[1] if len(args) > 1 else None
            if not isinstance(index, torch.Tensor) or index.is_floating_point():
                return
            seen = torch.bincount(index.flatten().long(), minlength=experts)
            self._counts[name] = self._counts[name] + seen if name in self._counts else seen
        return hook

    def combine(self, ranks) -> None:
        """Sum the counts over every rank's batches (:mod:`qframe.distributed`)."""
        names = sorted(self._counts)
        self._counts = dict(zip(names, ranks.all_reduce([self._counts[n] for n in names], "sum"))) if names else {}

    def counts(self) -> dict[str, list[int]]:
        """Tokens per expert, by module name, for the modules that were called."""
        if not self._counts:
            return {}
        names = list(self._counts)
        flat = torch.cat([self._counts[n].cpu() for n in names]).tolist()
        out, at = {}, 0
        for name in names:
            size = self._counts[name].numel()
            out[name], at = flat[at:at + size], at + size
        return out


def unrouted_warning(counts: dict[str, list[int]], limit: int = 3) -> str | None:
    """The warning for experts that saw no calibration token, from tokens per expert by module
    name; ``None`` where every expert saw some. At most ``limit`` modules are named.

    Example::

        >>> message = unrouted_warning({"model.layers.3.mlp.experts": [4, 0, 2, 0], "model.layers.4.mlp.experts": [1, 2]})
        >>> message.split(":", 2)[:2]
        ['model.layers.3.mlp.experts', ' experts 1, 3 (of 4) saw no calibration token']
        >>> unrouted_warning({"a": [1, 2]}) is None
        True
    """
    empty = [(name, [e for e, n in enumerate(c) if n == 0], len(c)) for name, c in counts.items()]
    empty = [(name, idle, total) for name, idle, total in empty if idle]
    if not empty:
        return None
    parts = []
    for name, idle, total in empty[:limit]:
        shown = ", ".join(map(str, idle[:8])) + (f" and {len(idle) - 8} more" if len(idle) > 8 else "")
        parts.append(f"{name}: expert{'s' if len(idle) > 1 else ''} {shown} (of {total})")
    more = f"; and {len(empty) - limit} more experts modules" if len(empty) > limit else ""
    return ("; ".join(parts) + more + " saw no calibration token: nothing calibrated on activations covers them, "
            "and weight-only stages quantized them from their ranges alone. Calibrate on more tokens to reach them.")
