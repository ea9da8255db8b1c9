"""Protocol presets: the arithmetic behind the perplexities other tools print, by name.

A preset sets protocol keys only (windows, joining, prefix tokens, text normalisation); the
data and the models come from the user, and every key the user sets wins over the preset's.
``lmeval run --preset NAME --model M --data D`` or ``preset: NAME`` in a config. Each is
checked against a re-implementation of its reference's arithmetic (tests/test_presets.py) and
documented rule by rule in docs/protocol.md.

- ``gptq_wikitext2``: IST-DASLab/gptq ``datautils.get_wikitext2`` + ``llama_eval``: the texts
  joined by ``"\\n\\n"``, one tokenization as ``tokenizer(text)`` does it (a BOS only where the
  tokenizer adds one, once, at the start), disjoint chunks of ``seqlen`` ids (remainder
  dropped), every id of a chunk but its first scored, ``exp`` of the mean chunk loss (all
  chunks score seqlen - 1 tokens, so this is the pooled ppl).
- ``llama_cpp``: llama.cpp ``tools/perplexity/perplexity.cpp`` ``perplexity()`` (default
  ``--ppl-stride 0``): the text tokenized once with the tokenizer's BOS (when it adds one),
  chunks of ``n_ctx`` ids (``tokens / n_ctx`` of them, remainder dropped), each chunk's first
  id replaced by BOS when the tokenizer adds one, only the outputs from ``n_ctx / 2`` on
  scored (chunk positions ``n_ctx/2 + 1 .. n_ctx - 1``), ``exp(sum nll / count)``.
- ``lm_eval_wikitext``: lm-evaluation-harness's ``wikitext`` task (the shipped config of the
  same name, without its data): rolling windows of the model's context, one BOS/EOS prefix per
  page, wikitext detokenizer, words and bytes of the page before detokenizing.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "gptq_wikitext2": {
        "scoring": {
            "max_length": 2048,  # GPTQ's model.seqlen
            "stride": None,
            "bos": "tokenizer",
            "documents": "concatenated",
            "separator": "\n\n",
            "windows": "chunks",
            "chunk_context": 1,
            "chunk_bos": False,
        }
    },
    "llama_cpp": {
        "scoring": {
            "max_length": 512,  # llama-perplexity's default n_ctx
            "stride": None,
            "bos": "tokenizer",
            "documents": "concatenated",
            "separator": "\n\n",
            "windows": "chunks",
            "chunk_context": "half",
            "chunk_bos": True,
        }
    },
    "lm_eval_wikitext": {
        "scoring": {
            "max_length": None,
            "stride": None,
            "bos": "auto",
            "documents": "independent",
            "windows": "rolling",
        },
        "data": {"detokenizer": "wikitext", "count_on": "source"},
    },
}


def apply_preset(raw: dict, problems: list[str]) -> dict:
    """``raw`` with its ``preset``'s keys laid under the user's own (the user's win)."""
    name = raw.get("preset")
    if name is None:
        return raw
    if name not in PRESETS:
        problems.append(f"preset: must be one of {', '.join(sorted(PRESETS))} (got {name!r}).")
        return raw
    merged = dict(raw)
    for section, keys in PRESETS[name].items():
        given = raw.get(section)
        merged[section] = {**keys, **given} if isinstance(given, dict) else (given if given is not None else dict(keys))
    return merged
