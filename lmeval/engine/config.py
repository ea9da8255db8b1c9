"""Load and validate a YAML run config into frozen dataclasses; report every problem at once.

The YAML key, the dataclass field, the override path and the column name are one word.
Paths written in the YAML resolve against the config file's folder; paths given as
command-line overrides resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob as globlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..core.bootstrap import MIN_DOCUMENTS
from ..core.calibration import validate_calibration_options
from ..errors import ConfigError
from ..model.spec import DEVICE_MAPS, ModelSpec, looks_like_hub_id
from .presets import apply_preset

# A `models:` entry is the model record itself: one dataclass for the config, the loader and
# the resume identity.
ModelConfig = ModelSpec


@dataclass(frozen=True)
class DataConfig:
    path: str
    name: str | None = None  # a hub dataset's configuration
    split: str = "train"
    text_field: str = "text"
    id_field: str | None = None
    max_documents: int | None = None
    # read with `datasets` streaming, parts planned as the stream is read (lmeval.engine.stream)
    streaming: bool = False
    sample: dict | None = None  # {n, seed}: n documents by bottom-n hashing of (seed, doc_id); streams only
    sample_by: Literal["document", "paragraph", "line"] = "document"  # for .txt files
    detokenizer: Literal["wikitext"] | None = None  # a named rewrite of each text before tokenizing
    count_on: Literal["scored", "source"] = "scored"  # the text whose bytes and words normalise
    context_field: str | None = (
        None  # score text_field GIVEN this column (it conditions, never scores; joined verbatim)
    )
    messages_field: str | None = None  # a column of [{role, content}]: score the assistant turns only
    group_by: str | tuple[str, ...] | None = None  # metadata column(s), top level first: per-group figures
    group_missing: Literal["error", "skip"] = "error"  # a document without a value at a level of group_by
    group_weights: Literal["documents"] | dict | None = None  # {level: {group: weight}}: the weighted macro

    def __post_init__(self):
        # One spelling of group_by downstream: a tuple of column names (a single name is a one-level tuple).
        if isinstance(self.group_by, str):
            object.__setattr__(self, "group_by", (self.group_by,))
        elif isinstance(self.group_by, list):
            object.__setattr__(self, "group_by", tuple(self.group_by))


@dataclass(frozen=True)
class ScoringConfig:
    max_length: int | None = None
    stride: int | None = None
    bos: int | str = "auto"
    batch_tokens: int = 16384
    documents: Literal["independent", "concatenated"] = "independent"
    separator: str = "\n\n"
    compile: bool | str = "auto"
    # rolling: lmeval's windows (every token once, max_length / stride); chunks: disjoint chunks of
    # max_length ids, the first chunk_context of each only conditioning, a remainder dropped
    # (GPTQ's and llama.cpp's perplexity; lmeval.core.windows.Chunks)
    windows: Literal["rolling", "chunks"] = "rolling"
    chunk_context: int | Literal["half"] = 1  # "half": max_length // 2 + 1 (llama.cpp)
    chunk_bos: bool = False  # replace each chunk's first id by the BOS prefix (llama.cpp)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/lmeval"
    per_token: bool = True
    part_chars: int = 262144  # characters of documents per result part (the unit of resume)
    # token tables as one file (tokens.parquet), or as a folder of one file per part (tokens/), which
    # every parquet reader takes as one table; auto: the folder above ~10^8 tokens and for streams
    tokens_layout: Literal["auto", "file", "dataset"] = "auto"
    # documents.parquet and summary.csv only (perplexity filtering, data selection): no calibration,
    # positions or token rows, and the cheapest reductions (no temperature grid)
    documents_only: bool = False
    # report.html at the end of the run: one self-contained page of every table (`lmeval report`)
    report: bool = True


@dataclass(frozen=True)
class CalibrationConfig:
    bins: int = 15
    binning: Literal["width", "mass"] = "width"
    label_smoothing: tuple[float, ...] = (0.0, 0.05, 0.1)
    temperatures: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15, 1.3)


@dataclass(frozen=True)
class CompareConfig:
    baseline: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    top_k: int = 20
    min_documents: int = MIN_DOCUMENTS  # fewer documents: no CI or p-value (NaN, with a note)
    divergence: bool = False  # per-token KL, Δp and top-1 agreement against the baseline (divergence.*)
    overlap_k: int = 10  # topk_overlap: |top-k(P) ∩ top-k(Q)| / k
    kl_top_k: int = 100  # kl_topk: KL over the baseline's top-K tokens, both renormalised
    # auto: every variant scored in one pass with the baseline (its forward once) when all the
    # models' weights fit in memory together, else pair by pair; pair: always pair by pair
    lockstep: Literal["auto", "pair"] = "auto"
    # topk: the baseline scored first, alone, keeping per token its kl_top_k likeliest ids and their
    # log-probabilities (and the tail's log-mass) in its parts; each model then scored alone against
    # that (kl, kl_reverse lower bounds, acceptance an upper bound); none: the baseline beside each model
    baseline_cache: Literal["none", "topk"] = "none"


@dataclass(frozen=True)
class AnalysisConfig:
    """What the per-token results say about the corpus (see lmeval.analyses.positions)."""

    positions: bool = True  # positions.csv / positions.png and icl_score in the summary
    position_bins: Literal["log", "linear"] = "log"
    bins_per_octave: int = 4  # log bins per doubling of the position
    bin_width: int = 64  # tokens per linear bin
    icl_context: tuple[int, ...] = (50, 500)  # icl_score: NLL near the 2nd context length minus near the 1st
    bootstrap: int = 1000  # document resamples for the intervals (0: none)
    seed: int = 0
    membership: bool = False  # mink_prob_{k}, mink_pp_{k}, zlib_ratio, extractable_suffix per document
    mink_k: tuple[float, ...] = (10, 20)  # percent of a document's tokens for Min-K% and Min-K%++
    reference: str | None = None  # a model of the run: ref_ratio of every model against it
    words: bool = False  # words.parquet: corrected word surprisal, one row per word (lmeval.analyses.words)
    word_boundary: Literal["whitespace", "marker"] = "whitespace"  # the word-start set B of the correction
    text_end: Literal["eos", "word"] = "eos"  # whether a text may end after any word (E = {EOS})
    covariates: tuple[str, ...] = ()  # any of length, frequency, unigram: length_chars, frequency_zipf, unigram_logfreq
    language: str = "en"  # wordfreq's word list for the frequency covariate


@dataclass(frozen=True)
class Config:
    models: tuple[ModelSpec, ...]
    data: DataConfig
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    preset: str | None = None  # a protocol preset (lmeval.engine.presets), laid under the keys given
    source: str | None = None  # the YAML file this came from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CMP_DEFAULTS = {"overlap_k": 10, "kl_top_k": 100}

SECTIONS = {
    "data": DataConfig,
    "scoring": ScoringConfig,
    "output": OutputConfig,
    "calibration": CalibrationConfig,
    "compare": CompareConfig,
    "analysis": AnalysisConfig,
}
_REQUIRED = object()


# --------------------------------------------------------------------------------------
# Reading YAML and overrides
# --------------------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no Python tags) that also reads ``1e-5`` as a float: PyYAML follows
    YAML 1.1, where a float needs a dot (``1.0e-5``), so ``label_smoothing: [1e-5]`` would
    otherwise arrive as the string '1e-5'.

    It also refuses a key given twice in one mapping (two ``scoring:`` sections, or
    ``stride`` twice in one): plain PyYAML keeps the last one and silently drops the first.
    """

    def construct_mapping(self, node, deep=False):
        first_line: dict[object, int] = {}  # key -> the line it was first given on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if earlier != line:
                raise DuplicateKeyError(key, earlier, line)
        return super().construct_mapping(node, deep)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds one key twice; ``lines`` are both (1-based) line numbers."""

    def __init__(self, key, first: int, second: int):
        self.key, self.lines = key, (first, second)
        super().__init__(
            f"key {key!r} must appear once in its mapping (got it on line {first} and again on line {second}); "
            "YAML would silently keep only the second. Merge the two into one."
        )


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str):
    """Parse YAML safely (`_SafeLoader`)."""
    return yaml.load(text, Loader=_SafeLoader)


def read_yaml(path: Path) -> dict:
    """Parse a YAML file safely (no Python tags); its root must be a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found. Check the path (got {str(path)!r}).", source=str(path)) from None
    except IsADirectoryError:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        hint = f" It holds {', '.join(found)}." if found else ""
        raise ConfigError(
            f"the config must be a YAML file (got a folder).{hint} Pass the file itself.", source=str(path)
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"must be UTF-8 text ({exc.reason} at byte {exc.start}).", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the config ({exc.strerror}). Check the path and its permissions.", source=str(path)
        ) from None
    try:
        raw = safe_load(text)
    except DuplicateKeyError as exc:
        raise ConfigError(str(exc), source=str(path)) from None
    except yaml.YAMLError as exc:
        for mark in (getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)):
            if mark is not None:  # PyYAML names a parsed string "<unicode string>": name the file
                mark.name = str(path)
        raise ConfigError(f"malformed YAML: {exc}", source=str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"the YAML root must be a mapping of sections (models, data, ...) (got {type(raw).__name__}).",
            source=str(path),
        )
    return raw


