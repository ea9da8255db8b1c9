"""Data-parallel `lmeval run` under torchrun (CPU, gloo, loopback): the same tables as one
process, resumable with a different number of ranks, balanced by characters."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from conftest import CORPUS
from helpers import (
    TEARDOWN_ABORT,
    assert_same_tables,
    child_env,
    free_port,
    read_tables,
    run_ranks,
    torchrun_command,
    write_config,
    write_jsonl,
)
from lmeval.engine.distributed import Launch, LaunchError, assign, launch_from_env, launched
from lmeval.engine.parts import plan_groups
from lmeval.errors import OutputError

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 5 + 1) % len(CORPUS)]}" for i in range(24)]


# gloo can rarely abort a worker while it tears down (seen once in about 40 launches here),
# after the job's results are complete. That is gloo's, not lmeval's: such a run is redone
# once with --overwrite, and the tables it writes are what the test checks.


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc (Linux)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if Path(f"/proc/{pid}").exists() else []
    return [pid] + [p for child in children for p in process_tree(int(child))]


def wait_until_dead(pids: list[int], timeout: float = 10) -> None:
    """Wait until killed processes are gone (or zombies), so none can still write a part."""
    deadline = time.time() + timeout
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        while time.time() < deadline and stat.exists():
            try:
                if stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
            except OSError:
                break
            time.sleep(0.01)


def single_process(config, out_dir) -> dict:
    """The reference: one process, one thread (as torchrun's workers), in this interpreter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lmeval.run(str(config), [f"output.dir={out_dir}"], show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return read_tables(out_dir)


def make_workspace(folder, model, texts, part_chars: int, models=("a",)) -> object:
    write_jsonl(folder / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    listed = ", ".join(f"{{name: {name}, path: {model}}}" for name in models)
    return write_config(
        folder,
        f"""
models: [{listed}]
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 64}}
output: {{dir: out, part_chars: {part_chars}}}
""",
    )


def assert_close_to(tables, reference):
    """Same documents and tokens; nll per token within 1e-6, summary within 1e-9 relative."""
    key = ["model", "doc_id", "position"]
    joined = reference["tokens"].merge(tables["tokens"], on=key, how="outer", suffixes=("_ref", ""), indicator=True)
    assert (joined["_merge"] == "both").all(), joined[joined["_merge"] != "both"][key]
    np.testing.assert_allclose(joined["nll"], joined["nll_ref"], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(
        tables["documents"][["model", "doc_id", "n_tokens", "n_bytes", "n_words"]],
        reference["documents"][["model", "doc_id", "n_tokens", "n_bytes", "n_words"]],
    )
    ours, ref = tables["summary"], reference["summary"]
    assert list(ours.columns) == list(ref.columns)
    numeric = ref.select_dtypes("number").columns
    np.testing.assert_allclose(ours[numeric].to_numpy(float), ref[numeric].to_numpy(float), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------
# assign: longest-processing-time greedy by weight
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "world_size", "expected"),
    [
        ([1, 20, 1], 2, [[1], [0, 2]]),  # the huge group alone
        ([5, 5, 5, 5], 2, [[0, 2], [1, 3]]),  # ties: lower index to lower rank, alternating by load
        ([3, 3, 2, 2, 2], 2, [[0, 2, 4], [1, 3]]),  # LPT: 7 vs 5
        ([4, 1], 5, [[0], [1], [], [], []]),  # more ranks than groups
        ([7, 2, 9], 1, [[0, 1, 2]]),
        ([], 3, [[], [], []]),
    ],
)
def test_assign_balances_by_weight(weights, world_size, expected):
    assert assign([[i] for i in range(len(weights))], weights, world_size) == expected


def test_assign_gives_every_group_once_deterministically():
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 1000, size=97).tolist()
    groups = [[i] for i in range(len(weights))]
    shares = assign(groups, weights, 8)
    assert sorted(i for share in shares for i in share) == list(range(len(weights)))
    assert shares == assign(groups, list(weights), 8)
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(weights)  # LPT's bound on the spread
    by_count = [sum(weights[i::8]) for i in range(8)]  # round robin, for contrast
    assert max(loads) <= max(by_count)


@pytest.mark.parametrize(("world_size", "weights"), [(0, [1]), (2, [1, 2])])
def test_assign_rejects_misuse(world_size, weights):
    with pytest.raises(ValueError, match="assign"):
        assign([[0]], weights, world_size)


# --------------------------------------------------------------------------------------
# The launcher's environment
# --------------------------------------------------------------------------------------


def test_no_launcher_is_one_process_and_calls_are_local():
    assert launch_from_env({}) == Launch() == launch_from_env({"WORLD_SIZE": "1"})
    with launched({}) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
        assert ctx.call(lambda: 7) == 7 and ctx.broadcast("x") == "x" and ctx.gather(3) == [3]
        with pytest.raises(OutputError):  # raised as is, not wrapped
            ctx.call(lambda: (_ for _ in ()).throw(OutputError("output.dir: boom")), main_only=True)
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_from_env(env) == Launch(rank=2, world_size=4, local_rank=0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE: must be an integer >= 1"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK: must be set"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK: must be below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR, MASTER_PORT: must be set"),
    ],
)
def test_a_broken_launch_environment_is_explained(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_from_env(env)


# --------------------------------------------------------------------------------------
# torchrun, two ranks on CPU
# --------------------------------------------------------------------------------------


def test_two_ranks_give_the_single_process_tables(tmp_path, saved_gpt2):
    config = make_workspace(tmp_path, saved_gpt2, TEXTS, part_chars=300, models=("a", "b"))
    assert len(plan_groups([len(t) for t in TEXTS], 300)) >= 6  # several parts per rank
    reference = single_process(config, tmp_path / "reference")
    done = run_ranks(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1, done.stdout  # rank 0 alone prints the summary
    assert not (tmp_path / "out" / "parts").exists()
    assert_close_to(read_tables(tmp_path / "out"), reference)


def test_an_output_dir_refusal_on_rank_0_stops_every_rank(tmp_path, saved_gpt2):
    config = make_workspace(tmp_path, saved_gpt2, TEXTS[:4], part_chars=100)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.csv").write_text("model\nold\n")
    started = time.time()
    done = run_ranks(config, timeout=90)
    assert done.returncode != 0
    assert done.stderr.count("lmeval: error: output.dir:") == 2, done.stderr[-3000:]  # each rank says why
    assert "already holds results" in done.stderr and time.time() - started < 90


def test_kill_two_ranks_then_resume_with_one_gives_identical_tables(tmp_path, saved_gpt2):
    config = make_workspace(tmp_path, saved_gpt2, TEXTS, part_chars=60)
    reference = single_process(config, tmp_path / "reference")
    proc = subprocess.Popen(
        torchrun_command(config),
        env=child_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "out" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.rglob("*.parquet")) and proc.poll() is None:
        time.sleep(0.01)
    tree = process_tree(proc.pid)  # torchrun starts each rank in a session of its own
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):  # one that exited since it was listed
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    wait_until_dead(tree[1:])
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n_parts = len(list(parts.rglob("*.parquet")))
    assert 1 <= n_parts < len(plan_groups([len(t) for t in TEXTS], 60))
    assert not (tmp_path / "out" / "run.json").exists()
    command = [sys.executable, "-m", "lmeval", "run", str(config), "-q"]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_tables(read_tables(tmp_path / "out"), reference)


def test_an_uneven_shard_merges_to_the_single_process_tables(tmp_path, saved_gpt2):
    texts = [CORPUS[0], " ".join(CORPUS * 4)[: 20 * len(CORPUS[0])], CORPUS[1]]
    config = make_workspace(tmp_path, saved_gpt2, texts, part_chars=1)
    groups = plan_groups([len(t) for t in texts], 1)
    assert groups == [[0], [1], [2]]
    assert sorted(assign(groups, [len(t) for t in texts], 2)) == [[0, 2], [1]]  # the huge one alone
    reference = single_process(config, tmp_path / "reference")
    done = run_ranks(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_to(read_tables(tmp_path / "out"), reference)
    assert_same_tables(read_tables(tmp_path / "out"), reference)  # each part is scored the same way anywhere


# --------------------------------------------------------------------------------------
# Two nodes: two torchrun launches (--nnodes 2), one rank each, over a loopback rendezvous
# --------------------------------------------------------------------------------------


def node_command(config, node_rank: int, port: int) -> list[str]:
    """One "node" of a two-node job: what each machine of a multi-node job runs, here on one."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "lmeval",
        "run",
        str(config),
        "-q",
    ]


def run_nodes(config, extra: tuple = ()) -> list[tuple[int, str, str]]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [*node_command(config, rank, port), *extra],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs, strict=True)]


@pytest.mark.slow  # two torchrun agents and two workers importing torch on two cores: about 30 s
def test_two_nodes_give_the_single_process_tables(tmp_path, saved_gpt2):
    config = make_workspace(tmp_path, saved_gpt2, TEXTS, part_chars=300, models=("a", "b"))
    reference = single_process(config, tmp_path / "reference")
    done = run_nodes(config)
    if any(code != 0 and TEARDOWN_ABORT in err for code, _, err in done):  # gloo's, see the top of this file
        done = run_nodes(config, ("--overwrite",))
    for code, _, err in done:
        assert code == 0, err[-3000:]
    assert [out.count("wrote ") for _, out, _ in done] == [1, 0]  # the rank on node 0 merges and prints
    assert not (tmp_path / "out" / "parts").exists()
    assert_same_tables(read_tables(tmp_path / "out"), reference)
