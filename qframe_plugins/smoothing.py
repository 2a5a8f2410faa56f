"""Smoothing scales, shared by the ``smoothquant`` and ``awq`` quantizers (a helper module,
not a plugin).

A :class:`~qframe.model.SmoothingGroup` is a producer (a norm or a linear) and the linears
that read its output ``X``. A smoothing scale ``s > 0`` per input channel moves magnitude
between the two: the consumers' weight columns are multiplied by ``s`` and their input
divided by it. The division is *folded* into the producer's output channels when that is
exact (:func:`active_groups` decides); otherwise each consumer keeps ``1 / s`` as its
``input_prescale`` once quantized (TensorRT-LLM's ``prequant_scaling_factor``).

Example::

    groups = active_groups(work, targets)
    stats = work.observe_inputs([g.names[0] for g in groups], lambda _name: ChannelStats())
    for g in groups:
        apply_scale(work, g, smoothquant_scale(stats[g.names[0]].amax, g.weight_amax(), 0.5), pending={})
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from qframe import numerics
from qframe.calibrate import add_gram
from qframe.experts import expert_matrix, expert_weight_names, is_fused_experts
from qframe.qlinear import QuantLinear
from qframe.scheme import QuantArgs

# Statistics below this count as zero: such channels keep s = 1 (nothing to migrate).
TINY = 1e-5
# Precompute every candidate's quantized weights when they fit in this many bytes.
CANDIDATE_BYTES = 1 << 29
# Activations are turned into float32 statistics this many elements at a time (128 MiB).
CHUNK = 1 << 25


class ChannelStats:
    """Per input channel: min, max, max |x| and mean |x| over every token observed, NaN and
    inf ignored; with ``keep_tokens``, also a uniform subsample of at most that many token
    rows (non-finite values zeroed), in memory that does not grow with the stream; with
    ``gram``, the inputs' Gram matrix ``Σ xᵀx`` ``[in, in]`` (float32, non-finite values zeroed),
    from which every linear reading ``x`` has its squared output error for any weight change
    ``ΔW``: ``||x ΔWᵀ||² = tr(ΔW G ΔWᵀ)``, without the tokens.

    Example::

        >>> stats = ChannelStats(gram=True); stats.observe(torch.tensor([[1.0, 2.0], [3.0, float("nan")]]))
        >>> stats.gram.tolist(), stats.mean_abs.tolist()
        ([[10.0, 2.0], [2.0, 4.0]], [2.0, 2.0])
    """

    def __init__(self, keep_tokens: int = 0, gram: bool = False):
        self.keep_tokens, self.want_gram = keep_tokens, gram
        self.lo = self.hi = self.amax = self.abs_sum = self.count = None
        self.samples: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._seen, self._stride = 0, 1

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        for part in rows.split(max(1, CHUNK // rows.shape[1])):  # float32 copies of bounded size
            self._observe(part)

    def _observe(self, rows: torch.Tensor) -> None:
        finite = torch.isfinite(rows)
        clean = rows.masked_fill(~finite, 0.0)
        wide = clean.float()
        lo, hi, mag = wide.amin(0), wide.amax(0), wide.abs()
        if self.amax is None:
            self.lo, self.hi, self.amax = lo, hi, mag.amax(0)
            self.abs_sum, self.count = mag.sum(0), finite.sum(0)
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
            self.amax = torch.maximum(self.amax, mag.amax(0))
            self.abs_sum, self.count = self.abs_sum + mag.sum(0), self.count + finite.sum(0)
        del mag
        if self.keep_tokens:
            self._keep(wide)
        if self.want_gram:
            if self.gram is None:
                self.gram = torch.zeros(clean.shape[1], clean.shape[1], device=clean.device)
            add_gram(self.gram, clean)

    def combine(self, ranks) -> None:
        """Every rank's statistics (:mod:`qframe.distributed`): ranges and sums exactly; the
        token samples as one sample, evenly spread over all ranks' tokens in rank order."""
        ranks.reduce(self, lo="min", hi="max", amax="max", abs_sum="sum", count="sum", gram="sum")
        if not self.keep_tokens:
            return
        width = self.samples.shape[1] if self.samples is not None else None
        shared = ranks.all_gather_object((0 if self.samples is None else self.samples.shape[0], width,
                                          self._seen, self._stride))
        width = next((w for _, w, _, _ in shared if w is not None), None)
        if width is None:
            return
        device = self.samples.device if self.samples is not None else ranks.device
        samples = self.samples if self.samples is not None else torch.zeros(0, width, device=device)
        index = self._index if self._index is not None else torch.zeros(0, dtype=torch.long, device=device)
        offsets = torch.tensor([0] + [seen for _, _, seen, _ in shared], device=device).cumsum(0)
        counts = [n for n, _, _, _ in shared]
        kept = ranks.gather_rows(samples, counts)
        kept_index = ranks.gather_rows(index + offsets[ranks.rank], counts)
        self._stride = max(stride for _, _, _, stride in shared)
        take = kept_index % self._stride == 0
        kept, kept_index = kept[take], kept_index[take]
        while kept.shape[0] > self.keep_tokens:
            self._stride *= 2
            take = kept_index % self._stride == 0
            kept, kept_index = kept[take], kept_index[take]
        self.samples, self._index, self._seen = kept, kept_index, int(offsets[-1])

    def _keep(self, rows: torch.Tensor) -> None:
        # Keep tokens whose position in the stream is a multiple of the stride; when too many
        # are kept, double the stride. The sample stays evenly spread over all batches.
        index = self._seen + torch.arange(rows.shape[0], device=rows.device)
        self._seen += rows.shape[0]
        take = index % self._stride == 0
        kept, kept_index = rows[take], index[take]
        if self.samples is not None:
            kept, kept_index = torch.cat([self.samples, kept]), torch.cat([self._index, kept_index])
        while kept.shape[0] > self.keep_tokens:
            self._stride *= 2
            take = kept_index % self._stride == 0
            kept, kept_index = kept[take], kept_index[take]
        self.samples, self._index = kept, kept_index

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count.clamp_min(1)


