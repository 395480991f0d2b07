"""llmprune: make Hugging Face LLMs smaller and faster by pruning them.

Example::

    import llmprune
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("path/to/model")
    tok = AutoTokenizer.from_pretrained("path/to/model")
    result = llmprune.prune(model, llmprune.PruneConfig(heads=0.25, ffn=0.25, method="wanda"),
                            tokenizer=tok, calibration="calib.txt")
    result.save("pruned/", tokenizer=tok)          # safetensors + recipe + kept indices, atomically
"""

from .structured.pipeline import PruneResult, prune
from .training.recover import RecoveryConfig, RecoveryResult, recover
from .arch import UnsupportedArchitectureError, get_adapter, supported_model_types
from .calibration.calibrate import CalibrationError
from .core.config import LayerPlan, PruneConfig, PrunePlan, RatioError
from .structured.criteria import available_criteria
from .checkpoint.dispatched import DispatchedModelError
from .checkpoint.io import CheckpointError, OutputExistsError, load_model, save_pruned
from .checkpoint.perlayer import register_per_layer_configs
from .sparsity import SparsityConfig, sparsify
from .structured.apply import apply_plan

from .core.version import __version__  # noqa: E402

__all__ = [
    "prune", "PruneResult", "recover", "RecoveryConfig", "RecoveryResult", "load_model", "save_pruned", "sparsify", "SparsityConfig", "CheckpointError",
    "OutputExistsError",
    "PruneConfig", "PrunePlan", "LayerPlan", "apply_plan", "get_adapter", "supported_model_types",
    "available_criteria", "UnsupportedArchitectureError", "DispatchedModelError", "CalibrationError", "RatioError", "__version__",
]

# Per-layer-width checkpoints reload through the Auto classes once llmprune is imported.
register_per_layer_configs()