def apply_overrides(raw: dict, overrides: list[str], cwd: Path) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML); the command line wins.

    ``models.0.path=...`` indexes into a list. Path values are resolved against ``cwd`` here.
    """
    problems = []
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: must look like section.key=value, e.g. scoring.stride=128.")
            continue
        try:
            value = safe_load(value_text) if value_text else ""
        except yaml.YAMLError:
            value = value_text
        leaf = key.split(".")[-1]
        # An output dir is always a folder (never a hub id), so it always resolves here.
        if isinstance(value, str) and (leaf == "dir" or (leaf == "path" and _looks_local(value, cwd))):
            value = str((cwd / Path(value).expanduser()).resolve())
        try:
            _set_path(raw, key.split("."), value)
        except ValueError as exc:
            problems.append(f"override {item!r}: {exc}")
    if problems:
        raise ConfigError(problems, source="command line")
    return raw


def _set_path(node, parts: list[str], value) -> None:
    """Set ``value`` at a dotted path; a ValueError says which part of the path is wrong."""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                listed, rest = ".".join(parts[:i]), ".".join(parts[i + 1 :])
                raise ValueError(
                    f"{where}: the list index must be an integer from 0 to {len(node) - 1} ({listed} has "
                    f"{len(node)} {'entry' if len(node) == 1 else 'entries'}) (got {part!r}). "
                    f"Write e.g. {listed}.0{'.' + rest if rest else ''}=..."
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"{'.'.join(parts[:i])}: must be a section to set {where} in (got {node!r}).")


def _looks_local(value: str, base: Path) -> bool:
    """A path that points at the file system rather than a hub id."""
    return value.startswith((".", "/", "~")) or (base / value).exists() or any(c in value for c in "*?[")


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _type_problem(where: str, value, hint) -> str | None:
    """A message if ``value`` does not fit the annotation ``hint``, else None."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] / Union[X, Y], and X | Y
        if value is None and type(None) in args:
            return None
        messages = [_type_problem(where, value, a) for a in args if a is not type(None)]
        if any(m is None for m in messages):
            return None
        names = " or ".join(_type_name(a) for a in args)
        return f"{where}: must be {names} (got {value!r})."
    if origin is Literal:
        if value in args:
            return None
        return f"{where}: must be one of {', '.join(map(str, args))} (got {value!r})."
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return f"{where}: must be a list of numbers (got {value!r})."
        for i, item in enumerate(value):
            message = _type_problem(f"{where}[{i}]", item, args[0])
            if message:
                return message
        return None
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    return None if ok else f"{where}: must be {_type_name(hint)} (got {value!r})."


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(
            typing.get_args(hint)[0], "values"
        )
    if hint is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        hint, str(hint)
    )


