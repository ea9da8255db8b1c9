"""Score windows with a model and its baseline at once: per-token divergence, one lean pass.

The loop is the single-model scorer's (`scorer.score_windows` with ``baseline=``): both
models see the same padded batch, packed under the stricter of their load-time batchings;
their bodies run once per batch, and their output heads are applied to the SAME chunk of
scored positions, so the two (n, V) chunks of logits meet in `divergence_statistics` and
are dropped. This module keeps what is particular to a pair: the vocabulary check, and the
call its callers have always made.
"""

from __future__ import annotations

import numpy as np

from ..core.windows import Window
from .loading import LoadedModel
from .scorer import ScoreOptions, check_pair, score_windows  # noqa: F401  (check_pair: re-exported)


def score_pair_windows(
    lm: LoadedModel,
    baseline: LoadedModel,
    windows: list[Window],
    batch_tokens: int,
    progress=None,
    doc_names=None,
    chunk_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Score every window with both models; per-token columns in window order.

    Columns: ``doc_index, position, token_id, context_len``, `PAIR_FIELDS` and the model's
    own `TokenStats` fields (zero rows when nothing is scored). ``progress(tokens_in_batch,
    tokens_in_total)`` is called after each batch; ``doc_names[w.doc_id]`` names a window's
    document in errors. Both models are scored in eval mode and left in the modes they had.
    """
    options = ScoreOptions(batch_tokens=batch_tokens, chunk_bytes=chunk_bytes)
    return score_windows(lm, windows, options, progress, doc_names, baseline=baseline)
