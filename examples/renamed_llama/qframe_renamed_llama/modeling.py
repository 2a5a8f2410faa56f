"""The ``renamed_llama`` family in ``transformers``: Llama's modules under a model_type of its
own, registered with the Auto classes so that ``AutoModelForCausalLM.from_config`` and
``from_pretrained`` build it (offline: the code is here, not on a hub).

Example::

    >>> config = RenamedLlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                             intermediate_size=128, vocab_size=128)
    >>> from transformers import AutoModelForCausalLM
    >>> type(AutoModelForCausalLM.from_config(config)).__name__
    'RenamedLlamaForCausalLM'
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "renamed_llama"


class RenamedLlamaConfig(LlamaConfig):
    """Llama's configuration under the model_type ``renamed_llama``."""

    model_type = MODEL_TYPE


class RenamedLlamaForCausalLM(LlamaForCausalLM):
    """Llama's causal LM (same modules, same names) for :class:`RenamedLlamaConfig`."""

    config_class = RenamedLlamaConfig


# exist_ok: importing the plugin twice (an entry point and a test) registers the same classes.
AutoConfig.register(MODEL_TYPE, RenamedLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(RenamedLlamaConfig, RenamedLlamaForCausalLM, exist_ok=True)
