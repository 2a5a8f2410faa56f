"""Fuzzing the command line (issue 10, reliability): generated recipes, ``--set`` arguments,
datasets, output paths, and corruptions of model directories, qframe outputs and exported
checkpoints, against ``qframe validate | apply | eval | export``.

Every case holds the CLI to its contract: exit 0 with a correct result, or exit 2 with one
paragraph on stderr (no traceback, no blank line inside, under 2000 characters), and nothing
the user had is changed (every file of every input is hashed before and after). Exit 1 or
an exception escaping ``qframe.cli.main`` fails the test. The machinery is in
``tests/fuzzing.py``; each test records every case and fails at its end listing each distinct
failure with the shortest reproduction seen.

CI (the default) runs about 880 cases (about 20 s on two idle cores, plus what still-open
defects cost: a hang is cut at its time limit), derandomized, so every run sees the same
cases; the ``@example`` cases pinned below (the reproductions of what this suite found, and
the defects issue 10 names) run every time. ``pytest tests/test_fuzz.py --fuzz N`` (or
``QFRAME_FUZZ=N``) runs N times as many generated cases from a random seed, printed with the
table (``QFRAME_FUZZ_SEED=S`` repeats one): ``--fuzz 10`` is about 7,900 cases in 5 minutes.
A table of cases, distinct outcome paths, tracebacks and changed user files per test is
printed at the end of the session (``QFRAME_FUZZ_STATS=FILE`` also writes it, with every
path and failure, as JSON).

The tiny Llama here is ``qframe.testing.tiny_llama_model`` over a small byte-level BPE
tokenizer (``fuzzing.make_tiny_model``), not the session's SmolLM2 tokenizer: loading that one
costs 0.1-0.4 s per command and its model 16 MB per copied case, five times this budget.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, seed as hypothesis_seed, settings
from hypothesis import strategies as st

import fuzzing as fz
from fuzzing import chance, sampled

ROOT = Path(__file__).parents[1]

# Examples per test in CI; --fuzz N multiplies them.
EXAMPLES = {
    "recipes": 250, "set": 150, "raw": 50, "args": 40, "apply": 24, "model": 60, "models": 24, "output": 60,
    "export": 120, "datasets": 24, "paths": 30,
}
# Seconds one command may take before it counts as a hang: recipe checks take milliseconds; the
# rest load a model (generous: CI machines are shared).
TIMEOUT = {"fast": 10.0, "model": 20.0, "slow": 120.0}  # "model": a damaged tiny model loads in well under 1 s
EVAL = ["--samples", "1", "--seq-len", "16", "--dataset", "generated", "--json", "--device", "cpu"]
RTN_ARGS = ["--device", "cpu", "--set", "stage.0.weights.group_size=64"]
W8A8_ARGS = ["--device", "cpu", "--set", "calibration.samples=2", "--set", "calibration.seq_len=16"]  # + a dataset


def examples(*cases: dict) -> Callable:
    """Pinned cases (hypothesis ``@example``): the minimal reproductions of defects this suite
    found, and the defects issue 10 names, so that every run, CI's included, checks them."""
    def wrap(test):
        for kwargs in reversed(cases):
            test = example(**kwargs)(test)
        return test

    return wrap


C = fz.Corruption
STAGE_RTN = {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 64}}
RECIPE_EXAMPLES = examples(
    {"doc": {"stage": [{"quantizer": "rtn", "weights": {"bits": 4}, "targets": fz.Deep(1000)}]}},
    {"doc": {"stage": [{"quantizer": "rtn", "weights": {"bits": 4, "group_size": 2**63 - 1}}]}},
    {"doc": {"calibration": {"samples": 2**63 - 1, "seq_len": 2**63 - 1}, "stage": [
        {"quantizer": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}}]}},
    {"doc": {"stage": [STAGE_RTN], "export": {"backend": "tensorrt-llm", "build": {"extra_args": ["--output_dir", "/"]}}}},
    {"doc": {"stage": [{"quantizer": "rtn", "weights": {"bits": 8}, "activations": {
        "bits": 8, "calibrator": "percentile", "calibrator_options": {"percentile": math.nan, "bins": 2**40}}}]}},
    {"doc": {"stage": [{"quantizer": "rtn", "weights": {"bits": 4}, "targets": ["re:(a+)+$", "re:("]}]}},
)
SET_EXAMPLES = examples(
    {"name": "rtn_w4a16.toml", "overrides": ["stage.\u00b2.weights.bits=4"]},
    {"name": "rtn_w4a16.toml", "overrides": ["stage.0.weights.bits=" + "[" * 600 + "]" * 600]},
    {"name": "awq_w4a16.toml", "overrides": ["export.build.extra_args=['--checkpoint_dir', '/etc']"]},
)
LONG_ID = "[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 4, group_size = 64 }\n[model]\nid = \"" + "x" * 40_000 + "\"\n"
RAW_EXAMPLES = examples(
    {"content": LONG_ID, "special": 50, "kind": "directory"},
    {"content": "x = " + "[" * 100_000 + "]" * 100_000 + "\n", "special": 50, "kind": "directory"},
    {"content": b"\xff\xfe[[stage]]", "special": 50, "kind": "directory"},
)
MODEL_EXAMPLES = examples(
    {"corruption": C("model.safetensors", "sf-remove", "model.layers.0.mlp.up_proj.weight"), "command": "apply"},
    {"corruption": C("model.safetensors", "sf-add", "extra.tensor", "model.norm.weight"), "command": "apply"},
    {"corruption": C("model.safetensors", "sf-fill", "model.layers.0.self_attn.q_proj.weight", (math.nan, "one")),
     "command": "apply"},
    {"corruption": C("model.safetensors", "sf-fill", "model.embed_tokens.weight", (math.inf, "one")), "command": "eval"},
    {"corruption": C("config.json", "json-remove", ("tie_word_embeddings",)), "command": "eval"},
    {"corruption": C("config.json", "json-set", ("num_hidden_layers",), 1), "command": "apply"},
    {"corruption": C("model.safetensors", "sf-retype", "model.layers.1.mlp.down_proj.weight", "int32"), "command": "apply"},
    {"corruption": C("generation_config.json", "json-set", ("output_hidden_states",), fz.Deep(50)), "command": "eval"},
    {"corruption": C("model.safetensors", "sf-fill", "model.norm.weight", (1e30, "one")), "command": "eval"},
    {"corruption": C("config.json", "json-set", ("num_hidden_layers",), 2**63 - 1), "command": "apply"},
)
OUTPUT_EXAMPLES = examples(
    {"damage": ("b", C("model.safetensors", "sf-retype", "model.layers.1.self_attn.k_proj.weight_scale", "int32")),
     "command": "export-trt"},
    {"damage": ("a", C("qframe.json", "json-set", ("modules", "model.layers.0.mlp.down_proj", "in_features"), 10**12)),
     "command": "eval"},
    {"damage": ("a", C("qframe.json", "json-set", ("modules", "model.layers.0.mlp.down_proj", "weights", "group_size"),
                       math.nan)), "command": "export-trt"},
    {"damage": ("a", C("model.safetensors", "sf-fill", "model.norm.weight", (math.nan, "one"))), "command": "eval"},
    {"damage": ("a", C("qframe.json", "json-text", None, fz.Deep(100_000))), "command": "eval"},
    {"damage": ("a", C("qframe.json", "json-set", ("dtype",), "bogus")), "command": "export-hf"},
    {"damage": ("a", C("qframe.json", "json-remove", ("tied",))), "command": "export-hf"},
    {"damage": ("a", C("config.json", "json-remove", ("tie_word_embeddings",))), "command": "export-hf"},
    {"damage": ("a", C("qframe.json", "json-remove", ("modules", "model.layers.1.self_attn.o_proj", "bias"))),
     "command": "export-default"},
    {"damage": ("b", C("qframe.json", "json-remove", ("kv_cache", "model.layers.1.self_attn", "args",
                                                       "granularity"))), "command": "export-trt"},
    {"damage": ("a", C("qframe.json", "json-set", ("model",), "x")), "command": "eval"},
    {"damage": ("b", C("model.safetensors", "sf-reshape", "model.layers.0.self_attn.v_proj.weight_packed", "scalar")),
     "command": "export-hf"},
)
EXPORT_EXAMPLES = examples(
    {"damage": ("b_trt", C("config.json", "json-set", ("num_key_value_heads",), fz.Deep(5000, "table"))), "backend": None},
    {"damage": ("a_hf", C("config.json", "json-remove", ("hidden_size",))), "backend": "matching"},
    {"damage": ("a_trt", C("rank0.safetensors", "sf-fill", "transformer.layers.0.attention.qkv.weights_scaling_factor",
                           (math.nan, "one"))), "backend": None},
    {"damage": ("a_hf", C("model.safetensors", "sf-remove", "model.norm.weight")), "backend": None},
    {"damage": ("a_trt", C("rank0.safetensors", "sf-truncate", 1000)), "backend": None},
)
DATASET_EXAMPLES = examples(
    {"spec_case": ({"data.jsonl": b'{"text": "fine words here and more"}\n{"text": "\xff\xfe broken"}\n'},
                   "jsonl:{dir}/data.jsonl", "jsonl file: invalid UTF-8"), "command": "apply"},
    {"spec_case": ({"data.jsonl": ("[" * 100_000 + "]" * 100_000).encode()}, "jsonl:{dir}/data.jsonl",
                   "jsonl file: nested 100000 deep"), "command": "eval"},
    {"spec_case": ({"data.jsonl": b'{"text": "\\ud800 lone surrogate and more words"}\n' * 20}, "jsonl:{dir}/data.jsonl",
                   "jsonl file: an escaped lone surrogate"), "command": "apply"},
    {"spec_case": ({"sub": None}, "jsonl:{dir}/sub", "special: jsonl: a folder"), "command": "apply"},
)
PATH_EXAMPLES = examples(*[
    {"kind": kind, "command": command, "names": ["notes.txt"], "odd": "out put"}
    for kind, command in (("user-dir", "apply"), ("user-qframe-json", "apply"), ("own-output+user-file", "export"),
                          ("input-itself", "export"), ("input-parent", "apply"), ("forged-record", "export"))
])


# -- the world every case starts from ----------------------------------------------------------------------


