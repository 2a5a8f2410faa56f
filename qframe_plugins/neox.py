"""GPT-NeoX (Pythia, GPT-NeoX-20B): ``gpt_neox.layers`` with a fused ``query_key_value``.

Both norms read the residual stream whether or not the layer runs attention and MLP in
parallel (``use_parallel_residual``), so each heads one group. The fused projection means no
v → o group (``kv_cache`` quantizes the cache at the ``attention`` module, after RoPE);
``dense_h_to_4h → dense_4h_to_h`` crosses a GELU, so no group either.
"""

from __future__ import annotations

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup


class NeoXFamily(Architecture):
    """GPT-NeoX decoder layers, rotary embeddings in ``gpt_neox.rotary_emb``."""

    layers_path = "gpt_neox.layers"
    pre_layer_paths = ("gpt_neox.embed_in", "gpt_neox.rotary_emb")
    attention_path = "attention"
    smoothing_groups = (
        SmoothingGroup("input_layernorm", ("attention.query_key_value",)),
        SmoothingGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    )


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="gpt_neox", summary="GPT-NeoX and Pythia decoder layers",
                             factory=NeoXFamily, model_types=("gpt_neox",))
