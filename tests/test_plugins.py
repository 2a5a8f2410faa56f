"""The plugin system: records, registries, collisions, and real third-party distributions."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qframe
from qframe import hookspecs
from qframe.errors import PluginError
from qframe.plugins import BUILTIN_MODULES, KindView, build_registry
from qframe.types import RECORD_TYPES

# -- real distributions, installed with pip into a throwaway folder ------------------------

DISTRIBUTIONS = {
    # distribution name: {entry-point name: module source}
    "qframe-probe": {"probe": """
        from qframe import QuantizerPlugin, hookimpl

        def make_probe(stage, options, registry):
            raise NotImplementedError

        @hookimpl
        def qframe_quantizers():
            yield QuantizerPlugin(name="probe-quantizer", summary="a probe from a real distribution",
                                  factory=make_probe)
    """},
    "qframe-clash": {"clash": """
        from qframe import QuantizerPlugin, hookimpl

        @hookimpl
        def qframe_quantizers():
            yield QuantizerPlugin(name="rtn", summary="a third-party rtn", factory=dict)
    """},
    "qframe-broken": {
        "broken": """
            import qframe_no_such_dependency  # ImportError when the entry point loads
        """,
        "badsig": """
            from qframe import QuantizerPlugin, hookimpl

            @hookimpl
            def qframe_quantizers(model):  # hooks take no arguments
                yield QuantizerPlugin(name="badsig", summary="never seen", factory=dict)
        """,
    },
}


def _write_distribution(root: Path, dist: str, modules: dict[str, str]) -> Path:
    """A buildable project folder for ``dist``: one module per entry point, ``<ep>_plugin.py``."""
    project = root / dist
    project.mkdir(parents=True)
    entry_points = "\n".join(f'{ep} = "{ep}_plugin"' for ep in modules)
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [tool.setuptools]
        py-modules = {[f"{ep}_plugin" for ep in modules]!r}

        [project.entry-points.qframe]
    """) + entry_points + "\n")
    for ep, source in modules.items():
        (project / f"{ep}_plugin.py").write_text(textwrap.dedent(source))
    return project


