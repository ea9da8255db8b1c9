"""Load a causal LM and its tokenizer, and wrap a loaded pair for scoring.

Local folders must hold safetensors weights (pickle only on request); a string that is not
a local path is taken for a hub id only when it looks like one. Nothing here runs the
model except the load-time probe of `OutputHead`.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..core.losses import Workspace
from ..errors import ModelError
from .head import OutputHead
from .probes import Probes, max_positions, probe_model
from .quantization import quantization_config_for, quantization_record
from .spec import DTYPE_NAMES, ModelSpec, looks_like_hub_id

log = logging.getLogger(__name__)
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.name != "path"}

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready to score, with what the protocol needs to know about it.

    Build one with `load_model` (or `prepare_model` for a pair already in memory) and pass
    it to `score_texts` as often as you like: loading and the load-time probes happen once.
    ``commit_sha`` is the resolved hub commit of a hub model (None for a local folder);
    ``probes`` what the causality and padding probes found, and the batching they chose;
    ``quantization`` how a quantized checkpoint was loaded (`lmeval.model.quantization`), None
    for a plain float model.
    """

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    vocab_size: int  # width of the logits (may exceed len(tokenizer))
    embedding_rows: int
    max_positions: int | None
    head: OutputHead
    spec: ModelSpec | None = None
    commit_sha: str | None = None
    workspace: Workspace = field(default_factory=Workspace)  # scratch reused across batches
    probes: Probes = field(default_factory=Probes)
    quantization: dict | None = None


def _resolve_device(device: str, name: str = "model") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"model {name}: device must be auto, cpu, cuda or cuda:N (got {device!r}).") from exc
    # Checked here, before any weights are read: torch would fail only at `.to(device)`.
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA"
            raise ModelError(
                f"model {name}: device must be one this machine has (got {device!r}, and it has {have}). "
                "Set `device: cpu`, or `device: auto` to use a GPU only where there is one."
            )
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError(
            f"model {name}: device must be one this machine has (got {device!r}, and MPS is not available). "
            "Set `device: cpu` or `device: auto`."
        )
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision only where it is fast; the statistics are float32 regardless.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype: must be one of {', '.join(DTYPE_NAMES)} (got {dtype!r}).")
    return DTYPES[dtype]


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir()]
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    if pickled and not allow_pickle:
        raise ModelError(
            f"{path}: weights are pickle files ({', '.join(sorted(pickled))}), which can run "
            "arbitrary code when loaded. Convert them to safetensors, or set "
            "`allow_pickle: true` for this model if you trust the source."
        )
    if not pickled:
        raise ModelError(
            f"{path}: no model weights found (expected *.safetensors). "
            "Point `path` at a folder written by `save_pretrained`."
        )


