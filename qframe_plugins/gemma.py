"""Gemma, Gemma 2 and Gemma 3 (text): Llama-like layers whose RMSNorm computes
``x̂ · (1 + weight)``, so :meth:`GemmaFamily.fold_scale` folds ``s`` as
``weight' = (1 + weight) · s - 1``.

Gemma 2 and 3 add ``post_attention_layernorm`` (on the attention *output*) and
``pre_feedforward_layernorm``; the latter is what the MLP reads. v → o is exact only without
grouped-query attention, so :meth:`GemmaFamily.for_model` drops it where
``num_key_value_heads < num_attention_heads`` (every Gemma 2/3 size but the smallest).
Gemma 3 (multimodal, ``model_type = "gemma3"``) keeps its text layers in
``model.language_model``.
"""

from __future__ import annotations

import torch
from torch import nn

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup

ATTENTION = SmoothingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
V_TO_O = SmoothingGroup("self_attn.v_proj", ("self_attn.o_proj",))
UP_TO_DOWN = SmoothingGroup("mlp.up_proj", ("mlp.down_proj",))


class GemmaFamily(Architecture):
    """Gemma (1) decoder layers: ``post_attention_layernorm`` feeds the MLP."""

    layers_path = "model.layers"
    pre_layer_paths = ("model.embed_tokens", "model.rotary_emb")
    attention_path = "self_attn"
    smoothing_groups = (ATTENTION, V_TO_O, SmoothingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), UP_TO_DOWN)

    def for_model(self, model: nn.Module) -> Architecture:
        """Without v → o under grouped-query attention."""
        config = model.config.get_text_config()
        if config.num_key_value_heads >= config.num_attention_heads:
            return self
        adapter = type(self)()
        adapter.smoothing_groups = tuple(g for g in self.smoothing_groups if g != V_TO_O)
        return adapter

    def fold_scale(self, producer: nn.Module, scale: torch.Tensor) -> None:
        """Gemma's norms scale by ``1 + weight``; linears fold as usual.

        Example::

            >>> from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
            >>> norm = GemmaRMSNorm(2)  # weight 0: scales by 1
            >>> GemmaFamily().fold_scale(norm, torch.tensor([2.0, 0.5])); norm.weight.tolist()
            [1.0, -0.5]
        """
        if isinstance(producer, nn.Linear):
            return super().fold_scale(producer, scale)
        with torch.no_grad():
            weight = producer.weight
            s = scale.to(weight.device, torch.float32)
            weight.copy_(((1 + weight.float()) * s - 1).to(weight.dtype))


class Gemma2Family(GemmaFamily):
    """Gemma 2 and Gemma 3 text layers: ``pre_feedforward_layernorm`` feeds the MLP."""

    smoothing_groups = (ATTENTION, V_TO_O, SmoothingGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), UP_TO_DOWN)


class Gemma3Multimodal(Gemma2Family):
    """Gemma 3 with its vision tower: the text layers sit in ``model.language_model``."""

    layers_path = "model.language_model.layers"
    pre_layer_paths = ("model.language_model.embed_tokens", "model.language_model.rotary_emb")


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="gemma", summary="Gemma decoder layers", factory=GemmaFamily, model_types=("gemma",))
    yield ArchitecturePlugin(name="gemma2", summary="Gemma 2 and Gemma 3 text decoder layers", factory=Gemma2Family,
                             model_types=("gemma2", "gemma3_text"))
    yield ArchitecturePlugin(name="gemma3", summary="Gemma 3 multimodal: its text decoder layers",
                             factory=Gemma3Multimodal, model_types=("gemma3",))
