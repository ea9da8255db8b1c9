"""Every causal-LM architecture of the installed transformers, built tiny: lmeval's per-token
NLL equals a float64 log-softmax of the model's own logits on each window alone (within
1e-5 nats, at S = L and S < L and several batch sizes), or the model is refused by name.

A representative dozen runs by default; the whole mapping is ``-m slow``, and
``scripts/sweep_architectures.py`` prints the whole table."""

import pytest

from tiny_arch import causal_lm_types, check_architecture

# One of each kind: plain decoders, soft-capped and scaled heads, a head the fast path cannot
# split (fallback), state-space and hybrid bodies, mixtures of experts, a top-k sparse
# attention (padding-sensitive: equal-length batches), and bidirectional models (refused).
REPRESENTATIVE = {
    "gpt2": "pass",
    "llama": "pass",
    "gemma2": "pass",
    "granite": "pass",
    "cohere": "pass",
    "bert": "pass",
    "mamba": "pass",
    "qwen2_moe": "pass",
    "opt": "pass",
    "deepseek_v32": "pass equal_length",
    "xlnet": "refused",
    "cpmant": "refused",
}


@pytest.mark.parametrize("model_type", sorted(REPRESENTATIVE))
def test_representative_architectures(model_type, bpe_tokenizer):
    row = check_architecture(model_type, bpe_tokenizer, quick=True)
    result, _, batching = REPRESENTATIVE[model_type].partition(" ")
    assert row["result"] == result and (not batching or row["batching"] == batching), row


@pytest.mark.slow
@pytest.mark.parametrize("model_type", causal_lm_types())
def test_every_architecture(model_type, bpe_tokenizer):
    row = check_architecture(model_type, bpe_tokenizer)
    assert row["result"] in ("pass", "refused", "skipped"), row
