"""Bad input is refused with exit status 2 and one short paragraph, never a traceback (issue 10).

Each case is a reproduction: before the fix it exited 1 with a traceback, ran without end, or
was accepted although it could do nothing. The command line runs in this process
(``qframe.cli.main``), so an exception other than qframe's own fails the test as a traceback
would; the Python API is checked where it is the natural entry point.
"""

from __future__ import annotations

import os
import signal
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

import qframe
from qframe.cli import main
from qframe.data import DataContext, calibration_windows
from qframe.errors import DataError, QFrameError, RecipeError
from qframe.testing import tiny_llama_model

W4 = """
[[stage]]
quantizer = "rtn"
weights = { bits = 4, group_size = 64 }
"""
W8A8 = """
[calibration]
dataset = "DATASET"
samples = 2
seq_len = 8
[[stage]]
quantizer = "rtn"
weights = { bits = 8 }
activations = { bits = 8 }
"""
KV_INT8 = """
[[stage]]
quantizer = "kv_cache"
activations = { bits = 8 }
"""
DEEP = 100_000


@pytest.fixture(autouse=True)
def builtins_only(qframe_registry, monkeypatch):
    """In-process runs see the built-in plugins only, whatever else is installed."""
    registry = qframe_registry()
    for module in ("qframe.plugins", "qframe.api"):
        monkeypatch.setattr(f"{module}.default_registry", lambda: registry)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny random Llama with SmolLM2's tokenizer, saved like a hub model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_model(vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def recipe(tmp_path):
    """``recipe(text)``: the path of a recipe file holding ``text``."""
    def write(text: str, name: str = "recipe.toml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


@contextmanager
def deadline(seconds: int = 60):
    """Fail instead of hanging where a regression would read a device or FIFO without end."""
    def expire(*_):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(capsys, *argv: str) -> str:
    """Run the command; assert exit status 2 and one short paragraph without a traceback; the message."""
    with deadline():
        status = main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    prefix = f"qframe {argv[0]}: error: "
    assert prefix in err, err
    message = err[err.index(prefix):].strip()  # after any progress output
    assert "\n" not in message and len(message) < 1000, message
    return message[len(prefix):]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# -- datasets: unreadable files, devices, FIFOs -----------------------------------------------------

def fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("case", ["jsonl not UTF-8", "jsonl folder", "text /dev/zero", "jsonl FIFO"])
def test_datasets_that_cannot_be_read_are_refused_naming_the_path(case, model_dir, recipe, tmp_path, capsys):
    if case == "jsonl not UTF-8":
        path = tmp_path / "bad.jsonl"
        path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe broken"}\n')
        spec, says = f"jsonl:{path}", "line 2 is not UTF-8"
    elif case == "jsonl folder":
        spec, says = f"jsonl:{tmp_path}", "is a folder"
    elif case == "text /dev/zero":
        spec, says = "text:/dev/zero", "'/dev/zero' is not a regular file"
    else:
        spec, says = f"jsonl:{fifo(tmp_path, 'data.jsonl')}", "is not a regular file"
    output = tmp_path / "out"
    message = refused(capsys, "apply", recipe(W8A8.replace("DATASET", spec)), "--model", str(model_dir),
                      "--output", str(output), "--device", "cpu")
    assert f"dataset '{spec}'" in message and says in message, message
    assert not output.exists()


def test_readers_refuse_devices_fifos_and_deep_json_through_the_api(tokenizer, tmp_path, qframe_registry):
    registry, context = qframe_registry(), DataContext(tokenizer, samples=2, seq_len=8)
    (tmp_path / "a.txt").write_text("fine text " * 50)
    fifo(tmp_path, "b.txt")  # in a folder, too
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * DEEP + "\n")
    with deadline():
        for spec, says in ((f"text:{tmp_path}", "b.txt' is not a regular file"),
                           ("jsonl:/dev/zero", "is not a regular file"),
                           (f"jsonl:{deep}", "line 1 nests arrays or objects too deeply")):
            with pytest.raises(DataError, match=says):
                calibration_windows(spec, context, registry)
    os.remove(tmp_path / "b.txt")
    assert calibration_windows(f"text:{tmp_path}", context, registry).ids.shape == (2, 8)  # regular files still read


# -- TOML nested or dotted without end --------------------------------------------------------------

