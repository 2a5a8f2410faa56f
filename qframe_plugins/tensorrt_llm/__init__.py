"""``tensorrt-llm``: TensorRT-LLM checkpoints (``config.json`` + ``rank{N}.safetensors``).

Writes what ``trtllm-build --checkpoint_dir`` reads, for Llama, Mistral, Qwen2 and GPT-2,
unquantized or in one of TensorRT-LLM's algorithms: FP8 (with an FP8 or INT8 KV cache),
W4A16_AWQ (AWQ, GPTQ and RTN int4 alike), W4A8_AWQ, W8A8_SQ_PER_CHANNEL, W8A16, W4A16 and NVFP4,
split across ``tp_size * pp_size`` ranks; and for the mixtures of experts Mixtral, Qwen2-MoE and
Qwen3-MoE, whose fused experts TensorRT-LLM's MoE holds stacked (``mlp.fc``, ``mlp.proj``), float,
weight-only (W4A16_AWQ, W4A16, W8A16), FP8 or NVFP4 (each expert's weight scales, one static
activation scale per fused weight for all experts: see :mod:`.convert`), split across ranks by
tensor parallelism (no expert parallelism). What the format cannot express is refused before
calibration (:meth:`TensorRTLLMExporter.check`, from the model's planned description) and again
before anything is written.

Recipe::

    [export]
    backend = "tensorrt-llm"
    tp_size = 2              # tensor-parallel ranks (default 1)
    pp_size = 1              # pipeline stages (default 1)
    dtype = "auto"           # float16 | bfloat16 | float32 | auto (the model's 16-bit dtype, else float16)
    build = "auto"           # or true, or a table of trtllm-build options; default: no engine

Command line (from a qframe output, no calibration)::

    qframe export out/awq_w4a16 --backend tensorrt-llm --set tp_size=2
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qframe import BackendPlugin, hookimpl
from qframe.errors import RecipeError

if TYPE_CHECKING:  # annotations only: the methods import these modules where they use them
    from qframe.description import ModelDescription
    from qframe.parts import Part

    from ..quant_algo import Quantization
    from .convert import CheckpointPlan
    from .layout import Layout

CHECKPOINT_DTYPES = ("float16", "bfloat16", "float32", "auto")
# More ranks than any model has attention heads (tp) or layers (pp); larger is a typo.
MAX_RANKS = 1024


@dataclass(frozen=True)
class TensorRTLLMOptions:
    """The ``[export]`` keys of the ``tensorrt-llm`` backend.

    Example::

        >>> TensorRTLLMOptions(tp_size=2).world_size
        2
    """

    tp_size: int = 1
    pp_size: int = 1
    dtype: str = "auto"
    build: Any = None
    # What ``build`` asks for, parsed (None: no engine build).
    build_spec: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("tp_size", "pp_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(key, value, "expected a positive integer (the number of ranks)")
            if value > MAX_RANKS:
                raise RecipeError(key, value, f"expected at most {MAX_RANKS} ranks (tp_size divides the attention "
                                  "heads, pp_size the decoder layers)")
        if self.dtype not in CHECKPOINT_DTYPES:
            raise RecipeError("dtype", self.dtype, f"allowed: {', '.join(CHECKPOINT_DTYPES)}")
        object.__setattr__(self, "build_spec", _parse_build(self.build))

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


def _parse_build(value: Any) -> Any:
    if value in (None, False):
        return None
    from .build import parse_build  # the engine builder's own module

    return parse_build(value)


@dataclass
class TensorRTLLMSession:
    """What :meth:`TensorRTLLMExporter.begin` works out from a model's structure for its parts
    and its ``finish``: the ``layout``, the checkpoint ``plan`` and the ``chosen`` quantization it
    came from, by model part the quantized linears (the first part of each TensorRT-LLM linear)
    and experts; and what the parts' values say, warned about once at the end: linears and
    experts with inexact group scales, weight-only channels TensorRT-LLM requantizes, caches
    whose K and V scales differ."""

    description: ModelDescription
    layout: Layout
    plan: CheckpointPlan
    chosen: Quantization
    linears: dict[Part, list[str]]  # part -> its quantized linears, in model order
    experts: dict[Part, list[str]]  # part -> its quantized fused experts
    inexact: list[str] = field(default_factory=list)
    inexact_experts: list[str] = field(default_factory=list)
    requantized: list[tuple[str, int, int]] = field(default_factory=list)
    unshared: list[str] = field(default_factory=list)

    @property
    def order(self) -> dict[str, int]:
        """Each quantized linear's, then each quantized experts module's place in the order a
        whole-model pass reports them."""
        return {n: i for i, n in enumerate([*self.chosen.quantized, *self.chosen.experts])}


class TensorRTLLMExporter:
    """Writes, checks, validates and builds TensorRT-LLM checkpoints (see the module docstring).
    ``registry`` holds the checkpoint layouts (``qframe_layouts``) it writes and reads.

    Example::

        >>> exporter = TensorRTLLMExporter(TensorRTLLMOptions(tp_size=2))
        >>> exporter.subdirectory
        'tensorrt_llm'
    """

    subdirectory = "tensorrt_llm"

    def __init__(self, options: TensorRTLLMOptions | None = None, *, registry: Any = None):
        from qframe.plugins import default_registry

        self.options = options or TensorRTLLMOptions()
        self.registry = registry or default_registry()  # the command line's: the installed plugins

    def plan(self, description: Any) -> Any:
        """The checkpoint's :class:`~.convert.CheckpointPlan` for ``description`` (before or after
        calibration), refusing what it could not hold."""
        from .convert import make_plan
        from .layout import layout_for

        layout = layout_for(description.model, self.registry)
        dtype = description.serving_dtype(self.options.dtype)
        return make_plan(description, layout, dtype, self.options.tp_size, self.options.pp_size)

    def check(self, description: Any) -> None:
        """Refuse, from what the recipe will produce on the model (before any calibration), what
        the checkpoint could not hold; raises :class:`qframe.ExportError` naming the module."""
        from .build import check_available

        plan = self.plan(description)
        separate = [c.where for c in description.caches.values() if not c.shared]
        if plan.kv_cache_quant_algo is not None and separate:
            warnings.warn(f"{separate[0]}{' and the other layers' if len(separate) > 1 else ''}: K and V get separate "
                          "cache scales, but TensorRT-LLM keeps one per layer and serves both with the larger; set "
                          "options.shared = true in the kv_cache stage for a checkpoint that serves the cache qframe "
                          "evaluates", stacklevel=2)
        check_available(self.options.build_spec)  # build = true without trtllm-build: fail now, not after

    def export(self, qmodel: Any, directory: str | Path) -> Path:
        """Write ``config.json`` and ``rank{N}.safetensors`` into ``directory``, a model part at
        a time (:func:`qframe.parts.write_in_parts`). Everything is checked before the first part
        is converted."""
        from qframe.parts import write_in_parts

        return write_in_parts(self, qmodel.describe(), Path(directory), tokenizer=qmodel.tokenizer)

    def begin(self, description: ModelDescription) -> TensorRTLLMSession:
        """Check ``description`` and plan its checkpoint from the modules' structure alone (no
        tensor value is read: the parts may be on the meta device).

        Example::

            >>> session = TensorRTLLMExporter().begin(qmodel.describe())  # doctest: +SKIP
        """
        from qframe.parts import part_of

        from .convert import plan_and_choice
        from .layout import layout_for

        layout = layout_for(description.model, self.registry)
        dtype = description.serving_dtype(self.options.dtype)
        plan, chosen = plan_and_choice(description, layout, dtype, self.options.tp_size, self.options.pp_size)
        arch = description.arch
        linears: dict[Part, list[str]] = {}
        experts: dict[Part, list[str]] = {}
        for name in chosen.quantized:
            linears.setdefault(part_of(name, arch), []).append(name)
        for name in chosen.experts:
            experts.setdefault(part_of(name, arch), []).append(name)
        return TensorRTLLMSession(description, layout, plan, chosen, linears, experts)

    def part(self, session: TensorRTLLMSession, part: Part) -> dict[str, dict[str, torch.Tensor]]:
        """The checkpoint tensors of one model part, split across the ranks: ``{"rank{r}":
        tensors}`` (the ranks whose pipeline stage holds some of it), layer indices local to
        each stage; notes what the part's values say for :meth:`finish`'s warnings.

        Example::

            >>> sorted(TensorRTLLMExporter().part(session, "last")["rank0"])  # doctest: +SKIP
            ['lm_head.weight', 'transformer.ln_f.weight']
        """
        from ..quant_algo import inexact_group_scales
        from .convert import checkpoint_pieces, inexact_expert_scales, requantized_channels, unshared_caches
        from .shard import shard

        description, plan, chosen, opts = session.description, session.plan, session.chosen, self.options
        linears, experts = session.linears.get(part, []), session.experts.get(part, [])
        if description.calibrated:  # a plan describes no values to warn about
            session.inexact += inexact_group_scales(chosen, plan.dtype, linears)
            session.inexact_experts += inexact_expert_scales(chosen, plan.dtype, experts)
            session.requantized += requantized_channels(chosen, chosen.quant_algo, linears, experts)
        if plan.kv_cache_quant_algo:
            session.unshared += unshared_caches(description, part)
        pieces = checkpoint_pieces(description, session.layout, plan, part)
        ranks = shard(pieces, opts.tp_size, opts.pp_size, session.layout.num_layers)
        return {f"rank{r}": tensors for r, tensors in enumerate(ranks) if tensors}

    def finish(self, session: TensorRTLLMSession, directory: Path, spool: Any, tokenizer: Any = None) -> None:
        """Write ``config.json`` and assemble each ``rank{N}.safetensors`` from its parts in
        ``spool``, after warning once about what the parts found (TensorRT-LLM checkpoints
        hold no tokenizer).

        Example::

            >>> TensorRTLLMExporter().finish(session, Path("out/trt"), spool, None)  # doctest: +SKIP
        """
        from ..quant_algo import in_order, warn_inexact_group_scales
        from .convert import WRITER, warn_inexact_expert_scales, warn_unshared_caches, warn_weight_only_requantized

        plan, chosen, order = session.plan, session.chosen, session.order
        warn_inexact_group_scales(in_order(session.inexact, order), plan.dtype, WRITER.title)
        warn_inexact_expert_scales(in_order(session.inexact_experts, order), plan.dtype)
        warn_weight_only_requantized(in_order(session.requantized, order, key=lambda found: found[0]),
                                     chosen.quant_algo)
        warn_unshared_caches(in_order(session.unshared, {c.attention: i for i, c in
                                                         enumerate(session.description.caches.values())}))
        directory = Path(directory)
        config = checkpoint_config(session.layout, plan, self.options)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for r in range(self.options.world_size):
            spool.assemble(f"rank{r}", directory / f"rank{r}.safetensors", {"format": "pt"})

    def validate(self, directory: str | Path) -> list[str]:
        """The problems of a written checkpoint directory (empty when it is valid)."""
        from .validate import validate_checkpoint

        return validate_checkpoint(Path(directory), self.registry)

    def recognizes(self, directory: str | Path) -> bool:
        """Whether ``directory`` looks like a TensorRT-LLM checkpoint."""
        from .validate import recognizes

        return recognizes(Path(directory))

    def build(self, directory: str | Path) -> Path | None:
        """Build an engine from the checkpoint in ``directory`` when ``build`` asks for one."""
        if self.options.build_spec is None:
            return None
        from .build import build_engine

        return build_engine(Path(directory), self.options.build_spec)


def checkpoint_config(layout: Any, plan: Any, options: TensorRTLLMOptions) -> dict[str, Any]:
    """``config.json``: the model's sizes, its family's keys, the mapping and the quantization."""
    try:
        version = metadata.version("qframe")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "producer": {"name": "qframe", "version": version},
        "architecture": layout.architecture,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "logits_dtype": "float32",
        "vocab_size": layout.vocab,
        "hidden_size": layout.hidden,
        "num_hidden_layers": layout.num_layers,
        "num_attention_heads": layout.heads,
        "num_key_value_heads": layout.kv_heads,
        "head_size": layout.head_size,
        **layout.config(),
        # The embedding is replicated on every rank; lm_head is split (and padded) by rows.
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "mapping": {"world_size": options.world_size, "tp_size": options.tp_size, "pp_size": options.pp_size},
        "quantization": plan.quantization(),
    }


@hookimpl
def qframe_backends():
    yield BackendPlugin(
        name="tensorrt-llm",
        summary="TensorRT-LLM checkpoint (config.json + rank{N}.safetensors), tp/pp sharded, optional engine build",
        factory=TensorRTLLMExporter,
        options=TensorRTLLMOptions,
    )