@dataclass
class World:
    base: Path
    model: Path  # the tiny Llama every case reads (fuzzing.make_tiny_model): nothing may write into it
    corpus: Path
    jsonl: Path
    recipes: Path
    factor: int
    seed: int | None
    refs: Path
    cache: dict = field(default_factory=dict)
    counter: int = 0

    @property
    def replacements(self) -> dict[str, str]:
        return {str(self.base): "<tmp>", str(self.model): "<model>", str(ROOT): "<repo>"}

    def recipe(self, name: str) -> Path:
        return self.recipes / name

    def settings(self, name: str) -> Callable:
        """Hypothesis settings of one test: CI derandomized; nightly from a seed."""
        chosen = settings(max_examples=EXAMPLES[name] * self.factor, deadline=None, database=None,
                          derandomize=self.seed is None, suppress_health_check=list(HealthCheck),
                          phases=(Phase.explicit, Phase.generate), print_blob=False)

        def wrap(test):
            test = chosen(test)
            return hypothesis_seed(self.seed)(test) if self.seed is not None else test

        return wrap

    @contextmanager
    def case(self, stats: fz.Stats):
        """A fresh folder for one case, removed afterwards; the case reports to ``stats``."""
        self.counter += 1
        folder = self.base / "cases" / f"c{self.counter}"
        folder.mkdir(parents=True)
        case = fz.Case(stats, {**self.replacements, str(folder): "<case>"})
        try:
            yield case, folder
        finally:
            case.done()
            _remove(folder)

    def reference(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


def _remove(path: Path) -> None:
    def writable(func, name, _exc):
        try:
            os.chmod(os.path.dirname(name), 0o755)
            os.chmod(name, 0o755)
            func(name)
        except OSError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=writable)


class _Summary:
    """Prints the statistics table at the end of the session (a pytest plugin object)."""

    def __init__(self):
        self.worlds: list[World] = []

    def pytest_terminal_summary(self, terminalreporter):
        stats = list(fz.STATS.values())
        if not stats:
            return
        terminalreporter.section("qframe fuzz statistics")
        for world in self.worlds:
            terminalreporter.write_line(f"fuzz factor {world.factor}; "
                                        + (f"seed {world.seed} (QFRAME_FUZZ_SEED={world.seed} repeats it)"
                                           if world.seed is not None else "derandomized (CI)"))
        terminalreporter.write_line(fz.summary_table(stats))
        for s in stats:
            for key, seen in sorted(s.violations.items(), key=lambda kv: -kv[1].count):
                terminalreporter.write_line(f"  FAILURE {s.name}: x{seen.count} {key}")
        for s in stats:
            for note in s.notes:
                terminalreporter.write_line(f"  note {s.name}: {note}")
        target = os.environ.get("QFRAME_FUZZ_STATS")
        if target:
            Path(target).write_text(json.dumps(fz.stats_json(stats), indent=1, default=str))
            terminalreporter.write_line(f"statistics written to {target}")


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    from qframe.testing import make_registry

    factor = fz.fuzz_factor(request.config)
    env_seed = os.environ.get("QFRAME_FUZZ_SEED")
    seed = int(env_seed) if env_seed else (random.getrandbits(32) if factor > 1 else None)
    base = tmp_path_factory.mktemp("fuzz")
    recipes = base / "recipes"
    shutil.copytree(ROOT / "recipes", recipes)
    corpus = base / "corpus.txt"
    corpus.write_text(fz.GOOD_TEXT * 3)
    jsonl = base / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in fz.GOOD_TEXT.splitlines() * 3) + "\n")
    refs = base / "refs"
    refs.mkdir()
    model = fz.make_tiny_model(base / "tiny-llama")
    result = World(base, model, corpus, jsonl, recipes, factor, seed, refs)

    registry = make_registry()
    # The ready recipes name the demo GGUF, whose config takes seconds to read (its metadata
    # holds the whole tokenizer); read once here, as one process reads it, so that the recipe
    # checks are timed without it.
    from qframe.api import stand_in
    from qframe.model import resolve_source
    from qframe.recipe import load_recipe

    stand_in(resolve_source(load_recipe(recipes / "awq_w4a16.toml").model.id))
    summary = request.config.pluginmanager.get_plugin("qframe-fuzz-summary")
    if summary is None:
        summary = _Summary()
        request.config.pluginmanager.register(summary, "qframe-fuzz-summary")
    summary.worlds.append(result)
    with pytest.MonkeyPatch.context() as patch, _address_space_limit(16 << 30):
        # in-process runs see the built-in plugins only, built once (as tests/test_cli.py does)
        for module in ("qframe.plugins", "qframe.api", "qframe.checkpoint"):
            patch.setattr(f"{module}.default_registry", lambda: registry, raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.delenv("QFRAME_PAUSE_AT", raising=False)
        patch.chdir(base)  # anything written to a relative path lands here
        yield result


@contextmanager
def _address_space_limit(limit: int):
    """A backstop behind each case's time and memory limit (fuzzing.time_limit): this process
    may not map more than ``limit`` bytes while the module runs, so that no case can take the
    machine's memory from everyone else on it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= wanted:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _timed(name: str):
    """The test's Stats, with its wall time accumulated."""
    stats = fz.stats_for(name)
    return stats, time.perf_counter()


def _finish(stats: fz.Stats, started: float) -> None:
    stats.seconds += time.perf_counter() - started
    if stats.violations:
        pytest.fail(stats.report(), pytrace=False)


# -- helpers shared by the tests ---------------------------------------------------------------------------


def _json_out(case: fz.Case, result: fz.Result, what: str) -> Any:
    """``--json`` output: one strict JSON object on stdout (NaN is not JSON)."""
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(result.out, parse_constant=no_constants)
    except ValueError as exc:
        case.wrong(f"{what}: --json printed no strict JSON object ({fz.normalize(str(exc), limit=60)})", result.out[:800])
        return None
    if not isinstance(value, dict):
        case.wrong(f"{what}: --json printed {type(value).__name__}, not an object", result.out[:800])
        return None
    return value


def _perplexity(case: fz.Case, result: fz.Result) -> float | None:
    report = _json_out(case, result, "eval")
    if report is None:
        return None
    value = report.get("perplexity")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        case.wrong("eval exit 0 with a perplexity that is not a positive finite number", str(report)[:800])
        return None
    return float(value)


def _check_native(case: fz.Case, directory: Path, what: str, logits: bool = True) -> Any:
    """A qframe output loads back, holds quantized modules, and (``logits``: its input was an
    intact model) computes finite logits."""
    import torch

    import qframe

    try:
        qmodel = qframe.load_quantized(directory)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        case.wrong(f"{what}: exit 0 but the output does not load: {type(exc).__name__}: "
                   f"{fz.normalize(str(exc), case.replacements, 120)}", str(exc)[:1500])
        return None
    if not qmodel.quantized_modules():
        case.wrong(f"{what}: exit 0 but nothing was quantized", json.dumps(qmodel.manifest.get("recipe"))[:1500])
    layers = qmodel.manifest.get("layers") or []
    stages = (qmodel.manifest.get("recipe") or {}).get("stage") or []
    if layers and all(isinstance(layer, dict) and isinstance(layer.get("stages"), list) for layer in layers):
        for number, stage in enumerate(stages):
            touched = sum(len(entry.get("modules") or {}) for layer in layers for entry in layer["stages"]
                          if isinstance(entry, dict) and entry.get("stage") == number)
            if touched == 0:
                case.wrong(f"{what}: exit 0 but stage[N] ({stage.get('quantizer')}) changed no module",
                           json.dumps(stage)[:800])
    if not logits:
        return qmodel
    try:
        with torch.inference_mode():
            computed = qmodel.model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits
        if not bool(torch.isfinite(computed).all()):
            case.wrong(f"{what}: exit 0 but the output computes NaN or infinite logits")
    except Exception as exc:  # noqa: BLE001
        case.wrong(f"{what}: exit 0 but the output cannot run a forward pass: {type(exc).__name__}",
                   f"{type(exc).__name__}: {exc}"[:1500])
    return qmodel


def _validate_export(case: fz.Case, directory: Path, what: str) -> None:
    if not directory.is_dir():
        case.wrong(f"{what}: exit 0 but {directory.name}/ was not written")
        return
    result = case.run(["validate", str(directory)], TIMEOUT["slow"])
    if result.rc != 0 and result.exc is None:
        case.wrong(f"{what}: exit 0 but `qframe validate` rejects what it wrote: "
                   f"{fz.normalize(fz.error_message(result), case.replacements, 120)}", result.out[-1500:])


def _no_leftovers(case: fz.Case, target: Path, what: str) -> None:
    found = fz.leftovers(target)
    if found:
        case.fail("leftovers", f"{what}: hidden siblings left beside the output", ", ".join(found))


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


# -- clean artifacts, built once per module -----------------------------------------------------------------


def _must(result: fz.Result, what: str) -> None:
    if result.rc != 0:
        raise AssertionError(f"building the clean {what} failed (exit {result.rc}): {result.err[-2000:]}\n{result.tb}")


@pytest.fixture(scope="module")
def clean(world):
    """Clean outputs to corrupt: ``a`` (RTN int4 group 64; tensorrt_llm/ and hf/ inside),
    ``b`` (FP8 weights and static activations with an FP8 KV cache; hf/ inside), and the
    exports of them with other options, each with reference numbers."""
    refs = world.refs
    built: dict[str, Any] = {}
    a = refs / "a"
    _must(fz.run_cli(["apply", str(world.recipe("rtn_w4a16.toml")), "--model", str(world.model), "--output", str(a),
                      *RTN_ARGS, "--set", "export.backend=tensorrt-llm"]), "int4 output")
    _must(fz.run_cli(["export", str(a), "--backend", "hf"]), "int4 hf export")
    b = refs / "b"
    recipe = refs / "fp8_kv.toml"
    recipe.write_text(
        f"[calibration]\ndataset = {fz.toml_string('text:' + str(world.corpus))}\nsamples = 2\nseq_len = 16\n\n"
        "[[stage]]\nquantizer = \"fp8\"\n"
        "weights = { type = \"float\", bits = 8, granularity = \"tensor\" }\n"
        "activations = { type = \"float\", bits = 8, calibrator = \"minmax\" }\n\n"
        "[[stage]]\nquantizer = \"kv_cache\"\nactivations = { type = \"float\", bits = 8 }\n\n[export]\nbackend = \"hf\"\n")
    _must(fz.run_cli(["apply", str(recipe), "--model", str(world.model), "--output", str(b), "--device", "cpu"]),
          "fp8 output")
    exports = {
        ("a", "tensorrt-llm"): ["export", str(a), "--backend", "tensorrt-llm", "--output", str(refs / "a_trt")],
        ("b", "tensorrt-llm-tp2"): ["export", str(b), "--backend", "tensorrt-llm", "--set", "tp_size=2", "--output",
                                    str(refs / "b_trt_tp2")],
        ("a", "hf"): ["export", str(a), "--backend", "hf", "--output", str(refs / "a_hf")],
        ("b", "tensorrt-llm"): ["export", str(b), "--backend", "tensorrt-llm", "--output", str(refs / "b_trt")],
        ("b", "hf"): ["export", str(b), "--backend", "hf", "--output", str(refs / "b_hf")],
    }
    for key, argv in exports.items():
        _must(fz.run_cli(argv), f"export {key}")
        built[key] = Path(argv[argv.index("--output") + 1])
    ppl = {}
    for name, directory in (("a", a), ("b", b), ("model", world.model)):
        result = fz.run_cli(["eval", str(directory), *EVAL])
        _must(result, f"eval of {name}")
        ppl[name] = json.loads(result.out)["perplexity"]
    apply_ref = refs / "apply_ref"
    _must(fz.run_cli(["apply", str(world.recipe("rtn_w4a16.toml")), "--model", str(world.model), "--output",
                      str(apply_ref), *RTN_ARGS]), "reference apply")
    apply_ref_w8a8 = refs / "apply_ref_w8a8"
    _must(fz.run_cli(["apply", str(world.recipe("rtn_w8a8.toml")), "--model", str(world.model), "--output",
                      str(apply_ref_w8a8), *W8A8_ARGS, "--set", f"calibration.dataset=text:{world.corpus}"]),
          "reference apply (w8a8)")
    return {"a": a, "b": b, "exports": built, "ppl": ppl, "apply_ref": {"rtn": apply_ref, "w8a8": apply_ref_w8a8}}


# == 1. recipes against validate and apply --dry-run =========================================================


def _recipe_case(world: World, case: fz.Case, folder: Path, text: str | bytes, overrides: list[str] = ()) -> None:
    path = folder / "recipe.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
        case.note(f"recipe.toml (bytes): {fz.shell_text(repr(text), 600)}")
    else:
        path.write_text(text, encoding="utf-8")
        case.note("cat > recipe.toml <<'EOF'\n" + fz.shell_text(text) + "EOF")
    _recipe_commands(world, case, folder, path, overrides)


def _recipe_commands(world: World, case: fz.Case, folder: Path, path: Path, overrides: list[str] = (),
                     json_flag: bool = True) -> None:
    sets = [a for o in overrides for a in ("--set", o)]
    before = fz.snapshot(folder, world.model)
    validate = case.run(["validate", str(path), *sets], TIMEOUT["fast"])
    _quick(case, validate)
    if validate.rc == 0 and validate.exc is None and "valid (" not in validate.out:
        case.wrong("validate: exit 0 without saying the recipe is valid", validate.out[:500])
    argv = ["apply", str(path), "--model", str(world.model), "--dry-run", "--device", "cpu", "--output",
            str(folder / "out"), *sets]
    dry = case.run(argv + (["--json"] if json_flag else []), TIMEOUT["fast"])
    _quick(case, dry)
    if dry.rc == 0 and dry.exc is None and json_flag:
        summary = _json_out(case, dry, "apply --dry-run")
        if summary is not None and summary.get("dry_run") is not True:
            case.wrong("apply --dry-run --json: no \"dry_run\": true", dry.out[:500])
    if validate.exc is None and dry.exc is None and {validate.rc, dry.rc} == {0, 2}:
        said = fz.error_message(validate if validate.rc == 2 else dry)
        case.fail("disagreement", f"validate exit {validate.rc} but apply --dry-run exit {dry.rc}: "
                  f"{fz.normalize(said, case.replacements, 120)}", said[:1500])
    case.expect_unchanged(before, fz.snapshot(folder, world.model), what="validate/--dry-run")


RECIPE_SECONDS = 3.0  # checking a recipe takes milliseconds; this much is a hang in the making


def _quick(case: fz.Case, result: fz.Result) -> None:
    if result.exc is None and result.seconds > RECIPE_SECONDS:
        case.fail("timeout", f"{result.command}: a recipe check took more than {RECIPE_SECONDS:g} s",
                  f"{result.seconds:.1f} s")


def test_fuzz_recipes(world):
    """Generated recipe documents: every table and key of the recipe reference, with good,
    boundary and hostile values, against ``validate`` and ``apply --dry-run``."""
    stats, started = _timed("recipes: validate, apply --dry-run")
    strategy = fz.recipe_doc(str(world.model), str(world.corpus), str(world.jsonl))

    @world.settings("recipes")
    @given(doc=strategy)
    @RECIPE_EXAMPLES
    def case(doc):
        with world.case(stats) as (c, folder):
            _recipe_case(world, c, folder, fz.to_toml(doc))

    case()
    _finish(stats, started)


def test_fuzz_set_overrides(world):
    """``--set KEY=VALUE`` strings on the ready recipes, against ``validate`` and ``apply --dry-run``."""
    stats, started = _timed("--set: validate, apply --dry-run")
    names = sorted(p.name for p in world.recipes.glob("*.toml"))

    @world.settings("set")
    @given(name=st.sampled_from(names), overrides=st.lists(fz.set_argument(), min_size=1, max_size=3))
    @SET_EXAMPLES
    def case(name, overrides):
        with world.case(stats) as (c, folder):
            path = folder / name
            shutil.copy(world.recipe(name), path)
            c.note(f"cp recipes/{name} {name}")
            _recipe_commands(world, c, folder, path, overrides)

    case()
    _finish(stats, started)


@st.composite
def raw_recipe(draw):
    """Recipe files that are not clean TOML documents: malformed text, bytes, deep nesting, odd encodings."""
    good = "[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 4, group_size = 64 }\n"
    kind = draw(st.sampled_from(("text", "bytes", "deep", "bom", "crlf", "long", "nul", "dup", "mutated", "empty",
                                 "huge-int", "many-stages")))
    if kind == "text":
        return draw(st.text(fz.TEXT_CHARS, max_size=200))
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=200), sampled(b"\xff\xfe[[stage]]", good.encode("utf-16"),
                                                              b"[[stage]]\nquantizer = \"\xff\"\n")))
    if kind == "deep":
        depth = draw(sampled(100, 400, 1000, 10_000, 100_000))
        where = draw(sampled("stage.0.targets", "calibration.samples", "export.tp_size", "top", "stage.0.weights"))
        nested = draw(sampled("[" * depth + "]" * depth, "{ a = " * depth + "1" + " }" * depth))
        if where == "top":
            return good + f"x = {nested}\n"
        if where == "stage.0.targets":
            return good.replace("quantizer", f"targets = {nested}\nquantizer")
        if where == "stage.0.weights":
            return good.replace("{ bits = 4, group_size = 64 }", nested)
        table, key = where.split(".")
        return good + f"[{table}]\n{key} = {nested}\n"
    if kind == "bom":
        return b"\xef\xbb\xbf" + good.encode()
    if kind == "crlf":
        return good.replace("\n", "\r\n")
    if kind == "long":
        return good + "[model]\nid = \"" + "x" * draw(sampled(3_000, 10_000)) + "\"\n"
    if kind == "nul":
        return good.encode() + b"\x00"
    if kind == "dup":
        return good + "[export]\nbackend = \"qframe\"\n[export]\nbackend = \"hf\"\n"
    if kind == "empty":
        return draw(sampled("", "\n", "# only a comment\n", "[model]\n"))
    if kind == "huge-int":
        return good.replace("bits = 4", f"bits = {draw(sampled('9' * 5000, '0x' + 'f' * 100, '1' + '0' * 400))}")
    if kind == "many-stages":
        return good * draw(sampled(50, 1000))
    text = good
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(0, len(text) - 1)))
        text = text[:i] + draw(st.sampled_from(("", "[", "]", "\"", "=", "\n", "{", "'", "#"))) + text[i + 1:]
    return text


