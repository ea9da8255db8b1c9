"""Per-group evaluation (data.group_by, issue 29): groups.csv, the named averages over groups,
per-group comparison and divergence, and the Paloma presets.

Every number is checked against a float64 oracle computed here from the run's own per-document
sums (documents.parquet), formula by formula, at 1e-12 relative; the intervals against the
documented stratified draw; the presets against re-implementations of OLMo-Eval's and
lm-evaluation-harness's arithmetic, and the paloma preset's windows against catwalk's
(lm-eval's get_rolling_token_windows + make_disjoint_window, EOS prefix) on the tiny model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from lmeval.analyses import compare as cmp
from lmeval.analyses.plots import plot_groups
from lmeval.engine.config import DataConfig, build_config, load_config
from lmeval.engine.data import load_documents
from lmeval.errors import ConfigError, DataError
from lmeval.producers.text import resolve_prefix

PACKAGE = Path(lmeval.__file__).resolve().parent
LN2 = math.log(2)
LEVELS = ["source", "domain", "topic"]
RTOL = 1e-12
SENTENCES = [
    "In the beginning was the word, and the word was with the model.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps on.",
    "Perplexity is the exponential of the average negative log-likelihood.",
    "Cross-entropy equals entropy plus the Kullback-Leibler divergence.",
    "Naïve café owners serve crème brûlée — 猫 and 犬 like it 😀.",
    "Numbers: 3.14159, 2.71828 and 1.41421 appear in many formulas.",
]
# (source, domain, topic): documents, sentences per document. Skewed: one topic holds a third
# of the documents, three hold one or two, and law's documents are four times as long.
SPEC = {
    ("law", "civil", "contracts"): (12, 4),
    ("law", "civil", "torts"): (3, 4),
    ("law", "penal", "theft"): (2, 4),
    ("prophets", "daniel", "visions"): (14, 1),
    ("prophets", "amos", "oracles"): (1, 1),
    ("web", "blog", "cooking"): (4, 2),
}
WEIGHTS = {"law": 1.0, "prophets": 2.0, "web": 0.5}


def mixture() -> list[dict]:
    """The synthetic three-level corpus, interleaved (groups are not contiguous in the file)."""
    rng = np.random.default_rng(0)
    rows = []
    for (source, domain, topic), (n, length) in SPEC.items():
        for _ in range(n):
            text = " ".join(SENTENCES[j] for j in rng.integers(0, len(SENTENCES), length))
            rows.append({"text": text, "source": source, "domain": domain, "topic": topic})
    order = rng.permutation(len(rows))
    return [{"id": f"d{i}", **rows[j]} for i, j in enumerate(order)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_models, bpe_tokenizer) -> Path:
    """Two tiny models sharing the BPE tokenizer (GPT-2 and Llama style), saved, and the corpus."""
    root = tmp_path_factory.mktemp("groups")
    for arch in ("gpt2", "llama"):
        tiny_models[arch].save_pretrained(root / arch)
        bpe_tokenizer.save_pretrained(root / arch)
    write_jsonl(root / "mixture.jsonl", mixture())
    return root


def run_config(folder: Path, name: str, data_extra: str = "", divergence: bool = True) -> dict:
    body = f"""
models:
  - {{name: tiny, path: {folder / "gpt2"}}}
  - {{name: other, path: {folder / "llama"}}}