def test_deep_arrays_in_a_recipe_and_in_set(recipe, capsys):
    path = recipe(W4 + "targets = " + "[" * DEEP + "]" * DEEP + "\n")
    assert refused(capsys, "validate", path) == f"{path}: malformed TOML: arrays or tables nested too deeply to parse"
    path = recipe(W4)
    message = refused(capsys, "validate", path, *sets("stage.0.targets=" + "[" * DEEP + "]" * DEEP))
    assert message.startswith(f"{path} (--set): stage.0.targets: '[[[[") and "nested too deeply" in message


def test_dotted_keys_too_long_to_parse_are_refused_before_parsing(recipe, capsys):
    # tomllib needs memory in the square of the key's length: this one would take tens of GB
    path = recipe("a." * DEEP + "b = 1\n" + W4)
    message = refused(capsys, "validate", path)
    assert message.startswith(f"{path}: line 1: a dotted key of more than 32 parts")


def test_recipe_files_that_are_not_recipes(tmp_path, capsys):
    message = refused(capsys, "validate", "/dev/zero")  # read without end before
    assert message == "cannot read recipe '/dev/zero': it is not a regular file (a device, FIFO or socket)"
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (1 << 20) + "\n" + W4)
    assert refused(capsys, "validate", str(huge)).startswith(f"recipe '{huge}' is larger than 1 MiB")
    with pytest.raises(QFrameError, match="it is a folder"):  # `qframe validate DIR` validates a checkpoint instead
        qframe.load_recipe(tmp_path)


# -- numbers no run can use -------------------------------------------------------------------------

HUGE = {
    # case: (--set overrides, the key the message names, what it says)
    "group_size 2**63-1": (["stage.0.weights.group_size=9223372036854775807"], "stage[0].weights.group_size",
                           "expected at most 16384 input channels per group"),
    "samples 10**12": (["calibration.samples=1000000000000"], "calibration.samples", "expected at most 1048576"),
    "seq_len 2**40": (["calibration.seq_len=1099511627776"], "calibration.seq_len", "expected at most 1048576"),
    "samples x seq_len": (["calibration.samples=1048576", "calibration.seq_len=1024"], "calibration.samples",
                          "calibration.samples × calibration.seq_len = 1073741824 tokens, more than 268435456"),
    "batch_size": (["calibration.batch_size=1000000000000"], "calibration.batch_size", "expected at most 1048576"),
    "seed 2**64": (["calibration.seed=18446744073709551616"], "calibration.seed", "fits in 64 bits"),
    "seed -1": (["calibration.seed=-1"], "calibration.seed", "expected an integer from 0 to 2**63 - 1"),
    "percentile nan": (["stage.0.activations={ bits = 8, calibrator = 'percentile', calibrator_options = "
                        "{ percentile = nan } }"], "stage[0].activations.calibrator_options.percentile",
                       "expected a finite number"),
    "mse step 2**70": (["stage.0.activations={ bits = 8, calibrator = 'mse', calibrator_options = "
                        "{ step = 1180591620717411303424 } }"], "stage[0].activations.calibrator_options.step",
                       "fits in 64 bits"),
    "gptq dampening inf": (["stage.0.quantizer='gptq'", "stage.0.options.dampening=inf"],
                           "stage[0].options.dampening", "expected a finite number"),
    "alpha_grid nested": (["stage.0.quantizer='smoothquant'", "stage.0.weights={ bits = 8 }",
                           "stage.0.activations={ bits = 8 }", "stage.0.options.alpha_grid=" + "[" * 20 + "]" * 20],
                          "stage[0].options.alpha_grid", "nested deeper than 8 levels"),
    "tp_size 2**40": (["export.backend='tensorrt-llm'", "stage.0.weights.group_size=128",
                       "export.tp_size=1099511627776"],
                      "export.tp_size", "expected at most 1024 ranks"),
    "pp_size 2**70": (["export.backend='tensorrt-llm'", "stage.0.weights.group_size=128",
                       "export.pp_size=1180591620717411303424"], "export.pp_size", "fits in 64 bits"),
    "max_shard_size": (["export.backend='hf'", "stage.0.weights.group_size=128",
                        f"export.max_shard_size='{'9' * 400}GB'"],
                       "export.max_shard_size", "expected a positive size"),
}


@pytest.mark.parametrize("overrides, key, says", HUGE.values(), ids=HUGE.keys())
def test_numbers_beyond_what_any_run_can_use(overrides, key, says, recipe, capsys):
    path = recipe(W4)
    message = refused(capsys, "validate", path, *sets(*overrides))
    assert message.startswith(f"{path}: {key}: "), message
    assert says in message, message


