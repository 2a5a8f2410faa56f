"""``QuantLinear``: the canonical state of one quantized linear, and a module that
computes with it (fake quantization: dequantized weights, quantize-dequantized inputs).

Buffers (what the native checkpoint stores), by weight format:

=============  ==========================  ==============================  =====================
format         ``weight_codes [out, in]``  ``weight_scale [rows, groups]``  more
=============  ==========================  ==============================  =====================
int, sym.      int8                        float32
int, asym.     uint8                       float32                         ``weight_zero``
e4m3 / e5m2    float8_e4m3fn / _e5m2       float32
nvfp4          uint8 E2M1 codes 0-15       float8_e4m3fn (blocks of 16)    ``weight_global_scale`` (float32, scalar)
mxfp4          uint8 E2M1 codes 0-15       uint8 E8M0 exponents (32)
=============  ==========================  ==============================  =====================

Inputs: static activations (int or FP8) keep one ``input_scale`` (and ``input_zero`` when
asymmetric); static NVFP4 keeps its FP32 global scale as ``input_scale`` (block scales come
from the input at run time, as in TensorRT-LLM); dynamic ones are quantized per token, per block (FP4) or per tensor at run time
and keep nothing. A smoothing scale that could not be folded away is kept as
``input_prescale`` (float32 ``[in]``), multiplied into every input before it is quantized.
A quantized KV cache lives on the attention module, not here (:mod:`qframe.kvcache`). The
dequantized ``weight`` is derived and never saved.

Example::

    >>> import torch
    >>> from qframe.scheme import QuantArgs
    >>> layer = QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantArgs(bits=4))
    >>> layer.weight_codes.dtype, tuple(layer.weight_scale.shape)
    (torch.int8, (4, 1))
    >>> fp4 = QuantArgs(type="float", bits=4, granularity="group", group_size=16)
    >>> layer = QuantLinear.from_linear(torch.nn.Linear(32, 4), fp4)
    >>> layer.weight_scale.dtype, tuple(layer.weight_scale.shape), layer.weight_global_scale.shape
    (torch.float8_e4m3fn, (4, 2), torch.Size([]))
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from . import numerics
from .scheme import QuantArgs

# Quantized state keeps its dtype through ``module.to(dtype)``/``.half()``: codes and scales
# are exact in their own dtypes and would be corrupted by a cast; only the derived ``weight``
# (and the bias) follow the model's dtype.
_EXACT_BUFFERS = frozenset({
    "weight_codes", "weight_scale", "weight_zero", "weight_global_scale",
    "input_scale", "input_zero", "input_prescale",
})


class QuantLinear(nn.Module):
    stands_for = ("Linear",)  # recipe targets that name Linear reach quantized linears too

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weights: QuantArgs | None,
        activations: QuantArgs | None = None,
        dtype: torch.dtype = torch.float32,
        prescale: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_args, self.input_args = weights, activations
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        if weights is None:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)
        else:
            groups = numerics.n_groups(in_features, weights) if weights.granularity != "tensor" else 1
            rows = 1 if weights.granularity == "tensor" else out_features
            fmt = weights.number_format
            self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=fmt.code_dtype))
            self.register_buffer("weight_scale", torch.ones(rows, groups).to(fmt.scale_dtype))
            if not weights.symmetric:
                self.register_buffer("weight_zero", torch.zeros(rows, groups))
            if fmt.has_global_scale:
                self.register_buffer("weight_global_scale", torch.ones(()))
            # The dequantized weight the forward uses; derived, so never saved.
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype), persistent=False)
        if activations is not None and not activations.dynamic:
            self.register_buffer("input_scale", torch.ones(()))
            if not activations.symmetric:
                self.register_buffer("input_zero", torch.zeros(()))
        if prescale:
            self.register_buffer("input_prescale", torch.ones(in_features))

    @property
    def has_prescale(self) -> bool:
        return "input_prescale" in self._buffers

    def set_input_prescale(self, scale: torch.Tensor) -> None:
        """Multiply every input by ``scale`` (per input channel) before it is quantized: a
        smoothing scale that could not be folded into the module before (TensorRT-LLM's
        ``prequant_scaling_factor``). The weight must already carry its inverse."""
        scale = scale.detach().float().reshape(self.in_features)
        anchor = next(itertools.chain(self.parameters(), self.buffers()), None)
        device = anchor.device if anchor is not None else scale.device
        self.register_buffer("input_prescale", scale.to(device).clone())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weights: QuantArgs | None,
        activations: QuantArgs | None = None,
        *,
        weight_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_range: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_global_scale: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear``'s weight (ranges default to min/max; NVFP4's global scale to
        the weight's, see :func:`qframe.numerics.quantize_weight`; group-wise int scales
        rounded to the linear's dtype when it is 16-bit) and attach input scales."""
        w = linear.weight.detach()
        with torch.device(w.device):  # built where the weight is: no host copy of an 8B layer's codes to move
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, weights, activations, w.dtype)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        if weights is None:
            module.weight.data.copy_(w)
        else:
            module.set_weight(w, weight_ranges, weight_global_scale)
        if input_range is not None:  # NVFP4 keeps its static global scale as input_scale
            scale, zero = numerics.input_qparams(*input_range, activations)
            module.input_scale.copy_(scale.reshape(()))
            if zero is not None:
                module.input_zero.copy_(zero.reshape(()))
        return module

    def set_weight(
        self,
        w: torch.Tensor,
        ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
        global_scale: torch.Tensor | None = None,
        *,
        served_dtype: torch.dtype | None = None,
    ) -> None:
        """Quantize the float weight ``w`` ``[out, in]`` into this module's codes and scales, with
        ``ranges`` per tensor, channel or group (default: min/max) and, for NVFP4, the FP32
        ``global_scale`` (default: the weight's); see :func:`qframe.numerics.quantize_weight`.
        Group-wise int scales are rounded to ``served_dtype`` (default: this module's dtype):
        they are fixed here, and no later cast changes them.
        Algorithms that give several linears one scale (q/k/v, fused by TensorRT-LLM) call it
        again with the joint range.

        Example::

            >>> from qframe.scheme import QuantArgs
            >>> layer = QuantLinear.from_linear(torch.nn.Linear(4, 2), QuantArgs(type="float", bits=8, granularity="tensor"))
            >>> layer.set_weight(torch.ones(2, 4), (torch.tensor([[-2.0]]), torch.tensor([[2.0]])))
            >>> round(layer.weight_scale.item() * 448, 5), layer.weight[0, 0].item()
            (2.0, 1.0)
        """
        served = self.weight.dtype if served_dtype is None else served_dtype
        q = numerics.quantize_weight(w, self.weight_args, ranges, global_scale, served_dtype=served)
        self.weight_codes.copy_(q.codes)
        self.weight_scale.copy_(q.scale)
        if q.zero is not None:
            self.weight_zero.copy_(q.zero)
        if q.global_scale is not None:
            self.weight_global_scale.copy_(q.global_scale.reshape(()))
        self.refresh()

    def serve_scales(self, dtype: torch.dtype) -> None:
        """Round group-wise int weight scales to ``dtype`` as a 16-bit kernel reads them
        (:func:`qframe.numerics.served_scale`), keeping the codes: for an algorithm whose own
        rounding fixed the codes in float32 for a model in ``dtype`` (GPTQ). A no-op for
        other formats and dtypes. Casts never do this (a cast changes no quantized value).

        Example::

            >>> from qframe.scheme import QuantArgs
            >>> layer = QuantLinear.from_linear(torch.nn.Linear(2, 1), QuantArgs(bits=4, granularity="group", group_size=2))
            >>> _ = layer.weight_scale.fill_(0.1)
            >>> layer.serve_scales(torch.bfloat16)
            >>> layer.weight_scale.item(), layer.weight.dtype
            (0.10009765625, torch.float32)
        """
        if self.weight_args is None:
            return
        served = numerics.served_scale(self.weight_scale, self.weight_args, dtype)
        if served is not self.weight_scale and not torch.equal(served, self.weight_scale):
            self.weight_scale.copy_(served)
            self.refresh()

    def refresh(self) -> None:
        """Recompute the dequantized weight from codes and scales (after loading them)."""
        if self.weight_args is not None:
            w = numerics.dequantize_weight(
                self.weight_codes, self.weight_scale, getattr(self, "weight_zero", None), self.weight_args,
                global_scale=getattr(self, "weight_global_scale", None),
            )
            self.weight = w.to(self.weight.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        args = self.input_args
        if args is None:
            return x
        return numerics.quantize_input(x, args, getattr(self, "input_scale", None), getattr(self, "input_zero", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_prescale:
            x = x * self.input_prescale.to(x.dtype)
        return nn.functional.linear(self.quantize_input(x), self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # A cast never changes quantized values: codes and scales keep their dtypes and bits
        # (group scales were rounded for the serving dtype when the weight was quantized, see
        # set_weight), and the derived weight is dequantized again in the new dtype rather
        # than cast (a cast from 16 bits to float32 would keep the 16-bit rounding).
        kept = {name: b for name, b in self._buffers.items() if name in _EXACT_BUFFERS and b is not None}
        before = self._buffers.get("weight")
        before_dtype = before.dtype if before is not None else None
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if self.weight_args is not None and self.weight.dtype != before_dtype:
            self.refresh()
        return self

    def extra_repr(self) -> str:
        w = self.weight_args.to_dict() if self.weight_args else None
        a = self.input_args.to_dict() if self.input_args else None
        text = f"in_features={self.in_features}, out_features={self.out_features}, weights={w}, activations={a}"
        return text
