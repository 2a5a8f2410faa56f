"""Perplexity on held-out text: with the whole model on the device (:func:`perplexity`), or
one decoder layer at a time for models that fit neither on the device nor in CPU memory
(:func:`perplexity_layerwise`, which gives the very same numbers).

Example::

    >>> result = qframe.evaluate(qmodel, dataset="text:held_out.txt", seq_len=512)  # doctest: +SKIP
    >>> round(result.perplexity, 2)                                                  # doctest: +SKIP
    17.03
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .data import TokenWindows
from .errors import ModelError, QFrameError
from .model import Architecture, listed
from .pipeline import should_spill


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    tokens: int
    windows: int
    seq_len: int
    sha256: str
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer errors, when known

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "layers"}


def _batch_loss(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one batch and its token count: one function for both ways of
    evaluating, so that they compute it with the very same operations."""
    loss = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
    )
    return float(loss), batch[:, 1:].numel()


def _result(total: float, count: int, windows: TokenWindows, started: float) -> EvalResult:
    return EvalResult(
        perplexity=math.exp(total / count) if total / count < 709 else math.inf,  # exp overflows past 709
        tokens=count,
        windows=windows.ids.shape[0],
        seq_len=windows.ids.shape[1],
        sha256=windows.sha256,
        seconds=round(time.perf_counter() - started, 3),
    )


def perplexity(model: nn.Module, windows: TokenWindows, device: torch.device, batch_size: int = 4) -> EvalResult:
    """exp(mean next-token negative log-likelihood) over every window, on ``device``.

    Example::

        >>> from qframe.testing import random_tokens, tiny_llama_model
        >>> windows = TokenWindows(random_tokens(4, 16, 128), "0" * 64, "example")
        >>> result = perplexity(tiny_llama_model(), windows, torch.device("cpu"))
        >>> result.tokens, result.windows, result.seq_len
        (60, 4, 16)
    """
    started = time.perf_counter()
    home = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in windows.batches(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                loss, tokens = _batch_loss(logits, batch)
                total += loss
                count += tokens
    finally:
        model.to(home)
    return _result(total, count, windows, started)


# -- layer by layer -----------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by the last stand-in while capturing: nothing after the decoder layers is needed."""


class _StandIn(nn.Module):
    """Takes decoder layer ``index``'s place in the model's own forward while it is evaluated
    layer-wise, and does ``act(index, args, kwargs)`` instead of the layer's computation.

    The real layer is kept outside the module tree, so moving the model moves only what lies
    outside the decoder layers; attributes the model's loop reads from a layer (an attention
    type, say) are still found on it.
    """

    def __init__(self, layer: nn.Module, index: int, act: Callable[[int, tuple, dict], Any]) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer  # not registered: its weights stay where they are
        self.index = index
        self.act = act

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.act(self.index, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)


@contextlib.contextmanager
def _stand_ins(model: nn.Module, arch: Architecture, act: Callable[[int, tuple, dict], Any]) -> Iterator[None]:
    """The model with its decoder-layer list replaced by one of :class:`_StandIn` (as long, so
    that code indexing or slicing it sees what it expects), restored whatever happens."""
    layers = arch.decoder_layers(model)
    parent_path, _, name = arch.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, nn.ModuleList(_StandIn(layer, i, act) for i, layer in enumerate(layers)))
    try:
        yield
    finally:
        setattr(parent, name, layers)


