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
provides Llama, Mistral, Qwen2 and GPT-2.

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
    says what it is, in the validator's messages.

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

    @property
    def head(self) -> bool:
        """Whether this is an output head (a vocab-split weight): TensorRT-LLM may quantize it."""
        return self.split == "vocab" and self.name.endswith(".weight") and len(self.shape) == 2


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
        hf, trt = self.layer(i), f"transformer.layers.{i}"
        h, hd, inter, nq, nkv = self.hidden, self.head_size, self.intermediate, self.heads, self.kv_heads
        return [
            LinearSpec(f"{trt}.attention.qkv", (Part(f"{hf}.self_attn.q_proj", heads=nq, width=nq * hd),
                                                 Part(f"{hf}.self_attn.k_proj", heads=nkv, width=nkv * hd),
                                                 Part(f"{hf}.self_attn.v_proj", heads=nkv, width=nkv * hd)),
                       "column", h, self.qkv_bias),
            LinearSpec(f"{trt}.attention.dense", (Part(f"{hf}.self_attn.o_proj", width=h),), "row", self.heads * hd,
                       self.dense_bias),
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
