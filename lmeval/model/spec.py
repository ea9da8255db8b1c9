"""The model record: how one model is loaded. Plain data, no torch.

One dataclass serves the YAML config (``models:`` entries), the loader and the resume
identity, which hashes every field of it: a field added here is validated, loaded and
guarded against silent resumes without touching any other module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# "name" or "org/name": what a hub id looks like. Anything else that does not exist locally
# is a missing path, never a network request.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")
# Names ending like a file are paths, even when the id syntax would allow them ('ckpt.bin').
# Hub ids do hold dots ('Qwen/Qwen2.5-0.5B'), so only these known endings count.
FILE_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".safetensors",
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".txt",
    ".csv",
    ".parquet",
    ".gz",
    ".zip",
    ".tar",
    ".gguf",
    ".onnx",
    ".h5",
    ".py",
    ".arrow",
)


@dataclass(frozen=True)
class ModelSpec:
    """How to load one model. ``path`` is a local folder or a hub id; ``name`` labels the model
    in every table and folder, the last part of ``path`` unless given.

    ``dtype`` is the weights' precision (the statistics are float32 regardless); ``device``
    is auto, cpu, cuda or cuda:N; ``revision`` a hub branch, tag or commit;
    ``trust_remote_code`` runs the repository's own Python (off unless asked);
    ``allow_pickle`` permits pickled (.bin/.pt) weights; ``device_map`` spreads one model
    over several devices with accelerate (auto, balanced, balanced_low_0, sequential), and
    ``max_memory`` caps each device under it, e.g. ``{0: 20GiB, cpu: 64GiB}``;
    ``allow_noncausal`` scores a model that the load-time causality probe finds not causal
    (its "NLL" then conditions on the token it predicts: not a language-model probability).

    Quantized checkpoints (`lmeval.model.quantization`): ``gguf_file`` names the ``.gguf`` file
    in ``path`` (a folder or a hub repository) to load through transformers, which dequantizes
    it to ``dtype`` (its tokenizer is the file's own); ``quantization_config`` quantizes the
    checkpoint as it loads, a transformers quantization config spelt as config.json spells it,
    e.g. ``{quant_method: torchao, quant_type: {default: {_type: Int8WeightOnlyConfig,
    _version: 2, _data: {}}}}`` or ``{quant_method: bitsandbytes, load_in_4bit: true}``. A
    checkpoint saved quantized (GPTQ, AWQ, bitsandbytes, compressed-tensors, torchao) needs
    neither: its config.json says how, and transformers loads it so.
    """

    path: str
    # empty: the last part of the path (`default_name`), or the GGUF file's stem, filled in at construction
    name: str = ""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device_map: str | None = None
    max_memory: dict | None = None
    allow_noncausal: bool = False
    gguf_file: str | None = None
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        # A name is a str from here on: folder names and table keys never see None.
        if not self.name:  # a GGUF is named by its file: one folder often holds several quantizations
            object.__setattr__(self, "name", Path(self.gguf_file).stem if self.gguf_file else default_name(self.path))

    @property
    def display_name(self) -> str:
        return self.name


def default_name(path: str) -> str:
    """A model's default name: the last part of its path or hub id."""
    return Path(str(path).rstrip("/")).name or str(path)


def looks_like_hub_id(path: str) -> bool:
    """True for strings shaped like ``gpt2`` or ``org/name`` (the hub's id syntax) that do
    not end like a file name (``ckpt.bin``, ``model.safetensors``)."""
    return bool(_HUB_ID.match(path)) and not path.lower().endswith(FILE_SUFFIXES)
