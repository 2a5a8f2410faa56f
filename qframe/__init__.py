"""qframe: plugin-based post-training quantization for causal language models.

Example::

    import qframe
    result = qframe.apply("recipes/rtn_w4a16.toml", model="path/to/model", output="out")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DataError, ExportError, ModelError, PluginError, QFrameError, RecipeError
from .hookspecs import hookimpl, hookspec
from .types import ArchitecturePlugin, BackendPlugin, CalibratorPlugin, DatasetPlugin, QuantizerPlugin
from .plugins import KindView
from .scheme import QuantArgs, QuantScheme
from .recipe import Recipe, load_recipe
from .api import apply, evaluate, export, load_quantized, quantize
from .quantized import QuantizedModel

calibrators = KindView("calibrator")
quantizers = KindView("quantizer")
backends = KindView("backend")
architectures = KindView("architecture")
datasets = KindView("dataset")

__all__ = [
    "ArchitecturePlugin", "BackendPlugin", "CalibratorPlugin", "DataError", "DatasetPlugin", "ExportError",
    "ModelError", "PluginError", "QFrameError", "QuantArgs", "QuantScheme", "QuantizedModel",
    "QuantizerPlugin", "Recipe", "RecipeError", "apply", "architectures", "backends",
    "calibrators", "datasets", "evaluate", "export", "hookimpl", "hookspec", "load_quantized",
    "load_recipe", "quantize", "quantizers",
]
