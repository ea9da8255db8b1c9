#!/usr/bin/env python
"""Build lmeval's bundled offline demo model (the "embedded default") from the King James Bible.

The text comes from Debian's ``bible-kjv-text`` package, which stores it compressed in
``/usr/lib/bible.data``; it is decoded with the ``bible`` program from ``bible-kjv`` (a
dependency that apt installs along with it)::

    apt-get update && apt-get install -y bible-kjv-text bible-kjv
    python scripts/train_demo_model.py

``--source PATH`` overrides the input: either a ``bible.data`` file (decoded with ``bible``)
or a plain-text dump as written by ``bible -f Gen1:1-Rev22:21`` (one verse a line,
``<Book><chapter>:<verse> <text>``). The KJV text is in the public domain.

What it writes under ``lmeval/assets/demo/`` (``--out`` to change):

* ``heldout.jsonl``   held-out books, ``{"id": <book name>, "text": <book>}`` a line; a
  book's text is its verses joined by single spaces, one chapter a paragraph (chapters
  separated by a blank line), no verse numbers.
* ``early/``, ``final/``  two float16 safetensors checkpoints of one training run (a small
  GPT-2 trained from scratch), each with its byte-level BPE tokenizer (trained on the
  training books only), loadable offline with ``AutoTokenizer`` / ``AutoModelForCausalLM``.
* ``train_log.json``  hyperparameters, seed, held-out books, wall time, training-loss curve,
  checkpoint steps and the held-out mean token NLL of both checkpoints (float64 reference).

Held-out NLL protocol (the one in ``lmeval/windows.py`` with ``L = S = n_positions``): each
document is tokenized without special tokens, prefixed with ``<|endoftext|>`` (the BOS), and
cut into disjoint rolling windows of ``n_positions`` inputs; every document token is scored
exactly once. The saved float16 weights are upcast to float64, run with eager attention, and
scored with ``torch.log_softmax(logits.double(), -1)``; the mean is over all held-out tokens.

Deterministic: fixed seed, ``torch.use_deterministic_algorithms(True)``, no dropout, CPU
only, a fixed number of optimiser steps. About 4-5 minutes on 2 otherwise idle CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = "/usr/lib/bible.data"
DEFAULT_OUT = REPO / "lmeval" / "assets" / "demo"
EOT = "<|endoftext|>"

# The 66 books in the order `bible` prints them (the abbreviations it uses vary, so books are
# matched by position and the count is checked).
BOOKS = [
    "Genesis",
    "Exodus",
    "Leviticus",
    "Numbers",
    "Deuteronomy",
    "Joshua",
    "Judges",
    "Ruth",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "1 Chronicles",
    "2 Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Joel",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
    "Revelation",
]

# Held out from tokenizer and model training: short books plus one long one (Job, ~94 KB),
# about 180 KB of text in 14 documents.
HELDOUT = [
    "Job",
    "Ruth",
    "Lamentations",
    "Obadiah",
    "Jonah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Titus",
    "Philemon",
    "2 John",
    "3 John",
    "Jude",
]

HP = dict(
    seed=1234,
    vocab_size=4096,
    tokenizer_min_frequency=2,
    n_positions=256,
    n_embd=128,
    n_layer=4,
    n_head=4,
    dropout=0.0,
    seq_len=256,
    batch_size=16,
    max_steps=500,
    early_step=60,  # 12% of max_steps
    lr=3e-3,
    min_lr_ratio=0.1,
    warmup_steps=25,
    schedule="linear warmup, cosine decay to min_lr_ratio * lr",
    weight_decay=0.1,
    adam_betas=(0.9, 0.95),
    adam_eps=1e-8,
    grad_clip=1.0,
    log_every=10,
    num_threads=2,
)

VERSE_RE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_source(path: str) -> str:
    """The whole KJV as ``bible -f`` prints it: one ``<Abbr><ch>:<v> <text>`` verse a line."""
    p = Path(path)
    if not p.is_file():
        fail(
            f"KJV text not found at {p}. Install Debian's bible-kjv-text package "
            "(apt-get install -y bible-kjv-text bible-kjv), or pass --source PATH "
            "(a bible.data file or a plain-text `bible -f Gen1:1-Rev22:21` dump)."
        )
    with open(p, "rb") as f:
        magic = f.read(16)
    if not magic.startswith(b"EC02Compressed"):
        return p.read_text(encoding="ascii")
    exe = shutil.which("bible")
    if exe is None:
        fail(
            f"{p} is the compressed bible-kjv-text data; decoding it needs the `bible` program "
            "from the bible-kjv package (apt-get install -y bible-kjv-text bible-kjv)."
        )
    out = subprocess.run(
        [exe, "-f", "-p", str(p.parent), "-d", p.name, "Gen1:1-Rev22:21"],
        check=True,
        capture_output=True,
        env={**os.environ, "COLUMNS": "80"},
    ).stdout
    return out.decode("ascii")


def split_books(raw: str) -> dict[str, str]:
    """Book name -> text: verses joined by spaces, chapters separated by a blank line."""
    books: list[list[list[str]]] = []  # book -> chapter -> verses
    abbrs: list[str] = []
    last = None
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        if m is None:
            fail(f"unexpected line in KJV source: {line[:80]!r}")
        abbr, ch, verse = m.group(1), int(m.group(2)), m.group(4).strip()
        if abbr != (abbrs[-1] if abbrs else None):
            abbrs.append(abbr)
            books.append([])
            last = None
        if ch != last:
            books[-1].append([])
            last = ch
        books[-1][-1].append(verse)
    if len(books) != len(BOOKS):
        fail(f"expected {len(BOOKS)} books in the KJV source, found {len(books)}")
    if sum(len(c) for b in books for c in b) != 31102:
        fail("expected 31102 verses in the KJV source")
    return {name: "\n\n".join(" ".join(c) for c in chs) for name, chs in zip(BOOKS, books)}


def seed_everything(seed: int) -> bool:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
        return True
    except Exception:  # pragma: no cover
        return False


def train_tokenizer(texts: list[str], hp: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's offsets cover its leading space, so the offsets of a
    # text's tokens tile the text exactly ("In the" -> (0,2) "In", (2,6) " the").
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=hp["vocab_size"],
        min_frequency=hp["tokenizer_min_frequency"],
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=hp["n_positions"],
    )


def check_offsets(tok) -> list:
    text = "In the beginning God created the heaven and the earth."
    enc = tok(text, return_offsets_mapping=True)
    spans = [text[a:b] for a, b in enc["offset_mapping"]]
    pieces = [tok.decode([i]) for i in enc["input_ids"]]
    if spans != pieces or "".join(spans) != text:
        fail(f"tokenizer offsets do not slice the text back: {spans} vs {pieces}")
    return spans


def lr_at(step: int, hp: dict) -> float:
    """Learning rate for optimiser step ``step`` (0-based)."""
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    frac = (step - hp["warmup_steps"]) / max(1, hp["max_steps"] - hp["warmup_steps"])
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return hp["lr"] * (hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * cos)


def save_checkpoint(model, tok, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    half = copy.deepcopy(model).to(torch.float16)
    kwargs = {}
    if "safe_serialization" in inspect.signature(half.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    half.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    # transformers 5 records its class as "TokenizersBackend", which 4.x cannot resolve;
    # "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if not (path / "model.safetensors").is_file():
        fail(f"no model.safetensors written in {path}")
    os.chmod(path / "model.safetensors", 0o644)  # transformers 5 writes it 0600


@torch.no_grad()
def heldout_nll(ckpt: Path, docs: list[dict]) -> dict:
    """Mean token NLL (nats) of the saved checkpoint on the held-out docs; float64 reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64, attn_implementation="eager").eval()
    L = model.config.n_positions
    total_nll, total_n, per_doc = 0.0, 0, {}
    for d in docs:
        t = tok(d["text"], add_special_tokens=False)["input_ids"]
        s = [tok.bos_token_id] + t
        nll = 0.0
        for p in range(0, len(t), L):
            e = min(p + L, len(t))
            # window s[max(0, e-L):e], whose last e-p outputs predict u[p:e] = s[p+1:e+1]
            start = max(0, e - L)
            ids = torch.tensor([s[start:e]])
            logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
            tgt = torch.tensor(s[p + 1 : e + 1])
            nll -= logp[p - start :, :].gather(1, tgt[:, None]).sum().item()
        per_doc[d["id"]] = {"tokens": len(t), "nll_sum": nll, "mean_nll": nll / len(t)}
        total_nll += nll
        total_n += len(t)
    mean = total_nll / total_n
    return {
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "tokens": total_n,
        "nll_sum": total_nll,
        "per_doc": per_doc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"bible.data or plain-text KJV dump (default {DEFAULT_SOURCE})"
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    args = ap.parse_args()

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    hp = dict(HP)
    torch.set_num_threads(hp["num_threads"])
    deterministic = seed_everything(hp["seed"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import tokenizers
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()  # long-sequence tokenizer warnings are expected

    books = split_books(read_source(args.source))
    train_names = [b for b in BOOKS if b not in HELDOUT]
    heldout = [{"id": b, "text": books[b]} for b in BOOKS if b in HELDOUT]
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for d in heldout:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(
        f"{len(train_names)} training books, {len(heldout)} held-out documents "
        f"({(out / 'heldout.jsonl').stat().st_size} bytes)"
    )

    # ---- tokenizer (training books only) ----
    train_texts = [books[b] for b in train_names]
    tok = train_tokenizer(train_texts, hp)
    spans = check_offsets(tok)
    eot_id = tok.convert_tokens_to_ids(EOT)
    print(f"tokenizer: {len(tok)} tokens; offsets {spans[:6]}")

    # ---- training stream: <eot> book <eot> book ... packed into seq_len+1 blocks ----
    stream = []
    for text in train_texts:
        stream.append(eot_id)
        stream.extend(tok(text, add_special_tokens=False)["input_ids"])
    stream.append(eot_id)
    T = hp["seq_len"]
    n_blocks = (len(stream) - 1) // T
    data = torch.tensor(stream[: n_blocks * T + 1], dtype=torch.long)
    print(f"training tokens: {len(stream)}, blocks of {T}: {n_blocks}")

    # ---- model ----
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=hp["n_positions"],
        n_embd=hp["n_embd"],
        n_layer=hp["n_layer"],
        n_head=hp["n_head"],
        resid_pdrop=hp["dropout"],
        embd_pdrop=hp["dropout"],
        attn_pdrop=hp["dropout"],
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_params}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"],
        betas=hp["adam_betas"],
        eps=hp["adam_eps"],
    )

    g = torch.Generator().manual_seed(hp["seed"])
    order = torch.randperm(n_blocks, generator=g)
    cursor, epoch = 0, 0
    loss_curve, window = [], []
    ckpt_steps = {}
    model.train()
    t_train = time.perf_counter()
    for step in range(hp["max_steps"]):
        if cursor + hp["batch_size"] > n_blocks:
            order = torch.randperm(n_blocks, generator=g)
            cursor, epoch = 0, epoch + 1
        idx = order[cursor : cursor + hp["batch_size"]]
        cursor += hp["batch_size"]
        batch = torch.stack([data[i * T : i * T + T + 1] for i in idx.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        window.append(loss.item())
        done = step + 1
        if done % hp["log_every"] == 0 or done == hp["max_steps"]:
            mean = sum(window) / len(window)
            loss_curve.append({"step": done, "loss": round(mean, 5), "lr": lr_at(step, hp)})
            window = []
            el = time.perf_counter() - t_train
            print(f"step {done:4d}  loss {mean:.4f}  lr {lr_at(step, hp):.2e}  {el:6.1f}s", flush=True)
        if done == hp["early_step"]:
            save_checkpoint(model, tok, out / "early")
            ckpt_steps["early"] = done
    train_seconds = time.perf_counter() - t_train
    save_checkpoint(model, tok, out / "final")
    ckpt_steps["final"] = hp["max_steps"]

    # ---- held-out NLL of the saved (float16) checkpoints, float64 reference ----
    results = {name: heldout_nll(out / name, heldout) for name in ("early", "final")}
    for name, r in results.items():
        print(
            f"{name}: held-out mean NLL {r['mean_nll']:.4f} nats, ppl {r['perplexity']:.2f} over {r['tokens']} tokens"
        )
    if not results["final"]["perplexity"] < results["early"]["perplexity"]:
        fail("final checkpoint is not better than the early one on held-out text")

    wall = time.perf_counter() - t0
    log = {
        "description": "lmeval demo model: small GPT-2 trained from scratch on the KJV Bible "
        "(training books only), float16 checkpoints 'early' and 'final'.",
        "source": "Debian package bible-kjv-text (King James Version, public domain)",
        "rebuild": "python scripts/train_demo_model.py",
        "hyperparameters": hp,
        "seed": hp["seed"],
        "deterministic_algorithms": deterministic,
        "model_config": {k: config.to_dict()[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")},
        "n_parameters": n_params,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers), trained on training books only",
            "vocab_size": len(tok),
            "special_tokens": [EOT],
            "bos=eos=unk": EOT,
            "eot_id": eot_id,
            "trim_offsets": False,
        },
        "training_books": train_names,
        "heldout_books": [d["id"] for d in heldout],
        "heldout_file": "heldout.jsonl",
        "training_tokens": len(stream),
        "training_blocks": n_blocks,
        "epochs_seen": round(hp["max_steps"] * hp["batch_size"] / n_blocks, 3),
        "checkpoint_steps": ckpt_steps,
        "checkpoint_dtype": "float16",
        "loss_curve": loss_curve,
        "heldout_eval": {
            "protocol": "per document: tokens without special tokens, prefixed with the BOS "
            "<|endoftext|>; disjoint rolling windows of n_positions inputs "
            "(lmeval.windows with L = S = n_positions), every token scored once; "
            "saved float16 weights upcast to float64, eager attention, "
            "torch.log_softmax(logits.double(), -1); mean over all tokens (nats)",
            **results,
        },
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(time.process_time(), 1),
        # 1-minute load average at start and end: the 2-core build machine is shared, and
        # wall time grows with other jobs' load (uncontended: ~0.4 s a training step).
        "load_average_1min": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    with open(out / "train_log.json", "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    print(f"wall time {wall:.1f}s; wrote {out}")


if __name__ == "__main__":
    main()
