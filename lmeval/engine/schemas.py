"""The Arrow schemas of the tables `lmeval run` writes, defined once for the writers and readers.

``doc_id`` is always a string column: ids come from the user's ``id_field`` (any JSON
scalar), from row numbers, or are the ``<separator>`` of concatenated scoring, and one
column cannot mix them. Row numbers are therefore written "0", "1", ...
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TOKENS = pa.schema(
    [
        ("model", pa.string()),
        ("doc_id", pa.string()),
        ("position", pa.int64()),
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("context_len", pa.int64()),
        ("nll", pa.float32()),
        ("surprisal_bits", pa.float32()),
        ("entropy", pa.float32()),
        ("max_prob", pa.float32()),
        ("is_top1", pa.bool_()),
        ("rank", pa.int64()),
        ("sum_q2", pa.float32()),
        ("mean_neg_logq", pa.float32()),
    ]
)
DOCUMENTS = pa.schema(
    [
        ("model", pa.string()),
        ("doc_id", pa.string()),
        ("n_tokens", pa.int64()),
        ("n_bytes", pa.int64()),
        ("n_words", pa.int64()),
        ("nll_sum", pa.float64()),
        ("ppl", pa.float64()),
        ("bits_per_token", pa.float64()),
        ("bits_per_byte", pa.float64()),
    ]
)
DIVERGENCE = pa.schema(
    [
        ("model", pa.string()),
        ("baseline", pa.string()),
        ("doc_id", pa.string()),
        ("position", pa.int64()),
        ("kl", pa.float32()),
        ("kl_reverse", pa.float32()),
        ("delta_p", pa.float32()),
        ("same_top1", pa.bool_()),
        ("nll", pa.float32()),
        ("nll_baseline", pa.float32()),
        ("acceptance", pa.float32()),
        ("topk_overlap", pa.float32()),
        ("kl_topk", pa.float32()),
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("context_len", pa.int64()),
    ]
)
# analysis.words: one row per model and word, the columns of surprisal_table(words=True)
WORDS = pa.schema(
    [
        ("model", pa.string()),
        ("doc_id", pa.string()),
        ("word_index", pa.int64()),
        ("word", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("n_tokens", pa.int64()),
        ("surprisal_bits", pa.float64()),
        ("surprisal_bits_token_sum", pa.float64()),
        ("boundary_before_bits", pa.float64()),
        ("boundary_after_bits", pa.float64()),
        ("nll", pa.float64()),
        ("prob", pa.float64()),
        ("rank", pa.int64()),
        ("entropy", pa.float64()),
        ("entropy_bits", pa.float64()),
        ("complete", pa.bool_()),
        ("crosses_word", pa.bool_()),
    ]
)
SCHEMAS = {
    "tokens.parquet": TOKENS,
    "documents.parquet": DOCUMENTS,
    "divergence.parquet": DIVERGENCE,
    "words.parquet": WORDS,
}
# Columns a table holds only when asked for (analysis.membership, analysis.reference); a
# trailing "_" names a family (mink_prob_10, mink_prob_20, ...).
OPTIONAL = {
    "documents.parquet": {
        "mink_prob_": pa.float64(),
        "mink_pp_": pa.float64(),
        "zlib_ratio": pa.float64(),
        "zlib_bytes": pa.int64(),
        "extractable_suffix": pa.int64(),
        "ref_ratio": pa.float64(),
    },
    "words.parquet": {"length_chars": pa.int64(), "frequency_zipf": pa.float64(), "unigram_logfreq": pa.float64()},
}

# --------------------------------------------------------------------------------------
# The glossary: every column of every table lmeval writes or returns, defined once, with
# its unit. docs/gen_glossary.py renders docs/glossary.md from these dicts, and
# tests/test_docs.py fails when a table holds a column that has no entry here.
# --------------------------------------------------------------------------------------


class Column(NamedTuple):
    """One glossary entry: the unit of a column's values, what they mean, and the tables
    (keys of `TABLES`) that hold the column."""

    unit: str
    meaning: str
    tables: tuple[str, ...]


# table -> what one of its rows is. File names are those of `output.dir`; the others are
# returned by the Python API or printed by a command.
TABLES = {
    "tokens.parquet": "one row per model and scored token (`output.per_token: true`)",
    "documents.parquet": "one row per model and document",
    "summary.csv": "one row per model: the corpus pooled",
    "calibration.csv": "one row per model and confidence bin (reliability diagram)",
    "temperature.csv": "one row per model and temperature of `calibration.temperatures`",
    "positions.csv": "one row per model, axis and non-empty bin of position or context length",
    "compare.csv": "one row per model, baseline and metric: paired deltas with bootstrap intervals",
    "compare_documents.csv": "one row per model and document: its change from the baseline, largest first",
    "compare_tokens.csv": "the `compare.top_k` tokens of each model whose NLL changed most",
    "divergence.parquet": "one row per model and scored token against the baseline "
    "(`compare.divergence: true`; `lmeval.divergence()` returns the same columns)",
    "divergence.csv": "one row per model against the baseline (`lmeval.divergence_summary()` returns the same columns)",
    "divergence_tokens.csv": "each model's `compare.top_k` tokens of largest KL",
    "groups.csv": "one row per model, level of `data.group_by` and group: the group's documents pooled",
    "divergence_groups.csv": "one row per model, level and group against the baseline (`compare.divergence: true` "
    "with `data.group_by`)",
    "words.parquet": "one row per model and word (`analysis.words: true`): the columns of surprisal_table(words=True)",
    "score_texts()": "`lmeval.score_texts`: the columns of tokens.parquet, plus these on request",
    "surprisal_table()": "`lmeval.surprisal_table` (and `lmeval surprisal --format csv`): one row per token",
    "surprisal_table(words=True)": "`lmeval.surprisal_table(words=True)` (and `lmeval surprisal --words`): one row per word",
    "lmeval surprisal --baseline": "`lmeval surprisal --baseline B --format csv`: one row per token, model against baseline",
    "minimal_pairs()": "`lmeval.minimal_pairs` and the `.pairs.csv` of `lmeval pairs`: one row per sentence pair",
    "score_chats()": "`lmeval.producers.chat.score_chats`: the columns of score_texts() for the assistant turns, plus these",
    "turn_table()": "`lmeval.producers.chat.turn_table`: one row per assistant turn of `score_chats`",
}

# Placeholders of column families: ``ce_eps{eps}`` names ce_eps0.0, ce_eps0.05, ...
FAMILIES = {
    "eps": r"[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?",
    "k": r"[0-9]+",
    "q": r"[0-9]+",
    "mean": r"kl_mean|kl_reverse_mean|same_top1|delta_p_mean|delta_p_rms|ln_ppl_ratio|ppl_ratio|acceptance_mean"
    r"|topk_overlap_mean|kl_topk_mean",
    "tested": r"delta_p_mean|ln_ppl_ratio",
    # summary.csv's intervals (bits_per_byte has its own row, shared with groups.csv)
    "pooled": r"ppl|bits_per_token|word_ppl|ece|mce|brier|top1_accuracy",
    "level": r".+",  # a column of data.group_by
    "average": r"bits_per_byte_micro|bits_per_byte_doc_mean|bits_per_byte_macro_.+|ppl_micro|ppl_macro_.+|ppl_doc_mean",
}

_T, _D, _S = "tokens.parquet", "documents.parquet", "summary.csv"
_CAL, _TEMP, _POS = "calibration.csv", "temperature.csv", "positions.csv"
_CMP, _CD, _CT = "compare.csv", "compare_documents.csv", "compare_tokens.csv"
_DV, _DS, _DT = "divergence.parquet", "divergence.csv", "divergence_tokens.csv"
_GR, _DG = "groups.csv", "divergence_groups.csv"
_ST, _SV, _SW, _SB = "score_texts()", "surprisal_table()", "surprisal_table(words=True)", "lmeval surprisal --baseline"
_PR, _SC, _TT = "minimal_pairs()", "score_chats()", "turn_table()"
_PER_TOKEN = (_T, _ST)  # the scorer's columns: tokens.parquet and score_texts() share them
_Q = (
    "the q-th percentile over every token, q spelt with its decimal point after two digits: p001 = 0.1st, "
    "p01 = 1st, p99 = 99th, p999 = 99.9th; exact up to 2^21 tokens per model, then within 0.5% relative "
    "(lmeval.core.sketch); no interval"
)

COLUMNS: dict[str, Column] = {
    # Who and where
    "model": Column(
        "—",
        "the model's name: `models[].name` (default the last part of its path)",
        (_T, _D, _S, _CAL, _TEMP, _POS, _CMP, _CD, _CT, _DV, _DS, _DT, _ST, _GR, _DG),
    ),
    "baseline": Column(
        "—",
        "the model compared against: `compare.baseline` (default the first model), or the `baseline` argument",
        (_CMP, _CD, _CT, _DV, _DS, _DT, _DG),
    ),
    "doc_id": Column(
        "—",
        "the document's id. In files always a string: `data.id_field`, else the row number "
        '("0", "1", ...), and `<separator>` for concatenated scoring. In tables the Python API '
        "returns, the text's index in the list given",
        (_T, _D, _CD, _CT, _DV, _DT, _ST, _SV, _SW, _SB, _TT),
    ),
    "position": Column(
        "tokens",
        "the token's index among its document's tokens, 0 = the first (with `bos: none` "
        "the first only conditions and has no row); for a text scored given a context, relative "
        "to the text",
        (_T, _CT, _DV, _DT, _ST, _SV, _SB),
    ),
    "token_id": Column("—", "the token's id in the vocabulary", (_T, _DV, _ST, _SV, _SB)),
    "token": Column(
        "—", "the token's vocabulary piece as the tokenizer spells it (e.g. `Ġthe`)", (_T, _CT, _DV, _DT, _ST, _SV, _SB)
    ),
    "token_text": Column(
        "—",
        "the document's characters the token covers, `text[char_start:char_end]` (empty for "
        "a bare-space token; repeated over the byte tokens of one split character)",
        (_DT, _SV, _SB),
    ),
    "char_start": Column(
        "characters",
        "where the token (a word, in a word table) starts in its document's scored text, a Python string index",
        (_T, _CT, _DV, _DT, _ST, _SV, _SW, _SB),
    ),
    "char_end": Column(
        "characters", "where it ends (exclusive): `text[char_start:char_end]`", (_T, _CT, _DV, _DT, _ST, _SV, _SW, _SB)
    ),
    "context_len": Column("tokens", "how many ids the prediction was conditioned on, the BOS included", (_T, _DV, _ST)),
    "context": Column(
        "—",
        "divergence_tokens.csv: up to 40 characters of the document before the token; "
        "minimal_pairs(contexts=...): the text both sentences were scored given",
        (_DT, _PR),
    ),
    # Per-token statistics, from one pass over each chunk of logits
    "nll": Column(
        "nats",
        "−ln q(y | context): the true token's negative log-likelihood, its cross-entropy against "
        'the one-hot truth. No column is called "loss". In a word table, the word\'s (corrected) surprisal '
        "in nats; in divergence tables, the model's (not the baseline's)",
        (_T, _CT, _DV, _DT, _ST, _SV, _SW, _SB),
    ),
    "surprisal_bits": Column(
        "bits",
        "nll / ln 2 = −log2 q(y | context). In a word table, the word's corrected "
        "surprisal −log2 p(word | text before) = surprisal_bits_token_sum + boundary_after_bits "
        "− boundary_before_bits",
        (_T, _ST, _SV, _SW, _SB),
    ),
    "entropy": Column(
        "nats",
        "H(q) = −Σ_v q_v ln q_v of the model's next-token distribution before it sees the "
        "token: its own uncertainty, i.e. its expected surprisal. In a word table, the sum over the "
        "word's tokens",
        (_T, _ST, _SV, _SW),
    ),
    "entropy_bits": Column("bits", "entropy / ln 2", (_SV, _SW)),
    "max_prob": Column("probability", "the probability of the model's top-1 token: its confidence", _PER_TOKEN),
    "is_top1": Column("bool", "the true token is the model's argmax (ties count), i.e. rank = 1", _PER_TOKEN),
    "rank": Column(
        "—",
        "1 + the number of vocabulary tokens strictly more probable than the true one (1 = the "
        "model's top choice). In a word table, the worst (largest) rank among the word's tokens",
        (_T, _ST, _SV, _SW),
    ),
    "sum_q2": Column("—", "Σ_v q_v², in [0, 1]: what the Brier score needs (brier = 1 − 2 q_y + Σ_v q_v²)", _PER_TOKEN),
    "mean_neg_logq": Column(
        "nats",
        "(1/V) Σ_v −ln q_v, the cross-entropy against the uniform distribution: what "
        "label-smoothed CE needs (ce_eps = (1 − eps)·nll + eps·mean_neg_logq)",
        _PER_TOKEN,
    ),
    "topk_token_ids": Column(
        "—", "`score_texts(top_k=k)`: the ids of the k most probable next tokens, most probable first", (_ST,)
    ),
    "topk_probs": Column("probability", "`score_texts(top_k=k)`: their probabilities", (_ST,)),
    "topk": Column(
        "—",
        "`surprisal_table(top_k=k)`: the k likeliest next tokens as "
        '`[{"token": text, "prob": p}, ...]`, most likely first',
        (_SV,),
    ),
    "crosses_context": Column(
        "bool",
        "scored given a context: the token straddles the boundary between context "
        "and text and is scored with the text (in a word table: a token of the word starts "
        "inside the context)",
        (_ST, _SV, _SW),
    ),
    "prob": Column(
        "probability",
        "exp(−nll): the probability the model gave the token (the word, in a word table)",
        (_SV, _SW, _SB),
    ),
    # Words
    "word_index": Column("—", "the word's index among its text's `\\S+` runs", (_SW,)),
    "word": Column(
        "—",
        "a maximal run of non-whitespace characters of the text (punctuation stays with its word, "
        'as in lm-eval\'s `re.split(r"\\s+", text)`)',
        (_SW,),
    ),
    "surprisal_bits_token_sum": Column("bits", "the plain sum of the word's token surprisals, uncorrected", (_SW,)),
    "boundary_before_bits": Column(
        "bits",
        "−log2 q(B ∪ E | before the token or word): the surprisal of a word "
        "boundary where the word starts, already paid by the previous word (B: the ids "
        'whose text begins with whitespace under `word_boundary="whitespace"`, or with the '
        'word-start marker Ġ/▁ under `"marker"`; E: {EOS} under `text_end="eos"`, else '
        "empty). For a text's first word, of the text starting the way it does after "
        "the BOS",
        (_SV, _SW),
    ),
    "boundary_after_bits": Column(
        "bits", "−log2 q(B ∪ E | after the token or word): the surprisal of the word ending there", (_SV, _SW)
    ),
    "complete": Column(
        "bool",
        'every token of the word has a row (False for the first word under `bos="none"`, '
        "whose first token only conditions; its boundary_before_bits is then 0)",
        (_SW,),
    ),
    "crosses_word": Column(
        "bool",
        "a token of this word also covers characters of another word (the whole token counts for the first word)",
        (_SW,),
    ),
    # Word covariates (surprisal_table(words=True, covariates=[...]))
    "length_chars": Column(
        "characters",
        "with covariates `length`: the word's length in characters (Unicode code points) once the punctuation "
        "at either end is stripped (`dog.` is 3; the raw span is char_end − char_start)",
        (_SW,),
    ),
    "frequency_zipf": Column(
        "Zipf (log10 per 10^9 words)",
        "with covariates `frequency`: log10(wordfreq.word_frequency(word, language)) + 9 for the word with the "
        "punctuation at either end stripped (wordfreq's Zipf scale, unrounded); NaN for a word wordfreq does not "
        "know or a word of punctuation alone, never 0",
        (_SW,),
    ),
    "unigram_logfreq": Column(
        "log10",
        "with covariates `unigram`: log10(count / n_words) of the stripped, case-folded word among every word of "
        "the scored texts themselves (no library, no language); NaN for a word of punctuation alone",
        (_SW,),
    ),
    # Counts and pooled loss
    "n_tokens": Column(
        "tokens",
        "scored tokens: of the document (compare_documents.csv: the model's), of the "
        "corpus (summary.csv, divergence.csv), of the bin (calibration.csv, positions.csv), of the "
        "word, or of the turn with its end-of-turn token (turn_table)",
        (_D, _S, _CAL, _POS, _CD, _DS, _SW, _TT, _GR, _DG),
    ),
    "n_bytes": Column(
        "bytes",
        "UTF-8 bytes of the scored text (of the text before `data.detokenizer` under "
        "`data.count_on: source`); compare_documents.csv: the baseline's",
        (_D, _S, _CD, _GR),
    ),
    "n_words": Column("words", '`len(re.split(r"\\s+", text))`, as lm-eval counts words', (_D, _S, _GR)),
    "n_documents": Column(
        "documents",
        "summary.csv: documents scored (empty ones are counted in n_skipped "
        "instead); compare.csv and divergence.csv: documents both models were compared on, the "
        "unit the bootstrap resamples; positions.csv: documents with tokens in the bin",
        (_S, _POS, _CMP, _DS, _GR, _DG),
    ),
    "n_skipped": Column("documents", "empty or whitespace-only documents skipped (never scored as a zero loss)", (_S,)),
    "nll_sum": Column(
        "nats",
        "Σ nll over the document's scored tokens (summary.csv: the corpus's; turn_table: the "
        "turn's, its end-of-turn token included)",
        (_D, _S, _CD, _TT, _GR),
    ),
    "nll_mean": Column(
        "nats",
        "Σ nll / n_tokens, pooled: over the corpus (summary.csv), at one temperature "
        "(temperature.csv: the mean NLL of softmax(z / T)), over a bin's tokens (positions.csv), "
        "or the model's over the pair's tokens (divergence.csv)",
        (_S, _TEMP, _POS, _DS),
    ),
    "ppl": Column(
        "— (per token)",
        "exp(Σ nll / n_tokens), pooled; in summary.csv over every scored token of the "
        "corpus, never a mean of per-document values",
        (_D, _S, _GR),
    ),
    "bits_per_token": Column("bits/token", "Σ nll / ln 2 / n_tokens", (_D, _S, _GR)),
    "bits_per_byte": Column("bits/byte", "Σ nll / ln 2 / n_bytes: comparable across tokenizers", (_D, _S, _GR)),
    "word_ppl": Column("— (per word)", "exp(Σ nll / n_words): lm-eval's `word_perplexity`", (_S, _GR)),
    "byte_ppl": Column("— (per byte)", "exp(Σ nll / n_bytes): lm-eval's `byte_perplexity`", (_S,)),
    "ppl_doc_mean": Column(
        "— (per token)",
        "the unweighted mean over documents of each document's own ppl (HF "
        "evaluate's `mean_perplexity`); not the pooled ppl",
        (_S,),
    ),
    # Groups (data.group_by): one row per level and group in groups.csv, named averages in the summary
    "level": Column(
        "—",
        "the `data.group_by` column a row groups by (compare.csv: empty on the whole corpus's rows)",
        (_GR, _DG, _CMP),
    ),
    "group": Column(
        "—",
        "the documents' value of that column, joined with its parents' values by `/` below the top level "
        "(`prophets/daniel`); compare.csv: empty on the whole corpus's rows",
        (_GR, _DG, _CMP),
    ),
    "bits_per_byte_ci_low": Column(
        "bits/byte",
        "lower end of bits_per_byte's 95% document-bootstrap percentile interval over `compare.bootstrap` "
        "resamples (groups.csv: documents resampled within the group, a parent's within each child); NaN with "
        "fewer than `compare.min_documents` documents, and in summary.csv of `output.documents_only` runs",
        (_S, _GR),
    ),
    "bits_per_byte_ci_high": Column("bits/byte", "upper end of that interval", (_S, _GR)),
    "{pooled}_ci_low": Column(
        "the metric's unit",
        "lower end of the figure's 95% percentile interval over `compare.bootstrap` resamples of the documents "
        "(drawn in doc_id order), each resample pooled like the figure from its documents' sums (ECE and MCE in "
        "the point estimate's bins); NaN with fewer than `compare.min_documents` documents, and in "
        "`output.documents_only` runs (no resamples)",
        (_S,),
    ),
    "{pooled}_ci_high": Column("the metric's unit", "upper end of that interval", (_S,)),
    "bits_per_byte_macro_children": Column(
        "bits/byte",
        "the unweighted mean of the bits_per_byte of the group's children one level down (Paloma's macro over the "
        "subdomains of a source); NaN at the finest level",
        (_GR,),
    ),
    "n_skipped_no_group": Column(
        "documents", "documents left out for want of a `data.group_by` value (`data.group_missing: skip`)", (_S,)
    ),
    "bits_per_byte_micro": Column(
        "bits/byte", "Σ nll / ln 2 / Σ n_bytes over every document: the summary's bits_per_byte, named", (_S,)
    ),
    "bits_per_byte_doc_mean": Column(
        "bits/byte", "the unweighted mean over documents of each document's bits_per_byte", (_S,)
    ),
    "{average}_ci_low": Column(
        "the average's unit",
        "lower end of the named average's 95% percentile interval over `compare.bootstrap` resamples that draw "
        "documents within their finest-level group (stratified: every group keeps its size); NaN with fewer than "
        "`compare.min_documents` documents",
        (_S,),
    ),
    "{average}_ci_high": Column("the average's unit", "upper end of that interval", (_S,)),
    "bits_per_byte_macro_weighted_{level}": Column(
        "bits/byte",
        "Σ_g w_g·bpb_g / Σ_g w_g over the level's groups, w from `data.group_weights` (`documents`: each group's "
        "document count, lm-eval's weight_by_size group mean)",
        (_S,),
    ),
    "bits_per_byte_macro_{level}": Column(
        "bits/byte", "the unweighted mean over the level's groups of each group's pooled bits_per_byte", (_S,)
    ),
    "ppl_micro": Column(
        "— (per token)", "exp(Σ nll / Σ n_tokens) over every document: the summary's ppl, named", (_S,)
    ),
    "ppl_macro_{level}": Column(
        "— (per token)",
        "exp(the unweighted mean over the level's groups of Σ nll / Σ n_tokens): the geometric mean of the groups' "
        "perplexities",
        (_S,),
    ),
    "tokens_per_second": Column("tokens/s", "scored tokens per second of scoring (model loading excluded)", (_S,)),
    # Calibration
    "ece": Column(
        "probability",
        "expected calibration error: Σ_b (n_b / N)·|accuracy_b − confidence_b| over the "
        "confidence bins (temperature.csv: of softmax(z / T))",
        (_S, _TEMP),
    ),
    "mce": Column(
        "probability", "maximum calibration error: the largest |accuracy_b − confidence_b| of a non-empty bin", (_S,)
    ),
    "brier": Column("—", "mean over tokens of Σ_v (q_v − onehot_v)² = 1 − 2 q_y + Σ_v q_v², in [0, 2]", (_S,)),
    "top1_accuracy": Column("share", "mean of is_top1", (_S,)),
    "confidence_mean": Column("probability", "mean of max_prob (calibration.csv: over the bin's tokens)", (_S, _CAL)),
    "entropy_mean": Column("nats", "mean of entropy over the tokens", (_S,)),
    "accuracy": Column("share", "mean of is_top1 over the bin's tokens", (_CAL,)),
    "ce_eps{eps}": Column(
        "nats",
        "mean cross-entropy against torch's label-smoothed target P_eps = (1 − eps)·onehot "
        "+ eps / V, i.e. (1 − eps)·nll + eps·mean_neg_logq; one column per "
        "`calibration.label_smoothing` value, spelt as a float (ce_eps0.0, ce_eps0.05)",
        (_S,),
    ),
    "h_eps{eps}": Column(
        "nats",
        "H(P_eps), the entropy of the smoothed target: the floor of ce_eps that no model "
        "can remove (a constant of eps and V)",
        (_S,),
    ),
    "kl_eps{eps}": Column(
        "nats",
        "ce_eps − h_eps = KL(P_eps ‖ q) ≥ 0: the part a better model can remove; never "
        'exponentiated into a "perplexity"',
        (_S,),
    ),
    "best_temperature": Column(
        "—",
        "the temperature T of `calibration.temperatures` with the lowest mean NLL of "
        "softmax(z / T) (NaN without a grid)",
        (_S,),
    ),
    "temperature": Column("—", "T: the logits z are divided by it, softmax(z / T)", (_TEMP,)),
    "bin": Column(
        "—",
        "the bin's index, 0 = the lowest: of confidence (calibration.csv) or of position or context "
        "length (positions.csv)",
        (_CAL, _POS),
    ),
    "lo": Column(
        "probability (calibration.csv); tokens (positions.csv)",
        "the bin's lower edge: it holds the values v with lo ≤ v < hi",
        (_CAL, _POS),
    ),
    "hi": Column("probability (calibration.csv); tokens (positions.csv)", "the bin's upper edge", (_CAL, _POS)),
    # Context use and membership
    "axis": Column(
        "—",
        "`position` (the token's index in its document) or `context_len` (the ids its prediction "
        "was conditioned on, BOS included)",
        (_POS,),
    ),
    "value_mean": Column(
        "tokens",
        "the mean position (or context length) of the bin's tokens, where positions.png draws the bin",
        (_POS,),
    ),
    "icl_score": Column(
        "nats",
        "the in-context-learning score of Olsson et al. 2022: mean NLL of the tokens "
        "predicted from about 500 tokens of context minus that of the tokens predicted from about "
        "50 (`context_len` within ±10% of each of `analysis.icl_context`), pooled over the documents "
        "with tokens in both windows; negative = the model uses its context",
        (_S,),
    ),
    "icl_ci_low": Column("nats", "lower end of icl_score's 95% document-bootstrap interval", (_S,)),
    "icl_ci_high": Column("nats", "upper end of that interval", (_S,)),
    "icl_documents": Column("documents", "documents pooled into icl_score", (_S,)),
    "icl_note": Column("—", "why icl_score is NaN (e.g. no document long enough); empty otherwise", (_S,)),
    "mink_prob_{k}": Column(
        "nats",
        "Min-K% Prob (Shi et al. 2023): the mean of the lowest k% of the document's "
        "token log-probabilities −nll, over max(1, floor(n·k/100)) tokens; ≤ 0; higher = more "
        "likely seen in training. One column per `analysis.mink_k`",
        (_D,),
    ),
    "mink_pp_{k}": Column(
        "—",
        "Min-K%++ (Zhang et al. 2024): per token z = (ln q_y − E_q[ln q]) / SD_q[ln q], then "
        "the mean of the lowest k% of the z; higher = more likely seen (z = 0 where the "
        "distribution has no spread)",
        (_D,),
    ),
    "zlib_bytes": Column(
        "bytes", '`len(zlib.compress(text.encode("utf-8")))` of the scored text, zlib\'s default level', (_D,)
    ),
    "zlib_ratio": Column(
        "nats/token per byte",
        "(nll_sum / n_tokens) / zlib_bytes (Carlini et al. 2021): lower = "
        "the model finds the text far easier than its redundancy explains, i.e. more likely seen",
        (_D,),
    ),
    "extractable_suffix": Column(
        "tokens",
        "the length of the longest suffix of the document whose every token is "
        "the model's argmax under teacher forcing (is_top1, ties count): the teacher-forced "
        "form of k-extractability (Carlini et al. 2023)",
        (_D,),
    ),
    "ref_ratio": Column(
        "—",
        "(nll_sum / n_bytes) / (the same for `analysis.reference`) on the same document: lower "
        "= the model finds it easier than the reference does; 1 for the reference itself",
        (_D,),
    ),
    # Comparing models
    "metric": Column(
        "—",
        "the pooled metric compared: bits_per_token and ppl (only when both models share one "
        "tokenizer), bits_per_byte and word_ppl (always)",
        (_CMP,),
    ),
    "unit": Column("—", "the metric's unit: `bits/token`, `ppl (tokens)`, `bits/byte` or `ppl (words)`", (_CMP,)),
    "value": Column("the metric's unit", "the model's pooled metric", (_CMP,)),
    "baseline_value": Column("the metric's unit", "the baseline's pooled metric on the same documents", (_CMP,)),
    "delta": Column(
        "the metric's unit (compare.csv); nats (minimal pairs)",
        "compare.csv: value − baseline_value, "
        "negative = the model is better; minimal pairs: logprob_good − logprob_bad",
        (_CMP, _PR),
    ),
    "ci_low": Column(
        "the estimate's unit",
        "lower end of a 95% document-bootstrap percentile interval: of delta, "
        "paired (compare.csv), or of nll_mean (positions.csv; NaN for a bin with tokens from one "
        "document). NaN with fewer than `compare.min_documents` documents",
        (_CMP, _POS),
    ),
    "ci_high": Column("the estimate's unit", "upper end of that interval", (_CMP, _POS)),
    "p_value": Column(
        "probability",
        "two-sided paired bootstrap p-value of delta: min(1, 2·min((1 + #{δ* ≤ 0}) / "
        "(B + 1), (1 + #{δ* ≥ 0}) / (B + 1))) over B resamples",
        (_CMP,),
    ),
    "ratio": Column("—", "value / baseline_value", (_CMP,)),
    "ratio_ci_low": Column("—", "lower end of ratio's 95% paired bootstrap interval", (_CMP,)),
    "ratio_ci_high": Column("—", "upper end of that interval", (_CMP,)),
    "n_resamples": Column(
        "resamples",
        "bootstrap resamples of documents (`compare.bootstrap`); summary.csv: those behind its intervals, 0 where "
        "it has none (too few documents, `output.documents_only`)",
        (_CMP, _DS, _DG, _S),
    ),
    "note": Column(
        "—",
        "why a metric is absent or what to keep in mind (tokenizers differ, the protocol differs, "
        "too few documents for an interval); empty otherwise",
        (_CMP, _GR, _DG),
    ),
    "nll_sum_baseline": Column("nats", "the baseline's Σ nll over the document", (_CD,)),
    "delta_nll_sum": Column("nats", "nll_sum − nll_sum_baseline", (_CD,)),
    "delta_bits_per_token": Column(
        "bits/token", "the document's bits_per_token, model minus baseline (NaN without a shared tokenizer)", (_CD,)
    ),
    "delta_bits_per_byte": Column("bits/byte", "the document's bits_per_byte, model minus baseline", (_CD,)),
    "delta_nll": Column(
        "nats", "nll − nll_baseline of one token, the two models aligned by (doc_id, position)", (_CT,)
    ),
    # Divergence from a baseline: P is the baseline's next-token distribution, Q the model's
    "nll_baseline": Column("nats", "−ln p(y | context): the baseline's nll of the same token", (_CT, _DV, _DT, _SB)),
    "kl": Column(
        "nats",
        "KL(P ‖ Q) = Σ_v p_v (ln p_v − ln q_v): the extra cost of coding the baseline's predictions "
        "with the model's code, ≥ 0, 0 exactly when they agree (llama.cpp's KLD)",
        (_DV, _DT, _SB),
    ),
    "kl_reverse": Column("nats", "KL(Q ‖ P): the same with the roles swapped (KL is not symmetric)", (_DV, _DT, _SB)),
    "delta_p": Column(
        "probability",
        "q_y − p_y: how much probability the true token gained (> 0) or lost, in [−1, 1]",
        (_DV, _DT, _SB),
    ),
    "same_top1": Column(
        "bool (per token); share (divergence.csv)",
        "both models' most likely tokens are the same; "
        'in divergence.csv the share of tokens where they are (llama.cpp\'s "Same top p")',
        (_DV, _DT, _DS, _SB, _DG),
    ),
    "acceptance": Column(
        "probability",
        "Σ_v min(p_v, q_v) = 1 − TV(P, Q): the probability that speculative decoding accepts a token drawn from "
        "the model (the draft) against the baseline (the target); 1 exactly when they agree",
        (_DV,),
    ),
    "topk_overlap": Column(
        "share",
        "|top-k(P) ∩ top-k(Q)| / k, k = compare.overlap_k (default 10): the share of the baseline's k likeliest "
        "tokens the model also ranks among its k likeliest; a tie at the k-th place goes to the lower token id",
        (_DV,),
    ),
    "kl_topk": Column(
        "nats",
        "KL(P_S ‖ Q_S) over S = the baseline's top-K tokens (K = compare.kl_top_k, default 100), P and Q each "
        "renormalised over S (brevitas' top-K-normalised KL); blind to mass moved outside S",
        (_DV,),
    ),
    "weight_bytes": Column(
        "bytes",
        "the model's weights in the form evaluated: a GGUF file's tensors (gguf_file; its metadata left out, as "
        "llama.cpp counts), the quantized state in memory for a model quantized as it loaded (quantization_config), "
        "else the weight files on disk (*.safetensors, else *.bin/*.pt); a hub model loaded natively quantized: "
        "its state in memory; NaN otherwise. run.json says which (weight_bytes_from)",
        (_DS,),
    ),
    "n_parameters": Column(
        "parameters",
        "the architecture's parameters, tied ones counted once; a packed quantized load counts its logical "
        "weights (the model built on the meta device), not its packed elements",
        (_DS,),
    ),
    "bits_per_weight": Column(
        "bits",
        "8 × weight_bytes / n_parameters, over every weight (embeddings and norms too), as llama.cpp's BPW: "
        "the x axis of divergence_bpw.png",
        (_DS,),
    ),
    "quant_method": Column(
        "—",
        "the quantization's quant_method (gguf, torchao, bitsandbytes, gptq, awq, compressed-tensors, …); "
        "empty for a float model. Its whole config is in run.json (protocol.models.<name>.quantization)",
        (_DS,),
    ),
    "baseline_tail_mass_mean": Column(
        "probability",
        "under compare.baseline_cache: topk, the baseline's mean probability mass outside the kl_top_k ids it "
        "kept (Σ p_T / n_tokens): the bounds are tight when it is small; NaN with the baseline beside the model",
        (_DS,),
    ),
    "load_path": Column(
        "—",
        "dequantized (every weight a plain float tensor after loading) or native (the weights stay in the "
        "quantization's storage and its kernels run); empty for a float model",
        (_DS,),
    ),
    "acceptance_mean": Column("probability", "Σ acceptance / n_tokens: the mean acceptance rate", (_DS,)),
    "topk_overlap_mean": Column("share", "Σ topk_overlap / n_tokens", (_DS,)),
    "kl_topk_mean": Column("nats", "Σ kl_topk / n_tokens", (_DS,)),
    "kl_mean": Column("nats", "Σ kl / n_tokens, pooled over all tokens", (_DS, _DG)),
    "kl_median": Column("nats", "the median kl over every token", (_DS,)),
    "kl_p{q}": Column("nats", "kl: " + _Q, (_DS,)),
    "kl_max": Column("nats", "the largest kl", (_DS,)),
    "kl_reverse_mean": Column("nats", "Σ kl_reverse / n_tokens", (_DS, _DG)),
    "delta_p_mean": Column("probability", "Σ delta_p / n_tokens", (_DS, _DG)),
    "delta_p_rms": Column("probability", '√(Σ delta_p² / n_tokens): llama.cpp\'s "RMS Δp"', (_DS,)),
    "delta_p_min": Column("probability", "the smallest delta_p", (_DS,)),
    "delta_p_median": Column("probability", "the median delta_p", (_DS,)),
    "delta_p_p{q}": Column("probability", "delta_p: " + _Q, (_DS,)),
    "delta_p_max": Column("probability", "the largest delta_p", (_DS,)),
    "ln_ppl_ratio": Column(
        "nats", "ln PPL(model) − ln PPL(baseline) on the same tokens = the mean of nll − nll_baseline", (_DS, _DG)
    ),
    "ppl_ratio": Column(
        "—", "exp(ln_ppl_ratio) = PPL(model) / PPL(baseline); > 1: the model is more perplexed", (_DS, _DG)
    ),
    "nll_baseline_mean": Column("nats", "the baseline's Σ nll / n_tokens over the same tokens", (_DS,)),
    "{mean}_ci_low": Column(
        "the mean's unit",
        "lower end of the mean's paired 95% document-bootstrap percentile "
        "interval (for kl_mean, kl_reverse_mean, same_top1, delta_p_mean, delta_p_rms, "
        "ln_ppl_ratio, ppl_ratio, acceptance_mean, topk_overlap_mean, kl_topk_mean)",
        (_DS, _DG),
    ),
    "{mean}_ci_high": Column("the mean's unit", "upper end of that interval", (_DS, _DG)),
    "{tested}_p_value": Column(
        "probability",
        "two-sided paired bootstrap p-value that the mean is 0 (for delta_p_mean and ln_ppl_ratio)",
        (_DS,),
    ),
    "surprisal_bits_baseline": Column("bits", "the baseline's surprisal of the token, nll_baseline / ln 2", (_SB,)),
    "delta_bits": Column("bits", "surprisal_bits − surprisal_bits_baseline (blue < 0 < red in the view)", (_SB,)),
    "prob_baseline": Column("probability", "exp(−nll_baseline)", (_SB,)),
    # Minimal pairs and chat turns
    "id": Column("—", "the pair's id: the jsonl's `id`, else its index", (_PR,)),
    "logprob_good": Column(
        "nats", "the total log-probability of the good sentence after the BOS (given the context, if any)", (_PR,)
    ),
    "logprob_bad": Column("nats", "the same for the bad sentence", (_PR,)),
    "good_wins": Column("bool", "delta > 0 (a tie is not a win); its mean over pairs is the accuracy", (_PR,)),
    "n_tokens_good": Column("tokens", "scored tokens of the good sentence", (_PR,)),
    "n_tokens_bad": Column("tokens", "scored tokens of the bad sentence", (_PR,)),
    "sentence_good": Column("—", "the sentence that should win (BLiMP's field name)", (_PR,)),
    "sentence_bad": Column("—", "the sentence that should lose", (_PR,)),
    "turn": Column(
        "—",
        "the index, in the conversation's messages, of the assistant turn (the token's, in score_chats)",
        (_SC, _TT),
    ),
    "end_of_turn": Column(
        "bool", "the token is its turn's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...)", (_SC,)
    ),
    "n_tokens_content": Column("tokens", "the turn's scored tokens without its end-of-turn token", (_TT,)),
    "nll_sum_content": Column("nats", "Σ nll of the turn without its end-of-turn token", (_TT,)),
}


# words.parquet holds the columns of surprisal_table(words=True) (not those of contexts or top_k), per model.
_WORD_FILE_COLUMNS = set(WORDS.names) | set(OPTIONAL["words.parquet"])
COLUMNS.update(
    {k: c._replace(tables=(*c.tables, "words.parquet")) for k, c in COLUMNS.items() if k in _WORD_FILE_COLUMNS}
)


def _family_pattern(key: str) -> re.Pattern | None:
    if "{" not in key:
        return None
    match = re.match(r"(.*)\{(\w+)\}(.*)", key)
    assert match is not None, key  # a family key holds one {name}
    head, name, tail = match.groups()
    return re.compile(f"{re.escape(head)}(?:{FAMILIES[name]}){re.escape(tail)}")


_PATTERNS = {key: pattern for key in COLUMNS if (pattern := _family_pattern(key)) is not None}


def glossary_key(column: str) -> str | None:
    """The `COLUMNS` key that defines ``column``: its own name, or the family it belongs to
    (``ce_eps0.05`` -> ``ce_eps{eps}``); None when the glossary lacks it."""
    if column in COLUMNS:
        return column
    return next((key for key, pattern in _PATTERNS.items() if pattern.fullmatch(column)), None)


def string_ids(doc_ids) -> list[str]:
    """Document ids as the tables store them: strings."""
    return [str(d) for d in doc_ids]


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """``frame`` as an Arrow table of exactly ``schema``: its columns in that order, cast
    without loss (a column that cannot be cast safely is a bug, and raises)."""
    missing = [f.name for f in schema if f.name not in frame.columns]
    if missing:
        raise ValueError(f"table is missing columns {missing} of its schema")
    table = pa.Table.from_pandas(frame[schema.names], preserve_index=False)
    return table.cast(schema, safe=True).replace_schema_metadata(None)


def table_name(path) -> str:
    """The table a file holds, or a token table's dataset folder: tokens/ holds tokens.parquet."""
    path = Path(path)
    return path.name if path.suffix else f"{path.name}.parquet"


def schema_for(path: Path, columns: list[str] | None = None) -> pa.Schema | None:
    """The schema of a table file (or dataset folder); with ``columns``, extended by the
    optional ones among them."""
    name = table_name(path)
    schema = SCHEMAS.get(name)
    if schema is None or not columns:
        return schema
    optional = OPTIONAL.get(name, {})
    for column in columns:
        if column in schema.names:
            continue
        kind = optional.get(column) or next(
            (t for p, t in optional.items() if p.endswith("_") and column.startswith(p)), None
        )
        if kind is not None:
            schema = schema.append(pa.field(column, kind))
    return schema


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A table lmeval wrote, read back under its schema (``doc_id`` stays a string); a token
    table's dataset folder (tokens/) is read as the one table its files make."""
    table = pq.read_table(path, columns=columns)
    schema = schema_for(path, table.column_names)
    if schema is not None:
        table = table.cast(pa.schema([schema.field(n) for n in table.column_names]))
    return table.to_pandas()
