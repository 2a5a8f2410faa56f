"""qframe's pytest fixtures, for test suites of qframe plugins: load them in ``conftest.py``
with ``pytest_plugins = ["qframe.pytest_plugin"]`` (the helpers they wrap are in
:mod:`qframe.testing`, which needs no pytest).

Example::

    def test_my_calibrator(qframe_registry, tiny_llama):
        registry = qframe_registry(my_plugin_module)
        qmodel = qframe.quantize(tiny_llama, "recipes/rtn_w4a16.toml", registry=registry, device="cpu")
"""

from __future__ import annotations

import pytest

from .testing import make_registry, tiny_llama_model


@pytest.fixture
def qframe_registry():
    """A factory for fresh plugin registries: ``qframe_registry(*plugins, builtins=True,
    entry_points=False, disabled=(), strict=True)``; see :func:`make_registry`.

    Example::

        def test_my_calibrator(qframe_registry):
            registry = qframe_registry(my_plugin_module)
            calibrator = registry.get("calibrator", "absmean").factory(QuantArgs(bits=8))
    """
    return make_registry


@pytest.fixture
def tiny_llama():
    """A fresh :func:`tiny_llama_model` for each test (quantizing it in place is fine).

    Example::

        def test_rtn_replaces_linears(tiny_llama, qframe_registry):
            qmodel = qframe.quantize(tiny_llama, "recipes/rtn_w4a16.toml",
                                     registry=qframe_registry(), device="cpu")
    """
    return tiny_llama_model()
