"""Recipes: parsing, --set overrides, validation against plugins, and scheme matching."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from qframe import QFrameError, QuantArgs, QuantScheme, RecipeError, load_recipe
from qframe.recipe import resolve

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))

W4 = """
[[stage]]
quantizer = "rtn"
weights = { bits = 4, group_size = 128 }
"""


@pytest.fixture
def check(tmp_path, qframe_registry):
    """``check(toml, overrides)``: write a recipe file, load it and resolve it against the
    built-in plugins; returns the plan."""
    registry = qframe_registry()

    def run(text: str, overrides=None):
        path = tmp_path / "recipe.toml"
        path.write_text(textwrap.dedent(text))
        return resolve(load_recipe(path, overrides), registry)

    return run


def test_recipes_in_the_repository_validate(qframe_registry):
    assert {p.name for p in RECIPES} >= {"rtn_w4a16.toml", "rtn_w8a8.toml", "rtn_w8a8_dynamic.toml"}
    registry = qframe_registry()
    for path in RECIPES:
        plan = resolve(load_recipe(path), registry)
        assert plan.stages and plan.recipe.source == str(path)


def test_a_minimal_recipe_and_its_defaults(check):
    plan = check(W4)
    recipe = plan.recipe
    assert (recipe.model.id, recipe.model.dtype) == (None, "auto")
    assert recipe.calibration.dataset == "generated" and recipe.export.backend == "qframe"
    [stage] = plan.stages
    scheme = stage.spec.scheme
    assert (scheme.targets, scheme.ignore, scheme.activations) == (("Linear", "Experts"), ("lm_head",), None)
    assert scheme.weights == QuantArgs(bits=4, granularity="group", group_size=128)
    assert not plan.needs_calibration_data
    assert recipe.to_dict()["stage"][0]["weights"]["group_size"] == 128


def test_activation_defaults_follow_dynamic(check):
    static = check(W4 + "activations = { bits = 8 }\n")
    dynamic = check(W4 + "activations = { bits = 8, dynamic = true }\n")
    assert static.stages[0].spec.scheme.activations.granularity == "tensor"
    assert dynamic.stages[0].spec.scheme.activations.granularity == "token"
    assert static.needs_calibration_data and not dynamic.needs_calibration_data


# Each case: a recipe, the key path the error names, the bad value as the message shows it,
# and a fragment of what the message says is allowed (<quantizers>: the installed ones).
BAD = {
    "unknown top-level table": (W4 + "[extra]\nx = 1\n", "extra", "{'x': 1}", "allowed: model, calibration, stage, export"),
    "no stage": ("[model]\nid = 'x'\n", "stage", "None", "at least one [[stage]]"),
    "unknown stage key": ("[[stage]]\nquantizer = 'rtn'\nweight = { bits = 4 }\n",
                          "stage[0].weight", "{'bits': 4}", "allowed: quantizer, targets, ignore, weights, activations, options"),
    "missing quantizer": ("[[stage]]\nweights = { bits = 4 }\n", "stage[0].quantizer", "None", 'quantizer = "rtn"'),
    "unknown quantizer": ("[[stage]]\nquantizer = 'hqq'\nweights = { bits = 4 }\n",
                          "stage[0].quantizer", "'hqq'", "unknown quantizer; installed: <quantizers>"),
    "stage without tensors": ("[[stage]]\nquantizer = 'rtn'\n", "stage[0]", "{'quantizer': 'rtn'}", "add weights = { bits = ... }"),
    "unknown weights key": ("[[stage]]\nquantizer = 'rtn'\nweights = { bit = 4 }\n",
                            "stage[0].weights.bit", "4", "allowed: bits, type, symmetric, granularity, group_size"),
    "weights not a table": ("[[stage]]\nquantizer = 'rtn'\nweights = 4\n", "stage[0].weights", "4", "expected a table"),
    "bits = 9": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 9 }\n",
                 "stage[0].weights.bits", "9", "allowed for int: 2, 3, 4, 5, 6, 7, 8"),
    "bits = true": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = true }\n", "stage[0].weights.bits", "True", "expected an integer"),
    "float bits = 6": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 6, type = 'float' }\n",
                       "stage[0].weights.bits", "6", "allowed for float: 4, 8"),
    "number type": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8, type = 'uint' }\n",
                    "stage[0].weights.type", "'uint'", "allowed: int, float"),
    "symmetric = 'yes'": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8, symmetric = 'yes' }\n",
                          "stage[0].weights.symmetric", "'yes'", "expected true or false"),
    "granularity = 'row'": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8, granularity = 'row' }\n",
                            "stage[0].weights.granularity", "'row'", "allowed: tensor, channel, group, token"),
    "group_size 0": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4, group_size = 0 }\n",
                     "stage[0].weights.group_size", "0", "expected a positive integer"),
    "group_size 64.0": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4, group_size = 64.0 }\n",
                        "stage[0].weights.group_size", "64.0", "expected a positive integer"),
    "group granularity without group_size": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4, granularity = 'group' }\n",
                                             "stage[0].weights.group_size", "None", "needs a group_size"),
    "group_size with granularity channel": (
        "[[stage]]\nquantizer = 'rtn'\nweights = { bits = 4, group_size = 128, granularity = 'channel' }\n",
        "stage[0].weights.group_size", "128", "only granularity 'group' takes a group_size"),
    "token granularity without dynamic": (W4 + "activations = { bits = 8, granularity = 'token' }\n",
                                          "stage[0].activations.granularity", "'token'", "set dynamic = true"),
    "dynamic weights": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8, dynamic = true }\n",
                        "stage[0].weights.dynamic", "True", "dynamic applies to activations"),
    "weights granularity token": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8, granularity = 'token' }\n",
                                  "stage[0].weights.granularity", "'token'", "weights take tensor, channel or group"),
    "activations granularity channel": (W4 + "activations = { bits = 8, granularity = 'channel' }\n",
                                        "stage[0].activations.granularity", "'channel'", "activations take tensor or token"),
    "unknown calibrator": (W4 + "activations = { bits = 8, calibrator = 'kl-magic' }\n",
                           "stage[0].activations.calibrator", "'kl-magic'", "unknown calibrator; installed: <calibrators>"),
    "unknown calibrator option": (W4 + "activations = { bits = 8, calibrator = 'percentile', calibrator_options = { pct = 99 } }\n",
                                  "stage[0].activations.calibrator_options.pct", "99",
                                  "calibrator percentile has no such option; allowed: percentile, bins"),
    "calibrator option out of range": (W4 + "activations = { bits = 8, calibrator = 'percentile', calibrator_options = { percentile = 101 } }\n",
                                       "stage[0].activations.calibrator_options.percentile", "101", "expected 0 < percentile <= 100"),
    "calibrator options not a table": (W4 + "activations = { bits = 8, calibrator_options = 99.9 }\n",
                                       "stage[0].activations.calibrator_options", "99.9", "expected a table of the calibrator's options"),
    "minmax takes no options": (W4 + "activations = { bits = 8, calibrator_options = { bins = 64 } }\n",
                                "stage[0].activations.calibrator_options.bins", "64", "calibrator minmax has no such option; allowed: none"),
    "bad regex in targets": (W4 + "targets = ['re:layers.(0|1']\n", "stage[0].targets", "'re:layers.(0|1'",
                             "not a regular expression"),
    "ignore is a number": (W4 + "ignore = 3\n", "stage[0].ignore", "3", "expected a list of strings"),
    "options not a table": (W4 + "options = 3\n", "stage[0].options", "3", "expected a table"),
    "rtn takes no options": (W4 + "options = { damp = 0.1 }\n", "stage[0].options.damp", "0.1", "rtn takes no options"),
    "asymmetric fp8": ("[[stage]]\nquantizer = 'rtn'\nweights = { bits = 8, type = 'float', symmetric = false }\n",
                       "stage[0].weights.symmetric", "False", "allowed: true"),
    "rtn with 4-bit activations": (W4 + "activations = { bits = 4 }\n",
                                   "stage[0].activations.bits", "4", "int activations are int8; allowed: 8"),
    "unknown backend": (W4 + "[export]\nbackend = 'no-such-runtime'\n", "export.backend", "'no-such-runtime'",
                        "unknown backend; installed: <backends>"),
    "unknown export key": (W4 + "[export]\nformat = 'x'\n", "export.format", "'x'", "backend qframe takes no options"),
    "unknown dataset source": ("[calibration]\ndataset = 's3:bucket/x'\n" + W4, "calibration.dataset", "'s3:bucket/x'",
                               "unknown source 's3'; installed: <datasets>"),
    "unknown dataset param": ("[calibration]\ndataset = 'text:x?foo=1'\n" + W4, "calibration.dataset", "'text:x?foo=1'",
                              "source 'text' takes no parameter 'foo'; allowed: none"),
    "malformed dataset params": ("[calibration]\ndataset = 'jsonl:x?field'\n" + W4, "calibration.dataset",
                                 "'jsonl:x?field'", "key=value pairs"),
    "samples = 0": ("[calibration]\nsamples = 0\n" + W4, "calibration.samples", "0", "expected a positive integer"),
    "seq_len = -1": ("[calibration]\nseq_len = -1\n" + W4, "calibration.seq_len", "-1", "expected a positive integer"),
    "seed a string": ("[calibration]\nseed = 'zero'\n" + W4, "calibration.seed", "'zero'", "expected int"),
    "seed = true": ("[calibration]\nseed = true\n" + W4, "calibration.seed", "True", "expected int"),
    "samples a float": ("[calibration]\nsamples = 1.5\n" + W4, "calibration.samples", "1.5", "expected int"),
    "unknown calibration key": ("[calibration]\nsample = 4\n" + W4, "calibration.sample", "4",
                                "unknown key; allowed: dataset, samples, seq_len, seed, batch_size, propagate, offload"),
    "offload": ("[calibration]\noffload = 'disk'\n" + W4, "calibration.offload", "'disk'", "allowed: auto, device, cpu"),
    "propagate": ("[calibration]\npropagate = 'fp32'\n" + W4, "calibration.propagate", "'fp32'", "allowed: quantized, float"),
    "model.dtype": ("[model]\ndtype = 'fp13'\n" + W4, "model.dtype", "'fp13'", "allowed: auto, float32, bfloat16, float16"),
    "model.id a number": ("[model]\nid = 5\n" + W4, "model.id", "5", "expected a string"),
    "model not a table": ("model = 'x'\n" + W4, "model", "'x'", "expected a table"),
}


@pytest.mark.parametrize("text, key, value, allowed", BAD.values(), ids=BAD.keys())
def test_recipe_errors_name_file_key_value_and_what_is_allowed(check, qframe_registry, tmp_path, text, key, value,
                                                               allowed):
    registry = qframe_registry()
    for kind in ("quantizer", "calibrator", "backend", "dataset"):
        allowed = allowed.replace(f"<{kind}s>", ", ".join(registry.names(kind)))
    with pytest.raises(RecipeError) as info:
        check(text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'recipe.toml'}: {key}: {value} is not valid; "), message
    assert allowed in message
    assert "\n" not in message
    assert (info.value.key, info.value.source) == (key, str(tmp_path / "recipe.toml"))


def test_malformed_toml_names_the_file_and_the_line(check, tmp_path):
    with pytest.raises(QFrameError) as info:
        check(W4 + "weights = { bits = \n")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'recipe.toml'}: malformed TOML: ")
    assert "line 5" in message


def test_missing_and_unreadable_recipe_files(tmp_path):
    with pytest.raises(QFrameError, match=r"recipe '.*nope\.toml' does not exist"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(QFrameError, match="cannot read recipe"):
        load_recipe(tmp_path)  # a directory
    (tmp_path / "latin1.toml").write_bytes(b"# \xe9\n")
    with pytest.raises(QFrameError, match="cannot read recipe"):
        load_recipe(tmp_path / "latin1.toml")


# -- --set overrides ------------------------------------------------------------------------

def test_overrides_are_parsed_as_toml_values(check):
    plan = check(W4, ["stage.0.weights.group_size=64", "model.id=foo/bar", "calibration.seed = 7",
                      'export.backend="qframe"', "stage.0.ignore=['lm_head', 're:down_proj$']"])
    recipe = plan.recipe
    weights = recipe.stages[0].scheme.weights
    assert weights.group_size == 64 and type(weights.group_size) is int
    assert recipe.model.id == "foo/bar"
    assert recipe.calibration.seed == 7
    assert recipe.stages[0].scheme.ignore == ("lm_head", "re:down_proj$")


def test_overrides_as_a_mapping_and_new_tables(check):
    plan = check(W4, {"stage.0.activations.bits": 8, "stage.0.activations.dynamic": True, "model.dtype": "float32"})
    assert plan.recipe.stages[0].scheme.activations.granularity == "token"
    assert plan.recipe.model.dtype == "float32"


def test_an_override_can_add_a_key_the_stage_rejects(check, tmp_path):
    with pytest.raises(RecipeError) as info:
        check(W4, ["stage.0.weights.bits=9"])
    assert str(info.value).startswith(f"{tmp_path / 'recipe.toml'}: stage[0].weights.bits: 9 is not valid; allowed for int")


@pytest.mark.parametrize("override, message", [
    ("stage.5.bits=4", r"recipe\.toml \(--set\): stage\.5: '5' is not valid; no such stage; the recipe has 1"),
    ("stage.x.bits=4", r"stage\.x: 'x' is not valid; no such stage"),
    ("stage.0=4", r"stage\.0: 4 is not valid; cannot replace a whole stage"),
    ("stage.0.quantizer.x=4", r"stage\.0\.quantizer: 'rtn' is not valid; is a value, not a table"),
    ("model..id=x", r"model\.\.id: 'x' is not valid; expected a dotted key"),
    ("=x", r": 'x' is not valid; expected a dotted key"),
])
def test_bad_override_keys(check, override, message):
    with pytest.raises(RecipeError, match=message):
        check(W4, [override])


def test_override_without_equals(check):
    with pytest.raises(QFrameError, match=r"--set 'stage\.0\.weights\.bits': expected KEY=VALUE"):
        check(W4, ["stage.0.weights.bits"])


# -- which modules a scheme quantizes ---------------------------------------------------------

class Projection(nn.Linear):
    """A Linear subclass: still matched by the type name ``Linear``."""


@pytest.mark.parametrize("pattern, name, module, expected", [
    ("Linear", "model.layers.0.mlp.up_proj", nn.Linear(2, 2), True),
    ("Linear", "model.layers.0.mlp.up_proj", Projection(2, 2), True),
    ("Projection", "model.layers.0.mlp.up_proj", nn.Linear(2, 2), False),
    ("Linear", "model.embed_tokens", nn.Embedding(4, 2), False),
    ("Module", "model.embed_tokens", nn.Embedding(4, 2), True),
    ("lm_head", "lm_head", nn.Linear(2, 2), True),
    ("lm_head", "model.lm_head", nn.Linear(2, 2), True),
    ("lm_head", "model.lm_head_2", nn.Linear(2, 2), False),
    ("proj", "model.layers.0.mlp.down_proj", nn.Linear(2, 2), False),
    ("down_proj", "model.layers.0.mlp.down_proj", nn.Linear(2, 2), True),
    ("mlp.*", "model.layers.0.mlp.down_proj", nn.Linear(2, 2), True),
    ("*.self_attn.*", "model.layers.0.mlp.down_proj", nn.Linear(2, 2), False),
    ("model.layers.1*", "model.layers.12.mlp.down_proj", nn.Linear(2, 2), True),
    ("layers.[0-1].*", "model.layers.1.self_attn.q_proj", nn.Linear(2, 2), True),
    ("re:q_proj$", "model.layers.0.self_attn.q_proj", nn.Linear(2, 2), True),
    ("re:q_proj$", "model.layers.0.self_attn.q_proj_b", nn.Linear(2, 2), False),
    ("re:layers\\.(0|1)\\.", "model.layers.1.mlp.up_proj", nn.Linear(2, 2), True),
    ("re:^layers", "model.layers.1.mlp.up_proj", nn.Linear(2, 2), False),
])
def test_pattern_matching(pattern, name, module, expected):
    assert QuantScheme(targets=(pattern,), ignore=()).matches(name, module) is expected


def test_ignore_wins_over_targets():
    scheme = QuantScheme(targets=("Linear",), ignore=("re:down_proj$", "lm_head"))
    assert scheme.matches("model.layers.0.mlp.up_proj", nn.Linear(2, 2))
    assert not scheme.matches("model.layers.0.mlp.down_proj", nn.Linear(2, 2))
    assert not scheme.matches("lm_head", nn.Linear(2, 2))


def test_select_on_a_real_model(tiny_llama):
    default = QuantScheme().select(tiny_llama.named_modules())
    assert len(default) == 2 * 7 and all(isinstance(m, nn.Linear) for _, m in default)
    assert "lm_head" not in {n for n, _ in default}
    attention = QuantScheme(targets=("re:self_attn\\.[qkv]_proj$",), ignore=("model.layers.1.*",))
    assert [n for n, _ in attention.select(tiny_llama.named_modules())] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert QuantScheme(targets=("Module",), ignore=()).select([("", tiny_llama)]) == []  # never the root


def test_quant_args_ranges():
    assert (QuantArgs(bits=4).qmin, QuantArgs(bits=4).qmax) == (-8, 7)
    asym = QuantArgs(bits=4, symmetric=False)
    assert (asym.qmin, asym.qmax) == (0, 15)
    assert QuantArgs(bits=8, type="float").to_dict()["type"] == "float"
    assert torch.iinfo(torch.int8).min == QuantArgs(bits=8).qmin
