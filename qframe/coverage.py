"""How much of the decoder layers a run quantized, and what it left in float.

After quantization, every weight of a decoder layer with two or more dimensions — linears,
fused 3-D expert tensors (``mlp.experts.gate_up_proj [E, 2I, H]``), routers — is either
quantized or left in float for one of three reasons, and :func:`measure` says which:

* **ignored**: a stage's ``ignore`` names it (its module's full name, or for a weight that is
  not called ``weight``, the weight's own full name such as ``model.layers.0.mlp.experts.down_proj``);
* **router**: an MoE router or gate, left in float by default. The rule: in a layer that holds
  experts (a submodule named ``experts``, or a weight of three or more dimensions), a float
  2-D weight of a module whose own name is ``gate``, ``router`` or ``shared_expert_gate``, or
  whose output width (first dimension) equals the model's number of experts
  (``num_experts``, ``num_local_experts`` or ``n_routed_experts`` in its config);
* **not quantized**: everything else — taken by no stage, named by no ignore. ``qframe.quantize``
  warns about these.

A weight counts as quantized when its module holds ``NAME_codes`` beside it (a
:class:`~qframe.qlinear.QuantLinear`'s ``weight_codes``; a quantized-experts module's
``gate_up_proj_codes``), counted at the size of its dequantized ``NAME`` tensor where the module
keeps one, else at the size of the codes. A module may say instead, with a method
``quantized_weights() -> dict[str, int | tuple[int, ...]]`` (weight name to element count or shape). A ``QuantLinear``
that quantizes only activations keeps a float weight: it is counted, not quantized, and listed
as ``activations_only`` (a stage took it: not warned about). 1-D weights (norms, biases) and the
2-D biases of fused experts (gpt-oss's ``gate_up_proj_bias [E, 2I]``, one row an expert) are
not counted.

Names are grouped by their path inside the layer: ``mlp.experts.gate_up_proj`` in 24 layers is
one entry, ``mlp.experts.gate_up_proj (layers 0-23)``.

Example::

    >>> from qframe.testing import make_registry, tiny_llama_model
    >>> from qframe.model import find_architecture
    >>> model = tiny_llama_model()
    >>> found = measure(model, find_architecture(model, make_registry()), ignore=["*down_proj"])
    >>> found.quantized_share, [g.label for g in found.ignored]
    (0.0, ['mlp.down_proj (layers 0-1)'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, Iterable

import torch
from torch import nn

from .experts import is_fused_experts
from .scheme import _pattern_matches

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class WeightGroup:
    """One weight path inside the decoder layers (``mlp.experts.down_proj``), the layers that
    hold it in the state its group says, and their element count together."""

    name: str
    layers: list[int] = field(default_factory=list)
    params: int = 0

    @property
    def label(self) -> str:
        """``name (layers 0-23)``, ``name (layer 3)``, ``name (layers 0, 2-5)``.

        Example::

            >>> WeightGroup("mlp.up_proj", [0, 2, 3, 4]).label
            'mlp.up_proj (layers 0, 2-4)'
        """
        return f"{self.name} ({'layer' if len(self.layers) == 1 else 'layers'} {spans(self.layers)})"


def spans(numbers: Iterable[int]) -> str:
    """Sorted integers as ranges: ``0-3, 5, 7-8``.

    Example::

        >>> spans([0, 1, 2, 3, 5, 7, 8])
        '0-3, 5, 7-8'
    """
    ordered = sorted(set(numbers))
    parts: list[str] = []
    start = prev = None
    for n in [*ordered, None]:
        if start is not None and (n is None or n != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(parts)


@dataclass
class Coverage:
    """What :func:`measure` found: element counts, and the float weights by reason."""

    quantized_params: int = 0
    decoder_params: int = 0
    not_quantized: list[WeightGroup] = field(default_factory=list)
    ignored: list[WeightGroup] = field(default_factory=list)
    routers: list[WeightGroup] = field(default_factory=list)
    activations_only: list[WeightGroup] = field(default_factory=list)

    @property
    def quantized_share(self) -> float:
        """Quantized elements over all counted ones (1.0 for a layerless model)."""
        return round(self.quantized_params / self.decoder_params, 4) if self.decoder_params else 1.0

    def percent(self) -> str:
        """The share as a whole percentage that never rounds to 100 or 0 while it is not.

        Example::

            >>> Coverage(999, 1000).percent(), Coverage(1, 1000).percent(), Coverage(5, 10).percent()
            ('99 %', '<1 %', '50 %')
        """
        if self.decoder_params == 0 or self.quantized_params == self.decoder_params:
            return "100 %"
        if self.quantized_params == 0:
            return "0 %"
        value = round(100 * self.quantized_params / self.decoder_params)
        return "<1 %" if value == 0 else f"{min(value, 99)} %"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``coverage`` entry.

        Example::

            >>> Coverage(9, 100, [WeightGroup("mlp.experts.down_proj", [0, 1], 91)]).to_dict()["not_quantized"]
            ['mlp.experts.down_proj (layers 0-1)']
        """
        return {
            "quantized_share": self.quantized_share,
            "quantized_params": self.quantized_params,
            "decoder_params": self.decoder_params,
            "not_quantized": [g.label for g in self.not_quantized],
            "ignored": [g.label for g in self.ignored],
            "routers": [g.label for g in self.routers],
            "activations_only": [g.label for g in self.activations_only],
        }

    def warning(self) -> str | None:
        """The one-paragraph warning about weights no stage took and no ignore named, or ``None``.

        Example::

            >>> Coverage(9, 100, [WeightGroup("mlp.experts.down_proj", [0, 1], 91)]).warning()[:60]
            '91 % of the decoder weights stay in float, taken by no stage'
        """
        if not self.not_quantized:
            return None
        left = sum(g.params for g in self.not_quantized)
        share = Coverage(left, self.decoder_params).percent()
        routers = (f" (the router{'s' if len(self.routers) > 1 else ''} "
                   f"{', '.join(g.name for g in self.routers)} stay{'' if len(self.routers) > 1 else 's'} "
                   "in float by default)") if self.routers else ""
        return (f"{share} of the decoder weights stay in float, taken by no stage and named by no ignore: "
                f"{', '.join(g.label for g in self.not_quantized)}{routers}. Give a stage targets that reach them, "
                "or name them in a stage's ignore to keep them in float on purpose.")


