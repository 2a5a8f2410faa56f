"""Calibration across processes: ``torchrun --nproc-per-node N -m qframe apply RECIPE``.

Inside an initialized ``torch.distributed`` process group of more than one process, every
rank holds the whole model and a share of the calibration batches (:meth:`Ranks.share`, in
order: rank 0 the first ones). Each decoder layer runs on every rank over its own share; what
the quantizers observe is combined across ranks before they use it, so every rank takes the
same decisions and ends with the same quantized model:

- each observer says how its state combines, in a method ``combine(ranks)``, usually one call
  of :meth:`Ranks.reduce` naming its tensors and how they reduce (min/max ranges, summed Gram
  matrices and Hessians, summed candidate losses); histograms merge onto one span;
- GPTQ rounds the rows of each weight on all ranks at once (:meth:`Ranks.split`, GPTQ rounds
  rows independently given the Hessian) and gathers them (:meth:`Ranks.gather_rows`);
- a check on data (NaN or inf in a layer's outputs) is agreed on (:meth:`Ranks.any`), so every
  rank raises the same error at the same point;
- rank 0 writes the outputs; each rank keeps the resume inputs of its own share.

A collective that fails because another rank died (killed, out of memory, a bug) raises
:class:`RankFailure` on the ranks left: the run stops on every rank, the finished layers stay
for ``--resume``, nothing unfinished is put in place.

A calibrator or observer written for one process combines across ranks once it says how::

    class AbsMax(Calibrator):
        def combine(self, ranks):
            ranks.reduce(self, amax="max")

Example (a single process: no ranks, nothing to combine)::

    >>> Ranks.current() is None
    True
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import QFrameError

OPS = ("sum", "min", "max")


class RankFailure(QFrameError):
    """Another rank stopped (it died, or raised): this rank cannot go on. Not the user's input:
    the finished layers are kept for ``--resume``."""

    resumable = True


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group, and the collectives qframe uses.

    Built by :meth:`current` from the initialized default group; ``None`` there means a single
    process (nothing to combine). Collectives run on ``device`` (the current CUDA device under
    NCCL, the CPU under gloo) and raise :class:`RankFailure` when another rank is gone.
    """

    rank: int
    size: int
    device: torch.device

    @classmethod
    def current(cls) -> "Ranks | None":
        """The default process group's ranks, or ``None`` without one (or with one process)."""
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return None
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def writer(self) -> bool:
        """Whether this rank writes the outputs (rank 0)."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's share of ``count`` items, in order: as even as can be, the first ranks
        taking one more.

        Example::

            >>> [list(Ranks(r, 3, torch.device("cpu")).share(7)) for r in range(3)]
            [[0, 1, 2], [3, 4], [5, 6]]
        """
        return split(count, self.size)[self.rank]

    def split(self, count: int) -> list[range]:
        """Every rank's share of ``count`` items (:meth:`share` for each rank)."""
        return split(count, self.size)

    # -- collectives ---------------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo: "Connection closed by peer"; NCCL: DistBackendError (a RuntimeError)
            raise RankFailure(
                f"rank {self.rank} of {self.size}: {what} failed because another rank stopped (it was killed or "
                f"raised an error: see that rank's output). The run stops on every rank; finished layers are kept: "
                f"the same command with --resume continues from there. ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None

    def all_reduce(self, tensors: list[torch.Tensor], op: str) -> list[torch.Tensor]:
        """``tensors`` reduced elementwise over the ranks (``op``: sum, min or max), each as it
        came (dtype, device): one collective per dtype, the tensors flattened into one buffer.

        Example::

            reduced = ranks.all_reduce([hessian_sum, token_count], "sum")
        """
        dist = torch.distributed
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        for dtype, indices in by_dtype.items():
            wire = torch.bool if dtype == torch.bool else dtype
            flat = torch.cat([tensors[i].detach().reshape(-1).to(self.device, wire) for i in indices])
            if dtype == torch.bool:  # gloo and NCCL reduce integers, not booleans
                flat = flat.to(torch.uint8)
            self._call(f"combining statistics ({op})", dist.all_reduce, flat, op=reduce_op)
            start = 0
            for i in indices:
                t = tensors[i]
                out[i] = flat[start:start + t.numel()].view(t.shape).to(t.device, dtype)
                start += t.numel()
        return out  # type: ignore[return-value]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small, picklable), in rank order."""
        gathered: list[Any] = [None] * self.size
        self._call("exchanging state", torch.distributed.all_gather_object, gathered, value)
        return gathered

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``tensor`` as rank ``src`` holds it, on every rank (same shape and dtype everywhere)."""
        wire = tensor.detach().to(self.device).contiguous()
        self._call("broadcasting results", torch.distributed.broadcast, wire, src)
        return wire.to(tensor.device)

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` (small, picklable), on every rank."""
        box = [value]
        self._call("exchanging state", torch.distributed.broadcast_object_list, box, src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank is here (or raise :class:`RankFailure` when one never comes)."""
        self.all_reduce([torch.zeros(1)], "sum")

    def abort(self) -> None:
        """Leave the process group after a failure, so that ranks waiting on this one fail at
        once (gloo closes its connections) instead of at the group's timeout."""
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()

    @contextlib.contextmanager
    def stopping_together(self) -> Iterator[None]:
        """Any exception inside leaves the process group (:meth:`abort`) before it propagates:
        the other ranks then stop with :class:`RankFailure` rather than wait.

        Example::

            with ranks.stopping_together():
                run_pipeline(...)
        """
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def any(self, flag: bool | torch.Tensor) -> bool:
        """Whether ``flag`` is true on any rank (a check every rank acts on together)."""
        value = flag.detach().reshape(()).to(torch.uint8) if isinstance(flag, torch.Tensor) else torch.tensor(int(flag))
        return bool(self.all_reduce([value.to(torch.uint8)], "max")[0])

    def gather_rows(self, local: torch.Tensor, counts: list[int], dim: int = 0) -> torch.Tensor:
        """Every rank's ``local`` block concatenated along ``dim`` in rank order; rank ``r``'s
        block has ``counts[r]`` rows there (padded on the wire to the largest).

        Example::

            weight = ranks.gather_rows(my_rows, [len(s) for s in ranks.split(out_features)])
        """
        moved = local.detach().movedim(dim, 0)
        widest = max(counts)
        wire = torch.zeros((widest, *moved.shape[1:]), dtype=moved.dtype, device=self.device)
        wire[: moved.shape[0]] = moved.to(self.device)
        parts = [torch.empty_like(wire) for _ in range(self.size)]
        self._call("gathering results", torch.distributed.all_gather, parts, wire)
        whole = torch.cat([p[:n] for p, n in zip(parts, counts)])
        return whole.to(local.device).movedim(0, dim).contiguous()

    def reduce(self, owner: Any, **ops: str) -> None:
        """Replace attributes of ``owner`` by their reduction over the ranks: each keyword names
        an attribute and its op (sum, min, max). An attribute may be a tensor, a number, or
        ``None`` on ranks that observed nothing (those take the others' value; ``None``
        everywhere stays ``None``). One exchange of shapes, then one collective per op and dtype.

        Example::

            class MinMax(Calibrator):
                def combine(self, ranks):
                    ranks.reduce(self, lo="min", hi="max")
        """
        for op in ops.values():
            if op not in OPS:
                raise ValueError(f"unknown reduction {op!r}; allowed: {', '.join(OPS)}")
        values = {name: getattr(owner, name) for name in ops}
        shapes = {name: _signature(v) for name, v in values.items()}
        seen = self.all_gather_object(shapes)
        for name, op in ops.items():
            kinds = [s[name] for s in seen if s[name] is not None]
            if not kinds:
                continue
            if kinds[0][0] == "number":
                numbers = [s[name][1] for s in seen if s[name] is not None]
                setattr(owner, name, {"sum": sum, "min": min, "max": max}[op](numbers))
                values.pop(name)
                continue
            if values[name] is None:  # nothing observed here: the op's identity, shaped like the others'
                _, shape, dtype = kinds[0]
                values[name] = torch.full(shape, _identity(op, dtype), dtype=dtype, device=self.device)
        for op in OPS:
            names = [n for n, o in ops.items() if o == op and isinstance(values.get(n), torch.Tensor)]
            if names:
                for name, reduced in zip(names, self.all_reduce([values[n] for n in names], op)):
                    setattr(owner, name, reduced)


def split(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into ``parts`` consecutive ranges, as even as can be.

    Example::

        >>> split(5, 2)
        [range(0, 3), range(3, 5)]
    """
    base, extra = divmod(count, parts)
    bounds = [0]
    for r in range(parts):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def spread(ranks: Ranks | None, count: int, compute: Callable[[slice], Any], dim: int = 0) -> Any:
    """``compute(slice(0, count))`` with the work shared across ``ranks``: each rank computes its
    share of the ``count`` items (a slice) and every rank gets the results (a tensor, or a tuple
    of tensors, ``count`` long along ``dim``) concatenated in order. For work whose items are
    independent (candidates scored, rows rounded). A single process, or fewer items than ranks,
    computes all of them.

    Example::

        >>> spread(None, 4, lambda part: torch.arange(4)[part] * 2).tolist()
        [0, 2, 4, 6]
    """
    if ranks is None or count < ranks.size:
        return compute(slice(0, count))
    shares = ranks.split(count)
    part = compute(slice(shares[ranks.rank].start, shares[ranks.rank].stop))
    counts = [len(s) for s in shares]
    if isinstance(part, tuple):
        return tuple(ranks.gather_rows(t, counts, dim) for t in part)
    return ranks.gather_rows(part, counts, dim)


def _signature(value: Any) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (int, float)):
        return ("number", value)
    raise TypeError(f"cannot reduce a {type(value).__name__} across ranks")


def _identity(op: str, dtype: torch.dtype) -> float | int | bool:
    if op == "sum":
        return 0
    if dtype == torch.bool:
        return op == "min"
    if dtype.is_floating_point:
        return float("inf") if op == "min" else float("-inf")
    info = torch.iinfo(dtype)
    return info.max if op == "min" else info.min


def combine(observers: Iterable[Any], ranks: Ranks | None) -> None:
    """Combine each observer's state across ``ranks`` (its ``combine(ranks)``), each once, in
    the order given (the same on every rank); nothing without ranks. An observer that does not
    say how is a :class:`QFrameError` naming its class, before any collective.

    Example::

        combine(calibrators.values(), work.ranks)
    """
    if ranks is None:
        return
    unique = list({id(o): o for o in observers}.values())
    for observer in unique:
        if not callable(getattr(observer, "combine", None)):
            raise QFrameError(f"{type(observer).__name__} observed calibration data on one rank of {ranks.size} but "
                              "does not say how its statistics combine across ranks: give it a method "
                              "combine(ranks) (see qframe.distributed), or run in one process")
    for observer in unique:
        observer.combine(ranks)


def init_from_environment(device: str | None = None) -> Ranks | None:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1 and
    no group yet): NCCL with one CUDA device per local rank when CUDA is present and ``device``
    (the run's ``--device``) is not the CPU, gloo otherwise. Returns the ranks, or ``None`` for
    a single process.

    Example::

        >>> init_from_environment() is None   # not under torchrun
        True
    """
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not dist.is_available():
        return Ranks.current()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and not str(device or "").startswith("cpu")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise QFrameError(f"local rank {local} has no CUDA device of its own (this machine has "
                                  f"{torch.cuda.device_count()}): start at most that many processes per node")
            torch.cuda.set_device(local)
        minutes = float(os.environ.get("QFRAME_RANK_TIMEOUT_MINUTES", "30"))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    return Ranks.current()