data: {{path: mixture.jsonl, id_field: id{data_extra}}}
scoring: {{max_length: 32, batch_tokens: 2048}}
compare: {{bootstrap: 200, seed: 3, divergence: {str(divergence).lower()}}}
analysis: {{bootstrap: 50}}
output: {{dir: {name}}}
"""
    path = folder / f"{name}.yaml"
    path.write_text(body, encoding="utf-8")
    return lmeval.run(str(path), show_progress=False, return_tokens=False)


@pytest.fixture(scope="module")
def grouped(folder) -> dict:
    weights = ", ".join(f"{k}: {v}" for k, v in WEIGHTS.items())
    return run_config(
        folder, "grouped", f", group_by: [source, domain, topic], group_weights: {{source: {{{weights}}}}}"
    )


@pytest.fixture(scope="module")
def plain(folder) -> dict:
    return run_config(folder, "plain")


# --------------------------------------------------------------------------------------
# The float64 oracle, from per-document sums
# --------------------------------------------------------------------------------------


def labelled(documents: pd.DataFrame, model: str) -> pd.DataFrame:
    """One model's document rows with each level's group, joined with its parents by '/'."""
    meta = pd.DataFrame(mixture()).set_index("id")
    rows = documents[documents["model"] == model].reset_index(drop=True)
    for k, level in enumerate(LEVELS):
        rows[level] = ["/".join(meta.loc[d, LEVELS[: k + 1]]) for d in rows["doc_id"]]
    return rows


def oracle_group(rows: pd.DataFrame) -> dict:
    nll, tokens = math.fsum(rows["nll_sum"]), int(rows["n_tokens"].sum())
    n_bytes, n_words = int(rows["n_bytes"].sum()), int(rows["n_words"].sum())
    return {
        "n_documents": len(rows), "n_tokens": tokens, "n_bytes": n_bytes, "n_words": n_words, "nll_sum": nll,
        "ppl": math.exp(nll / tokens), "bits_per_token": nll / LN2 / tokens, "bits_per_byte": nll / LN2 / n_bytes,
        "word_ppl": math.exp(nll / n_words), "nll_per_token": nll / tokens,
    }  # fmt: skip


def oracle_averages(rows: pd.DataFrame) -> dict:
    """Each named average by its formula, in float64 (math.fsum) from the per-document sums."""
    out = {
        "bits_per_byte_micro": math.fsum(rows["nll_sum"]) / LN2 / rows["n_bytes"].sum(),
        "bits_per_byte_doc_mean": float(np.mean([s / LN2 / b for s, b in zip(rows["nll_sum"], rows["n_bytes"])])),
        "ppl_micro": math.exp(math.fsum(rows["nll_sum"]) / rows["n_tokens"].sum()),
        "ppl_doc_mean": float(np.mean([math.exp(s / t) for s, t in zip(rows["nll_sum"], rows["n_tokens"])])),
    }
    for level in LEVELS:
        groups = {g: oracle_group(r) for g, r in rows.groupby(level)}
        out[f"bits_per_byte_macro_{level}"] = float(np.mean([g["bits_per_byte"] for g in groups.values()]))
        out[f"ppl_macro_{level}"] = math.exp(float(np.mean([g["nll_per_token"] for g in groups.values()])))
    sources = {g: oracle_group(r) for g, r in rows.groupby("source")}
    out["bits_per_byte_macro_weighted_source"] = math.fsum(
        WEIGHTS[g] * sources[g]["bits_per_byte"] for g in sources
    ) / math.fsum(WEIGHTS[g] for g in sources)
    return out


def close(a, b, rtol=RTOL) -> bool:
    return bool(np.isclose(a, b, rtol=rtol, atol=0.0))


# --------------------------------------------------------------------------------------
# groups.csv and the named averages
# --------------------------------------------------------------------------------------


def test_groups_csv_equals_the_oracle(grouped):
    groups, documents = grouped["groups"], grouped["documents"]
    assert list(groups.columns) == [
        "model", "level", "group", "n_documents", "n_tokens", "n_bytes", "n_words", "nll_sum", "ppl",
        "bits_per_token", "bits_per_byte", "word_ppl", "bits_per_byte_ci_low", "bits_per_byte_ci_high",
        "bits_per_byte_macro_children", "note",
    ]  # fmt: skip
    checked = 0
    for model in ("tiny", "other"):
        rows = labelled(documents, model)
        mine = groups[groups["model"] == model]
        assert list(pd.unique(mine["level"])) == LEVELS
        for k, level in enumerate(LEVELS):
            expected = {g: oracle_group(r) for g, r in rows.groupby(level)}
            got = mine[mine["level"] == level].set_index("group")
            assert sorted(got.index) == sorted(expected)
            for name, want in expected.items():
                for column, value in want.items():
                    if column != "nll_per_token":
                        assert close(got.loc[name, column], value), (model, level, name, column)
                        checked += 1
                if k + 1 < len(LEVELS):  # a parent: the unweighted mean of its children's bits per byte
                    children = [oracle_group(r)["bits_per_byte"] for g, r in rows.groupby(LEVELS[k + 1])
                                if g.startswith(name + "/")]  # fmt: skip
                    assert close(got.loc[name, "bits_per_byte_macro_children"], np.mean(children))
                else:
                    assert np.isnan(got.loc[name, "bits_per_byte_macro_children"])
    assert checked == 2 * (3 + 5 + 6) * 9  # 2 models x 14 groups x 9 figures
    # Paloma's naming: a child's group carries its parents.
    assert "prophets/daniel" in set(groups["group"]) and "law/civil/contracts" in set(groups["group"])


def test_named_averages_differ_and_each_equals_its_formula(grouped):
    summary = grouped["summary"].set_index("model")
    for model in ("tiny", "other"):
        expected = oracle_averages(labelled(grouped["documents"], model))
        for name, value in expected.items():
            assert close(summary.loc[model, name], value), (model, name)
        # The field's one word for four numbers: on this skewed mixture they all differ.
        four = [expected[n] for n in ("bits_per_byte_micro", "bits_per_byte_doc_mean", "bits_per_byte_macro_source",
                                      "bits_per_byte_macro_weighted_source")]  # fmt: skip
        # (apart by far more than the 1e-12 each is checked to)
        assert min(abs(a - b) for i, a in enumerate(four) for b in four[i + 1 :]) > 1e-6 * max(four)
        # micro is the pooled figure the summary has always had
        assert close(summary.loc[model, "bits_per_byte_micro"], summary.loc[model, "bits_per_byte"])
        assert close(summary.loc[model, "ppl_micro"], summary.loc[model, "ppl"])
        assert summary.loc[model, "n_skipped_no_group"] == 0


def stratified_oracle(rows: pd.DataFrame, n_resamples: int, seed: int) -> tuple[np.ndarray, list]:
    """(B, G, 2) resampled (nll_sum, n_bytes) per finest group, by the documented draw: groups
    numbered in the order of their labels (top level first), documents ordered by group (corpus
    order within one), position j drawing the document at start_j + i, i from
    default_rng(seed).integers(0, n_j, (B, D)), n_j and start_j its group's size and start."""
    keys = sorted({tuple(r) for r in rows[LEVELS].itertuples(index=False)}, key=lambda t: [p.split("/")[-1] for p in t])
    stratum = np.array([keys.index(tuple(r)) for r in rows[LEVELS].itertuples(index=False)])
    order = np.argsort(stratum, kind="stable")
    counts = np.bincount(stratum, minlength=len(keys))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = stratum[order]
    pick = starts[position] + np.random.default_rng(seed).integers(0, counts[position], size=(n_resamples, len(rows)))
    values = rows[["nll_sum", "n_bytes"]].to_numpy(np.float64)[order][pick]  # (B, D, 2)
    out = np.stack([values[:, position == s].sum(axis=1) for s in range(len(keys))], axis=1)
    return out, keys


