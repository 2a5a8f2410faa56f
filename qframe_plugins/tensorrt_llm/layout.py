"""Where TensorRT-LLM keeps each weight of a model family: tensor names, the Hugging Face
modules they come from, their shapes, how they split across tensor-parallel ranks, and the
family's ``config.json`` keys.

A :class:`Layout` lists, per decoder layer, the *linears* TensorRT-LLM runs (q/k/v fused
into one ``attention.qkv``; Llama's ``gate_proj`` becomes ``mlp.fc`` and ``up_proj``
``mlp.gate``) and the plain tensors (norms, embeddings) copied as they are. One layout
object serves the writer and the validator: :meth:`Layout.from_hf` builds it from a Hugging
Face config, :meth:`Layout.from_checkpoint` from a written ``config.json``, and both give the
same :class:`Sizes` and the same tensors.

Layouts are plugins (``qframe_layouts`` yielding :class:`qframe.LayoutPlugin` records with
``backend="tensorrt-llm"``): the writer finds one by the model's ``config.model_type``
(:func:`layout_for`), the validator by the checkpoint's ``architecture``. This module
provides Llama, Mistral, Qwen2 and GPT-2, and the mixtures of experts Mixtral, Qwen2-MoE and
Qwen3-MoE (:class:`ExpertsSpec`: TensorRT-LLM's ``MixtureOfExperts`` holds a layer's routed
experts stacked, as ``mlp.fc`` and ``mlp.proj``, beside a float32 ``mlp.router``).

Example::

    >>> from qframe.testing import make_registry, tiny_llama_model
    >>> layout = layout_for(tiny_llama_model(), make_registry())
    >>> [(l.name, [p.module for p in l.parts]) for l in layout.linears(0)][:1]
    [('transformer.layers.0.attention.qkv', ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj'])]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, TypeVar

from qframe import LayoutPlugin, hookimpl
from qframe.errors import ExportError, PluginError

BACKEND = "tensorrt-llm"
_L = TypeVar("_L", bound="Layout")


@dataclass(frozen=True)
class Sizes:
    """The sizes a layout's tensors follow, read from a Hugging Face config
    (:meth:`from_hf`) or from a TensorRT-LLM ``config.json`` (:meth:`from_checkpoint`).
    ``positions`` is ``max_position_embeddings`` (the rows of a learned position embedding).

    Example::

        >>> Sizes.from_checkpoint({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...                        "vocab_size": 256}).head_size
        16
    """

    num_layers: int
    heads: int
    kv_heads: int
    hidden: int
    head_size: int
    intermediate: int
    vocab: int
    positions: int | None = None

    @classmethod
    def from_hf(cls, hf: Any, *, intermediate: int | None = None) -> Sizes:
        """The sizes of a ``transformers`` config (``intermediate`` when the family names its
        MLP width otherwise, like GPT-2's ``n_inner``)."""
        heads, hidden = int(hf.num_attention_heads), int(hf.hidden_size)
        positions = getattr(hf, "max_position_embeddings", None)
        return cls(
            num_layers=int(hf.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
            hidden=hidden,
            head_size=int(getattr(hf, "head_dim", None) or hidden // heads),
            intermediate=int(intermediate if intermediate is not None else hf.intermediate_size),
            vocab=int(hf.vocab_size),
            positions=None if positions is None else int(positions),
        )

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any]) -> Sizes:
        """The sizes of a TensorRT-LLM ``config.json`` (already checked to hold positive
        integers), with the defaults TensorRT-LLM's ``PretrainedConfig`` takes."""
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        return cls(
            num_layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            hidden=hidden,
            head_size=config.get("head_size", hidden // heads),
            intermediate=config.get("intermediate_size", 4 * hidden),
            vocab=config["vocab_size"],
            positions=config.get("max_position_embeddings"),
        )


@dataclass(frozen=True)
class Part:
    """Output rows of one Hugging Face linear that go into a TensorRT-LLM linear: all of
    them, or ``rows`` of a module that fuses several (GPT-2's ``c_attn``). ``heads`` is the
    number of attention heads the rows hold (they are split across ranks by head, and
    repeated when there are fewer heads than ranks); ``width`` the number of rows (``rows``'
    span when given).

    Example::

        >>> Part("transformer.h.0.attn.c_attn", rows=(64, 128), heads=4).width
        64
    """

    module: str
    rows: tuple[int, int] | None = None
    heads: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.width is None and self.rows is not None:
            object.__setattr__(self, "width", self.rows[1] - self.rows[0])

    def rows_per_rank(self, tp: int) -> int:
        """This part's rows on one of ``tp`` tensor-parallel ranks."""
        if self.width is None:
            raise PluginError(f"layout part {self.module}: no width, so its shape on a rank is unknown")
        if self.heads:  # whole heads per rank, repeated when fewer than ranks
            return math.ceil(self.heads / tp) * (self.width // self.heads)
        return self.width // tp


@dataclass(frozen=True)
class LinearSpec:
    """A TensorRT-LLM linear: its name, its parts (concatenated along the output), how tensor
    parallelism splits it (``column``: output rows; ``row``: input columns), its input width
    and whether it has a bias. Its output width is the sum of its parts' widths.

    Example::

        >>> qkv = LinearSpec("transformer.layers.0.attention.qkv",
        ...                  (Part("q", heads=4, width=64), Part("k", heads=2, width=32), Part("v", heads=2, width=32)),
        ...                  "column", in_features=64)
        >>> qkv.shape, qkv.rank_shape(4)
        ((128, 64), (48, 64))
    """

    name: str
    parts: tuple[Part, ...]
    parallel: str
    in_features: int
    bias: bool = False

    def __post_init__(self) -> None:
        if self.parallel not in ("column", "row"):
            raise PluginError(f"layout linear {self.name}: parallel {self.parallel!r}, expected 'column' or 'row'")

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def out_features(self) -> int:
        if any(p.width is None for p in self.parts):
            raise PluginError(f"layout linear {self.name}: a part has no width, so its shape is unknown")
        return sum(p.width for p in self.parts)  # type: ignore[misc]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the whole (unsplit) weight."""
        return self.out_features, self.in_features

    def rank_shape(self, tp: int) -> tuple[int, int]:
        """The weight's ``(out, in)`` on one of ``tp`` tensor-parallel ranks."""
        if self.parallel == "column":
            return sum(p.rows_per_rank(tp) for p in self.parts), self.in_features
        return self.out_features, self.in_features // tp


@dataclass(frozen=True)
class Plain:
    """A tensor copied as it is: ``name`` in the checkpoint, ``source`` (a parameter's full
    name) in the model, ``shape`` unsplit. ``split`` is ``None`` (replicated) or ``"vocab"``
    (rows padded to a multiple of the tensor-parallel size and split: the output head, which
    a ``quant_algo`` quantizes unless ``exclude_modules`` names it). ``parallel_embedding``
    marks an embedding that a checkpoint with ``use_parallel_embedding`` splits; ``what``
    says what it is, in the validator's messages; ``dtype`` is the one it is stored in when
    TensorRT-LLM fixes it (``"float32"``: a MoE router), else ``None`` (the checkpoint's).

    Example::

        >>> Plain("transformer.ln_f.weight", "model.norm.weight", shape=(64,), what="final norm").split is None
        True
    """

    name: str
    source: str
    split: str | None = None
    shape: tuple[int, ...] = ()
    parallel_embedding: bool = False
    what: str = ""
    dtype: str | None = None

    @property
    def head(self) -> bool:
        """Whether this is an output head (a vocab-split weight): TensorRT-LLM may quantize it."""
        return self.split == "vocab" and self.name.endswith(".weight") and len(self.shape) == 2


@dataclass(frozen=True)
class ExpertsSpec:
    """One decoder layer's routed experts as TensorRT-LLM's ``MixtureOfExperts`` holds them:
    ``name`` is the MoE module (``transformer.layers.3.mlp``), ``module`` the Hugging Face fused
    experts (``model.layers.3.mlp.experts``, ``gate_up_proj [E, 2I, H]`` and ``down_proj
    [E, H, I]``), ``num_experts`` E, ``hidden`` H and ``inter`` I (one expert's width).

    The checkpoint stacks the experts: ``<name>.fc`` is ``[E, 2I, H]`` with each expert's *up*
    rows first and its *gate* rows second (TensorRT-LLM's gated activation takes
    ``act(second half) * first half``: the reverse of Hugging Face's ``gate_up_proj``), and
    ``<name>.proj`` is ``[E, H, I]``. Tensor parallelism splits each expert: ``fc`` by rows,
    its up and gate halves each (a rank holds ``[up_r; gate_r]``), ``proj`` by input columns.

    Example::

        >>> spec = ExpertsSpec("transformer.layers.0.mlp", "model.layers.0.mlp.experts", 8, 64, 32)
        >>> spec.fc, spec.fc_shape(2), spec.proj_shape(2)
        ('transformer.layers.0.mlp.fc', (8, 32, 64), (8, 64, 16))
    """

    name: str
    module: str
    num_experts: int
    hidden: int
    inter: int

    @property
    def fc(self) -> str:
        return f"{self.name}.fc"

    @property
    def proj(self) -> str:
        return f"{self.name}.proj"

    def fc_shape(self, tp: int) -> tuple[int, int, int]:
        """``fc``'s ``(E, out, in)`` on one of ``tp`` ranks: each rank's up and gate rows."""
        return self.num_experts, 2 * (self.inter // tp), self.hidden

    def proj_shape(self, tp: int) -> tuple[int, int, int]:
        """``proj``'s ``(E, out, in)`` on one of ``tp`` ranks: each rank's input columns."""
        return self.num_experts, self.hidden, self.inter // tp


class Layout(ABC):
    """The names and shapes of one model family in a TensorRT-LLM checkpoint.

    A family's subclass says where its tensors go (the abstract methods), which
    ``config.json`` keys describe it (``config_keys``, computed by :meth:`family_keys` from a
    Hugging Face config), and the ``architecture`` it writes. Built with :meth:`from_hf`
    (writer) or :meth:`from_checkpoint` (validator); both hold :class:`Sizes` and the family
    keys, and every tensor follows from them.

    Example::

        >>> from qframe.testing import tiny_llama_config
        >>> written = LlamaLayout.from_hf(tiny_llama_config())
        >>> config = {"architecture": written.architecture, "vocab_size": written.vocab, "hidden_size": written.hidden,
        ...           "num_hidden_layers": written.num_layers, "num_attention_heads": written.heads,
        ...           "num_key_value_heads": written.kv_heads, **written.config()}
        >>> LlamaLayout.from_checkpoint(config).linears(0) == written.linears(0)
        True
    """

    architecture: ClassVar[str] = ""  # written to config.json; an instance read back keeps the checkpoint's
    config_keys: ClassVar[tuple[str, ...]] = ()  # the family's keys of config.json, in the order written

    def __init__(self, sizes: Sizes, keys: Mapping[str, Any] | None = None, architecture: str | None = None):
        self.sizes = sizes
        self.keys = dict(keys or {})
        if architecture is not None:
            self.architecture = architecture  # type: ignore[misc]

    @classmethod
    def from_hf(cls: type[_L], hf: Any) -> _L:
        """The layout of a model with this Hugging Face config (the writer's)."""
        sizes = cls.hf_sizes(hf)
        return cls(sizes, cls.family_keys(hf, sizes))

    @classmethod
    def from_checkpoint(cls: type[_L], config: Mapping[str, Any]) -> _L:
        """The layout a TensorRT-LLM ``config.json`` describes (the validator's). Raise
        :class:`qframe.ExportError` naming the key when the config cannot describe this family."""
        keys = {key: config[key] for key in cls.config_keys if key in config}
        return cls(Sizes.from_checkpoint(config), keys, config.get("architecture", cls.architecture))

    @classmethod
    def hf_sizes(cls, hf: Any) -> Sizes:
        """The sizes of a Hugging Face config (override when the family names them otherwise)."""
        return Sizes.from_hf(hf)

    @classmethod
    @abstractmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        """``config.json`` keys that describe the family (not sizes, dtype, mapping or quantization)."""

    # sizes every family has
    @property
    def num_layers(self) -> int:
        return self.sizes.num_layers

    @property
    def heads(self) -> int:
        return self.sizes.heads

    @property
    def kv_heads(self) -> int:
        return self.sizes.kv_heads

    @property
    def hidden(self) -> int:
        return self.sizes.hidden

    @property
    def head_size(self) -> int:
        return self.sizes.head_size

    @property
    def intermediate(self) -> int:
        return self.sizes.intermediate

    @property
    def vocab(self) -> int:
        return self.sizes.vocab

    def config(self) -> dict[str, Any]:
        """``config.json`` keys that describe the model (not dtype, mapping or quantization)."""
        return dict(self.keys)

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

    # Mixtures of experts: a dense family has none of these.
    def experts(self, i: int) -> list[ExpertsSpec]:
        """The routed experts of decoder layer ``i`` (none in a dense family)."""
        return []

    def float_modules(self, i: int) -> list[str]:
        """TensorRT-LLM modules of decoder layer ``i`` that always run unquantized (a MoE's
        router, Qwen2-MoE's ``shared_expert_gate``). A checkpoint with a ``quant_algo`` must name
        them in ``exclude_modules``: TensorRT-LLM's own default exclusions apply only when that
        list is empty, and qframe never writes it empty."""
        return []

    def mlp_widths(self) -> dict[str, int]:
        """The MLP widths tensor parallelism splits, by their ``config.json`` key."""
        return {"intermediate_size": self.intermediate}

    @property
    def shared_expert(self) -> bool:
        """Whether the MoE is TensorRT-LLM's ``SharedMoE`` (routed experts beside a shared one),
        which it cannot run with the routed experts excluded from quantization: it rebuilds an
        excluded MoE as a plain ``MixtureOfExperts``, without the shared expert."""
        return False


class LlamaLayout(Layout):
    """Llama: TensorRT-LLM's LLaMA model (also InternLM's and Skywork's architecture names).
    Subclass it for a family whose Hugging Face modules are named like Llama's."""

    architecture = "LlamaForCausalLM"
    config_keys = ("hidden_act", "norm_epsilon", "position_embedding_type", "rotary_base", "rotary_scaling",
                   "max_position_embeddings", "intermediate_size", "attn_bias", "mlp_bias")

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": kind}
        return {
            "hidden_act": hf.hidden_act,
            "norm_epsilon": hf.rms_norm_eps,
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": theta,
            "rotary_scaling": scaling,
            "max_position_embeddings": hf.max_position_embeddings,
            "intermediate_size": sizes.intermediate,
            "attn_bias": bool(getattr(hf, "attention_bias", False)),
            "mlp_bias": bool(getattr(hf, "mlp_bias", False)),
        }

    # Biases as TensorRT-LLM's LLaMA reads them: attn_bias on qkv and dense, mlp_bias on the MLP.
    @property
    def qkv_bias(self) -> bool:
        return bool(self.keys.get("attn_bias", False))

    @property
    def dense_bias(self) -> bool:
        return bool(self.keys.get("attn_bias", False))

    @property
    def mlp_bias(self) -> bool:
        return bool(self.keys.get("mlp_bias", False))

    def layer(self, i: int) -> str:
        """The Hugging Face name of decoder layer ``i``."""
        return f"model.layers.{i}"

    def linears(self, i: int) -> list[LinearSpec]:
        return self.attention_linears(i) + self.mlp_linears(i)

    def attention_linears(self, i: int) -> list[LinearSpec]:
        """Layer ``i``'s ``attention.qkv`` (q, k and v fused) and ``attention.dense``."""
        hf, trt = self.layer(i), f"transformer.layers.{i}"
        h, hd, nq, nkv = self.hidden, self.head_size, self.heads, self.kv_heads
        return [
            LinearSpec(f"{trt}.attention.qkv", (Part(f"{hf}.self_attn.q_proj", heads=nq, width=nq * hd),
                                                 Part(f"{hf}.self_attn.k_proj", heads=nkv, width=nkv * hd),
                                                 Part(f"{hf}.self_attn.v_proj", heads=nkv, width=nkv * hd)),
                       "column", h, self.qkv_bias),
            LinearSpec(f"{trt}.attention.dense", (Part(f"{hf}.self_attn.o_proj", width=h),), "row", self.heads * hd,
                       self.dense_bias),
        ]

    def mlp_linears(self, i: int) -> list[LinearSpec]:
        """Layer ``i``'s gated MLP: ``mlp.fc``, ``mlp.gate`` and ``mlp.proj``."""
        hf, trt, h, inter = self.layer(i), f"transformer.layers.{i}", self.hidden, self.intermediate
        return [
            # TensorRT-LLM computes proj(act(fc(x)) * gate(x)): fc is the gated (activated) one.
            LinearSpec(f"{trt}.mlp.fc", (Part(f"{hf}.mlp.gate_proj", width=inter),), "column", h, self.mlp_bias),
            LinearSpec(f"{trt}.mlp.gate", (Part(f"{hf}.mlp.up_proj", width=inter),), "column", h, self.mlp_bias),
            LinearSpec(f"{trt}.mlp.proj", (Part(f"{hf}.mlp.down_proj", width=h),), "row", inter, self.mlp_bias),
        ]

    def layer_tensors(self, i: int) -> list[Plain]:
        hf, trt, h = self.layer(i), f"transformer.layers.{i}", (self.hidden,)
        return [Plain(f"{trt}.input_layernorm.weight", f"{hf}.input_layernorm.weight", shape=h, what="norm"),
                Plain(f"{trt}.post_layernorm.weight", f"{hf}.post_attention_layernorm.weight", shape=h, what="norm")]

    def first_tensors(self) -> list[Plain]:
        return [Plain("transformer.vocab_embedding.weight", "model.embed_tokens.weight",
                      shape=(self.vocab, self.hidden), parallel_embedding=True, what="embedding")]

    def last_tensors(self) -> list[Plain]:
        # Written even when tied to the embedding: TensorRT-LLM loads lm_head by name.
        return [Plain("transformer.ln_f.weight", "model.norm.weight", shape=(self.hidden,), what="final norm"),
                Plain("lm_head.weight", "lm_head.weight", "vocab", (self.vocab, self.hidden), what="output head")]


class MistralLayout(LlamaLayout):
    """Mistral: TensorRT-LLM's LLaMA model under Mistral's name."""

    architecture = "MistralForCausalLM"


class Qwen2Layout(LlamaLayout):
    """Qwen2: TensorRT-LLM's QWen model, Llama's tensors with a bias on qkv (and none on dense
    or the MLP, whatever ``attn_bias`` says)."""

    architecture = "Qwen2ForCausalLM"
    config_keys = LlamaLayout.config_keys + ("qwen_type", "seq_length", "use_logn_attn", "moe_intermediate_size",
                                             "moe_shared_expert_intermediate_size")

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        return super().family_keys(hf, sizes) | {
            "attn_bias": True, "qwen_type": "qwen2", "seq_length": hf.max_position_embeddings, "use_logn_attn": False,
            "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0}

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def dense_bias(self) -> bool:
        return False

    @property
    def mlp_bias(self) -> bool:
        return False


# TensorRT-LLM's MoeConfig.ExpertScaleNormalizationMode: NONE weighs the chosen experts by their
# softmax over all experts; RENORMALIZE makes the chosen top_k weights sum to one.
MOE_NONE, MOE_RENORMALIZE = 0, 1
MOE_MODES = {0: "NONE", 1: "RENORMALIZE", 2: "SPARSE_MIXER", 3: "DEVICE_LIMITED", 4: "DEVICE_LIMITED_RENORM"}
# MoeConfig's fields across versions: TensorRT-LLM builds it as MoeConfig(**config["moe"]), which
# raises on any other key. qframe writes the first three, as modelopt does.
MOE_KEYS = ("num_experts", "top_k", "normalization_mode", "sparse_mixer_epsilon", "tp_mode",
            "shared_expert_intermediate_size", "device_limited_n_group", "device_limited_topk_group",
            "device_limited_routed_scaling_factor")


def _is_count(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class MoELayout(LlamaLayout):
    """What the mixtures of experts share: every decoder layer's MLP is TensorRT-LLM's MoE, a
    float32 router ``mlp.router.weight [E, H]`` (routing in float32, as TensorRT-LLM computes
    it) and the stacked experts of :class:`ExpertsSpec`, whose gated activation
    ``config.json`` names ``swiglu``; its ``moe`` table holds E (``num_experts``), the experts
    a token takes (``top_k``) and whether their weights are renormalized to sum to one
    (``normalization_mode``). ``expert_width_key`` names the config key of one expert's width."""

    expert_width_key: ClassVar[str] = "intermediate_size"

    @classmethod
    def hf_num_experts(cls, hf: Any) -> int:
        """The number of routed experts in a Hugging Face config."""
        return int(getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts"))

    @classmethod
    def hf_renormalizes(cls, hf: Any) -> bool:
        """Whether the model rescales its top-k routing weights to sum to one."""
        return bool(getattr(hf, "norm_topk_prob", True))

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ExportError(f"{hf.model_type}: the experts' activation is {act!r}, but TensorRT-LLM's mixture of "
                              "experts computes silu(gate) * up (swiglu) only; export this model with --backend qframe")
        keys = super().family_keys(hf, sizes)
        keys["hidden_act"] = "swiglu"  # TensorRT-LLM's name for silu(gate) * up, which its MoE needs spelled out
        keys["moe"] = {"num_experts": cls.hf_num_experts(hf), "top_k": int(hf.num_experts_per_tok),
                       "normalization_mode": MOE_RENORMALIZE if cls.hf_renormalizes(hf) else MOE_NONE}
        return keys

    @classmethod
    def from_checkpoint(cls: type[_L], config: Mapping[str, Any]) -> _L:
        layout = super().from_checkpoint(config)
        problems = layout.key_problems()  # type: ignore[attr-defined]
        if problems:  # every one at once: a config lacking several keys is named in full
            raise ExportError("; ".join(problems))
        return layout

    def key_problems(self) -> list[str]:
        """What ``config.json``'s keys lack to describe this family's mixture of experts, each
        naming the key (empty when they describe it)."""
        problems = []
        moe = self.keys.get("moe")
        if not isinstance(moe, dict):
            problems.append(f"moe: {moe!r}, expected a table with num_experts, top_k and normalization_mode "
                            f"({self.architecture} is a mixture of experts; without it TensorRT-LLM builds dense MLPs)")
            moe = None
        unknown = [k for k in moe or () if k not in MOE_KEYS]
        if unknown:
            problems.append(f"moe.{unknown[0]}: unknown key (TensorRT-LLM builds MoeConfig(**moe), which raises on it); "
                            f"allowed: {', '.join(MOE_KEYS)}")
        if moe is not None:
            experts, top_k = moe.get("num_experts"), moe.get("top_k")
            mode = moe.get("normalization_mode", MOE_RENORMALIZE)
            if not _is_count(experts, 2):
                problems.append(f"moe.num_experts: {experts!r}, expected an integer of at least 2 (TensorRT-LLM builds "
                                "a dense MLP for fewer)")
            elif not _is_count(top_k) or top_k > experts:
                problems.append(f"moe.top_k: {top_k!r}, expected an integer from 1 to num_experts ({experts})")
            if mode not in MOE_MODES or isinstance(mode, bool):
                problems.append(f"moe.normalization_mode: {mode!r}, expected one of "
                                + ", ".join(f"{k} ({v})" for k, v in MOE_MODES.items()))
        if self.keys.get("hidden_act") != "swiglu":
            problems.append(f"hidden_act: {self.keys.get('hidden_act')!r}, expected \"swiglu\" (TensorRT-LLM's gated "
                            "activation; with another its MoE would hold fc at half the width)")
        if not _is_count(self.expert_width):
            problems.append(f"{self.expert_width_key}: {self.expert_width!r}, expected a positive integer (one "
                            "expert's width)")
        return problems

    @property
    def num_experts(self) -> int:
        return self.keys["moe"]["num_experts"]

    @property
    def expert_width(self) -> int:
        """One expert's width (its ``gate``/``up`` rows, ``down``'s input columns)."""
        return self.intermediate

    def mlp_linears(self, i: int) -> list[LinearSpec]:
        return []  # the routed experts are not linears: see experts()

    def experts(self, i: int) -> list[ExpertsSpec]:
        return [ExpertsSpec(f"transformer.layers.{i}.mlp", f"{self.layer(i)}.mlp.experts", self.num_experts,
                            self.hidden, self.expert_width)]

    def float_modules(self, i: int) -> list[str]:
        return [f"transformer.layers.{i}.mlp.router"]

    def layer_tensors(self, i: int) -> list[Plain]:
        router = Plain(f"transformer.layers.{i}.mlp.router.weight", f"{self.layer(i)}.mlp.gate.weight",
                       shape=(self.num_experts, self.hidden), what="MoE router", dtype="float32")
        return super().layer_tensors(i) + [router]

    def mlp_widths(self) -> dict[str, int]:
        return {self.expert_width_key: self.expert_width}


class MixtralLayout(MoELayout):
    """Mixtral: TensorRT-LLM's LLaMA model with a mixture of experts in every layer, one expert
    ``intermediate_size`` wide; its routing weights always renormalized."""

    architecture = "MixtralForCausalLM"
    config_keys = LlamaLayout.config_keys + ("moe",)

    @classmethod
    def hf_renormalizes(cls, hf: Any) -> bool:
        return True  # Mixtral divides its top-k softmax weights by their sum


class QwenMoELayout(MoELayout):
    """Qwen2-MoE and Qwen3-MoE: TensorRT-LLM's QWen model (``qwen_type``), experts
    ``moe_intermediate_size`` wide, no bias on ``attention.dense`` or the MLPs. Hugging Face's
    ``mlp_only_layers`` and ``decoder_sparse_step`` can make layers dense; TensorRT-LLM's QWen
    model builds every layer with the mixture of experts, so such a model is refused."""

    qwen_type: ClassVar[str] = ""
    expert_width_key = "moe_intermediate_size"
    config_keys = Qwen2Layout.config_keys + ("moe",)

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
        only = set(getattr(hf, "mlp_only_layers", None) or [])
        dense = [i for i in range(sizes.num_layers) if i in only or (i + 1) % step]
        if dense:
            raise ExportError(
                f"{hf.model_type}: decoder layer(s) {dense[:8]} have a dense MLP (mlp_only_layers = "
                f"{sorted(only)}, decoder_sparse_step = {step}), but TensorRT-LLM's QWen model builds every layer with "
                "the mixture of experts, so those layers' weights would not load; export this model with --backend hf "
                "(TensorRT-LLM's PyTorch flow) or qframe")
        return super().family_keys(hf, sizes) | {
            "qwen_type": cls.qwen_type, "seq_length": hf.max_position_embeddings, "use_logn_attn": False,
            "moe_intermediate_size": int(hf.moe_intermediate_size),
            "moe_shared_expert_intermediate_size": int(getattr(hf, "shared_expert_intermediate_size", 0) or 0)}

    def key_problems(self) -> list[str]:
        problems = super().key_problems()
        if self.keys.get("qwen_type") != self.qwen_type:
            problems.append(f"qwen_type: {self.keys.get('qwen_type')!r}, expected {self.qwen_type!r} (TensorRT-LLM's "
                            f"QWen model builds {self.architecture}'s layers from it)")
        return problems

    @property
    def expert_width(self) -> int:
        return self.keys.get("moe_intermediate_size")  # type: ignore[return-value]

    @property
    def qkv_bias(self) -> bool:
        return bool(self.keys.get("attn_bias", False))

    @property
    def dense_bias(self) -> bool:
        return False

    @property
    def mlp_bias(self) -> bool:
        return False


class Qwen2MoeLayout(QwenMoELayout):
    """Qwen2-MoE: q/k/v with a bias (``qkv_bias``), routed experts beside one shared expert
    (``mlp.shared_expert.fc`` with its up and gate rows fused, as the routed experts', and
    ``mlp.shared_expert.proj``) whose output a float sigmoid gate scales
    (``mlp.shared_expert_gate`` [1, H], never quantized)."""

    architecture = "Qwen2MoeForCausalLM"
    qwen_type = "qwen2_moe"

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        return super().family_keys(hf, sizes) | {"attn_bias": bool(getattr(hf, "qkv_bias", True))}

    def key_problems(self) -> list[str]:
        problems = super().key_problems()
        if not _is_count(self.shared_width):
            problems.append(f"moe_shared_expert_intermediate_size: {self.shared_width!r}, expected a positive integer "
                            "(Qwen2-MoE's shared expert's width)")
        return problems

    @property
    def shared_width(self) -> int:
        return self.keys.get("moe_shared_expert_intermediate_size")  # type: ignore[return-value]

    @property
    def shared_expert(self) -> bool:
        return True

    def mlp_linears(self, i: int) -> list[LinearSpec]:
        hf, trt, h, width = f"{self.layer(i)}.mlp.shared_expert", f"transformer.layers.{i}.mlp.shared_expert", \
            self.hidden, self.shared_width
        # A gated MLP fused as the experts are: up rows, then the activated gate rows.
        return [LinearSpec(f"{trt}.fc", (Part(f"{hf}.up_proj", width=width), Part(f"{hf}.gate_proj", width=width)),
                           "column", h),
                LinearSpec(f"{trt}.proj", (Part(f"{hf}.down_proj", width=h),), "row", width)]

    def float_modules(self, i: int) -> list[str]:
        return super().float_modules(i) + [f"transformer.layers.{i}.mlp.shared_expert_gate"]

    def layer_tensors(self, i: int) -> list[Plain]:
        gate = Plain(f"transformer.layers.{i}.mlp.shared_expert_gate.weight",
                     f"{self.layer(i)}.mlp.shared_expert_gate.weight", shape=(1, self.hidden), what="shared expert gate")
        return super().layer_tensors(i) + [gate]

    def mlp_widths(self) -> dict[str, int]:
        return super().mlp_widths() | {"moe_shared_expert_intermediate_size": self.shared_width}


class Qwen3MoeLayout(QwenMoELayout):
    """Qwen3-MoE: no attention bias, an RMSNorm over each head of the queries and of the keys
    (``attention.q_layernorm``, ``attention.k_layernorm``, ``[head_size]``), no shared expert."""

    architecture = "Qwen3MoeForCausalLM"
    qwen_type = "qwen3_moe"

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        if getattr(hf, "attention_bias", False):
            raise ExportError(f"{hf.model_type}: attention_bias is true, but TensorRT-LLM's QWen model has no bias on "
                              "attention.dense (o_proj); export this model with --backend qframe")
        return super().family_keys(hf, sizes) | {"attn_bias": False}

    def layer_tensors(self, i: int) -> list[Plain]:
        hf, trt, hd = self.layer(i), f"transformer.layers.{i}", (self.head_size,)
        norms = [Plain(f"{trt}.attention.{q}_layernorm.weight", f"{hf}.self_attn.{q}_norm.weight", shape=hd,
                       what="query/key norm") for q in "qk"]
        return super().layer_tensors(i) + norms


class QWenLayout(Qwen2Layout):
    """TensorRT-LLM's generic ``QWenForCausalLM`` architecture, read back (never written): its
    ``qwen_type`` says which model it is, and the layout of that one reads the checkpoint."""

    architecture = "QWenForCausalLM"
    by_type: ClassVar[dict[str, type[Layout]]] = {}  # filled below, once the classes exist

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any]) -> Layout:  # type: ignore[override]
        kind = config.get("qwen_type")
        target = cls.by_type.get(kind) if isinstance(kind, str) else None
        if target is None:
            raise ExportError(f"qwen_type: {kind!r}; this validator reads {', '.join(sorted(cls.by_type))} under "
                              "QWenForCausalLM")
        return target.from_checkpoint(config)


QWenLayout.by_type.update(qwen2=Qwen2Layout, qwen2_moe=Qwen2MoeLayout, qwen3_moe=Qwen3MoeLayout)


class GPT2Layout(Layout):
    """GPT-2: TensorRT-LLM's GPT model. The adapter made GPT-2's transposed projections
    ``nn.Linear``, so nothing is transposed here; ``c_attn`` holds q, k and v rows."""

    architecture = "GPTForCausalLM"
    config_keys = ("gpt_variant", "hidden_act", "norm_epsilon", "position_embedding_type", "max_position_embeddings",
                   "intermediate_size", "bias")

    @classmethod
    def hf_sizes(cls, hf: Any) -> Sizes:
        return Sizes.from_hf(hf, intermediate=getattr(hf, "n_inner", None) or 4 * int(hf.hidden_size))

    @classmethod
    def family_keys(cls, hf: Any, sizes: Sizes) -> dict[str, Any]:
        return {
            "gpt_variant": "gpt2",
            "hidden_act": hf.activation_function,
            "norm_epsilon": hf.layer_norm_epsilon,
            "position_embedding_type": "learned_absolute",
            "max_position_embeddings": hf.n_positions,
            "intermediate_size": sizes.intermediate,
            "bias": True,
        }

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any]) -> GPT2Layout:
        layout = super().from_checkpoint(config)
        if layout.sizes.positions is None:
            raise ExportError("max_position_embeddings: missing; GPT's position_embedding has that many rows")
        return layout

    @property
    def bias(self) -> bool:
        """TensorRT-LLM's GPT: ``bias`` on every linear (its norms always have one)."""
        return bool(self.keys.get("bias", True))

    def layer(self, i: int) -> str:
        """The Hugging Face name of decoder layer ``i``."""
        return f"transformer.h.{i}"

    def linears(self, i: int) -> list[LinearSpec]:
        hf, trt, h, inter = self.layer(i), f"transformer.layers.{i}", self.hidden, self.intermediate
        qkv = tuple(Part(f"{hf}.attn.c_attn", (k * h, (k + 1) * h), self.heads) for k in range(3))
        return [
            LinearSpec(f"{trt}.attention.qkv", qkv, "column", h, self.bias),
            LinearSpec(f"{trt}.attention.dense", (Part(f"{hf}.attn.c_proj", width=h),), "row", h, self.bias),
            LinearSpec(f"{trt}.mlp.fc", (Part(f"{hf}.mlp.c_fc", width=inter),), "column", h, self.bias),
            LinearSpec(f"{trt}.mlp.proj", (Part(f"{hf}.mlp.c_proj", width=h),), "row", inter, self.bias),
        ]

    def layer_tensors(self, i: int) -> list[Plain]:
        hf, trt, h = self.layer(i), f"transformer.layers.{i}", (self.hidden,)
        return [Plain(f"{trt}.{a}.{p}", f"{hf}.{b}.{p}", shape=h, what="norm")
                for a, b in (("input_layernorm", "ln_1"), ("post_layernorm", "ln_2")) for p in ("weight", "bias")]

    def first_tensors(self) -> list[Plain]:
        return [Plain("transformer.vocab_embedding.weight", "transformer.wte.weight", shape=(self.vocab, self.hidden),
                      parallel_embedding=True, what="embedding"),
                Plain("transformer.position_embedding.weight", "transformer.wpe.weight",
                      shape=(self.sizes.positions or 0, self.hidden), parallel_embedding=True, what="embedding")]

    def last_tensors(self) -> list[Plain]:
        h = (self.hidden,)
        return [Plain("transformer.ln_f.weight", "transformer.ln_f.weight", shape=h, what="final norm"),
                Plain("transformer.ln_f.bias", "transformer.ln_f.bias", shape=h, what="final norm"),
                Plain("lm_head.weight", "lm_head.weight", "vocab", (self.vocab, self.hidden), what="output head")]


# Mixtures of experts TensorRT-LLM's checkpoint (TensorRT engine) flow has no model for, and why:
# refused by name rather than with "no layout", since a plugin layout could not fix them either.
UNSUPPORTED_MOE = {
    "gpt_oss": "TensorRT-LLM builds gpt-oss in its PyTorch flow only; its engine flow has no model for experts "
               "stored [E, in, out] with per-expert biases and a clamped SwiGLU, nor for attention sinks",
    "deepseek_v3": "TensorRT-LLM's engine flow builds DeepSeek-V2 but not V3, whose router scores experts with a "
                   "sigmoid plus a per-expert correction bias (noaux_tc), which no MoeConfig normalization_mode "
                   "expresses; DeepSeek-V3 is served by its PyTorch flow",
}


def layout_class(entry: Any) -> type[Layout]:
    """The :class:`Layout` subclass a ``tensorrt-llm`` layout plugin's registry entry provides;
    a :class:`qframe.PluginError` naming the plugin when its factory is something else.

    Example::

        >>> from qframe.testing import make_registry
        >>> layout_class(make_registry().entry("layout", "gpt2")).__name__
        'GPT2Layout'
    """
    factory = entry.record.factory
    if not (isinstance(factory, type) and issubclass(factory, Layout)):
        raise PluginError(f"layout {entry.record.name!r} (plugin {entry.provider!r}, {entry.distribution}): its "
                          f"factory {factory!r} is not a subclass of {Layout.__module__}.Layout, which the "
                          f"{BACKEND} backend builds with from_hf() and from_checkpoint()")
    return factory


def layout_for(model: Any, registry: Any) -> Layout:
    """The layout of ``model``'s family: the ``tensorrt-llm`` layout plugin in ``registry``
    that claims its ``config.model_type``; an :class:`~qframe.ExportError` naming the
    model_type and the installed layouts when none does.

    Example::

        >>> from qframe.testing import make_registry, tiny_model
        >>> layout_for(tiny_model("gpt2"), make_registry()).architecture
        'GPTForCausalLM'
    """
    hf = getattr(model, "config", None)
    model_type = getattr(hf, "model_type", None)
    entry = registry.layout(BACKEND, model_type=model_type) if isinstance(model_type, str) else None
    if entry is None and model_type in UNSUPPORTED_MOE:
        raise ExportError(f"{model_type} ({type(model).__name__}): {UNSUPPORTED_MOE[model_type]}. Export this model "
                          "with --backend hf (TensorRT-LLM's PyTorch flow loads that checkpoint) or qframe")
    if entry is None:
        served = sorted(t for e in registry.entries("layout") if e.record.backend == BACKEND
                        for t in e.record.model_types)
        raise ExportError(
            f"the {BACKEND} backend has no layout for model_type {model_type!r} ({type(model).__name__}); the "
            f"installed layouts write {', '.join(served) or 'nothing'}. Export this model with another backend "
            f"(e.g. --backend qframe, or hf for TensorRT-LLM's PyTorch flow), or install a plugin whose "
            f"qframe_layouts hook yields a LayoutPlugin for {model_type!r}."
        )
    return layout_class(entry).from_hf(hf)


@hookimpl
def qframe_layouts():
    yield LayoutPlugin(name="llama", summary="Llama in TensorRT-LLM's LLaMA checkpoint layout", factory=LlamaLayout,
                       backend=BACKEND, model_types=("llama",),
                       architectures=("LlamaForCausalLM", "InternLMForCausalLM", "SkyworkForCausalLM"))
    yield LayoutPlugin(name="mistral", summary="Mistral in TensorRT-LLM's LLaMA checkpoint layout",
                       factory=MistralLayout, backend=BACKEND, model_types=("mistral",),
                       architectures=("MistralForCausalLM",))
    yield LayoutPlugin(name="qwen2", summary="Qwen2 in TensorRT-LLM's QWen checkpoint layout", factory=Qwen2Layout,
                       backend=BACKEND, model_types=("qwen2",), architectures=("Qwen2ForCausalLM",))
    yield LayoutPlugin(name="gpt2", summary="GPT-2 in TensorRT-LLM's GPT checkpoint layout", factory=GPT2Layout,
                       backend=BACKEND, model_types=("gpt2",), architectures=("GPTForCausalLM", "GPT2LMHeadModel"))
    yield LayoutPlugin(name="mixtral", summary="Mixtral in TensorRT-LLM's LLaMA checkpoint layout, experts stacked",
                       factory=MixtralLayout, backend=BACKEND, model_types=("mixtral",),
                       architectures=("MixtralForCausalLM",))
    yield LayoutPlugin(name="qwen2_moe", summary="Qwen2-MoE in TensorRT-LLM's QWen layout, shared expert beside",
                       factory=Qwen2MoeLayout, backend=BACKEND, model_types=("qwen2_moe",),
                       architectures=("Qwen2MoeForCausalLM",))
    yield LayoutPlugin(name="qwen3_moe", summary="Qwen3-MoE in TensorRT-LLM's QWen checkpoint layout, experts stacked",
                       factory=Qwen3MoeLayout, backend=BACKEND, model_types=("qwen3_moe",),
                       architectures=("Qwen3MoeForCausalLM",))
    yield LayoutPlugin(name="qwen", summary="TensorRT-LLM's QWenForCausalLM read back by its qwen_type",
                       factory=QWenLayout, backend=BACKEND, architectures=("QWenForCausalLM",))
