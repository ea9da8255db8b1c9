"""Tiny, hermetic artefacts built in-process: a BPE tokenizer trained on text written here,
and randomly initialised causal LMs of several architectures. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = [
    "In the beginning was the word, and the word was with the model.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps on.",
    "Perplexity is the exponential of the average negative log-likelihood.",
    "Cross-entropy equals entropy plus the Kullback-Leibler divergence.",
    "Naïve café owners serve crème brûlée — 猫 and 犬 like it 😀.",
    "Numbers: 3.14159, 2.71828 and 1.41421 appear in many formulas.",
]
EOT = "<|endoftext|>"


def train_bpe(tmp_dir, vocab_size: int = 400, bos: str | None = EOT, eos: str | None = EOT):
    """A byte-level BPE tokenizer (GPT-2 style, 'Ġ' for spaces) trained on a file we write."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_dir / "corpus.txt"
    path.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    specials = [EOT] if (bos or eos) else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(path)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"))


def tiny_config(arch: str, vocab_size: int, n_positions: int = 64):
    """A two-layer config of each architecture family the scorer must handle."""
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=n_positions,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=1, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common)
    if arch == "gemma2":
        # A small cap so the soft-capping visibly changes the logits.
        return Gemma2Config(
            num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, attn_logit_softcapping=50.0, **common
        )
    raise ValueError(arch)


def build_model(arch: str, vocab_size: int, n_positions: int = 64, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, n_positions)
    config.tie_word_embeddings = False
    config.bos_token_id = config.eos_token_id = 0  # the BPE fixture's <|endoftext|>
    config.pad_token_id = None
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Larger weights than the default init, so that distributions are far from uniform.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(bpe_tokenizer):
    """One tiny model per architecture, sharing the BPE tokenizer."""
    vocab = len(bpe_tokenizer)
    return {arch: build_model(arch, vocab) for arch in ("gpt2", "llama", "gpt_neox", "gemma2")}


@pytest.fixture(scope="session")
def gpt2_pair(tiny_models, bpe_tokenizer):
    return tiny_models["gpt2"], bpe_tokenizer


@pytest.fixture
def saved_gpt2(tmp_path, gpt2_pair):
    """The tiny GPT-2 and its tokenizer saved as a local folder (safetensors)."""
    model, tokenizer = gpt2_pair
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_lm(tmp_path_factory):
    """A tiny GPT-2 with a ChatML template, room for a whole conversation in one window."""
    from helpers import CHATML
    from lmeval.model.loading import prepare_model

    tok = train_bpe(tmp_path_factory.mktemp("chat"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    # Room for a whole conversation in one window, so that whole-conversation scoring is the oracle.
    return prepare_model(build_model("gpt2", len(tok), n_positions=256), tok, name="tiny-chat")


def _one_pixel_png() -> bytes:
    """A valid 1x1 grey PNG, built by hand (signature, IHDR, IDAT, IEND)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    )


ONE_PIXEL_PNG = _one_pixel_png()


@pytest.fixture(autouse=True)
def _figures_not_rendered(request, monkeypatch):
    """Rendering a run's PNGs is about a third of a tiny run's time, and most tests never look
    at them: those get a valid 1x1 PNG where each figure goes (the figure itself is still built,
    and written by the engine's atomic writer). Tests marked ``figures`` get the real pixels."""
    if request.node.get_closest_marker("figures"):
        return
    from matplotlib.figure import Figure

    def savefig(self, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(ONE_PIXEL_PNG)
        else:
            Path(target).write_bytes(ONE_PIXEL_PNG)

    monkeypatch.setattr(Figure, "savefig", savefig)


@pytest.fixture(autouse=True)
def _report_not_written(request, monkeypatch):
    """A run's report.html reads back every table it wrote, about a tenth of a tiny run's time,
    and most tests never open it: their runs skip it. Tests marked ``report`` get the page
    (tests/test_report.py; `lmeval report` itself is never skipped)."""
    if request.node.get_closest_marker("report"):
        return
    from lmeval.engine import hooks

    monkeypatch.setattr(hooks, "RUN_PAGES", [])
