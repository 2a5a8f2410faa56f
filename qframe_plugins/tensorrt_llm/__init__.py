"""``tensorrt-llm``: TensorRT-LLM checkpoints (``config.json`` + ``rank{N}.safetensors``)."""
