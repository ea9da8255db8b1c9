"""lmeval: exact, lean per-token cross-entropy, perplexity and calibration for causal LMs."""

from .config import Config, load_config
from .errors import ConfigError, DataError, LmevalError, ModelError, OutputError
from .run import run, score_texts  # `run` the function shadows `lmeval.run` the module, on purpose

__all__ = [
    "score_texts", "run", "load_config", "Config",
    "LmevalError", "ConfigError", "DataError", "ModelError", "OutputError",
]  # fmt: skip
__version__ = "0.1.0"
