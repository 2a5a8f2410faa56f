"""The hooks a qframe plugin implements. Each yields records; none takes arguments.

A plugin is a module (or object) with functions marked ``@qframe.hookimpl`` whose names
are the hook names below. Third-party plugins are found through the entry-point group
``qframe``::

    [project.entry-points.qframe]
    myplugin = "my_pkg.plugin"
"""

from __future__ import annotations

from typing import Iterable

import pluggy

from .types import ArchitecturePlugin, BackendPlugin, CalibratorPlugin, DatasetPlugin, LayoutPlugin, QuantizerPlugin

PROJECT = "qframe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qframe_calibrators() -> Iterable[CalibratorPlugin]:
    """Yield the calibrators this plugin provides.

    Example::

        @qframe.hookimpl
        def qframe_calibrators():
            yield CalibratorPlugin(name="absmean", summary="mean of |x|, times three",
                                   factory=AbsMeanCalibrator)
    """


@hookspec
def qframe_quantizers() -> Iterable[QuantizerPlugin]:
    """Yield the quantizers (algorithms) this plugin provides.

    Example::

        @qframe.hookimpl
        def qframe_quantizers():
            yield QuantizerPlugin(name="hqq", summary="half-quadratic, calibration-free",
                                  factory=HQQ, options=HQQOptions)
    """


@hookspec
def qframe_backends() -> Iterable[BackendPlugin]:
    """Yield the export backends this plugin provides.

    Example::

        @qframe.hookimpl
        def qframe_backends():
            yield BackendPlugin(name="my-runtime", summary="checkpoint for my runtime",
                                factory=MyRuntimeExporter)
    """


@hookspec
def qframe_architectures() -> Iterable[ArchitecturePlugin]:
    """Yield the architecture adapters this plugin provides.

    Example::

        @qframe.hookimpl
        def qframe_architectures():
            yield ArchitecturePlugin(name="falcon", summary="Falcon decoder layers",
                                     factory=FalconAdapter, model_types=("falcon",))
    """


@hookspec
def qframe_datasets() -> Iterable[DatasetPlugin]:
    """Yield the dataset sources this plugin provides; the name is the spec prefix.

    Example::

        @qframe.hookimpl
        def qframe_datasets():
            yield DatasetPlugin(name="parquet", summary="a column of a parquet file",
                                factory=read_parquet, params=("column",))
    """


@hookspec
def qframe_layouts() -> Iterable[LayoutPlugin]:
    """Yield the checkpoint layouts this plugin provides: for a backend and a model family,
    where each tensor goes. The writer finds a layout by the model's ``config.model_type``,
    the validator by the checkpoint's architecture.

    Example (a TensorRT-LLM layout for a family whose modules are named like Llama's)::

        from qframe_plugins.tensorrt_llm.layout import LlamaLayout

        class MyLlamaLayout(LlamaLayout):
            architecture = "MyLlamaForCausalLM"

        @qframe.hookimpl
        def qframe_layouts():
            yield LayoutPlugin(name="my-llama", summary="my_llama in TensorRT-LLM's LLaMA layout",
                               factory=MyLlamaLayout, backend="tensorrt-llm",
                               model_types=("my_llama",), architectures=("MyLlamaForCausalLM",))
    """


HOOKS: dict[str, str] = {
    "calibrator": "qframe_calibrators",
    "quantizer": "qframe_quantizers",
    "backend": "qframe_backends",
    "architecture": "qframe_architectures",
    "dataset": "qframe_datasets",
    "layout": "qframe_layouts",
}
