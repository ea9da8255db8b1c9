"""Layer 2, the model: the model record, loading, the output head and batch scoring. The only
code that imports transformers or runs a forward pass. Imports only `lmeval.core`."""
