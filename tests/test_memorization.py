"""Membership scores per document: Min-K% Prob, Min-K%++, zlib ratio, reference ratio and
the extractable suffix, against numpy over the token table and the models' float64 logits;
and a memorization check that can fail: a tiny model trained to reproduce some documents
must score them as seen, and held-out ones as not."""

import dataclasses
import json
import math
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lmeval
from conftest import CORPUS, build_model
from lmeval.analyses import analyses_for
from lmeval.core import memorization as mem
from lmeval.engine.config import load_config
from lmeval.engine.run import _identity as identity_of


def _identity(config, corpus):
    return identity_of(config, corpus, analyses_for(config))


KS = (10, 20, 50)


def lowest_k_mean(values: np.ndarray, k: float) -> float:
    """The papers' Min-K%: sort, keep the first int(n * k / 100) (here at least one), average."""
    take = max(1, int(len(values) * k / 100 + 1e-9))
    return float(np.sort(values)[:take].mean())


def suffix_length(hits) -> int:
    n = 0
    for hit in reversed(list(hits)):
        if not hit:
            break
        n += 1
    return n


def write_run(folder, models: dict, docs, analysis: str, scoring: str = "batch_tokens: 256") -> str:
    (folder / "docs.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    entries = ", ".join(f"{{name: {name}, path: {path}}}" for name, path in models.items())
    (folder / "run.yaml").write_text(
        f"models: [{entries}]\ndata: {{path: docs.jsonl, id_field: id}}\nscoring: {{{scoring}}}\n"
        f"output: {{dir: out, part_chars: 120}}\nanalysis: {{{analysis}}}\n",
        encoding="utf-8",
    )
    return str(folder / "run.yaml")


# --------------------------------------------------------------------------------------
# Core functions against brute force
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 10, 12.5, 20, 100])
def test_lowest_share_mean_matches_sorting_each_document(k):
    rng = np.random.default_rng(3)
    lengths = [0, 1, 3, 7, 10, 40, 97]
    doc = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    values = rng.normal(size=len(doc))
    order = rng.permutation(len(doc))  # documents interleaved: the function must not care
    ours = mem.lowest_share_mean(doc[order], values[order], len(lengths), k)
    assert math.isnan(ours[0])
    for i in range(1, len(lengths)):
        assert ours[i] == pytest.approx(lowest_k_mean(values[doc == i], k), rel=1e-12)


def test_extractable_suffix_matches_a_loop():
    rng = np.random.default_rng(4)
    lengths = [0, 1, 5, 12, 30]
    doc = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    position = np.concatenate([np.arange(n) for n in lengths])
    hits = rng.random(len(doc)) < 0.8
    hits[doc == 3] = True  # a whole document reproduced
    order = rng.permutation(len(doc))
    ours = mem.extractable_suffix(doc[order], position[order], hits[order], len(lengths))
    assert ours.tolist() == [suffix_length(hits[doc == i]) for i in range(len(lengths))]
    assert ours[3] == 12


def test_standardized_log_prob_of_a_point_mass_is_zero():
    z = mem.standardized_log_prob(np.array([0.0, 1.0]), np.array([0.0, 2.0]), np.array([0.0, 4.0]))
    assert z.tolist() == [0.0, 0.5]


# --------------------------------------------------------------------------------------
# A run against numpy and float64 logits
# --------------------------------------------------------------------------------------

DOCS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(CORPUS)] + [{"id": "short", "text": "fox"}]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, gpt2_pair):
    model, tokenizer = gpt2_pair
    reference = build_model("gpt2", len(tokenizer), seed=1)
    folder = tmp_path_factory.mktemp("membership")
    for name, m in (("tiny", model), ("ref", reference)):
        m.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    analysis = f"membership: true, reference: ref, mink_k: {list(KS)}"
    config = write_run(
        folder,
        {"tiny": folder / "tiny", "ref": folder / "ref"},
        DOCS,
        analysis,
        scoring="max_length: 8, stride: 4, batch_tokens: 64",
    )
    tables = lmeval.run(config, show_progress=False)
    return folder, tables, {"tiny": model, "ref": reference}, tokenizer