def _expert_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        for key in EXPERT_COUNT_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and value > 1:
                return value
    return None


def _quantized_sizes(module: nn.Module) -> dict[str, int]:
    """Weight name -> element count of the quantized weights ``module`` holds itself."""
    declared = getattr(module, "quantized_weights", None)
    if callable(declared):
        return {str(k): int(math.prod(v)) if isinstance(v, (tuple, list, torch.Size)) else int(v)
                for k, v in declared().items()}
    tensors = {**dict(module.named_buffers(recurse=False)), **dict(module.named_parameters(recurse=False))}
    sizes = {}
    for key, codes in tensors.items():
        if key.endswith("_codes") and codes is not None:
            name = key[: -len("_codes")]
            dense = tensors.get(name)
            sizes[name] = dense.numel() if dense is not None else codes.numel()
    return sizes


def measure(model: nn.Module, arch: Any, ignore: Iterable[str] = ()) -> Coverage:
    """Which 2-D-or-more weights of ``arch.decoder_layers(model)`` are quantized, and why each
    of the others is in float (see the module's docstring for the rules). ``ignore`` holds the
    ignore patterns of the recipe's stages, matched as stages match them, on full names.
    One pass over each layer's modules and their own tensors.

    Example::

        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> from qframe.model import find_architecture
        >>> model = tiny_llama_model()
        >>> found = measure(model, find_architecture(model, make_registry()))
        >>> found.decoder_params > 0, found.quantized_share, found.not_quantized[0].label
        (True, 0.0, 'self_attn.q_proj (layers 0-1)')
    """
    from .qlinear import QuantLinear

    ignore = tuple(ignore)
    experts = _expert_count(model)
    found = Coverage()
    groups: dict[tuple[str, str], WeightGroup] = {}

    def add(kind: str, name: str, index: int, size: int) -> None:
        group = groups.setdefault((kind, name), WeightGroup(name))
        if index not in group.layers:
            group.layers.append(index)
        group.params += size

    for index, layer in enumerate(arch.decoder_layers(model)):
        prefix = f"{arch.layers_path}.{index}"
        modules = list(layer.named_modules())
        moe = any(n.rpartition(".")[2] == "experts" for n, _ in modules) or any(
            p.dim() >= 3 for p in layer.parameters())
        for relative, module in modules:
            quantized = _quantized_sizes(module)
            for key, size in quantized.items():
                found.quantized_params += size
                found.decoder_params += size
            biases = 3 if is_fused_experts(module) else 2  # an expert's bias is a row of a 2-D tensor
            for key, weight in module.named_parameters(recurse=False):
                if weight.dim() < biases or key in quantized:
                    continue
                size = weight.numel()
                found.decoder_params += size
                path = relative if key == "weight" else f"{relative}.{key}" if relative else key
                full = f"{prefix}.{relative}" if relative else prefix
                own = relative.rpartition(".")[2]
                if isinstance(module, QuantLinear):
                    kind = "activations_only"
                elif any(_pattern_matches(p, full, module) or _pattern_matches(p, f"{prefix}.{path}", module)
                         for p in ignore):
                    kind = "ignored"
                elif moe and weight.dim() == 2 and (own in ROUTER_NAMES or (experts and weight.shape[0] == experts)):
                    kind = "routers"
                else:
                    kind = "not_quantized"
                add(kind, path, index, size)
    for (kind, _name), group in groups.items():
        getattr(found, kind).append(group)
    return found
