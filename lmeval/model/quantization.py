"""Quantized checkpoints: how one was loaded, and how many bits each of its weights takes.

A quantized model is a model with a baseline (DESIGN.md): its divergence from the base means
little without knowing what was measured. So every loaded model gets a record, None for a
plain float checkpoint:

- ``quant_method`` and ``config``: the checkpoint's quantization_config as transformers reads
  it (config.json's, the GGUF file's, or the one the model entry asked to quantize with);
- ``source``: ``checkpoint`` (saved quantized), ``gguf`` (a ``.gguf`` file) or ``load``
  (quantized as it loaded, ``quantization_config`` in the model entry);
- ``load_path``: ``dequantized`` when every weight is a plain float tensor after loading (the
  forward runs dense matmuls on the dequantized values: transformers' GGUF loader for most
  architectures, compressed-tensors with ``run_compressed: false``), ``native`` when the
  weights stay in the quantization's own storage (a tensor subclass, or integer blocks) and
  its kernels, or its on-the-fly dequantization, run in the forward (torchao, bitsandbytes,
  GPTQ, AWQ, compressed-tensors, GGUF blocks on a GPU with transformers' GGUF kernels).
  Decided from what the loaded model holds, not from the config's wish: transformers falls
  back to dequantizing where it has no kernel.

Size (`size_record`): ``weight_bytes`` is the bytes of the weights in the form that is
evaluated; ``n_parameters`` the architecture's parameter count (a packed int4 tensor counts
its logical weights, not its bytes); bits per weight = 8 · weight_bytes / n_parameters, over
every weight (embeddings and norms too), as llama.cpp's BPW counts a GGUF's tensors.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from ..errors import ModelError
from .spec import ModelSpec

log = logging.getLogger(__name__)

SAFE_WEIGHTS = (".safetensors",)
PICKLED_WEIGHTS = (".bin", ".pt", ".pth")


def quantization_config_for(spec: ModelSpec):
    """The transformers quantization config a model entry asks to quantize with (None: none)."""
    if not spec.quantization_config:
        return None
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        return AutoQuantizationConfig.from_dict(dict(spec.quantization_config))
    except (ValueError, TypeError, KeyError, ImportError) as exc:
        raise ModelError(
            f"model {spec.display_name}: quantization_config must be a transformers quantization config as "
            f"config.json spells it, with a quant_method transformers knows and its package installed "
            f"(got {spec.quantization_config!r}: {type(exc).__name__}: {exc}). E.g. {{quant_method: torchao, "
            "quant_type: {default: {_type: Int8WeightOnlyConfig, _version: 2, _data: {}}}}}."
        ) from exc


def load_path(model: torch.nn.Module) -> str:
    """``native`` when some weight stays in a quantization's storage after loading (a tensor
    subclass such as torchao's, or integer data such as bitsandbytes' Int8Params, GPTQ's
    qweight or GGUF blocks), else ``dequantized``."""
    for p in model.parameters():
        if type(p.data) is not torch.Tensor or not p.dtype.is_floating_point:
            return "native"
    for name, b in model.named_buffers():
        if "weight" in name.rsplit(".", 1)[-1] and not b.dtype.is_floating_point:  # qweight, weight_packed
            return "native"
    return "dequantized"


_WHY = {
    "dequantized": "every weight is a plain float tensor after loading: transformers unpacked the quantized weights "
    "and the forward runs dense float matmuls on the dequantized values (numerically the quantized model)",
    "native": "the weights stay in the quantization's own storage after loading and its kernels (or its "
    "on-the-fly dequantization) run in the forward",
}


def quantization_record(model: torch.nn.Module, spec: ModelSpec | None) -> dict | None:
    """What run.json and the tables say about a quantized model (see the module docstring);
    None for a plain float model."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    gguf_file = spec.gguf_file if spec is not None else None
    if config is None and not gguf_file:
        return None
    if config is None:  # a GGUF whose loader left no config behind
        raw: dict = {"quant_method": "gguf"}
    else:
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    raw = json.loads(json.dumps(raw, default=str))  # enums and torch dtypes as their names
    path = load_path(model)
    if spec is not None and spec.quantization_config:
        source = "load"
    elif gguf_file:
        source = "gguf"
    else:
        source = "checkpoint"
    record = {
        "quant_method": str(raw.get("quant_method", "gguf" if gguf_file else "unknown")),
        "source": source,
        "load_path": path,
        "why": _WHY[path],
        "config": raw,
    }
    if gguf_file:
        record["gguf_file"] = gguf_file
        folder = Path(spec.path).expanduser() if spec is not None else None
        if folder is not None and (folder / gguf_file).is_file():
            record["gguf_tensor_types"] = gguf_summary(folder / gguf_file)["tensor_types"]
    return record


