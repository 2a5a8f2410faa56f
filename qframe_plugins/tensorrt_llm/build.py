"""Engine builds: the recipe's ``build`` option turned into a ``trtllm-build`` command line.

``build`` is ``false`` (the default: no engine), ``"auto"`` (build where ``trtllm-build`` is on
PATH, and say so where it is not), ``true`` (its absence is an error), or a table of
``trtllm-build`` options::

    [export.build]
    enabled = "auto"            # or true (required); the default is "auto"
    max_batch_size = 8
    max_input_len = 1024
    max_seq_len = 2048
    gemm_plugin = "auto"
    use_paged_context_fmha = true          # true/false become enable/disable
    extra_args = ["--log_level", "info"]   # passed as they are, except what names inputs or outputs

``extra_args`` may not name the options through which qframe tells ``trtllm-build`` what to
read and where to write (``PROTECTED``: ``--checkpoint_dir``, ``--output_dir`` and the model
and build definitions), in full, as an argparse abbreviation (``--output_d``) or with
``=VALUE``: argparse keeps the last occurrence, so the engine would land outside the output.

The engine is built into a hidden sibling of ``CHECKPOINT/engine`` and renamed into place only
when ``trtllm-build`` succeeds; its output streams to stderr as it runs.

Example::

    >>> spec = parse_build({"max_batch_size": 8, "use_paged_context_fmha": True})
    >>> command_line(Path("ckpt"), Path("ckpt/engine"), spec, "trtllm-build")[3:]
    ['--output_dir', 'ckpt/engine', '--max_batch_size', '8', '--use_paged_context_fmha', 'enable']
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qframe.errors import ExportError, QFrameError, RecipeError
from qframe.output import finish_partial, is_partial, make_partial, unproven

EXECUTABLE = "trtllm-build"
INSTALL = ("install TensorRT-LLM on a machine with an NVIDIA GPU: pip install tensorrt-llm "
           "--extra-index-url https://pypi.nvidia.com (see https://nvidia.github.io/TensorRT-LLM/installation/), "
           "or build the engine later where it is installed: trtllm-build --checkpoint_dir CHECKPOINT --output_dir ENGINE")
# trtllm-build's options this table takes, by how its parser reads them (commands/build.py and
# plugin.add_plugin_argument in TensorRT-LLM): integers; strings (plugin dtypes such as "auto",
# "float16" or "disable", kv_cache_type "paged"/"continuous"/"disabled", log_level); plugin
# features that take enable/disable (a TOML boolean here); and switches that take no value.
INT_OPTIONS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "opt_num_tokens", "max_beam_width",
               "max_prompt_embedding_table_size", "max_draft_len", "tokens_per_block", "workers")
STR_OPTIONS = ("gemm_plugin", "gpt_attention_plugin", "kv_cache_type", "log_level", "logits_dtype", "nccl_plugin",
               "moe_plugin", "lora_plugin", "gemm_swiglu_plugin", "low_latency_gemm_plugin",
               "speculative_decoding_mode", "profiling_verbosity")
TOGGLES = ("paged_kv_cache", "use_paged_context_fmha", "remove_input_padding", "context_fmha", "use_fp8_context_fmha",
           "multiple_profiles", "paged_state", "streamingllm", "reduce_fusion", "use_fused_mlp", "norm_quant_fusion",
           "user_buffer")
SWITCHES = ("fast_build", "strip_plan", "weight_streaming", "weight_sparsity", "gather_context_logits",
            "gather_generation_logits", "gather_all_token_logits", "monitor_memory", "enable_debug_output")
KV_CACHE_TYPES = ("paged", "continuous", "disabled")
# trtllm-build's options that name what it reads and where it writes (commands/build.py); qframe
# sets the first two itself, and the others would build another model or config than the checkpoint's.
PROTECTED = ("checkpoint_dir", "output_dir", "model_config", "build_config", "model_cls_file", "model_cls_name")


def protected_option(arg: str) -> str | None:
    """The protected option ``arg`` would set in ``trtllm-build``'s parser, if any: its name
    in full, any prefix of it (argparse takes unambiguous abbreviations, and refuses ambiguous
    ones anyway), with or without ``=VALUE``, after one dash or two.

    Example::

        >>> protected_option("--output_d=/elsewhere"), protected_option("--log_level")
        ('output_dir', None)
    """
    if not arg.startswith("-"):
        return None  # a value
    name = arg.lstrip("-").partition("=")[0]
    return next((option for option in PROTECTED if name and option.startswith(name)), None)


@dataclass(frozen=True)
class BuildSpec:
    """An engine build: whether ``trtllm-build`` must exist (``required``) and its options,
    in the order the recipe gave them."""

    required: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    extra_args: tuple[str, ...] = ()


def parse_build(value: Any) -> BuildSpec | None:
    """The ``build`` option: ``False``/``None`` -> no build; ``"auto"``, ``True`` or a table.

    Example::

        >>> parse_build("auto")
        BuildSpec(required=False, options=(), extra_args=())
        >>> parse_build({"max_batch_size": "8"})
        Traceback (most recent call last):
        qframe.errors.RecipeError: build.max_batch_size: '8' is not valid; expected an integer
    """
    if value is None or value is False:
        return None
    if value == "auto" or value is True:
        return BuildSpec(required=value is True)
    if not isinstance(value, dict):
        raise RecipeError("build", value, 'expected false, "auto", true or a table of trtllm-build options')
    table = dict(value)
    enabled = table.pop("enabled", "auto")
    if enabled not in ("auto", True, False):
        raise RecipeError("build.enabled", enabled, 'expected "auto" or true (or false: no build)')
    if enabled is False:
        return None
    extra = table.pop("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise RecipeError("build.extra_args", extra, "expected a list of strings")
    for arg in extra:
        option = protected_option(arg)
        if option is not None:
            raise RecipeError("build.extra_args", arg, f"it sets trtllm-build's --{option}, but qframe says what the "
                              "build reads and where it writes (the checkpoint it wrote, the engine inside the "
                              f"output); extra_args may not name --{', --'.join(PROTECTED)} or an abbreviation of one")
    allowed = ", ".join(("enabled", *INT_OPTIONS, *STR_OPTIONS, *TOGGLES, *SWITCHES, "extra_args"))
    for key, option in table.items():
        if key in INT_OPTIONS:
            ok, what = isinstance(option, int) and not isinstance(option, bool) and option > 0, "an integer"
        elif key in STR_OPTIONS:
            ok, what = isinstance(option, str) and option != "", "a string"
        elif key in TOGGLES or key in SWITCHES:
            ok, what = isinstance(option, bool), "true or false"
        else:
            raise RecipeError(f"build.{key}", option, f"unknown trtllm-build option; allowed: {allowed} "
                              "(anything else goes in extra_args)")
        if not ok:
            raise RecipeError(f"build.{key}", option, f"expected {what}")
        if key == "kv_cache_type" and option not in KV_CACHE_TYPES:
            raise RecipeError(f"build.{key}", option, f"expected one of {', '.join(KV_CACHE_TYPES)}")
    return BuildSpec(required=enabled is True, options=tuple(table.items()), extra_args=tuple(extra))


def command_line(checkpoint: Path, output: Path, spec: BuildSpec, executable: str) -> list[str]:
    """``trtllm-build --checkpoint_dir CHECKPOINT --output_dir OUTPUT`` and the spec's options."""
    args = [executable, "--checkpoint_dir", str(checkpoint), "--output_dir", str(output)]
    for key, value in spec.options:
        if key in SWITCHES:  # store_true flags: present or not
            args += [f"--{key}"] if value else []
        else:
            args += [f"--{key}", ("enable" if value else "disable") if isinstance(value, bool) else str(value)]
    return args + list(spec.extra_args)


