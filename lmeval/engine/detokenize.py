"""Named detokenizers: fixed rewrites of a corpus's text before it is tokenized.

Why: some benchmark corpora ship pre-tokenized text (WikiText's ``" @-@ "``, ``" , "``), and
the numbers published for them were computed on a detokenized version. Reproducing those
numbers means scoring the same rewritten text, so the rewrite is part of the protocol: it is
named in the config (``data.detokenizer``), never arbitrary code, and the text it changed is
kept (``Document.source``) so the word and byte normalisers can be counted on it
(``data.count_on: source``), as lm-evaluation-harness does for wikitext.
"""

from __future__ import annotations

import dataclasses
import re

# (pattern, replacement, is_regex) in order: the order matters, as in the reference.
_WIKITEXT_RULES = (
    # contractions
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    # number separators
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    # punctuation
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    # brackets and quotes lose their inner padding
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    # headings, degrees, line edges, numbers, possessives
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def wikitext_detokenizer(text: str) -> str:
    """WikiText's tokenized text made readable, rule for rule as lm-evaluation-harness's
    ``lm_eval/tasks/wikitext/preprocess_wikitext.py`` (task version 2.0) rewrites it."""
    for pattern, replacement, is_regex in _WIKITEXT_RULES:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


DETOKENIZERS = {"wikitext": wikitext_detokenizer}


def detokenize_documents(documents: list, name: str | None) -> list:
    """Each document rewritten by the detokenizer ``name`` (None: unchanged), its original
    text kept as ``source``. A context (``data.context_field``) is the same corpus's text, so it
    is rewritten the same way, and never dropped."""
    if name is None:
        return documents
    rewrite = DETOKENIZERS[name]
    return [
        dataclasses.replace(
            d, text=rewrite(d.text), source=d.text, context=None if d.context is None else rewrite(d.context)
        )
        for d in documents
    ]
