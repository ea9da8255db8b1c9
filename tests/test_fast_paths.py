"""The array-built batch layout, and the record of how the reductions ran."""

import json

import numpy as np
import pytest
import torch

import lmeval
from conftest import CORPUS
from lmeval.cli import main
from lmeval.core import kernels
from lmeval.core.windows import make_windows
from lmeval.model.scorer import _pad, _scored_index


def test_padding_and_scored_index_match_a_loop():
    rng = np.random.default_rng(0)
    windows = []
    for doc in range(6):
        ids = rng.integers(1, 50, size=int(rng.integers(1, 30))).tolist()
        windows += make_windows(doc, ids, [0] if doc % 2 else [], max_length=8, stride=int(rng.integers(1, 9)))
    ids, mask = _pad(windows, torch.device("cpu"))
    rows, cols, targets = _scored_index(windows)
    expect_rows, expect_cols, expect_targets = [], [], []
    for r, w in enumerate(windows):
        assert ids[r, : len(w.input_ids)].tolist() == list(w.input_ids)
        assert ids[r, len(w.input_ids) :].eq(0).all() and mask[r].sum() == len(w.input_ids)
        expect_rows += [r] * w.n_scored
        expect_cols += list(range(w.first_scored, len(w.input_ids)))
        expect_targets += list(w.targets)
    assert rows.tolist() == expect_rows and cols.tolist() == expect_cols and targets.tolist() == expect_targets
    # every scored output predicts its target: the next id of the window, or the span's last target
    for r, c, t in zip(rows.tolist(), cols.tolist(), targets.tolist()):
        if c + 1 < mask[r].sum():
            assert ids[r, c + 1] == t


@pytest.fixture(params=["kernel", "eager"])
def cpu_reductions(request, monkeypatch):
    """Each CPU path of the uncompiled reductions: the C kernel, or ATen where it is off."""
    if request.param == "eager":
        monkeypatch.setitem(kernels._STATE, "lib", None)
    elif kernels.library() is None:
        pytest.skip("no reductions kernel on this machine (no C compiler)")
    return request.param


def test_score_texts_says_how_the_reductions_ran(gpt2_pair, cpu_reductions):
    frame = lmeval.score_texts(CORPUS[:2], gpt2_pair, compile=False)
    assert frame.attrs["reductions"] == cpu_reductions


def test_the_kernel_and_aten_reductions_score_alike(gpt2_pair, monkeypatch):
    """Through the scorer, with the calibration grid: the kernel's columns equal ATen's."""
    if kernels.library() is None:
        pytest.skip("no reductions kernel on this machine (no C compiler)")
    temps = (0.7, 0.85, 1.0, 1.15, 1.3)
    kernel = lmeval.score_texts(CORPUS, gpt2_pair, compile=False, temperatures=temps)
    monkeypatch.setitem(kernels._STATE, "lib", None)
    aten = lmeval.score_texts(CORPUS, gpt2_pair, compile=False, temperatures=temps)
    assert (kernel.attrs["reductions"], aten.attrs["reductions"]) == ("kernel", "eager")
    numeric = [c for c in aten.columns if aten[c].dtype.kind == "f"]
    assert {"nll", "entropy", "max_prob"} <= set(numeric)
    for column in numeric:
        np.testing.assert_allclose(kernel[column], aten[column], rtol=2e-5, atol=2e-5, err_msg=column)
    assert (kernel["rank"] == aten["rank"]).all()


def test_run_json_records_how_the_reductions_ran(tmp_path, saved_gpt2, cpu_reductions):
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"models: [{{name: tiny, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        "scoring: {max_length: 16, batch_tokens: 256, compile: false}\noutput: {dir: out, part_chars: 100}\n",
        encoding="utf-8",
    )
    assert main(["run", str(config), "-q"]) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert record["protocol"]["models"]["tiny"]["reductions"] == cpu_reductions


def test_auto_compile_is_decided_once_for_the_whole_run(tmp_path, saved_gpt2, monkeypatch, cpu_reductions):
    """Without the kernel: each 60-character part alone is far below the threshold; the run
    as a whole is above it, so every part runs compiled (the compiled function is the eager
    one here: this tests the decision, and test_losses the compiled numbers). With the
    kernel, ``auto`` never compiles on CPU, at any size."""
    from lmeval.core import losses
    from lmeval.model import scorer

    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    chars = sum(len(t) for t in CORPUS)
    vocab = lmeval.load_model(saved_gpt2).vocab_size
    monkeypatch.setattr(losses, "_compiled_reductions", lambda: losses._reductions)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"models: [{{name: tiny, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        "scoring: {max_length: 16, batch_tokens: 256, compile: auto}\noutput: {dir: out, part_chars: 60}\n",
        encoding="utf-8",
    )
    assert chars > 3 * 60  # several parts
    above = "compiled" if cpu_reductions == "eager" else "kernel"
    for threshold, expected in ((chars / 8 * vocab, above), (chars * vocab, cpu_reductions)):
        monkeypatch.setattr(scorer, "_COMPILE_MIN_LOGITS_CPU", threshold)
        assert main(["run", str(config), "-q", "--overwrite"]) == 0
        record = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
        assert record["protocol"]["models"]["tiny"]["reductions"] == expected  # not "mixed"


def test_prefetched_keeps_order_and_raises_background_errors():
    from lmeval.engine.prefetch import BackgroundWriter, prefetched

    assert list(prefetched([1, 2, 3], lambda x: x * 10)) == [(1, 10), (2, 20), (3, 30)]
    assert list(prefetched([], lambda x: x)) == []
    written = []
    with BackgroundWriter() as writer:
        for i in range(5):
            writer.submit(written.append, i)
    assert written == [0, 1, 2, 3, 4]
    with pytest.raises(ZeroDivisionError), BackgroundWriter() as writer:
        writer.submit(lambda: 1 / 0)
    with pytest.raises(ValueError, match="invalid literal for int"):
        list(prefetched([1, 2], lambda x: int("x")))
