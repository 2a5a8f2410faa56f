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
from typing import Any

import torch

from qframe import BackendPlugin, hookimpl
from qframe.errors import RecipeError

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
        """Write ``config.json`` and ``rank{N}.safetensors`` into ``directory``. Everything is
        checked and converted before the first file is written."""
        from safetensors.torch import save_file

        from .convert import checkpoint_pieces, unshared_caches
        from .layout import layout_for
        from .shard import shard

        description, opts = qmodel.describe(), self.options
        layout = layout_for(description.model, self.registry)
        plan = self.plan(description)
        unshared = unshared_caches(description) if plan.kv_cache_quant_algo else []
        if unshared:
            warnings.warn(f"{unshared[0]}{f' and {len(unshared) - 1} more' if len(unshared) > 1 else ''}: K and V "
                          "have different cache scales, and TensorRT-LLM serves both with the larger, so the cache "
                          "it holds is coarser than the one qframe evaluated; quantize with options.shared = true in "
                          "the kv_cache stage to serve exactly that", stacklevel=2)
        ranks = shard(checkpoint_pieces(description, layout, plan), opts.tp_size, opts.pp_size, layout.num_layers)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = checkpoint_config(layout, plan, opts)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for rank, tensors in enumerate(ranks):
            save_file(tensors, str(directory / f"rank{rank}.safetensors"), metadata={"format": "pt"})
        return directory

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
