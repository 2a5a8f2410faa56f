"""Phi-3 (and Phi-3.5, Phi-4 mini): Llama-like layers with a fused ``qkv_proj`` and a fused
``gate_up_proj`` whose first half is the gate and second half the up-projection.

``gate_up_proj → down_proj`` is exact when the scale goes into the *up* half only, which is
what :meth:`Phi3Family.fold_scale` does for that producer. The fused ``qkv_proj`` means no
v → o group; ``kv_cache`` quantizes the cache at the attention (``self_attn``), after RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup


class Phi3Family(Architecture):
    """Phi-3 decoder layers (``model.layers``), rotary embeddings in ``model.rotary_emb``."""

    layers_path = "model.layers"
    pre_layer_paths = ("model.embed_tokens", "model.rotary_emb")
    attention_path = "self_attn"
    smoothing_groups = (
        SmoothingGroup("input_layernorm", ("self_attn.qkv_proj",)),
        SmoothingGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        SmoothingGroup("mlp.gate_up_proj", ("mlp.down_proj",)),
    )

    def can_fold(self, producer: nn.Module, channels: int) -> bool:
        fused = isinstance(producer, nn.Linear) and producer.out_features == 2 * channels
        return fused or super().can_fold(producer, channels)

    def fold_scale(self, producer: nn.Module, scale: torch.Tensor) -> None:
        """As :meth:`Architecture.fold_scale`; for the fused ``gate_up_proj`` (twice as many
        output rows as ``scale``) only the up half's rows, since ``down`` reads ``up * act(gate)``.

        Example::

            >>> fused = nn.Linear(1, 4, bias=False); _ = nn.init.ones_(fused.weight)
            >>> Phi3Family().fold_scale(fused, torch.tensor([2.0, 3.0]))
            >>> fused.weight.flatten().tolist()
            [1.0, 1.0, 2.0, 3.0]
        """
        if isinstance(producer, nn.Linear) and producer.out_features == 2 * scale.numel():
            ones = torch.ones_like(scale)
            scale = torch.cat([ones, scale])
        super().fold_scale(producer, scale)


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="phi3", summary="Phi-3 decoder layers (fused qkv and gate_up)",
                             factory=Phi3Family, model_types=("phi3",))
