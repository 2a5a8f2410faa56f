"""Layer-by-layer quantization.

For each decoder layer in order: move it to the device, let every stage quantize its
target linears (observing the layer's inputs where a stage needs them), run the quantized
layer to produce the next layer's inputs, and move it back. Only one decoder layer sits
on the accelerator at a time; inputs are captured once, at the first layer, and never
recomputed through earlier layers.

Calibration activations stay on the accelerator, or spill to CPU memory when they would not fit
(``calibration.offload``); then each batch visits the device only while a layer runs on it.

Nothing non-finite passes silently. Before any data is read, every stage is checked to take
some module of the decoder layers (:func:`check_stages`). Then each layer's weights are checked
when they reach the device, the first layer's inputs and every layer's outputs (float and
quantized) as they stream, and each stage's quantized modules after it ran: NaN or inf is a
:class:`~qframe.errors.QFrameError` naming the layer and what to change, so per-layer error
figures are always finite. The checks are reduced on the device and read once per layer.

Example (what ``qframe.quantize`` does)::

    layers = run_pipeline(model, plan, registry, calibration=windows.ids, device=torch.device("cuda"))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.func import functional_call

from .calibrate import Calibrator, build_calibrator
from .distributed import Ranks, combine
from .description import CacheState, ExpertsState, LinearState, ModelDescription, planned, staged
from .errors import ModelError, QFrameError, RecipeError
from .experts import (ExpertTokens, QuantExperts, check_expert_inputs, expert_layouts, expert_weight_names,
                      is_fused_experts, unrouted_warning)
from .parts import loaded, to_meta
from .model import Architecture, all_finite, check_finite_weights, find_architecture, listed, nonfinite_names
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

    def working_set(self, layer: nn.Module, batch_tokens: int) -> int:
        """Bytes of accelerator memory this stage needs beyond ``layer`` and the calibration
        activations while it quantizes a layer like it, on batches of ``batch_tokens``
        tokens; by default one forward's intermediates (:func:`forward_bytes`). A stage that
        keeps statistics (Hessians, Gram matrices) adds them: ``calibration.offload = "auto"``
        spills the activations to CPU memory when this passes 2 GiB.

        Example::

            def working_set(self, layer, batch_tokens):
                widest = max(m.in_features for m in layer.modules() if isinstance(m, nn.Linear))
                return super().working_set(layer, batch_tokens) + 4 * widest**2  # one float32 Hessian
        """
        return forward_bytes(layer, batch_tokens)

    # Whether this class quantizes fused experts (qframe.experts): declared by each class itself,
    # so a subclass with an algorithm of its own leaves them alone until it says otherwise.
    handles_experts = False

    def accepts(self, module: nn.Module) -> bool:
        """Whether this stage may take ``module``: by default, linears no earlier stage quantized,
        and float fused-experts modules when the stage quantizes weights and its class declares
        ``handles_experts``."""
        if is_fused_experts(module):
            return (vars(type(self)).get("handles_experts", False) and self.scheme.weights is not None
                    and not isinstance(module, QuantExperts))
        return isinstance(module, nn.Linear)

    def takes(self, work: "LayerWork", targets: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """Which of ``targets`` (the layer's modules this stage accepts and its scheme selects)
        the stage changes: all of them by default. A stage that uses only some narrows them
        (``kv_cache``: those of the layer's attention). The pipeline asks before calibrating, with
        no inputs in ``work``, to refuse a stage that would change nothing (:func:`check_stages`).

        Experts among them are refused here, before any data is read, when their layout cannot
        be told, when a stage calibrating on data meets experts not laid out as transformers 5
        lays them out (:func:`qframe.experts.expert_weight_names`), or when the stage quantizes
        inputs they cannot take (:func:`qframe.experts.check_expert_inputs`).
        """
        for _, module in targets:
            if is_fused_experts(module):
                expert_layouts(module)  # refuses, naming the class, what it cannot read
                if self.needs_calibration(self.stage):
                    expert_weight_names(module)
                if self.scheme.activations is not None:
                    check_expert_inputs(module, self.scheme.activations)
        return targets

    def replaces_targets(self) -> bool:
        """Whether the modules this stage takes come out as :class:`QuantLinear`, out of reach of
        later stages that accept only float linears. True by default; a stage that only
        transforms them and leaves them float (smoothing with ``quantize = false``) says False.
        """
        return True

    def produces(self, work: "LayerWork", taken: list[tuple[str, nn.Module]]
                 ) -> list[LinearState | ExpertsState | CacheState]:
        """What this stage will make of ``taken`` (the modules :meth:`takes` chose), said before
        any calibration: by default each becomes a linear quantized with the stage's weights
        and activations (a fused-experts module: quantized experts, :class:`ExpertsState`),
        when the stage replaces its targets at all. A stage that produces
        something else (``kv_cache``: a layer's cache) says so here; exporters refuse what
        they could not write from these, before data is read.

        Example::

            >>> from qframe.recipe import parse_recipe, resolve
            >>> from qframe.testing import make_registry, tiny_llama_model
            >>> registry, model = make_registry(), tiny_llama_model()
            >>> plan = resolve(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4}}]}), registry)
            >>> description = check_plan(model, plan, registry).description
            >>> description.linears["model.layers.0.mlp.up_proj"].where
            'stage[0] (rtn): model.layers.0.mlp.up_proj'
        """
        if not self.replaces_targets():
            return []
        # Whether a smoothing scale stays on as an input prescale is known only once calibrated.
        return [ExpertsState.of(name, module, self.scheme.weights, self.scheme.activations)
                if is_fused_experts(module) else
                LinearState.of(name, module, self.scheme.weights, self.scheme.activations, prescale=None)
                for name, module in taken]

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
        self.hidden[i] = self.store_form(hidden)

    def store_form(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` where these inputs keep their batches (CPU memory when spilled)."""
        return _spill(hidden) if self.spilled else hidden

    def __len__(self) -> int:
        return len(self.hidden)