def test_fuzz_raw_recipe_files(world):
    """Recipe files that do not parse cleanly, and recipe paths that are not regular files."""
    stats, started = _timed("raw recipe files and paths")

    @world.settings("raw")
    @given(content=raw_recipe(), special=st.integers(0, 99), kind=st.sampled_from(
        ("directory", "dev-null", "missing", "newline-name", "symlink-loop", "qframe-output-dir", "unicode-name")))
    @RAW_EXAMPLES
    def case(content, special, kind):
        with world.case(stats) as (c, folder):
            if special >= 12:
                _recipe_case(world, c, folder, content)
                return
            if kind == "directory":
                path = folder / "recipes.d"
                path.mkdir()
            elif kind == "dev-null":
                path = Path("/dev/null")
            elif kind == "missing":
                path = folder / "no" / "such.toml"
            elif kind == "newline-name":
                path = folder / "two\n\nlines.toml"
                path.write_text("[[stage]]\nquantizer = \"hqq\"\nweights = { bits = 4 }\n")
            elif kind == "symlink-loop":
                path = folder / "loop.toml"
                path.symlink_to(path)
            elif kind == "qframe-output-dir":
                path = world.refs / "a"
            else:
                path = folder / "réceptà 🙂.toml"
                path.write_text("[[stage]]\nquantizer = \"rtn\"\nweights = { bits = 4 }\n")
            c.note(f"# RECIPE is a {kind}")
            before = fz.snapshot(world.refs / "a") if kind == "qframe-output-dir" else {}
            _recipe_commands(world, c, folder, path)
            if before:
                c.expect_unchanged(before, fz.snapshot(world.refs / "a"), what="a qframe output given as RECIPE")

    case()
    _finish(stats, started)


