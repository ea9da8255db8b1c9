"""Helpers shared by several test modules: config and data writers, table readers, toy
models and texts. Test modules import from here (or use conftest's fixtures), never from
each other."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import lmeval
from conftest import CORPUS, build_model
from lmeval.engine.files import token_table


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(folder: Path, body: str) -> Path:
    path = folder / "run.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def write_tiny_run(folder: Path, model_path, docs, scoring: str, sections: str, output: str = "") -> Path:
    """docs.jsonl and run.yaml in ``folder``: one model named ``tiny``, ids from the ``id``
    field, parts of 300 characters (several per corpus), and the config's other ``sections``
    as YAML lines."""
    write_jsonl(folder / "docs.jsonl", docs)
    return write_config(
        folder,
        f"models: [{{name: tiny, path: {model_path}}}]\n"
        "data: {path: docs.jsonl, id_field: id}\n"
        f"scoring: {{{scoring}}}\n"
        f"output: {{dir: out, part_chars: 300{output}}}\n" + sections,
    )


def read_tables(out):
    tables = {
        "tokens": pd.read_parquet(token_table(out, "tokens.parquet")),  # the file, or its dataset folder
        "documents": pd.read_parquet(out / "documents.parquet"),
        "summary": pd.read_csv(out / "summary.csv").drop(columns=["tokens_per_second"]),
    }
    for name in ("calibration", "temperature"):
        tables[name] = pd.read_csv(out / f"{name}.csv")
    return tables


def assert_same_tables(a, b):
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def finetuned(model, scale: float = 0.05, seed: int = 7):
    """A copy of ``model`` with every weight nudged: a stand-in for a fine-tuned checkpoint."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp_min(1e-3))
    return other


def rounded(model, bits: int = 8):
    """A copy of ``model`` with every weight matrix rounded to a symmetric ``bits``-bit grid
    per output row (absmax scaling, as weight-only int8 does): a stand-in for a quantization."""
    other = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for p in other.parameters():
            if p.ndim < 2:
                continue
            scale = p.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
            p.copy_(torch.round(p / scale) * scale)
    return other


def numpy_summary(table: pd.DataFrame, n_resamples: int, seed: int) -> dict:
    """The documented figures, computed here from the per-token rows with numpy alone."""
    kl, dp = table.kl.to_numpy(np.float64), table.delta_p.to_numpy(np.float64)
    diff = table.nll.to_numpy(np.float64) - table.nll_baseline.to_numpy(np.float64)
    out = {
        "kl_mean": kl.mean(),
        "kl_median": np.median(kl),
        "kl_p90": np.quantile(kl, 0.9),
        "kl_p99": np.quantile(kl, 0.99),
        "kl_p999": np.quantile(kl, 0.999),
        "kl_max": kl.max(),
        "kl_reverse_mean": table.kl_reverse.to_numpy(np.float64).mean(),
        "same_top1": table.same_top1.mean(),
        "delta_p_mean": dp.mean(),
        "delta_p_rms": np.sqrt((dp**2).mean()),
        "delta_p_p01": np.quantile(dp, 0.01),
        "delta_p_p99": np.quantile(dp, 0.99),
        "delta_p_min": dp.min(),
        "delta_p_max": dp.max(),
        "ln_ppl_ratio": diff.mean(),
        "acceptance_mean": table.acceptance.to_numpy(np.float64).mean(),
        "topk_overlap_mean": table.topk_overlap.to_numpy(np.float64).mean(),
        "kl_topk_mean": table.kl_topk.to_numpy(np.float64).mean(),
        "n_tokens": len(table),
        "n_documents": table.doc_id.nunique(),
    }
    # The paired document bootstrap, as documented: documents in order of first appearance,
    # default_rng(seed).integers(0, D, (B, D)), each resample pooled from sums.
    docs = pd.unique(table.doc_id)
    frame = pd.DataFrame(
        {
            "doc": table.doc_id,
            "n": 1.0,
            "kl": kl,
            "dp": dp,
            "dp2": dp**2,
            "diff": diff,
            "top": table.same_top1.astype(float),
            "acc": table.acceptance.to_numpy(np.float64),
            "overlap": table.topk_overlap.to_numpy(np.float64),
            "kl_topk": table.kl_topk.to_numpy(np.float64),
        }
    )
    sums = frame.groupby("doc", sort=False).sum().loc[docs]
    draw = np.random.default_rng(seed).integers(0, len(docs), size=(n_resamples, len(docs)))
    boot = {c: sums[c].to_numpy()[draw].sum(axis=1) for c in sums.columns}
    for name, value in (
        ("kl_mean", boot["kl"] / boot["n"]),
        ("same_top1", boot["top"] / boot["n"]),
        ("delta_p_mean", boot["dp"] / boot["n"]),
        ("delta_p_rms", np.sqrt(boot["dp2"] / boot["n"])),
        ("ln_ppl_ratio", boot["diff"] / boot["n"]),
        ("acceptance_mean", boot["acc"] / boot["n"]),
        ("topk_overlap_mean", boot["overlap"] / boot["n"]),
        ("kl_topk_mean", boot["kl_topk"] / boot["n"]),
    ):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = np.percentile(value, [2.5, 97.5])
    return out