def test_intervals_follow_the_documented_stratified_draw(grouped):
    rows = labelled(grouped["documents"], "tiny")
    boot, keys = stratified_oracle(rows, 200, 3)  # compare.bootstrap, compare.seed
    summary = grouped["summary"].set_index("model").loc["tiny"]
    micro = boot[..., 0].sum(axis=1) / LN2 / boot[..., 1].sum(axis=1)
    low, high = np.percentile(micro, [2.5, 97.5])
    assert close(summary["bits_per_byte_micro_ci_low"], low) and close(summary["bits_per_byte_micro_ci_high"], high)
    # A finest group with enough documents: a plain document bootstrap within it.
    groups = grouped["groups"].set_index(["model", "level", "group"])
    s = keys.index(("prophets", "prophets/daniel", "prophets/daniel/visions"))
    within = np.percentile(boot[:, s, 0] / LN2 / boot[:, s, 1], [2.5, 97.5])
    row = groups.loc[("tiny", "topic", "prophets/daniel/visions")]
    assert close(row["bits_per_byte_ci_low"], within[0]) and close(row["bits_per_byte_ci_high"], within[1])
    # Fewer documents than compare.min_documents: no interval, and the note says why.
    small = groups.loc[("tiny", "topic", "prophets/amos/oracles")]
    assert np.isnan(small["bits_per_byte_ci_low"]) and "compare.min_documents" in small["note"]
    assert groups.loc[("tiny", "source", "law"), "note"] == ""