@dataclass
class ActiveGroup:
    """A smoothing group as one stage sees it in one decoder layer."""

    names: list[str]  # full names of the consumers this stage quantizes
    linears: list[nn.Linear]
    others: list[nn.Linear] = field(default_factory=list)  # float consumers outside the targets
    producer: nn.Module | None = None  # where 1 / s folds; None: kept as an input prescale

    def weight_amax(self) -> torch.Tensor:
        """max |W| per input channel over every consumer."""
        return torch.stack([m.weight.detach().float().abs().amax(0) for m in self.linears + self.others]).amax(0)


def active_groups(work, targets: list[tuple[str, nn.Module]]) -> list[ActiveGroup]:
    """The layer's smoothing groups that hold at least one of ``targets``, in the
    architecture's order. A group folds its scale into the producer only when that is exact:
    the producer is not quantized yet and the adapter can fold that many channels into it
    (:meth:`qframe.model.Architecture.can_fold`: not GQA's narrower ``v_proj`` in front of
    ``o_proj``), and every consumer reading that output is a float ``nn.Linear`` (so all of
    them can take ``W · s``)."""
    chosen = dict(targets)
    found = []
    for group in getattr(work.arch, "smoothing_groups", ()):
        members = [(f"{work.prefix}.{c}", submodule(work.layer, c)) for c in group.consumers]
        if any(m is None for _, m in members) or not any(n in chosen for n, _ in members):
            continue
        active = ActiveGroup([n for n, _ in members if n in chosen], [m for n, m in members if n in chosen],
                             [m for n, m in members if n not in chosen])
        producer = submodule(work.layer, group.producer)
        if (all(isinstance(m, nn.Linear) for m in active.others) and producer is not None
                and not isinstance(producer, QuantLinear) and work.arch.can_fold(producer, active.linears[0].in_features)):
            active.producer = producer
        found.append(active)
    return found


