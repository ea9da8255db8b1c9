"""The window protocol: which ids the model sees, and which outputs are scored. Pure integers.

Let ``s = prefix + t``, where ``prefix`` is the one conditioning token ``[b]`` (the BOS
policy) or empty (``bos: none``), and ``t`` are the document's tokens. Every element of
``s`` after the first is a target. Write ``u = s[1:]`` for the targets (``n = len(u)``).

Targets are taken in consecutive spans ``u[p:e]`` with ``e = min(p + S, n)``. The window for
a span is the at most L ids ``s[max(0, e - L) : e]``; its last ``e - p`` outputs predict
``u[p:e]`` and no other output of that window is scored. With L = 4, S = 4, n = 10::

    s:  b  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9
    w0 [b  t0 t1 t2]                        scores t0..t3   (context 1..4)
    w1             [t3 t4 t5 t6]            scores t4..t7   (context 1..4)
    w2                   [t5 t6 t7 t8]      scores t8, t9   (context 3, 4)
    (w2 ends at t8, the input that predicts t9; its last 2 outputs are scored)

Each token is scored exactly once, with as much context as L allows. With S = L this is
exactly lm-evaluation-harness's ``loglikelihood_rolling``; with S < L every scored token
but the first L - S sees at least L - S tokens of context (the transformers "perplexity of
fixed-length models" recipe, each window ending at its last target).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One model input and the slice of its outputs that is scored.

    ``input_ids`` are ``s[start:e]``. The outputs at window indices
    ``first_scored .. len(input_ids) - 1`` are scored; output ``i`` predicts ``s[start + i + 1]``.
    ``targets`` are those predicted ids, ``positions`` their indices into the document's
    tokens ``t``, and ``context_len`` how many ids each was conditioned on.
    """

    doc_id: int
    input_ids: tuple[int, ...]
    first_scored: int
    positions: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - self.first_scored

    @property
    def context_len(self) -> tuple[int, ...]:
        return tuple(range(self.first_scored + 1, len(self.input_ids) + 1))


def window_spans(n_targets: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, p, e)`` for each window over ``n_targets`` targets: the window is
    ``s[start:e]`` and it scores targets ``u[p:e]``. Pure arithmetic, no ids."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (got {max_length}).")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}] (got {stride}).")
    spans = []
    p = 0
    while p < n_targets:
        e = min(p + stride, n_targets)
        spans.append((max(0, e - max_length), p, e))
        p = e
    return spans


def make_windows(
    doc_id: int,
    token_ids: list[int] | tuple[int, ...],
    prefix: list[int] | tuple[int, ...],
    max_length: int,
    stride: int,
) -> list[Window]:
    """Cut one document into windows under the protocol above.

    ``prefix`` is ``[bos_id]`` or ``[]``. Positions index ``token_ids``: with a prefix every
    token is scored (positions 0..n-1); without one the first token only conditions
    (positions 1..n-1), and it never appears as a zero loss.
    """
    if len(prefix) > 1:
        raise ValueError(f"prefix must hold at most one conditioning token (got {len(prefix)}).")
    s = tuple(prefix) + tuple(token_ids)
    offset = 1 - len(prefix)  # target u[j] = s[j + 1] is document position j + offset
    windows = []
    for start, p, e in window_spans(max(len(s) - 1, 0), max_length, stride):
        windows.append(
            Window(
                doc_id=doc_id,
                input_ids=s[start:e],
                first_scored=p - start,
                positions=tuple(range(p + offset, e + offset)),
                targets=s[p + 1 : e + 1],
            )
        )
    return windows


@dataclass(frozen=True)
class Chunks:
    """The chunk protocol of the numbers quantization papers quote (GPTQ's ``llama_eval``,
    llama.cpp's ``perplexity``), instead of the rolling windows above.

    The ids ``s = prefix + t`` are cut into disjoint chunks of exactly L ids, ``s[iL:(i+1)L]``;
    a remainder shorter than L is dropped. In each chunk the first ``context`` ids only
    condition, and the chunk's positions ``context .. L-1`` are scored, each given the chunk
    before it and nothing earlier. With ``bos`` the chunk's first id is replaced by ``bos``
    (llama.cpp's rule); its own token is then never seen. With L = 4, context = 2, n = 10::

        s:  b  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9
        c0 [b  t0 t1 t2]                       scores t1, t2   (context 2, 3)
        c1             [t3 t4 t5 t6]           scores t5, t6   (context 2, 3)
        c2                         [t7 t8 t9]  dropped: fewer than L ids

    ``context`` is an int in [1, L-1], or ``"half"``: L // 2 + 1, llama.cpp's ``first =
    n_ctx / 2`` (the outputs from index n_ctx / 2 on are scored). The chunk's last id
    predicts nothing that is scored, so a window holds the chunk's first L - 1 ids (a causal
    model gives the same outputs for them).
    """

    context: int | str = 1
    bos: int | None = None

    def context_for(self, max_length: int) -> int:
        context = max_length // 2 + 1 if self.context == "half" else int(self.context)
        if not 1 <= context <= max_length - 1:
            raise ValueError(
                f"scoring.chunk_context: must be in [1, max_length - 1 = {max_length - 1}] (got {self.context!r} -> "
                f"{context}). At least one id must condition and one be scored in each chunk of max_length ids."
            )
        return context


def make_chunk_windows(
    doc_id: int,
    token_ids: list[int] | tuple[int, ...],
    prefix: list[int] | tuple[int, ...],
    max_length: int,
    chunks: Chunks,
) -> list[Window]:
    """Cut one document (or stream) into the disjoint chunks of `Chunks`; positions index
    ``token_ids`` as in `make_windows`."""
    context = chunks.context_for(max_length)
    s = tuple(prefix) + tuple(token_ids)
    offset = -len(prefix)  # s[j] is document position j + offset
    windows = []
    for start in range(0, len(s) - max_length + 1, max_length):
        ids = s[start : start + max_length - 1]
        if chunks.bos is not None:
            ids = (chunks.bos,) + ids[1:]
        windows.append(
            Window(
                doc_id=doc_id,
                input_ids=ids,
                first_scored=context - 1,  # output context - 1 predicts chunk position context
                positions=tuple(range(start + context + offset, start + max_length + offset)),
                targets=s[start + context : start + max_length],
            )
        )
    return windows
