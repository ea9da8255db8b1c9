"""The Arrow schemas of the tables `lmeval run` writes, defined once for the writers and readers.

``doc_id`` is always a string column: ids come from the user's ``id_field`` (any JSON
scalar), from row numbers, or are the ``<separator>`` of concatenated scoring, and one
column cannot mix them. Row numbers are therefore written "0", "1", ...
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TOKENS = pa.schema([
    ("model", pa.string()), ("doc_id", pa.string()), ("position", pa.int64()), ("token_id", pa.int64()),
    ("token", pa.string()), ("char_start", pa.int64()), ("char_end", pa.int64()), ("context_len", pa.int64()),
    ("nll", pa.float32()), ("surprisal_bits", pa.float32()), ("entropy", pa.float32()), ("max_prob", pa.float32()),
    ("is_top1", pa.bool_()), ("rank", pa.int64()), ("sum_q2", pa.float32()), ("mean_neg_logq", pa.float32()),
])  # fmt: skip
DOCUMENTS = pa.schema([
    ("model", pa.string()), ("doc_id", pa.string()), ("n_tokens", pa.int64()), ("n_bytes", pa.int64()),
    ("n_words", pa.int64()), ("nll_sum", pa.float64()), ("ppl", pa.float64()), ("bits_per_token", pa.float64()),
    ("bits_per_byte", pa.float64()),
])  # fmt: skip
DIVERGENCE = pa.schema([
    ("model", pa.string()), ("baseline", pa.string()), ("doc_id", pa.string()), ("position", pa.int64()),
    ("kl", pa.float32()), ("kl_reverse", pa.float32()), ("delta_p", pa.float32()), ("same_top1", pa.bool_()),
    ("nll", pa.float32()), ("nll_baseline", pa.float32()), ("token_id", pa.int64()), ("token", pa.string()),
    ("char_start", pa.int64()), ("char_end", pa.int64()), ("context_len", pa.int64()),
])  # fmt: skip
SCHEMAS = {"tokens.parquet": TOKENS, "documents.parquet": DOCUMENTS, "divergence.parquet": DIVERGENCE}
# Columns a table holds only when asked for (analysis.membership, analysis.reference); a
# trailing "_" names a family (mink_prob_10, mink_prob_20, ...).
OPTIONAL = {
    "documents.parquet": {
        "mink_prob_": pa.float64(), "mink_pp_": pa.float64(), "zlib_ratio": pa.float64(),
        "zlib_bytes": pa.int64(), "extractable_suffix": pa.int64(), "ref_ratio": pa.float64(),
    },
}  # fmt: skip


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


def schema_for(path: Path, columns: list[str] | None = None) -> pa.Schema | None:
    """The schema of a table file; with ``columns``, extended by the optional ones among them."""
    name = Path(path).name
    schema = SCHEMAS.get(name)
    if schema is None or not columns:
        return schema
    optional = OPTIONAL.get(name, {})
    for column in columns:
        if column in schema.names:
            continue
        kind = optional.get(column) or next((t for p, t in optional.items() if p.endswith("_") and column.startswith(p)), None)
        if kind is not None:
            schema = schema.append(pa.field(column, kind))
    return schema


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A table lmeval wrote, read back under its schema (``doc_id`` stays a string)."""
    table = pq.read_table(path, columns=columns)
    schema = schema_for(path, table.column_names)
    if schema is not None:
        table = table.cast(pa.schema([schema.field(n) for n in table.column_names]))
    return table.to_pandas()
