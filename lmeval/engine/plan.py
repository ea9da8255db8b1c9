"""The plan of a run: which documents each result part holds, from the corpus alone.

A part is the unit of resume and of data-parallel work, so its contents must not depend on
the batch size, the number of processes or the model. Documents are grouped in corpus order
until a group holds ``part_chars`` characters. A document longer than that (or the joined
stream of concatenated scoring) is cut into ``k = ceil(chars / part_chars)`` pieces, each a
part of its own: piece ``j`` holds the windows whose first scored token starts at a character
offset ``c`` with ``c * k // chars == j``. Pieces are whole windows, so scoring them one by one
gives exactly the rows of scoring the document whole, and a killed run keeps every finished
piece of a 20 MB document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..producers.text import SEPARATOR_ID, require_whole  # noqa: F401  (require_whole: re-exported)
from .data import Corpus
from .parts import part_key


@dataclass(frozen=True)
class PartPlan:
    """One part: corpus indices ``docs``, and which piece of them (``piece`` of ``n_pieces``)."""

    docs: tuple[int, ...]
    piece: int = 0
    n_pieces: int = 1
    n_chars: int = 0  # characters of the documents (or stream) the pieces divide

    @property
    def weight(self) -> float:
        """Characters of work, for balancing parts across ranks."""
        return self.n_chars / self.n_pieces

    def owns(self, char_offset: int) -> bool:
        """Whether a window whose first scored token starts at ``char_offset`` is in this piece."""
        if self.n_pieces == 1:
            return True
        return min(char_offset * self.n_pieces // max(self.n_chars, 1), self.n_pieces - 1) == self.piece


def plan_parts(corpus: Corpus, documents_mode: str, separator: str, part_chars: int) -> list[PartPlan]:
    """Every part of a run, in corpus order; linear in the documents (a running sum per group)."""
    lengths = corpus.lengths.tolist()  # Python ints: fast to loop over, and JSON-safe in PartPlan.n_chars
    if documents_mode == "concatenated":
        n_chars = sum(lengths) + len(separator) * (len(lengths) - 1)
        return _pieces(tuple(range(len(lengths))), n_chars, part_chars)
    plans, start, total = [], 0, 0  # the open group is documents [start, i), of `total` characters
    for i, n_chars in enumerate(lengths):
        if n_chars > part_chars:  # a document of its own, in pieces
            plans.extend(_group(start, i, total))
            plans.extend(_pieces((i,), n_chars, part_chars))
            start, total = i + 1, 0
            continue
        total += n_chars
        if total >= part_chars:
            plans.extend(_group(start, i + 1, total))
            start, total = i + 1, 0
    return plans + _group(start, len(lengths), total)


def _group(start: int, stop: int, n_chars: int) -> list[PartPlan]:
    """The part of documents ``[start, stop)`` (none when that is empty)."""
    return [PartPlan(tuple(range(start, stop)), 0, 1, n_chars)] if stop > start else []


def _pieces(docs: tuple[int, ...], n_chars: int, part_chars: int) -> list[PartPlan]:
    k = max(1, math.ceil(n_chars / part_chars))
    return [PartPlan(docs, j, k, n_chars) for j in range(k)]


def part_doc_ids(corpus: Corpus, plan: PartPlan, documents_mode: str) -> list:
    """The user's ids of a part's documents (plus the separator's, for a stream)."""
    ids = [corpus.doc_ids[i] for i in plan.docs]  # ids only: no text is read
    return ids + [SEPARATOR_ID] if documents_mode == "concatenated" else ids


def plan_key(corpus: Corpus, plan: PartPlan, documents_mode: str) -> str:
    """The part's file name: a hash of its document ids, and of its piece when it is one."""
    ids = part_doc_ids(corpus, plan, documents_mode)
    return part_key(ids if plan.n_pieces == 1 else [*ids, f"piece {plan.piece} of {plan.n_pieces}"])