def test_bounds_through_the_api(recipe):
    with pytest.raises(RecipeError, match=r"calibration\.samples: 1000000000000 is not valid"):
        qframe.load_recipe(recipe(W4), overrides={"calibration.samples": 10**12})
    with pytest.raises(RecipeError, match="fits in 64 bits"):
        qframe.QuantArgs(granularity="tensor", calibrator_options={"bins": 2**70})
    with pytest.raises(RecipeError, match="expected at most 16384"):
        qframe.QuantArgs(bits=4, granularity="group", group_size=2**63 - 1)
    assert qframe.load_recipe(recipe(W4), overrides={"calibration.seed": 2**63 - 1}).calibration.seed == 2**63 - 1


# -- trtllm-build arguments that would redirect the build -------------------------------------------

BUILD = W4.replace("64", "128") + """
[export]
backend = "tensorrt-llm"
[export.build]
extra_args = ARGS
"""


@pytest.mark.parametrize("args", [
    ["--output_dir", "/elsewhere"], ["--output", "/elsewhere"], ["--output_d=/elsewhere"],
    ["--log_level", "info", "--checkpoint_dir=/other"], ["--model_cls_file", "evil.py"], ["--model_cls_name", "X"],
    ["--model_config", "c.json"], ["--build_config=b.json"], ["-output_dir", "/elsewhere"],
])
def test_build_arguments_may_not_redirect_inputs_or_outputs(args, recipe, capsys):
    path = recipe(BUILD.replace("ARGS", repr(args)))
    message = refused(capsys, "validate", path)
    assert message.startswith(f"{path}: export.build.extra_args: "), message
    assert "but qframe says what the build reads and where it writes" in message


def test_other_build_arguments_pass(recipe, capsys):
    assert main(["validate", recipe(BUILD.replace("ARGS", '["--log_level", "info", "--max_num_tokens=64"]'))]) == 0


# -- stages that would do nothing ------------------------------------------------------------------

@pytest.mark.parametrize("ignore", ['["*"]', '["re:.*"]', '["re:"]', '["Linear"]', '["Module"]', '["re:."]',
                                    '["lm_head", "re:^"]'])
def test_an_ignore_that_excludes_everything(ignore, recipe, capsys):
    path = recipe(W4 + f"ignore = {ignore}\n")
    message = refused(capsys, "validate", path)
    assert message.startswith(f"{path}: stage[0].ignore: "), message
    assert "would quantize nothing" in message


def test_an_ignore_that_excludes_everything_the_targets_name(recipe, capsys):
    path = recipe(W4 + 'targets = ["*down_proj"]\nignore = ["re:_proj$"]\n')
    assert "targets ['*down_proj'] select" in refused(capsys, "validate", path)


@pytest.mark.parametrize("ignore", ['["lm_head"]', '["re:layers\\\\.0\\\\."]', '["*down_proj", "*up_proj"]', "[]"])
def test_ignores_that_leave_something_pass(ignore, recipe, capsys):
    assert main(["validate", recipe(W4 + f"ignore = {ignore}\n")]) == 0, capsys.readouterr().err


def test_a_stage_with_no_targets(recipe, capsys):
    path = recipe(W4 + "targets = []\n")
    assert refused(capsys, "validate", path).startswith(f"{path}: stage[0].targets: [] is not valid; ")


def test_a_second_kv_cache_stage_is_refused_naming_both(recipe, capsys):
    path = recipe(W4 + KV_INT8 + KV_INT8.replace("bits = 8", 'type = "float", bits = 8'))
    message = refused(capsys, "validate", path)
    assert message.startswith(f"{path}: stage[2].quantizer: 'kv_cache' is not valid; stage[1] quantizes the KV cache")


def test_kv_cache_stages_with_disjoint_targets_pass(recipe, capsys):
    text = W4 + KV_INT8 + 'targets = ["re:layers\\\\.0\\\\."]\n' + KV_INT8 + 'targets = ["re:layers\\\\.1\\\\."]\n'
    assert main(["validate", recipe(text)]) == 0, capsys.readouterr().err


# -- what an export backend cannot write, known from the recipe alone ------------------------------

UNWRITABLE = {
    # case: (backend, weights, more TOML, what the message says)
    "trt group 48": ("tensorrt-llm", "{ bits = 4, group_size = 48 }", "", "take groups of 64 or 128"),
    "trt asymmetric": ("tensorrt-llm", "{ bits = 4, group_size = 128, symmetric = false }", "",
                       "set weights.symmetric = true"),
    "trt kv e5m2": ("tensorrt-llm", "{ bits = 4, group_size = 64 }",
                    KV_INT8.replace("bits = 8", 'type = "float", format = "e5m2"'), "KV cache cannot be written"),
    "trt mixed": ("tensorrt-llm", "{ bits = 4, group_size = 128 }\ntargets = ['*.mlp.*']",
                  "[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8 }\n", "different algorithms"),
    "hf asymmetric": ("hf", "{ bits = 4, group_size = 64, symmetric = false }", "", "no zero points"),
    "hf int8": ("hf", "{ bits = 8 }", "", "holds no int8 weights"),
    "hf int8 kv": ("hf", "{ bits = 4, group_size = 64 }", KV_INT8, "KV cache cannot be written"),
}


