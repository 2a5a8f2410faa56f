"""Mixture-of-experts decoder layers: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and gpt-oss.

In transformers 5 their routed experts are one module holding fused 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), not ``nn.Linear`` modules; the router
(``mlp.gate``, gpt-oss ``mlp.router``) is a module with a 2-D ``weight`` of its own class. These
adapters name where the layers are and which smoothing groups are *exact* (folding a positive
scale ``s`` into the producer and ``1 / s`` into the consumers' input columns leaves every layer's
output unchanged; :func:`qframe.testing.assert_smoothing_groups_exact` checks it in the tests).

What is exact, and why:

* ``input_layernorm`` → the attention's input projections: only they read the norm's output.
* ``self_attn.v_proj`` → ``self_attn.o_proj``: only without grouped-query attention (a narrower
  ``v_proj`` cannot take one scale per ``o_proj`` input channel); :meth:`MoEFamily.for_model`
  drops it under GQA.
* ``post_attention_layernorm`` of a *sparse* layer is left out. Its output is read by the router,
  by every routed expert's ``gate_up_proj`` and (Qwen2-MoE) by the shared expert and its sigmoid
  gate. Folding ``s`` into the norm is exact only if *every* reader takes ``1 / s``: scaling the
  shared expert's gate/up alone would change the router's logits (so the choice of experts) and
  every routed expert's input. A group's consumers are ``nn.Linear`` modules, which the router
  and the fused experts are not, so that group cannot be stated here; it belongs to fused-expert
  smoothing (issue 12, item 4), which scales the router and every expert with the shared expert.
* The same norm of a *dense* layer (Qwen2/3-MoE ``mlp_only_layers`` or ``decoder_sparse_step``,
  DeepSeek-V3's first ``first_k_dense_replace`` layers) feeds only ``mlp.gate_proj`` and
  ``mlp.up_proj``: exact. Groups name modules relative to the layer, and a group whose modules a
  layer lacks is skipped in that layer by the algorithms, so dense-layer and sparse-layer groups
  sit in one list and each layer gets the ones it has (``Architecture`` has no per-layer groups).
* ``up_proj`` → ``down_proj`` of a dense MLP or of the shared expert(s): ``down`` reads
  ``act(gate) * up`` (Qwen2-MoE's sigmoid gate multiplies ``down``'s *output*): exact.

DeepSeek-V3's multi-head latent attention adds ``q_a_layernorm → q_b_proj`` and
``kv_a_layernorm → kv_b_proj`` (each norm feeds one linear); ``input_layernorm`` feeds
``q_a_proj`` (``q_proj`` without a query LoRA rank) and ``kv_a_proj_with_mqa``. It has no v → o
group (values come out of ``kv_b_proj`` together with the keys' no-RoPE half).

Example::

    >>> from qframe.model import find_architecture
    >>> from qframe.testing import make_registry, tiny_model
    >>> arch = find_architecture(tiny_model("qwen2_moe"), make_registry())
    >>> type(arch).__name__, [g.producer for g in arch.smoothing_groups]
    ('Qwen2MoeFamily', ['input_layernorm', 'self_attn.v_proj', 'post_attention_layernorm', 'mlp.up_proj', 'mlp.shared_expert.up_proj'])
"""

from __future__ import annotations

from torch import nn

from qframe import ArchitecturePlugin, hookimpl
from qframe.model import Architecture, SmoothingGroup

ATTENTION = SmoothingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
V_TO_O = SmoothingGroup("self_attn.v_proj", ("self_attn.o_proj",))
# A dense layer's MLP (mlp_only_layers, DeepSeek-V3's first layers); absent from sparse layers.
DENSE_MLP = SmoothingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
DENSE_UP_TO_DOWN = SmoothingGroup("mlp.up_proj", ("mlp.down_proj",))


class MoEFamily(Architecture):
    """Llama-like MoE decoder layers (``model.layers``, ``self_attn``); Mixtral as it stands.

    Example::

        >>> [g.producer for g in MoEFamily.smoothing_groups]
        ['input_layernorm', 'self_attn.v_proj']
    """

    layers_path = "model.layers"
    pre_layer_paths = ("model.embed_tokens", "model.rotary_emb")
    attention_path = "self_attn"
    smoothing_groups: tuple[SmoothingGroup, ...] = (ATTENTION, V_TO_O)

    def for_model(self, model: nn.Module) -> Architecture:
        """Without v → o under grouped-query attention (fewer key/value heads than query heads).

        Example::

            >>> from qframe.testing import tiny_model
            >>> V_TO_O in MoEFamily().for_model(tiny_model("mixtral")).smoothing_groups  # GQA: 4 heads, 2 KV
            False
        """
        config = model.config.get_text_config()
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if V_TO_O not in self.smoothing_groups or heads is None or kv_heads >= heads:
            return self
        adapter = type(self)()
        adapter.smoothing_groups = tuple(g for g in self.smoothing_groups if g != V_TO_O)
        return adapter