def check_available(spec: BuildSpec | None) -> None:
    """Raise :class:`qframe.QFrameError` when ``spec`` requires ``trtllm-build`` and it is not on
    PATH: call it before calibrating, so that ``build = true`` fails in seconds, not after.

    Example::

        >>> check_available(parse_build("auto"))  # "auto" never fails
    """
    if spec is not None and spec.required and shutil.which(EXECUTABLE) is None:
        raise QFrameError(f"build = true, but {EXECUTABLE} is not on PATH; {INSTALL}")


def build_engine(checkpoint: Path, spec: BuildSpec) -> Path | None:
    """Build ``CHECKPOINT/engine`` with ``trtllm-build``; ``None`` where it is absent and not
    required. An engine of an earlier checkpoint is removed first: it no longer matches."""
    checkpoint = Path(checkpoint)
    engine = checkpoint / "engine"
    _remove_old_engine(engine)
    executable = shutil.which(EXECUTABLE)
    if executable is None:
        if spec.required:
            raise QFrameError(f"build = true, but {EXECUTABLE} is not on PATH. The checkpoint in {checkpoint} "
                              f"is written and valid; to build its engine, "
                              f"{INSTALL.replace('CHECKPOINT', shlex.quote(str(checkpoint))).replace('ENGINE', shlex.quote(str(engine)))}")
        print(f"qframe: {EXECUTABLE} is not on PATH, so no engine was built (build = \"auto\"); the checkpoint "
              f"in {checkpoint} is ready for it", file=sys.stderr)
        return None
    partial = make_partial(checkpoint / f".engine.partial-{os.getpid()}")  # a kill's leftover is known as ours
    args = command_line(checkpoint, partial, spec, executable)
    print("qframe: " + shlex.join(args), file=sys.stderr, flush=True)
    try:
        status, tail = _stream(args)
        if status != 0:
            # one paragraph: the output's last lines joined, the status said plainly (negative: a signal)
            lines = " | ".join(line.strip() for line in tail if line.strip()) or "(no output)"
            how = f"was killed by signal {-status}" if status < 0 else f"failed with exit status {status}"
            retry = shlex.join(command_line(checkpoint, engine, spec, EXECUTABLE))
            raise ExportError(f"{EXECUTABLE} {how}; its last lines: {lines}. "
                              f"The checkpoint in {checkpoint} is written and valid and no engine was kept; "
                              f"fix the cause and build it again with: {retry}")
        finish_partial(partial).rename(engine)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return engine


def _remove_old_engine(engine: Path) -> None:
    """Remove an engine built from an earlier checkpoint (it no longer matches), and partial
    engines of killed builds; an ``engine`` qframe cannot prove it built is kept, and refused."""
    for leftover in engine.parent.glob(".engine.partial-*"):
        if is_partial(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    if not engine.exists():
        return
    foreign = unproven(engine, limit=3)
    if foreign:
        raise QFrameError(f"{engine} holds what qframe did not build ({', '.join(foreign)}); move it away, "
                          "then build again")
    shutil.rmtree(engine)


def _stream(args: list[str]) -> tuple[int, deque]:
    """Run ``args``, copying their output to stderr line by line; the exit status and the
    last lines."""
    tail: deque = deque(maxlen=15)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
        return proc.wait(), tail