def load_model(
    source,
    *,
    name: str = "",
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
    max_memory: dict | None = None,
    allow_noncausal: bool = False,
    gguf_file: str | None = None,
    quantization_config: dict | None = None,
    **unknown,
) -> LoadedModel:
    """Load a causal LM and its fast tokenizer once, ready to score many times.

    ``source`` is a local ``save_pretrained`` folder, a hub id, or a `ModelSpec`; the keywords
    are the `ModelSpec` fields, with its defaults (with a `ModelSpec` source, a keyword given
    a value other than its default replaces that field). The load-time probes (output-head
    path, causality, padding) run here, once; `score_texts` with the result runs no probe
    again. A model that is not causal raises `ModelError` unless ``allow_noncausal``. A folder
    whose tokenizer has an empty vocabulary (no tokenizer files: transformers then builds an
    empty one, and every text would become zero tokens) raises `ModelError`, naming it.
    """
    if unknown:  # a misspelt keyword is named with the known ones, not a bare TypeError
        known = ", ".join(_SPEC_DEFAULTS)
        raise ModelError(f"load_model: unknown option ({', '.join(sorted(unknown))}). Known options: {known}.")
    options = {
        k: v
        for k, v in dict(
            name=name or "",  # "" (or None): no name given, so ModelSpec takes the path's last part
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            device_map=device_map,
            max_memory=max_memory,
            allow_noncausal=allow_noncausal,
            gguf_file=gguf_file,
            quantization_config=quantization_config,
        ).items()
        if v != _SPEC_DEFAULTS[k]
    }
    spec = _as_spec(source, options)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lmeval shows its own progress

    path = Path(spec.path).expanduser()
    is_local = path.exists()
    if not is_local and not looks_like_hub_id(spec.path):
        raise ModelError(
            f"model.path: {spec.path!r} does not exist. Give a local `save_pretrained` folder "
            "or a hub id such as 'gpt2' or 'EleutherAI/pythia-160m'."
        )
    if is_local:
        if path.is_file() and path.suffix == ".gguf":
            raise ModelError(
                f"model.path: must be the folder that holds a GGUF file (got the file {path}). "
                f"Set `path: {path.parent}` and `gguf_file: {path.name}`."
            )
        if not path.is_dir():
            raise ModelError(f"model.path: {path} is not a folder. Point it at a `save_pretrained` folder.")
        if spec.gguf_file:
            _check_gguf_file(path, spec.gguf_file, spec.display_name)
        else:
            _check_local_weights(path, spec.allow_pickle)
    if spec.trust_remote_code:
        log.warning("trust_remote_code is on for %s: its repository code will run on this machine.", spec.path)
    torch_device = _resolve_device(spec.device, spec.display_name)
    torch_dtype = _resolve_dtype(spec.dtype, torch_device)
    source = str(path) if is_local else spec.path
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    # a GGUF file brings its own tokenizer (transformers converts it) and no safetensors
    gguf = dict(gguf_file=spec.gguf_file) if spec.gguf_file else {}
    quantize = quantization_config_for(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common, **gguf)
        check_tokenizer(tokenizer, source, spec.display_name)  # before the weights: a refusal costs no load
        placed = dict(device_map=spec.device_map, max_memory=spec.max_memory) if spec.device_map else {}
        if not placed and (quantize is not None or (not spec.gguf_file and _saved_quantized(source, common))):
            # quantized weights are placed as they load: `.to()` cannot move every kind of them
            placed = dict(device_map={"": torch_device})
        safe = None if spec.allow_pickle or spec.gguf_file else True
        extra = dict(quantization_config=quantize) if quantize is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, use_safetensors=safe, **common, **gguf, **placed, **extra
        )
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) stops at the first object that is not plain tensor data,
        # before anything in the file runs.
        raise ModelError(
            f"model {spec.display_name}: pickled weights in {source} must hold only tensors, but torch's safe "
            f"loader refused them (got {_unpickler_reason(exc)}); nothing in them was run. Use safetensors "
            "weights from the source, or convert the file where you trust it."
        ) from exc
    except SafetensorError as exc:
        raise ModelError(
            f"model {spec.display_name}: the safetensors weights in {source} must be complete and intact, and they "
            f"cannot be read (got SafetensorError: {exc}): a download or copy was cut short, or the file was damaged. "
            "Delete the damaged file and download or `save_pretrained` the model again."
        ) from None
    except (OSError, ValueError) as exc:
        taken = "" if is_local else " (not a local folder, so it was taken for a hub id)"
        raise ModelError(f"model.path: cannot load {source!r}{taken}: {exc}".strip()) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"{source}: lmeval needs a fast (Rust) tokenizer for character offsets; "
            "save one with `tokenizers`/`PreTrainedTokenizerFast`."
        )
    if not placed:  # with a device_map, accelerate (or the quantizer) has placed every layer
        model.to(torch_device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) reads as unbound
    model.eval()
    lm = prepare_model(model, tokenizer, name=spec.display_name, spec=spec)
    lm.commit_sha = None if is_local else getattr(model.config, "_commit_hash", None)
    lm.quantization = quantization_record(model, spec)
    if lm.quantization and lm.quantization["source"] == "load" and lm.quantization["load_path"] == "dequantized":
        raise ModelError(
            f"model {spec.display_name}: quantization_config must quantize some weight of the model (got every weight "
            f"still a plain float tensor after loading with quant_method {lm.quantization['quant_method']}): its "
            f"quantizer left this architecture ({type(model).__name__}) untouched, e.g. torchao and bitsandbytes replace "
            "torch.nn.Linear layers and GPT-2's are Conv1D. Drop quantization_config, or quantize the checkpoint "
            "with a tool that handles this architecture and load the result."
        )
    return lm