DEVICES = ("cpu", "cpu", "auto", "cuda", "cuda:99", "meta", "mps", "", "cpu:0", "xla", "CPU", "cuda:-1", "gpu")
EXPORT_SETS = ("tp_size=2", "pp_size=2", "dtype=float32", "dtype=bfloat16", "build=true", "build=\"auto\"",
               "build.max_batch_size=8", "build.extra_args=['--output_dir', '/']", "max_shard_size=1KB",
               "max_shard_size=100", "tp_size=0", "tp_size=9223372036854775807", "unknown=1", "dtype=float64", "tp_size",
               "=", "build.enabled=false", "build.kv_cache_type=paged", "build.workers=0")


@st.composite
def command_line(draw, world: World, clean: dict):
    """A whole command line: each command with a random choice of its flags and hostile values."""
    command = draw(sampled("eval", "eval", "apply", "export", "export", "validate", "plugins"))
    flag = lambda percent: chance(draw, percent)  # noqa: E731
    if command == "eval":
        argv = ["eval", str(draw(sampled(world.model, clean["a"], clean["b"])))]
        dataset = draw(sampled("generated", f"text:{world.corpus}", f"jsonl:{world.jsonl}", "", "unknown:x",
                               f"text:{world.corpus}?x=1"))
        argv += ["--dataset", dataset]
        seq = draw(sampled("16", "2", "1", "0", "-5", "x", "17")) if dataset == "generated" or flag(70) else draw(
            sampled("4096", str(2**20), str(2**20 + 1), str(2**63)))
        argv += ["--seq-len", seq]
        argv += ["--samples", draw(sampled("1", "1", "2", "0", "-1", str(2**40), "1.5"))]
        if flag(30):
            argv += ["--batch-size", draw(sampled("1", "0", "-1", str(2**40), "3"))]
        argv += ["--device", draw(st.sampled_from(DEVICES))] if flag(60) else []
        argv += ["--json"] if flag(70) else []
    elif command == "apply":
        argv = ["apply", str(world.recipe(draw(sampled("rtn_w4a16.toml", "mxfp4.toml", "rtn_w8a8_dynamic.toml")))),
                "--model", str(world.model), "--output", "{case}/out", "--set", "stage.0.weights.group_size=64"]
        argv += ["--device", draw(st.sampled_from(DEVICES))]
        argv += ["--dry-run"] if flag(30) else []
        argv += ["--json"] if flag(50) else []
        argv += ["--set", f"export.backend={draw(sampled('tensorrt-llm', 'hf', 'qframe'))}"] if flag(40) else []
    elif command == "export":
        argv = ["export", "{case}/src", "--backend", draw(sampled("tensorrt-llm", "hf", "qframe", "bogus", "", "HF"))]
        for _ in range(draw(st.integers(0, 2))):
            argv += ["--set", draw(st.sampled_from(EXPORT_SETS))]
        argv += ["--output", "{case}/x"] if flag(80) else []
    elif command == "validate":
        argv = ["validate", str(draw(sampled(clean["exports"][("a", "tensorrt-llm")], clean["exports"][("b", "hf")],
                                             clean["a"], world.recipe("fp8.toml"))))]
        argv += ["--backend", draw(sampled("tensorrt-llm", "hf", "qframe", "x"))] if flag(40) else []
        argv += ["--set", draw(st.sampled_from(EXPORT_SETS))] if flag(30) else []
    else:
        argv = ["plugins"] + (["--json"] if flag(50) else [])
    if flag(5):  # an unknown flag or a stray argument
        argv.insert(draw(st.integers(1, len(argv))), draw(sampled("--nope", "-x", "extra", "--json=1", "--")))
    return argv


def test_fuzz_command_arguments(world, clean):
    """Whole command lines: every command with random flags and hostile values (devices such as
    ``meta`` or ``cuda:99``, sizes of zero or 2**63, export ``--set`` options)."""
    stats, started = _timed("command lines: eval, apply, export, validate, plugins")

    @world.settings("args")
    @given(argv=command_line(world, clean))
    @examples({"argv": ["eval", str(world.model), "--seq-len", "16", "--samples", "1", "--device", "meta"]},
              {"argv": ["apply", str(world.recipe("rtn_w8a8_dynamic.toml")), "--model", str(world.model), "--output",
                        "{case}/out", "--device", "meta"]},
              {"argv": ["export", "{case}/src", "--backend", "tensorrt-llm", "--set",
                        "build.extra_args=['--output_dir', '/']", "--output", "{case}/x"]})
    def case(argv):
        with world.case(stats) as (c, folder):
            argv = [a.replace("{case}", str(folder)) for a in argv]
            source = folder / "src"
            if "export" in argv[:1]:
                _copy(clean["a"], source)
            watched = [folder, world.model, clean["a"], clean["b"]]
            before = fz.snapshot(*watched)
            result = c.run(argv, TIMEOUT["slow"])
            ok = result.rc == 0 and result.exc is None
            if ok and argv[0] == "eval" and "--json" in argv:
                _perplexity(c, result)
            if ok and argv[0] == "export":
                written = Path(argv[argv.index("--output") + 1]) if "--output" in argv else None
                backend = argv[argv.index("--backend") + 1]
                if written is None:
                    written = source / {"tensorrt-llm": "tensorrt_llm"}.get(backend, backend)
                if backend != "qframe":
                    _validate_export(c, written, "export")
            if ok and argv[0] == "apply" and "--dry-run" not in argv:
                _check_native(c, folder / "out", "apply")
            # the command's own outputs (none existed before); with build = true and no trtllm-build,
            # export exits 2 after its checkpoint is in place, by design (README, "Exporting")
            allowed = [folder / "out", folder / "x", source / "tensorrt_llm", source / "hf", source / "qframe"]
            c.expect_unchanged(before, fz.snapshot(*watched), allowed, what=argv[0])

    case()
    _finish(stats, started)


# == 2. apply for real, on a bounded sample ====================================================================


@st.composite
def runnable_recipe(draw, corpus: str):
    """Recipes that mostly can run on the tiny Llama, with boundary values here and there."""
    gs = draw(sampled(16, 32, 64, 64, 128, 7, 48, 100)) if chance(draw, 95) else 2**40
    calibrator = draw(st.sampled_from(fz.CALIBRATORS))
    options_for = {"percentile": {"percentile": draw(sampled(99.9, 99.0, 100.0, 50.0))}, "entropy": {"bins": draw(sampled(2048, 256, 16))},
                   "mse": {"bins": draw(sampled(2048, 256))}, "minmax": {}}
    static = {"bits": 8, "calibrator": calibrator}
    if chance(draw, 40) and options_for[calibrator]:
        static["calibrator_options"] = options_for[calibrator]
    template = draw(st.sampled_from(("rtn-w", "rtn-w-dyn", "rtn-w8a8", "fp8", "nvfp4", "mxfp4", "awq", "gptq",
                                     "smoothquant", "awq+gptq", "sq+rtn")))
    weights_int = {"bits": draw(sampled(2, 3, 4, 4, 5, 8)), "symmetric": draw(st.booleans())}
    grain = draw(sampled("channel", "group", "group", "tensor"))
    if grain == "group":
        weights_int["group_size"] = gs
    else:
        weights_int["granularity"] = grain
    stages: list[dict] = []
    if template == "rtn-w":
        stages.append({"quantizer": "rtn", "weights": weights_int | {"calibrator": draw(sampled("minmax", "mse"))}})
    elif template == "rtn-w-dyn":
        acts = draw(sampled({"bits": 8, "dynamic": True}, {"type": "float", "bits": 8, "dynamic": True}))
        stages.append({"quantizer": "rtn", "weights": weights_int, "activations": acts})
    elif template == "rtn-w8a8":
        stages.append({"quantizer": "rtn", "weights": {"bits": 8}, "activations": static})
    elif template == "fp8":
        fmt = draw(sampled("e4m3", "e5m2"))
        stages.append({"quantizer": "fp8", "weights": {"type": "float", "bits": 8, "format": fmt,
                                                       "granularity": draw(sampled("tensor", "channel"))},
                       "activations": {"type": "float", "bits": 8, "format": fmt, "calibrator": calibrator}})
    elif template == "nvfp4":
        stages.append({"quantizer": "nvfp4", "weights": {"type": "float", "bits": 4},
                       "activations": {"type": "float", "bits": 4, "dynamic": draw(st.booleans())}})
    elif template == "mxfp4":
        stages.append({"quantizer": "mxfp4", "weights": {"format": "mxfp4"},
                       "activations": {"format": "mxfp4", "dynamic": True}})
    elif template == "awq":
        stages.append({"quantizer": "awq", "weights": {"bits": 4, "group_size": gs},
                       "options": {"n_grid": draw(sampled(1, 2, 4)), "clip": draw(st.booleans()),
                                   "clip_grid": draw(sampled(1, 3)), "clip_tokens": draw(sampled(1, 16, 64)),
                                   "max_shrink": draw(sampled(0.5, 0.1, 0.99))}})
    elif template == "gptq":
        stages.append({"quantizer": "gptq", "weights": weights_int,
                       "options": {"block_size": draw(sampled(1, 8, 128)), "dampening": draw(sampled(0.01, 0.0, 10.0)),
                                   "act_order": draw(st.booleans()), "true_sequential": draw(st.booleans())}})
    elif template == "smoothquant":
        stages.append({"quantizer": "smoothquant", "weights": {"bits": 8}, "activations": static,
                       "options": {"alpha": draw(sampled(0.5, 0.01, 0.99)), "prescale": draw(st.booleans()),
                                   "alpha_grid": draw(sampled([], [0.3, 0.7]))}})
    elif template == "awq+gptq":
        stages.append({"quantizer": "awq", "weights": {"bits": 4, "group_size": 64},
                       "options": {"quantize": False, "n_grid": 2, "clip_grid": 2}})
        stages.append({"quantizer": "gptq", "weights": {"bits": 4, "group_size": 64}})
    else:
        stages.append({"quantizer": "smoothquant", "weights": {"bits": 8}, "activations": {"bits": 8},
                       "options": {"quantize": False}})
        stages.append({"quantizer": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}})
    if chance(draw, 25):
        stages.append({"quantizer": "kv_cache", "activations": draw(sampled({"bits": 8}, {"type": "float", "bits": 8},
                                                                            {"bits": 8, "calibrator": calibrator}))})
    if chance(draw, 20):
        stages[0]["targets"] = draw(sampled(["re:q_proj$"], ["*.mlp.*"], ["nomatch"], "Linear", ["LlamaMLP"]))
    if chance(draw, 10):
        stages[0]["ignore"] = draw(sampled(["*"], [], ["re:."], ["lm_head", "*.down_proj"]))
    dataset = draw(sampled("generated", "generated", f"text:{corpus}"))
    calibration: dict[str, Any] = {
        "dataset": dataset,
        "samples": draw(sampled(1, 2, 2)),
        "seq_len": draw(sampled(2, 8, 16, 16)),
        "seed": draw(sampled(0, 0, 7, 2**31 - 1)),
        "batch_size": draw(sampled(1, 2, 2, 64)),
        "propagate": draw(sampled("quantized", "float")),
    }
    if chance(draw, 12):  # one boundary value, now and then
        key, value = draw(st.sampled_from((("samples", 2**40), ("samples", 2**63 - 1), ("seed", 2**64), ("seed", -1),
                                           ("batch_size", 2**40), ("seq_len", 2**40), ("seq_len", 1))))
        calibration[key] = value
    doc: dict[str, Any] = {"calibration": calibration, "stage": stages}
    if chance(draw, 25):
        doc["model"] = {"dtype": draw(sampled("auto", "float32", "bfloat16", "float16"))}
    backend = draw(sampled("qframe", "qframe", "tensorrt-llm", "hf"))
    if backend == "tensorrt-llm":
        doc["export"] = {"backend": backend, "tp_size": draw(sampled(1, 2, 4)), "pp_size": draw(sampled(1, 2)),
                         "dtype": draw(sampled("auto", "float16", "bfloat16", "float32"))}
        if chance(draw, 30):
            doc["export"]["build"] = draw(sampled(False, "auto", {"enabled": "auto", "max_batch_size": 4,
                                                                  "extra_args": ["--log_level", "info"]}))
    elif backend == "hf":
        doc["export"] = {"backend": backend, "dtype": draw(sampled("auto", "float16", "bfloat16")),
                         "max_shard_size": draw(sampled("10GB", "1KB", "100000"))}
    return doc


