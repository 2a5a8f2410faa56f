"""Layer-by-layer quantization.

For each decoder layer in order: move it to the device, let every stage quantize its
target linears (observing the layer's inputs where a stage needs them), run the quantized
layer to produce the next layer's inputs, and move it back. Only one decoder layer sits
on the accelerator at a time; inputs are captured once, at the first layer, and never
recomputed through earlier layers.

Example (what ``qframe.quantize`` does)::

    layers = run_pipeline(model, plan, registry, calibration=windows.ids, device=torch.device("cuda"))
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .calibrate import Calibrator, build_calibrator
from .errors import QFrameError
from .model import Architecture, find_architecture
from .qlinear import QuantLinear
from .recipe import Plan, StageSpec
from .scheme import QuantArgs


class Quantizer(ABC):
    """Base class for quantizer plugins (algorithms).

    A subclass implements :meth:`quantize_layer`; it is built once per stage with the
    stage's spec and options dataclass.

    Example::

        class HalfRTN(Quantizer):
            def quantize_layer(self, work, targets):
                for name, linear in targets:
                    work.replace(name, QuantLinear.from_linear(linear, self.scheme.weights))
    """

    def __init__(self, stage: StageSpec, options: Any, registry):
        self.stage, self.scheme, self.options, self.registry = stage, stage.scheme, options, registry

    @classmethod
    def needs_calibration(cls, stage: StageSpec) -> bool:
        """Whether this stage must see the layer's inputs (by default: to calibrate static activations)."""
        return stage.static_activations

    def accepts(self, module: nn.Module) -> bool:
        """Whether this stage may take ``module``: by default, linears no earlier stage quantized."""
        return isinstance(module, nn.Linear)

    def calibrator(self, args: QuantArgs) -> Calibrator:
        """A fresh calibrator for ``args``: its plugin, with the recipe's ``calibrator_options``."""
        return build_calibrator(self.registry.get("calibrator", args.calibrator), args)

    @abstractmethod
    def quantize_layer(self, work: "LayerWork", targets: list[tuple[str, nn.Linear]]) -> None:
        """Quantize ``targets`` (full name, module) of the layer ``work`` holds."""


