"""Checkpoint I/O: loading and saving models with their recipe, plan and model card (``io``), reloading and
comparing every save before it is renamed into place (``verify``), and reading the weights of a model
dispatched with accelerate (``dispatched``).

May import: ``core``.
"""