def submodule(layer: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name`` of ``layer``, or ``None`` where the layer has none."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    """``W <- W · diag(scale)``: the consumer's side of smoothing."""
    with torch.no_grad():
        linear.weight.mul_(scale.to(linear.weight.device, linear.weight.dtype))


def apply_scale(work, group: ActiveGroup, scale: torch.Tensor, pending: dict[str, torch.Tensor]) -> bool:
    """Smooth ``group`` by ``scale``. Folded: every consumer's columns times ``scale``, the
    producer's output channels times ``1 / scale`` (the layer computes the same function).
    Otherwise nothing changes yet: ``pending[name] = scale`` for each target consumer, for
    the quantizer to apply to the weight and keep as a prescale when it quantizes it.
    Returns whether the scale was folded."""
    if group.producer is None:
        pending.update({name: scale for name in group.names})
        return False
    for linear in group.linears + group.others:
        scale_columns(linear, scale)
    work.arch.fold_scale(group.producer, 1.0 / scale)
    return True


def smoothquant_scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|x|^alpha / max|w|^(1 - alpha)``; channels whose activations or
    weights are all zero keep ``s = 1``.

    Example::

        >>> smoothquant_scale(torch.tensor([16.0, 0.0]), torch.tensor([1.0, 1.0]), 0.5).tolist()
        [4.0, 1.0]
    """
    x_amax, w_amax = x_amax.float(), w_amax.float().to(x_amax.device)
    s = x_amax.clamp_min(TINY).pow(alpha) / w_amax.clamp_min(TINY).pow(1 - alpha)
    return torch.where((x_amax > TINY) & (w_amax > TINY), s, torch.ones_like(s))


def fake_quantize_weight(w: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    """``w`` rounded to ``args``' grid with min/max ranges, dequantized (float32)."""
    return w.float() if args is None else numerics.quantize_weight(w, args).dequantize()


# Elements of one [tokens, out] output block scored at once (128 MiB in float32).
OUTPUT_ELEMENTS = 1 << 25


class CandidateLoss:
    """An observer that scores smoothing scales on calibration data, streaming: for each
    candidate ``s_c`` (a row of ``scales``) it accumulates
    ``sum_j ||A_c(x / s_c) · Q(W_j · s_c)ᵀ − x · W_jᵀ||²`` over every batch, where ``Q``
    rounds weights to ``weight_args`` (none: exact) and ``act(x, c)`` quantizes the
    smoothed input (none: exact). Nothing but the losses is kept between batches.

    Example::

        loss = CandidateLoss([q.weight, k.weight], torch.stack([ones, s]), QuantArgs(bits=4))
        loss.observe(x); best = int(loss.loss.argmin())
    """

    def __init__(self, weights: list[torch.Tensor], scales: torch.Tensor, weight_args: QuantArgs | None,
                 act: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        self.weights = [w.detach() for w in weights]
        self.reference = torch.cat([w.to(self.dtype) for w in self.weights])
        self.scales, self.weight_args, self.act = scales.float(), weight_args, act
        self.loss = torch.zeros(scales.shape[0], device=scales.device, dtype=torch.float64)
        self.energy = torch.zeros((), device=scales.device, dtype=torch.float64)  # sum ||x Wᵀ||²
        size = scales.shape[0] * self.reference.numel() * self.dtype.itemsize
        self._cached = [self._quantized(c) for c in range(scales.shape[0])] if size <= CANDIDATE_BYTES else None

    def _quantized(self, c: int) -> torch.Tensor:
        # Each consumer apart: per-tensor weight ranges must not span two consumers.
        # Cast each consumer as it is done: float32 temporaries of one consumer at a time.
        return torch.cat([fake_quantize_weight(w.float() * self.scales[c], self.weight_args).to(self.dtype)
                          for w in self.weights])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype products are computed in: the model's 16-bit dtype on CUDA, where that
        is what the layer itself computes in and float32 matmuls are many times slower;
        float32 elsewhere. Losses are always summed in float32 and up."""
        w = self.weights[0]
        return w.dtype if w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) else torch.float32

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
        dtype = self.dtype
        # Outputs [tokens, out] are the big temporaries: score a few thousand tokens at a time.
        parts = x.split(max(1, OUTPUT_ELEMENTS // self.reference.shape[0]))
        references = []  # in the compute dtype: the float32 ones would double this memory
        for part in parts:
            references.append(part.to(dtype) @ self.reference.T)
            self.energy += references[-1].float().square().sum().double()
        for c in range(self.scales.shape[0]):  # ~20 candidates; every token of a part at once
            weight = self._cached[c] if self._cached is not None else self._quantized(c)
            for part, reference in zip(parts, references):
                smoothed = part.float() / self.scales[c]
                if self.act is not None:
                    smoothed = self.act(smoothed, c)
                out = (smoothed.to(dtype) @ weight.T).float()
                self.loss[c] += out.sub_(reference.float()).square_().sum().double()

    def combine(self, ranks) -> None:
        ranks.reduce(self, loss="sum", energy="sum")

    def relative_loss(self, c: int) -> float:
        """Candidate ``c``'s loss relative to the energy of the float outputs."""
        return float(self.loss[c] / self.energy.clamp_min(1e-30))




# -- mixtures of experts: the sparse block's input and each expert's up -> down -----------------

def expert_group(work, name: str, module: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]] | None:
    """The norm in front of the sparse block whose fused experts ``module`` (full name ``name``)
    are, and every other module reading its output (router, shared expert, its gate), by name
    relative to the layer, from the adapter's ``expert_groups``; ``None`` where no group names
    these experts or folding would not be exact here (a reader missing, quantized already, or
    not a float ``weight [out, in]``; a producer that cannot take the scale)."""
    relative = name[len(work.prefix) + 1:]
    for group in getattr(work.arch, "expert_groups", ()):
        if relative not in group.consumers:
            continue
        readers = {c: submodule(work.layer, c) for c in group.consumers if c != relative}
        producer = submodule(work.layer, group.producer)
        width = expert_matrix(module, expert_weight_names(module)[0]).shape[2]
        if (producer is not None and not isinstance(producer, QuantLinear) and work.arch.can_fold(producer, width)
                and all(_float_reader(r) for r in readers.values())):
            return producer, readers
    return None


def _float_reader(module: nn.Module | None) -> bool:
    w = getattr(module, "weight", None)
    return (not isinstance(module, QuantLinear) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.is_floating_point())


def fold_block_input(work, producer: nn.Module, readers: list[nn.Module], scale: torch.Tensor) -> None:
    """Fold ``1 / scale`` into the sparse block's norm and ``scale`` into the input channels of
    every reader: a linear's or router's ``weight [out, in]`` columns, the fused experts' first
    weight ``[E, out, in]``. The layer computes the same function, routing included."""
    work.arch.fold_scale(producer, 1.0 / scale)
    for module in readers:
        w = expert_matrix(module, expert_weight_names(module)[0]) if is_fused_experts(module) else module.weight
        with torch.no_grad():
            w.mul_(scale.to(w.device, w.dtype))


def concatenated_gate(module: nn.Module) -> bool:
    """Whether fused experts compute ``act(gate) · up`` on ``[gate; up]`` halves of
    ``gate_up_proj`` (transformers' default gate): then scaling ``up``'s rows by ``1 / s``
    divides ``down_proj``'s input by ``s`` exactly. Not gpt-oss's interleaved, clamped
    ``(up + 1) · glu``."""
    if not getattr(module, "has_gate", True) or not getattr(module, "is_concatenated", True):
        return False
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None:
        return "act_fn" in vars(module).get("_modules", {})
    from transformers.integrations.moe import _default_apply_gate

    return inspect.unwrap(gate) is _default_apply_gate


def fold_up_down(module: nn.Module, scale: torch.Tensor) -> None:
    """Each expert's up → down smoothing, ``scale [E, I]``: ``up``'s rows (the second half of
    ``gate_up_proj``'s) times ``1 / s``, ``down_proj``'s columns times ``s`` (exact where
    :func:`concatenated_gate`)."""
    gate_up, down = expert_matrix(module, "gate_up_proj"), expert_matrix(module, "down_proj")
    inner = down.shape[2]
    with torch.no_grad():
        gate_up[:, inner:].mul_((1.0 / scale).unsqueeze(-1).to(gate_up.dtype))
        down.mul_(scale.unsqueeze(1).to(down.dtype))