def float64_token_stats(model, tokenizer, tokens: pd.DataFrame) -> pd.DataFrame:
    """Per token, from a float64 log-softmax of the model's logits on exactly the context the
    token table says it saw: its last ``context_len`` ids, BOS first. Tokens whose context
    starts at the same id share one forward (a causal model's output at a place depends on
    nothing after it)."""
    texts = {d["id"]: d["text"] for d in DOCS}
    tokens = tokens.assign(start=tokens.position + 1 - tokens.context_len)
    rows = []
    with torch.no_grad():
        for (doc_id, start), group in tokens.groupby(["doc_id", "start"]):
            ids = [tokenizer.eos_token_id] + tokenizer(texts[doc_id], add_special_tokens=False)["input_ids"]
            assert [ids[p + 1] for p in group.position] == group.token_id.tolist()
            stop = int(group.position.max()) + 1
            log_q = torch.log_softmax(model(torch.tensor([ids[start:stop]])).logits[0].double(), dim=-1)  # (T, V)
            log_q = log_q[torch.tensor((group.position - start).to_numpy())]  # (n, V): the scored places
            q = log_q.exp()
            mean = (q * log_q).sum(-1)
            var = (q * (log_q - mean[:, None]) ** 2).sum(-1)
            log_q_y = log_q.gather(1, torch.tensor(group.token_id.to_numpy())[:, None])[:, 0]
            rows.append(
                pd.DataFrame(
                    {
                        "doc_id": doc_id,
                        "position": group.position.to_numpy(),
                        "log_q_y": log_q_y.numpy(),
                        "z": ((log_q_y - mean) / var.sqrt()).numpy(),
                        "top1": (log_q.argmax(-1).numpy() == group.token_id.to_numpy()),
                    }
                )
            )
    return pd.concat(rows).sort_values(["doc_id", "position"]).reset_index(drop=True)


@pytest.mark.parametrize("name", ["tiny", "ref"])
def test_scores_equal_numpy_and_float64_logits(scored, name):
    folder, _tables, models, tokenizer = scored
    tokens = pd.read_parquet(folder / "out" / "tokens.parquet").query("model == @name")
    documents = pd.read_parquet(folder / "out" / "documents.parquet").query("model == @name").set_index("doc_id")
    exact = float64_token_stats(models[name], tokenizer, tokens)
    assert (tokens.context_len < tokens.position + 1).any()  # windows cut the context somewhere
    for doc_id, group in tokens.groupby("doc_id"):
        row, oracle = documents.loc[doc_id], exact[exact.doc_id == doc_id]
        nll = group["nll"].to_numpy(np.float64)
        for k in KS:
            assert row[f"mink_prob_{k}"] == pytest.approx(lowest_k_mean(-nll, k), rel=1e-12)
            assert row[f"mink_prob_{k}"] == pytest.approx(lowest_k_mean(oracle.log_q_y.to_numpy(), k), abs=1e-5)
            assert row[f"mink_pp_{k}"] == pytest.approx(lowest_k_mean(oracle.z.to_numpy(), k), rel=1e-4, abs=1e-4)
        compressed = len(zlib.compress(next(d["text"] for d in DOCS if d["id"] == doc_id).encode("utf-8")))
        assert row.zlib_bytes == compressed
        assert row.zlib_ratio == pytest.approx(nll.mean() / compressed, rel=1e-12)
        assert row.extractable_suffix == suffix_length(group.sort_values("position").is_top1)
        assert row.extractable_suffix == suffix_length(oracle.top1)
    assert documents.loc["short", "n_tokens"] <= 2  # its k% is one token, never none


def test_reference_ratio_equals_numpy(scored):
    folder, tables, _, _ = scored
    tokens = pd.read_parquet(folder / "out" / "tokens.parquet")
    sums = tokens.assign(nll=tokens.nll.astype(np.float64)).groupby(["model", "doc_id"]).nll.sum()
    n_bytes = {d["id"]: len(d["text"].encode("utf-8")) for d in DOCS}
    documents = tables["documents"]
    for row in documents.itertuples():
        expected = (sums[row.model, row.doc_id] / n_bytes[row.doc_id]) / (sums["ref", row.doc_id] / n_bytes[row.doc_id])
        assert row.ref_ratio == pytest.approx(expected, rel=1e-12)
    assert (documents.loc[documents.model == "ref", "ref_ratio"] == 1.0).all()