# --------------------------------------------------------------------------------------
# A run without group_by is unchanged; compare.csv and divergence per group
# --------------------------------------------------------------------------------------


def test_group_by_adds_columns_and_files_and_changes_nothing_else(grouped, plain, folder):
    with_groups, without = grouped["summary"], plain["summary"]
    assert list(with_groups.columns[: len(without.columns)]) == list(without.columns)
    shared = [c for c in without.columns if c != "tokens_per_second"]  # timing differs run to run
    pd.testing.assert_frame_equal(with_groups[shared], without[shared])
    new = set(with_groups.columns) - set(without.columns)
    assert {"bits_per_byte_micro", "bits_per_byte_macro_topic", "ppl_macro_domain", "n_skipped_no_group"} <= new
    written = {p.name for p in (folder / "grouped").iterdir()} - {p.name for p in (folder / "plain").iterdir()}
    assert written == {"groups.csv", "groups.png", "divergence_groups.csv"}
    # Without group_by compare.csv keeps its columns exactly; with it, the same rows come first,
    # then the per-group rows, and two columns more.
    header = {
        name: (folder / name / "compare.csv").read_text(encoding="utf-8").splitlines()[0]
        for name in ("plain", "grouped")
    }
    assert header["plain"].split(",") == cmp.COMPARE_COLUMNS + cmp.EXTRA_COLUMNS
    assert header["grouped"] == header["plain"] + ",level,group"
    plain_compare, grouped_compare = plain["compare"], grouped["compare"]
    corpus = grouped_compare[grouped_compare["group"] == ""]
    assert (corpus["level"] == "").all() and len(corpus) == len(plain_compare)
    pd.testing.assert_frame_equal(corpus[plain_compare.columns].reset_index(drop=True), plain_compare)
    assert "group" not in pd.read_csv(folder / "plain" / "summary.csv").columns
    record = json.loads((folder / "grouped" / "run.json").read_text())["groups"]
    assert record["levels"] == LEVELS and record["n_groups"] == {"source": 3, "domain": 5, "topic": 6}


def test_compare_has_paired_rows_per_group(grouped):
    compare, groups = grouped["compare"], grouped["groups"].set_index(["model", "level", "group"])
    rows = compare[(compare["group"] != "") & (compare["metric"] == "bits_per_byte")]
    assert len(rows) == 3 + 5 + 6
    for row in rows.itertuples():
        mine, theirs = groups.loc[("other", row.level, row.group)], groups.loc[("tiny", row.level, row.group)]
        assert close(row.value, mine["bits_per_byte"]) and close(row.baseline_value, theirs["bits_per_byte"])
        assert row.n_documents == mine["n_documents"]
        assert np.isnan(row.ci_low) == (row.n_documents < 10)


def test_divergence_per_group_equals_the_tokens(grouped, folder):
    table = pd.read_csv(folder / "grouped" / "divergence_groups.csv", keep_default_na=False)
    tokens = pd.read_parquet(folder / "grouped" / "divergence.parquet")
    meta = pd.DataFrame(mixture()).set_index("id")
    assert set(table["model"]) == {"other"} and set(table["baseline"]) == {"tiny"}
    for k, level in enumerate(LEVELS):
        path = {d: "/".join(meta.loc[d, LEVELS[: k + 1]]) for d in meta.index}
        for name, of_group in tokens.groupby(tokens["doc_id"].map(path)):
            row = table[(table["level"] == level) & (table["group"] == name)].iloc[0]
            assert row["n_tokens"] == len(of_group)
            assert close(row["kl_mean"], of_group["kl"].astype(np.float64).sum() / len(of_group), 1e-9)
            ratio = (of_group["nll"].astype(np.float64) - of_group["nll_baseline"].astype(np.float64)).mean()
            assert close(row["ln_ppl_ratio"], ratio, 1e-9)


