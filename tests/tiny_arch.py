"""Tiny random models of every causal-LM architecture transformers offers, for the sweep.

`build_tiny(model_type, vocab_size)` makes a two-or-so-layer model from the architecture's
own config class, with every size shrunk (hidden 32, 2 heads, 4 experts, ...), and its
weights re-initialised wider than the default so that logits spread: under the default
init every NLL is about log V, and an error of the scorer hides under it. Architectures
that cannot be scored as text-only causal LMs (multimodal, audio) or built tiny raise
`Skip` with the reason. Shared by the sweep test and ``scripts/sweep_architectures.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

# Sizes for every config field of these names; a field the config does not have is ignored.
SMALL = dict(
    hidden_size=32,
    hidden_size_global=32,
    d_model=32,
    n_embd=32,
    embedding_size=32,
    emb_dim=32,
    dim=32,
    intermediate_size=64,
    ffn_dim=64,
    n_inner=64,
    decoder_ffn_dim=64,
    encoder_ffn_dim=64,
    ffn_hidden_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    num_hidden_layers=2,
    n_layer=2,
    n_layers=2,
    num_layers=2,
    decoder_layers=2,
    encoder_layers=2,
    num_attention_heads=2,
    n_head=2,
    n_heads=2,
    num_heads=2,
    decoder_attention_heads=2,
    encoder_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    kv_channels=16,
    max_position_embeddings=64,
    n_positions=64,
    n_ctx=64,
    max_seq_len=64,
    seq_length=64,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_topk=2,
    n_shared_experts=1,
    num_shared_experts=1,
    moe_num_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    index_head_dim=16,
    index_n_heads=2,
    index_topk=24,  # beyond the short probe rows (19), within LONG_WINDOWS (40): the indexers' defect shows
    state_size=8,
    mamba_d_state=8,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_head_dim=16,
    mamba_n_groups=1,
    n_groups=1,
    mamba_chunk_size=8,
    chunk_size=8,
    time_step_rank=4,
    mamba_dt_rank=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    swa_num_attention_heads=2,
    swa_num_key_value_heads=1,
    swa_head_dim=16,
    sliding_window=8,
    sliding_window_size=8,
    attention_window_size=8,
    block_size=8,
    num_mtp_layers=0,
    num_nextn_predict_layers=0,
    num_kv_shared_layers=0,
    vocab_size_per_layer_input=None,
    hidden_size_per_layer_input=8,
    num_dense_layers=1,
    rotary_dim=8,
    num_buckets=8,
    tie_word_embeddings=False,
    use_cache=False,
    is_decoder=True,
    bos_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=0,
    use_mamba_kernels=False,
    use_mambapy=False,
    encoder_hash_byte_group_vocab=64,
)

# Per-architecture changes on top of SMALL, where the generic sizes do not fit.
OVERRIDES: dict[str, dict] = {
    "deepseek_v4": {"index_topk": 4},  # ranks keys compressed 4 to 1: 16 tokens, within LONG_WINDOWS
    "dbrx": {
        "attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "diffllama": {"num_key_value_heads": 2},  # the differential attention splits KV heads in two
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "longcat_flash": {"head_dim": 8},  # the rotary part only
    "mamba2": {"num_heads": 4},
    "minicpm3": {
        "scale_emb": 1,
        "dim_model_base": 32,
    },  # its muP scales would blow widened logits up  # hidden_size * expand = num_heads * head_dim
    "xmod": {"default_language": "en_XX"},
    "zaya": {"num_experts_per_tok": 1},
}

# Config keywords that are no fields (the config pops them while it builds itself).
KEYWORDS: dict[str, dict] = {
    "dots3_note_text": {  # its sliding-attention layers' own sizes, 64 heads of 256 by default
        "swa_num_attention_heads": 2,
        "swa_num_key_value_heads": 2,
        "swa_q_lora_rank": 16,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": 16,
        "swa_qk_nope_head_dim": 8,
        "swa_v_head_dim": 16,
        "moe_shared_expert_intermediate_size": 32,
    },
}

# Mapping entries that are not text-only causal LMs, or need inputs lmeval does not give.
NOT_TEXT = {
    "dots3_note": "multimodal (vision and audio towers)",
    "emu3": "multimodal (image tokens from a VQ model)",
    "fuyu": "multimodal (image patches)",
    "gemma3": "multimodal (ConditionalGeneration)",
    "gemma3n": "multimodal (ConditionalGeneration)",
    "gemma4": "multimodal (ConditionalGeneration)",
    "gemma4_unified": "multimodal (ConditionalGeneration)",
    "git": "multimodal (image-to-text)",
    "got_ocr2": "multimodal (OCR)",
    "moshi": "audio (speech codec tokens)",
    "moss_transcribe_diarize": "audio (transcription)",
    "musicgen": "audio (codebook tokens)",
    "musicgen_melody": "audio (codebook tokens)",
    "phi4_multimodal": "multimodal (vision and audio)",
    "whisper": "audio (decoder of a speech model)",
}


MAX_PARAMS = 20_000_000


# Variants beside the mapping's defaults, as "model_type:variant": the modes the issue names.
VARIANTS = {
    "xlnet:uni": {"attn_type": "uni"},  # unidirectional XLNet: crashes on a mask for 2+ rows
    "bert:bidirectional": {"is_decoder": False},  # BERT as its config ships: not causal
    "xlm:causal": {"causal": True},
}


class Skip(Exception):
    """This architecture is not part of the sweep; the message says why."""


def _fields(config_class) -> set[str]:
    names = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    return names | set(getattr(config_class, "attribute_map", {}))


def tiny_config(model_type: str, vocab_size: int, overrides: dict | None = None):
    """The architecture's config with every size shrunk, its layer pattern kept in miniature."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    kwargs = _tiny_kwargs(config_class, vocab_size, {**OVERRIDES.get(model_type, {}), **(overrides or {})})
    return config_class(**kwargs, **KEYWORDS.get(model_type, {}))


