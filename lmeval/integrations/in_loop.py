"""Score a model held in memory during training, with the protocol of an `lmeval run`.

Why: a training loop's own eval loss (the transformers convention reports ``exp(eval_loss)``)
is a mean over padded, truncated batches, so it is not comparable with a protocol-explicit,
pooled perplexity, and not across tokenizers. `InLoopEvaluator` scores the same corpus at
every evaluation with the exact windows, BOS policy and pooled sums of `lmeval run`: the
numbers are those `lmeval run` would report for a checkpoint saved at that step, and each
step can be written as a run folder (``<out_dir>/step-<N>/``) that `lmeval compare` reads.

Scoring leaves training as it was: the model goes back to its train/eval mode, and torch's
(CPU and CUDA), numpy's and Python's random generators are restored, so dropout masks and
data order after an evaluation are those of a run without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
from pathlib import Path

import numpy as np

from ..engine.config import Config, build_config
from ..engine.data import Corpus, Document, check_texts, fingerprint_documents, load_documents
from ..engine.files import prepare_output_dir
from ..engine.run import run_loaded
from ..errors import ConfigError, DataError
from ..model.loading import LoadedModel, prepare_model
from ..model.spec import ModelSpec
from ..producers.score import check_batch_tokens

TEXTS_PATH = "<texts in memory>"  # data.path of a corpus given as a list of texts
_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


@contextlib.contextmanager
def preserved_rng():
    """Run the body, then put torch's CPU and CUDA, numpy's and Python's generators back as
    they were, so that whatever the body draws leaves the caller's random stream untouched."""
    import torch

    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _section(value, where: str) -> dict:
    """A config section given as a mapping or as its dataclass."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # an instance, not the class
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(
        f"{where}: must be a mapping of {where} keys or its config dataclass (got {type(value).__name__})."
    )


def _data_section(data) -> tuple[dict, list[str] | None]:
    """(data section, texts): a path / hub id, a `data:` mapping, or a list of texts."""
    if isinstance(data, (str, Path)):
        return {"path": str(data)}, None
    if isinstance(data, (list, tuple)):
        return {"path": TEXTS_PATH}, check_texts(list(data))
    return _section(data, "data"), None


def default_label(data) -> str:
    """The corpus's name in metric keys: a file's stem, a hub id's last part, or ``texts``."""
    if isinstance(data, (list, tuple)):
        return "texts"
    path = data if isinstance(data, (str, Path)) else _section(data, "data").get("path", "data")
    stem = Path(str(path).rstrip("/*")).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "data"


def texts_corpus(texts: list[str]) -> Corpus:
    """A corpus of in-memory texts, ids = their indices; blank texts are skipped and counted."""
    documents = [Document(i, t) for i, t in enumerate(texts) if t.strip()]
    if not documents:
        raise DataError(
            f"data: the texts must hold at least one non-empty text (got {len(texts)} blank). Pass held-out text."
        )
    return Corpus(documents, len(texts) - len(documents), fingerprint_documents(documents))


class InLoopEvaluator:
    """Score an in-memory model on one corpus, as `lmeval run` would, once per training step.

    ``data`` is a path or hub id, a `data:` mapping (``{"path": ..., "text_field": ...}``) or
    a list of texts; ``scoring`` and ``calibration`` are those config sections (mappings or
    `ScoringConfig` / `CalibrationConfig`), validated like a YAML file. With ``out_dir``,
    each `evaluate` writes the run folder ``<out_dir>/step-<N>/`` (tokens.parquet only with
    ``per_token``). The corpus is read and tokenized per evaluation; it is loaded once.
    """

    def __init__(
        self, data, *, label: str | None = None, scoring=None, calibration=None, out_dir=None, per_token: bool = False
    ):
        data_raw, texts = _data_section(data)
        raw = {
            # A hub-id-shaped placeholder: validated like any model entry, never loaded.
            "models": [{"path": "in-memory-model", "name": "step-0"}],
            "data": data_raw,
            "scoring": _section(scoring, "scoring"),
            "calibration": _section(calibration, "calibration"),
            "output": {"dir": str(out_dir if out_dir is not None else "."), "per_token": bool(per_token)},
        }
        self.config: Config = build_config(raw, Path.cwd(), source="LmevalCallback")
        self.label = default_label(data) if label is None else label
        if not isinstance(self.label, str) or not _LABEL.match(self.label):
            raise ConfigError(
                f"label: must be letters, digits, '_', '.' or '-' (got {self.label!r}). "
                "It names the metrics lmeval/<label>/ppl, ...; pass label='heldout'."
            )
        self.out_dir = None if out_dir is None else Path(self.config.output.dir)
        self.corpus = texts_corpus(texts) if texts is not None else load_documents(self.config.data)
        check_batch_tokens(self.config.scoring.batch_tokens)
        self._loaded: LoadedModel | None = None

    def _prepared(self, model, tokenizer, name: str) -> LoadedModel:
        """The model wrapped for scoring, once (the head probe runs on first use only)."""
        if self._loaded is None or self._loaded.model is not model or self._loaded.tokenizer is not tokenizer:
            self._loaded = prepare_model(model, tokenizer, name=name)
        return dataclasses.replace(self._loaded, name=name)

    def evaluate(self, model, tokenizer, step: int) -> dict:
        """Score ``model`` as it is now; returns the summary row of model ``step-<step>``
        (ppl, bits_per_token, bits_per_byte, word_ppl, ppl_doc_mean, ece, brier, ...), the
        numbers `lmeval run` writes to summary.csv. The engine of `lmeval run` does the work:
        the same plan, producer (plain, concatenated, contexts or chat turns) and analyses."""
        name = f"step-{step}"
        config = dataclasses.replace(
            self.config, models=(ModelSpec(path=f"<in-memory model at step {step}>", name=name),)
        )
        out = None
        if self.out_dir is not None:  # a re-evaluation at the same step (after resuming) replaces it
            out = prepare_output_dir(str(self.out_dir / name), overwrite=True)
            config = dataclasses.replace(config, output=dataclasses.replace(config.output, dir=str(out)))
        with preserved_rng():
            tables = run_loaded(config, self.corpus, self._prepared(model, tokenizer, name), out)
        return tables["summary"].iloc[0].to_dict()