CONTEXTS = ["The quick brown fox", "The quick brown fox ", "The dog sle", ""]


CONTEXT_TEXTS = [" jumps over the lazy dog.", "jumps over the lazy dog.", "eps on.", "Perplexity is the word."]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who sleeps?"},
        {"role": "assistant", "content": "The dog sleeps."},
        {"role": "user", "content": "And the fox?"},
        {"role": "assistant", "content": "The fox jumps over the lazy dog."},
    ],
    [
        {"role": "user", "content": "Define perplexity."},
        {"role": "assistant", "content": "The exponential of the loss."},
    ],
]


PROBE_TEXTS = [" ".join(CORPUS[:2]), CORPUS[4], "short", CORPUS[1][:30]]


def with_body(body_class, tokenizer):
    """A tiny Llama whose body is ``body_class`` (a LlamaModel subclass), same weights."""
    model = build_model("llama", len(tokenizer))
    body = body_class(model.config)
    body.load_state_dict(model.model.state_dict())
    model.model = body
    return model.eval()


def llama_body():
    from transformers import LlamaModel

    return LlamaModel


class InferPadding:
    """A body that ignores the mask it is given and infers padding from id 0, assuming
    left padding: it shifts positions by the number of 0s, so with right padding every
    real token of a padded row moves."""

    @staticmethod
    def make():
        class Body(llama_body()):
            def forward(self, input_ids=None, attention_mask=None, **kwargs):
                kwargs.pop("position_ids", None)
                n_pad = (input_ids == 0).sum(1, keepdim=True)
                positions = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] - n_pad).clamp_min(0)
                ones = torch.ones_like(input_ids)  # the mask it was given is ignored
                return super().forward(input_ids=input_ids, attention_mask=ones, position_ids=positions, **kwargs)

        return Body


class MaskCrash:
    """A body that raises on a mask for a batch of two or more rows (XLNet's bug)."""

    @staticmethod
    def make():
        class Body(llama_body()):
            def forward(self, input_ids=None, attention_mask=None, **kwargs):
                if attention_mask is not None and input_ids.shape[0] > 1:
                    raise RuntimeError("shape mismatch in the attention mask")
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        return Body