def _tiny_kwargs(config_class, vocab_size: int, overrides: dict) -> dict:
    """Small values for the fields ``config_class`` has, and for its sub-configs in turn."""
    fields = _fields(config_class)
    kwargs = {k: v for k, v in {**SMALL, "vocab_size": vocab_size, **overrides}.items() if k in fields}
    if "vocab_size_per_layer_input" in fields:  # Gemma-3n/4 per-layer embeddings index the same ids
        kwargs["vocab_size_per_layer_input"] = vocab_size
    pad = _default(config_class, "pad_token_id")
    if isinstance(pad, int) and pad >= vocab_size:  # keep the model's pad id (position ids use it) if it fits
        kwargs["pad_token_id"] = 1
    for name, sub_class in getattr(config_class, "sub_configs", {}).items():
        if name in fields and name not in overrides and isinstance(sub_class, type):
            kwargs[name] = _tiny_kwargs(sub_class, vocab_size, {})
    if "kv_lora_rank" in fields:  # multi-head latent attention expands the latent to every head
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 2)
    if "layer_types" not in overrides:
        kwargs.update(_small_layer_pattern(config_class, kwargs))
    return kwargs


def _default(config_class, name: str):
    name = getattr(config_class, "attribute_map", {}).get(name, name)
    fields = dataclasses.fields(config_class) if dataclasses.is_dataclass(config_class) else ()
    return next((f.default for f in fields if f.name == name), None)


def _small_layer_pattern(config_class, kwargs: dict) -> dict:
    """Hybrid models list a type per layer: keep one layer of each type, in order."""
    real = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    key = getattr(config_class, "attribute_map", {}).get("layer_types", "layer_types")
    if key not in real:  # absent, or derived from other fields (a property)
        return {}
    try:
        default = config_class()
    except Exception:
        return {}
    types = getattr(default, key, None)
    if not isinstance(types, (list, tuple)) or len(set(types)) < 2:  # uniform: the config derives it
        return {}
    kept = list(dict.fromkeys(types))
    n_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in kwargs), None)
    return {key: kept, n_key: len(kept)} if n_key else {}