def test_fuzz_apply_for_real(world):
    """``qframe apply`` end to end on the tiny Llama (2 samples of 16 tokens at most): on exit 0
    the output loads, computes finite logits and its backend directory validates."""
    stats, started = _timed("apply (real runs)")

    text = f"text:{world.corpus}"
    pinned = examples(
        {"doc": {"calibration": {"samples": 2, "seq_len": 16}, "stage": [
            {"quantizer": "rtn", "weights": {"bits": 4, "group_size": 2**40}}]}},
        {"doc": {"calibration": {"dataset": text, "samples": 2**40, "seq_len": 16}, "stage": [
            {"quantizer": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}}]}},
        {"doc": {"calibration": {"dataset": text, "samples": 2, "seq_len": 16}, "stage": [
            {"quantizer": "rtn", "weights": {"bits": 4}, "targets": ["LlamaMLP"]}]}},
        {"doc": {"stage": [STAGE_RTN], "export": {"backend": "tensorrt-llm", "build": {
            "enabled": "auto", "extra_args": ["--output_dir", str(world.base / "elsewhere")]}}}},
    )

    @world.settings("apply")
    @given(doc=runnable_recipe(str(world.corpus)))
    @pinned
    def case(doc):
        with world.case(stats) as (c, folder):
            text = fz.to_toml(doc)
            recipe = folder / "recipe.toml"
            recipe.write_text(text)
            c.note("cat > recipe.toml <<'EOF'\n" + text + "EOF")
            output = folder / "out"
            before = fz.snapshot(recipe, world.model, world.corpus)
            result = c.run(["apply", str(recipe), "--model", str(world.model), "--output", str(output), "--device", "cpu",
                            "--json"], TIMEOUT["slow"])
            if result.rc == 0 and result.exc is None:
                _json_out(c, result, "apply")
                _check_native(c, output, "apply")
                backend = doc.get("export", {}).get("backend", "qframe")
                if backend != "qframe":
                    _validate_export(c, output / {"tensorrt-llm": "tensorrt_llm"}.get(backend, backend), "apply")
            elif output.exists():
                c.wrong("apply failed but left an output directory", "\n".join(sorted(p.name for p in output.iterdir())))
            _no_leftovers(c, output, "apply")
            c.expect_unchanged(before, fz.snapshot(recipe, world.model, world.corpus), what="apply")

    case()
    _finish(stats, started)


# == 3. corruptions ==========================================================================================

MODEL_CONFIG_KEYS = (("hidden_size",), ("vocab_size",), ("num_hidden_layers",), ("num_attention_heads",),
                     ("num_key_value_heads",), ("intermediate_size",), ("tie_word_embeddings",), ("model_type",),
                     ("architectures",), ("dtype",), ("torch_dtype",), ("head_dim",), ("rms_norm_eps",),
                     ("max_position_embeddings",), ("hidden_act",), ("rope_parameters",), ("eos_token_id",))


_HEADS: dict = {}


MODEL_STRUCTURAL = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "head_dim", "tie_word_embeddings")


def _sf_head(path: Path) -> tuple[int, int, dict]:
    """(file size, header length, header) of a safetensors file, reading only its header."""
    info = path.stat()
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key not in _HEADS:
        with open(path, "rb") as handle:
            start = handle.read(8)
            length = int.from_bytes(start, "little")
            head = json.loads(handle.read(length))
        _HEADS[key] = (info.st_size, length, head)
    return _HEADS[key]


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        start = handle.read(8)
        return start + handle.read(int.from_bytes(start, "little"))


@st.composite
def model_corruption(draw, model: Path):
    config = json.loads((model / "config.json").read_text())
    which = draw(st.integers(0, 99))
    if which < 45:
        return draw(fz.safetensors_corruption("model.safetensors", _sf_head(model / "model.safetensors")))
    if which < 82:
        return draw(fz.json_corruption("config.json", config, MODEL_CONFIG_KEYS))
    if which < 92:
        name = draw(sampled("tokenizer.json", "tokenizer_config.json"))
        if name == "tokenizer_config.json" and chance(draw, 60):
            return draw(fz.json_corruption(name, json.loads((model / name).read_text())))
        return fz.Corruption(name, draw(sampled("delete", "bytes")), None, b"{" if chance(draw, 50) else b"")
    return draw(fz.json_corruption("generation_config.json", json.loads((model / "generation_config.json").read_text())))


def _model_oracle(corruption: fz.Corruption, command: str, header_length: int = 0) -> str:
    """``same``: exit 0 must give exactly the clean model's result; ``loads``: a finite one."""
    if corruption.file == "config.json":
        if corruption.op == "json-set" and corruption.arg[0] not in MODEL_STRUCTURAL:
            return "loads"
        return "same"
    if corruption.file != "model.safetensors":
        return "same" if command == "apply" else "loads"
    if corruption.op == "sf-retype" and corruption.value in ("float16", "bfloat16", "float64"):
        return "loads"
    if corruption.op == "sf-fill" and math.isfinite(corruption.value[0]):
        return "loads"
    if corruption.op == "sf-flip" and corruption.arg[0] >= 8 + header_length:
        return "loads"  # a byte of some weight: a different model, not a damaged file
    if corruption.op == "sf-reshape" and corruption.value == "transpose":
        return "loads"  # square matrices keep their shape
    return "same"


def test_fuzz_model_directory_corruptions(world, clean):
    """Corrupted model directories (config keys, truncated or flipped safetensors, tensors
    removed, renamed, reshaped, retyped, NaN) against ``apply`` and ``eval``."""
    stats, started = _timed("corrupt model dir: apply, eval")

    @world.settings("model")
    @given(corruption=model_corruption(world.model), command=sampled("apply", "apply", "apply", "eval", "eval", "eval", "apply-w8a8"))
    @MODEL_EXAMPLES
    def case(corruption, command):
        with world.case(stats) as (c, folder):
            model = _copy(world.model, folder / "model")
            c.note(f"cp -r TINY_LLAMA model   # tests/fuzzing.py make_tiny_model\n# corrupt: {corruption.describe()}")
            fz.apply_corruption(model, corruption)
            oracle = _model_oracle(corruption, command, _sf_head(world.model / "model.safetensors")[1])
            before = fz.snapshot(model)
            output = folder / "out"
            if command == "eval":
                result = c.run(["eval", str(model), *EVAL], TIMEOUT["model"])
                if result.rc == 0 and result.exc is None:
                    ppl = _perplexity(c, result)
                    if ppl is not None and oracle == "same" and not math.isclose(ppl, clean["ppl"]["model"], rel_tol=1e-6):
                        c.wrong(f"eval exit 0 on a damaged model with a different perplexity ({corruption.op} on "
                                f"{corruption.file})", f"perplexity {ppl} vs {clean['ppl']['model']} clean")
            else:
                recipe, extra, ref = (("rtn_w8a8.toml", [*W8A8_ARGS, "--set", f"calibration.dataset=text:{world.corpus}"],
                                       clean["apply_ref"]["w8a8"]) if command == "apply-w8a8"
                                      else ("rtn_w4a16.toml", RTN_ARGS, clean["apply_ref"]["rtn"]))
                result = c.run(["apply", str(world.recipe(recipe)), "--model", str(model), "--output", str(output), *extra],
                               TIMEOUT["model"])
                if result.rc == 0 and result.exc is None:
                    qmodel = _check_native(c, output, "apply", logits=oracle == "same")
                    if qmodel is not None and oracle == "same":
                        differs = fz.same_tensors(output / "model.safetensors", ref / "model.safetensors")
                        if differs:
                            c.wrong(f"apply exit 0 on a damaged model with a different result ({corruption.op} on "
                                    f"{corruption.file})", differs)
                    elif qmodel is not None:
                        bad = fz.finite_tensors(output / "model.safetensors")
                        if bad:
                            c.wrong("apply exit 0 writing NaN or infinite tensors", ", ".join(bad[:5]))
                _no_leftovers(c, output, "apply")
            c.expect_unchanged(before, fz.snapshot(model), what=f"{command} on a damaged model")

    case()
    _finish(stats, started)


MODEL_KINDS = ("qframe-output", "tensorrt-llm-dir", "hf-export-dir", "dev-null", "garbage-gguf", "empty-gguf",
               "no-config", "config-only", "no-tokenizer", "symlink", "dotted-path", "hub-id", "pkg-missing", "pkg-odd",
               "text-file", "model-in-subdir", "two-weight-files")


