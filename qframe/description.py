"""What a quantized model holds, in one place, for every exporter and validator to read.

A :class:`ModelDescription` lists every linear of the model with what it holds (weight and
input formats, a kept input prescale), every fused mixture-of-experts module of the decoder
layers (:class:`ExpertsState`) and every decoder layer's KV cache (format, K and V scales).
It is computed once, either

- from a quantized model (:func:`describe_model`): the modules themselves, with their codes
  and scales, which is what a backend writes; or
- from a model and a resolved recipe *before* calibration (:func:`qframe.pipeline.check_plan`):
  each stage's quantizer says what it will produce (:meth:`qframe.pipeline.Quantizer.produces`),
  so a backend refuses what it could not write before any data is read — in ``qframe apply``,
  ``apply --dry-run`` and ``qframe validate RECIPE --model M`` alike.

Backends read only this: never a recipe's stages, quantizer names or option names.

Example::

    >>> from qframe.testing import tiny_llama_model
    >>> from qframe.plugins import build_registry
    >>> description = describe_model(tiny_llama_model(), build_registry(entry_points=False))
    >>> len(description.linears), description.quantized(), description.caches
    (15, {}, {})
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

from .scheme import QuantArgs


class _ModuleState:
    """What a linear's and an experts module's states share: whether anything of theirs is
    quantized, and how messages name them."""

    @property
    def quantized(self) -> bool:
        return self.weights is not None or self.activations is not None

    @property
    def where(self) -> str:
        """How messages name it: the module, and before calibration the stage that makes it."""
        return f"{self.stage}: {self.name}" if self.stage else self.name


@dataclass(frozen=True)
class LinearState(_ModuleState):
    """One linear as an exporter sees it: its shape, what its weights and inputs are quantized
    to (``None``: left in float), and whether it keeps an input ``prescale`` (a smoothing scale
    not folded into the layer before; ``None`` before calibration, when it is not known yet).
    ``stage`` names the recipe stage that produces it (before calibration, for messages) and
    ``module`` is the module itself (after calibration).

    Example::

        >>> LinearState("model.layers.0.mlp.up_proj", 64, 128, False, QuantArgs(bits=4)).where
        'model.layers.0.mlp.up_proj'
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None
    prescale: bool | None = False
    stage: str | None = None
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, name: str, module: nn.Module, weights: QuantArgs | None = None, activations: QuantArgs | None = None,
           prescale: bool | None = False, stage: str | None = None) -> "LinearState":
        """The state of ``module`` (a linear, float or quantized) under ``name``."""
        return cls(name, int(module.in_features), int(module.out_features), getattr(module, "bias", None) is not None,
                   weights, activations, prescale, stage, module)


@dataclass(frozen=True)
class ExpertsState(_ModuleState):
    """One fused mixture-of-experts module (:mod:`qframe.experts`) as an exporter sees it: its
    ``num_experts``, each 3-D weight's per-expert matrix as ``(name, out, in)`` and its
    ``layout`` (``"out_in"`` or ``"in_out"``), what the weights and inputs are quantized to
    (``None``: left in float), the ``stage`` that makes it (before calibration) and, after
    calibration, the ``module`` itself.

    Example::

        >>> state = ExpertsState("model.layers.0.mlp.experts", 8, (("gate_up_proj", 64, 32, "out_in"),), QuantArgs(bits=4))
        >>> state.quantized, state.where
        (True, 'model.layers.0.mlp.experts')
    """

    name: str
    num_experts: int
    matrices: tuple[tuple[str, int, int, str], ...]
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None
    stage: str | None = None
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, name: str, module: nn.Module, weights: QuantArgs | None = None, activations: QuantArgs | None = None,
           stage: str | None = None) -> "ExpertsState":
        """The state of the fused-experts ``module`` (float or quantized) under ``name``; a float
        one's weights as a stage will quantize them when ``weights`` is given."""
        from .experts import IN_OUT, QuantExperts, expert_layouts, num_experts

        if isinstance(module, QuantExperts):
            matrices = tuple((n, out, inp, module.expert_layouts[n]) for n, (_, out, inp) in module.expert_weights_of().items())
        else:
            matrices = tuple((n, *((b, a) if layout == IN_OUT else (a, b)), layout)
                             for n, layout in expert_layouts(module).items()
                             for _, a, b in [module._parameters[n].shape])
        return cls(name, num_experts(module), matrices, weights, activations, stage, module)