@dataclass
class LayerInputs:
    """The inputs of the current decoder layer: hidden states and keyword arguments per batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@dataclass
class LayerWork:
    """One decoder layer being quantized, and what a quantizer may do with it."""

    index: int
    prefix: str  # full name of the layer, e.g. "model.layers.3"
    layer: nn.Module
    inputs: LayerInputs | None
    device: torch.device
    figures: dict[str, dict[str, float]] = field(default_factory=dict)

    arch: Architecture | None = None

    def named_linears(self) -> list[tuple[str, nn.Module]]:
        """Every linear of the layer, float or already quantized by an earlier stage, by full name."""
        return [(f"{self.prefix}.{n}", m) for n, m in self.layer.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]

    def run(self) -> list[torch.Tensor]:
        """Forward every calibration batch through the layer (as it is now)."""
        if self.inputs is None:
            raise QFrameError(f"{self.prefix}: no calibration inputs were captured")
        with torch.inference_mode():
            return [_first(self.layer(h, **kw)) for h, kw in zip(self.inputs.hidden, self.inputs.kwargs)]

    def observe_inputs(self, names: list[str], make: Callable[[str], Calibrator]) -> dict[str, Calibrator]:
        """Run the layer once, feeding each named submodule's input to its own calibrator."""
        return self._observe(names, make, outputs=False)

    def observe_outputs(self, names: list[str], make: Callable[[str], Calibrator]) -> dict[str, Calibrator]:
        """Run the layer once, feeding each named submodule's output to its own calibrator."""
        return self._observe(names, make, outputs=True)

    def _observe(self, names: list[str], make: Callable[[str], Calibrator], outputs: bool) -> dict[str, Calibrator]:
        calibrators = {name: make(name) for name in names}
        hooks = []
        for name in names:
            module, calibrator = self.layer.get_submodule(self._relative(name)), calibrators[name]
            if outputs:
                hooks.append(module.register_forward_hook(lambda _m, _a, out, c=calibrator: c.observe(_first(out))))
            else:
                hooks.append(module.register_forward_pre_hook(lambda _m, args, c=calibrator: c.observe(args[0])))
        try:
            self.run()
        finally:
            for hook in hooks:
                hook.remove()
        return calibrators

    def replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` where the submodule ``name`` (a full name) was."""
        parent_name, _, child = self._relative(name).rpartition(".")
        parent = self.layer.get_submodule(parent_name) if parent_name else self.layer
        setattr(parent, child, module)

    def record(self, name: str, **values: float) -> None:
        self.figures.setdefault(name, {}).update(values)

    def _relative(self, name: str) -> str:
        return name[len(self.prefix) + 1 :]


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's weights live now, so it can be put back there afterwards."""
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Captured(Exception):
    pass


def capture_inputs(model: nn.Module, arch: Architecture, ids: torch.Tensor, batch_size: int, device: torch.device) -> LayerInputs:
    """Run the embeddings once per batch and keep what the first decoder layer receives."""
    layers = arch.decoder_layers(model)
    captured = LayerInputs([], [])

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append(kwargs)
        raise _Captured

    pre = arch.pre_layer_modules(model)
    homes = [_device_of(module) for module in pre]
    for module in pre:
        module.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
        for module, home in zip(pre, homes):
            module.to(home)
    return captured


def advance(layer: nn.Module, reference: nn.Module, inputs: LayerInputs, propagate: str = "quantized") -> float:
    """Replace each batch of ``inputs`` by the next layer's inputs, in place: the quantized
    layer's output (``propagate="quantized"``) or the unquantized ``reference``'s
    (``"float"``). Return the relative squared error of the quantized output against the
    reference's on the same inputs.

    Streaming batch by batch holds one extra copy of the layer's weights instead of a
    second copy of every calibration activation.
    """
    num = den = 0.0
    with torch.inference_mode():
        for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            out = _first(layer(hidden, **kwargs))
            ref = _first(reference(hidden, **kwargs)).float()
            num += float((out.float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
            inputs.hidden[i] = out if propagate == "quantized" else ref.to(out.dtype)
    return num / max(den, 1e-30)


def weight_error(linear: nn.Linear, quantized: QuantLinear) -> float:
    """Relative squared error of the dequantized weight, ||W - Q(W)||^2 / ||W||^2."""
    w = linear.weight.detach().float()
    return float((w - quantized.weight.float()).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


def run_pipeline(
    model: nn.Module,
    plan: Plan,
    registry,
    calibration: torch.Tensor | None,
    device: torch.device,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Quantize ``model`` in place; return per-layer figures (errors, seconds)."""
    arch = find_architecture(model, registry)
    layers = arch.decoder_layers(model)
    quantizers = [(s.spec, s.record.factory(s.spec, s.options, registry)) for s in plan.stages]
    inputs = None
    if progress:
        progress(0, len(layers), "")
    if plan.needs_calibration_data:
        if calibration is None:
            raise QFrameError("this recipe needs calibration data, and none was given")
        inputs = capture_inputs(model, arch, calibration, plan.recipe.calibration.batch_size, device)
    prefix = arch.layers_path
    report = []
    for index, layer in enumerate(layers):
        started = time.perf_counter()
        home = _device_of(layer)
        layer.to(device)
        work = LayerWork(index, f"{prefix}.{index}", layer, inputs, device, arch=arch)
        reference = copy.deepcopy(layer) if inputs is not None else None
        for spec, quantizer in quantizers:
            candidates = [(n, m) for n, m in work.named_linears() if quantizer.accepts(m)]
            targets = spec.scheme.select(candidates)
            quantizer.quantize_layer(work, targets)
        entry: dict[str, Any] = {"layer": work.prefix, "modules": work.figures}
        if inputs is not None:
            entry["output_error"] = advance(layer, reference, inputs, plan.recipe.calibration.propagate)
            del reference
        layer.to(home)
        entry["seconds"] = round(time.perf_counter() - started, 4)
        report.append(entry)
        if progress:
            progress(index + 1, len(layers), work.prefix)
    return report
