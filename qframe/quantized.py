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
from typing import TYPE_CHECKING, Any

from torch import nn

from .qlinear import QuantLinear

if TYPE_CHECKING:
    from .description import ModelDescription


@dataclass
class QuantizedModel:
    model: nn.Module
    tokenizer: Any = None
    manifest: dict[str, Any] = field(default_factory=dict)
    # The native checkpoint it was loaded from, if any: an export never replaces its own source.
    directory: Path | None = None
    # The plugins that made it (their architecture adapter knows its layers): exporters use these,
    # not the process-wide registry, so a registry given to the API holds at export and reload.
    registry: Any = None

    def describe(self) -> "ModelDescription":
        """What every linear and KV cache holds, for exporters (see :mod:`qframe.description`);
        computed from the modules as they are now.

        Example::

            >>> qmodel.describe().quantized()["model.layers.0.mlp.down_proj"].weights.name   # doctest: +SKIP
            'int4'
        """
        from .description import describe_model
        from .plugins import default_registry

        return describe_model(self.model, self.registry or default_registry())

    def fake_quantized(self) -> nn.Module:
        """The model itself: it computes with dequantized weights and quantized inputs."""
        return self.model

    def quantized_modules(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLinear)}

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per-layer figures: output error, per-module weight error, seconds."""
        return self.manifest.get("layers", [])