def gguf_summary(path: Path) -> dict:
    """A GGUF file's tensors: their bytes and elements summed, and how many of each ggml type
    (``{"Q4_0": 14, "F32": 5}``), read from its header with the ``gguf`` package."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelError(
            f"{path}: reading a GGUF file needs the gguf package (not installed). Install it: pip install 'lmeval[quant]'."
        ) from exc
    reader = GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "tensor_bytes": int(sum(int(t.n_bytes) for t in reader.tensors)),
        "n_elements": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensor_types": dict(sorted(types.items())),
    }


def checkpoint_bytes(spec: ModelSpec) -> int | None:
    """Bytes of a local checkpoint's weights as stored: a named GGUF file's tensors (its
    metadata, the tokenizer included, left out: llama.cpp's count); else the safetensors
    files, or the pickled ones where there are none (never both: a folder holding a model
    twice is one model). None when ``path`` is not a local folder."""
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        return None
    if spec.gguf_file:
        file = folder / spec.gguf_file
        return gguf_summary(file)["tensor_bytes"] if file.is_file() else None
    files = [p for p in folder.iterdir() if p.suffix in SAFE_WEIGHTS] or [
        p for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS
    ]
    return sum(p.stat().st_size for p in files) if files else None


def resident_bytes(spec: ModelSpec) -> int | None:
    """What a model's weights take once loaded, estimated before loading (lockstep's memory
    check): a GGUF is dequantized, so its elements times the dtype's bytes (float32 unless
    ``dtype`` says half); otherwise `checkpoint_bytes`."""
    folder = Path(spec.path).expanduser()
    if spec.gguf_file and (folder / spec.gguf_file).is_file():
        return gguf_summary(folder / spec.gguf_file)["n_elements"] * (2 if spec.dtype in ("float16", "bfloat16") else 4)
    return checkpoint_bytes(spec)


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's state holds in memory, each storage once, a tensor subclass (torchao)
    counted by the tensors it is made of (int8 data, scales, zero points)."""
    seen: set = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for name in names:
                add(getattr(t, name))
            return
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            add(t.data if isinstance(t, torch.nn.Parameter) else t)
    return total


def parameter_count(model: torch.nn.Module, path: str | None = None) -> int:
    """The model's parameters, tied ones once. A native quantized load holds packed tensors
    (two int4 weights a byte, GPTQ's qweight as a buffer), so its count is taken from the
    architecture built on the meta device from its config (nothing allocated)."""
    if path != "native":
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    import copy

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = type(model)(config)
    return sum(p.numel() for p in {id(p): p for p in skeleton.parameters()}.values())


def size_record(model: torch.nn.Module, spec: ModelSpec | None, quantization: dict | None) -> dict:
    """``weight_bytes`` (and where it comes from) and ``n_parameters`` of a loaded model: the
    weights in the form evaluated. Quantized as it loaded: the quantized state in memory (the
    files hold the float checkpoint). A local folder: its weight files (a GGUF: the named
    file's tensors). A native quantized load from the hub: the state in memory. Else unknown."""
    path = quantization["load_path"] if quantization else None
    n = parameter_count(model, path)
    size, source = None, None
    if quantization and quantization["source"] == "load":
        size, source = memory_bytes(model), "the quantized weights in memory (quantized at load)"
    elif spec is not None and (size := checkpoint_bytes(spec)) is not None:
        source = "the GGUF file's tensors" if spec.gguf_file else "the weight files on disk"
    elif path == "native":
        size, source = memory_bytes(model), "the quantized weights in memory"
    return {"weight_bytes": size, "weight_bytes_from": source, "n_parameters": n}