def test_fuzz_model_arguments(world, clean):
    """``--model`` (and ``eval MODEL``) given what is not a Hugging Face model folder: a qframe
    output, an exported checkpoint, /dev/null, a garbage .gguf, a folder without config or
    weights, a hub id offline, ``pkg:`` specs; and a symlink or dotted path to the real one."""
    stats, started = _timed("--model arguments: apply, eval")

    @world.settings("models")
    @given(kind=st.sampled_from(MODEL_KINDS), command=sampled("apply", "eval"),
           garbage=st.binary(min_size=0, max_size=64))
    def case(kind, command, garbage):
        with world.case(stats) as (c, folder):
            expect = "refuse"  # or "same": exit 0 must give the clean model's result; "any": it may do either
            if kind == "qframe-output":
                model = _copy(clean["a"], folder / "model")
            elif kind == "tensorrt-llm-dir":
                model = _copy(clean["exports"][("a", "tensorrt-llm")], folder / "model")
            elif kind == "hf-export-dir":
                model = _copy(clean["exports"][("b", "hf")], folder / "model")
                expect = "any"
            elif kind == "dev-null":
                model = Path("/dev/null")
            elif kind in ("garbage-gguf", "empty-gguf"):
                model = folder / "model.gguf"
                model.write_bytes(b"GGUF" + garbage if kind == "garbage-gguf" else b"")
            elif kind == "no-config":
                model = _copy(world.model, folder / "model")
                (model / "config.json").unlink()
            elif kind == "config-only":
                model = folder / "model"
                model.mkdir()
                shutil.copy(world.model / "config.json", model)
            elif kind == "no-tokenizer":
                model = folder / "model"
                model.mkdir()
                shutil.copy(world.model / "model.safetensors", model)
                shutil.copy(world.model / "config.json", model)
                expect = "any"
            elif kind == "symlink":
                model = folder / "link"
                model.symlink_to(world.model)
                expect = "same"
            elif kind == "dotted-path":
                model = Path(str(world.model) + "/../" + world.model.name + "/")
                expect = "same"
            elif kind == "hub-id":
                model = Path("qframe-fuzz/no-such-model")
            elif kind == "pkg-missing":
                model = Path("pkg:no_such_package_qframe/x.gguf")
            elif kind == "pkg-odd":
                model = Path("pkg:os/../../etc/passwd.gguf")
            elif kind == "text-file":
                model = folder / "model.txt"
                model.write_text("not a model")
            elif kind == "model-in-subdir":
                model = folder / "outer"
                _copy(world.model, model / "inner")
            else:
                model = _copy(world.model, folder / "model")
                shutil.copy(model / "model.safetensors", model / "model-00002-of-00002.safetensors")
                expect = "same"
            if command == "eval" and kind == "qframe-output":
                expect = "same"
            c.note(f"# MODEL is: {kind}")
            watched = [folder, world.model] + ([model] if model.is_absolute() else [])
            before = fz.snapshot(*watched)
            output = folder / "out"
            if command == "eval":
                result = c.run(["eval", str(model), *EVAL], TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    ppl = _perplexity(c, result)
                    reference = clean["ppl"]["a" if kind == "qframe-output" else "model"]
                    if ppl is not None and expect == "same" and not math.isclose(ppl, reference, rel_tol=1e-6):
                        c.wrong(f"eval {kind}: a different perplexity", f"{ppl} vs {reference}")
                    elif expect == "refuse":
                        c.wrong(f"eval {kind}: exit 0 (expected a refusal)")
            else:
                result = c.run(["apply", str(world.recipe("rtn_w4a16.toml")), "--model", str(model), "--output",
                                str(output), *RTN_ARGS], TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    if _check_native(c, output, f"apply --model {kind}") is not None and expect == "same":
                        differs = fz.same_tensors(output / "model.safetensors",
                                                  clean["apply_ref"]["rtn"] / "model.safetensors")
                        if differs:
                            c.wrong(f"apply --model {kind}: a different result", differs)
                    if expect == "refuse":
                        c.wrong(f"apply --model {kind}: exit 0 (expected a refusal)")
                _no_leftovers(c, output, "apply")
            c.expect_unchanged(before, fz.snapshot(*watched), [output], what=f"{command} --model {kind}")

    case()
    _finish(stats, started)


def _manifest_paths(manifest: dict) -> tuple[tuple, ...]:
    module = sorted(manifest["modules"])[0]
    paths = [("dtype",), ("format",), ("format_version",), ("tied",), ("modules",), ("model",), ("model", "location"),
             ("recipe",), ("layers",), ("tied", "lm_head.weight"), ("modules", module)]
    for key in ("in_features", "out_features", "bias", "weights", "activations", "input_prescale"):
        paths.append(("modules", module, key))
    for attention in sorted(manifest.get("kv_cache", {}))[:1]:  # a quantized cache's entry
        paths += [("kv_cache",), ("kv_cache", attention), ("kv_cache", attention, "shared"),
                  ("kv_cache", attention, "args"), ("kv_cache", attention, "args", "bits"),
                  ("kv_cache", attention, "args", "granularity")]
    for key in ("bits", "type", "symmetric", "granularity", "group_size", "format", "dynamic", "calibrator"):
        paths.append(("modules", module, "weights", key))
        paths.append(("modules", module, "activations", key))
    return tuple(paths)


@st.composite
def output_corruption(draw, out: Path):
    which = draw(st.integers(0, 99))
    if which < 45:
        manifest = json.loads((out / "qframe.json").read_text())
        return draw(fz.json_corruption("qframe.json", manifest, _manifest_paths(manifest)))
    if which < 80:
        return draw(fz.safetensors_corruption("model.safetensors", _sf_head(out / "model.safetensors")))
    if which < 92:
        return draw(fz.json_corruption("config.json", json.loads((out / "config.json").read_text()), MODEL_CONFIG_KEYS))
    if which < 96:
        return draw(fz.json_corruption(".qframe-files.json", json.loads((out / ".qframe-files.json").read_text())))
    return fz.Corruption(draw(sampled("tokenizer.json", "tokenizer_config.json")), draw(sampled("delete", "bytes")), None, b"")


def _output_oracle(corruption: fz.Corruption, out: Path) -> str:
    """``same``: exit 0 must give exactly the clean output's result; ``loads``: any finite one
    (a finite value changed in place is not something a loader can see)."""
    if corruption.file == "model.safetensors" and corruption.op in ("sf-fill", "sf-flip", "sf-reshape"):
        size, length, head = _sf_head(out / "model.safetensors")
        dtype = head.get(corruption.arg, {}).get("dtype") if isinstance(corruption.arg, str) else None
        floats = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")
        if corruption.op == "sf-fill" and (math.isfinite(corruption.value[0]) or dtype not in floats):
            return "loads"  # integer codes are "filled" with their largest code: still valid codes
        if corruption.op == "sf-flip" and corruption.arg[0] >= 8 + length:
            return "loads"  # a byte of some tensor's data
        if corruption.op == "sf-reshape" and corruption.value == "transpose" and len(set(
                head.get(corruption.arg, {}).get("shape", [0, 1]))) == 1:
            return "loads"  # a square matrix transposed keeps its shape
    if corruption.file == "qframe.json":
        path = corruption.arg or ()
        if corruption.op == "json-set" and (path[:1] == ("dtype",) or path[:1] == ("model",)):
            return "loads"
        if path[:1] == ("model",):
            return "loads"
        return "same"
    if corruption.file == "config.json":
        return "loads" if corruption.op == "json-set" else "same"
    if corruption.file == "model.safetensors":
        return "same"
    return "same" if corruption.file == ".qframe-files.json" else "loads"


def test_fuzz_output_corruptions(world, clean):
    """Corrupted qframe outputs (qframe.json keys removed, wrong types, absurd sizes, NaN;
    model.safetensors mutated; config.json; the file record) against ``eval``, ``export`` and
    ``validate``."""
    stats, started = _timed("corrupt qframe output: eval, export, validate")

    @world.settings("output")
    @given(damage=sampled("a", "a", "b").flatmap(lambda src: st.tuples(st.just(src), output_corruption(clean[src]))),
           command=sampled("eval", "export-trt", "export-hf", "export-default", "validate"))
    @OUTPUT_EXAMPLES
    def case(damage, command):
        source, corruption = damage
        with world.case(stats) as (c, folder):
            out = _copy(clean[source], folder / "out")
            c.note(f"# OUT: a clean qframe output ({'rtn int4 g64 + trt + hf' if source == 'a' else 'fp8 + fp8 kv + hf'})\n"
                   f"# corrupt: {corruption.describe()}")
            oracle = _output_oracle(corruption, clean[source])
            fz.apply_corruption(out, corruption)
            before = fz.snapshot(out)
            allowed: list[Path] = []
            if command == "eval":
                result = c.run(["eval", str(out), *EVAL], TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    ppl = _perplexity(c, result)
                    if ppl is not None and oracle == "same" and not math.isclose(ppl, clean["ppl"][source], rel_tol=1e-6):
                        c.wrong(f"eval exit 0 on a damaged output with a different perplexity ({corruption.op} on "
                                f"{corruption.file})", f"perplexity {ppl} vs {clean['ppl'][source]} clean")
            elif command == "validate":
                result = c.run(["validate", str(out)] + (["--backend", "qframe"] if corruption.op == "json-set" else []),
                               TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    c.wrong("validate: exit 0 on a qframe output directory (no backend wrote it)", result.out[:500])
            else:
                backend = "hf" if command == "export-hf" else "tensorrt-llm"
                sub = "hf" if backend == "hf" else "tensorrt_llm"
                target = out / sub if command == "export-default" else folder / "x"
                if command == "export-default":
                    allowed.append(target)
                    argv = ["export", str(out), "--backend", backend]
                else:
                    argv = ["export", str(out), "--backend", backend, "--output", str(target)]
                result = c.run(argv, TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    _validate_export(c, target, "export")
                    reference = clean["exports"][(source, backend)]
                    if oracle == "same" and target.is_dir():
                        differs = fz.same_directory_tensors(target, reference)
                        if differs:
                            c.wrong(f"export exit 0 from a damaged output with a different checkpoint ({corruption.op} "
                                    f"on {corruption.file})", differs)
                _no_leftovers(c, target, "export")
            c.expect_unchanged(before, fz.snapshot(out), allowed, what=f"{command} of a damaged output")

    case()
    _finish(stats, started)


TRT_STRUCTURAL = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_size", "intermediate_size", "dtype", "mapping", "quantization")
TRT_LAYOUT_FLAGS = ("attn_bias", "mlp_bias")  # true asks for bias tensors the checkpoint lacks
HF_STRUCTURAL = ("quantization_config", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings")
TRT_KEYS = tuple((k,) for k in TRT_STRUCTURAL + ("architecture", "logits_dtype", "producer", "max_position_embeddings",
                                                  "hidden_act", "norm_epsilon", "share_embedding_table")) + (
    ("mapping", "world_size"), ("mapping", "tp_size"), ("mapping", "pp_size"), ("quantization", "quant_algo"),
    ("quantization", "group_size"), ("quantization", "has_zero_point"), ("quantization", "kv_cache_quant_algo"),
    ("quantization", "exclude_modules"), ("quantization", "pre_quant_scale"))
HF_KEYS = (("quantization",), ("quantization", "quant_algo"), ("quantization", "kv_cache_quant_algo"),
           ("quantization", "group_size"), ("quantization", "exclude_modules"), ("producer",))
SF_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
             "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn"}


@st.composite
def export_corruption(draw, directory: Path, kind: str):
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    tensors = [f for f in files if f.endswith(".safetensors")]
    which = draw(st.integers(0, 99))
    if which < 50:
        name = draw(st.sampled_from(tensors))
        return draw(fz.safetensors_corruption(name, _sf_head(directory / name)))
    if which < 85:
        name = "config.json" if kind == "trt" or chance(draw, 40) else "hf_quant_config.json"
        important = TRT_KEYS if kind == "trt" else HF_KEYS if name == "hf_quant_config.json" else tuple(
            (k,) for k in HF_STRUCTURAL)
        return draw(fz.json_corruption(name, json.loads((directory / name).read_text()), important))
    if which < 93:
        return fz.Corruption(draw(st.sampled_from([f for f in files if f != ".qframe-files.json"])), "delete")
    extra = "rank9.safetensors" if kind == "trt" else "model-00002-of-00002.safetensors"
    return fz.Corruption(extra, "bytes", None, (directory / tensors[0]).read_bytes())


def _json_oracle(corruption: fz.Corruption, doc: dict, kind: str) -> str:
    path, removing = corruption.arg, corruption.op == "json-remove"
    if not removing and fz._has_path(doc, path) and fz.json_get(doc, path) == corruption.value \
            and type(fz.json_get(doc, path)) is type(corruption.value):
        return "any"  # set to what it was
    if kind == "trt" and corruption.file == "config.json":
        mapping = doc.get("mapping", {})
        quant = doc.get("quantization", {})
        if path[0] == "mapping":  # TensorRT-LLM's default mapping is one rank
            return "any" if removing and mapping.get("world_size") == 1 else "reject"
        if path[0] == "quantization" and len(path) > 1:
            key = path[1]
            if key == "exclude_modules":
                return "any"
            if key == "group_size" and quant.get("quant_algo") not in ("W4A16_AWQ", "W4A8_AWQ", "W4A16", "NVFP4"):
                return "any"  # not read for this algorithm
            if removing and key in ("has_zero_point", "pre_quant_scale") and quant.get(key) is False:
                return "any"  # removed, it defaults to what it was
            if removing and key == "kv_cache_quant_algo" and quant.get(key) is None:
                return "any"
            return "reject"
        if removing and path == ("head_size",) and doc.get("head_size") == doc.get("hidden_size", 0) // max(
                1, doc.get("num_attention_heads", 1)):
            return "any"  # TensorRT-LLM derives the same head size
        if removing and path[0] in TRT_LAYOUT_FLAGS and doc.get(path[0]) is False:
            return "any"  # removed, it defaults to false
        if path[0] in TRT_STRUCTURAL or path[0] in TRT_LAYOUT_FLAGS:
            return "reject"
        if path[0] == "architecture":
            same_layout = ("LlamaForCausalLM", "MistralForCausalLM", "InternLMForCausalLM", "SkyworkForCausalLM")
            return "any" if not removing and corruption.value in same_layout else "reject"
        return "any"
    if kind == "hf" and corruption.file == "hf_quant_config.json" and path[:2] in (
            ("quantization",), ("quantization", "quant_algo"), ("quantization", "kv_cache_quant_algo")):
        if removing and len(path) == 2 and doc.get("quantization", {}).get(path[1]) is None:
            return "any"  # a null removed reads as null
        return "reject"
    if kind == "hf" and corruption.file == "config.json" and path[0] in HF_STRUCTURAL:
        if removing and path[0] in ("head_dim", "tie_word_embeddings"):
            return "any"  # derived, or only says how lm_head is stored
        return "reject"
    return "any"


def _export_oracle(corruption: fz.Corruption, directory: Path, kind: str) -> str:
    """``reject``: the validator must not call it valid; ``any``: it may (the change is harmless,
    or what it breaks is not the validator's to know)."""
    if corruption.op == "bytes":
        # a stray extra shard beside model.safetensors (no index) is ignored by HF loaders
        return "any" if kind == "hf" and corruption.file.startswith("model-0") else "reject"
    if corruption.op == "delete":
        return "reject" if corruption.file.endswith(".safetensors") or corruption.file in (
            "config.json", "hf_quant_config.json") else "any"
    if corruption.op.startswith("json-"):
        if corruption.op == "json-text":
            return "any" if isinstance(corruption.value, str) and corruption.value.startswith("\ufeff") else "reject"
        doc = json.loads((directory / corruption.file).read_text())
        return _json_oracle(corruption, doc, kind)
    size, length, head = _sf_head(directory / corruption.file) if (directory / corruption.file).exists() else (0, 0, {})
    entry = head.get(corruption.arg, {}) if isinstance(corruption.arg, str) else {}
    if corruption.op == "sf-flip":
        data = _header_bytes(directory / corruption.file)
        position, mask = corruption.arg
        return "any" if (position >= 8 + length or fz.flip_is_benign(data, position, mask)) and position >= 8 else "reject"
    if corruption.op == "sf-retype":
        if SF_DTYPES.get(entry.get("dtype")) == corruption.value:
            return "any"
        # float to float: where TensorRT-LLM takes either (AWQ group scales in float32 or the model's
        # dtype) only the values change, which, as with sf-fill, no validator can know were meant
        # otherwise; hf checkpoints keep one dtype, so there it is damage unless no value changed
        lossless = _lossless_retype(directory / corruption.file, corruption.arg, corruption.value)
        return "any" if lossless or (kind == "trt" and _float_retype(entry.get("dtype"), corruption.value)) else "reject"
    if corruption.op == "sf-reshape":
        shape = entry.get("shape", [])
        new = {"flatten": [math.prod(shape)] if shape else [1], "unsqueeze": [1, *shape], "scalar": [],
               "empty": [0], "transpose": shape[::-1] if len(shape) == 2 else shape,
               "drop-row": [shape[0] - 1, *shape[1:]] if shape and shape[0] > 1 else shape,
               "add-row": [shape[0] + 1, *shape[1:]] if shape and shape[0] else shape}.get(corruption.value)
        # TensorRT-LLM's Parameter takes a 0-d value for a one-element one (the validator says why)
        one_element_scalar = kind == "trt" and new == [] and math.prod(shape) == 1
        return "any" if new == shape or one_element_scalar else "reject"
    if corruption.op == "sf-fill":
        value, _ = corruption.value
        scale = "scal" in corruption.arg
        if kind == "trt" and scale and not (math.isfinite(value) and value >= 0):
            return "reject"  # (zero is a valid scale of an all-zero weight group)
        return "any"
    if corruption.op == "sf-add":
        return "reject" if kind == "trt" else "any"
    return "reject"  # truncate, header length, remove, rename


def _float_retype(old: str | None, new: str) -> bool:
    return SF_DTYPES.get(old or "", "").startswith(("float16", "bfloat16", "float32")) and new in (
        "float16", "bfloat16", "float32")


def _lossless_retype(path: Path, name: str, dtype: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        tensor = handle.get_tensor(name)
    new = getattr(torch, dtype, None)
    if not (tensor.is_floating_point() and isinstance(new, torch.dtype) and new.is_floating_point):
        return False
    return bool(torch.equal(tensor.to(new).to(tensor.dtype), tensor))


def test_fuzz_exported_checkpoint_corruptions(world, clean):
    """Corrupted TensorRT-LLM (config.json, rank*.safetensors) and unified HF checkpoints against
    ``qframe validate DIR``: a damaged checkpoint must never be called valid."""
    stats, started = _timed("corrupt exported checkpoint: validate")
    sources = {"a_trt": ("trt", clean["exports"][("a", "tensorrt-llm")]),
               "b_trt_tp2": ("trt", clean["exports"][("b", "tensorrt-llm-tp2")]),
               "b_trt": ("trt", clean["exports"][("b", "tensorrt-llm")]),
               "a_hf": ("hf", clean["exports"][("a", "hf")]), "b_hf": ("hf", clean["exports"][("b", "hf")])}

    @world.settings("export")
    @given(damage=st.sampled_from(sorted(sources)).flatmap(
               lambda n: st.tuples(st.just(n), export_corruption(sources[n][1], sources[n][0]))),
           backend=sampled(None, None, "matching", "other", "qframe", "bogus"))
    @EXPORT_EXAMPLES
    def case(damage, backend):
        name, corruption = damage
        kind, source = sources[name]
        with world.case(stats) as (c, folder):
            directory = _copy(source, folder / name)
            c.note(f"# {name}: a clean export (qframe export ... --output {name})\n# corrupt: {corruption.describe()}")
            oracle = _export_oracle(corruption, source, kind)
            fz.apply_corruption(directory, corruption)
            before = fz.snapshot(directory)
            flag = {"matching": "tensorrt-llm" if kind == "trt" else "hf", "other": "hf" if kind == "trt" else "tensorrt-llm",
                    "qframe": "qframe", "bogus": "no-such-backend"}.get(backend)
            result = c.run(["validate", str(directory)] + (["--backend", flag] if flag else []), TIMEOUT["slow"])
            if result.rc == 0 and result.exc is None:
                if backend in ("other", "qframe", "bogus"):
                    c.wrong(f"validate --backend {flag} calls a {kind} checkpoint valid")
                elif oracle == "reject":
                    c.wrong(f"validate calls a damaged {kind} checkpoint valid ({corruption.op} on "
                            f"{corruption.file.replace('rank1', 'rankN')})", corruption.describe())
            c.expect_unchanged(before, fz.snapshot(directory), what="validate of a damaged checkpoint")

    case()
    _finish(stats, started)


# == 4. datasets =============================================================================================


@st.composite
def dataset_case(draw, big: int):
    """(files to write, the spec with {dir} for the case folder, a label)."""
    kind = draw(st.sampled_from(("text", "text", "jsonl", "jsonl", "text-dir", "special", "hf-local")))
    if kind == "text":
        label, content = draw(fz.text_bytes(big))
        return {"data.txt": content}, "text:{dir}/data.txt", f"text file: {label}"
    if kind == "jsonl":
        content = draw(fz.jsonl_bytes(big))
        field = draw(sampled("", "?field=text", "?field=other", "?field=", "?field=text&field=x", "?x=1", "?field=TEXT"))
        return {"data.jsonl": content}, "jsonl:{dir}/data.jsonl" + field, "jsonl file"
    if kind == "text-dir":
        files: dict[str, bytes | None] = {}
        for i in range(draw(st.integers(0, 3))):
            label, content = draw(fz.text_bytes(big // 10))
            files[draw(sampled(f"d/{i}.txt", f"d/sub/{i}.txt", f"d/{i}.md", f"d/.hidden{i}.txt"))] = content
        if chance(draw, 30):
            files["d/folder.txt"] = None  # a directory named like a text file
        files.setdefault("d", None)
        return files, "text:{dir}/d", "text folder"
    if kind == "hf-local":
        return {"hfdata/train.jsonl": b'{"text": "hello world, this is a local dataset with enough words"}\n' * 20}, \
            draw(sampled("hf:{dir}/hfdata", "hf:{dir}/hfdata?split=test", "hf:{dir}/hfdata?field=nope")), "hf local"
    special = draw(sampled("text:/dev/null", "jsonl:/dev/null", "jsonl:{dir}", "text:{dir}/missing.txt", "text:",
                           "jsonl:{dir}/two\n\nlines.jsonl", "text:{dir}/ünï 🙂.txt", "jsonl:{dir}/sub", "text:~/no-such",
                           "text:/proc/self/status", "text:{dir}/loop.txt", "generated?x=1", "text:{dir}/d?"))
    files = {"ünï 🙂.txt": fz.GOOD_TEXT.encode(), "two\n\nlines.jsonl": b'{"text": "x"}\n', "sub": None}
    return files, special, f"special: {special}"


def test_fuzz_datasets(world):
    """Calibration and evaluation data: invalid UTF-8, empty files, folders, /dev/null, huge
    lines, wrong jsonl fields, against ``apply`` (static activations) and ``eval``."""
    stats, started = _timed("datasets: apply, eval")
    big = 200_000 * min(world.factor, 10)

    @world.settings("datasets")
    @given(spec_case=dataset_case(big), command=sampled("apply", "eval"))
    @DATASET_EXAMPLES
    def case(spec_case, command):
        files, template, label = spec_case
        with world.case(stats) as (c, folder):
            data = folder / "data"
            data.mkdir()
            fz.write_files(data, files)
            if "loop.txt" in template:
                (data / "loop.txt").symlink_to(data / "loop.txt")
            spec = template.replace("{dir}", str(data))
            c.note(f"# {label}; files: " + ", ".join(f"{n} ({'folder' if v is None else f'{len(v)} bytes'})"
                                                   for n, v in files.items())
                   + ("\n# first bytes: " + repr(next((v for v in files.values() if v), b"")[:200]) if files else ""))
            before = fz.snapshot(data, world.model)
            output = folder / "out"
            if command == "eval":
                result = c.run(["eval", str(world.model), "--dataset", spec, "--samples", "1", "--seq-len", "16",
                                "--json", "--device", "cpu"], TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    _perplexity(c, result)
            else:
                result = c.run(["apply", str(world.recipe("rtn_w8a8.toml")), "--model", str(world.model), "--output",
                                str(output), *W8A8_ARGS, "--set", f"calibration.dataset={fz.toml_string(spec)}"],
                               TIMEOUT["slow"])
                if result.rc == 0 and result.exc is None:
                    qmodel = _check_native(c, output, "apply")
                    recorded = (qmodel.manifest.get("dataset") or {}) if qmodel is not None else {}
                    if qmodel is not None and (recorded.get("spec") != spec or not recorded.get("sha256")):
                        c.wrong("apply: the manifest does not record the dataset it calibrated on", str(recorded)[:500])
                _no_leftovers(c, output, "apply")
            c.expect_unchanged(before, fz.snapshot(data, world.model), what=f"{command} reading a dataset")

    case()
    _finish(stats, started)


# == 5. --output paths =======================================================================================

PATH_KINDS = ("missing", "empty-dir", "own-output", "file", "through-file", "user-dir", "user-qframe-json",
              "own-output+user-file", "own-output-modified", "symlink-to-user-dir", "symlink-to-own-output",
              "dangling-symlink", "read-only-parent", "input-itself", "input-parent", "inside-input", "long-name",
              "odd-name", "forged-record")
REPLACEABLE = {"missing", "empty-dir", "own-output", "long-name", "odd-name", "inside-input", "dangling-symlink"}
MUST_REFUSE = {"file", "through-file", "user-dir", "user-qframe-json", "own-output+user-file", "own-output-modified",
               "symlink-to-user-dir", "symlink-to-own-output", "input-itself", "input-parent", "forged-record"}


def _user_files(directory: Path, names: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(f"the user's own {name}\n")


def test_fuzz_output_paths(world, clean):
    """``--output`` of ``apply`` and ``export``: an existing file, a path through a file, a
    symlink, someone else's folder (its files must survive untouched, exit 2), qframe's own
    output (replaced), the command's own input, odd names."""
    stats, started = _timed("--output paths: apply, export")
    if os.geteuid() == 0:
        stats.notes.append("read-only directories cannot be tested as root (permission checks do not apply)")

    @world.settings("paths")
    @given(kind=st.sampled_from(PATH_KINDS), command=sampled("apply", "export"),
           names=st.lists(sampled("notes.txt", "thesis.tex", ".hidden", "sub/deep.bin", "qframe.json", "model.safetensors",
                                  "config.json"), min_size=1, max_size=3, unique=True),
           odd=sampled("out put", "ünï 🙂", "two\n\nlines", "-dash", "out.toml", ".hidden-out", "a" * 250, "x*[?]"))
    @PATH_EXAMPLES
    def case(kind, command, names, odd):
        if kind == "read-only-parent" and os.geteuid() == 0:
            return  # root writes anywhere: nothing to test
        with world.case(stats) as (c, folder):
            inputs = folder / "inputs"
            inputs.mkdir()
            if command == "apply":
                source = _copy(world.model, inputs / "model")
                own = clean["a"]  # a sealed qframe output, replaceable by apply
            else:
                source = _copy(clean["a"], inputs / "out")
                own = clean["exports"][("a", "tensorrt-llm")]  # a sealed TensorRT-LLM checkpoint
            place = folder / "place"
            place.mkdir()
            target = place / "target"
            if kind == "empty-dir":
                target.mkdir()
            elif kind == "own-output":
                _copy(own, target)
            elif kind == "file":
                target.write_text("the user's file\n")
            elif kind == "through-file":
                (place / "file").write_text("the user's file\n")
                target = place / "file" / "sub" / "target"
            elif kind == "user-dir":
                _user_files(target, names)
            elif kind == "user-qframe-json":
                _user_files(target, names + ["qframe.json"])
            elif kind == "own-output+user-file":
                _copy(own, target)
                _user_files(target, [n for n in names if not (target / n).exists()] or ["notes.txt.user"])
            elif kind == "own-output-modified":
                _copy(own, target)
                victim = sorted(p for p in target.iterdir() if p.is_file() and p.name != ".qframe-files.json")[0]
                victim.write_bytes(victim.read_bytes() + b" ")
            elif kind == "symlink-to-user-dir":
                _user_files(place / "real", names)
                target.symlink_to(place / "real")
            elif kind == "symlink-to-own-output":
                _copy(own, place / "real")
                target.symlink_to(place / "real")
            elif kind == "dangling-symlink":
                target.symlink_to(place / "nowhere")
            elif kind == "read-only-parent":
                place.chmod(0o555)
            elif kind == "input-itself":
                target = source
            elif kind == "input-parent":
                target = inputs
            elif kind == "inside-input":
                target = source / "sub"
            elif kind == "long-name":
                target = place / ("n" * 250)
            elif kind == "odd-name":
                target = place / odd
            elif kind == "forged-record":
                _user_files(target, names)
                (target / ".qframe-files.json").write_text(json.dumps({"format": "qframe.files", "files": {
                    n: {"size": 1, "sha256": "0" * 64} for n in names}}))
            c.note(f"# --output is: {kind}" + (f" ({', '.join(names)})" if "user" in kind else ""))
            before = fz.snapshot(folder)
            if command == "apply":
                argv = ["apply", str(world.recipe("rtn_w4a16.toml")), "--model", str(source), "--output", str(target),
                        *RTN_ARGS]
            else:
                argv = ["export", str(source), "--backend", "tensorrt-llm", "--output", str(target)]
            result = c.run(argv, TIMEOUT["slow"])
            ok = result.rc == 0 and result.exc is None
            if ok and kind in MUST_REFUSE:
                c.wrong(f"{command} --output {kind}: exit 0 (it must refuse, exit 2)")
            if ok:
                written = target.resolve() if target.is_symlink() else target
                if command == "apply":
                    _check_native(c, written, f"apply --output {kind}")
                else:
                    _validate_export(c, written, f"export --output {kind}")
            allowed = [target] if ok and kind in REPLACEABLE else []
            if ok and kind == "dangling-symlink":
                allowed.append(place / "nowhere")
            if kind == "read-only-parent":
                place.chmod(0o755)
            c.expect_unchanged(before, fz.snapshot(folder), allowed, what=f"{command} --output {kind}")
            _no_leftovers(c, target, command)

    case()
    _finish(stats, started)
