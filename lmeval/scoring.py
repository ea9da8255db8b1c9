"""Load a causal LM and score windows with it. The ONLY module that runs a model.

The output head turns hidden states (N, H) into logits (N, V); with V = 128k that is the
largest tensor of a forward pass. So the scorer runs the model body, keeps the final hidden
states, and applies the head only to the positions it scores, a chunk at a time: context
and padding positions never reach the head, and peak memory follows the chunk, not the
batch. Models whose logits are post-processed after the head (Gemma-2's soft-capping,
Cohere's logit scale, Granite's logit divisor) are handled explicitly; anything else that
does not reproduce ``model(...).logits`` falls back to that plain path, still chunked for
the log-softmax. A probe at load time decides which, so the fast path is never wrong.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError
from .losses import Workspace, token_statistics
from .windows import Window

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# float32 bytes of one logit row are multiplied by this to budget a chunk: logits, log q,
# q, and the temporaries of the reductions.
_CHUNK_COPIES = 6
# "name" or "org/name": anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """How to load one model. ``path`` is a local folder or a hub id."""

    path: str
    name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device_map: str | None = None  # spread one model over several devices (accelerate)
    max_memory: dict | None = None


@dataclass
class LoadedModel:
    """A model ready to score, with what the protocol needs to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    vocab_size: int  # width of the logits (may exceed len(tokenizer))
    embedding_rows: int
    max_positions: int | None
    head: "OutputHead"
    spec: ModelSpec | None = None
    workspace: Workspace = field(default_factory=Workspace)  # scratch reused across batches


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"model.device: must be auto, cpu, cuda or cuda:N (got {device!r}).") from exc


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision only where it is fast; the statistics are float32 regardless.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype: must be one of auto, {', '.join(DTYPES)} (got {dtype!r}).")
    return DTYPES[dtype]


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickled = [f for f in files if f.endswith(".bin") or f.endswith(".pt") or f.endswith(".pth")]
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


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load a causal LM and its fast tokenizer from a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lmeval shows its own progress

    path = Path(spec.path).expanduser()
    is_local = path.exists()
    if not is_local and not _HUB_ID.match(spec.path):
        raise ModelError(
            f"model.path: {spec.path!r} does not exist. Give a local `save_pretrained` folder "
            "or a hub id such as 'gpt2' or 'EleutherAI/pythia-160m'."
        )
    if is_local:
        if not path.is_dir():
            raise ModelError(f"model.path: {path} is not a folder. Point it at a `save_pretrained` folder.")
        _check_local_weights(path, spec.allow_pickle)
    if spec.trust_remote_code:
        log.warning("trust_remote_code is on for %s: its repository code will run on this machine.", spec.path)
    device = _resolve_device(spec.device)
    dtype = _resolve_dtype(spec.dtype, device)
    source = str(path) if is_local else spec.path
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        placed = dict(device_map=spec.device_map, max_memory=spec.max_memory) if spec.device_map else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=None if spec.allow_pickle else True, **common, **placed
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load {source!r}: {exc}".strip()) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"{source}: lmeval needs a fast (Rust) tokenizer for character offsets; "
            "save one with `tokenizers`/`PreTrainedTokenizerFast`."
        )
    if not spec.device_map:  # with a device_map, accelerate has placed (and hooked) every layer
        model.to(device)
    model.eval()
    return prepare_model(model, tokenizer, name=spec.name or default_name(spec.path), spec=spec)


def default_name(path: str) -> str:
    """A model's default name: the last part of its path or hub id."""
    return Path(path.rstrip("/")).name or path