def test_documents_schema_types_the_new_columns(scored):
    folder, _, _, _ = scored
    schema = pq.read_schema(folder / "out" / "documents.parquet")
    assert schema.field("doc_id").type == pa.string()
    for k in KS:
        assert schema.field(f"mink_prob_{k}").type == pa.float64()
        assert schema.field(f"mink_pp_{k}").type == pa.float64()
    assert schema.field("zlib_ratio").type == schema.field("ref_ratio").type == pa.float64()
    assert schema.field("extractable_suffix").type == schema.field("zlib_bytes").type == pa.int64()
    assert lmeval.engine.schemas.read_table(folder / "out" / "documents.parquet").doc_id.map(type).eq(str).all()


def test_membership_is_off_by_default_and_part_of_the_resume_identity(scored, tmp_path):
    folder, _tables, _, _ = scored
    config = write_run(tmp_path, {"tiny": folder / "tiny"}, DOCS, "positions: false")
    documents = lmeval.run(config, show_progress=False)["documents"]
    assert not [c for c in documents.columns if c.startswith(("mink", "zlib", "extractable", "ref_"))]
    plain = load_config(config)
    on = dataclasses.replace(plain, analysis=dataclasses.replace(plain.analysis, membership=True))
    corpus = lmeval.engine.data.load_documents(plain.data)
    assert "membership" not in _identity(plain, corpus)["config"]  # earlier runs' parts stay resumable
    assert _identity(plain, corpus) != _identity(on, corpus)  # parts without var_logq are not reused


# --------------------------------------------------------------------------------------
# The memorization check
# --------------------------------------------------------------------------------------

MEMBERS = [
    "The lazy dog sleeps by the warm fire every winter night.",
    "Seven brown foxes crossed the frozen river before dawn.",
    "A model that memorizes its data repeats it word for word.",
    "Numbers like 2.71828 hide inside many old formulas.",
]
HELD_OUT = [
    "The quick cat jumps over the sleeping owner at noon.",
    "Entropy measures the surprise of a distribution in nats.",
    "Old bridges creak when the heavy trucks roll across them.",
    "Perplexity rises when the text drifts far from the training set.",
]


def train_to_reproduce(tokenizer, texts, max_steps=400):
    """A tiny GPT-2 trained on ``texts`` until teacher-forced argmax reproduces every token
    but each text's first (which BOS alone cannot tell apart); fails if it never does."""
    model = build_model("gpt2", len(tokenizer), seed=2).train()
    ids = [[tokenizer.eos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    x = torch.zeros((len(ids), width), dtype=torch.long)
    y = torch.full((len(ids), width), -100)
    for r, row in enumerate(ids):
        x[r, : len(row)] = torch.tensor(row)
        y[r, : len(row) - 1] = torch.tensor(row[1:])
    graded = y.clone()
    graded[:, 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        for step in range(max_steps):
            logits = model(x).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 9 and bool(((logits.argmax(-1) == y) | (graded == -100)).all()):
                break
        else:
            pytest.fail(f"the tiny model did not learn to reproduce its {len(texts)} documents in {max_steps} steps")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_memorized_documents_score_as_seen(tmp_path, bpe_tokenizer):
    model = train_to_reproduce(bpe_tokenizer, MEMBERS)
    model.save_pretrained(tmp_path / "m")
    bpe_tokenizer.save_pretrained(tmp_path / "m")
    docs = [{"id": f"member-{i}", "text": t} for i, t in enumerate(MEMBERS)]
    docs += [{"id": f"held-{i}", "text": t} for i, t in enumerate(HELD_OUT)]
    tables = lmeval.run(write_run(tmp_path, {"trained": tmp_path / "m"}, docs, "membership: true"), show_progress=False)
    documents = tables["documents"].set_index("doc_id")
    seen, unseen = documents.loc[[d["id"] for d in docs[:4]]], documents.loc[[d["id"] for d in docs[4:]]]
    for k in ("10", "20"):
        assert seen[f"mink_pp_{k}"].min() > unseen[f"mink_pp_{k}"].max(), k
        assert seen[f"mink_prob_{k}"].min() > unseen[f"mink_prob_{k}"].max(), k
    assert seen.zlib_ratio.max() < unseen.zlib_ratio.min()
    assert seen.extractable_suffix.min() > unseen.extractable_suffix.max()
    assert (seen.extractable_suffix >= seen.n_tokens - 1).all()  # all but the first token come back
    tokens = tables["tokens"]
    for doc_id, group in tokens.groupby("doc_id"):
        assert documents.loc[doc_id, "extractable_suffix"] == suffix_length(group.sort_values("position").is_top1)