def _build(cls, raw, where: str, problems: list[str]):
    """Construct dataclass ``cls`` from mapping ``raw``, collecting problems instead of raising."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping of keys (got {raw!r}).")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            guess = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else f" Known keys: {', '.join(fields)}."
            problems.append(f"{where}.{key}: unknown key.{hint}")
            continue
        message = _type_problem(f"{where}.{key}", value, hints[key])
        if message:
            problems.append(message)
            continue
        values[key] = tuple(value) if typing.get_origin(hints[key]) is tuple else value
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in raw:
            problems.append(f"{where}.{name}: is required.")
    try:
        return cls(**values)
    except TypeError:
        return None


def _check_values(config: Config, problems: list[str]) -> None:
    """Rules beyond types: ranges and cross-field consistency."""
    s = config.scoring
    if s.batch_tokens < 1:
        problems.append(f"scoring.batch_tokens: must be >= 1 (got {s.batch_tokens}). A typical budget is 16384.")
    if s.max_length is not None and s.max_length < 1:
        problems.append(f"scoring.max_length: must be >= 1 or null (got {s.max_length}).")
    if s.stride is not None and (s.stride < 1 or (s.max_length is not None and s.stride > s.max_length)):
        problems.append(f"scoring.stride: must be in [1, max_length] (got {s.stride}).")
    if isinstance(s.bos, str) and s.bos not in ("auto", "eos", "none", "tokenizer"):
        problems.append(f"scoring.bos: must be auto, eos, none, tokenizer or a token id (got {s.bos!r}).")
    _check_chunks(s, problems)
    if isinstance(s.bos, int) and s.bos < 0:
        problems.append(f"scoring.bos: a token id must be >= 0 (got {s.bos}).")
    if isinstance(s.compile, str) and s.compile != "auto":
        problems.append(f"scoring.compile: must be auto, true or false (got {s.compile!r}).")
    if config.output.part_chars < 1:
        problems.append(f"output.part_chars: must be >= 1 (got {config.output.part_chars}).")
    if config.data.count_on == "source" and s.bos == "none":
        problems.append(
            "data.count_on: source counts every word of the source text, so every token must be scored; "
            "it needs scoring.bos auto or a token id (got none)."
        )
    d = config.data
    if d.context_field is not None and d.messages_field is not None:
        problems.append(
            "data.context_field: cannot be set together with data.messages_field (got both). "
            "A conversation's turns are already scored given what precedes them; drop one."
        )
    if (d.context_field or d.messages_field) and s.documents == "concatenated":
        problems.append(
            "scoring.documents: must be independent with data.context_field or data.messages_field "
            "(got concatenated). Each row is scored on its own given its context."
        )
    if config.data.max_documents is not None and config.data.max_documents < 1:
        problems.append(f"data.max_documents: must be >= 1 or null (got {config.data.max_documents}).")
    _check_groups(d, s, problems)
    _check_streaming(config, problems)
    c = config.calibration
    problems.extend(validate_calibration_options(c.bins, list(c.label_smoothing), list(c.temperatures)))
    cmp = config.compare
    if cmp.bootstrap < 0:
        problems.append(f"compare.bootstrap: must be >= 0 (got {cmp.bootstrap}).")
    if cmp.top_k < 0:
        problems.append(f"compare.top_k: must be >= 0 (got {cmp.top_k}).")
    for key in ("overlap_k", "kl_top_k"):
        if getattr(cmp, key) < 1:
            problems.append(
                f"compare.{key}: must be >= 1 (got {getattr(cmp, key)}). The default is {CMP_DEFAULTS[key]}."
            )
    _check_baseline_cache(config, problems)
    if cmp.min_documents < 1:
        problems.append(
            f"compare.min_documents: must be >= 1 (got {cmp.min_documents}). The default is {MIN_DOCUMENTS}."
        )
    _check_analysis(config.analysis, [m.name for m in config.models], problems)
    _check_documents_only(config, problems)
    _check_words_scoring(config, problems)
    for i, m in enumerate(config.models):
        _check_device_map(m, f"models[{i}]", problems)
        _check_quantization(m, f"models[{i}]", problems)
    names = [m.name for m in config.models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"models: names must be unique (got {', '.join(duplicates)} twice). Set `name:` on each.")
    if cmp.baseline is not None and cmp.baseline not in names:
        problems.append(f"compare.baseline: must name one of the models ({', '.join(names)}) (got {cmp.baseline!r}).")
    if cmp.divergence and len(names) < 2:
        problems.append(
            f"compare.divergence: needs at least two models, a baseline and one to compare (got {len(names)}). "
            "Add the base checkpoint to `models:` and name it in `compare.baseline`."
        )


def _check_streaming(config: Config, problems: list[str]) -> None:
    """data.streaming and data.sample: what a stream read once per pass can serve."""
    d = config.data
    if d.sample is not None:
        n, seed = d.sample.get("n"), d.sample.get("seed", 0)
        extra = sorted(set(d.sample) - {"n", "seed"})
        if extra or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(
                f"data.sample: must be {{n: N, seed: S}} with an integer n >= 1 (got {d.sample!r}). "
                "E.g. data.sample: {n: 10000, seed: 0}."
            )
        elif not isinstance(seed, int) or isinstance(seed, bool):
            problems.append(
                f"data.sample.seed: must be an integer (got {seed!r}). E.g. data.sample: {{n: {n}, seed: 0}}."
            )
        if not d.streaming:
            problems.append(
                "data.sample: needs data.streaming: true (got false); the sample is drawn as the corpus streams. "
                "Set data.streaming: true (a local corpus streams too)."
            )
    if not d.streaming:
        return
    refused = {
        "data.messages_field": d.messages_field is not None,
        "data.group_by": bool(d.group_by),
        "compare.divergence": config.compare.divergence,
        "analysis.words": config.analysis.words,
        "scoring.documents: concatenated": config.scoring.documents == "concatenated",
    }
    for key in (k for k, on in refused.items() if on):
        problems.append(
            f"data.streaming: cannot be combined with {key} (got both). A streamed corpus is read once per pass "
            f"and scored a block of parts at a time; drop {key.split(':')[0]}, or drop data.streaming to load the corpus whole."
        )


def _check_documents_only(config: Config, problems: list[str]) -> None:
    """output.documents_only writes the documents table and summary only: the analyses that need
    per-token columns beyond the nll are refused by name, not silently dropped."""
    if not config.output.documents_only:
        return
    asked = {
        "compare.divergence": config.compare.divergence,
        "analysis.words": config.analysis.words,
        "analysis.membership": config.analysis.membership,
    }
    for key in (k for k, on in asked.items() if on):
        problems.append(
            f"{key}: must be false with output.documents_only (got true). A documents-only run keeps per-document "
            f"nll sums only; drop {key}, or drop output.documents_only (--documents-only) for a full run."
        )


def _check_baseline_cache(config: Config, problems: list[str]) -> None:
    """compare.baseline_cache: topk keeps the baseline's top-K (K = kl_top_k) for the divergence
    pass of documents or a stream; top-k overlap must fit in what is kept."""
    cmp, d = config.compare, config.data
    if cmp.baseline_cache != "topk":
        return
    if not cmp.divergence:
        problems.append(
            "compare.baseline_cache: topk keeps the baseline for the divergence pass, so it needs "
            "compare.divergence: true (got false). Set it, or drop compare.baseline_cache."
        )
    if cmp.overlap_k > cmp.kl_top_k:
        problems.append(
            f"compare.overlap_k: must be <= compare.kl_top_k under compare.baseline_cache: topk (got {cmp.overlap_k} > "
            f"{cmp.kl_top_k}): the baseline's top-k comes from the {cmp.kl_top_k} ids it keeps. Raise kl_top_k."
        )
    if d.context_field is not None or d.messages_field is not None:
        problems.append(
            "compare.baseline_cache: topk scores documents and streams only (got data.context_field or "
            "data.messages_field). Use compare.baseline_cache: none."
        )


def _check_chunks(s: ScoringConfig, problems: list[str]) -> None:
    if s.windows != "chunks":
        for key, default in (("chunk_context", 1), ("chunk_bos", False)):
            if getattr(s, key) != default:
                problems.append(f"scoring.{key}: applies to scoring.windows: chunks only (got windows: {s.windows}).")
        return
    if s.stride is not None:
        problems.append(
            f"scoring.stride: chunks are disjoint, so stride must be null under scoring.windows: chunks (got {s.stride})."
        )
    context = s.chunk_context
    if (
        isinstance(context, int)
        and not isinstance(context, bool)
        and (context < 1 or (s.max_length is not None and context >= s.max_length))
    ):
        problems.append(f"scoring.chunk_context: must be in [1, max_length - 1] or half (got {s.chunk_context}).")
    if s.chunk_bos and s.bos == "none":
        problems.append("scoring.chunk_bos: needs a BOS to put first in each chunk (got scoring.bos: none).")


def _check_groups(d: DataConfig, s: ScoringConfig, problems: list[str]) -> None:
    """data.group_by names distinct columns; group_weights weighs groups of those levels."""
    levels = d.group_by or ()
    if d.group_by is not None and (not levels or any(not isinstance(v, str) or not v.strip() for v in levels)):
        problems.append(
            f"data.group_by: must be a column name or a list of them, top level first (got {d.group_by!r})."
        )
    elif len(set(levels)) != len(levels):
        problems.append(f"data.group_by: each column must appear once (got {list(levels)}).")
    if levels and s.documents == "concatenated":
        problems.append(
            "scoring.documents: must be independent with data.group_by (got concatenated): a group's "
            "figures pool whole documents, and a stream's separators belong to no group."
        )
    if levels and d.messages_field is not None:
        problems.append(
            "data.group_by: cannot be used with data.messages_field (got both). Group plain texts, or "
            "score each group's conversations in a run of its own."
        )
    weights = d.group_weights
    if weights is not None and not levels:
        problems.append("data.group_weights: needs data.group_by (got group_weights without groups).")
    elif isinstance(weights, dict):
        for level, table in weights.items():
            if level not in levels:
                problems.append(
                    f"data.group_weights.{level}: must name a level of data.group_by ({', '.join(levels)}) "
                    f"(got {level!r})."
                )
            elif not isinstance(table, dict) or not table:
                problems.append(
                    f"data.group_weights.{level}: must map each group to a weight, e.g. {{wiki: 2, code: 1}} "
                    f"(got {table!r})."
                )
            else:
                bad = {
                    g: w
                    for g, w in table.items()
                    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
                }
                if bad:
                    problems.append(f"data.group_weights.{level}: weights must be numbers >= 0 (got {bad}).")


def _check_analysis(a: AnalysisConfig, names: list[str], problems: list[str]) -> None:
    for key in ("bins_per_octave", "bin_width"):
        if getattr(a, key) < 1:
            problems.append(f"analysis.{key}: must be >= 1 (got {getattr(a, key)}).")
    icl = a.icl_context
    if len(icl) != 2 or not 1 <= icl[0] < icl[1]:
        problems.append(
            f"analysis.icl_context: must be two context lengths [early, late] with 1 <= early < late "
            f"(got {list(icl)}). Olsson et al. use [50, 500]."
        )
    if a.bootstrap < 0:
        problems.append(f"analysis.bootstrap: must be >= 0 (got {a.bootstrap}).")
    bad = [k for k in a.mink_k if not 0 < k <= 100]
    if bad or not a.mink_k or len(set(a.mink_k)) != len(a.mink_k):
        problems.append(
            f"analysis.mink_k: must be distinct percentages in (0, 100] (got {list(a.mink_k)}). "
            "The papers use [10, 20]."
        )
    if a.reference is not None and a.reference not in names:
        problems.append(f"analysis.reference: must name one of the models ({', '.join(names)}) (got {a.reference!r}).")
    _check_words(a, problems)


WORD_COVARIATES = ("length", "frequency", "unigram")  # lmeval.core.covariates.COVARIATES (a test keeps them equal)


def _check_words(a: AnalysisConfig, problems: list[str]) -> None:
    """analysis.words and its options; what needs the rest of the config is in `_check_words_scoring`."""
    unknown = [c for c in a.covariates if c not in WORD_COVARIATES]
    if unknown:
        problems.append(
            f"analysis.covariates: each must be one of {', '.join(WORD_COVARIATES)} (got {', '.join(map(repr, unknown))}). "
            "length adds length_chars, frequency adds frequency_zipf (wordfreq), unigram adds unigram_logfreq."
        )
    if not a.language:
        problems.append("analysis.language: must be a language code such as en (got an empty string).")
    changed = [k for k in ("word_boundary", "text_end", "covariates", "language") if getattr(a, k) != _WORD_DEFAULTS[k]]
    if changed and not a.words:
        problems.append(
            f"analysis.{changed[0]}: applies to the word table only (got it without analysis.words). "
            "Set analysis.words: true, or drop the key."
        )


_WORD_DEFAULTS = {"word_boundary": "whitespace", "text_end": "eos", "covariates": (), "language": "en"}


def _check_words_scoring(config: Config, problems: list[str]) -> None:
    """Word tables are made of plain documents scored in rolling windows: their words are the
    scored text's, and each document's END position is scored after its last token."""
    if not config.analysis.words:
        return
    d, s = config.data, config.scoring
    refusals = [
        (s.documents != "independent", f"scoring.documents: {s.documents}", "scoring.documents: independent"),
        (s.windows != "rolling", f"scoring.windows: {s.windows}", "scoring.windows: rolling"),
        (d.context_field is not None, "data.context_field", "lmeval.surprisal_table(texts, contexts=...)"),
        (d.messages_field is not None, "data.messages_field", "a run without data.messages_field"),
        (d.count_on == "source" and d.detokenizer is not None, "data.count_on: source", "data.count_on: scored"),
        (
            config.compare.divergence
            and len(config.models) >= 3
            and getattr(config.compare, "lockstep", "pair") != "pair",
            "compare.divergence in lockstep",
            "compare.lockstep: pair",
        ),
    ]
    for refused, got, fix in refusals:
        if refused:
            problems.append(
                f"analysis.words: needs plain documents scored independently in rolling windows (got {got}). "
                f"Use {fix}, or drop analysis.words."
            )


def _check_device_map(model: ModelSpec, where: str, problems: list[str]) -> None:
    if model.device_map is not None and model.device_map not in DEVICE_MAPS:
        problems.append(
            f"{where}.device_map: must be one of {', '.join(DEVICE_MAPS)} or null (got {model.device_map!r})."
        )
    if model.device_map is not None and model.device != "auto":
        problems.append(
            f"{where}.device: must be auto when device_map is set (got {model.device!r}). "
            "device_map places the layers itself; use max_memory to steer it."
        )
    if model.max_memory is not None and model.device_map is None:
        problems.append(f"{where}.max_memory: needs device_map (got device_map null). Set device_map: auto.")
    for key, value in (model.max_memory or {}).items():
        if not ((isinstance(key, int) and key >= 0) or key in ("cpu", "disk", "mps")):
            problems.append(f"{where}.max_memory: keys must be GPU indices, cpu or disk (got {key!r}).")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(
                f"{where}.max_memory.{key}: must be a size such as 20GiB or a number of bytes (got {value!r})."
            )


def _check_quantization(model: ModelSpec, where: str, problems: list[str]) -> None:
    """gguf_file names a .gguf file; quantization_config is a transformers quantization config
    (a mapping with its quant_method); a GGUF is already quantized, so not both."""
    if model.gguf_file is not None and not (model.gguf_file.endswith(".gguf") and model.gguf_file.strip()):
        problems.append(
            f"{where}.gguf_file: must be the name of a .gguf file in the model's folder or repository "
            f"(got {model.gguf_file!r}). E.g. gguf_file: model-Q4_K_M.gguf."
        )
    q = model.quantization_config
    if q is not None and not (isinstance(q.get("quant_method"), str) and q["quant_method"]):
        problems.append(
            f"{where}.quantization_config: must name its quant_method, as config.json spells it (got {q!r}). "
            "E.g. {quant_method: bitsandbytes, load_in_4bit: true}."
        )
    if q is not None and model.gguf_file is not None:
        problems.append(
            f"{where}.quantization_config: cannot be set together with gguf_file (got both): a GGUF file is "
            "already quantized, and transformers dequantizes it as it loads. Drop one."
        )


def step_number(path: str) -> tuple:
    """Sort key that orders checkpoint folders by the last number in their name (step-2 < step-10)."""
    numbers = re.findall(r"\d+", Path(path).name)
    return (int(numbers[-1]) if numbers else -1, path)


def _expand_models(raw_models, base: Path, problems: list[str]) -> list[dict]:
    """Normalise ``models``: a list of mappings, where ``{glob: pattern}`` expands to checkpoints."""
    if isinstance(raw_models, (str, dict)):
        raw_models = [raw_models]
    if not isinstance(raw_models, list) or not raw_models:
        problems.append(f"models: must be a non-empty list of {{path: ...}} entries (got {raw_models!r}).")
        return []
    out: list[dict] = []
    for i, entry in enumerate(raw_models):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            problems.append(f"models[{i}]: must be a mapping with a `path` (got {entry!r}).")
            continue
        entry = dict(entry)
        if entry.get("name") is None:  # `name: null` is an absent name: the path's last part
            entry.pop("name", None)
        if "glob" in entry:
            pattern = str(entry.pop("glob"))
            full = pattern if Path(pattern).is_absolute() else str(base / pattern)
            matches = sorted((p for p in globlib.glob(full) if Path(p).is_dir()), key=step_number)
            if not matches:
                problems.append(f"models[{i}].glob: matched no folders (got {pattern!r}). Check the pattern.")
            out.extend({**entry, "path": m, "name": Path(m).name} for m in matches)
            continue
        if isinstance(entry.get("path"), str) and _looks_local(entry["path"], base):
            entry["path"] = str((base / Path(entry["path"]).expanduser()).resolve())
        out.append(entry)
    return out


def _check_model_paths(models: list[ModelSpec], problems: list[str]) -> None:
    for i, m in enumerate(models):
        p = Path(m.path).expanduser()
        if p.is_absolute() and not p.exists():
            problems.append(
                f"models[{i}].path: {m.path} does not exist. Fix the path, or give a hub id such as 'gpt2'."
            )
        elif not p.exists() and not looks_like_hub_id(m.path):  # 'a/b/c', 'ckpt.bin': a mistyped path, not an id
            problems.append(
                f"models[{i}].path: {m.path!r} must be an existing folder or a hub id such as 'gpt2' or 'org/name' "
                "(got a relative path that does not exist). Fix the path; in the YAML it starts at the config's folder."
            )


def build_config(raw: dict, base: Path, source: str | None = None) -> Config:
    """Validate a raw mapping into a `Config`; raise one `ConfigError` listing every problem."""
    problems: list[str] = []
    raw = apply_preset(raw, problems)
    known = {"models", "preset", *SECTIONS}
    for key in raw:
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"{key}: unknown section." + (f" Did you mean {guess[0]!r}?" if guess else ""))
    if "models" not in raw:
        problems.append("models: is required: list at least one {path: ...}.")
    models = []
    for i, entry in enumerate(_expand_models(raw.get("models", []), base, problems) if "models" in raw else []):
        model = _build(ModelSpec, entry, f"models[{i}]", problems)
        if model is not None:
            models.append(model)  # its name filled from the path where absent (ModelSpec)
    _check_model_paths(models, problems)
    data_raw = raw.get("data")
    if isinstance(data_raw, dict) and isinstance(data_raw.get("path"), str) and _looks_local(data_raw["path"], base):
        data_raw = {**data_raw, "path": str((base / data_raw["path"]).resolve())}
    if data_raw is None:
        problems.append("data: is required: give at least `data.path`.")
    sections = {
        name: _build(cls, data_raw if name == "data" else raw.get(name), name, problems)
        for name, cls in SECTIONS.items()
    }
    output = sections["output"]
    if output is not None and not Path(output.dir).is_absolute():
        sections["output"] = dataclasses.replace(output, dir=str((base / output.dir).resolve()))
    config = None
    if models and all(v is not None for v in sections.values()):
        preset = raw.get("preset") if isinstance(raw.get("preset"), str) else None
        config = Config(models=tuple(models), source=source, preset=preset, **sections)
        _check_values(config, problems)
    if problems:
        raise ConfigError(problems, source=source)
    assert config is not None  # each way to leave it None recorded a problem
    return config


def load_config(path, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate, return a frozen `Config`."""
    path = Path(path)
    raw = read_yaml(path)
    raw = apply_overrides(raw, list(overrides or []), Path.cwd())
    return build_config(raw, path.resolve().parent, source=str(path))