@pytest.mark.parametrize("backend, weights, more, says", UNWRITABLE.values(), ids=UNWRITABLE.keys())
def test_validate_and_dry_run_refuse_what_the_backend_cannot_write(backend, weights, more, says, recipe, model_dir,
                                                                   tmp_path, capsys):
    text = f"[[stage]]\nquantizer = 'rtn'\nweights = {weights}\n{more}\n[export]\nbackend = '{backend}'\n"
    path = recipe(text)
    for argv in (["validate", path], ["apply", path, "--model", str(model_dir), "--output", str(tmp_path / "o"),
                                      "--dry-run"]):
        message = refused(capsys, *argv)
        assert message.startswith(f"{path}: export.backend '{backend}' cannot write what this recipe makes: "), message
        assert says in message and ("stage[" in message), message


def test_what_the_backends_write_passes(recipe, capsys):
    for backend in ("tensorrt-llm", "hf"):
        text = W4.replace("64", "128") + KV_INT8.replace("bits = 8", 'type = "float", bits = 8') + \
               f"[export]\nbackend = '{backend}'\n"
        assert main(["validate", recipe(text)]) == 0, capsys.readouterr().err


# -- messages stay short and on one line ------------------------------------------------------------

def test_a_huge_value_is_shortened(recipe, capsys):
    path = recipe(W4)
    message = refused(capsys, "validate", path, *sets("stage.0.weights.bits=[" + "1," * 200_000 + "]"))
    assert message.startswith(f"{path}: stage[0].weights.bits: [1, 1, 1,") and "(200000 items)" in message


def test_newlines_in_values_and_keys_are_escaped(recipe, capsys):
    path = recipe(W4)
    message = refused(capsys, "validate", path, *sets('calibration.dataset="text:a\\nb?x=1"'))
    assert "'text:a\\nb?x=1'" in message
    path = recipe('"bad\\nkey" = 1\n' + W4)
    assert refused(capsys, "validate", path).startswith(f"{path}: bad\\nkey: 1 is not valid; unknown table")


def test_a_huge_key_is_shortened(recipe, capsys):
    path = recipe(W4)
    message = refused(capsys, "validate", path, *sets("x" * 100_000 + "=1"))
    assert "(100000 characters)" in message


# -- [model] nonfinite ------------------------------------------------------------------------------

def test_model_nonfinite_is_validated(recipe, capsys):
    path = recipe('[model]\nnonfinite = "skip"\n' + W4)
    assert refused(capsys, "validate", path) == f"{path}: model.nonfinite: 'skip' is not valid; allowed: error, zero"
    assert qframe.load_recipe(recipe('[model]\nnonfinite = "zero"\n' + W4)).model.nonfinite == "zero"
    assert qframe.load_recipe(recipe(W4)).model.nonfinite == "error"


@pytest.mark.parametrize("pattern, says", [("re:" + "(" * 2000 + ")" * 2000, "nest too deeply"),
                                           ("re:a{99999999999}", "repetition number is too large")])
def test_regular_expressions_python_cannot_compile(pattern, says, recipe, capsys):
    path = recipe(W4 + f"targets = ['{pattern}']\n")
    message = refused(capsys, "validate", path)
    assert message.startswith(f"{path}: stage[0].targets: 're:") and says in message, message


def test_documents_that_are_not_text(tokenizer, tmp_path, qframe_registry):
    registry, context = qframe_registry(), DataContext(tokenizer, samples=2, seq_len=8)
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "\\ud800 lone surrogate"}\n')
    with pytest.raises(DataError, match=r"line 2: field 'text' holds '\\ud800' at character 0, a lone UTF-16"):
        calibration_windows(f"jsonl:{path}", context, registry)

    class Numbers:  # a dataset plugin whose documents are not all strings
        @qframe.hookimpl
        def qframe_datasets():
            yield qframe.DatasetPlugin(name="numbers", summary="not text", factory=lambda *_: ["fine", 7])

    with pytest.raises(DataError, match="dataset 'numbers:': document 2 is 7, not text"):
        calibration_windows("numbers:", context, qframe_registry(Numbers))
