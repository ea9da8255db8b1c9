"""`LmevalCallback` inside a real transformers `Trainer` on CPU: the values it logs equal an
independent computation from `score_texts` at that step, training after an evaluation is
bit-for-bit the training without it, and each step's run folder is an `lmeval run`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from conftest import build_model
from helpers import HELDOUT, make_trainer
from helpers import callback_oracle as oracle
from lmeval.engine.config import build_config
from lmeval.errors import ConfigError, DataError, ModelError
from lmeval.integrations.in_loop import InLoopEvaluator, preserved_rng

transformers = pytest.importorskip("transformers")
from lmeval.integrations.transformers import LmevalCallback  # noqa: E402

METRICS = ("ppl", "bits_per_token", "bits_per_byte", "ece")


class Recorder(transformers.TrainerCallback):
    """What loggers see (on_log), gradients before each optimizer step, and an oracle at each
    evaluation (it runs after LmevalCallback, on the same model at the same step)."""

    def __init__(self, tokenizer, perturb: bool = False):
        self.tokenizer, self.perturb = tokenizer, perturb
        self.logs, self.grads, self.expected, self.training_after = [], [], {}, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.training_after.append(model.training)
        if self.perturb:  # a callback that draws from torch's generator, as an unguarded scorer would
            torch.rand(1)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.expected[state.global_step] = oracle(model, self.tokenizer)


def test_logged_values_equal_score_texts_at_that_step(tmp_path, bpe_tokenizer):
    trainer = make_trainer(tmp_path, bpe_tokenizer, evaluate_every=2)
    callback = LmevalCallback(HELDOUT, label="heldout", scoring={"max_length": 16}).attach(trainer)
    recorder = Recorder(bpe_tokenizer)
    trainer.add_callback(recorder)  # after LmevalCallback: same model, same step
    trainer.train()
    assert sorted(recorder.expected) == [2, 4]
    history = {e["step"]: e for e in trainer.state.log_history if "lmeval/heldout/ppl" in e}
    seen = [log for log in recorder.logs if "lmeval/heldout/ppl" in log]  # what W&B / TensorBoard receive
    assert sorted(history) == [2, 4] and len(seen) == 2
    for (step, expected), logged in zip(sorted(recorder.expected.items()), seen):
        for metric in METRICS:
            key = f"lmeval/heldout/{metric}"
            assert history[step][key] == pytest.approx(expected[metric], rel=1e-6, abs=1e-9), (step, metric)
            assert logged[key] == history[step][key]
    # Training moved the model between the two evaluations, so the check is not vacuous.
    assert history[4]["lmeval/heldout/ppl"] != history[2]["lmeval/heldout/ppl"]
    assert all(recorder.training_after)  # the model went back to train mode
    # trainer.evaluate() returns them too (so metric_for_best_model can name them).
    metrics = trainer.evaluate()
    assert metrics["eval_lmeval/heldout/ppl"] == pytest.approx(oracle(trainer.model, bpe_tokenizer)["ppl"], rel=1e-6)
    assert callback.history[4] == {f"lmeval/heldout/{m}": history[4][f"lmeval/heldout/{m}"] for m in METRICS}


def train_and_record(tmp_path, tokenizer, with_callback: bool, perturb: bool = False):
    trainer = make_trainer(tmp_path, tokenizer)
    if with_callback:  # scores after every optimizer step, mid-training
        LmevalCallback(HELDOUT, scoring={"max_length": 16}, every_n_steps=1).attach(trainer)
    recorder = Recorder(tokenizer, perturb=perturb)
    trainer.add_callback(recorder)
    trainer.train()
    return recorder, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_training_continues_with_identical_gradients(tmp_path, bpe_tokenizer):
    plain, plain_weights = train_and_record(tmp_path / "a", bpe_tokenizer, with_callback=False)
    scored, scored_weights = train_and_record(tmp_path / "b", bpe_tokenizer, with_callback=True)
    assert len(plain.grads) == len(scored.grads) == 4
    for step, (a, b) in enumerate(zip(plain.grads, scored.grads), start=1):
        assert torch.equal(a, b), f"gradients differ at step {step}"
    assert torch.equal(plain_weights, scored_weights)
    assert all(scored.training_after)
    assert sum("lmeval/texts/ppl" in log for log in scored.logs) == 4
    # Control: one stray draw from torch's generator after step 1 changes the dropout masks,
    # so the equality above is evidence that scoring consumed none.
    perturbed, _ = train_and_record(tmp_path / "c", bpe_tokenizer, with_callback=False, perturb=True)
    assert torch.equal(perturbed.grads[0], plain.grads[0])
    assert not torch.equal(perturbed.grads[1], plain.grads[1])


def test_step_run_dirs_are_lmeval_runs_that_compare_reads(tmp_path, bpe_tokenizer):
    data = tmp_path / "heldout.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"h{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(HELDOUT)),
        encoding="utf-8",
    )
    out = tmp_path / "steps"
    evaluator = InLoopEvaluator(
        {"path": str(data), "id_field": "id"}, scoring={"max_length": 16, "stride": 8}, out_dir=out, per_token=True
    )
    models = {
        2: build_model("gpt2", len(bpe_tokenizer), seed=2).train(),
        4: build_model("gpt2", len(bpe_tokenizer), seed=4),
    }
    rows = {step: evaluator.evaluate(model, bpe_tokenizer, step) for step, model in models.items()}
    assert models[2].training and not models[4].training  # each model keeps its own mode
    assert sorted(p.name for p in out.iterdir()) == ["step-2", "step-4"]
    for step in (2, 4):
        summary = pd.read_csv(out / f"step-{step}" / "summary.csv").iloc[0]
        assert summary.model == f"step-{step}" and summary.ppl == pytest.approx(rows[step]["ppl"], rel=1e-12)
        assert not (out / f"step-{step}" / "parts").exists()
    frames = lmeval.compare_runs([out / "step-2", out / "step-4"])
    assert set(frames["compare"].metric) >= {"bits_per_token", "bits_per_byte"}
    # A step's folder is what `lmeval run` writes for that checkpoint saved to disk.
    saved = tmp_path / "saved"
    models[4].save_pretrained(saved)
    bpe_tokenizer.save_pretrained(saved)
    config = {
        "models": [{"path": str(saved), "name": "saved"}],
        "data": {"path": str(data), "id_field": "id"},
        "scoring": {"max_length": 16, "stride": 8},
        "output": {"dir": str(tmp_path / "run")},
    }
    tables = lmeval.run(build_config(config, tmp_path), show_progress=False)
    step = pd.read_csv(out / "step-4" / "summary.csv").iloc[0]
    for column in ("ppl", "bits_per_byte", "word_ppl", "ppl_doc_mean", "ece", "brier", "n_tokens"):
        assert step[column] == pytest.approx(tables["summary"].iloc[0][column], rel=1e-6), column
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "step-4" / "tokens.parquet").drop(columns="model"),
        tables["tokens"].drop(columns="model"),
        rtol=1e-5,
    )
    record = json.loads((out / "step-4" / "run.json").read_text())
    assert record["protocol"]["models"]["step-4"] == tables["run"]["protocol"]["models"]["saved"]


def test_preserved_rng_restores_every_generator():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with preserved_rng():
        torch.rand(3), np.random.rand(3), random.random()
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    untouched = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], untouched[0]) and np.array_equal(after[1], untouched[1]) and after[2] == untouched[2]


def test_unattached_callback_still_records_in_log_history(tmp_path, bpe_tokenizer, caplog):
    trainer = make_trainer(tmp_path, bpe_tokenizer, max_steps=1)
    trainer.add_callback(LmevalCallback(HELDOUT, label="dev", scoring={"max_length": 16}, every_n_steps=1))
    trainer.train()
    assert any("lmeval/dev/bits_per_byte" in e for e in trainer.state.log_history)
    assert "attach(trainer)" in caplog.text


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"label": "held out"}, ConfigError, "label: must be"),
        ({"every_n_steps": 0}, ConfigError, "every_n_steps: must be an integer >= 1"),
        ({"scoring": {"strid": 8}}, ConfigError, "Did you mean 'stride'?"),
        ({"scoring": {"max_length": 8, "stride": 9}}, ConfigError, "scoring.stride: must be in [1, max_length]"),
        ({"metrics": ["perplexity"]}, ConfigError, "metrics: must be a non-empty list of ppl"),
        ({"calibration": {"bins": 0}}, ConfigError, "bins"),
    ],
)
def test_bad_options_are_named(kwargs, error, words):
    with pytest.raises(error, match=None) as caught:
        LmevalCallback(HELDOUT, **kwargs)
    assert words in str(caught.value)


def test_blank_texts_and_sharded_models_are_refused(tmp_path, bpe_tokenizer):
    with pytest.raises(DataError, match="at least one non-empty text"):
        LmevalCallback(["  ", ""])
    callback = LmevalCallback(HELDOUT)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    args.fsdp = "full_shard"  # as TrainingArguments(fsdp=...) would set it
    with pytest.raises(ModelError, match="must not be sharded"):
        callback.on_train_begin(args, None, None, model=None)
    args.fsdp = None
    with pytest.raises(ModelError, match="a tokenizer must be known"):
        callback.on_train_begin(args, None, None, model=None, processing_class=None)


DDP_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch, transformers
from conftest import train_bpe
from helpers import HELDOUT, make_trainer, callback_oracle as oracle
from lmeval.integrations.transformers import LmevalCallback

rank = int(os.environ["RANK"])
out = Path({out!r})
tokenizer = train_bpe(out)  # each rank trains the same tokenizer from the same text
trainer = make_trainer(out / f"rank{{rank}}", tokenizer, max_steps=2, ddp_backend="gloo")
LmevalCallback(HELDOUT, label="heldout", scoring={{"max_length": 16}}, every_n_steps=2).attach(trainer)
trainer.train()
logged = [e for e in trainer.state.log_history if "lmeval/heldout/ppl" in e]
result = {{"logged": logged, "world": trainer.args.world_size}}
if rank == 0:
    result["oracle"] = oracle(trainer.model, tokenizer)
(out / f"rank{{rank}}.json").write_text(json.dumps(result))
"""


@pytest.mark.slow
def test_ddp_rank0_scores_and_every_rank_logs_the_same(tmp_path):
    """Under torchrun (2 CPU ranks, gloo) rank 0 scores; both ranks log its values."""
    from helpers import child_env, free_port

    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=tests, out=str(tmp_path)), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
    ]
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(Path(tests).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["logged"] and ranks[0]["logged"] == ranks[1]["logged"]
    for metric in METRICS:
        assert ranks[0]["logged"][-1][f"lmeval/heldout/{metric}"] == pytest.approx(ranks[0]["oracle"][metric], rel=1e-6)
