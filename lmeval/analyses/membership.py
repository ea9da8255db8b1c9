"""Has the model seen this document? Per-document membership scores (``analysis.membership``):
Min-K% and Min-K%++ log-probabilities, the zlib ratio and the extractable suffix, added to
documents.parquet (see `lmeval.core.memorization` for what each means).

They need whole documents (a document's lowest-k% tokens are a property of all its tokens),
Var_q[log q] per token from scoring, and each scored text's zlib size, recorded at scoring
time because the merge no longer has the texts.
"""

from __future__ import annotations

import dataclasses

from ..core import memorization as mem
from .base import ModelResult, Needs, RunFacts
from .positions import ModelAnalysis, PerDocumentAnalysis

TOKEN_COLUMNS = frozenset({"doc_index", "nll", "entropy", "var_logq", "position", "is_top1"})


class MembershipAnalysis(PerDocumentAnalysis):
    name = "membership"

    def __init__(self, options):
        self.options = dataclasses.replace(options, positions=False)  # the config's `analysis` section

    def needs(self) -> Needs:
        return Needs(token_columns=TOKEN_COLUMNS, moments=True, whole_documents="analysis.membership")

    def identity(self) -> dict:
        return {"membership": True}  # its parts carry var_logq and zlib sizes; others do not

    def text_facts(self, texts: list[str]) -> dict:
        return {"zlib_bytes": [mem.compressed_bytes(t) for t in texts]}

    def finish(self, model: str, state: ModelAnalysis, run: RunFacts) -> ModelResult:
        return ModelResult(documents=state.document_columns())
