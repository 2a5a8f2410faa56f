"""``QuantizedModel``: a model whose target linears are :class:`QuantLinear` modules, with the
recipe, source and per-layer report that produced it.

Example::

    >>> qmodel = qframe.quantize(model, "recipes/rtn_w4a16.toml")   # doctest: +SKIP
    >>> sorted(qmodel.quantized_modules())[:1]                        # doctest: +SKIP
    ['model.layers.0.mlp.down_proj']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .qlinear import QuantLinear


@dataclass
class QuantizedModel:
    model: nn.Module
    tokenizer: Any = None
    manifest: dict[str, Any] = field(default_factory=dict)
    # The native checkpoint it was loaded from, if any: an export never replaces its own source.
    directory: Path | None = None

    def fake_quantized(self) -> nn.Module:
        """The model itself: it computes with dequantized weights and quantized inputs."""
        return self.model

    def quantized_modules(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLinear)}

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per-layer figures: output error, per-module weight error, seconds."""
        return self.manifest.get("layers", [])
