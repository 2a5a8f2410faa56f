"""Perplexity on held-out text.

Example::

    >>> result = qframe.evaluate(qmodel, dataset="text:held_out.txt", seq_len=512)  # doctest: +SKIP
    >>> round(result.perplexity, 2)                                                  # doctest: +SKIP
    17.03
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import TokenWindows


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


def perplexity(model: nn.Module, windows: TokenWindows, device: torch.device, batch_size: int = 4) -> EvalResult:
    """exp(mean next-token negative log-likelihood) over every window, on ``device``."""
    started = time.perf_counter()
    home = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in windows.batches(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
                )
                total += float(loss)
                count += batch[:, 1:].numel()
    finally:
        model.to(home)
    return EvalResult(
        perplexity=math.exp(total / count) if total / count < 709 else math.inf,  # exp overflows past 709
        tokens=count,
        windows=windows.ids.shape[0],
        seq_len=windows.ids.shape[1],
        sha256=windows.sha256,
        seconds=round(time.perf_counter() - started, 3),
    )