class RowMixing:
    """A body whose rows interact: every row's embeddings are shifted by the batch mean."""

    @staticmethod
    def make():
        class Body(llama_body()):
            def forward(self, input_ids=None, attention_mask=None, **kwargs):
                kwargs.pop("inputs_embeds", None)
                embeds = self.embed_tokens(input_ids)
                embeds = embeds + 0.5 * embeds.mean(dim=0, keepdim=True)
                return super().forward(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

        return Body


passes_module = importlib.import_module("lmeval.engine.passes")  # where parts are written


FOLDER_TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 5 + 1) % len(CORPUS)]}" for i in range(24)]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def interrupted_after(n_parts: int, config, monkeypatch, overrides=()):
    """Run until ``n_parts`` parts are written, then stop as Ctrl-C would."""
    real_write, written = passes_module.write_part, []

    def write_then_stop(path, columns, meta):
        if len(written) == n_parts:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, columns, meta)

    monkeypatch.setattr(passes_module, "write_part", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lmeval.run(str(config), list(overrides), show_progress=False)
    monkeypatch.setattr(passes_module, "write_part", real_write)
    return written


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_metaspace(tmp_dir, split: bool):
    """A SentencePiece-like tokenizer ('▁' for spaces). ``split=False`` lets BPE merge
    across words ('▁the▁lazy▁'), so one token can span several words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_dir / "corpus.txt"
    path.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    specials = ["<unk>", "<s>", "</s>"]
    if split:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, max_token_length=12)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(split=split)
    tok.decoder = decoders.Metaspace()
    tok.train([str(path)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


HELDOUT = [
    "The lazy dog sleeps while the quick fox jumps over the word.",
    "Entropy plus divergence is the cross-entropy of the model.",
    "Café owners like 3.14159 and formulas — 猫 too.",
]


class TinyTexts(torch.utils.data.Dataset):
    """Fixed-length language-modelling rows (no padding), labels = inputs."""

    def __init__(self, tokenizer, length: int = 12):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in CORPUS * 2]
        self.rows = [torch.tensor(i) for i in ids if len(i) == length]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def callback_oracle(model, tokenizer) -> dict:
    """Pooled metrics from score_texts' per-token rows, computed here in float64."""
    tokens = lmeval.score_texts(HELDOUT, (model, tokenizer), max_length=16)
    nll = tokens.nll.to_numpy(np.float64)
    n_bytes = sum(len(t.encode("utf-8")) for t in HELDOUT)  # bos auto: every character is scored
    conf, top1 = tokens.max_prob.to_numpy(np.float64), tokens.is_top1.to_numpy(np.float64)
    bins = np.clip(np.floor(conf * 15).astype(int), 0, 14)
    ece = sum(abs(conf[bins == b].sum() - top1[bins == b].sum()) for b in range(15)) / len(conf)
    return {
        "ppl": math.exp(nll.sum() / len(nll)),
        "bits_per_token": nll.sum() / len(nll) / math.log(2),
        "bits_per_byte": nll.sum() / n_bytes / math.log(2),
        "ece": ece,
    }


def make_trainer(tmp_path, tokenizer, *, evaluate_every=None, max_steps=4, seed=0, **extra):
    model = build_model("gpt2", len(tokenizer), seed=seed).train()  # GPT-2's default dropout 0.1 is on
    data = TinyTexts(tokenizer)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        eval_strategy="steps" if evaluate_every else "no",
        eval_steps=evaluate_every,
        **extra,
    )
    dev = torch.utils.data.Subset(data, [0, 1]) if evaluate_every else None  # the Trainer's own eval: kept small
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=dev,
        processing_class=tokenizer,
        data_collator=transformers.default_data_collator,
    )


LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(config, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "lmeval",
        "run",
        str(config),
        "-q",
    ]


TEARDOWN_ABORT = "terminate called without an active exception"


def run_ranks(config, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    command = torchrun_command(config, nproc)
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and TEARDOWN_ABORT in done.stderr:
        done = subprocess.run(
            command + ["--overwrite"], env=child_env(), capture_output=True, text=True, timeout=timeout
        )
    return done


def two_model_config(folder, model, texts, part_chars: int = 300):
    """A run config for two copies of ``model`` (``a`` and ``b``) over ``texts`` written as
    ``docs.jsonl``: small windows and parts, so that a few texts make many parts."""
    write_jsonl(folder / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    return write_config(
        folder,
        f"""
models: [{{name: a, path: {model}}}, {{name: b, path: {model}}}]
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 64}}
output: {{dir: out, part_chars: {part_chars}}}
""",
    )
