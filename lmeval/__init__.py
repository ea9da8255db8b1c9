"""lmeval: exact, lean per-token cross-entropy, perplexity and calibration for causal LMs.

The public API is the names below. They are imported on first use, so ``import lmeval``
(and validating a config) never loads torch or transformers.
"""

from __future__ import annotations

import importlib
import importlib.metadata

try:  # the version is written once, in pyproject.toml; the installed metadata carries it
    __version__ = importlib.metadata.version("lmeval")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "score_texts": "lmeval.producers.score",
    "load_model": "lmeval.model.loading",
    "LoadedModel": "lmeval.model.loading",
    "ModelSpec": "lmeval.model.spec",
    "run": "lmeval.engine.run",
    "load_config": "lmeval.engine.config",
    "Config": "lmeval.engine.config",
    "surprisal_table": "lmeval.view.surprisal",
    "compare_runs": "lmeval.engine.compare_runs",
    "InLoopEvaluator": "lmeval.integrations.in_loop",
    "LmevalCallback": "lmeval.integrations.transformers",
    "minimal_pairs": "lmeval.producers.pairs",
    "divergence": "lmeval.producers.divergence",
    "divergence_summary": "lmeval.analyses.divergence",
    "TokenizerMismatchError": "lmeval.producers.divergence",
    "LmevalError": "lmeval.errors",
    "ConfigError": "lmeval.errors",
    "DataError": "lmeval.errors",
    "ModelError": "lmeval.errors",
    "OutputError": "lmeval.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmeval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


def _write_run_report(out, config, text_of) -> None:
    """report.html of a finished run (`lmeval.view.report`), which the engine cannot import."""
    from .view.report import write_run_report

    write_run_report(out, config, text_of)


def _wire_report() -> None:
    from .engine import hooks

    if _write_run_report not in hooks.RUN_PAGES:
        hooks.RUN_PAGES.append(_write_run_report)


_wire_report()
