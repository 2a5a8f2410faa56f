"""What each expert of a fused-experts module sees in calibration, for the data-driven
algorithms (GPTQ's Hessians, AWQ's statistics).

An MoE block calls its experts once per batch, ``experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])`` (every family transformers 5 implements). A forward pre-hook reads
that call; the layer itself runs unchanged, so its output — what the next layer is calibrated
on — always comes from the model's own routing.

Which tokens an expert's *statistics* cover is the stage's ``experts`` option
(:class:`ExpertCalibration`):

* ``"all"`` (the default): every calibration token goes through every expert. Top-k routing
  leaves rare experts with a handful of tokens or none (the peers' trackers are full of
  experts that "received no calibration tokens"); sending all of them through every expert
  gives each expert's Hessian or scale search the full distribution of its layer's inputs.
  The first weight (``gate_up_proj``) then sees the same inputs in every expert: one shared
  statistic, not ``E`` copies of it.
* ``"routed"``: each expert sees only the tokens the router sends it. An expert with fewer than
  ``expert_min_tokens`` falls back to round-to-nearest on its weight ranges and is named in
  a warning.

The second weight (``down_proj``) reads each expert's own hidden activation,
``act(x · W_gate_upᵀ)``, computed here for all experts at once (batched matmuls, in chunks of
experts that bound the temporary) with the module's own gate: transformers' ``_apply_gate``
(Mixtral, Qwen-MoE, DeepSeek-V3: ``act(gate) · up``; gpt-oss: its clamped GLU) and its biases.

Example::

    >>> import torch, transformers
    >>> config = transformers.Qwen3MoeConfig(hidden_size=8, moe_intermediate_size=4, num_experts=3)
    >>> experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj); _ = torch.nn.init.normal_(experts.down_proj)
    >>> expert_weight_names(experts), tuple(expert_hidden(experts, torch.randn(5, 8)).shape)
    (('gate_up_proj', 'down_proj'), (3, 5, 4))
"""

from __future__ import annotations

import copy

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from .errors import ModelError, RecipeError
from .experts import expert_gate, expert_matrix, expert_weight_names, num_experts

ALL, ROUTED = "all", "routed"
# Elements of one chunk of per-expert hidden activations [experts, tokens, width] (1 GiB in float32).
CHUNK_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class ExpertCalibration:
    """Options a data-driven quantizer of experts takes (its options dataclass inherits them).

    ``experts``: ``"all"`` sends every calibration token through every expert for statistics
    (the layer's output keeps the model's routing), ``"routed"`` gives each expert only its
    routed tokens. ``expert_min_tokens``: with ``"routed"``, an expert that saw fewer tokens
    is rounded to nearest instead, and named in a warning.

    Example::

        >>> ExpertCalibration().experts, ExpertCalibration(experts="routed").expert_min_tokens
        ('all', 32)
    """

    experts: str = ALL
    expert_min_tokens: int = 32

    def __post_init__(self) -> None:
        if self.experts not in (ALL, ROUTED):
            raise RecipeError("experts", self.experts, f"expected {ALL!r} (every calibration token through every "
                              f"expert, for statistics) or {ROUTED!r} (each expert its routed tokens)")
        if isinstance(self.expert_min_tokens, bool) or not isinstance(self.expert_min_tokens, int) \
                or self.expert_min_tokens < 1:
            raise RecipeError("expert_min_tokens", self.expert_min_tokens, "expected a positive number of tokens")


def expert_hidden(module: nn.Module, x: torch.Tensor, experts: slice = slice(None)) -> torch.Tensor:
    """Each expert's hidden activation ``[e, T, I]`` on the tokens ``x [T, H]``, for the experts
    in ``experts``: what its ``down_proj`` reads, computed as the module computes it (its gate,
    its biases), in the module's dtype.

    Example::

        hidden = expert_hidden(model.model.layers[3].mlp.experts, tokens)   # [E, T, I]
    """
    first, _ = expert_weight_names(module)
    w = expert_matrix(module, first)[experts]
    projected = torch.matmul(x.to(w.dtype).unsqueeze(0), w.transpose(1, 2))
    bias = getattr(module, f"{first}_bias", None) if getattr(module, "has_bias", False) else None
    if bias is not None:
        projected = projected + bias[experts].unsqueeze(1)
    return expert_gate(module, projected)


