"""Checkpoint I/O: loading and saving models with their recipe, plan and model card (``io``), reloading and
comparing every save before it is renamed into place (``verify``), reading the weights of a model
dispatched with accelerate (``dispatched``), and the per-layer config and model classes that let per-layer-width
checkpoints reload through the Auto classes (``perlayer``), the GGUF export for llama.cpp (``gguf_export``, checked in
llama.cpp by ``llamacpp``), the Hub model card (``hub_card``) and the support matrix (``support``).

May import: ``core``, ``arch``.
"""