# --------------------------------------------------------------------------------------
# Configs from command-line options (`lmeval run --model M --data D`), and back to YAML
# --------------------------------------------------------------------------------------


def raw_config_from_options(
    models=(),
    data=None,
    *,
    data_name=None,
    split=None,
    text_field=None,
    max_length=None,
    stride=None,
    out=None,
    preset=None,
    documents_only=False,
    cwd: Path | None = None,
) -> dict:
    """The raw config mapping the command-line options stand for; None options are left out.

    The mapping is what a YAML file would hold, so it goes through the same `build_config`.
    Local paths are resolved against ``cwd`` (the current folder), as overrides are; hub
    ids stay as they are.
    """
    cwd = Path.cwd() if cwd is None else cwd

    def located(value: str) -> str:
        return str((cwd / Path(value).expanduser()).resolve()) if _looks_local(value, cwd) else value

    output: dict = {"dir": str((cwd / Path(out).expanduser()).resolve())} if out else {}
    if documents_only:
        output["documents_only"] = True
    data_keys = {"path": located(data) if data else None, "name": data_name, "split": split, "text_field": text_field}
    sections = {
        "models": [{"path": located(m)} for m in models] or None,
        "data": {k: v for k, v in data_keys.items() if v is not None},
        "scoring": {k: v for k, v in {"max_length": max_length, "stride": stride}.items() if v is not None},
        "output": output,
    }
    if preset is not None:
        sections["preset"] = preset
    return {k: v for k, v in sections.items() if v}


