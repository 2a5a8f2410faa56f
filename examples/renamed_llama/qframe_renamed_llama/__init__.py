"""A third-party model family for qframe: ``renamed_llama``, a Llama under another name.

:mod:`.modeling` makes it a ``transformers`` family; :mod:`.plugin` (the ``qframe`` entry
point) gives qframe its architecture adapter and its TensorRT-LLM checkpoint layout.
"""