def max_positions(config) -> int | None:
    """The model's context size from its config, if it declares one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prepare_model(model, tokenizer, name: str = "model", spec: ModelSpec | None = None) -> LoadedModel:
    """Wrap an already loaded ``(model, tokenizer)`` pair for scoring."""
    model.eval()
    device = model.get_input_embeddings().weight.device  # where input ids go, also under a device_map
    head = OutputHead.for_model(model)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        vocab_size=model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else model.config.vocab_size,
        embedding_rows=model.get_input_embeddings().weight.shape[0],
        max_positions=max_positions(model.config),
        head=head,
        spec=spec,
    )


# --------------------------------------------------------------------------------------
# The output head
# --------------------------------------------------------------------------------------


class OutputHead:
    """Logits for selected positions, from the final hidden states.

    ``fast`` is True when the body + head path reproduces ``model(...).logits``; then only
    scored positions reach the head. Otherwise the plain forward is used.
    """

    def __init__(self, model, fast: bool, softcap: float | None, scale: float | None, divisor: float | None):
        self.model = model
        self.fast = fast
        self.softcap = softcap
        self.scale = scale
        self.divisor = divisor

    @classmethod
    def for_model(cls, model) -> "OutputHead":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head = cls(
            model,
            fast=model.get_output_embeddings() is not None and model.base_model is not model,
            softcap=getattr(config, "final_logit_softcapping", None),
            scale=getattr(config, "logit_scale", None),
            divisor=getattr(config, "logits_scaling", None),
        )
        if head.fast and not head.reproduces_forward():
            log.warning(
                "%s post-processes its logits in a way lmeval does not know; "
                "using the plain model(...).logits path (slower, more memory).",
                type(model).__name__,
            )
            head.fast = False
        return head

    def project(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """(N, H) final hidden states -> (N, V) logits, with the model's post-processing.

        With a workspace, a plain linear head writes into a reused buffer (no page faults
        for a fresh (N, V) tensor on every chunk), and the post-processing works in place.
        """
        head = self.model.get_output_embeddings()
        if workspace is not None and type(head) is torch.nn.Linear:
            shape = (hidden.shape[0], head.weight.shape[0])
            out = workspace.get("logits", shape, head.weight.dtype, hidden.device)
            logits = torch.matmul(hidden, head.weight.t(), out=out)
            if head.bias is not None:
                logits.add_(head.bias)
        else:
            logits = head(hidden)
        if self.scale is not None:
            logits = logits.mul_(self.scale)
        if self.divisor is not None:
            logits = logits.div_(self.divisor)
        if self.softcap is not None:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) final hidden states (after the final norm)."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    @torch.inference_mode()
    def reproduces_forward(self) -> bool:
        """Probe: does body + project equal ``model(...).logits`` on a short input?"""
        device = next(self.model.parameters()).device
        vocab = self.model.get_input_embeddings().weight.shape[0]
        ids = (torch.arange(8, device=device) * 7919 % vocab)[None, :]
        mask = torch.ones_like(ids)
        try:
            reference = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            ours = self.project(self.body(ids, mask)).float()
        except Exception as exc:  # any model whose body cannot be called alone
            log.debug("fast head path unavailable: %s", exc)
            return False
        if ours.shape != reference.shape:
            return False
        tolerance = 1e-4 if self.model.dtype == torch.float32 else 2e-2
        scale = reference.abs().max().clamp_min(1.0)
        return bool(((ours - reference).abs().max() / scale) <= tolerance)


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreOptions:
    """What to compute per token, and how much to hold at once."""

    batch_tokens: int = 16384
    temperatures: tuple[float, ...] = ()
    top_k: int = 0
    chunk_bytes: int | None = None  # budget for one chunk of logits and its scratch; None: by device
    compile: str | bool = "auto"  # fuse the per-token reductions with torch.compile


# Below this many logits (tokens x vocabulary) a CPU run does not repay the compile time.
_COMPILE_MIN_LOGITS_CPU = 4e9


def use_compiled(lm: LoadedModel, options: ScoreOptions, n_tokens: int) -> bool:
    """Whether to fuse the reductions: always on request, by size under ``auto``."""
    if options.compile == "auto":
        return lm.device.type == "cuda" or n_tokens * lm.vocab_size >= _COMPILE_MIN_LOGITS_CPU
    return bool(options.compile)


def pack_batches(windows: list[Window], batch_tokens: int) -> list[list[int]]:
    """Indices of windows grouped so that rows x longest row <= batch_tokens.

    Windows are sorted by length (longest first) to cut padding; a window longer than the
    budget gets a batch of its own.
    """
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].input_ids), i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(windows[current[0]].input_ids) if current else len(windows[i].input_ids)
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad(windows: list[Window], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ids into (B, T) with an attention mask. The pad id is never scored and,
    under causal attention with right padding, never attended to by a real token."""
    width = max(len(w.input_ids) for w in windows)
    ids = torch.zeros((len(windows), width), dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids, dtype=torch.long)
        mask[row, : len(w.input_ids)] = 1
    return ids.to(device), mask.to(device)