def _spill(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.detach()
    # Straight into pinned memory (the caching host allocator reuses the last layer's blocks).
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available()).copy_(t.detach())


# What ``calibration.offload = "auto"`` lets a stage use beyond the layer and its activations.
HEADROOM = 2 << 30


def should_spill(offload: str, device: torch.device, ids: torch.Tensor, hidden_size: int, dtype: torch.dtype,
                 working_set: int = 0, layer_bytes: int = 0) -> bool:
    """Whether calibration activations go to CPU memory: ``offload = "cpu"`` always,
    ``"device"`` never, ``"auto"`` when keeping them would make the accelerator hold more than
    one layer, its activations and 2 GiB (``HEADROOM``), i.e. when the stages' ``working_set``
    (bytes beyond the layer and the activations, :meth:`Quantizer.working_set`) passes 2 GiB,
    or when all of it would not fit in free memory. Spilled, each batch visits the device only
    while the layer runs on it, and the peak is about one layer, the working set and a batch.

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
    return over_bound(needed, layer_bytes, working_set, free)


def over_bound(activations: int, layer: int, working_set: int, free: int) -> bool:
    """``offload = "auto"``'s rule, in bytes: spill when keeping the activations on the device
    would pass one layer + its activations + ``HEADROOM`` (the working set is larger than the
    headroom), or when activations, layer and working set do not fit in ``free`` memory.

    Example::

        >>> GiB = 1 << 30
        >>> over_bound(2 * GiB, GiB // 2, 3 * GiB, 100 * GiB), over_bound(2 * GiB, GiB // 2, GiB, 100 * GiB)
        (True, False)
    """
    return working_set > HEADROOM or activations + layer + working_set > free


def forward_bytes(layer: nn.Module, tokens: int) -> int:
    """About the accelerator memory one forward of ``layer`` over ``tokens`` tokens needs for
    its intermediates: three tensors as wide as its widest linear output (an MLP's gate, up
    and their product), in the layer's dtype.

    Example::

        >>> forward_bytes(nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 4)), 10)
        1920
    """
    widths = [m.out_features for m in layer.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    widths += [int(max(p.shape[1:])) for m in layer.modules() if is_fused_experts(m)
               for p in m.parameters(recurse=False) if p.dim() == 3]
    dtype = next(layer.parameters(), torch.empty(0)).dtype
    return 3 * tokens * max(widths, default=0) * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (shapes only: meta tensors count too)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class LayerSink(Protocol):
    """What gets each decoder layer as soon as the pipeline finished it (before a lazily loaded
    layer is freed): a streaming writer, and the record a resumed run starts from."""

    def layer_done(self, work: "LayerWork", entry: dict[str, Any], inputs: LayerInputs | None) -> None:
        """``work.layer`` is quantized; ``entry`` is its report; ``inputs`` are the next layer's."""


