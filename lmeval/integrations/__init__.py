"""Where users already work: lmeval inside a training loop.

`lmeval.integrations.in_loop` scores a model held in memory (no reload, no copy to disk) with
the protocol of a config; `lmeval.integrations.transformers.LmevalCallback` runs it from a
transformers `Trainer`. Importing this package loads neither torch nor transformers.
"""
