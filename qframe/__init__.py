"""qframe: plugin-based post-training quantization for causal language models.

Example::

    import qframe
    result = qframe.apply("recipes/rtn_w4a16.toml", model="path/to/model", output="out")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DataError, ExportError, ModelError, PluginError, QFrameError, RecipeError
from .hookspecs import hookimpl, hookspec
from .types import ArchitecturePlugin, BackendPlugin, CalibratorPlugin, DatasetPlugin, LayoutPlugin, QuantizerPlugin
from .plugins import KindView
from .scheme import QuantArgs, QuantScheme
from .recipe import Recipe, load_recipe
from .api import apply, describe, evaluate, export, load_quantized, quantize
from .quantized import QuantizedModel

calibrators = KindView("calibrator")
quantizers = KindView("quantizer")
backends = KindView("backend")
architectures = KindView("architecture")
datasets = KindView("dataset")
layouts = KindView("layout")

__all__ = [
    "ArchitecturePlugin", "BackendPlugin", "CalibratorPlugin", "DataError", "DatasetPlugin", "ExportError",
    "LayoutPlugin", "ModelError", "PluginError", "QFrameError", "QuantArgs", "QuantScheme", "QuantizedModel",
    "QuantizerPlugin", "Recipe", "RecipeError", "apply", "architectures", "backends",
    "calibrators", "datasets", "describe", "evaluate", "export", "hookimpl", "hookspec", "layouts", "load_quantized",
    "load_recipe", "quantize", "quantizers",
]