def reinitialise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights wider than the default init, so that logits spread and errors show.

    Matrices get N(0, 1/fan_in) (fan_in = last dim), embeddings N(0, 1), the output head
    N(0, 9/fan_in) (logits of std ~3 from unit-norm features) and vectors (norm scales, biases, gates) their value plus N(0, 0.1^2): no
    branch stays zero, so a leak through attention or padding cannot hide.
    """
    generator = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p is head_weight:
                p.copy_(noise * 3 / p.shape[-1] ** 0.5)
            elif p is embed:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.add_(noise * 0.1)
    return model


def build_tiny(model_type: str, vocab_size: int, seed: int = 0, overrides: dict | None = None) -> torch.nn.Module:
    """A tiny random model of ``model_type`` from the causal-LM mapping, in eval mode;
    ``overrides`` are config fields set on top of the small sizes."""
    from transformers.models.auto import modeling_auto

    model_type, _, variant = model_type.partition(":")
    if variant:
        overrides = {**VARIANTS[f"{model_type}:{variant}"], **(overrides or {})}
    if model_type in NOT_TEXT:
        raise Skip(NOT_TEXT[model_type])
    class_name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    import transformers

    model_class = getattr(transformers, class_name)
    try:
        config = tiny_config(model_type, vocab_size, overrides)
    except Exception as exc:
        raise Skip(f"config cannot be built tiny: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if getattr(model_class, "config_class", type(config)) is not type(config) and hasattr(config, "text_config"):
        config = config.get_text_config()  # a composite config whose causal LM is the text model
    with torch.device("meta"):  # count the parameters before allocating them
        try:
            n_params = sum(p.numel() for p in model_class._from_config(config).parameters())
        except Exception as exc:
            raise Skip(f"model cannot be built tiny: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if n_params > MAX_PARAMS:
        raise Skip(f"still {n_params / 1e6:.0f}M parameters with the small sizes")
    torch.manual_seed(seed)
    try:
        model = model_class._from_config(config, attn_implementation="eager")
    except Exception as exc:
        raise Skip(f"model cannot be built tiny: {type(exc).__name__}: {str(exc)[:160]}") from exc
    return reinitialise(model, seed).eval()


def causal_lm_types() -> list[str]:
    """Every model type of the installed transformers' AutoModelForCausalLM mapping, then
    the VARIANTS."""
    from transformers.models.auto import modeling_auto

    return sorted(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + sorted(VARIANTS)


# --------------------------------------------------------------------------------------
# The sweep: lmeval's per-token NLL against a float64 log-softmax of the model's own logits
# --------------------------------------------------------------------------------------

WINDOWS = ((16, 16), (16, 5))  # (L, S): disjoint windows, and overlapping ones (S < L)
# For a model whose config declares a top-k selection of keys (lmeval.model.probes.SELECTIONS:
# 24 tokens here, 16 for DeepSeek-V4), windows longer than it: padding them changes the keys
# a query keeps, unless the batching prevents it.
LONG_WINDOWS = ((40, 40), (40, 13))
# At L = 16, scaled with L: one window per batch, a few (padded), all at once.
BATCH_TOKENS = (16, 48, 100_000)
QUICK_BATCH_TOKENS = (40, 100_000)  # for the default test run


def batch_tokens_for(max_length: int, quick: bool) -> list[int]:
    """The sweep's batch sizes for windows of ``max_length``: as many windows a batch as at 16."""
    return [b if b >= 100_000 else b * max_length // 16 for b in (QUICK_BATCH_TOKENS if quick else BATCH_TOKENS)]


TOLERANCE = 1e-5  # nats


def float32_floor(model, docs: list[list[int]], max_length: int, stride: int, expected: list[np.ndarray]) -> float:
    """How far the model's own float32 forward is from its float64 forward on the oracle's
    windows (nats, the largest over every token): the rounding float32 itself cannot resolve.

    Some architectures (deep stacks with large activations) round by more than TOLERANCE in
    float32 whatever the batching; an error below this floor is the arithmetic's, not a
    protocol defect (a batching defect is 1e-2 nats and more). 0 for a model that cannot run
    in float64 (some kernels take float32 only): no floor is granted then.
    """
    model64 = copy.deepcopy(model).double()
    try:
        oracle_nll(model64, docs[0][:2], max_length, stride)
    except RuntimeError:
        return 0.0
    return max(float(np.abs(oracle_nll(model64, s, max_length, stride) - e).max()) for s, e in zip(docs, expected))


def oracle_nll(model, s: list[int], max_length: int, stride: int) -> np.ndarray:
    """-log q(t[j] | its window) for every target t[j] = s[j+1], written from DESIGN.md's
    window rule: spans t[p:e] with e = min(p + S, n), each scored in the window
    s[max(0, e - L) : e], from one unmasked forward per window in float64."""
    n = len(s) - 1
    out = np.empty(n)
    for p in range(0, n, stride):
        e = min(p + stride, n)
        start = max(0, e - max_length)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s[start:e]])).logits[0].double()
        log_q = torch.log_softmax(logits, dim=-1)
        for j in range(p, e):
            out[j] = -float(log_q[j - start, s[j + 1]])
    return out