def _scored_index(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets) of every scored output in a padded batch, window by window."""
    rows, cols, targets = [], [], []
    for row, w in enumerate(windows):
        n = w.n_scored
        rows.append(np.full(n, row, dtype=np.int64))
        cols.append(np.arange(w.first_scored, len(w.input_ids), dtype=np.int64))
        targets.append(np.asarray(w.targets, dtype=np.int64))
    return tuple(torch.from_numpy(np.concatenate(a)) for a in (rows, cols, targets))


# On CPU the reductions are fastest when a chunk's logits stay near cache size (measured:
# ~16 MiB of float32 logits); on CUDA larger chunks keep the kernels busy.
_CHUNK_BYTES = {"cpu": 96 * 2**20, "cuda": 1536 * 2**20}


def _chunk_rows(lm: LoadedModel, chunk_bytes: int | None) -> int:
    budget = chunk_bytes or _CHUNK_BYTES.get(lm.device.type, _CHUNK_BYTES["cpu"])
    return max(1, budget // (lm.vocab_size * 4 * _CHUNK_COPIES))


@torch.inference_mode()
def score_batch(lm: LoadedModel, windows: list[Window], options: ScoreOptions, compiled: bool = False) -> dict[str, np.ndarray]:
    """Per-token statistics for the scored outputs of ``windows``, in window order."""
    ids, mask = _pad(windows, lm.device)
    rows, cols, targets = (t.to(lm.device) for t in _scored_index(windows))
    if lm.head.fast:
        hidden = lm.head.body(ids, mask)  # (B, T, H), on the last layer's device under a device_map
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)
        source = lambda sl: lm.head.project(hidden[rows[sl], cols[sl]], lm.workspace)  # noqa: E731  (n, V)
    else:
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        rows, cols = rows.to(logits.device), cols.to(logits.device)
        source = lambda sl: logits[rows[sl], cols[sl]]  # noqa: E731
    step = _chunk_rows(lm, options.chunk_bytes)
    parts = []
    for begin in range(0, len(targets), step):
        sl = slice(begin, begin + step)
        chunk = source(sl)  # (n, V), on the output head's device
        parts.append(
            token_statistics(chunk, targets[sl].to(chunk.device), options.temperatures, options.top_k, compiled, lm.workspace)
        )
    # One device-to-host copy per batch, not one per chunk and statistic.
    fields = parts[0].__dataclass_fields__
    return {key: torch.cat([getattr(p, key) for p in parts]).cpu().numpy() for key in fields}


def score_windows(lm: LoadedModel, windows: list[Window], options: ScoreOptions, progress=None) -> dict[str, np.ndarray]:
    """Score every window; return per-token columns in window order (not batch order).

    Columns: ``doc_index, position, token_id, context_len`` and the `TokenStats` fields.
    ``progress``, if given, is called as ``progress(tokens_in_batch, tokens_in_total)`` after each batch.
    """
    counts = np.array([w.n_scored for w in windows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    out: dict[str, np.ndarray] = {}
    compiled = use_compiled(lm, options, total)
    pending = [(batch, options.batch_tokens) for batch in pack_batches(windows, options.batch_tokens)]
    while pending:
        batch, budget = pending.pop(0)
        batch_windows = [windows[i] for i in batch]
        try:
            stats, compiled = _score_batch_safely(lm, batch_windows, options, compiled)
        except torch.OutOfMemoryError:
            pending[:0] = _split_after_oom(lm, windows, batch, budget)
            continue
        _check_finite(lm, batch_windows, stats)
        offset = 0
        for i, w in zip(batch, batch_windows):
            for key, values in stats.items():
                if key not in out:
                    out[key] = np.empty((total,) + values.shape[1:], dtype=values.dtype)
                out[key][starts[i] : starts[i + 1]] = values[offset : offset + w.n_scored]
            offset += w.n_scored
        if progress is not None:
            progress(offset, total)
    out.update(_window_columns(windows, counts, total))
    return out


def _split_after_oom(lm: LoadedModel, windows: list[Window], batch: list[int], budget: int) -> list[tuple[list[int], int]]:
    """Out of memory: halve the batch's token budget and re-pack the same windows, so the
    batch is retried in smaller pieces and nothing is lost or scored twice."""
    if lm.device.type == "cuda":
        torch.cuda.empty_cache()
    if len(batch) == 1:
        w = windows[batch[0]]
        raise ModelError(
            f"model {lm.name}: out of memory on a single window of {len(w.input_ids)} tokens "
            f"(document {w.doc_id}). Lower `scoring.max_length`, or use a smaller dtype or a larger device."
        )
    half = max(1, budget // 2)
    log.warning("out of memory at batch_tokens=%d; retrying this batch at %d", budget, half)
    sub = pack_batches([windows[i] for i in batch], half)
    if len(sub) == 1:  # the budget allows them all in one row group: split by rows instead
        sub = [list(range(len(batch) // 2)), list(range(len(batch) // 2, len(batch)))]
    return [([batch[j] for j in group], half) for group in sub]


def _score_batch_safely(lm, windows, options, compiled):
    """Score a batch, dropping to the eager reductions if compiling fails (no C++ compiler,
    an unsupported backend). Returns the stats and whether to keep compiling."""
    if not compiled:
        return score_batch(lm, windows, options), False
    try:
        return score_batch(lm, windows, options, compiled=True), True
    except Exception as exc:  # torch.compile raises backend-specific errors
        log.warning("torch.compile of the token statistics failed (%s); using eager mode.", type(exc).__name__)
        return score_batch(lm, windows, options), False


def _window_columns(windows: list[Window], counts: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """Per-token document index, position, target id and context length, in window order."""
    if total == 0:
        return {k: np.zeros(0, dtype=np.int64) for k in ("doc_index", "position", "token_id", "context_len")}
    first_position = np.array([w.positions[0] if w.positions else 0 for w in windows], dtype=np.int64)
    first_context = np.array([w.first_scored + 1 for w in windows], dtype=np.int64)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)  # 0.. inside each window
    return {
        "doc_index": np.repeat(np.array([w.doc_id for w in windows], dtype=np.int64), counts),
        "position": np.repeat(first_position, counts) + within,
        "token_id": np.fromiter((t for w in windows for t in w.targets), dtype=np.int64, count=total),
        "context_len": np.repeat(first_context, counts) + within,
    }


def _check_finite(lm: LoadedModel, windows: list[Window], stats: dict[str, np.ndarray]) -> None:
    """A NaN or inf logit (a broken checkpoint, an fp16 overflow) stops the run by name."""
    bad = ~np.isfinite(stats["nll"]) | ~np.isfinite(stats["entropy"])
    if not bad.any():
        return
    first = int(np.argmax(bad))
    for w in windows:
        if first < w.n_scored:
            raise ModelError(
                f"model {lm.name}: non-finite logits at document {w.doc_id}, token position "
                f"{w.positions[first]}. The checkpoint may be broken, or half precision overflowed: "
                "try `dtype: float32`."
            )
        first -= w.n_scored


def check_vocabulary(lm: LoadedModel, max_token_id: int) -> None:
    """Token ids must index the model's embedding rows (a tokenizer/model mismatch otherwise)."""
    if max_token_id >= lm.embedding_rows:
        raise ModelError(
            f"model {lm.name}: the tokenizer produced token id {max_token_id}, but the model has "
            f"only {lm.embedding_rows} embedding rows. The tokenizer does not belong to this model; "
            "load the tokenizer saved with the checkpoint."
        )


def resolve_window(lm: LoadedModel, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """The protocol's (L, S): L defaults to the model's context size, S to L."""
    limit = lm.max_positions
    if max_length is None:
        if limit is None:
            raise ModelError(
                f"model {lm.name}: its config declares no context size. Set `scoring.max_length`."
            )
        max_length = limit
    if max_length < 1:
        raise ModelError(f"scoring.max_length: must be >= 1 (got {max_length}).")
    if limit is not None and max_length > limit:
        raise ModelError(
            f"scoring.max_length: must be <= the model's {limit} positions for {lm.name} "
            f"(got {max_length}). Lower max_length, or leave it unset to use {limit}."
        )
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ModelError(
            f"scoring.stride: must be in [1, max_length={max_length}] (got {stride}). "
            "Use stride = max_length for disjoint windows, or less for overlapping context."
        )
    return max_length, stride
