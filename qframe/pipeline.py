"""Layer-by-layer quantization.

For each decoder layer in order: move it to the device, let every stage quantize its
target linears (observing the layer's inputs where a stage needs them), run the quantized
layer to produce the next layer's inputs, and move it back. Only one decoder layer sits
on the accelerator at a time; inputs are captured once, at the first layer, and never
recomputed through earlier layers.

Calibration activations stay on the accelerator, or spill to CPU memory when they would not fit
(``calibration.offload``); then each batch visits the device only while a layer runs on it.

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
    """The inputs of the current decoder layer: hidden states and keyword arguments per batch.

    ``hidden`` lives on the accelerator, or in CPU memory (pinned, when CUDA is present) when
    ``spilled``: then each batch travels to the device only while the layer runs on it. The
    keyword arguments (masks, rotary tables) are small and stay on the device.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    spilled: bool = False

    def batch(self, i: int, device: torch.device) -> torch.Tensor:
        """Batch ``i``'s hidden states on ``device``."""
        return self.hidden[i].to(device, non_blocking=True)

    def store(self, i: int, hidden: torch.Tensor) -> None:
        """Replace batch ``i`` (computed on the device) by ``hidden``, kept where the inputs live."""
        self.hidden[i] = _spill(hidden) if self.spilled else hidden

    def __len__(self) -> int:
        return len(self.hidden)


def _spill(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().to("cpu", non_blocking=False)
    return out.pin_memory() if torch.cuda.is_available() else out


def should_spill(offload: str, device: torch.device, ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether calibration activations go to CPU memory: ``offload = "cpu"`` always,
    ``"device"`` never, ``"auto"`` when they would take more than a third of the accelerator's
    free memory (the rest is for the layer, its copy and the algorithms' work).

    Example::

        >>> should_spill("auto", torch.device("cpu"), torch.zeros(128, 2048), 4096, torch.bfloat16)
        False
    """
    if offload == "cpu":
        return True
    if offload == "device" or device.type != "cuda":
        return False
    needed = ids.numel() * hidden_size * torch.empty((), dtype=dtype).element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return needed > free / 3


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
        inputs = self.inputs
        with torch.inference_mode():
            return [_first(self.layer(inputs.batch(i, self.device), **kw)) for i, kw in enumerate(inputs.kwargs)]

    def _forward_all(self) -> None:
        """Run every batch through the layer for its hooks, keeping no outputs (a full copy of
        the activations otherwise)."""
        inputs = self.inputs
        if inputs is None:
            raise QFrameError(f"{self.prefix}: no calibration inputs were captured")
        with torch.inference_mode():
            for i, kw in enumerate(inputs.kwargs):
                self.layer(inputs.batch(i, self.device), **kw)

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
            self._forward_all()
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


def capture_inputs(model: nn.Module, arch: Architecture, ids: torch.Tensor, batch_size: int, device: torch.device,
                   spill: bool = False) -> LayerInputs:
    """Run the embeddings once per batch and keep what the first decoder layer receives
    (hidden states in CPU memory when ``spill``)."""
    layers = arch.decoder_layers(model)
    captured = LayerInputs([], [], spilled=spill)

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(_spill(hidden) if spill else hidden)
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


def advance(layer: nn.Module, reference: nn.Module, inputs: LayerInputs, propagate: str = "quantized",
            device: torch.device | None = None) -> float:
    """Replace each batch of ``inputs`` by the next layer's inputs, in place: the quantized
    layer's output (``propagate="quantized"``) or the unquantized ``reference``'s
    (``"float"``). Return the relative squared error of the quantized output against the
    reference's on the same inputs.

    Streaming batch by batch holds one extra copy of the layer's weights instead of a
    second copy of every calibration activation.
    """
    return _compare(layer, reference, inputs, device or _device_of(layer), propagate)


def output_error(layer: nn.Module, reference: nn.Module, inputs: LayerInputs, device: torch.device) -> float:
    """The relative squared error of ``layer``'s outputs against ``reference``'s, inputs unchanged."""
    return _compare(layer, reference, inputs, device, None)


def _compare(layer, reference, inputs: LayerInputs, device: torch.device, propagate: str | None) -> float:
    num = den = 0.0
    home = _device_of(reference)
    reference.to(device)  # on the accelerator only while it is compared with
    try:
        with torch.inference_mode():
            for i, kwargs in enumerate(inputs.kwargs):
                hidden = inputs.batch(i, device)
                out = _first(layer(hidden, **kwargs))
                ref = _first(reference(hidden, **kwargs))
                num += float((out.float() - ref.float()).pow(2).sum())
                den += float(ref.float().pow(2).sum())
                if propagate is not None:
                    inputs.store(i, out if propagate == "quantized" else ref.to(out.dtype))
    finally:
        reference.to(home)
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
    arch.prepare(model)  # e.g. GPT-2's Conv1D projections become equivalent nn.Linear
    layers = arch.decoder_layers(model)
    quantizers = [(s.spec, s.record.factory(s.spec, s.options, registry)) for s in plan.stages]
    inputs = None
    if progress:
        progress(0, len(layers), "")
    if plan.needs_calibration_data:
        if calibration is None:
            raise QFrameError("this recipe needs calibration data, and none was given")
        settings = plan.recipe.calibration
        dtype = next(model.parameters()).dtype
        width = getattr(model.config, "hidden_size", None) or 0  # unknown: spill only when told to
        spill = should_spill(settings.offload, device, calibration, width, dtype)
        inputs = capture_inputs(model, arch, calibration, settings.batch_size, device, spill)
    prefix = arch.layers_path
    report = []
    for index, layer in enumerate(layers):
        started = time.perf_counter()
        home = _device_of(layer)
        # The unquantized copy stays in the layer's home memory until it is compared with.
        reference = copy.deepcopy(layer) if inputs is not None else None
        layer.to(device)
        work = LayerWork(index, f"{prefix}.{index}", layer, inputs, device, arch=arch)
        entry: dict[str, Any] = {"layer": work.prefix, "modules": {}, "stages": []}
        for number, (spec, quantizer) in enumerate(quantizers):
            work.figures = {}
            candidates = [(n, m) for n, m in work.named_linears() if quantizer.accepts(m)]
            targets = spec.scheme.select(candidates)
            quantizer.quantize_layer(work, targets)
            stage = {"stage": number, "quantizer": spec.quantizer, "modules": work.figures}
            if inputs is not None and number < len(quantizers) - 1:  # the last one's comes with advance
                stage["output_error"] = output_error(layer, reference, inputs, device)
            entry["stages"].append(stage)
            for name, values in work.figures.items():
                entry["modules"].setdefault(name, {}).update(values)
        if inputs is not None:
            entry["output_error"] = advance(layer, reference, inputs, plan.recipe.calibration.propagate, device)
            entry["stages"][-1]["output_error"] = entry["output_error"]
            del reference
        layer.to(home)
        entry["seconds"] = round(time.perf_counter() - started, 4)
        report.append(entry)
        if progress:
            progress(index + 1, len(layers), work.prefix)
    return report
