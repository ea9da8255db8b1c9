"""Shards without a process group (`lmeval run --shard I/N`, `lmeval merge`): two shards as
two processes merge to the one-process tables exactly; a rerun of one shard scores only its
own missing parts; the merge names what is missing; shards share the folder's lock."""

import subprocess
import sys

import pytest
import torch

import lmeval
from conftest import CORPUS
from helpers import assert_same_tables, child_env, read_tables, two_model_config
from lmeval.cli import main
from lmeval.engine.config import load_config
from lmeval.engine.lock import RunLock
from lmeval.engine.shards import MissingPartsError, ShardError, merge, parse_shard, run_shard
from lmeval.errors import ConfigError, OutputError

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 5 + 1) % len(CORPUS)]}" for i in range(24)]


@pytest.fixture
def one_thread():
    """Shards in this interpreter score with one thread, as the subprocesses (and the reference) do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(config, out):
    lmeval.run(str(config), [f"output.dir={out}"], show_progress=False)
    return read_tables(out)


def part_files(out):
    return {p.relative_to(out): p.stat().st_ino for p in (out / "parts").rglob("*.parquet")}


@pytest.mark.slow  # two interpreters importing torch at once on two cores: about 25 s
def test_two_shard_processes_then_merge_give_the_one_process_tables(tmp_path, saved_gpt2, one_thread, capsys):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    ref = reference(config, tmp_path / "reference")
    command = [sys.executable, "-m", "lmeval", "run", str(config), "-q", "--shard"]
    procs = [
        subprocess.Popen(
            [*command, f"{i}/2"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert "shard " in stdout and "were finished" in stdout, stdout
    out = tmp_path / "out"
    assert not (out / "run.json").exists() and not (out / ".lmeval.lock").exists()  # the last shard removed it
    scored = [int(stdout.split("scored ")[1].split()[0]) for stdout, _ in outputs]
    assert sum(scored) == len(part_files(out)) and min(scored) > 0  # each part once, both shards worked
    assert main(["merge", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert not (out / "parts").exists()
    assert_same_tables(read_tables(out), ref)  # float64 sums and every token row: equal, not close


def test_a_rerun_shard_rescores_only_its_missing_parts_and_merge_names_what_is_missing(
    tmp_path, saved_gpt2, one_thread, capsys
):
    config = load_config(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=200))
    ref = reference(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=200), tmp_path / "reference")
    out = tmp_path / "out"
    first = run_shard(config, 0, 2, show_progress=False)
    assert first.scored == first.share > 0 and first.missing > 0 and first.merged is None
    code = main(["merge", str(out)])  # shard 1 has not run: refused, nothing written, shard 1 named
    err = capsys.readouterr().err
    assert code == 2 and "every part must be scored before the merge" in err, err
    assert "a: shard 1/2:" in err and "b: shard 1/2:" in err and "--shard 1/2" in err and "shard 0/2" not in err
    assert not (out / "run.json").exists() and (out / "parts").exists()

    second = run_shard(config, 1, 2, show_progress=False)
    assert second.scored == second.share > 0 and second.missing == 0
    before = part_files(out)
    assert len(before) == first.share + second.share
    # One part of shard 1 per model lost (a node died, a file was damaged): only those are redone.
    lost = [out / p for p in before if p.stem in {keys[0] for keys in second.scored_keys.values()}]
    assert len(lost) == 2
    for path in lost:
        path.unlink()
    again = run_shard(config, 1, 2, show_progress=False)
    assert again.scored == 2 and again.share == second.share and again.missing == 0
    after = part_files(out)
    kept = {p: ino for p, ino in before.items() if out / p not in lost}
    assert {p: after[p] for p in kept} == kept  # every other part untouched (same inode: not rewritten)
    assert set(after) == set(before)  # the lost ones are back
    tables = merge(out, return_tokens=True)
    assert not (out / "parts").exists() and len(tables["tokens"]) == len(ref["tokens"])
    assert_same_tables(read_tables(out), ref)


def test_rerunning_a_finished_shard_scores_nothing_and_the_last_shard_merges(tmp_path, saved_gpt2, one_thread):
    config = load_config(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=600))
    first = run_shard(config, 0, 2, show_progress=False, merge_when_complete=True)
    assert first.merged is None and "not merged" in first.note and first.missing > 0
    inodes = part_files(tmp_path / "out")
    assert run_shard(config, 0, 2, show_progress=False).scored == 0
    assert part_files(tmp_path / "out") == inodes  # nothing rewritten
    last = run_shard(config, 1, 2, show_progress=False, merge_when_complete=True)
    assert last.merged is not None and (tmp_path / "out" / "run.json").exists()
    assert set(last.merged["summary"].model) == {"a", "b"}


def test_merge_reads_each_part_once_and_a_damaged_part_is_named_removed_and_rescored_by_its_shard(
    tmp_path, saved_gpt2, one_thread, monkeypatch
):
    """The merge checks each part's footer up front and its checksum as it folds it (one read
    of the columns, not two): a part whose values changed under an intact footer is caught
    then, named and removed, nothing is written, and a rerun of its shard redoes only it."""
    import pyarrow.parquet as pq

    from lmeval.engine import merge as merge_module
    from lmeval.engine import parts as parts_module

    config = load_config(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=600))
    ref = reference(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=600), tmp_path / "reference")
    out = tmp_path / "out"
    run_shard(config, 0, 2, show_progress=False)
    second = run_shard(config, 1, 2, show_progress=False)
    files = sorted((out / "parts").rglob("*.parquet"))
    damaged = next(p for p in files if p.stem in second.scored_keys["b"])
    table = pq.read_table(damaged)
    nll = table.column("nll").to_numpy().copy()
    nll[0] += 1.0  # a flipped value: the footer (identity, checksum field) is as written
    pq.write_table(table.set_column(table.column_names.index("nll"), "nll", [nll]), damaged)
    reads, read_part = [], parts_module.read_part

    def counted(path):
        reads.append(path)
        return read_part(path)

    for module in (parts_module, merge_module):  # every reader of a part's columns
        monkeypatch.setattr(module, "read_part", counted)
    with pytest.raises(OutputError, match=f"result part {damaged} cannot be merged"):
        merge(out)
    assert not damaged.exists() and not (out / "summary.csv").exists() and not (out / "run.json").exists()
    assert len(reads) <= len(files) and damaged in reads  # no part read twice
    monkeypatch.undo()
    assert run_shard(config, 1, 2, show_progress=False).scored == 1
    merge(out)
    assert_same_tables(read_tables(out), ref)


@pytest.mark.parametrize("text", ["2/2", "1/0", "a/b", "1", "-1/2", "0/2/3"])
def test_a_bad_shard_spelling_is_explained(text):
    with pytest.raises(ConfigError, match=r"--shard: must be I/N with 0 <= I < N"):
        parse_shard(text)


def test_parse_shard_reads_i_of_n():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 8 ") == (3, 8)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard", "2/2"], "--shard: must be I/N"),
        (["--shard", "0/2", "--fresh"], "--shard: must not be combined with --fresh"),
        (["--shard", "0/2", "--overwrite"], "--shard: must not be combined with --overwrite"),
        (["--merge-when-complete"], "--merge-when-complete: must come with --shard I/N"),
    ],
)
def test_shard_flags_are_checked_on_the_command_line(tmp_path, saved_gpt2, capsys, flags, message):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    assert main(["run", str(config), "-q", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_shard_of_another_count_is_refused(tmp_path, saved_gpt2, one_thread):
    config = load_config(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=600))
    run_shard(config, 0, 2, show_progress=False)
    with pytest.raises(ShardError, match=r"--shard: N must be the shard count .* \(got 3, started with 2\)"):
        run_shard(config, 0, 3, show_progress=False)


def test_merge_of_a_folder_without_shards_is_explained(tmp_path, saved_gpt2, capsys, one_thread):
    assert main(["merge", str(tmp_path / "nothing")]) == 2
    assert "OUTPUT_DIR must be the output.dir of `lmeval run CONFIG --shard I/N`" in capsys.readouterr().err
    lmeval.run(str(two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=600)), show_progress=False)
    assert main(["merge", str(tmp_path / "out")]) == 2  # a plain run's folder, finished
    assert "it holds a finished run (run.json)" in capsys.readouterr().err
    config = load_config(
        two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=600), [f"output.dir={tmp_path / 'sharded'}"]
    )
    run_shard(config, 1, 2, show_progress=False)
    with pytest.raises(MissingPartsError, match=r"shard 0/2: \d part\(s\), starting at documents d0"):
        merge(tmp_path / "sharded")


def test_shards_share_the_lock_and_exclude_a_plain_run(tmp_path):
    one = RunLock(tmp_path, shared=True, role="shard 0/2").acquire()
    two = RunLock(tmp_path, shared=True, role="shard 1/2").acquire()  # side by side
    with pytest.raises(OutputError, match=r"in use by another lmeval run \(shard 1/2, pid"):
        RunLock(tmp_path).acquire()  # a plain run or a merge waits for every shard
    one.release()
    assert (tmp_path / ".lmeval.lock").exists()  # shard 1 still holds it
    with pytest.raises(OutputError, match="in use by another lmeval run"):
        RunLock(tmp_path).acquire()
    two.release()
    assert not (tmp_path / ".lmeval.lock").exists()  # the last shard removes it
    with RunLock(tmp_path), pytest.raises(OutputError, match="in use by another lmeval run"):
        RunLock(tmp_path, shared=True).acquire()  # no shard starts during a merge