def merge_options(raw: dict, options: dict) -> dict:
    """``raw`` (a YAML file's mapping) with command-line options laid over it: ``models``
    replaced, other sections updated key by key. The command line wins."""
    merged = dict(raw)
    for section, value in options.items():
        if section == "models" or not isinstance(merged.get(section), dict):
            merged[section] = value
        else:
            merged[section] = {**merged[section], **value}
    return merged


def config_from_options(path, options: dict, overrides: list[str] | None = None) -> Config:
    """`lmeval run`'s config: the YAML file ``path`` (or nothing, when None), command-line
    ``options`` (a `raw_config_from_options` mapping) over it, then ``key=value`` overrides."""
    if path is None:
        raw, base, source = {}, Path.cwd(), "command line"
    else:
        path = Path(path)
        raw, base, source = read_yaml(path), path.resolve().parent, str(path)
    raw = apply_overrides(merge_options(raw, options), list(overrides or []), Path.cwd())
    return build_config(raw, base, source=source)


def config_to_yaml(config: Config) -> str:
    """``config`` as a YAML file that `load_config` reads back into an equal `Config`:
    every key written out, defaults included, paths absolute."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    raw = plain(config.to_dict())
    raw.pop("source", None)
    if raw.get("preset") is None:  # every key is written out; the preset's name only when one was used
        raw.pop("preset", None)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120)
