"""Windows that score only some tokens of a document (a continuation after its context, the
assistant turns of a chat), and the position after the last token. Pure integers.

The protocol of `lmeval.core.windows` applies to each scored range on its own: with
``s = prefix + t`` and targets ``u = s[1:]``, the targets ``u[a:b]`` of a range are taken
in spans ``u[p:e]``, ``e = min(p + S, b)``, each in the window ``s[max(0, e - L) : e]``. So a
context conditions but is never scored, and a context longer than L keeps its last tokens.
With one range covering every target this is exactly `make_windows`.

The END position is the output after the document's last token, where the model's
probability of EOS and of a next word is read (word correction). It is scored as one more
target, ``end_id``, at position ``len(t)``: appended to the last window when that window
has room (a causal model's earlier outputs do not change), else in a window of its own::

    L = 4:  s = b t0 t1 t2 t3     windows [b t0 t1 t2] scores t0..t3
                                  end     [t0 t1 t2 t3] scores only EOS after t3
"""

from __future__ import annotations

from .windows import Window, window_spans


def target_range(first_token: int, end_token: int, n_prefix: int) -> tuple[int, int]:
    """Target indices ``[a, b)`` into ``u = s[1:]`` of tokens ``t[first_token:end_token]``.

    Target ``u[j]`` is token ``t[j + 1 - n_prefix]``; without a prefix token 0 is never a
    target (it only conditions), so a range starting there loses it."""
    shift = 1 - n_prefix
    return max(first_token - shift, 0), max(end_token - shift, 0)


def range_windows(
    doc_id: int,
    token_ids,
    prefix,
    max_length: int,
    stride: int,
    ranges: list[tuple[int, int]] | None = None,
    end_id: int | None = None,
) -> list[Window]:
    """Windows that score tokens ``t[a:b]`` for each ``(a, b)`` of ``ranges`` (all tokens
    when None), and, with ``end_id``, one more target ``end_id`` after the last token.

    Positions index ``token_ids`` as in `make_windows`; the end target has position
    ``len(token_ids)``. Ranges must be in order and disjoint.
    """
    if len(prefix) > 1:
        raise ValueError(f"prefix must hold at most one conditioning token (got {len(prefix)}).")
    s = tuple(prefix) + tuple(token_ids)
    n_targets = max(len(s) - 1, 0)
    shift = 1 - len(prefix)  # target u[j] = s[j + 1] is token position j + shift
    ranges = [(0, len(token_ids))] if ranges is None else ranges
    windows: list[Window] = []
    for first, end in ranges:
        a, b = target_range(first, end, len(prefix))
        b = min(b, n_targets)
        for _, p, e in window_spans(b - a, max_length, stride):
            p, e = p + a, e + a
            start = max(0, e - max_length)
            windows.append(Window(doc_id, s[start:e], p - start, tuple(range(p + shift, e + shift)), s[p + 1 : e + 1]))
    if end_id is not None and s:
        windows = _with_end(windows, doc_id, s, max_length, end_id, len(token_ids))
    return windows


def _with_end(
    windows: list[Window], doc_id: int, s: tuple, max_length: int, end_id: int, position: int
) -> list[Window]:
    """Add the end target (the output at ``s[-1]``): extend the last window if it ends at
    ``s[-1]`` and has room, else give it a window of its own."""
    last = windows[-1] if windows else None
    # The last window ends at s[-2] exactly when it scores the last token (its last output
    # predicts s[-1]); then s[-1] may join it.
    if last is not None and last.positions[-1] == position - 1 and len(last.input_ids) < max_length:
        extended = Window(
            doc_id, last.input_ids + (s[-1],), last.first_scored, last.positions + (position,), last.targets + (end_id,)
        )
        return windows[:-1] + [extended]
    start = max(0, len(s) - max_length)
    return windows + [Window(doc_id, s[start:], len(s) - 1 - start, (position,), (end_id,))]
