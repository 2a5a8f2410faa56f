"""``hf``: the unified Hugging Face checkpoint (safetensors + ``hf_quant_config.json``)."""
