"""A toy causal LM over a tiny vocabulary with word-start tokens, small enough that every
string it can produce is enumerated: the brute-force oracle of corrected word probabilities.

Vocabulary (a byte-level BPE tokenizer, GPT-2 style): 0 '<|endoftext|>' (BOS and EOS),
1 'a', 2 'b', 3 'Ġ' (a bare space, never produced), 4 'Ċ' (newline), 5 'Ġa', 6 'Ġb'. Every
string over {a, b, '\\n', ' '} it can produce has exactly one tokenization, so an event on
strings is an event on token sequences. The model must end the text (EOS) after at most
``MAX_TOKENS`` tokens, so its strings are finite in number and their probabilities sum to 1.
"""

from __future__ import annotations

import types

import numpy as np
import torch

PIECES = ["<|endoftext|>", "a", "b", "Ġ", "Ċ", "Ġa", "Ġb"]
TEXT = {1: "a", 2: "b", 4: "\n", 5: " a", 6: " b"}  # what each producible id writes
WORD_START = {3, 4, 5, 6}
EOS = 0
MAX_TOKENS = 5
NEVER = -1e4  # exp(-1e4) is exactly 0 in float64: such a token has probability 0


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {p: i for i, p in enumerate(PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "a"), ("Ġ", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


_TABLE = np.random.default_rng(7).normal(0.0, 1.5, size=(MAX_TOKENS + 1, len(PIECES), len(PIECES)))
_WORDS = np.random.default_rng(8).normal(0.0, 1.0, size=(3, len(PIECES)))


def toy_logits(prefix) -> np.ndarray:
    """(V,) float64 logits after ``prefix`` (ids, starting with the BOS): they depend on the
    number of tokens so far, the last token and the number of word starts so far."""
    k = len(prefix) - 1
    if k >= MAX_TOKENS:
        z = np.full(len(PIECES), NEVER)
        z[EOS] = 0.0
        return z
    z = _TABLE[k, prefix[-1]] + _WORDS[sum(t in WORD_START for t in prefix[1:]) % 3]
    z[3] = NEVER
    return z


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


def all_texts() -> dict[str, float]:
    """Every producible string and its probability (they sum to 1), by walking the tree
    of token prefixes."""
    out = {}
    frontier = [((EOS,), 0.0)]  # (prefix, its log-probability)
    while frontier:
        prefix, logp = frontier.pop()
        logq = log_softmax(toy_logits(prefix))
        text = "".join(TEXT[t] for t in prefix[1:])
        out[text] = np.exp(logp + logq[EOS])
        if len(prefix) - 1 < MAX_TOKENS:
            frontier.extend((prefix + (t,), logp + logq[t]) for t in sorted(TEXT))
    return out


class ToyLM(torch.nn.Module):
    """The toy as a causal LM with the interface the scorer needs (plain forward path)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(len(PIECES), 1)
        self.config = types.SimpleNamespace(vocab_size=len(PIECES), max_position_embeddings=16)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        rows = [[toy_logits(row[: i + 1]) for i in range(len(row))] for row in input_ids.tolist()]
        return types.SimpleNamespace(logits=torch.tensor(np.array(rows), dtype=torch.float32))  # (B, T, V)
