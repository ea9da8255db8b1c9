"""Producers: a part's documents -> per-token columns (documents, stream, contexts, chat, a model with its baseline)."""