def test_groups_png_is_a_forest_plot_per_level(grouped):
    figure = plot_groups(grouped["groups"], LEVELS, min_documents=10)
    axes = figure.axes
    assert [a.get_title(loc="left").split(":")[0] for a in axes] == LEVELS
    topics = grouped["groups"].query("model == 'tiny' and level == 'topic'").sort_values("bits_per_byte")
    assert [t.get_text() for t in axes[2].get_yticklabels()] == list(topics["group"])  # sorted, lowest first
    many = pd.DataFrame({"model": "m", "level": "x", "group": [f"g{i:02d}" for i in range(50)],
                         "bits_per_byte": np.linspace(1, 2, 50), "bits_per_byte_ci_low": np.nan,
                         "bits_per_byte_ci_high": np.nan, "nll_sum": 1.0, "n_bytes": 1})  # fmt: skip
    axis = plot_groups(many, ["x"]).axes[0]
    assert len(axis.get_yticklabels()) == 40 and "the 10 in the middle not shown" in axis.get_title(loc="left")


# --------------------------------------------------------------------------------------
# Reading the groups: missing values, skips, weights, config errors
# --------------------------------------------------------------------------------------


def test_a_missing_group_is_named_by_file_line_and_column(tmp_path):
    rows = [{"id": "a", "text": "one", "source": "x", "domain": "p"},
            {"id": "b", "text": "two", "source": "x", "domain": "q"},
            {"id": "c", "text": "three", "source": "y", "domain": " "},
            {"id": "d", "text": "four", "source": "y"}]  # fmt: skip
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(DataError, match=r"g\.jsonl: line 3 \(id 'c'\) has no `domain`.*group_missing: skip"):
        load_documents(DataConfig(path=str(path), id_field="id", group_by=["source", "domain"]))
    corpus = load_documents(
        DataConfig(path=str(path), id_field="id", group_by=["source", "domain"], group_missing="skip")
    )
    assert [d.doc_id for d in corpus.documents] == ["a", "b"] and corpus.groups.n_skipped == 2
    assert corpus.groups.names == (("x",), ("x/p", "x/q"))
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"text": "t", "year": 2020}, {"text": "u", "year": 2021}])
    assert load_documents(DataConfig(path=str(numbers), group_by="year")).groups.names == (("2020", "2021"),)
    with pytest.raises(
        DataError, match=r"data\.group_by: 'domain' must be columns of .* Available columns: text, year"
    ):
        load_documents(DataConfig(path=str(numbers), group_by=["year", "domain"]))
    with pytest.raises(DataError, match=r"data\.group_weights\.year: every group .* \(got none for '2021'\)"):
        load_documents(DataConfig(path=str(numbers), group_by="year", group_weights={"year": {2020: 1}}))


def test_group_config_errors_are_reported_together():
    raw = {"models": [{"path": "gpt2"}], "scoring": {"documents": "concatenated"},
           "data": {"path": "x.jsonl", "group_by": ["a", "a"], "group_weights": {"b": {"g": 1}}}}  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        build_config(raw, Path.cwd())
    message = str(caught.value)
    for words in ("data.group_by: each column must appear once", "must be independent with data.group_by",
                  "data.group_weights.b: must name a level"):  # fmt: skip
        assert words in message
    with pytest.raises(ConfigError, match=r"data\.group_weights: needs data\.group_by"):
        build_config(
            {"models": [{"path": "gpt2"}], "data": {"path": "x.jsonl", "group_weights": "documents"}}, Path.cwd()
        )


