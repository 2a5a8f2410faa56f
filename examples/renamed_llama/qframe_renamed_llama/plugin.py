"""qframe plugin for ``renamed_llama``: where its decoder layers are (an architecture adapter)
and where TensorRT-LLM keeps its tensors (a checkpoint layout), found by its model_type.

Its checkpoints name the architecture ``RenamedLlamaForCausalLM``, by which ``qframe validate``
finds this layout again. TensorRT-LLM builds it as its LLaMA model once the serving side maps
the name (``tensorrt_llm.models.MODEL_MAP["RenamedLlamaForCausalLM"] = LLaMAForCausalLM``).
"""

from qframe import ArchitecturePlugin, LayoutPlugin, hookimpl
from qframe_plugins.llama import LlamaFamily
from qframe_plugins.tensorrt_llm.layout import LlamaLayout

from .modeling import MODEL_TYPE  # importing it registers the family with transformers

ARCHITECTURE = "RenamedLlamaForCausalLM"


class RenamedLlamaLayout(LlamaLayout):
    """Llama's tensors, under this family's architecture name."""

    architecture = ARCHITECTURE


@hookimpl
def qframe_architectures():
    yield ArchitecturePlugin(name="renamed-llama", summary="renamed_llama decoder layers (Llama's)",
                             factory=LlamaFamily, model_types=(MODEL_TYPE,))


@hookimpl
def qframe_layouts():
    yield LayoutPlugin(name="renamed-llama", summary="renamed_llama in TensorRT-LLM's LLaMA checkpoint layout",
                       factory=RenamedLlamaLayout, backend="tensorrt-llm", model_types=(MODEL_TYPE,),
                       architectures=(ARCHITECTURE,))