@dataclass(frozen=True)
class CacheState:
    """The KV cache of one decoder layer: ``layer`` (its index), the ``attention`` module's
    full name, the cache format ``args`` (one static scale per tensor), whether K and V share
    one scale (``shared``), the ``stage`` that produces it and, after calibration, the
    ``module`` holding ``k_scale`` and ``v_scale``.

    Example::

        >>> cache = CacheState(0, "model.layers.0.self_attn", QuantArgs(type="float", bits=8, granularity="tensor"))
        >>> cache.args.name, cache.scales()
        ('e4m3', None)
    """

    layer: int
    attention: str
    args: QuantArgs
    shared: bool = False
    stage: str | None = None
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(k_scale, v_scale)`` as float32 scalars on the CPU, once calibrated."""
        if self.module is None:
            return None
        return tuple(getattr(self.module, n).detach().float().reshape(()).cpu() for n in ("k_scale", "v_scale"))

    @property
    def where(self) -> str:
        return f"{self.stage}: {self.attention}" if self.stage else self.attention


@dataclass
class ModelDescription:
    """Every linear of ``model`` by full name (decoder layers first, in module order, then the
    rest), every layer's KV cache by layer index, and the architecture adapter that knows its
    layers. ``calibrated`` says whether the modules hold codes and scales (else this is a
    plan); ``shapes_known`` is false for a stand-in model (``qframe validate RECIPE`` without
    a model), whose widths say nothing about the user's.
    """

    model: nn.Module
    arch: Any  # qframe.model.Architecture
    linears: dict[str, LinearState]
    caches: dict[int, CacheState] = field(default_factory=dict)
    calibrated: bool = True
    shapes_known: bool = True
    # Fused mixture-of-experts modules of the decoder layers by full name, float or quantized.
    experts: dict[str, ExpertsState] = field(default_factory=dict)

    def quantized(self) -> dict[str, LinearState]:
        """The linears that hold quantized weights or inputs."""
        return {n: s for n, s in self.linears.items() if s.quantized}

    def unquantized(self) -> list[str]:
        """The linears left in float, in model order."""
        return [n for n, s in self.linears.items() if not s.quantized]

    def embeddings(self) -> list[str]:
        """The embedding modules, always left in float."""
        return [n for n, m in self.model.named_modules() if isinstance(m, nn.Embedding)]

    @property
    def num_layers(self) -> int:
        return len(self.arch.decoder_layers(self.model))

    def layer_prefixes(self) -> list[str]:
        """Each decoder layer's full name (``model.layers.3``)."""
        return [f"{self.arch.layers_path}.{i}" for i in range(self.num_layers)]

    def shared_inputs(self) -> Iterator[list[str]]:
        """Groups of quantized linears of one layer that read one input (q/k/v, gate/up): the
        adapter's smoothing groups. Serving engines fuse them, and some scales must agree."""
        quantized = self.quantized()
        for prefix in self.layer_prefixes():
            for group in self.arch.smoothing_groups:
                names = [f"{prefix}.{c}" for c in group.consumers if f"{prefix}.{c}" in quantized]
                if names:
                    yield names

    def fed_by_linears(self) -> set[str]:
        """Quantized linears whose input is another linear's output (o_proj after v_proj,
        down_proj after up_proj): where a smoothing scale lives on in a ``pre_quant_scale``."""
        out, quantized = set(), self.quantized()
        for prefix in self.layer_prefixes():
            for group in self.arch.smoothing_groups:
                if f"{prefix}.{group.producer}" in self.linears:
                    out.update(f"{prefix}.{c}" for c in group.consumers if f"{prefix}.{c}" in quantized)
        return out

    def dtype(self) -> torch.dtype:
        """The dtype of the model's float weights."""
        return next(self.model.parameters()).dtype

    def serving_dtype(self, requested: str = "auto") -> torch.dtype:
        """The dtype a checkpoint's float tensors are written in: ``requested``, or for
        ``"auto"`` the model's own when it is 16-bit (quantized scales were made exact in it),
        else float16 (the kernels that serve quantized linears compute in 16 bits).

        Example::

            >>> from qframe.testing import tiny_llama_model
            >>> from qframe.plugins import build_registry
            >>> describe_model(tiny_llama_model(), build_registry(entry_points=False)).serving_dtype()
            torch.float16
        """
        if requested != "auto":
            return getattr(torch, requested)
        dtype = self.dtype()
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def is_linear(module: nn.Module) -> bool:
    """A float linear, or one qframe quantized."""
    from .qlinear import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


