"""Checkpoint I/O: loading and saving models with their recipe, plan and model card (``io``), reloading and
comparing every save before it is renamed into place (``verify``), reading the weights of a model
dispatched with accelerate (``dispatched``), and the per-layer config and model classes that let per-layer-width
checkpoints reload through the Auto classes (``perlayer``).

May import: ``core``, ``arch``.
"""
