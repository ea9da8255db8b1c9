"""Protocol presets (`lmeval.engine.presets`): `gptq_wikitext2` and `llama_cpp` against
re-implementations of their references' arithmetic on a tiny model, with a tokenizer that
adds a BOS (Llama's way) and one that adds nothing (GPT-2's); `--preset` and `preset:`
select them, the user's keys win, and run.json names the preset."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tokenizers import processors

import lmeval
from conftest import CORPUS, EOT
from helpers import write_config, write_jsonl
from lmeval.cli import main
from lmeval.engine.config import build_config, config_from_options, raw_config_from_options
from lmeval.engine.presets import PRESETS
from lmeval.errors import ConfigError

TEXTS = [f"{i}. {CORPUS[i % 6]}" for i in range(12)]
L = 16  # the tiny model has 64 positions


def with_bos(tokenizer):
    """A copy of the BPE tokenizer that, like Llama's, puts its BOS before every text."""
    other = copy.deepcopy(tokenizer)
    bos = other.convert_tokens_to_ids(EOT)
    other._tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, bos)])
    return other


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("presets")
    model = tiny_models["llama"]
    tokenizers = {"no_bos": bpe_tokenizer, "bos": with_bos(bpe_tokenizer)}
    for name, tokenizer in tokenizers.items():
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    data = write_jsonl(folder / "texts.jsonl", [{"text": t} for t in TEXTS])
    return folder, model, tokenizers, data


def gptq_reference(model, tokenizer, texts, seqlen) -> tuple[float, int]:
    """IST-DASLab/gptq: datautils.get_wikitext2's test encoding and llama_eval's loop."""
    testenc = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    nsamples = testenc.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = testenc[:, (i * seqlen) : ((i + 1) * seqlen)]
            lm_logits = model(batch).logits.double()  # the arithmetic, in float64
            shift_logits = lm_logits[:, :-1, :].contiguous()
            shift_labels = batch[:, 1:]
            loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
            nlls.append(loss * seqlen)
    return float(torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen))), nsamples * (seqlen - 1)


def llama_cpp_reference(model, tokenizer, texts, n_ctx) -> tuple[float, int]:
    """llama.cpp tools/perplexity/perplexity.cpp perplexity() (ppl_stride 0): tokenize with the
    vocabulary's BOS, chunks of n_ctx, each chunk's first token replaced by BOS when add_bos,
    logits kept from position n_ctx/2, each predicting the next token of the chunk."""
    tokens = tokenizer("\n\n".join(texts))["input_ids"]  # common_tokenize(ctx, prompt, true)
    add_bos = tokens[0] == tokenizer.bos_token_id and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert len(tokens) >= 2 * n_ctx  # llama.cpp refuses less
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_chunk):
            start = i * n_ctx
            chunk = list(tokens[start : start + n_ctx])
            if add_bos:
                chunk[0] = tokenizer.bos_token_id
            logits = model(torch.tensor([chunk])).logits[0].double()
            for j in range(first, n_ctx - 1):
                prob = torch.softmax(logits[j], dim=0)[tokens[start + j + 1]]
                nll += -math.log(float(prob))
                count += 1
    return math.exp(nll / count), count


def run_with_preset(folder, data, tokenizer_name: str, preset: str, *overrides: str):
    options = raw_config_from_options([str(folder / tokenizer_name)], str(data), preset=preset)
    out = folder / f"{preset}-{tokenizer_name}"
    config = config_from_options(None, options, [f"output.dir={out}", f"scoring.max_length={L}", *overrides])
    tables = lmeval.run(config, show_progress=False, return_tokens=False, overwrite=True)
    return tables, json.loads((out / "run.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("tokenizer_name", ["bos", "no_bos"])
@pytest.mark.parametrize(
    ("preset", "reference"), [("gptq_wikitext2", gptq_reference), ("llama_cpp", llama_cpp_reference)]
)
def test_preset_equals_its_reference(preset, reference, tokenizer_name, setup):
    folder, model, tokenizers, data = setup
    tables, record = run_with_preset(folder, data, tokenizer_name, preset)
    summary = tables["summary"].iloc[0]
    ppl, count = reference(model, tokenizers[tokenizer_name], TEXTS, L)
    assert summary["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert summary["n_tokens"] == count  # the tokens actually scored
    for key in ("bits_per_byte", "word_ppl", "byte_ppl"):  # undefined for chunks: NaN, with a note
        assert math.isnan(summary[key]), key
    (protocol,) = record["protocol"]["models"].values()
    assert record["config"]["preset"] == record["protocol"]["preset"] == protocol["preset"] == preset
    assert protocol["windows"] == "chunks" and "NaN" in protocol["normalisers"]
    assert protocol["chunk_context"] == (1 if preset == "gptq_wikitext2" else L // 2 + 1)
    assert record["protocol"]["windows"].startswith("disjoint chunks")


def test_the_cli_flag_and_the_config_key_select_a_preset(setup, tmp_path):
    folder, _, _, data = setup
    out = tmp_path / "cli"
    argv = ["run", "--preset", "llama_cpp", "--model", str(folder / "bos"), "--data", str(data), "--out", str(out)]
    assert main([*argv, f"scoring.max_length={L}", "-q"]) == 0
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert record["config"]["preset"] == "llama_cpp" and record["config"]["scoring"]["chunk_context"] == "half"
    yaml_config = write_config(
        tmp_path, f"preset: gptq_wikitext2\nmodels: [{{path: {folder / 'bos'}}}]\ndata: {{path: {data}}}\n"
    )
    config = lmeval.engine.config.load_config(yaml_config)
    assert config.preset == "gptq_wikitext2" and config.scoring.max_length == 2048
    assert (config.scoring.windows, config.scoring.chunk_context, config.scoring.bos) == ("chunks", 1, "tokenizer")


def test_a_preset_sets_protocol_keys_only_and_the_users_keys_win(tmp_path):
    for name, sections in PRESETS.items():
        assert set(sections) <= {"scoring", "data"}, name
        assert not {"path", "name", "split", "text_field"} & set(sections.get("data", {})), name
    raw = {
        "preset": "llama_cpp",
        "models": [{"path": "gpt2"}],
        "data": {"path": "d.jsonl"},
        "scoring": {"max_length": 4096},
    }
    config = build_config(raw, tmp_path)
    assert config.scoring.max_length == 4096 and config.scoring.chunk_bos and config.data.path.endswith("d.jsonl")
    assert build_config({**raw, "preset": None}, tmp_path).scoring.windows == "rolling"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"preset": "gptq"}, "preset: must be one of gptq_wikitext2, llama_cpp, lm_eval_wikitext"),
        ({"preset": "llama_cpp", "scoring": {"stride": 8}}, "stride must be null under scoring.windows: chunks"),
        ({"scoring": {"chunk_bos": True}}, "applies to scoring.windows: chunks only"),
        ({"scoring": {"windows": "chunks", "max_length": 8, "chunk_context": 8}}, "chunk_context: must be in"),
    ],
)
def test_bad_preset_keys_are_named(raw, message, tmp_path):
    base = {"models": [{"path": "gpt2"}], "data": {"path": "d.jsonl"}}
    with pytest.raises(ConfigError, match=message):
        build_config({**base, **raw}, tmp_path)