@dataclass
class Resumed:
    """Where an interrupted run left off: its first unfinished layer, the finished layers'
    reports, and (when the recipe calibrates) the inputs of layer ``start``, one tensor a batch."""

    start: int
    report: list[dict[str, Any]]
    hidden: list[torch.Tensor] = field(default_factory=list)


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
    # The process group's ranks when calibration is split across processes (qframe.distributed):
    # ``inputs`` then hold this rank's share of the batches, and what is observed is combined.
    ranks: Ranks | None = None

    def named_linears(self) -> list[tuple[str, nn.Module]]:
        """Every linear and fused-experts module (:mod:`qframe.experts`) of the layer, float or
        already quantized by an earlier stage, by full name: what stages select from.

        Example::

            >>> from qframe.testing import tiny_llama_model
            >>> layer = tiny_llama_model().model.layers[0]
            >>> LayerWork(0, "model.layers.0", layer, None, torch.device("cpu")).named_linears()[0][0]
            'model.layers.0.self_attn.q_proj'
        """
        return [(f"{self.prefix}.{n}", m) for n, m in self.layer.named_modules()
                if isinstance(m, (nn.Linear, QuantLinear)) or is_fused_experts(m)]

    def run(self) -> list[torch.Tensor]:
        """Forward every calibration batch through the layer (as it is now)."""
        if self.inputs is None:
            raise QFrameError(f"{self.prefix}: no calibration inputs were captured")
        inputs = self.inputs
        with torch.inference_mode():
            return [_first(self.layer(inputs.batch(i, self.device), **kw)) for i, kw in enumerate(inputs.kwargs)]

    def forward_all(self, watch: list[nn.Module] | None = None, *, outputs: bool = False) -> None:
        """Run every batch through the layer for its hooks, keeping no outputs (a full copy of
        the activations otherwise). With ``watch``, a batch stops as soon as each of those
        modules has been entered (has returned, with ``outputs``), when the first batch (run
        whole) showed each runs once per forward: observing the attention's inputs need not
        run the MLP. Hooks registered before this call see their module first."""
        inputs = self.inputs
        if inputs is None:
            raise QFrameError(f"{self.prefix}: no calibration inputs were captured")
        calls: dict[nn.Module, int] = {}
        stop_early = False

        def count(module, *_):
            calls[module] = calls.get(module, 0) + 1
            if stop_early and len(calls) == len(hooks):
                raise _Observed

        hooks = [m.register_forward_hook(count) if outputs else m.register_forward_pre_hook(count)
                 for m in dict.fromkeys(watch or [])]
        try:
            with torch.inference_mode():
                for i, kw in enumerate(inputs.kwargs):
                    calls.clear()
                    try:
                        self.layer(inputs.batch(i, self.device), **kw)
                    except _Observed:
                        continue
                    # Run whole: may the next batches stop early?
                    stop_early = bool(watch) and len(calls) == len(hooks) and all(n == 1 for n in calls.values())
        finally:
            for hook in hooks:
                hook.remove()

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
            self.forward_all([self.layer.get_submodule(self._relative(n)) for n in names], outputs=outputs)
        finally:
            for hook in hooks:
                hook.remove()
        self.combine(calibrators.values())
        return calibrators

    def combine(self, observers) -> None:
        """Combine what ``observers`` saw of this rank's batches with the other ranks' (each
        one's ``combine(ranks)``, :mod:`qframe.distributed`); nothing in a single process. A
        quantizer that registers hooks of its own around :meth:`forward_all` calls this after.

        Example::

            >>> work = LayerWork(0, "model.layers.0", nn.Identity(), None, torch.device("cpu"))
            >>> work.combine([object()])   # one process: nothing to combine
        """
        combine(observers, self.ranks)

    def replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` where the submodule ``name`` (a full name) was."""
        parent_name, _, child = self._relative(name).rpartition(".")
        parent = self.layer.get_submodule(parent_name) if parent_name else self.layer
        setattr(parent, child, module)

    def record(self, name: str, **values: float) -> None:
        self.figures.setdefault(name, {}).update(values)

    # -- the layer's attention and its KV cache (qframe.kvcache) ------------------------------

    def attention(self) -> tuple[str, nn.Module]:
        """The layer's attention module (the adapter's ``attention_path``) and its full name;
        :class:`QFrameError` where the adapter names none or the layer has no such module.

        Example::

            >>> from qframe.model import find_architecture
            >>> from qframe.testing import make_registry, tiny_llama_model
            >>> model = tiny_llama_model()
            >>> arch = find_architecture(model, make_registry())
            >>> LayerWork(0, "model.layers.0", model.model.layers[0], None, torch.device("cpu"), arch=arch).attention()[0]
            'model.layers.0.self_attn'
        """
        path = getattr(self.arch, "attention_path", None)
        if not path:
            raise QFrameError(f"{self.prefix}: the architecture adapter ({type(self.arch).__name__}) names no attention "
                              "module (attention_path), so its KV cache cannot be quantized")
        try:
            return f"{self.prefix}.{path}", self.layer.get_submodule(path)
        except AttributeError:
            raise QFrameError(f"{self.prefix} has no attention module {path!r} (the architecture adapter's "
                              "attention_path)") from None

    def observe_cache(self, keys: Calibrator, values: Calibrator) -> None:
        """Run the layer once, feeding the keys and values its attention caches — what it hands
        transformers' attention function: after RoPE and ``k_norm``, ``[batch, kv_heads, seq,
        head_dim]``, before grouped-query heads are repeated — to ``keys`` and ``values`` (give
        one calibrator twice for their joint range). Nothing is kept per batch.
        """
        from . import kvcache

        name, attention = self.attention()
        with kvcache.observing(attention, keys, values) as seen:
            self.forward_all()
        kvcache.require_observed(name, seen)
        self.combine([keys, values])

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


class _Observed(Exception):
    """Every watched module has run for this batch: the rest of the layer is not needed."""


@contextlib.contextmanager
def visiting(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """``modules`` on ``device`` for the block, then back on their own tensors: nothing is
    copied back (a memory-mapped 1 GB embedding would come back as an anonymous copy).

    Example::

        >>> emb = nn.Embedding(4, 2); before = emb.weight.data_ptr()
        >>> with visiting([emb], torch.device("cpu")):
        ...     pass
        >>> emb.weight.data_ptr() == before
        True
    """
    saved = [(m, {n: p.data for n, p in m._parameters.items() if p is not None}, dict(m._buffers))
             for module in modules for m in module.modules()]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for m, data, buffers in saved:
            for name, tensor in data.items():
                m._parameters[name].data = tensor
            m._buffers.update(buffers)


def rank_share(ids: torch.Tensor, batch_size: int, ranks: Ranks | None) -> torch.Tensor:
    """The calibration windows of this rank's batches: the batches of ``batch_size`` windows,
    in order, split as evenly as can be across ``ranks`` (all of them in a single process). Each
    batch is the one a single process forms, so each rank's forwards are that process's.

    Example::

        >>> from qframe.distributed import Ranks
        >>> rank_share(torch.arange(10).view(5, 2), 2, Ranks(1, 2, torch.device("cpu"))).tolist()
        [[8, 9]]
    """
    if ranks is None:
        return ids
    batches = -(-ids.shape[0] // batch_size)
    if batches < ranks.size:
        raise QFrameError(f"the calibration data makes {batches} batch{'es' if batches != 1 else ''} of "
                          f"calibration.batch_size = {batch_size} windows, fewer than the {ranks.size} ranks that "
                          "share them: lower calibration.batch_size, calibrate on more samples, or start fewer "
                          "processes")
    share = ranks.share(batches)
    return ids[share.start * batch_size: share.stop * batch_size]


def capture_inputs(model: nn.Module, arch: Architecture, ids: torch.Tensor, batch_size: int, device: torch.device,
                   spill: bool = False, ranks: Ranks | None = None) -> LayerInputs:
    """Run the embeddings once per batch and keep what the first decoder layer receives
    (hidden states in CPU memory when ``spill``); NaN or inf there is a :class:`ModelError`
    (on every rank together, with ``ranks``)."""
    layers = arch.decoder_layers(model)
    captured = LayerInputs([], [], spilled=spill)
    finite: list[torch.Tensor] = []  # one flag per batch, on the device: read once at the end

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        finite.append(all_finite(hidden))
        captured.hidden.append(_spill(hidden) if spill else hidden)
        captured.kwargs.append(kwargs)
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with visiting(arch.pre_layer_modules(model), device), torch.inference_mode():
            for batch in ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    bad = bool(finite) and not bool(torch.stack(finite).all())
    if ranks.any(bad) if ranks is not None else bad:
        raise ModelError(
            f"the inputs of the first decoder layer ({arch.layers_path}.0), computed by "
            f"{', '.join(arch.pre_layer_paths) or 'the embeddings'}, hold NaN or inf on the calibration data "
            f"although the model's weights are finite. " + _float_model_fault(_dtype_of(model))
        )
    return captured


def unquantized_copy(layer: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``layer`` as it is, to compare its quantized self with. When the layer is
    about to move to another device, the copy shares its tensors (moving gives the layer new
    ones, and the quantizers change only those): no memory and no time for a second copy.

    Example::

        >>> layer = nn.Linear(2, 2)
        >>> unquantized_copy(layer, torch.device("cpu")).weight.data_ptr() == layer.weight.data_ptr()
        False
    """
    if _device_of(layer) == torch.empty(0, device=device).device:  # "cuda" is "cuda:0"
        return copy.deepcopy(layer)
    shared = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in layer.parameters()}
    return copy.deepcopy(layer, shared)


def advance(layer: nn.Module, reference: nn.Module, inputs: LayerInputs, propagate: str = "quantized",
            device: torch.device | None = None, *, name: str = "the layer", stage: str = "quantization",
            ranks: Ranks | None = None) -> float:
    """Replace each batch of ``inputs`` by the next layer's inputs, in place: the quantized
    layer's output (``propagate="quantized"``) or the unquantized ``reference``'s
    (``"float"``). Return the relative squared error of the quantized output against the
    reference's on the same inputs.

    Streaming batch by batch holds one extra copy of the layer's weights instead of a
    second copy of every calibration activation. Non-finite outputs raise (see
    :func:`output_error`); ``name`` and ``stage`` say where, in messages. With ``ranks``, the
    error is over every rank's batches and a non-finite output on any rank raises on all.
    """
    return _compare(layer, reference, inputs, device or _device_of(layer), propagate, name, stage, ranks)


def output_error(layer: nn.Module, reference: nn.Module, inputs: LayerInputs, device: torch.device, *,
                 name: str = "the layer", stage: str = "quantization", ranks: Ranks | None = None) -> float:
    """The relative squared error of ``layer``'s outputs against ``reference``'s, inputs unchanged.

    NaN or inf in the reference's outputs is a :class:`ModelError` (the float model overflows);
    in ``layer``'s alone, a :class:`QFrameError` naming the quantized modules whose outputs
    are not finite. ``name`` (the layer) and ``stage`` (what quantized it) are for messages.
    """
    return _compare(layer, reference, inputs, device, None, name, stage, ranks)


def _compare(layer, reference, inputs: LayerInputs, device: torch.device, propagate: str | None,
             name: str, stage: str, ranks: Ranks | None = None) -> float:
    # The reference's tensors visit the device as copies for this comparison only: nothing
    # is moved back to the host (fresh host memory costs page faults, not just a copy).
    state = {n: t.to(device, non_blocking=True) for n, t in (*reference.named_parameters(),
                                                            *reference.named_buffers())}
    # Which quantized modules' outputs stay finite, kept on the device: when the layer's are not,
    # the streamed inputs may already be overwritten, so the culprits are watched as it runs.
    watched: dict[str, torch.Tensor] = {}

    def watch(module_name: str):
        def hook(_module, _args, out):
            ok = all_finite(_first(out))
            watched[module_name] = watched[module_name] & ok if module_name in watched else ok
        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in layer.named_modules()
             if isinstance(m, (QuantLinear, QuantExperts))]
    try:
        with torch.inference_mode():
            # Sums and flags stay on the device: one host sync per layer, not per batch.
            num = torch.zeros((), device=device)
            den = torch.zeros((), device=device)
            out_ok = torch.ones((), dtype=torch.bool, device=device)
            ref_ok = torch.ones((), dtype=torch.bool, device=device)
            for i, kwargs in enumerate(inputs.kwargs):
                hidden = inputs.batch(i, device)
                out = _first(layer(hidden, **kwargs))
                ref = _first(functional_call(reference, state, (hidden,), kwargs))
                out_ok &= all_finite(out)
                ref_ok &= all_finite(ref)
                num += (out.float() - ref.float()).pow(2).sum()
                den += ref.float().pow(2).sum()
                if propagate is not None:
                    inputs.store(i, out if propagate == "quantized" else ref.to(out.dtype))
            figures = torch.stack([num, den, out_ok.float(), ref_ok.float()])
            if ranks is not None:  # the error over every rank's batches; finite only where finite on all
                sums, flags = ranks.all_reduce([figures[:2], figures[2:]], "sum")
                figures = torch.cat([sums, (flags == ranks.size).float()])
            num_value, den_value, out_fine, ref_fine = figures.tolist()
    finally:
        for hook in hooks:
            hook.remove()
        del state
    if not ref_fine:
        raise ModelError(
            f"{name}: the unquantized layer's outputs hold NaN or inf on the calibration data although its "
            f"weights and inputs are finite. " + _float_model_fault(_dtype_of(reference))
        )
    if not out_fine:
        # In the order the modules first ran: the first is where the overflow starts.
        fine = torch.stack(list(watched.values())).tolist() if watched else []
        culprits = [f"{name}.{n}" for n, ok in zip(watched, fine) if not ok]
        where = f" first in {listed(culprits, 3)}" if culprits else ""
        raise QFrameError(
            f"{name}: after {stage}, the quantized layer's outputs hold NaN or inf on the calibration data{where}, "
            f"while the unquantized layer's are finite. "
            + ("The quantized values overflow float16 (largest 65504): load the model in a wider type, "
               "[model] dtype = \"bfloat16\" or \"float32\" (--set model.dtype=bfloat16)."
               if _dtype_of(reference) == torch.float16 else
               "Quantize these modules more finely (more bits, a smaller group_size) or leave them out with the "
               "stage's ignore.")
        )
    return num_value / max(den_value, 1e-30)


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    tensor = next(module.parameters(), None)
    return tensor.dtype if tensor is not None else None


def _float_model_fault(dtype: torch.dtype | None) -> str:
    """Why the unquantized model computes NaN or inf from finite weights, and what to do."""
    if dtype == torch.float16:
        return ("The float model itself overflows float16 (largest 65504): load it in a wider type, "
                "[model] dtype = \"bfloat16\" or \"float32\" (--set model.dtype=bfloat16).")
    return ("The float model itself computes them on this data: check it on a few prompts, and load it in "
            "float32 ([model] dtype = \"float32\") to rule out rounding in a narrower type.")


def weight_error(linear: nn.Linear, quantized: QuantLinear) -> float:
    """Relative squared error of the dequantized weight, ||W - Q(W)||^2 / ||W||^2."""
    w = linear.weight.detach().float()
    return float((w - quantized.weight.float()).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


def _require_finite_state(work: LayerWork, stage: str) -> None:
    """After a stage: every quantized module's codes, scales and dequantized weight are finite
    (the inputs were, so a failure is the stage's arithmetic)."""
    named = [(f"{name}.{key}", t) for name, module in work.named_linears() if isinstance(module, (QuantLinear, QuantExperts))
             for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
    bad = nonfinite_names(named)
    if bad:
        raise QFrameError(
            f"{work.prefix}: {stage} produced NaN or inf in {listed(bad)} although the layer's weights and inputs "
            "were finite: its arithmetic overflowed. Load the model in float32 ([model] dtype = \"float32\"), or "
            "leave these modules out with the stage's ignore."
        )


@dataclass
class _StageTally:
    """What one stage would take over all decoder layers (see :func:`check_stages`)."""

    targeted: list[str] = field(default_factory=list)  # matched by its targets, before ignore
    selected: list[str] = field(default_factory=list)  # ... and not ignored
    blocked: list[str] = field(default_factory=list)  # selected, but an earlier stage quantized them first
    blocked_by: set[int] = field(default_factory=set)  # ... those stages
    refused: list[str] = field(default_factory=list)  # selected, not accepted for another reason
    taken: int = 0
    # Per layer: its index, the relative names the targets reach there before ignore, and the
    # relative names of all its linears (see _unreached_layers).
    reach: list[tuple[int, set[str], set[str]]] = field(default_factory=list)


_STAND_IN: QuantLinear | None = None
_EXPERTS_STAND_IN = QuantExperts()  # holds nothing: stands for quantized experts


def _quantized_stand_in(module: nn.Module | None = None) -> nn.Module:
    """A quantized linear on the meta device (or quantized experts, for a fused-experts
    ``module``): what a replaced module looks like to later stages."""
    global _STAND_IN
    if module is not None and is_fused_experts(module):
        return _EXPERTS_STAND_IN
    if _STAND_IN is None:
        with torch.device("meta"):
            _STAND_IN = QuantLinear(1, 1, False, None)
    return _STAND_IN


def check_stages(model: nn.Module, arch: Architecture, plan: Plan, quantizers: list[tuple[StageSpec, Quantizer]],
                 *, strict: bool = True) -> tuple[dict[str, LinearState], dict[int, CacheState]]:
    """Refuse, before any calibration, a stage that would take no module of the decoder layers:
    its targets match none, its ignore excludes all it targets, or earlier stages quantized them
    all first. It walks the layers as :func:`run_pipeline` will, with each quantizer's
    :meth:`~Quantizer.accepts`, :meth:`~Quantizer.takes`, :meth:`~Quantizer.replaces_targets`
    and :meth:`~Quantizer.produces`, changes nothing, and returns what the stages will produce:
    linears by name and caches by layer (the first stage to produce one wins, as in the
    pipeline). ``strict=False`` only collects (a stand-in model, where a stage may match nothing).
    A stage whose targets match nothing in some layers (before ignore) though they match modules
    of other layers that those layers lack is a ``UserWarning`` naming the layers.

    Example::

        >>> from qframe.recipe import parse_recipe, resolve
        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> registry, model = make_registry(), tiny_llama_model()
        >>> plan = resolve(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4}, "targets": ["*.mlp.*"]},
        ...                                       {"quantizer": "rtn", "weights": {"bits": 8}, "targets": ["down_proj"]}]}), registry)
        >>> quantizers = [(s.spec, s.record.factory(s.spec, s.options, registry)) for s in plan.stages]
        >>> check_stages(model, find_architecture(model, registry), plan, quantizers)
        Traceback (most recent call last):
        ...
        qframe.errors.RecipeError: stage[1].targets: ['down_proj'] is not valid; stage[1] (rtn) would quantize nothing: stage[0] (rtn) quantizes all 2 modules it targets first (model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj). Remove the stage, or leave it these modules with stage[0]'s ignore.
    """
    tallies = [_StageTally() for _ in quantizers]
    unignored = [dataclasses.replace(spec.scheme, ignore=()) for spec, _ in quantizers]
    produced: dict[str, LinearState] = {}
    caches: dict[int, CacheState] = {}
    for index, layer in enumerate(arch.decoder_layers(model)):
        work = LayerWork(index, f"{arch.layers_path}.{index}", layer, None, torch.device("cpu"), arch=arch)
        current = work.named_linears()
        replaced_by: dict[str, int] = {}
        for number, (spec, quantizer) in enumerate(quantizers):
            tally = tallies[number]
            targeted = unignored[number].select(current)
            tally.targeted += [n for n, _ in targeted]
            tally.reach.append((index, _reached(work, quantizer, targeted), {work._relative(n) for n, _ in current}))
            selected = spec.scheme.select(current)
            tally.selected += [n for n, _ in selected]
            accepted = []
            for n, m in selected:
                if quantizer.accepts(m):
                    accepted.append((n, m))
                elif n in replaced_by:
                    tally.blocked.append(n)
                    tally.blocked_by.add(replaced_by[n])
                else:
                    tally.refused.append(n)
            try:
                taken = quantizer.takes(work, accepted) if accepted else []
            except RecipeError as exc:  # what the stage cannot do with these modules, said before any data
                raise exc.within(f"stage[{number}]", plan.recipe.source) from None
            tally.taken += len(taken)
            for item in quantizer.produces(work, taken) if taken else []:
                item = staged(item, f"stage[{number}] ({spec.quantizer})")
                if isinstance(item, CacheState):
                    caches.setdefault(item.layer, item)
                else:
                    produced.setdefault(item.name, item)
            if quantizer.replaces_targets():
                names = {n for n, _ in taken}
                replaced_by.update((n, number) for n in names if n not in replaced_by)
                current = [(n, _quantized_stand_in(m) if n in names else m) for n, m in current]
    for number, ((spec, _), tally) in enumerate(zip(quantizers, tallies)):
        if tally.taken == 0 and strict:
            key, value, why = _why_nothing(model, arch, number, spec, tally, quantizers)
            raise RecipeError(f"stage[{number}].{key}", value, f"stage[{number}] ({spec.quantizer}) would quantize "
                              f"nothing: {why}", source=plan.recipe.source)
    for number, ((spec, _), tally) in enumerate(zip(quantizers, tallies)):
        message = _unreached_layers(arch, number, spec, tally) if strict else None
        if message:
            warnings.warn(message, stacklevel=2)
    return produced, caches


# -- targets that reach some decoder layers but not others (a warning, from check_stages) -------


def _reached(work: LayerWork, quantizer: Quantizer, targeted: list[tuple[str, nn.Module]]) -> set[str]:
    """The relative names, in ``work``'s layer, of what the stage's targets select before
    ignore, as its :meth:`~Quantizer.takes` narrows them (``kv_cache``: the attention's)."""
    try:
        narrowed = quantizer.takes(work, targeted) if targeted else []
    except QFrameError:
        narrowed = targeted  # the stage's own check says what is wrong, where it runs
    return {work._relative(n) for n, _ in narrowed}


def _unreached_layers(arch: Architecture, number: int, spec: StageSpec, tally: _StageTally) -> str | None:
    """The warning for a stage whose targets reach nothing in some decoder layers, before
    ignore, though they reach modules of others that those layers do not hold (a recipe for
    ``*.mlp.gate_proj`` on a model whose first layers are dense and the rest MoE); ``None``
    when there are none. Layers that hold the modules the targets reach elsewhere, and were
    left out by the targets on purpose (``re:layers\\.[0-3]\\.``), are not named.
    """
    reached = set().union(*(names for _, names, _ in tally.reach))
    missing = [index for index, names, present in tally.reach if not names and not (reached & present)]
    if not missing or len(missing) == len(tally.reach):
        return None  # every layer: the stage quantizes nothing, which check_stages refuses
    from .coverage import spans

    full = [f"{arch.layers_path}.{index}" for index in missing]
    return (f"stage[{number}] ({spec.quantizer}): its targets {list(spec.scheme.targets)} match nothing in "
            f"decoder layer{'s' if len(missing) > 1 else ''} {spans(missing)} of {len(tally.reach)} "
            f"({listed(full, 3)}), which hold none of what they match in the others ({listed(sorted(reached), 4)}); "
            "this stage leaves those layers as they are. Add targets for what these layers hold if they should be "
            "quantized too.")


def _why_nothing(model: nn.Module, arch: Architecture, number: int, spec: StageSpec, tally: _StageTally,
                 quantizers: list[tuple[StageSpec, Quantizer]]) -> tuple[str, list[str], str]:
    targets, ignore = list(spec.scheme.targets), list(spec.scheme.ignore)
    if not tally.targeted:
        unignored = dataclasses.replace(spec.scheme, ignore=())
        others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and unignored.matches(n, m)]
        found = f", only {listed(others, 3)}: qframe quantizes the linears of the decoder layers" if others else ""
        return "targets", targets, (f"its targets match no linear of the decoder layers ({arch.layers_path}.N){found}. "
                                    "Targets are module types (Linear), globs on names (*.mlp.*, q_proj) or re:REGEX.")
    if not tally.selected:
        return "ignore", ignore, (f"its ignore excludes all {len(tally.targeted)} modules its targets {targets} match "
                                  f"({listed(tally.targeted, 3)}). Narrow ignore, or remove the stage.")
    refused = (f"{spec.quantizer} accepts none of the {len(tally.refused)} modules it targets "
               f"({listed(tally.refused, 3)})")
    if tally.blocked:
        earlier = ", ".join(f"stage[{k}] ({quantizers[k][0].quantizer})" for k in sorted(tally.blocked_by))
        which = f"all {len(tally.blocked)}" if not tally.refused else f"the other {len(tally.blocked)}"
        return "targets", targets, ((f"{refused}, and " if tally.refused else "")
                                    + f"{earlier} quantize{'s' if len(tally.blocked_by) == 1 else ''} {which} modules "
                                    f"it targets first ({listed(tally.blocked, 3)}). Remove the stage, or leave it "
                                    f"these modules with stage[{min(tally.blocked_by)}]'s ignore.")
    if tally.refused:
        return "targets", targets, refused + "."
    return "targets", targets, (f"{spec.quantizer} uses none of the {len(tally.selected)} modules it targets "
                                f"({listed(tally.selected, 3)}).")


@dataclass
class CheckedPlan:
    """What :func:`check_plan` settled: the architecture adapter, one quantizer per stage, and
    the description of what the stages will produce (for exporters' checks)."""

    arch: Architecture
    quantizers: list[tuple[StageSpec, Quantizer]]
    description: ModelDescription


def check_plan(model: nn.Module, plan: Plan, registry, *, stand_in: bool = False) -> CheckedPlan:
    """Everything :func:`run_pipeline` settles before it reads data, in seconds: the model's
    architecture adapter (and its exact :meth:`~Architecture.prepare`), one quantizer per stage,
    no stage that would take nothing (:func:`check_stages`), what the stages will produce (a
    :class:`~qframe.description.ModelDescription` that exporters check), and no NaN or inf in
    the weights outside the decoder layers (each layer's own are checked when it reaches the
    device). Callers that make calibration data first may call it before that; it is idempotent.

    ``stand_in``: ``model`` is a weightless stand-in (a meta-device model) for one the user has
    not named; nothing is refused for matching nothing, and shapes mean nothing.

    Example::

        >>> from qframe.recipe import parse_recipe, resolve
        >>> from qframe.testing import make_registry, tiny_llama_model
        >>> registry = make_registry()
        >>> plan = resolve(parse_recipe({"stage": [{"quantizer": "rtn", "weights": {"bits": 4}}]}), registry)
        >>> checked = check_plan(tiny_llama_model(), plan, registry)
        >>> type(checked.arch).__name__, [type(q).__name__ for _, q in checked.quantizers]
        ('LlamaFamily', ['RTN'])
    """
    arch = find_architecture(model, registry)
    arch.prepare(model)  # e.g. GPT-2's Conv1D projections become equivalent nn.Linear
    quantizers = [(s.spec, s.record.factory(s.spec, s.options, registry)) for s in plan.stages]
    produced, caches = check_stages(model, arch, plan, quantizers, strict=not stand_in)
    description = planned(model, arch, produced, caches, shapes_known=not stand_in)
    if not stand_in and not _on_meta(model):
        layers = arch.decoder_layers(model)
        in_layers = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
        check_finite_weights([(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
                              if id(t) not in in_layers])
    return CheckedPlan(arch, quantizers, description)


def _on_meta(model: nn.Module) -> bool:
    tensor = next(model.parameters(), None)
    return tensor is not None and tensor.device.type == "meta"


def run_pipeline(
    model: nn.Module,
    plan: Plan,
    registry,
    calibration: torch.Tensor | None,
    device: torch.device,
    progress: Callable[[int, int, str], None] | None = None,
    checked: CheckedPlan | None = None,
    *,
    loader: Any = None,
    sink: LayerSink | None = None,
    resumed: Resumed | None = None,
) -> list[dict[str, Any]]:
    """Quantize ``model`` in place; return per-layer figures (errors, seconds).

    First :func:`check_plan` (nothing read yet), unless the caller ran it already and passes
    what it returned as ``checked``; each layer's weights are checked for NaN and inf when they
    reach the device, its inputs and outputs as they stream.

    A model loaded lazily (:class:`qframe.lazy.LazyModel`) comes with its ``loader``
    (:class:`qframe.parts.PartLoader`): each part is loaded when its turn comes (the embeddings
    to capture the first layer's inputs, each decoder layer to quantize it) and freed after. A
    ``sink`` gets each finished layer (to write it, and the state a resumed run needs) before
    it is freed; ``resumed`` starts at the first layer an interrupted run did not finish.
    """
    checked = checked or check_plan(model, plan, registry)
    arch, quantizers = checked.arch, checked.quantizers
    layers = arch.decoder_layers(model)
    ranks = Ranks.current()
    start = resumed.start if resumed is not None else 0
    inputs = None
    if progress:
        progress(start, len(layers), "")
    if plan.needs_calibration_data and start < len(layers):
        if calibration is None:
            raise QFrameError("this recipe needs calibration data, and none was given")
        settings = plan.recipe.calibration
        calibration = rank_share(calibration, settings.batch_size, ranks)
        dtype = next(model.parameters()).dtype
        width = getattr(model.config, "hidden_size", None) or 0  # unknown: spill only when told to
        tokens = settings.batch_size * calibration.shape[-1]
        working_set = max(quantizer.working_set(layers[start], tokens) for _spec, quantizer in quantizers)
        spill = should_spill(settings.offload, device, calibration, width, dtype, working_set,
                             tensor_bytes(layers[start]))
        with loaded(loader, "first"):
            inputs = capture_inputs(model, arch, calibration, settings.batch_size, device, spill, ranks)
        if resumed is not None and start > 0:
            inputs.hidden = [inputs.store_form(h.to(device)) for h in resumed.hidden]
    prefix = arch.layers_path
    report = list(resumed.report) if resumed is not None else []
    routed: dict[str, list[int]] = {}  # calibration tokens per expert, by experts module
    for entry in report:
        routed.update({n: v["tokens_per_expert"] for n, v in entry["modules"].items() if "tokens_per_expert" in v})
    for index in range(start, len(layers)):
        started = time.perf_counter()
        layer = loader.load_layer(index) if loader is not None else layers[index]
        # What the layer was loaded as: stages replace some modules, which the plan still names.
        loaded_modules = list(layer.modules())
        home = _device_of(layer)
        # The unquantized copy stays in the layer's home memory until it is compared with.
        reference = unquantized_copy(layer, device) if inputs is not None else None
        layer.to(device)
        work = LayerWork(index, f"{prefix}.{index}", layer, inputs, device, arch=arch, ranks=ranks)
        check_finite_weights([*layer.named_parameters(work.prefix), *layer.named_buffers(work.prefix)])
        entry: dict[str, Any] = {"layer": work.prefix, "modules": {}, "stages": []}
        for number, (spec, quantizer) in enumerate(quantizers):
            work.figures = {}
            candidates = [(n, m) for n, m in work.named_linears() if quantizer.accepts(m)]
            targets = spec.scheme.select(candidates)
            quantizer.quantize_layer(work, targets)
            named = f"stage[{number}] ({spec.quantizer})"
            _require_finite_state(work, named)
            stage = {"stage": number, "quantizer": spec.quantizer, "modules": work.figures}
            if inputs is not None and number < len(quantizers) - 1:  # the last one's comes with advance
                stage["output_error"] = output_error(layer, reference, inputs, device, name=work.prefix, stage=named,
                                                     ranks=ranks)
            entry["stages"].append(stage)
            for name, values in work.figures.items():
                entry["modules"].setdefault(name, {}).update(values)
        if inputs is not None:
            last = f"stage[{len(quantizers) - 1}] ({quantizers[-1][0].quantizer})"
            # Tokens per expert, counted on the unquantized layer's routing as advance runs it.
            with ExpertTokens(reference, work.prefix) as tokens:
                entry["output_error"] = advance(layer, reference, inputs, plan.recipe.calibration.propagate, device,
                                                name=work.prefix, stage=last, ranks=ranks)
            combine([tokens], ranks)
            entry["stages"][-1]["output_error"] = entry["output_error"]
            for name, counts in tokens.counts().items():
                entry["modules"].setdefault(name, {})["tokens_per_expert"] = counts
                routed[name] = counts
            del reference
        if loader is None:  # a streamed layer is written from where it is, then freed
            layer.to(home)
            kept = set(layer.modules())
            for module in loaded_modules:  # replaced modules hold device memory the plan would keep alive
                if module not in kept:
                    to_meta(module)
        entry["seconds"] = round(time.perf_counter() - started, 4)
        report.append(entry)
        if sink is not None:
            sink.layer_done(work, entry, inputs)
        if loader is not None:
            loader.free_layer(index)
            for module in loaded_modules:  # replaced ones too: the plan's description holds them
                to_meta(module)
        if progress:
            progress(index + 1, len(layers), work.prefix)
    message = unrouted_warning(routed)
    if message:
        warnings.warn(message, stacklevel=2)
    return report