def test_grouping_is_not_part_of_the_run_identity(folder):
    """Regrouping an interrupted run resumes its parts: how documents are pooled changes no score."""
    from lmeval.analyses import analyses_for
    from lmeval.engine.run import _identity

    data = {"path": str(folder / "mixture.jsonl"), "id_field": "id"}
    identities = []
    for extra in ({}, {"group_by": ["source", "domain"], "group_weights": "documents", "group_missing": "skip"}):
        config = build_config({"models": [{"path": str(folder / "gpt2")}], "data": {**data, **extra}}, folder)
        identities.append(_identity(config, load_documents(config.data), analyses_for(config)))
    assert identities[0] == identities[1]


def test_bos_eos_is_the_eos_even_with_a_bos():
    class Tokenizer:
        bos_token_id, eos_token_id = 1, 2

        def __len__(self):
            return 10

    assert resolve_prefix(Tokenizer(), "eos") == (2,) and resolve_prefix(Tokenizer(), "auto") == (1,)


# --------------------------------------------------------------------------------------
# The presets: OLMo-Eval / catwalk (paloma) and lm-evaluation-harness (lm_eval_paloma)
# --------------------------------------------------------------------------------------


def paloma_corpus() -> list[dict]:
    """Two sources, one split into skewed subdomains; a record of the second lacks one."""
    rng = np.random.default_rng(1)
    spec = {("c4_100_domains", "www.a.com"): 9, ("c4_100_domains", "b.org"): 3, ("c4_100_domains", "c.net"): 1,
            ("dolma", "books"): 4, ("dolma", "wiki"): 6}  # fmt: skip
    rows = []
    for (source, subdomain), n in spec.items():
        for _ in range(n):  # long enough for several windows of 32 tokens
            text = " ".join(SENTENCES[j] for j in rng.integers(0, len(SENTENCES), int(rng.integers(1, 6))))
            rows.append({"text": text, "source": source, "subdomain": subdomain})
    return rows


def run_preset(name: str, folder: Path, rows: list[dict], *overrides: str) -> tuple[dict, object]:
    data = write_jsonl(folder / f"{name}.jsonl", rows)
    config = load_config(PACKAGE / "configs" / f"{name}.yaml", [
        f"models.0.path={folder / 'gpt2'}", f"data.path={data}", "data.name=null", "data.split=train",
        "scoring.max_length=32", f"output.dir={folder / name}", "compare.bootstrap=50", "analysis.positions=false",
        *overrides,
    ])  # fmt: skip
    return lmeval.run(config, show_progress=False, return_tokens=False), config


