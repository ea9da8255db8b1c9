"""Analyses: plug-ins of the engine (see `base` for the protocol). Each turns a model's parts
into per-part states, merged in corpus order, then tables and figures; the engine writes them.

`analyses_for` is the explicit tuple of a run's analyses, in the order their summary fields
and document columns appear; there is no registry and no import magic.
"""

from __future__ import annotations

import dataclasses


def analyses_for(config) -> tuple:
    """The analyses a config asks for. ``documents`` comes first: it owns the summary and the
    documents table that the others add fields and columns to."""
    from .calibration import CalibrationAnalysis
    from .divergence import DivergenceAnalysis
    from .documents import DocumentsAnalysis
    from .groups import GroupsAnalysis
    from .membership import MembershipAnalysis
    from .positions import PositionsAnalysis
    from .words import WordsAnalysis

    a = config.analysis
    if config.output.documents_only:  # per-document sums only (the config refuses the analyses that need more)
        # no summary intervals (NaN): a filtering run's 10^7-10^8 documents would cost B x D draws, 8 ns each
        only: list = [DocumentsAnalysis(False, a.reference, dataclasses.replace(config.compare, bootstrap=0))]
        if config.data.group_by:
            only.append(GroupsAnalysis(config.data, config.compare, None))
        return tuple(only)
    chosen = [
        DocumentsAnalysis(config.output.per_token, a.reference, config.compare),
        CalibrationAnalysis(config.calibration, config.compare),
    ]
    if a.positions:
        chosen.append(PositionsAnalysis(a))
    if a.membership:
        chosen.append(MembershipAnalysis(a))
    if a.words:
        chosen.append(WordsAnalysis(a))
    if config.compare.divergence:
        baseline = config.compare.baseline or config.models[0].name
        others = tuple(m.name for m in config.models if m.name != baseline)
        chosen.append(DivergenceAnalysis(config.compare, baseline, others, config.output.per_token))
    if config.data.group_by:  # last: its summary fields follow every other analysis's
        divergence_baseline = (config.compare.baseline or config.models[0].name) if config.compare.divergence else None
        chosen.append(GroupsAnalysis(config.data, config.compare, divergence_baseline))
    return tuple(chosen)
