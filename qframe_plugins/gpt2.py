"""GPT-2: ``transformer.h`` blocks whose projections are transformers' ``Conv1D`` (weight stored
``[in, out]``); :meth:`GPT2Family.prepare` turns them into equivalent ``nn.Linear`` first.

The attention's ``c_attn`` is a fused q/k/v projection, so there is no v → o group
(``kv_cache`` quantizes the cache at the ``attn`` module, where keys and values are apart);
``c_fc → c_proj`` crosses a GELU, so no group either.
"""

from __future__ import annotations

import torch
from torch import nn

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup


def conv1d_to_linear(root: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` under ``root`` by an exactly equivalent
    ``nn.Linear`` (``y = x W + b`` with ``W`` of shape ``[in, out]`` becomes ``x Wᵀ' + b``), in
    place; return how many were replaced.

    Example::

        >>> from transformers.pytorch_utils import Conv1D
        >>> block = nn.Sequential(Conv1D(4, 3))
        >>> conv1d_to_linear(block), type(block[0]).__name__, tuple(block[0].weight.shape)
        (1, 'Linear', (4, 3))
    """
    from transformers.pytorch_utils import Conv1D

    found = [(name, m) for name, m in root.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, linear)
    return len(found)


class GPT2Family(Architecture):
    """GPT-2 decoder blocks (``transformer.h``), learned absolute positions (``wpe``)."""

    layers_path = "transformer.h"
    pre_layer_paths = ("transformer.wte", "transformer.wpe")
    attention_path = "attn"
    smoothing_groups = (
        SmoothingGroup("ln_1", ("attn.c_attn",)),
        SmoothingGroup("ln_2", ("mlp.c_fc",)),
    )

    def prepare(self, model: nn.Module) -> None:
        """Turn the decoder blocks' ``Conv1D`` projections into ``nn.Linear`` (exactly)."""
        conv1d_to_linear(self.decoder_layers(model))


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="gpt2", summary="GPT-2 blocks (Conv1D projections become nn.Linear)",
                             factory=GPT2Family, model_types=("gpt2",))
