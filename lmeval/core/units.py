"""Units of information: nats, bits, and pooled ratios. Pure Python, no torch.

All lmeval logs are natural (nats); bits are nats / ln 2. Perplexity is exp of a POOLED mean
(sum of nll over the sum of units), never a mean of per-document perplexities.
"""

from __future__ import annotations

import math

LN2 = math.log(2.0)


def nats_to_bits(nats):
    """Convert nats (natural-log units) to bits (base-2 units): divide by ln 2."""
    return nats / LN2


def perplexity(nll_sum: float, count: int) -> float:
    """Pooled perplexity exp(sum nll / count): the effective number of equally likely
    choices per unit. NaN when nothing was counted (never a silent 1.0)."""
    return math.exp(nll_sum / count) if count > 0 else float("nan")


def bits_per(nll_sum: float, count: int) -> float:
    """Pooled bits per unit (token, byte, ...): sum nll / ln 2 / count. NaN when count is 0."""
    return nll_sum / LN2 / count if count > 0 else float("nan")


def scored_count(count: int, n_tokens: int) -> int:
    """A text unit's count (bytes, words) as a pooled ratio's denominator: 0 when no token was
    scored. Why: text with no scored token still has bytes and words, and dividing its nll sum
    of 0 by them would report a perfect 0 bits per byte and a word perplexity of 1."""
    return count if n_tokens > 0 else 0