def expert_chunk(module: nn.Module, tokens: int) -> int:
    """How many experts' hidden activations of ``tokens`` tokens one chunk holds."""
    first, _ = expert_weight_names(module)
    width = expert_matrix(module, first).shape[1]
    return max(1, CHUNK_ELEMENTS // max(1, tokens * width))


class ExpertObserver(Protocol):
    """What :func:`observe_experts` feeds: per call of the experts module, its input tokens
    ``x [T, H]`` and, under ``"routed"``, the routing mask ``routed [E, T]`` (``None`` under
    ``"all"``: every token counts for every expert)."""

    def observe(self, x: torch.Tensor, routed: torch.Tensor | None) -> None: ...


def routing_mask(top_k_index: torch.Tensor, experts: int) -> torch.Tensor:
    """``[E, T]`` booleans: which tokens the router sent to each expert (indices outside
    ``0..E-1``, expert-parallel sentinels, route nowhere).

    Example::

        >>> routing_mask(torch.tensor([[0, 2], [2, 1]]), 3).int().tolist()
        [[1, 0], [0, 1], [1, 1]]
    """
    index = top_k_index.reshape(top_k_index.shape[0], -1).long()
    mask = torch.zeros(index.shape[0], experts + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(1, index.clamp(0, experts).masked_fill(index < 0, experts), True)
    return mask[:, :experts].T


def observe_experts(work, names: list[str], make: Callable[[str], ExpertObserver],
                    mode: str = ALL) -> dict[str, ExpertObserver]:
    """Run the layer of ``work`` once over its calibration batches, feeding each named
    fused-experts module's input tokens (and, with ``mode = "routed"``, its routing) to its own
    observer; the layer's outputs are unchanged.

    Example::

        hessians = observe_experts(work, ["model.layers.3.mlp.experts"], lambda _n: ExpertHessians(...))
    """
    observers = {name: make(name) for name in names}
    hooks = []

    def hook(observer: ExpertObserver, experts: int):
        def pre(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            routed = None
            if mode == ROUTED:
                index = args[1] if len(args) > 1 else None
                if not isinstance(index, torch.Tensor) or index.is_floating_point():
                    raise ModelError(f"{type(_module).__name__} was called without the router's top-k expert "
                                     "indices as its second argument, so experts = \"routed\" cannot tell which "
                                     "tokens reach which expert; use experts = \"all\"")
                routed = routing_mask(index, experts)
            observer.observe(x, routed)
        return pre

    for name in names:
        module = work.layer.get_submodule(name[len(work.prefix) + 1:])
        hooks.append(module.register_forward_pre_hook(hook(observers[name], num_experts(module))))
    try:
        work.forward_all()
    finally:
        for handle in hooks:
            handle.remove()
    work.combine(observers.values())
    return observers


class ExpertHessians:
    """``H_e = 2/n_e Σ xᵀx`` per expert of one fused weight, accumulated with batched matmuls.

    ``shared=True`` (the first weight under ``"all"``): every expert reads the same tokens, so
    one ``[in, in]`` matrix stands for all of them. Otherwise ``[E, in, in]``, each over its
    own tokens (``routed`` masks). Token rows holding NaN or inf are dropped and counted.

    Example::

        >>> h = ExpertHessians(2, 3, shared=False, device=torch.device("cpu"))
        >>> h.observe(torch.ones(4, 3), experts=slice(None), routed=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).bool())
        >>> h.tokens.tolist(), h.matrices()[0].diagonal().tolist()
        ([2, 0], [2.0, 2.0, 2.0])
    """

    def __init__(self, experts: int, columns: int, *, shared: bool, device: torch.device):
        self.experts, self.shared = experts, shared
        self.sums = torch.zeros(1 if shared else experts, columns, columns, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(experts, dtype=torch.long, device=device)
        self.dropped = torch.zeros((), dtype=torch.long, device=device)

    def observe(self, x: torch.Tensor, *, experts: slice, routed: torch.Tensor | None) -> None:
        """Fold tokens in: ``x [T, in]`` read by every expert of ``experts``, or ``x [e, T, in]``
        one slice per expert; ``routed [e, T]`` (``None``: all tokens count)."""
        x = x.detach().to(self.sums.device, torch.float32)
        finite = torch.isfinite(x).all(-1)  # [T] or [e, T]
        if not bool(finite.all()):
            self.dropped += (~finite).sum()
            x = torch.where(finite.unsqueeze(-1), x, torch.zeros((), device=x.device))
        weight = finite.float() if routed is None else finite.float() * routed.to(x.device).float()
        if self.shared:  # x [T, in], every expert: one matrix
            xw = x * weight.unsqueeze(-1)
            self.sums[0].addmm_(xw.T, x)
            self.tokens += weight.sum().long()
            return
        xs = x.unsqueeze(0) if x.dim() == 2 else x
        if weight.dim() == 1:
            weight = weight.expand(self.tokens[experts].numel(), -1)
        self.sums[experts].baddbmm_((xs * weight.unsqueeze(-1)).transpose(1, 2), xs.expand(weight.shape[0], -1, -1))
        self.tokens[experts] += weight.sum(-1).long()

    def combine(self, ranks) -> None:
        ranks.reduce(self, sums="sum", tokens="sum", dropped="sum")

    def subset(self, experts: slice) -> "ExpertHessians":
        """These Hessians for ``experts`` only (views: nothing is copied)."""
        part = copy.copy(self)
        part.experts = experts.stop - experts.start
        part.sums = self.sums if self.shared else self.sums[experts]
        part.tokens = self.tokens[experts]
        return part

    def matrices(self) -> torch.Tensor:
        """The mean Hessians ``[E or 1, in, in]`` (zero for an expert that saw nothing)."""
        count = self.tokens[:1] if self.shared else self.tokens
        return self.sums * (2.0 / count.clamp_min(1).float()).view(-1, 1, 1)


class WeightInputs:
    """An :class:`ExpertObserver` that feeds what one fused weight of ``module`` reads to
    ``sink.observe(x, experts=..., routed=...)``: the experts' input tokens for the first weight
    (one tensor for all experts), each expert's hidden activation for ``down_proj`` (chunks of
    experts, computed with the module's weights as they are now).

    Example::

        observe_experts(work, [name], lambda _n: WeightInputs(module, "down_proj", ExpertHessians(...)))
    """

    def __init__(self, module: nn.Module, name: str, sink):
        self.module, self.sink = module, sink
        self.first = name == expert_weight_names(module)[0]

    def observe(self, x: torch.Tensor, routed: torch.Tensor | None) -> None:
        if self.first:
            self.sink.observe(x, experts=slice(None), routed=routed)
            return
        total, step = num_experts(self.module), expert_chunk(self.module, x.shape[0])
        for start in range(0, total, step):
            chunk = slice(start, min(start + step, total))
            self.sink.observe(expert_hidden(self.module, x, chunk), experts=chunk,
                              routed=None if routed is None else routed[chunk])

    def combine(self, ranks) -> None:
        self.sink.combine(ranks)


class InputRanges:
    """An :class:`ExpertObserver` that calibrates the quantized inputs of both fused weights, one
    range each across the experts (:meth:`qframe.experts.QuantExperts.set_input_range`): the
    experts' input tokens for the first weight, every expert's hidden activations for
    ``down_proj`` — under ``"routed"`` only the tokens each expert is sent.

    Example::

        ranges = observe_experts(work, [name], lambda _n: InputRanges(module, make_calibrator))[name]
        ranges.apply()
    """

    def __init__(self, module: nn.Module, make: Callable[[], "object"]):
        self.module = module
        self.first, self.second = expert_weight_names(module)
        self.calibrators = {self.first: make(), self.second: make()}

    def observe(self, x: torch.Tensor, routed: torch.Tensor | None) -> None:
        self.calibrators[self.first].observe(x if routed is None else x[routed.any(0)])
        total, step = num_experts(self.module), expert_chunk(self.module, x.shape[0])
        for start in range(0, total, step):
            chunk = slice(start, min(start + step, total))
            hidden = expert_hidden(self.module, x, chunk)
            self.calibrators[self.second].observe(hidden.reshape(-1, hidden.shape[-1]) if routed is None
                                                  else hidden[routed[chunk]])

    def combine(self, ranks) -> None:
        for name in (self.first, self.second):
            self.calibrators[name].combine(ranks)

    def apply(self, quantized: nn.Module | None = None) -> None:
        """Set the input scales of ``quantized`` (default: the observed module itself) from what
        was observed."""
        for name, calibrator in self.calibrators.items():
            target = self.module if quantized is None else quantized
            target.set_input_range(name, *calibrator.compute())


def expert_input_ranges(work, name: str, module: nn.Module, make: Callable[[], "object"],
                        mode: str = ALL) -> InputRanges:
    """Observe the inputs of both weights of the fused-experts ``module`` (``name``, a full name)
    on ``work``'s calibration batches with fresh calibrators from ``make``: one pass. The hidden
    activations are computed with ``module``'s weights as they are now, so observing the float
    experts and applying the ranges to their quantized module calibrates them as linears are
    (on the float layer's activations).

    Example::

        ranges = expert_input_ranges(work, name, module, lambda: self.calibrator(acts))
        ranges.apply(QuantExperts.quantize(module, weights, "minmax", acts))
    """
    return observe_experts(work, [name], lambda _n: InputRanges(module, make), mode)[name]


def calibrate_expert_inputs(work, name: str, module: nn.Module, make: Callable[[], "object"], mode: str = ALL) -> None:
    """Calibrate the static input scales of the quantized experts ``module`` (``name``, a full
    name) on ``work``'s calibration batches, through its weights as they will be served.

    Example::

        calibrate_expert_inputs(work, name, quantized, lambda: self.calibrator(self.scheme.activations))
    """
    expert_input_ranges(work, name, module, make, mode).apply()