def catwalk_sum_logits(model, tokenizer, text: str, max_seq_len: int) -> float:
    """catwalk's predict_perplexity for one document: lm-eval's get_rolling_token_windows with
    prefix_token = EOS and context_len = 1, each made disjoint, continuation log-probs summed."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    windows = []
    first = min(max_seq_len, len(tokens))
    windows.append(([tokenizer.eos_token_id] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        length = min(len(tokens) - predicted, max_seq_len)
        end = predicted + length
        windows.append((tokens[end - max_seq_len - 1 : end - 1], tokens[end - length : end]))
        predicted += length
    total = 0.0
    for context, continuation in windows:
        context = context[: len(context) - (len(continuation) - 1)]  # make_disjoint_window
        ids = (context + continuation)[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)[-len(continuation) :]
        total += float(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum())
    return total


def test_paloma_preset_reproduces_olmo_eval(folder, tiny_models, bpe_tokenizer):
    shipped = load_config(PACKAGE / "configs" / "paloma.yaml")
    assert (shipped.scoring.max_length, shipped.scoring.stride, shipped.scoring.bos) == (2048, 2048, "eos")
    assert shipped.data.group_by == ("source", "subdomain") and shipped.scoring.documents == "independent"
    rows = paloma_corpus()
    tables, _ = run_preset("paloma", folder, rows, "scoring.stride=32")
    documents = tables["documents"].set_index("doc_id")
    # catwalk's windows on the tiny model: the per-document sums lmeval scored (float32 logits).
    model = tiny_models["gpt2"]
    for i in (0, 5, 13):
        reference = catwalk_sum_logits(model, bpe_tokenizer, rows[i]["text"], 32)
        assert documents.loc[str(i), "nll_sum"] == pytest.approx(-reference, rel=2e-5)
    # OLMo-Eval's ProcessOutputs from the same per-document sums, summed in file order.
    sum_logits, num_bytes, num_tokens = {}, {}, {}
    for i, row in enumerate(rows):
        key = (row["source"], row["subdomain"])
        sum_logits[key] = sum_logits.get(key, 0) + -documents.loc[str(i), "nll_sum"]
        num_bytes[key] = num_bytes.get(key, 0) + len(row["text"].encode("utf-8"))
        num_tokens[key] = num_tokens.get(key, 0) + int(documents.loc[str(i), "n_tokens"])
    groups = tables["groups"].set_index(["level", "group"])
    for (source, subdomain), logits in sum_logits.items():
        row = groups.loc[("subdomain", f"{source}/{subdomain}")]
        assert close(row["bits_per_byte"], -logits / (num_bytes[(source, subdomain)] * math.log(2)))
        assert close(row["ppl"], math.exp(-logits / max(num_tokens[(source, subdomain)], 1)))  # ppl_token
    for source in {s for s, _ in sum_logits}:
        per_subdomain = [-v / (num_bytes[k] * math.log(2)) for k, v in sum_logits.items() if k[0] == source]
        assert close(groups.loc[("source", source), "bits_per_byte_macro_children"], np.mean(per_subdomain))
        pooled = -sum(v for k, v in sum_logits.items() if k[0] == source) / (
            sum(b for k, b in num_bytes.items() if k[0] == source) * math.log(2))  # fmt: skip
        assert close(groups.loc[("source", source), "bits_per_byte"], pooled)  # catwalk's task-level metric


def test_lm_eval_paloma_preset_reproduces_lm_eval(folder):
    shipped = load_config(PACKAGE / "configs" / "lm_eval_paloma.yaml")
    assert (shipped.scoring.max_length, shipped.scoring.stride, shipped.scoring.bos) == (None, None, "auto")
    assert shipped.data.group_by == ("source",) and shipped.data.group_weights == "documents"
    rows = paloma_corpus() + [{"text": "A record without its source.", "subdomain": "x"}]
    tables, _ = run_preset("lm_eval_paloma", folder, rows, "data.group_missing=skip")
    documents = tables["documents"].set_index("doc_id")
    # lm-eval's process_results per document, then per task the weighted_mean aggregations.
    items: dict = {}
    for i, row in enumerate(rows[:-1]):
        loglikelihood = -documents.loc[str(i), "nll_sum"]
        words, n_bytes = len(re.split(r"\s+", row["text"])), len(row["text"].encode("utf-8"))
        items.setdefault(row["source"], []).append((loglikelihood, words, n_bytes))
    groups = tables["groups"].set_index("group")
    metrics, sizes = {}, {}
    for task, values in items.items():
        ll, words, n_bytes = (sum(v[j] for v in values) for j in range(3))
        metrics[task] = {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / n_bytes),
                         "bits_per_byte": -ll / n_bytes / math.log(2)}  # fmt: skip
        sizes[task] = len(values)
        assert close(groups.loc[task, "word_ppl"], metrics[task]["word_perplexity"])
        assert close(2 ** groups.loc[task, "bits_per_byte"], metrics[task]["byte_perplexity"])
        assert close(groups.loc[task, "bits_per_byte"], metrics[task]["bits_per_byte"])
        assert groups.loc[task, "n_documents"] == sizes[task]
    # aggregate_subtask_metrics(weight_by_size=True): sum(metric * size) / sum(size)
    group_mean = sum(metrics[t]["bits_per_byte"] * sizes[t] for t in metrics) / sum(sizes.values())
    summary = tables["summary"].iloc[0]
    assert close(summary["bits_per_byte_macro_weighted_source"], group_mean)
    assert summary["n_skipped_no_group"] == 1 and summary["n_documents"] == len(rows) - 1