def _qframe(site: Path, *args: str, disabled: str | None = None, console_script: bool = False) -> subprocess.Popen:
    """Start ``qframe ARGS`` (the console script, or ``python -m qframe``) seeing ``site``."""
    env = {k: v for k, v in os.environ.items() if k not in ("QFRAME_DISABLE_PLUGINS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    if disabled is not None:
        env["QFRAME_DISABLE_PLUGINS"] = disabled
    command = [str(Path(sys.executable).with_name("qframe"))] if console_script else [sys.executable, "-m", "qframe"]
    return subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Install the throwaway distributions with one pip run, then run ``qframe plugins``
    three ways, concurrently (each start imports torch)."""
    root = tmp_path_factory.mktemp("dists")
    projects = [_write_distribution(root / "src", dist, modules) for dist, modules in DISTRIBUTIONS.items()]
    site = root / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), *map(str, projects)],
        capture_output=True, text=True,
    )
    assert pip.returncode == 0, f"pip could not install the throwaway distributions (needs setuptools):\n{pip.stderr}"
    started = {
        "listing": _qframe(site, "plugins", "--json", disabled="clash"),
        "collision": _qframe(site, "plugins", console_script=True),
        "blocked": _qframe(site, "plugins", "--json", disabled="qframe_plugins.rtn"),
    }
    done = {}
    for name, proc in started.items():
        stdout, stderr = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert "Traceback" not in stderr, stderr
    return done


@pytest.fixture(scope="module")
def listing(runs):
    """``qframe plugins --json`` with every throwaway distribution installed but the clash."""
    assert runs["listing"].returncode == 0, runs["listing"].stderr
    return json.loads(runs["listing"].stdout)


def test_third_party_plugin_is_listed_with_its_distribution(listing):
    [row] = [r for r in listing["plugins"] if r["name"] == "probe-quantizer"]
    assert row == {"kind": "quantizer", "name": "probe-quantizer", "summary": "a probe from a real distribution",
                   "provider": "probe", "distribution": "qframe-probe 0.0.1"}


def test_broken_plugins_are_reported_and_the_rest_still_work(listing):
    failures = {f["plugin"]: f for f in listing["failures"]}
    assert {"broken", "badsig"} <= set(failures)
    assert failures["broken"]["distribution"] == failures["badsig"]["distribution"] == "qframe-broken 0.0.1"
    assert "ModuleNotFoundError" in failures["broken"]["error"]
    assert "qframe_no_such_dependency" in failures["broken"]["error"]
    assert "{'model'} are declared in the hookimpl" in failures["badsig"]["error"]
    listed = {(r["kind"], r["name"]): r["provider"] for r in listing["plugins"]}
    assert listed[("quantizer", "rtn")] == "qframe_plugins.rtn"
    assert listed[("calibrator", "minmax")] == "qframe_plugins.minmax"
    providers = {r["provider"] for r in listing["plugins"]}
    assert providers >= set(BUILTIN_MODULES) | {"probe"}
    assert not providers & {"broken", "badsig", "clash"}


def test_collision_with_a_builtin_names_both_providers(runs):
    proc = runs["collision"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    message = proc.stderr.strip()
    assert "\n" not in message
    assert message.startswith("qframe plugins: error: quantizer 'rtn' is provided twice")
    assert f"'qframe_plugins.rtn' (qframe {qframe.__version__})" in message
    assert "'clash' (qframe-clash 0.0.1)" in message
    assert "QFRAME_DISABLE_PLUGINS" in message


def test_blocking_the_builtin_lets_the_third_party_provide_it(runs):
    proc = runs["blocked"]
    assert proc.returncode == 0, proc.stderr
    [row] = [r for r in json.loads(proc.stdout)["plugins"] if (r["kind"], r["name"]) == ("quantizer", "rtn")]
    assert (row["provider"], row["distribution"]) == ("clash", "qframe-clash 0.0.1")


# -- in-process registries -----------------------------------------------------------------

def _quantizers(*names: str, plugin: str = "Plugin") -> type:
    """An inline plugin (a class named ``plugin``) yielding quantizers called ``names``."""

    class Plugin:
        @qframe.hookimpl
        def qframe_quantizers():
            for name in names:
                yield qframe.QuantizerPlugin(name=name, summary=f"inline {name}", factory=dict)

    Plugin.__name__ = plugin
    return Plugin


def test_public_names_and_a_minimal_record():
    from qframe import (ArchitecturePlugin, BackendPlugin, CalibratorPlugin, DatasetPlugin,  # noqa: F401
                        LayoutPlugin, QuantizerPlugin, hookimpl)

    record = QuantizerPlugin(name="my-rtn.v2_b", summary="round to nearest", factory=dict)
    assert (record.kind, record.name, record.options, record.check) == ("quantizer", "my-rtn.v2_b", None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "other"


@pytest.mark.parametrize("name", ["RTN", "my quant", "", "-rtn", ".rtn", "rtn!", "ärtn", 7])
def test_invalid_record_names_are_plugin_errors(name):
    with pytest.raises(PluginError, match="name .* is not valid"):
        qframe.QuantizerPlugin(name=name, summary="x", factory=dict)


@pytest.mark.parametrize("fields, match", [
    (dict(summary=""), "needs a one-line summary"),
    (dict(summary="   "), "needs a one-line summary"),
    (dict(factory="not callable"), "is not callable"),
])
def test_records_need_a_summary_and_a_callable_factory(fields, match):
    with pytest.raises(PluginError, match=match):
        qframe.CalibratorPlugin(**{"name": "c", "summary": "s", "factory": dict, **fields})


def test_invalid_name_inside_a_hook_is_reported_not_fatal(qframe_registry):
    registry = build_registry(entry_points=False, plugins=[_quantizers("Bad Name"), _quantizers("good", plugin="Good")],
                              disabled=())
    assert "good" in registry.names("quantizer")
    [failure] = registry.failures
    assert failure.distribution == "inline"
    assert "'Bad Name' is not valid" in failure.error
    with pytest.raises(PluginError, match="'Bad Name' is not valid"):
        qframe_registry(_quantizers("Bad Name"))


def test_hook_yielding_the_wrong_record_type(qframe_registry):
    class WrongType:
        @qframe.hookimpl
        def qframe_quantizers():
            yield qframe.CalibratorPlugin(name="oops", summary="a calibrator in the wrong hook", factory=dict)

    registry = build_registry(entry_points=False, plugins=[WrongType, _quantizers("fine")], disabled=())
    assert "fine" in registry.names("quantizer") and "oops" not in registry.names("calibrator")
    [failure] = registry.failures
    assert failure.plugin == "WrongType"
    assert "qframe_quantizers yielded" in failure.error and "expected QuantizerPlugin" in failure.error
    with pytest.raises(PluginError, match="expected QuantizerPlugin"):
        qframe_registry(WrongType)


def test_hook_that_raises_is_reported(qframe_registry):
    class Raises:
        @qframe.hookimpl
        def qframe_backends():
            raise RuntimeError("no GPU driver")
            yield  # pragma: no cover

    registry = qframe_registry(Raises, strict=False)
    [failure] = registry.failures
    assert (failure.plugin, failure.distribution) == ("Raises", "inline")
    assert "RuntimeError: no GPU driver" in failure.error
    assert str(failure).startswith('Error importing plugin "Raises" (from inline)')
    assert "qframe" in registry.names("backend")


def test_collision_between_two_inline_plugins(qframe_registry):
    first, second = _quantizers("same"), _quantizers("same", plugin="Other")
    with pytest.raises(PluginError) as info:
        qframe_registry(first, second, builtins=False)
    message = str(info.value)
    assert "quantizer 'same' is provided twice" in message
    assert "'Plugin' (inline)" in message and "'Other' (inline)" in message


def test_one_plugin_may_not_yield_a_name_twice(qframe_registry):
    with pytest.raises(PluginError, match="'twice' is provided twice"):
        qframe_registry(_quantizers("twice", "twice"), builtins=False)


def test_two_plugins_with_one_registered_name_is_a_plugin_error(qframe_registry):
    first, second = _quantizers("a"), _quantizers("b")
    with pytest.raises(PluginError, match="plugin 'Plugin' \\(inline\\) cannot be registered: that name is taken"):
        qframe_registry(first, second, builtins=False)


def test_collision_with_a_builtin_and_blocking_it(qframe_registry):
    clash = _quantizers("rtn")
    with pytest.raises(PluginError, match="'qframe_plugins.rtn'.*'Plugin'"):
        qframe_registry(clash)
    registry = qframe_registry(clash, disabled=["qframe_plugins.rtn"])
    assert registry.entry("quantizer", "rtn").provider == "Plugin"
    assert registry.get("quantizer", "rtn").summary == "inline rtn"


def test_disabled_blocks_builtins_and_inline_plugins(qframe_registry):
    registry = qframe_registry(_quantizers("extra"), disabled=["qframe_plugins.minmax", "Plugin"])
    assert "minmax" not in registry.names("calibrator")
    assert "extra" not in registry.names("quantizer") and "rtn" in registry.names("quantizer")
    assert "qframe_plugins.minmax" not in {e.provider for e in registry.entries()}


def test_disabled_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("QFRAME_DISABLE_PLUGINS", " qframe_plugins.minmax , qframe_plugins.native,")
    registry = build_registry(entry_points=False)
    assert "minmax" not in registry.names("calibrator") and "qframe" not in registry.names("backend")
    assert "rtn" in registry.names("quantizer")


def test_builtins_only_registry_is_complete_and_fresh(qframe_registry):
    first, second = qframe_registry(), qframe_registry()
    assert first is not second
    assert "minmax" in first.names("calibrator")
    assert "rtn" in first.names("quantizer")
    assert "qframe" in first.names("backend")
    assert "llama" in first.names("architecture")
    assert {"generated", "text", "jsonl"} <= set(first.names("dataset"))
    assert all(e.distribution.startswith("qframe ") for e in first.entries())
    assert qframe_registry(builtins=False).entries() == []


def test_unknown_name_lists_what_is_installed(qframe_registry):
    registry = qframe_registry()
    installed = ", ".join(registry.names("quantizer"))
    assert "rtn" in installed
    with pytest.raises(PluginError, match=re.escape(f"unknown quantizer 'hqq'; installed: {installed}")):
        registry.get("quantizer", "hqq")
    with pytest.raises(PluginError, match="unknown backend 'x'; installed: none"):
        qframe_registry(builtins=False).get("backend", "x")


def test_every_record_type_through_one_plugin(qframe_registry):
    class Everything:
        @qframe.hookimpl
        def qframe_calibrators():
            yield qframe.CalibratorPlugin(name="c1", summary="calibrator", factory=dict)

        @qframe.hookimpl
        def qframe_quantizers():
            yield qframe.QuantizerPlugin(name="q1", summary="quantizer", factory=dict)

        @qframe.hookimpl
        def qframe_backends():
            yield qframe.BackendPlugin(name="b1", summary="backend", factory=dict)

        @qframe.hookimpl
        def qframe_architectures():
            yield qframe.ArchitecturePlugin(name="a1", summary="architecture", factory=dict, model_types=("x",))

        @qframe.hookimpl
        def qframe_datasets():
            yield qframe.DatasetPlugin(name="d1", summary="dataset", factory=dict, params=("field",))

        @qframe.hookimpl
        def qframe_layouts():
            yield qframe.LayoutPlugin(name="l1", summary="layout", factory=dict, backend="b1", model_types=("x",))

    registry = qframe_registry(Everything, builtins=False)
    assert {e.kind: e.record.name for e in registry.entries()} == {
        "calibrator": "c1", "quantizer": "q1", "backend": "b1", "architecture": "a1", "dataset": "d1", "layout": "l1"}
    assert {e.provider for e in registry.entries()} == {"Everything"}


# -- claims: a model_type (or a checkpoint architecture) has one adapter and one layout per backend ----

def _claiming(kind: str, name: str, plugin: str = "Plugin", factory=dict, **claims) -> type:
    """An inline plugin (a class named ``plugin``) yielding one adapter or layout record."""
    hook = {"architecture": "qframe_architectures", "layout": "qframe_layouts"}[kind]
    record = {"architecture": qframe.ArchitecturePlugin, "layout": qframe.LayoutPlugin}[kind]

    def impl():
        yield record(name=name, summary=f"inline {name}", factory=factory, **claims)

    impl.__name__ = hook
    return type(plugin, (), {hook: staticmethod(qframe.hookimpl(impl))})


def test_two_adapters_claiming_one_model_type_name_both_providers(qframe_registry):
    first = _claiming("architecture", "one", model_types=("mine", "shared"))
    second = _claiming("architecture", "two", "Other", model_types=("shared",))
    with pytest.raises(PluginError) as info:
        qframe_registry(first, second, builtins=False)
    message = str(info.value)
    assert message.startswith("architecture adapters 'one' (plugin 'Plugin', inline) and 'two' (plugin 'Other', "
                              "inline) both claim model_type 'shared'")
    assert "QFRAME_DISABLE_PLUGINS=Other (or =Plugin)" in message


def test_an_adapter_claiming_a_builtins_model_type_until_the_builtin_is_blocked(qframe_registry):
    from qframe.model import find_architecture
    from qframe.testing import tiny_llama_model
    from qframe_plugins.llama import LlamaFamily

    class MyLlama(LlamaFamily):
        pass

    mine = _claiming("architecture", "my-qwen", model_types=("qwen2", "llama"), factory=MyLlama)
    with pytest.raises(PluginError, match=r"'llama' \(plugin 'qframe_plugins.llama', qframe .*\) and 'my-qwen' "
                                          r"\(plugin 'Plugin', inline\) both claim model_type 'qwen2'"):
        qframe_registry(mine)
    registry = qframe_registry(mine, disabled=["qframe_plugins.llama"])
    assert registry.adapter("qwen2").provider == "Plugin"
    assert registry.adapter("mistral") is None  # the blocked module's other model_types go with it
    assert type(find_architecture(tiny_llama_model(), registry)) is MyLlama


def test_fallback_adapters_may_share_the_wildcard(qframe_registry):
    registry = qframe_registry(_claiming("architecture", "any-2", model_types=("*",)))
    assert {e.record.name for e in registry.entries("architecture") if "*" in e.record.model_types} == {
        "structural", "any-2"}
    assert registry.adapter("*") is None


@pytest.mark.parametrize("claims, what", [
    (dict(model_types=("llama",)), "model_type 'llama'"),
    (dict(model_types=("mine",), architectures=("GPT2LMHeadModel",)), "architecture 'GPT2LMHeadModel'"),
])
def test_two_layouts_of_one_backend_claiming_one_key(qframe_registry, claims, what):
    with pytest.raises(PluginError) as info:
        qframe_registry(_claiming("layout", "mine", **claims))
    message = str(info.value)
    assert message.startswith("tensorrt-llm layouts ")
    assert "(plugin 'qframe_plugins.tensorrt_llm.layout', qframe " in message and "(plugin 'Plugin', inline)" in message
    assert f"both claim {what}" in message
    assert "QFRAME_DISABLE_PLUGINS=Plugin (or =qframe_plugins.tensorrt_llm.layout)" in message


def test_layouts_of_different_backends_may_claim_one_model_type(qframe_registry):
    registry = qframe_registry(_claiming("layout", "other-llama", backend="other", model_types=("llama",)))
    assert registry.layout("other", model_type="llama").record.name == "other-llama"
    assert registry.layout("tensorrt-llm", model_type="llama").record.name == "llama"
    assert registry.layout("tensorrt-llm", model_type="falcon") is None
    with pytest.raises(TypeError, match="exactly one"):
        registry.layout("tensorrt-llm")


def test_builtin_layouts_come_through_the_hook(qframe_registry):
    layouts = {e.record.name: e for e in qframe_registry().entries("layout")}
    assert set(layouts) == {"llama", "mistral", "qwen2", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "qwen"}
    assert {e.provider for e in layouts.values()} == {"qframe_plugins.tensorrt_llm.layout"}
    # "qwen" only reads QWenForCausalLM checkpoints back: it claims no model type
    assert {t for e in layouts.values() for t in e.record.model_types} == {
        "llama", "mistral", "qwen2", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"}
    assert "layout" not in {e.kind for e in qframe_registry(disabled=["qframe_plugins.tensorrt_llm.layout"]).entries()}


@pytest.mark.parametrize("fields, match", [
    (dict(model_types="llama"), r"model_types must be a tuple of strings, got the string 'llama' "
                                r"\(write \('llama',\)\)"),
    (dict(model_types=("llama", "")), "model_types must be a tuple of non-empty strings"),
    (dict(architectures=[7]), "architectures must be a tuple of non-empty strings"),
    (dict(), "claims no model_types and no architectures"),
    (dict(model_types=("x",), backend="TensorRT LLM"), "backend 'TensorRT LLM' is not a backend name"),
])
def test_layout_records_check_their_claims(fields, match):
    with pytest.raises(PluginError, match=match):
        qframe.LayoutPlugin(name="l", summary="s", factory=dict, **fields)


def test_claims_given_as_lists_become_tuples():
    record = qframe.LayoutPlugin(name="l", summary="s", factory=dict, model_types=["a"], architectures=["A"])
    assert (record.model_types, record.architectures) == (("a",), ("A",))
    assert qframe.ArchitecturePlugin(name="a", summary="s", factory=dict, model_types=["x"]).model_types == ("x",)
    with pytest.raises(PluginError, match="got the string 'x'"):
        qframe.ArchitecturePlugin(name="a", summary="s", factory=dict, model_types="x")


def test_a_misspelt_hook_is_caught_by_the_testing_registry(qframe_registry):
    class Typo:
        @qframe.hookimpl
        def qframe_quantizer():  # missing "s"
            yield qframe.QuantizerPlugin(name="t", summary="t", factory=dict)

    with pytest.raises(PluginError, match="qframe_quantizer.*no qframe hook"):
        qframe_registry(Typo)


def test_kind_view_reads_the_default_registry(qframe_registry, monkeypatch):
    registry = qframe_registry(_quantizers("inline-q", "another"), builtins=False)
    monkeypatch.setattr("qframe.plugins.default_registry", lambda: registry)
    view = KindView("quantizer")
    assert view.names() == ["another", "inline-q"]
    assert view.get("inline-q") is dict
    assert view.record("inline-q").summary == "inline inline-q"
    assert repr(view) == "<qframe quantizers: another, inline-q>"
    with pytest.raises(PluginError, match="unknown quantizer 'nope'; installed: another, inline-q"):
        view.get("nope")
    assert KindView("backend").names() == []
    assert qframe.quantizers.names() == ["another", "inline-q"]  # the public views are KindViews too


# -- hook specs ------------------------------------------------------------------------------

def _hookspecs():
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, marker)}


def test_hook_specs_match_the_record_kinds():
    assert set(_hookspecs()) == set(hookspecs.HOOKS.values())
    assert set(hookspecs.HOOKS) == set(RECORD_TYPES)


@pytest.mark.parametrize("hook", sorted(hookspecs.HOOKS.values()))
def test_every_hook_spec_is_documented_and_implemented_by_a_builtin(hook, qframe_registry):
    spec = _hookspecs()[hook]
    doc = inspect.getdoc(spec) or ""
    assert "Example" in doc and "@qframe.hookimpl" in doc and f"def {hook}():" in doc
    assert not inspect.signature(spec).parameters
    kind = next(k for k, h in hookspecs.HOOKS.items() if h == hook)
    providers = {e.provider for e in qframe_registry().entries(kind)}
    assert providers & set(BUILTIN_MODULES), f"no built-in implements {hook}"
