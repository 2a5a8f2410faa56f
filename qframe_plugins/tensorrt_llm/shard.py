"""Split a checkpoint's tensors across TensorRT-LLM's tensor- and pipeline-parallel ranks.

Rank ``r`` is tensor-parallel rank ``r % tp_size`` of pipeline stage ``r // tp_size``.
Column-parallel linears (qkv, fc, gate) and lm_head split their output rows (lm_head padded
with zero rows to a multiple of ``tp_size``); row-parallel ones (dense, proj) split their
input columns, and their per-row tensors and biases are replicated. A fused qkv is split per
part, by head, and each rank's q, k and v rows concatenated again; when there are fewer
key/value heads than ranks, each head goes to ``tp_size / heads`` consecutive ranks. A
stage holds its own decoder layers, renumbered from 0; the first stage holds the embeddings,
the last the final norm and lm_head.

Example::

    >>> import torch
    >>> from qframe_plugins.tensorrt_llm.convert import Piece
    >>> ranks = shard({"w": Piece([torch.arange(4.0).reshape(4, 1)], 0, "column", 0, 1)}, 2, 1, 1)
    >>> [r["w"].flatten().tolist() for r in ranks]
    [[0.0, 1.0], [2.0, 3.0]]
"""

from __future__ import annotations

import re

import torch

from .convert import Piece

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


def _split_part(t: torch.Tensor, dim: int, heads: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    if heads is not None and heads < tp_size:  # duplicated key/value heads
        return t.chunk(heads, dim)[tp_rank * heads // tp_size]
    return t.chunk(tp_size, dim)[tp_rank]


def _for_rank(piece: Piece, tp_rank: int, tp_size: int) -> torch.Tensor:
    parts = piece.parts
    if piece.parallel == "vocab":
        t = parts[0]
        pad = -t.shape[0] % tp_size
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        value = t.chunk(tp_size, 0)[tp_rank]
    elif piece.parallel == "column" and piece.out_dim is not None:
        heads = piece.heads or [None] * len(parts)
        value = torch.cat([_split_part(t, piece.out_dim, h, tp_rank, tp_size) for t, h in zip(parts, heads)],
                          piece.out_dim)
    elif piece.parallel == "row" and piece.in_dim is not None:
        value = torch.cat(parts, piece.out_dim or 0) if len(parts) > 1 else parts[0]
        value = value.chunk(tp_size, piece.in_dim)[tp_rank]
    else:
        value = torch.cat(parts, piece.out_dim) if len(parts) > 1 else parts[0]
    value = piece.encode(value) if piece.encode is not None else value
    # No copy: the rank's tensor may be a view of the model's (a 1 GB lm_head at tp_size 1);
    # the spool writes views as they are.
    return value.contiguous()


def shard(pieces: dict[str, Piece], tp_size: int, pp_size: int, num_layers: int) -> list[dict[str, torch.Tensor]]:
    """The tensors of every rank, in rank order (``tp_size * pp_size`` of them), with layer
    indices local to each pipeline stage."""
    per_stage = num_layers // pp_size
    ranks = []
    for rank in range(tp_size * pp_size):
        tp_rank, pp_rank = rank % tp_size, rank // tp_size
        first, last = pp_rank * per_stage, (pp_rank + 1) * per_stage
        tensors = {}
        for name, piece in pieces.items():
            stage = piece.stage
            if stage == "first" and pp_rank != 0 or stage == "last" and pp_rank != pp_size - 1:
                continue
            if isinstance(stage, int):
                if not first <= stage < last:
                    continue
                name = _LAYER.sub(f"transformer.layers.{stage - first}.", name)
            tensors[name] = _for_rank(piece, tp_rank, tp_size)
        ranks.append(tensors)
    return ranks
