"""`lmeval run --executor ray`: the unfinished parts mapped over a local two-actor Ray cluster
on CPU give the one-process tables exactly (slow, and skipped without ray: `pip install
-e ".[ray]"`, then `pytest -m slow tests/test_ray.py`); the flags and a missing ray are
explained without ray."""

import sys

import pytest
import torch

import lmeval
from conftest import CORPUS
from helpers import assert_same_tables, read_tables, two_model_config
from lmeval.cli import main
from lmeval.engine.config import load_config
from lmeval.errors import ConfigError

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 5 + 1) % len(CORPUS)]}" for i in range(24)]


def test_a_missing_ray_is_explained(tmp_path, saved_gpt2, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert main(["run", str(two_model_config(tmp_path, saved_gpt2, TEXTS)), "-q", "--executor", "ray"]) == 2
    assert "pip install 'lmeval[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ray-actors", "2"], "--ray-actors: must come with --executor ray"),
        (["--executor", "ray", "--shard", "0/2"], "--shard: must not be combined with --executor ray"),
    ],
)
def test_executor_flags_are_checked(tmp_path, saved_gpt2, capsys, flags, message):
    assert main(["run", str(two_model_config(tmp_path, saved_gpt2, TEXTS)), "-q", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a local Ray cluster starting on two cores, two actors importing torch: about 30 s
def test_two_ray_actors_give_the_one_process_tables(tmp_path, saved_gpt2):
    ray = pytest.importorskip("ray")
    from lmeval.engine.executors import run_ray

    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray's CPU actors run one thread each (OMP_NUM_THREADS=1)
    try:
        lmeval.run(str(config), [f"output.dir={tmp_path / 'reference'}"], show_progress=False)
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        tables = run_ray(load_config(config), actors=2, show_progress=False)
        assert ray.is_initialized()  # a cluster the caller started is left running
    finally:
        ray.shutdown()
    assert set(tables["summary"].model) == {"a", "b"}
    out = tmp_path / "out"
    assert not (out / "parts").exists() and (out / "run.json").exists()
    assert_same_tables(read_tables(out), read_tables(tmp_path / "reference"))


def test_ray_actors_must_be_positive():  # checked before ray is imported
    from lmeval.engine.executors import run_ray

    with pytest.raises(ConfigError, match=r"--ray-actors: must be an integer >= 1 \(got 0\)"):
        run_ray(None, actors=0)  # type: ignore[arg-type]
