"""The protocol every analysis follows, in the spirit of torchmetrics' update / compute.

An analysis turns a model's per-token results into tables and figures. The engine knows no
metric: for every model it calls, in corpus order, one part at a time,

    state = analysis.start(model)
    for part in parts:                              # a `Part`: one part's columns and metadata
        state = analysis.merge(state, analysis.update(analysis.start(model), part))
    result = analysis.finish(model, state, run)     # a `ModelResult`

and, once every model is finished, ``analysis.outputs(results, run)`` for the run's files.
What an analysis needs from scoring (`Needs`: extra reductions, per-token columns a part must
keep, whole documents, text facts such as zlib sizes) and what it adds to the run identity
(``identity``) are declared up front, so that the engine scores, keeps and checks exactly
that. States hold sums, counts, per-document rows and mergeable sketches, never every token
(the one exception, ``calibration.binning: mass``, is documented where it is built). Each
part's state is merged into the running one (``merge``), so the states of two stretches of
the corpus scored apart (two ranks, two runs) combine the same way. The engine writes every file.

An explicit tuple lists the analyses of a run (`lmeval.analyses.ANALYSES`); there is no registry.
A new analysis is one module here plus its entry in that tuple.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.groups import GroupLabels

# Where each token row stands and what it is: the columns every per-token table starts from.
TOKEN_PLACE = frozenset({"doc_index", "position", "token_id", "token", "char_start", "char_end", "context_len"})


@dataclass(frozen=True)
class Needs:
    """What an analysis asks of scoring."""

    token_columns: frozenset = frozenset()  # per-token columns a part must keep for `update`
    moments: bool = False  # Var_q[log q] per token (membership scores)
    whole_documents: str | None = None  # the config key that needs every document in one part
    # (word_boundary, text_end): log q(B), q(E), q(not B) per token (``log_mass``) and at each
    # document's END (``log_mass_end``, on its last token), and ``starts_word`` (analysis.words)
    word_masses: tuple[str, str] | None = None
    temperatures: tuple[float, ...] = ()  # the temperature grid's log-sum-exps per token (calibration)


@dataclass(frozen=True)
class Part:
    """One scored part of one model: per-token ``columns`` (``doc_index`` indexes ``doc_ids``)
    and the ``meta`` the part was written with (per-document sums, text facts, protocol)."""

    model: str
    doc_ids: list
    columns: dict
    meta: dict


@dataclass
class ModelResult:
    """What an analysis found for one model: summary fields, per-document columns (in corpus
    order) and this model's rows of the analysis's tables."""

    summary: dict = field(default_factory=dict)
    documents: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # anything `outputs` needs (e.g. a plot's data)


@dataclass
class Outputs:
    """A run's files from one analysis: ``files`` maps a file name to a DataFrame (written
    as parquet or CSV by its suffix) or a matplotlib Figure (PNG); ``tables`` are returned by
    `lmeval.run`; ``record`` is merged into run.json."""

    files: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunFacts:
    """What every analysis may read about the run at the end."""

    model_names: tuple
    n_documents: int
    n_skipped: int
    text_of: object  # doc_id (string) -> the document's text, for token excerpts
    groups: GroupLabels | None = None  # each document's groups, with data.group_by


class Analysis:
    """Defaults for the protocol's optional parts; subclasses override what they use."""

    name = "analysis"
    token_file: str | None = None  # a per-token table this analysis streams (e.g. tokens.parquet)

    def needs(self) -> Needs:
        return Needs()

    def identity(self) -> dict:
        """What the parts depend on beyond the scoring protocol (changing it rescores)."""
        return {}

    def text_facts(self, texts: list[str]) -> dict:
        """Per-document facts of the scored texts, recorded in the part at scoring time."""
        return {}

    def start(self, model: str):
        raise NotImplementedError

    def update(self, state, part: Part):
        raise NotImplementedError

    def merge(self, state, later):
        """One state from ``state`` and ``later``, the state of the parts that follow
        ``state``'s in corpus order (sums add, per-document rows append, sketches merge).
        It may reuse either argument; the engine keeps only the result."""
        raise NotImplementedError

    def token_rows(self, part: Part):
        """This part's rows of `token_file` (a DataFrame), or None."""
        return None

    def state_rows(self, state):
        """Rows of `token_file` that ``state``, merged through the part just folded, has
        completed, taken out of it (a DataFrame), or None: for rows that need the parts after
        their own (a word split across two parts). The engine asks after every part, whether
        it writes the file or not; an analysis implements this or `token_rows`."""
        return None

    def second_pass(self, results: dict):
        """A function the engine maps over `token_file`, a row group at a time, once every
        model is finished (``results``: this analysis's `ModelResult` of each model), for a
        column that needs the whole corpus first (a word's frequency in it); None: none."""
        return None

    def finish(self, model: str, state, run: RunFacts) -> ModelResult:
        return ModelResult()

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        return Outputs()


def accumulate(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``total + values``, per document, the shorter one padded with zeros (new documents)."""
    out = np.zeros(max(len(total), len(values)))
    out[: len(total)] += total
    out[: len(values)] += values
    return out
