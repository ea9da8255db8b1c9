"""The progress bar of `lmeval run`: scored tokens, with an ETA that holds across parts."""

from __future__ import annotations

import time


class ScoringProgress:
    """A tqdm bar over scored tokens. Its total is estimated from the characters still to
    score and the tokens per character seen so far, so the ETA holds across groups."""

    def __init__(self, show: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc="scoring", unit="tok", disable=not show, dynamic_ncols=True)
        # characters (a part's weight: a fraction where a document is split into pieces)
        self.chars_left: float = 0  # planned, not yet started
        self.chars_seen: float = 0  # of the groups started so far
        self.done_before = 0  # tokens of the groups finished before the current one
        self.first_part_at: float | None = None  # time.time() when the first part started

    def plan(self, n_chars: float) -> None:
        self.chars_left += n_chars

    def group(self, n_chars: float, tokenizing: bool = False) -> None:
        """A part starts; ``tokenizing`` says its documents are being tokenized first (shown
        on the bar, since a document of many MB takes seconds before its first batch)."""
        if self.first_part_at is None:
            self.first_part_at = time.time()
        self.done_before = int(self.bar.n)
        self.chars_left -= n_chars
        self.chars_seen += n_chars
        self.bar.set_description_str("tokenizing" if tokenizing else "scoring")

    def progress(self, done: int, total: int) -> None:
        if self.bar.desc != "scoring":
            self.bar.set_description_str("scoring")
        known = self.done_before + total
        self.bar.total = known + round(self.chars_left * known / max(self.chars_seen, 1))
        self.bar.update(done)

    def close(self):
        self.bar.close()
