"""The Llama family: Llama, Mistral, Qwen2/3 and SmolLM share one decoder layout."""

from __future__ import annotations

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup


class LlamaFamily(Architecture):
    layers_path = "model.layers"
    pre_layer_paths = ("model.embed_tokens", "model.rotary_emb")
    attention_path = "self_attn"
    smoothing_groups = (
        SmoothingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        SmoothingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothingGroup("mlp.up_proj", ("mlp.down_proj",)),
    )


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(
        name="llama",
        summary="Llama, Mistral, Qwen2/3, SmolLM decoder layers",
        factory=LlamaFamily,
        model_types=("llama", "mistral", "qwen2", "qwen3"),
    )