def linear_state(name: str, module: nn.Module) -> LinearState:
    """What a (quantized) linear holds now."""
    from .qlinear import QuantLinear

    if isinstance(module, QuantLinear):
        return LinearState.of(name, module, module.weight_args, module.input_args, module.has_prescale)
    return LinearState.of(name, module)


def describe_model(model: nn.Module, registry: Any) -> ModelDescription:
    """The description of a (quantized) model as it is now: each linear's formats and each
    attention's KV cache, read off the modules. The architecture adapter comes from
    ``registry``, and prepares the model as the pipeline does (exactly; a no-op once done).

    Example::

        >>> import qframe
        >>> from qframe.testing import tiny_llama_model
        >>> from qframe.plugins import build_registry
        >>> registry = build_registry(entry_points=False)
        >>> recipe = qframe.recipe.parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 32}}]})
        >>> qmodel = qframe.quantize(tiny_llama_model(), recipe, device="cpu", registry=registry)
        >>> description = describe_model(qmodel.model, registry)
        >>> state = description.linears["model.layers.0.mlp.up_proj"]
        >>> state.weights.name, state.weights.group_size, "lm_head" in description.unquantized()
        ('int4', 32, True)
    """
    from .model import find_architecture

    arch = find_architecture(model, registry)
    arch.prepare(model)  # as the pipeline did (exact, idempotent): e.g. GPT-2's Conv1D become nn.Linear
    linears = {n: linear_state(n, m) for n, m in model.named_modules() if n and is_linear(m)}
    return ModelDescription(model, arch, _layers_first(linears, arch), _caches(model, arch),
                            experts=_experts(model, arch, {}))


def experts_state(name: str, module: nn.Module) -> ExpertsState:
    """What a (quantized) fused-experts module holds now."""
    from .experts import QuantExperts

    if isinstance(module, QuantExperts):
        return ExpertsState.of(name, module, module.weight_args, module.input_args)
    return ExpertsState.of(name, module)


def _experts(model: nn.Module, arch: Any, produced: dict[str, Any]) -> dict[str, ExpertsState]:
    """The decoder layers' fused-experts modules: as a stage will produce them, else as they are."""
    from .experts import fused_experts

    found = fused_experts(arch.decoder_layers(model), arch.layers_path)
    return {n: produced[n] if isinstance(produced.get(n), ExpertsState) else experts_state(n, m) for n, m in found}


def _layers_first(linears: dict[str, LinearState], arch: Any) -> dict[str, LinearState]:
    inside = {n: s for n, s in linears.items() if n.startswith(arch.layers_path + ".")}
    return {**inside, **{n: s for n, s in linears.items() if n not in inside}}


def _caches(model: nn.Module, arch: Any) -> dict[int, CacheState]:
    from .kvcache import cache_quantizers

    caches = {}
    prefix = arch.layers_path + "."
    for attention, module in cache_quantizers(model).items():
        layer = int(attention[len(prefix):].split(".", 1)[0]) if attention.startswith(prefix) else -1
        caches[layer] = CacheState(layer, attention, module.args, bool(module.shared), module=module)
    return caches


def planned(model: nn.Module, arch: Any, produced: dict[str, LinearState], caches: dict[int, CacheState], *,
            shapes_known: bool = True) -> ModelDescription:
    """The description of what the pipeline will make of ``model``: the linears stages will
    produce (``produced``, by name) and the rest left as they are (:func:`qframe.pipeline.check_plan`
    computes it before any calibration)."""
    linears = {}
    for name, module in model.named_modules():
        if name and is_linear(module):
            state = produced.get(name)
            linears[name] = state if isinstance(state, LinearState) else linear_state(name, module)
    return ModelDescription(model, arch, _layers_first(linears, arch), dict(caches), calibrated=False,
                            shapes_known=shapes_known, experts=_experts(model, arch, produced))


def staged(item: LinearState | ExpertsState | CacheState, stage: str) -> LinearState | ExpertsState | CacheState:
    """``item`` naming the stage that produces it."""
    return replace(item, stage=stage)