def _saved_quantized(source: str, common: dict) -> bool:
    """Whether the checkpoint was saved quantized (a quantization_config in its config.json)."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(source, **common), "quantization_config", None) is not None
    except (OSError, ValueError):
        return False  # from_pretrained itself says what is wrong


def _check_gguf_file(folder: Path, name: str, model: str) -> None:
    if not (folder / name).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        have = f"it holds {', '.join(present)}" if present else "it holds no .gguf file"
        raise ModelError(
            f"model {model}: gguf_file must name a file in {folder} (got {name!r}; {have}). "
            "Set gguf_file to one of them."
        )


def check_tokenizer(tokenizer, source, name: str | None = None) -> None:
    """Refuse a tokenizer with an empty vocabulary. Why: a model folder without tokenizer files
    still loads under transformers 5, as an empty tokenizer built from config.json, and every
    text then becomes zero tokens while its bytes and words are counted: a perfect score."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # not a fast tokenizer: refused by name elsewhere
        return
    if backend.get_vocab_size(with_added_tokens=False) == 0:
        named = f"model {name}: " if name else ""
        raise ModelError(
            f"{named}the tokenizer of {source} must have a vocabulary (got an empty one: "
            f"{len(tokenizer)} special token(s) and no other token), so every text would become zero tokens. "
            "This is what a folder without tokenizer files gives (tokenizer.json, or vocab.json and merges.txt, or "
            "tokenizer.model): save the tokenizer beside the weights (`tokenizer.save_pretrained(folder)`)."
        )


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that says what was refused."""
    boilerplate = (
        "Weights only load failed",
        "Please file an issue",
        "Check the documentation",
        "WeightsUnpickler error",
    )
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[0] if reasons else (lines[0] if lines else type(exc).__name__)


def _as_spec(source, options: dict) -> ModelSpec:
    if isinstance(source, ModelSpec):
        return dataclasses.replace(source, **options) if options else source
    if isinstance(source, (str, Path)):
        try:
            return ModelSpec(path=str(source), **options)
        except TypeError as exc:
            known = ", ".join(f.name for f in dataclasses.fields(ModelSpec) if f.name != "path")
            raise ModelError(f"load_model: unknown option ({exc}). Known options: {known}.") from None
    raise ModelError(f"load_model: source must be a path, a hub id or a ModelSpec (got {type(source).__name__}).")


def prepare_model(
    model, tokenizer, name: str = "model", spec: ModelSpec | None = None, allow_noncausal: bool | None = None
) -> LoadedModel:
    """Wrap an already loaded ``(model, tokenizer)`` pair for scoring, after the load-time
    probes: which output-head path, whether the model is causal, which batching is exact.

    A model that is not causal raises `ModelError` unless ``allow_noncausal`` (default: the
    spec's, else False). The model's train/eval mode is left as the caller set it; scoring
    switches to eval and back."""
    check_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, name)
    device = model.get_input_embeddings().weight.device  # where input ids go, also under a device_map
    head, probes, workspace = _probed(model)
    if allow_noncausal is None:
        allow_noncausal = spec.allow_noncausal if spec is not None else False
    if not probes.causal:
        _refuse_noncausal(name, probes, allow_noncausal)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        vocab_size=model.get_output_embeddings().weight.shape[0]
        if model.get_output_embeddings() is not None
        else model.config.vocab_size,
        embedding_rows=model.get_input_embeddings().weight.shape[0],
        max_positions=max_positions(model.config),
        head=head,
        spec=spec,
        workspace=workspace,
        probes=dataclasses.replace(probes, allow_noncausal=bool(allow_noncausal)),
    )


@dataclass(frozen=True)
class _Probed:
    """What the load-time probes of one model found, kept for the next `prepare_model` of
    the same model object. Nothing here refers to the model itself (the body by weak
    reference), so the cache never keeps a model alive."""

    key: tuple
    fast: bool
    softcap: float | None
    scale: float | None
    divisor: float | None
    body: weakref.ref
    probes: Probes
    workspace: Workspace


# model -> _Probed. `score_texts(texts, (model, tokenizer))` in a loop (an evaluation in a
# training loop, a benchmark) would otherwise rerun the probes, ~10 forward passes, per call.
_PROBED: weakref.WeakKeyDictionary[torch.nn.Module, _Probed] = weakref.WeakKeyDictionary()


def _probe_key(model) -> tuple:
    """What the probes' verdicts depend on besides the architecture: a model moved, cast,
    resized or switched to another attention implementation is probed again."""
    head = model.get_output_embeddings()
    weight = model.get_input_embeddings().weight
    return (
        type(model),
        weight.dtype,
        weight.device,
        tuple(weight.shape),
        None if head is None else tuple(head.weight.shape),
        getattr(model.config, "_attn_implementation", None),
    )


def _probed(model) -> tuple[OutputHead, Probes, Workspace]:
    """The model's `OutputHead`, `probe_model` verdicts and scratch workspace, probed once
    per model object (and again when `_probe_key` changes)."""
    key = _probe_key(model)
    cached = _PROBED.get(model)
    body = cached.body() if cached is not None else None
    if cached is not None and cached.key == key and body is not None:
        head = OutputHead(model, cached.fast, cached.softcap, cached.scale, cached.divisor, body)
        return head, cached.probes, cached.workspace
    head = OutputHead.for_model(model)
    probes = probe_model(model, head)
    workspace = Workspace()
    _PROBED[model] = _Probed(
        key, head.fast, head.softcap, head.scale, head.divisor, weakref.ref(head.body_module), probes, workspace
    )
    return head, probes, workspace


def _refuse_noncausal(name: str, probes: Probes, allow_noncausal: bool) -> None:
    if allow_noncausal:
        log.warning("model %s is not causal (causality probe); scoring it anyway, as allow_noncausal asks.", name)
        return
    raise ModelError(
        f"model {name}: the causality probe changed the last tokens of an input, and the logits before them "
        f"must not move (got a change of {probes.causal_change:.3g} of the logit scale). The model attends to "
        "later tokens (bidirectional attention), so each position sees the token it is asked to predict and its "
        "'NLL' is no language-model probability. Use a causal model (a BERT-like one with is_decoder=True), or "
        "set `allow_noncausal: true` for this model (load_model/prepare_model(..., allow_noncausal=True)) "
        "to score it anyway."
    )


def load_tokenizer(spec: ModelSpec):
    """A model's tokenizer alone, as `load_model` loads it: to refuse a pair whose tokenizers
    differ before any model is loaded or any text scored."""
    from transformers import AutoTokenizer

    path = Path(spec.path).expanduser()
    source = str(path) if path.exists() else spec.path
    gguf = dict(gguf_file=spec.gguf_file) if spec.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **gguf
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load the tokenizer of {source!r}: {exc}".strip()) from exc
    check_tokenizer(tokenizer, source, spec.display_name)
    return tokenizer