def sparse_block(*readers: str) -> SmoothingGroup:
    """The post-attention norm and everything reading its output in a sparse layer: the router,
    the fused experts and ``readers`` (a shared expert's linears and gate)."""
    return SmoothingGroup("post_attention_layernorm", ("mlp.gate", "mlp.experts", *readers))


class MixtralFamily(MoEFamily):
    """Mixtral: every layer sparse (router + fused experts), no shared expert."""

    expert_groups = (sparse_block(),)


class Qwen3MoeFamily(MoEFamily):
    """Qwen3-MoE: sparse layers without a shared expert; dense layers where the config says
    (``mlp_only_layers``, ``decoder_sparse_step``). Its per-head ``q_norm``/``k_norm`` come after
    ``q_proj``/``k_proj``, so the attention group stays exact."""

    smoothing_groups = (ATTENTION, V_TO_O, DENSE_MLP, DENSE_UP_TO_DOWN)
    expert_groups = (sparse_block(),)


class Qwen2MoeFamily(MoEFamily):
    """Qwen2-MoE: Qwen3-MoE's layout plus a shared expert (``mlp.shared_expert``) whose output a
    sigmoid gate (``mlp.shared_expert_gate``) scales; its up → down is exact, its norm is not (see
    the module docstring)."""

    smoothing_groups = (ATTENTION, V_TO_O, DENSE_MLP, DENSE_UP_TO_DOWN,
                        SmoothingGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)))
    expert_groups = (sparse_block("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"),)


class DeepseekV3Family(MoEFamily):
    """DeepSeek-V3 (multi-head latent attention, dense first layers, shared experts, grouped
    routing), as transformers implements it. Both the query-LoRA (``q_a_proj``) and the plain
    ``q_proj`` forms are covered: groups naming modules a model lacks are skipped.

    No ``attention_path``: its cache holds the compressed latents (``kv_a_layernorm``'s output and
    the RoPE'd key part), not the keys and values the attention function receives, where
    ``kv_cache`` quantizes; so ``kv_cache`` refuses the model with its own error instead of
    quantizing tensors no engine caches."""

    attention_path = None

    smoothing_groups = (
        SmoothingGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
        SmoothingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
        SmoothingGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
        SmoothingGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
        DENSE_MLP,
        DENSE_UP_TO_DOWN,
        SmoothingGroup("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",)),
    )
    expert_groups = (sparse_block("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),)

    def for_model(self, model: nn.Module) -> Architecture:
        """Only the attention group of this model's query form (``q_lora_rank`` set or not)."""
        lora = getattr(model.config.get_text_config(), "q_lora_rank", None) is not None
        unused = "self_attn.q_proj" if lora else "self_attn.q_a_proj"
        adapter = type(self)()
        adapter.smoothing_groups = tuple(g for g in self.smoothing_groups if unused not in g.consumers)
        return adapter


class GptOssFamily(MoEFamily):
    """gpt-oss: attention with biases and sinks, every layer sparse (``mlp.router`` with a bias,
    experts with biases and a clamped SwiGLU). Under its grouped-query attention only the
    attention group is exact."""

    expert_groups = (SmoothingGroup("post_attention_layernorm", ("mlp.router", "mlp.experts")),)


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="mixtral", summary="Mixtral MoE decoder layers (fused experts)",
                             factory=MixtralFamily, model_types=("mixtral",))
    yield ArchitecturePlugin(name="qwen2_moe", summary="Qwen2-MoE decoder layers (fused experts, shared expert)",
                             factory=Qwen2MoeFamily, model_types=("qwen2_moe",))
    yield ArchitecturePlugin(name="qwen3_moe", summary="Qwen3-MoE decoder layers (fused experts)",
                             factory=Qwen3MoeFamily, model_types=("qwen3_moe",))
    yield ArchitecturePlugin(name="deepseek_v3", summary="DeepSeek-V3 decoder layers (MLA, dense first layers, "
                             "fused experts, shared experts)", factory=DeepseekV3Family, model_types=("deepseek_v3",))
    yield ArchitecturePlugin(name="gpt_oss", summary="gpt-oss decoder layers (fused experts with biases)",
                             factory=GptOssFamily, model_types=("gpt_oss",))
