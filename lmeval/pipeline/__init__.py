"""Layer 3, the pipeline: config, documents, parts, distributed runs, merging, tables, files and
comparison. Imports `lmeval.model` and `lmeval.core`; its config module never imports torch."""
