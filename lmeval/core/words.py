"""Word-start tokens and the probability mass a model puts on them. Pure math and strings.

Tokenizers whose tokens carry their LEADING space (byte-level BPE 'Ġthe', SentencePiece
'▁the') only reveal that a word has ended when the NEXT token starts with the space. So the
plain sum of a word's token log-probabilities includes the space that starts the word and
leaves out the event that the word ends here (Pimentel & Meister 2024; Oh & Schuler 2024).
With B the set of ids that begin a word and E = {EOS} (or the empty set), the word's
log-probability is

    log p(w | before) = sum_k log q(t_k | ...) + log q(B u E | after t_j) - log q(B u E | before t_i)

where ``q(S | ctx) = sum_{v in S} q(v | ctx)`` is the mass of a set of ids. B is every id
whose text begins with whitespace (``word_boundary="whitespace"``), or only those whose piece
begins with the word-start marker (``"marker"``, see `WORD_BOUNDARIES`). This module finds
B from the vocabulary and computes ``log q(S | ctx)`` for a few id sets at once, one chunk of
logits at a time (the scorer calls `log_mass` beside the per-token statistics).
"""

from __future__ import annotations

import re

import numpy as np
import torch

# Rows of the mask matrix the scorer reduces over: the word-start set B, the end-of-text set
# E (EOS, when it is not in B), and the complement of B (a text that starts without a space).
MASS_WORD_START, MASS_EOS, MASS_NOT_WORD_START = 0, 1, 2
TEXT_ENDS = ("eos", "word")
WORD_CORRECTIONS = ("bow", "none")
# Which ids make up B. "whitespace": every id whose text begins with whitespace (a space, a
# newline, a tab), as the ``\S+`` word runs split. "marker": only the ids whose piece begins
# with the word-start marker itself ('Ġ', '▁', or a literal space), the convention of
# Pimentel & Meister's `wordsprobability` and of minicons' ``bow_correction``: a newline
# token does not start a word there.
WORD_BOUNDARIES = ("whitespace", "marker")

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes byte b as a printable character (GPT-2's ``bytes_to_unicode``):
    printable Latin-1 bytes stand for themselves, the others for chr(256 + k) in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


def piece_text(piece: str, marker: str | None) -> str:
    """The text a piece writes when it follows other text (its word-start marker as a space)."""
    if marker == "Ġ":
        data = bytes(_BYTE_OF.get(c, 0x3F) for c in piece)  # '?' for a character outside the alphabet
        return data.decode("utf-8", errors="replace")
    fallback = _BYTE_FALLBACK.fullmatch(piece)  # SentencePiece byte fallback: '<0x0A>'
    if fallback:
        return bytes([int(fallback.group(1), 16)]).decode("utf-8", errors="replace")
    return piece.replace("▁", " ") if marker == "▁" else piece


def word_start_marker(pieces: list[str | None]) -> str | None:
    """The vocabulary's word-start convention: 'Ġ' (byte-level BPE), '▁' (SentencePiece /
    Metaspace), ' ' (pieces that hold a literal leading whitespace character, e.g. a
    character-level vocabulary), or None (no piece starts a word: end-of-word markers such
    as '</w>', where a word's own tokens already end it and no correction is needed)."""
    counts = {"Ġ": 0, "▁": 0, " ": 0}
    for piece in pieces:
        if piece:
            head = piece[0]
            if head in counts:
                counts[head] += 1
            elif head.isspace():
                counts[" "] += 1
    # Byte-level and Metaspace vocabularies hold hundreds of marked pieces; the larger count
    # wins when a vocabulary happens to contain both characters.
    marker = max(("Ġ", "▁"), key=lambda m: counts[m])
    if counts[marker]:
        return marker
    return " " if counts[" "] else None


def piece_starts_word(piece: str | None, marker: str | None, word_boundary: str = "whitespace") -> bool:
    """Whether a vocabulary piece begins a word: under ``"whitespace"`` its text begins with
    whitespace (``str.isspace``, as the ``\\S+`` word runs split); under ``"marker"`` the
    piece itself begins with the vocabulary's word-start marker (so 'Ġthe' and '▁the' do,
    and a newline piece 'Ċ' or '<0x0A>' does not)."""
    if not piece or marker is None:
        return False
    if word_boundary == "marker":
        return piece[0] == marker
    return piece_text(piece, marker)[:1].isspace()


def word_start_mask(
    pieces: list[str | None], special_ids, width: int, word_boundary: str = "whitespace"
) -> tuple[np.ndarray, str | None]:
    """(width,) bool mask of B, the ids whose piece begins a word (see `piece_starts_word`
    and `WORD_BOUNDARIES`), and the marker found.

    ``pieces[i]`` is the vocabulary piece of id i (None when unknown); ids at or past
    ``len(pieces)`` (padded embedding rows) and special tokens never begin a word.
    """
    marker = word_start_marker(pieces)
    mask = np.zeros(width, dtype=bool)
    for i, piece in enumerate(pieces[:width]):
        mask[i] = piece_starts_word(piece, marker, word_boundary)
    specials = [i for i in special_ids if 0 <= i < width]
    mask[specials] = False
    return mask, marker


def mass_masks(word_start: np.ndarray, eos_id: int | None) -> np.ndarray:
    """(3, V) bool rows: B, E = {EOS} minus B, and not-B (rows `MASS_*`)."""
    eos = np.zeros_like(word_start)
    if eos_id is not None and 0 <= eos_id < len(eos) and not word_start[eos_id]:
        eos[eos_id] = True
    return np.stack([word_start, eos, ~word_start])


def log_mass(logits: torch.Tensor, masks: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``log q(S_k | ctx)`` for each row of ``logits`` (N, V) and each column of ``masks``
    (V, K, 0/1): logsumexp over the ids of S_k minus logsumexp over all ids, in nats; (N, K).
    -inf for an empty set.

    Half-precision logits are upcast to float32 (float64 stays float64). One exp pass and one
    (N, V) x (V, K + 1) product (the extra column of ones gives the row's total) serve every
    set; rows where a set's mass underflows that shared shift (its logits far below the
    row's maximum) are recomputed with a per-set logsumexp. ``scratch``, an (N, V) buffer of
    the upcast dtype, saves allocating one per call.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()  # (N, V)
    masks = masks.to(z.dtype)
    with_total = torch.cat([masks, masks.new_ones((masks.shape[0], 1))], dim=1)  # (V, K + 1)
    z_max = z.amax(dim=1, keepdim=True)
    e = torch.sub(z, z_max, out=scratch if scratch is not None else torch.empty_like(z)).exp_()  # (N, V)
    sums = e @ with_total  # (N, K + 1)
    sums, total = sums[:, :-1], sums[:, -1:]
    out = torch.log(sums) - torch.log(total)
    tiny = torch.finfo(z.dtype).tiny ** 0.75  # well above the denormals, where precision goes
    nonempty = masks.sum(dim=0) > 0  # (K,)
    low = ((sums < tiny * total) & nonempty).any(dim=1)
    if low.any():
        rows = z[low]  # (n, V)
        lse = torch.logsumexp(rows, dim=1, keepdim=True)
        exact = [torch.logsumexp(rows.masked_fill(masks[:, k] == 0, -torch.inf), dim=1) for k in range(masks.shape[1])]
        out[low] = torch.stack(exact, dim=1) - lse
    return out


def boundary_log_prob(log_masses: np.ndarray, text_end: str) -> np.ndarray:
    """``log q(B u E)`` from rows of `log_mass` columns (..., 3): E = {EOS} under
    ``text_end="eos"`` (the text may end after any word), empty under ``"word"``."""
    lp = np.asarray(log_masses, dtype=np.float64)
    if text_end == "word":
        return lp[..., MASS_WORD_START]
    return np.logaddexp(lp[..., MASS_WORD_START], lp[..., MASS_EOS])


def boundary_terms(
    before: np.ndarray, after_last: np.ndarray, text_end: str, first_class: bool | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per token of one text, the two boundary log-probabilities (nats) of the correction.

    ``before`` (m, 3): the log masses of `log_mass` at the output that predicts each token;
    ``after_last`` (3,): those at the output after the last token (the EOS position). Returns
    ``(start, end)`` of shape (m,): ``end[k] = log q(B u E | after token k)`` and
    ``start[k] = log q(B u E | before token k)``, except that when ``first_class`` is not None
    token 0 opens the text (nothing but the BOS before it) and ``start[0]`` is the mass of
    its own class after the BOS: ``log q(B)`` if it begins a word (``first_class`` True),
    else ``log q(not B)`` (the text starts without a space).
    """
    before = np.asarray(before, dtype=np.float64).reshape(-1, 3)
    union = boundary_log_prob(np.concatenate([before, np.asarray(after_last, np.float64)[None]]), text_end)
    start, end = union[:-1].copy(), union[1:].copy()
    if first_class is not None and len(start):
        start[0] = before[0, MASS_WORD_START if first_class else MASS_NOT_WORD_START]
    return start, end