def sweep_texts(quick: bool = False, long: bool = False) -> list[str]:
    """Texts of several lengths (so batches need padding), one longer than every window;
    with ``quick`` and ``long`` (LONG_WINDOWS), two whose windows are padded beyond 24 tokens."""
    from conftest import CORPUS

    if quick:
        return [" ".join(CORPUS[:3]), CORPUS[5]] if long else [CORPUS[0] + " " + CORPUS[2][:40], "short"]
    return [" ".join(CORPUS[:3]), CORPUS[4], "short", CORPUS[1][:30], CORPUS[5]]


def windows_for(model) -> tuple[tuple[int, int], ...]:
    """The sweep's (L, S) settings for ``model``: LONG_WINDOWS where its config declares a
    top-k selection of keys, else WINDOWS."""
    from lmeval.model.probes import SELECTIONS, declared_lengths

    return LONG_WINDOWS if set(declared_lengths(model.config)) & set(SELECTIONS) else WINDOWS


def check_architecture(model_type: str, tokenizer, quick: bool = False, batching: str | None = None) -> dict:
    """One row of the sweep: how lmeval loads ``model_type`` and its largest error (nats).

    ``quick`` uses two texts and two batch sizes (the default test run); ``batching``
    replaces the probes' choice (to show what a looser one would score). ``result`` is
    ``pass`` (within TOLERANCE at every window and batch size, or, where the model's own
    float32 forward is further than that from its float64 forward, within that distance:
    ``float32_floor``), ``FAIL``, ``refused`` (a
    named ModelError at load: not causal), ``skipped`` (not a text-only causal LM, or
    cannot be built tiny) or ``error`` (anything else raised). ``errors`` holds the largest
    error per (L, S, batch_tokens).
    """
    from transformers.models.auto import modeling_auto

    import lmeval
    from lmeval.errors import ModelError
    from lmeval.model.loading import prepare_model
    from lmeval.model.probes import Probes

    started = time.perf_counter()
    row = {
        "model_type": model_type,
        "class": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type.partition(":")[0]],
        "result": "",
        "head": "",
        "batching": "",
        "max_error": float("nan"),
        "seconds": 0.0,
        "note": "",
        "errors": {},
    }
    try:
        model = build_tiny(model_type, len(tokenizer))
        lm = prepare_model(model, tokenizer, name=model_type)
        if batching is not None:
            lm = dataclasses.replace(lm, probes=Probes(batching=batching))
        row.update(head="fast" if lm.head.fast else "fallback", batching=lm.probes.batching)
        windows, failed = windows_for(model), False
        texts = sweep_texts(quick, long=windows == LONG_WINDOWS)
        bos = tokenizer.eos_token_id
        docs = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for max_length, stride in windows:
            expected = [oracle_nll(model, s, max_length, stride) for s in docs]
            floor = None
            for batch_tokens in batch_tokens_for(max_length, quick):
                table = lmeval.score_texts(texts, lm, max_length=max_length, stride=stride, batch_tokens=batch_tokens)
                error = 0.0
                for i, want in enumerate(expected):
                    got = table.nll[table.doc_id == i].to_numpy(dtype=np.float64)
                    error = max(error, float(np.abs(got - want).max()) if len(got) == len(want) else float("inf"))
                if error > TOLERANCE and floor is None:
                    floor = float32_floor(model, docs, max_length, stride, expected)
                    row["float32_floor"] = max(row.get("float32_floor", 0.0), floor)
                row["errors"][(max_length, stride, batch_tokens)] = error
                failed = failed or (error > TOLERANCE and error > floor)
        error = max(row["errors"].values())
        row.update(result="FAIL" if failed else "pass", max_error=error)
        if error > TOLERANCE and row["result"] == "pass":
            row["note"] = (
                f"beyond {TOLERANCE:g} but within the model's own float32 rounding ({row['float32_floor']:.2e})"
            )
    except Skip as exc:
        row.update(result="skipped", note=str(exc))
    except ModelError as exc:
        refused = "causality probe" in str(exc)
        row.update(result="refused" if refused else "error", note=str(exc)[:200])
    except Exception as exc:  # the sweep reports every architecture, whatever it raises
        row.update(result="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
    row["seconds"] = time.perf_counter() - started
    return row
