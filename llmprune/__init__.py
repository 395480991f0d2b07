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

from .pipeline import PruneResult, prune
from .recover import RecoveryConfig, RecoveryResult, recover
from .arch import UnsupportedArchitectureError, get_adapter, supported_model_types
from .calibrate import CalibrationError
from .config import LayerPlan, PruneConfig, PrunePlan
from .criteria import available_criteria
from .dispatched import DispatchedModelError
from .io import CheckpointError, OutputExistsError, load_model, save_pruned
from .perlayer import register_per_layer_classes
from .select import RatioError
from .sparsity import SparsityConfig, sparsify
from .surgery import apply_plan

__version__ = "0.1.0"

__all__ = [
    "prune", "PruneResult", "recover", "RecoveryConfig", "RecoveryResult", "load_model", "save_pruned", "sparsify", "SparsityConfig", "CheckpointError",
    "OutputExistsError",
    "PruneConfig", "PrunePlan", "LayerPlan", "apply_plan", "get_adapter", "supported_model_types",
    "available_criteria", "UnsupportedArchitectureError", "DispatchedModelError", "CalibrationError", "RatioError", "__version__",
]

# Per-layer-width checkpoints reload through the Auto classes once llmprune is imported.
register_per_layer_classes()

