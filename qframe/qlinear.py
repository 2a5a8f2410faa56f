"""``QuantLinear``: the canonical state of one quantized linear, and a module that
computes with it (fake quantization: dequantized weights, quantize-dequantized inputs).

Buffers (what the native checkpoint stores): ``weight_codes`` (int8, or uint8 when
asymmetric), ``weight_scale`` and ``weight_zero`` ``[out, groups]``, ``input_scale`` and
``input_zero`` (static activations).

Example::

    >>> import torch
    >>> from qframe.scheme import QuantArgs
    >>> layer = QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantArgs(bits=4))
    >>> layer.weight_codes.dtype, tuple(layer.weight_scale.shape)
    (torch.int8, (4, 1))
"""

from __future__ import annotations

import torch
from torch import nn

from . import numerics
from .scheme import QuantArgs


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weights: QuantArgs | None,
        activations: QuantArgs | None = None,
        dtype: torch.dtype = torch.float32,
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
            code_dtype = torch.int8 if weights.symmetric else torch.uint8
            self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=code_dtype))
            self.register_buffer("weight_scale", torch.ones(rows, groups))
            if not weights.symmetric:
                self.register_buffer("weight_zero", torch.zeros(rows, groups))
            # The dequantized weight the forward uses; derived, so never saved.
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype), persistent=False)
        if activations is not None and not activations.dynamic:
            self.register_buffer("input_scale", torch.ones(()))
            if not activations.symmetric:
                self.register_buffer("input_zero", torch.zeros(()))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weights: QuantArgs | None,
        activations: QuantArgs | None = None,
        *,
        weight_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear``'s weight (ranges default to min/max) and attach input scales."""
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weights, activations, w.dtype)
        module.to(w.device)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        if weights is None:
            module.weight.data.copy_(w)
        else:
            q = numerics.quantize_weight(w, weights, weight_ranges)
            module.weight_codes.copy_(q.codes)
            module.weight_scale.copy_(q.scale)
            if q.zero is not None:
                module.weight_zero.copy_(q.zero)
            module.refresh()
        if input_range is not None:
            scale, zero = numerics.qparams(*input_range, activations)
            module.input_scale.copy_(scale.reshape(()))
            if zero is not None:
                module.input_zero.copy_(zero.reshape(()))
        return module

    def refresh(self) -> None:
        """Recompute the dequantized weight from codes and scales (after loading them)."""
        if self.weight_args is not None:
            zero = getattr(self, "weight_zero", None)
            w = numerics.dequantize_weight(self.weight_codes, self.weight_scale, zero, self.weight_args)
            self.weight = w.to(self.weight.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        args = self.input_args
        if args is None:
            return x
        if args.dynamic:
            return numerics.quantize_per_token(x, args)
        return numerics.fake_quantize(x, self.input_scale, getattr(self, "input_zero", None), args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_args.to_dict() if self.weight_args else None
        a = self.input_args.to_dict() if self.input_args else None
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={w}, activations={a}"
