"""Checkpoint I/O: loading and saving models with their recipe, plan and model card (``io``), reloading and
comparing every save before it is renamed into place (``verify``), reading the weights of a model
dispatched with accelerate (``dispatched``), and the per-layer config and model classes that let per-layer-width
checkpoints reload through the Auto classes (``perlayer``), GGUF files read as a source (``gguf_load``), the GGUF
export for llama.cpp (``gguf_export`` and ``gguf_tokenizer``, checked in llama.cpp by ``llamacpp``), Hub pushes
(``hub``) with their model card (``hub_card``) and the support matrix (``support``).

May import: ``core``, ``arch``.
"""
