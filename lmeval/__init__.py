"""lmeval: exact, lean per-token cross-entropy, perplexity and calibration for causal LMs."""

from .errors import ConfigError, DataError, LmevalError, ModelError
from .run import score_texts

__all__ = ["score_texts", "LmevalError", "ConfigError", "DataError", "ModelError"]
__version__ = "0.1.0"
