"""Producers: a part's documents -> per-token columns (documents, stream, contexts, chat turns,
each for one model or a model with its baseline). `producer_for` is the one choice every entry
point makes: `lmeval run`, the Trainer callback and `InLoopEvaluator` alike."""

from __future__ import annotations


def producer_for(config):
    """The producer of a config's data: ``f(lm, documents, config, options, progress, piece=,
    cache=, baseline=) -> (columns, scored texts)``."""
    from .chat import score_chat_group
    from .continuation import score_context_group
    from .score import score_group, score_stream

    if config.data.context_field is not None:
        return score_context_group
    if config.data.messages_field is not None:
        return score_chat_group
    return score_stream if config.scoring.documents == "concatenated" else score_group
