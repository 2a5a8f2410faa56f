"""Where TensorRT-LLM keeps each weight of a model family: tensor names, the Hugging Face
modules they come from, how they split across tensor-parallel ranks, and ``config.json``.

A :class:`Layout` lists, per decoder layer, the *linears* TensorRT-LLM runs (q/k/v fused
into one ``attention.qkv``; Llama's ``gate_proj`` becomes ``mlp.fc`` and ``up_proj``
``mlp.gate``) and the plain tensors (norms, embeddings) copied as they are.

Example::

    >>> from qframe.testing import tiny_llama_model
    >>> layout = layout_for(tiny_llama_model())
    >>> [(l.name, [p.module for p in l.parts]) for l in layout.linears(0)][:1]
    [('transformer.layers.0.attention.qkv', ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj'])]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import nn

from qframe.errors import ExportError

# Model types TensorRT-LLM's Llama model serves (Mistral and Qwen2 have their own names).
LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED = (*LLAMA_ARCHITECTURES, "gpt2")


@dataclass(frozen=True)
class Part:
    """Output rows of one Hugging Face linear that go into a TensorRT-LLM linear: all of
    them, or ``rows`` of a module that fuses several (GPT-2's ``c_attn``). ``heads`` is the
    number of attention heads the rows hold (they are split across ranks by head)."""

    module: str
    rows: tuple[int, int] | None = None
    heads: int | None = None


@dataclass(frozen=True)
class LinearSpec:
    """A TensorRT-LLM linear: its name, its parts (concatenated along the output), and how
    tensor parallelism splits it: ``column`` (output rows) or ``row`` (input columns)."""

    name: str
    parts: tuple[Part, ...]
    parallel: str

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class Plain:
    """A tensor copied as it is: ``name`` in the checkpoint, ``source`` (a parameter's full
    name) in the model; ``split`` is ``None`` (replicated) or ``"vocab"`` (lm_head rows,
    padded to the tensor-parallel size)."""

    name: str
    source: str
    split: str | None = None


class Layout(ABC):
    """The names of one model family in a TensorRT-LLM checkpoint; each family's subclass
    says where its tensors go (the abstract methods)."""

    architecture: str

    def __init__(self, model: nn.Module):
        self.model = model
        self.hf = model.config

    # sizes every family has
    @property
    def num_layers(self) -> int:
        return int(self.hf.num_hidden_layers)

    @property
    def heads(self) -> int:
        return int(self.hf.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        return int(getattr(self.hf, "num_key_value_heads", None) or self.heads)

    @property
    def hidden(self) -> int:
        return int(self.hf.hidden_size)

    @property
    def head_size(self) -> int:
        return int(getattr(self.hf, "head_dim", None) or self.hidden // self.heads)

    @property
    def intermediate(self) -> int:
        return int(self.hf.intermediate_size)

    @property
    def vocab(self) -> int:
        return int(self.hf.vocab_size)

    @abstractmethod
    def layer(self, i: int) -> str:
        """The Hugging Face name of decoder layer ``i``."""

    @abstractmethod
    def linears(self, i: int) -> list[LinearSpec]:
        """The linears TensorRT-LLM runs in decoder layer ``i`` (fused where it fuses them)."""

    @abstractmethod
    def layer_tensors(self, i: int) -> list[Plain]:
        """The plain tensors (norms) of decoder layer ``i``."""

    @abstractmethod
    def first_tensors(self) -> list[Plain]:
        """Tensors of the first pipeline stage (embeddings)."""

    @abstractmethod
    def last_tensors(self) -> list[Plain]:
        """Tensors of the last pipeline stage (final norm, lm_head)."""

    def kv_projections(self, i: int) -> tuple[str, ...]:
        """The modules whose outputs the KV cache stores (their output scales)."""
        return ()

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """``config.json`` keys that describe the model (not dtype, mapping or quantization)."""


class LlamaLayout(Layout):
    """Llama, Mistral and Qwen2: TensorRT-LLM's LLaMA (and QWen) models."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.architecture = LLAMA_ARCHITECTURES[self.hf.model_type]

    def layer(self, i: int) -> str:
        return f"model.layers.{i}"

    def linears(self, i: int) -> list[LinearSpec]:
        hf, trt = self.layer(i), f"transformer.layers.{i}"
        return [
            LinearSpec(f"{trt}.attention.qkv", (Part(f"{hf}.self_attn.q_proj", heads=self.heads),
                                                 Part(f"{hf}.self_attn.k_proj", heads=self.kv_heads),
                                                 Part(f"{hf}.self_attn.v_proj", heads=self.kv_heads)), "column"),
            LinearSpec(f"{trt}.attention.dense", (Part(f"{hf}.self_attn.o_proj"),), "row"),
            # TensorRT-LLM computes proj(act(fc(x)) * gate(x)): fc is the gated (activated) one.
            LinearSpec(f"{trt}.mlp.fc", (Part(f"{hf}.mlp.gate_proj"),), "column"),
            LinearSpec(f"{trt}.mlp.gate", (Part(f"{hf}.mlp.up_proj"),), "column"),
            LinearSpec(f"{trt}.mlp.proj", (Part(f"{hf}.mlp.down_proj"),), "row"),
        ]

    def layer_tensors(self, i: int) -> list[Plain]:
        hf, trt = self.layer(i), f"transformer.layers.{i}"
        return [Plain(f"{trt}.input_layernorm.weight", f"{hf}.input_layernorm.weight"),
                Plain(f"{trt}.post_layernorm.weight", f"{hf}.post_attention_layernorm.weight")]

    def first_tensors(self) -> list[Plain]:
        return [Plain("transformer.vocab_embedding.weight", "model.embed_tokens.weight")]

    def last_tensors(self) -> list[Plain]:
        # Written even when tied to the embedding: TensorRT-LLM loads lm_head by name.
        return [Plain("transformer.ln_f.weight", "model.norm.weight"), Plain("lm_head.weight", "lm_head.weight", "vocab")]

    def kv_projections(self, i: int) -> tuple[str, ...]:
        return (f"{self.layer(i)}.self_attn.k_proj", f"{self.layer(i)}.self_attn.v_proj")

    def config(self) -> dict[str, Any]:
        hf = self.hf
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": kind}
        out = {
            "hidden_act": hf.hidden_act,
            "norm_epsilon": hf.rms_norm_eps,
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": theta,
            "rotary_scaling": scaling,
            "max_position_embeddings": hf.max_position_embeddings,
            "intermediate_size": self.intermediate,
            "attn_bias": bool(getattr(hf, "attention_bias", False)) or hf.model_type == "qwen2",
            "mlp_bias": bool(getattr(hf, "mlp_bias", False)),
        }
        if hf.model_type == "qwen2":
            out.update(qwen_type="qwen2", seq_length=hf.max_position_embeddings, use_logn_attn=False,
                       moe_intermediate_size=0, moe_shared_expert_intermediate_size=0)
        return out


class GPT2Layout(Layout):
    """GPT-2: TensorRT-LLM's GPT model (``Conv1D`` weights were made ``nn.Linear`` by the
    adapter, so they need no transposing here; ``c_attn`` holds q, k and v rows)."""

    architecture = "GPTForCausalLM"

    @property
    def intermediate(self) -> int:
        return int(getattr(self.hf, "n_inner", None) or 4 * self.hidden)

    def layer(self, i: int) -> str:
        return f"transformer.h.{i}"

    def linears(self, i: int) -> list[LinearSpec]:
        hf, trt, h = self.layer(i), f"transformer.layers.{i}", self.hidden
        qkv = tuple(Part(f"{hf}.attn.c_attn", (k * h, (k + 1) * h), self.heads) for k in range(3))
        return [
            LinearSpec(f"{trt}.attention.qkv", qkv, "column"),
            LinearSpec(f"{trt}.attention.dense", (Part(f"{hf}.attn.c_proj"),), "row"),
            LinearSpec(f"{trt}.mlp.fc", (Part(f"{hf}.mlp.c_fc"),), "column"),
            LinearSpec(f"{trt}.mlp.proj", (Part(f"{hf}.mlp.c_proj"),), "row"),
        ]

    def layer_tensors(self, i: int) -> list[Plain]:
        hf, trt = self.layer(i), f"transformer.layers.{i}"
        return [Plain(f"{trt}.{a}.{p}", f"{hf}.{b}.{p}")
                for a, b in (("input_layernorm", "ln_1"), ("post_layernorm", "ln_2")) for p in ("weight", "bias")]

    def first_tensors(self) -> list[Plain]:
        return [Plain("transformer.vocab_embedding.weight", "transformer.wte.weight"),
                Plain("transformer.position_embedding.weight", "transformer.wpe.weight")]

    def last_tensors(self) -> list[Plain]:
        return [Plain("transformer.ln_f.weight", "transformer.ln_f.weight"),
                Plain("transformer.ln_f.bias", "transformer.ln_f.bias"),
                Plain("lm_head.weight", "lm_head.weight", "vocab")]

    def config(self) -> dict[str, Any]:
        hf = self.hf
        return {
            "gpt_variant": "gpt2",
            "hidden_act": hf.activation_function,
            "norm_epsilon": hf.layer_norm_epsilon,
            "position_embedding_type": "learned_absolute",
            "max_position_embeddings": hf.n_positions,
            "intermediate_size": self.intermediate,
            "bias": True,
        }


def layout_for(model: nn.Module) -> Layout:
    """The layout of ``model``'s family; an :class:`~qframe.ExportError` for a family this
    backend does not write (or TensorRT-LLM does not have).

    Example::

        >>> from qframe.testing import tiny_model
        >>> layout_for(tiny_model("gpt2")).architecture
        'GPTForCausalLM'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_ARCHITECTURES:
        return LlamaLayout(model)
    if model_type == "gpt2":
        return GPT2Layout(model)
    raise ExportError(
        f"the tensorrt-llm backend cannot write model_type {model_type!r} ({type(model).__name__}): it writes "
        f"{', '.join(SUPPORTED)}. Export this model with another backend (e.g. --backend qframe, or hf "
        f"for TensorRT-LLM's PyTorch flow), or add its layout to qframe_plugins/tensorrt_llm/layout.py."
    )
