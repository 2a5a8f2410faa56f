"""OPT: ``model.decoder.layers`` with separate q/k/v projections and a ReLU MLP.

Most OPT models normalise before attention and MLP (``do_layer_norm_before``); OPT-350m
normalises after, so there the norms feed no linear and only the v → out group is exact.
``fc1 → fc2`` crosses the ReLU: no group.
"""

from __future__ import annotations

from torch import nn

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


class OPTFamily(Architecture):
    """OPT decoder layers; learned positions, and ``project_in`` where the embeddings are narrower."""

    layers_path = "model.decoder.layers"
    pre_layer_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in")
    attention_path = "self_attn"
    smoothing_groups = (
        SmoothingGroup("self_attn_layer_norm", ATTENTION),
        SmoothingGroup("self_attn.v_proj", ("self_attn.out_proj",)),
        SmoothingGroup("final_layer_norm", ("fc1",)),
    )

    def for_model(self, model: nn.Module) -> Architecture:
        """Drop the norm groups of post-norm models (OPT-350m)."""
        if getattr(model.config, "do_layer_norm_before", True):
            return self
        adapter = OPTFamily()
        adapter.smoothing_groups = (SmoothingGroup("self_attn.v_proj", ("self_attn.out_proj",)),)
        return adapter


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="opt", summary="OPT decoder layers", factory=OPTFamily, model_types=("opt",))