def _hidden_of(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """A decoder layer's call split into its hidden states, the other positional arguments
    (GPT-2 passes its mask positionally) and the keyword arguments."""
    if args:
        return args[0], tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's weights (else its buffers) live now, to put it back there afterwards."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _meta_names(module: nn.Module) -> list[str]:
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


@dataclass
class _Activations:
    """Every batch's hidden states between two decoder layers, and how each layer is called.

    ``hidden`` stays on the device, or in CPU memory (pinned where CUDA is present) when
    ``spilled``, as :class:`qframe.pipeline.LayerInputs` keeps calibration activations; then a
    batch visits the device only while it is used. ``calls[b][i]`` holds the positional
    (after the hidden states) and keyword arguments layer ``i`` received for batch ``b``: the
    model may give each layer its own mask and rotary table (sliding or full attention in
    Gemma 2 and 3, gpt-oss, Qwen2-MoE), so each layer is called with what it got in the
    model's own forward. They stay on the device, each distinct value once (:func:`_shared`).
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict[str, Any]]]] = field(default_factory=list)
    spilled: bool = False

    def batch(self, b: int, device: torch.device) -> torch.Tensor:
        return self.hidden[b].to(device, non_blocking=True)

    def store(self, b: int, hidden: torch.Tensor) -> None:
        if self.spilled and hidden.device.type != "cpu":
            # Straight into pinned memory (one copy, not a copy and then a pinned one), from
            # where the next layer's copy to the device can overlap with its work.
            spilled = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=torch.cuda.is_available())
            hidden = spilled.copy_(hidden)
        if b == len(self.hidden):
            self.hidden.append(hidden)
        else:
            self.hidden[b] = hidden


def _shared(value: Any, kept: dict[tuple, list[torch.Tensor]]) -> Any:
    """``value`` (an argument of a decoder layer, or a tuple, list or dict of them) with each
    tensor replaced by an equal one kept from an earlier batch, if any.

    Every batch of equal shape gets an equal causal mask and rotary table, but a new one:
    kept for every batch they would take as much device memory as the hidden states of a
    window or more (an eager ``[batch, 1, seq, seq]`` mask); kept once, they cost nothing.
    Equal values give equal results, so the numbers do not change.

    Example::

        >>> kept = {}
        >>> first = _shared({"mask": torch.zeros(2, 2)}, kept)["mask"]
        >>> _shared({"mask": torch.zeros(2, 2)}, kept)["mask"] is first
        True
    """
    if isinstance(value, torch.Tensor):
        candidates = kept.setdefault((value.shape, value.dtype, value.device, value.stride()), [])
        for candidate in candidates:
            if candidate is value or torch.equal(candidate, value):
                return candidate
        candidates.append(value)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_shared(v, kept) for v in value) if type(value) in (tuple, list) else value
    if isinstance(value, dict):
        return {k: _shared(v, kept) for k, v in value.items()}
    return value


def _capture(model: nn.Module, arch: Architecture, windows: TokenWindows, batch_size: int, device: torch.device,
             offload: str) -> _Activations:
    """Run the model's own forward up to its decoder layers, once per batch, and keep what each
    layer receives; only the modules before the layers (``arch.pre_layer_modules``) visit the
    device, as in :func:`qframe.pipeline.capture_inputs`."""
    count = len(arch.decoder_layers(model))
    if count == 0:
        raise ModelError(f"{type(model).__name__}.{arch.layers_path} holds no decoder layers to evaluate one by one")
    acts = _Activations()
    calls: list[tuple[tuple, dict[str, Any]]] = []
    kept: dict[tuple, list[torch.Tensor]] = {}

    def record(index: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        hidden, rest, kwargs = _hidden_of(args, kwargs)
        calls.append((_shared(rest, kept), _shared(kwargs, kept)))
        if index == 0:
            if not acts.hidden:  # the first batch tells how large the activations of all windows are
                acts.spilled = should_spill(offload, device, windows.ids, hidden.shape[-1], hidden.dtype)
            acts.store(len(acts.hidden), hidden)
        if index == count - 1:
            raise _Stop
        return hidden  # what the next stand-in receives is never used

    pre = arch.pre_layer_modules(model)
    homes = [_device_of(module) for module in pre]
    for module in pre:
        module.to(device)
    try:
        with _stand_ins(model, arch, record), torch.inference_mode():
            for batch in windows.batches(batch_size):
                calls = []
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
                if len(calls) != count:
                    raise ModelError(f"{type(model).__name__} called {len(calls)} of its {count} decoder layers "
                                     f"({arch.layers_path}); it cannot be evaluated layer by layer")
                acts.calls.append(calls)
    finally:
        for module, home in zip(pre, homes):
            module.to(home)
    return acts


def _tail_output(hidden: torch.Tensor, arity: int | None) -> Any:
    """``hidden`` as a decoder layer returned its output: alone, or first of a tuple (Falcon,
    BLOOM) whose other members, attention weights when asked for, were not asked for."""
    return hidden if arity is None else (hidden,) + (None,) * (arity - 1)


def perplexity_layerwise(model: nn.Module, arch: Architecture, windows: TokenWindows, device: torch.device,
                         batch_size: int = 4, *, load_layer: Callable[[int], Any] | None = None,
                         free_layer: Callable[[int], Any] | None = None, offload: str = "auto") -> EvalResult:
    """What :func:`perplexity` gives, bit for bit, with one decoder layer on ``device`` at a time.

    The model's own forward runs once per batch up to its decoder layers, with only the modules
    before them on the device, and what each layer receives is kept (hidden states, masks,
    rotary tables). Then each layer in turn is loaded (``load_layer(i)``, when given: a
    :class:`qframe.lazy.LazyModel`'s), moved to the device, run on every batch, moved back and
    freed (``free_layer(i)``). Last, the model's own forward runs once more per batch with the
    rest of the model on the device and its decoder layers standing aside, the last of them
    handing over the final hidden states: whatever the family does after its layers (final
    norm, head, Gemma's logit softcapping) is computed by its own code.

    The activations of all windows stay on the device, or in CPU memory when they would take
    more than a third of its free memory (``offload="auto"``; ``"cpu"`` always, ``"device"``
    never), as calibration activations do in :mod:`qframe.pipeline`. Models that compute
    anything between their decoder layers besides handing the hidden states on cannot be
    evaluated so.

    Example::

        >>> from qframe.model import find_architecture
        >>> from qframe.testing import make_registry, random_tokens, tiny_llama_model
        >>> model, windows = tiny_llama_model(), TokenWindows(random_tokens(4, 16, 128), "0" * 64, "example")
        >>> arch, cpu = find_architecture(model, make_registry()), torch.device("cpu")
        >>> perplexity_layerwise(model, arch, windows, cpu).perplexity == perplexity(model, windows, cpu).perplexity
        True
    """
    started = time.perf_counter()
    layers = arch.decoder_layers(model)
    inside = arch.layers_path + "."
    missing = [name for name in _meta_names(model) if not name.startswith(inside)]
    if missing:
        raise QFrameError(f"{listed(missing)} of {type(model).__name__} {'are' if len(missing) > 1 else 'is'} on the "
                          "meta device: load what lies outside the decoder layers first (LazyModel.load_rest())")
    acts = _capture(model, arch, windows, batch_size, device, offload)

    arity: list[int | None] = []  # how each layer returns its output, for the stand-ins of the last pass
    for i in range(len(layers)):
        if load_layer is not None:
            load_layer(i)
        layer = layers[i]  # the list's, whatever the loader returned
        try:
            on_meta = _meta_names(layer)
            if on_meta:
                raise QFrameError(f"decoder layer {i} ({arch.layers_path}.{i}) is on the meta device "
                                  f"({listed(on_meta)}); pass load_layer to read it from the checkpoint")
            home = _device_of(layer)
            layer.to(device)  # outside inference mode: the weights stay ordinary tensors when moved back
            try:
                with torch.inference_mode():
                    for b, (rest, kwargs) in enumerate(call[i] for call in acts.calls):
                        out = layer(acts.batch(b, device), *rest, **kwargs)
                        if b == 0:
                            arity.append(len(out) if isinstance(out, (tuple, list)) else None)
                        acts.store(b, out[0] if isinstance(out, (tuple, list)) else out)
            finally:
                layer.to(home)
        finally:
            if free_layer is not None:
                free_layer(i)

    batches = windows.batches(batch_size)
    current: list[int] = [0]

    def finish(index: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        if index < len(layers) - 1:  # the earlier layers hand their input on, untouched
            return _tail_output(_hidden_of(args, kwargs)[0], arity[index])
        return _tail_output(acts.batch(current[0], device), arity[index])

    total, count = 0.0, 0
    with _stand_ins(model, arch, finish):
        home = _device_of(model)  # of what lies outside the decoder layers: the stand-ins hold nothing
        model.to(device)
        try:
            with torch.inference_mode():
                for b, batch in enumerate(batches):
                    current[0] = b
                    batch = batch.to(device)
                    logits = model(input_ids=batch, use_cache=False).logits
                    loss, tokens = _batch_loss(logits, batch)
                    total += loss
                    count += tokens
                    acts.hidden[b] = torch.empty(0)  # done with: its memory goes back now
        finally:
            model.to(home)
    return _result(total, count, windows, started)


def should_evaluate_layerwise(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` is better evaluated layer by layer on ``device``: on CUDA, when its
    weights are not all there yet and would take more than half of the device's free memory
    (the rest is for activations and logits); on the CPU never (the model is there already).

    Example::

        >>> from qframe.testing import tiny_llama_model
        >>> should_evaluate_layerwise(tiny_llama_model(), torch.device("cpu"))
        False
    """
    if device.type != "cuda":
        return False
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        return True  # not even loaded: a lazy model
    if all(t.device == device or (t.device.type == "cuda" and device.index is None) for t in tensors):
        return False
    needed = sum(t.numel() * t.element_size() for t in tensors)
    free, _total = torch.cuda.mem_get_info(device)
    return needed > free / 2
